"""A local stand-in for Google Vertex AI: Claude's ``rawPredict``/``streamRawPredict`` and Gemini's
``generateContent``/``streamGenerateContent?alt=sse``, its OAuth token endpoint, and failures on cue.

Built on the Anthropic stand-in (:mod:`tests.support.anthropic_standin`): the same socket-level server, the
same deterministic "model" and the same fault vocabulary, so a Claude answer here is byte for byte the one
the Anthropic stand-in gives for the same model (``claude-sonnet-4-5@20250929`` on Vertex is
``claude-sonnet-4-5-20250929`` at Anthropic) and a stream cut on one continues exactly on the other.

**What it checks.**
- **The OAuth bearer**, on every call: ``authorization: Bearer <token>`` must be a token this stand-in issued
  and not yet expired, else 401 ``UNAUTHENTICATED`` in Google's shape. Tokens come from ``POST /token``, the
  ``token_uri`` of the service-account JSON that :func:`service_account_file` writes: google-auth sends a
  JWT-bearer grant there, and the stand-in verifies the assertion as Google does — RS256 signature
  against the service account's public key (an RSA key generated for the test), ``iss`` the account,
  ``aud`` Google's token endpoint, the cloud-platform ``scope``, ``iat``/``exp`` current — and issues
  ``ya29.…`` tokens that expire after ``token_lifetime`` seconds (short in tests, so the gateway must
  refresh them).
- **The URL**: ``/v1/projects/{project}/locations/{location}/publishers/{anthropic|google}/models/{model}:
  {method}``; another project is 403 ``PERMISSION_DENIED``, an unknown model or location 404 ``NOT_FOUND``;
  ``streamGenerateContent`` without ``alt=sse`` is refused (the gateway must ask for SSE).
- **Claude's body**: ``anthropic_version: vertex-2023-10-16`` required, ``model`` refused (it is in the URL),
  ``stream`` must match the method, then every rule of the Anthropic stand-in (``anthropic_rules``).
- **Gemini's body**: ``contents`` with roles ``user``/``model`` only, each part exactly one of ``text``,
  ``inlineData``, ``fileData``, ``functionCall``, ``functionResponse`` (``thought`` only beside text), every
  ``functionResponse`` naming a function called in the turn before; ``systemInstruction``, ``tools``
  (``functionDeclarations`` with ``parameters`` or ``parametersJsonSchema``), ``toolConfig``,
  ``generationConfig`` — unknown fields are 400 ``INVALID_ARGUMENT`` with Google's wording (``Invalid JSON
  payload received. Unknown name "x"``).

**What it answers (Gemini).** A deterministic answer per conversation (model, system, contents, tools,
thinking): thought summary parts first when ``includeThoughts`` and a budget other than 0; a
``functionCall`` (whole ``args`` object) when ``toolConfig`` says ``ANY`` or the last user text says "tool"
or "call"; otherwise prose of 41 to 79 tokens. Streamed as ``data: <chunk>\\r\\n\\r\\n`` with several tokens
per chunk; the last chunk carries ``finishReason`` and ``usageMetadata`` (``promptTokenCount``,
``candidatesTokenCount``, ``thoughtsTokenCount``, ``totalTokenCount``).

**Faults** (header ``x-standin-fault``, else :meth:`set_fault`'s script, else the default): those of the
Anthropic stand-in — ``{"status": 429|503|500|...}`` (Google's error shape; 529 in Anthropic's),
``close``, ``reset``, ``hang``, ``{"delay": s}``, ``{"cut_after": k}``, ``{"hang_after": k}`` — plus, for
Gemini, ``{"safety_after": k}`` (a chunk with ``finishReason: SAFETY`` after ``k`` chunks),
``"blocked"`` (``promptFeedback.blockReason: SAFETY``, no candidates) and ``"prompt_too_long"`` (400
"The input token count (…) exceeds the maximum number of tokens allowed (…)").
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import json
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.support import anthropic_standin as base
from tests.support.anthropic_answer import (
    answer_length,
    count_tokens,
    digest,
    group_tokens,
    prose,
    tool_input,
    truncate_tokens,
)
from tests.support.anthropic_rules import ApiError, invalid, parse

VERTEX_ANTHROPIC_VERSION = "vertex-2023-10-16"
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
DEFAULT_CLAUDE = ("claude-sonnet-4-5@20250929", "claude-haiku-4-5@20251001")
DEFAULT_GEMINI = ("gemini-2.5-pro", "gemini-2.5-flash")
GOOGLE_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
GOOGLE_MESSAGES = {
    401: "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or "
    "other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project.",
    429: "Quota exceeded for aiplatform.googleapis.com/generate_content_requests_per_minute_per_project_per_"
    "base_model with base model: {model}. Please submit a quota increase request.",
    500: "Internal error encountered.",
    503: "The service is currently unavailable.",
    504: "Deadline expired before operation could complete.",
}
_PATH = re.compile(r"^/v1/projects/([^/]+)/locations/([^/]+)/publishers/([^/]+)/models/([^/:]+):([A-Za-z]+)$")
_GEMINI_FIELDS = frozenset(
    {
        "contents", "systemInstruction", "tools", "toolConfig", "generationConfig", "safetySettings",
        "cachedContent", "labels",
    }
)  # fmt: skip
_GENERATION_FIELDS = frozenset(
    {
        "maxOutputTokens", "temperature", "topP", "topK", "stopSequences", "seed", "candidateCount",
        "thinkingConfig", "responseMimeType", "responseSchema", "presencePenalty", "frequencyPenalty",
        "responseLogprobs", "logprobs",
    }
)  # fmt: skip
_PART_KINDS = ("text", "inlineData", "fileData", "functionCall", "functionResponse")


class GoogleError(Exception):
    """An error in Google's shape: ``{"error": {"code", "message", "status"}}``."""

    def __init__(self, code: int, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or GOOGLE_STATUS.get(code, "UNKNOWN")


def claude_at_anthropic(model: str) -> str:
    """Vertex's Claude name → Anthropic's: ``claude-sonnet-4-5@20250929`` → ``claude-sonnet-4-5-20250929``."""
    return model.replace("@", "-")


@dataclass
class ServiceAccount:
    """A service account the stand-in trusts: its email, key id and public key."""

    email: str
    key_id: str
    public_key: rsa.RSAPublicKey


@dataclass
class Issued:
    token: str
    email: str
    issued_at: float
    expires_at: float


_KEYS: list[rsa.RSAPrivateKey] = []


def _private_key() -> rsa.RSAPrivateKey:
    """One RSA key per test session (generating one costs tens of milliseconds)."""
    if not _KEYS:
        _KEYS.append(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    return _KEYS[0]


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class VertexStandIn(base.StandIn):
    """One Vertex AI endpoint (``url`` is its ``…/v1`` base) serving Claude and Gemini models."""

    def __init__(
        self,
        name: str = "vertex",
        *,
        project: str = "sky-test-project",
        location: str = "us-east5",
        publisher: str = "anthropic",
        claude_models: Sequence[str] = DEFAULT_CLAUDE,
        gemini_models: Sequence[str] = DEFAULT_GEMINI,
        token_lifetime: float = 3600.0,
        token_delay: float = 0.0,
        **options: Any,
    ) -> None:
        super().__init__(name, models=[claude_at_anthropic(m) for m in claude_models], **options)
        self.engine = "vertex"
        self.project = project
        self.location = location
        #: Which publisher's model the test fleet's pool uses (``model`` is its ``upstream_model``).
        self.publisher = publisher
        self.claude_models = list(claude_models)
        self.gemini_models = list(gemini_models)
        self.model = (self.claude_models if publisher == "anthropic" else self.gemini_models)[0]
        self.can_continue = True
        self.api_key = ""  # no x-api-key: Vertex takes OAuth bearers only
        #: The service-account JSON the test fleet names (written by :meth:`service_account_file`).
        self.credentials_path: Path | None = None
        self.token_lifetime = token_lifetime
        #: Seconds the token endpoint takes to answer (a slow exchange must not slow requests).
        self.token_delay = token_delay
        self.accounts: dict[str, ServiceAccount] = {}
        self.issued: dict[str, Issued] = {}
        #: Every token request: (when it came, what was answered).
        self.token_requests: list[tuple[float, int]] = []
        #: Inference calls refused for their bearer (missing, unknown, expired).
        self.unauthenticated = 0

    @property
    def pool_settings(self) -> dict[str, Any]:
        """The fleet pool's ``vertex`` section for this stand-in (tests/conftest.py reads it)."""
        section: dict[str, Any] = {
            "project": self.project,
            "location": self.location,
            "publisher": self.publisher,
        }
        if self.credentials_path is not None:
            section["credentials_file"] = str(self.credentials_path)
        return {"vertex": section}

    # -- credentials ----------------------------------------------------------------------------------------

    @property
    def token_uri(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def service_account_file(
        self, directory: Path, email: str = "gateway@sky-test-project.iam.gserviceaccount.com"
    ) -> Path:
        """Write a service-account key JSON whose ``token_uri`` is this stand-in, trust its key, and make it
        the credentials of this stand-in's pool (:attr:`pool_settings`)."""
        key = _private_key()
        key_id = hashlib.sha1(email.encode()).hexdigest()
        self.accounts[email] = ServiceAccount(email, key_id, key.public_key())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        data = {
            "type": "service_account",
            "project_id": self.project,
            "private_key_id": key_id,
            "private_key": pem,
            "client_email": email,
            "client_id": str(int(key_id[:15], 16)),
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_uri,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "universe_domain": "googleapis.com",
        }
        path = directory / f"{self.name}-sa.json"
        path.write_text(json.dumps(data))
        self.credentials_path = path
        return path

    def valid(self, token: str, at: float | None = None) -> bool:
        issued = self.issued.get(token)
        return issued is not None and (time.time() if at is None else at) < issued.expires_at

    def _verify_assertion(self, assertion: str) -> str:
        """The account email of a valid JWT-bearer assertion; raises ``ValueError`` saying why not."""
        try:
            head64, claims64, sig64 = assertion.split(".")
            header = json.loads(_b64url_decode(head64))
            claims = json.loads(_b64url_decode(claims64))
            signature = _b64url_decode(sig64)
        except (ValueError, json.JSONDecodeError):
            raise ValueError("Invalid JWT: malformed") from None
        if header.get("alg") != "RS256":
            raise ValueError("Invalid JWT: alg must be RS256")
        account = self.accounts.get(str(claims.get("iss")))
        if account is None:
            raise ValueError("Invalid JWT: unknown issuer")
        if header.get("kid") not in (None, account.key_id):
            raise ValueError("Invalid JWT: unknown key id")
        try:
            account.public_key.verify(
                signature, f"{head64}.{claims64}".encode(), padding.PKCS1v15(), hashes.SHA256()
            )
        except InvalidSignature:
            raise ValueError("Invalid JWT Signature.") from None
        # google-auth names Google's token endpoint as the audience whatever the token_uri (as Google wants)
        if claims.get("aud") not in (GOOGLE_TOKEN_AUDIENCE, self.token_uri):
            raise ValueError("Invalid JWT: Token must be a short-lived token and in a reasonable timeframe")
        now = time.time()
        if not (claims.get("iat", 0) <= now + 60 and now < claims.get("exp", 0) <= now + 3700):
            raise ValueError("Invalid JWT: Token must be a short-lived token and in a reasonable timeframe")
        if CLOUD_PLATFORM not in str(claims.get("scope", "")).split():
            raise ValueError("Invalid JWT: the cloud-platform scope is required")
        return account.email

    async def _token(self, writer: asyncio.StreamWriter, seen: base.Received) -> None:
        if self.token_delay:
            await asyncio.sleep(self.token_delay)
        form = parse_qs(seen.raw.decode("latin-1"))
        grant = form.get("grant_type", [""])[0]
        status, data = 200, {}
        try:
            if grant != "urn:ietf:params:oauth:grant-type:jwt-bearer":
                raise ValueError("unsupported_grant_type")
            email = self._verify_assertion(form.get("assertion", [""])[0])
        except ValueError as exc:
            status, data = 400, {"error": "invalid_grant", "error_description": str(exc)}
        else:
            token = "ya29.c." + secrets.token_urlsafe(48)
            now = time.time()
            self.issued[token] = Issued(token, email, now, now + self.token_lifetime)
            data = {
                "access_token": token,
                "expires_in": max(1, round(self.token_lifetime)),
                "token_type": "Bearer",
            }
        self.token_requests.append((time.monotonic(), status))
        await self._json_response(writer, seen, status, data)
        seen.completed = True

    # -- serving --------------------------------------------------------------------------------------------

    def _headers(self, seen: base.Received, content_type: str) -> dict[str, str]:
        return {
            "content-type": content_type,
            "vary": "Origin, X-Origin, Referer",
            "date": email.utils.formatdate(time.time(), usegmt=True),
            "server": "scaffolding on HTTPServer2",
            "x-xss-protection": "0",
            "x-frame-options": "SAMEORIGIN",
            "x-content-type-options": "nosniff",
            "connection": "keep-alive",
        }

    async def _google_error(
        self, writer: asyncio.StreamWriter, seen: base.Received, exc: GoogleError
    ) -> None:
        data = {"error": {"code": exc.code, "message": exc.message, "status": exc.status}}
        extra = {}
        await self._json_response(writer, seen, exc.code, data, extra)
        seen.completed = True

    def _bearer(self, seen: base.Received) -> None:
        header = seen.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not self.valid(token, time.time()):
            self.unauthenticated += 1
            raise GoogleError(401, GOOGLE_MESSAGES[401])

    async def _handle(
        self, seen: base.Received, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        if seen.method == "POST" and seen.path == "/token":
            await self._token(writer, seen)
            return True
        try:
            self._bearer(seen)
            match = _PATH.match(seen.path)
            if seen.method != "POST" or match is None:
                raise GoogleError(404, f"The requested URL {seen.path} was not found on this server.")
            project, location, publisher, model, method = match.groups()
            if project != self.project:
                raise GoogleError(
                    403,
                    f"Permission 'aiplatform.endpoints.predict' denied on resource "
                    f"'//aiplatform.googleapis.com/projects/{project}/locations/{location}/publishers/"
                    f"{publisher}/models/{model}' (or it may not exist).",
                )
            if location != self.location:
                raise GoogleError(404, f"Location {location} is not served here.")
            if seen.raw and seen.body is None:
                raise GoogleError(400, "Invalid JSON payload received. Unexpected token.")
            if publisher == "anthropic" and method in ("rawPredict", "streamRawPredict"):
                if model not in self.claude_models:
                    raise GoogleError(
                        404,
                        f"Publisher Model `projects/{project}/locations/{location}/"
                        f"publishers/anthropic/models/{model}` not found.",
                    )
                return await self._claude(seen, reader, writer, model, method == "streamRawPredict")
            if publisher == "google" and method in ("generateContent", "streamGenerateContent"):
                if model not in self.gemini_models:
                    raise GoogleError(
                        404,
                        f"Publisher Model `projects/{project}/locations/{location}/"
                        f"publishers/google/models/{model}` not found.",
                    )
                stream = method == "streamGenerateContent"
                if stream and "alt=sse" not in seen.query.split("&"):
                    raise GoogleError(
                        400, "stand-in: streamGenerateContent is answered as SSE only (alt=sse)"
                    )
                return await self._gemini(seen, reader, writer, model, stream)
            raise GoogleError(404, f"The requested URL {seen.path} was not found on this server.")
        except GoogleError as exc:
            await self._google_error(writer, seen, exc)
            return True
        except ApiError as exc:  # 529: Claude's capacity, in Anthropic's shape as Vertex passes it on
            await self._error(writer, seen, exc)
            return True

    def _before(
        self, seen: base.Received, reader: asyncio.StreamReader, model: str
    ) -> tuple[dict[str, Any], str | None]:
        """The fault for this request as a dict, and what to do at once (``close``/``reset``/``hang``)."""
        fault = seen.fault = self._fault(seen)
        f = fault if isinstance(fault, dict) else {fault: True}
        for now in ("close", "reset", "hang"):
            if f.get(now):
                return f, now
        if "status" in f:
            status = int(f["status"])
            if status == 529:
                raise ApiError(529, "overloaded_error", "Overloaded")
            message = GOOGLE_MESSAGES.get(status, "Error").replace("{model}", model)
            raise GoogleError(status, str(f.get("message", message)))
        return f, None

    async def _act(self, now: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if now == "reset":
            base._reset(writer)
        elif now == "hang":
            await self._hold(reader)
        return False

    # -- Claude ---------------------------------------------------------------------------------------------

    async def _claude(
        self,
        seen: base.Received,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        model: str,
        stream: bool,
    ) -> bool:
        try:
            body = seen.body
            if not isinstance(body, dict):
                raise invalid("There was an error parsing the body of your request: expected a JSON object")
            if body.get("anthropic_version") != VERTEX_ANTHROPIC_VERSION:
                raise invalid(f"anthropic_version: must be {VERTEX_ANTHROPIC_VERSION!r}")
            if "model" in body:
                raise invalid("model: Extra inputs are not permitted")
            if bool(body.get("stream")) != stream:
                raise invalid("stream: must be true for streamRawPredict and absent for rawPredict")
            f, now = self._before(seen, reader, model)
            if now is not None:
                return await self._act(now, reader, writer)
            if "delay" in f:
                await asyncio.sleep(float(f["delay"]))
            if f.get("prompt_too_long"):
                raise invalid("prompt is too long: 200001 tokens > 200000 maximum")
            anthropic_body = {k: v for k, v in body.items() if k != "anthropic_version"}
            anthropic_body["model"] = claude_at_anthropic(model)
            convo = parse(
                anthropic_body,
                headers=seen.headers,
                models=self.models,
                max_output=self.max_output_tokens,
                secret=self.secret,
            )
        except ApiError as exc:
            await self._error(writer, seen, exc)
            return True
        ident = seen.request_id.encode()
        answer = seen.answer = self.answer(convo, ident)
        usage = self.usage(convo, commit=True)
        message_id = "msg_vrtx_01" + base._b58(hashlib.sha256(ident).digest(), 20)
        where = base._stream_fault(f)
        if convo.stream:
            return await self._stream(seen, reader, writer, convo, answer, usage, message_id, where)
        return await self._whole(seen, reader, writer, convo, answer, usage, message_id, where)

    # -- Gemini ---------------------------------------------------------------------------------------------

    async def _gemini(
        self,
        seen: base.Received,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        model: str,
        stream: bool,
    ) -> bool:
        body = seen.body
        request = check_gemini(body)
        f, now = self._before(seen, reader, model)
        if now is not None:
            return await self._act(now, reader, writer)
        if "delay" in f:
            await asyncio.sleep(float(f["delay"]))
        prompt_tokens = request.prompt_tokens
        if f.get("prompt_too_long"):
            raise GoogleError(
                400,
                f"The input token count ({prompt_tokens + 1048576}) exceeds the maximum number of tokens "
                "allowed (1048576).",
            )
        response_id = base._b58(hashlib.sha256(seen.request_id.encode()).digest(), 22)
        meta = {"modelVersion": model, "createTime": _rfc3339(time.time()), "responseId": response_id}
        if f.get("blocked"):
            chunk = {
                "promptFeedback": {
                    "blockReason": "SAFETY",
                    "safetyRatings": [
                        {
                            "category": "HARM_CATEGORY_DANGEROUS_CONTENT",
                            "probability": "HIGH",
                            "blocked": True,
                        }
                    ],
                },
                "usageMetadata": {"promptTokenCount": prompt_tokens, "totalTokenCount": prompt_tokens},
                **meta,
            }
            chunks = [chunk]
        else:
            answer = self.gemini_answer(model, request)
            chunks = answer.chunks(meta, prompt_tokens, stream, f.get("safety_after"))
        if stream:
            return await self._gemini_stream(seen, reader, writer, chunks, f)
        whole = merge_chunks(chunks)
        await self._json_response(writer, seen, 200, whole)
        seen.sent_text = "".join(
            p.get("text", "") for c in chunks for p in _parts_of(c) if not p.get("thought")
        )
        seen.completed = True
        return True

    def gemini_answer(self, model: str, request: GeminiRequest) -> GeminiAnswer:
        """The deterministic answer for a Gemini request."""
        seed = digest(model, request.system, request.contents, request.tools, request.thinking)
        thought = ""
        if request.thinking:
            thought = prose(seed, 31, salt="thinking", code=False)
        call = None
        if (
            request.tools
            and not request.answered
            and (
                request.mode == "ANY"
                or (request.mode == "AUTO" and re.search(r"\b(tool|call)\b", request.last_user_text, re.I))
            )
        ):
            allowed = [t for t in request.tools if not request.allowed or t["name"] in request.allowed]
            tool = allowed[seed[1] % len(allowed)]
            schema = tool.get("parametersJsonSchema") or tool.get("parameters") or {}
            call = {"name": tool["name"], "args": tool_input(schema, seed)}
        text = "" if call else prose(seed, answer_length(seed, self.answer_tokens))
        reason = "STOP"
        limit = request.max_tokens
        if limit is not None and count_tokens(text) > limit:
            text, reason = truncate_tokens(text, limit), "MAX_TOKENS"
        hits = [(text.find(s), s) for s in request.stops if s and s in text]
        if hits:
            text = text[: min(hits)[0]]
        return GeminiAnswer(thought, text, call, reason, self.chunking)

    async def _gemini_stream(
        self,
        seen: base.Received,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        chunks: list[dict[str, Any]],
        f: dict[str, Any],
    ) -> bool:
        cut = f.get("cut_after")
        hang = f.get("hang_after")
        headers = self._headers(seen, "text/event-stream")
        headers["transfer-encoding"] = "chunked"
        seen.status = 200
        writer.write(self._head(200, headers))
        async with self._watching(reader, seen) as watch:
            for i, chunk in enumerate(chunks):
                if watch.done():
                    seen.client_gone = True
                    return False
                if cut is not None and i >= int(cut):
                    await writer.drain()
                    base._reset(writer)
                    return False
                if hang is not None and i >= int(hang):
                    await writer.drain()
                    await self._hold_until(watch)
                    seen.client_gone = watch.done()
                    return False
                if i and self.delta_delay:
                    await asyncio.sleep(self.delta_delay)
                await self._write(writer, b"data: " + base._json(chunk) + b"\r\n\r\n")
                seen.deltas_sent += 1
                seen.sent_text += "".join(p.get("text", "") for p in _parts_of(chunk) if not p.get("thought"))
            return await self._end_chunked(writer, seen, watch)
        return False  # the client went away mid-answer


# -- Gemini requests and answers -----------------------------------------------------------------------------


@dataclass
class GeminiRequest:
    system: str
    contents: list[Any]
    tools: list[dict[str, Any]]
    mode: str
    allowed: list[str]
    thinking: bool
    max_tokens: int | None
    stops: list[str]
    answered: bool
    last_user_text: str
    prompt_tokens: int


def check_gemini(body: Any) -> GeminiRequest:
    """Validate a ``generateContent`` body like Vertex; raises :class:`GoogleError` (400) for a bad one."""
    if not isinstance(body, dict):
        raise GoogleError(400, "Invalid JSON payload received. Expected an object.")
    for name in body:
        if name not in _GEMINI_FIELDS:
            raise GoogleError(
                400, f'Invalid JSON payload received. Unknown name "{name}": Cannot find field.'
            )
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise GoogleError(400, "Unable to submit request because it has an empty contents field.")
    called: list[str] = []
    texts: list[str] = []
    for i, turn in enumerate(contents):
        if not isinstance(turn, dict) or turn.get("role") not in ("user", "model"):
            raise GoogleError(400, f"Please use a valid role: user, model. (contents[{i}])")
        parts = turn.get("parts")
        if not isinstance(parts, list) or not parts:
            raise GoogleError(400, f"Unable to submit request because contents[{i}] has no parts.")
        for j, part in enumerate(parts):
            kinds = [k for k in _PART_KINDS if k in part] if isinstance(part, dict) else []
            if len(kinds) != 1:
                raise GoogleError(400, f"contents[{i}].parts[{j}]: a part holds exactly one kind of data")
            extra = set(part) - {kinds[0], "thought", "thoughtSignature"}
            if extra:
                raise GoogleError(400, f'Invalid JSON payload received. Unknown name "{sorted(extra)[0]}"')
            kind = kinds[0]
            if kind == "text":
                texts.append(str(part["text"]))
            elif kind == "functionCall":
                if turn["role"] != "model":
                    raise GoogleError(400, "functionCall parts belong to model turns")
                called.append(str(part["functionCall"].get("name")))
                texts.append(json.dumps(part["functionCall"].get("args", {})))
            elif kind == "functionResponse":
                name = part["functionResponse"].get("name")
                if name not in called:
                    raise GoogleError(
                        400,
                        "Please ensure that function response turn comes immediately after a function call "
                        "turn. And the number of function response parts should be equal to number of "
                        "function call parts of the function call turn.",
                    )
                if not isinstance(part["functionResponse"].get("response"), dict):
                    raise GoogleError(400, "functionResponse.response must be an object")
                texts.append(json.dumps(part["functionResponse"]["response"]))
        if turn["role"] == "user" and not any("functionResponse" in p for p in parts):
            called = []
    last = contents[-1]
    system_parts = (body.get("systemInstruction") or {}).get("parts") or []
    system = "".join(str(p.get("text", "")) for p in system_parts if isinstance(p, dict))
    tools: list[dict[str, Any]] = []
    for tool in body.get("tools") or []:
        for decl in tool.get("functionDeclarations") or []:
            if "parameters" in decl and "parametersJsonSchema" in decl:
                raise GoogleError(400, "parameters and parametersJsonSchema cannot both be set")
            tools.append(decl)
    config = (body.get("toolConfig") or {}).get("functionCallingConfig") or {}
    mode = str(config.get("mode", "AUTO"))
    if mode not in ("AUTO", "ANY", "NONE", "VALIDATED"):
        raise GoogleError(400, f"Invalid value at 'tool_config.function_calling_config.mode' ({mode})")
    generation = body.get("generationConfig") or {}
    for name in generation:
        if name not in _GENERATION_FIELDS:
            raise GoogleError(
                400, f"Invalid JSON payload received. Unknown name \"{name}\" at 'generation_config'."
            )
    temperature = generation.get("temperature")
    if temperature is not None and not 0 <= temperature <= 2:
        raise GoogleError(400, "Unable to submit request because temperature must be in [0.0, 2.0].")
    thinking_config = generation.get("thinkingConfig") or {}
    thinking = bool(thinking_config.get("includeThoughts")) and thinking_config.get("thinkingBudget") != 0
    stops = generation.get("stopSequences") or []
    if len(stops) > 5:
        raise GoogleError(400, "Unable to submit request because stopSequences can have at most 5 items.")
    last_texts = [str(p.get("text", "")) for p in last.get("parts", []) if "text" in p]
    return GeminiRequest(
        system=system,
        contents=[
            {
                "role": t["role"],
                "parts": [{k: v for k, v in p.items() if k != "thoughtSignature"} for p in t["parts"]],
            }
            for t in contents
        ],
        tools=tools,
        mode=mode,
        allowed=list(config.get("allowedFunctionNames") or []),
        thinking=thinking,
        max_tokens=generation.get("maxOutputTokens"),
        stops=list(stops),
        answered=any("functionResponse" in p for p in last.get("parts", [])),
        last_user_text=" ".join(last_texts) if last.get("role") == "user" else "",
        prompt_tokens=count_tokens(system + "".join(texts)) + 3 * len(contents),
    )


@dataclass
class GeminiAnswer:
    thought: str
    text: str
    call: dict[str, Any] | None
    reason: str
    chunking: tuple[int, ...]

    def chunks(
        self, meta: dict[str, Any], prompt_tokens: int, stream: bool, safety_after: int | None
    ) -> list[dict[str, Any]]:
        """The answer as stream chunks (several tokens each); the last one finishes and counts."""
        parts: list[dict[str, Any]] = []
        if self.thought:
            parts += [{"text": p, "thought": True} for p in group_tokens(self.thought, self.chunking)]
        parts += [{"text": p} for p in group_tokens(self.text, self.chunking)]
        if self.call is not None:
            parts.append({"functionCall": self.call})
        reason = self.reason
        if safety_after is not None:
            parts, reason = parts[: int(safety_after)], "SAFETY"
        thoughts = count_tokens(self.thought)
        sent_text = "".join(p.get("text", "") for p in parts if not p.get("thought"))
        answer = count_tokens(sent_text) + (count_tokens(json.dumps(self.call["args"])) if self.call else 0)
        usage: dict[str, Any] = {
            "promptTokenCount": prompt_tokens,
            "candidatesTokenCount": answer,
            "totalTokenCount": prompt_tokens + answer + thoughts,
            "trafficType": "ON_DEMAND",
        }
        if thoughts:
            usage["thoughtsTokenCount"] = thoughts
        out = [{"candidates": [{"content": {"role": "model", "parts": [p]}}], **meta} for p in parts]
        final: dict[str, Any] = {"finishReason": reason}
        if reason == "SAFETY":
            final["safetyRatings"] = [
                {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True}
            ]
        if out and reason != "SAFETY":
            out[-1]["candidates"][0].update(final)
            out[-1]["usageMetadata"] = usage
        else:
            out.append({"candidates": [final], "usageMetadata": usage, **meta})
        return out


def merge_chunks(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """A whole ``generateContent`` answer from the stream's chunks (adjacent texts of a kind joined)."""
    parts: list[dict[str, Any]] = []
    for part in (p for c in chunks for p in _parts_of(c)):
        if (
            parts
            and "text" in part
            and "text" in parts[-1]
            and part.get("thought") == parts[-1].get("thought")
        ):
            parts[-1] = {**parts[-1], "text": parts[-1]["text"] + part["text"]}
        else:
            parts.append(dict(part))
    last = chunks[-1]
    if "candidates" not in last:
        return last
    candidate: dict[str, Any] = {k: v for k, v in last["candidates"][0].items() if k != "content"}
    if parts:
        candidate = {"content": {"role": "model", "parts": parts}, **candidate}
    return {"candidates": [candidate], **{k: v for k, v in last.items() if k != "candidates"}}


def _parts_of(chunk: dict[str, Any]) -> list[dict[str, Any]]:
    candidates = chunk.get("candidates") or [{}]
    return list((candidates[0].get("content") or {}).get("parts") or [])


def _rfc3339(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1e6):06d}Z"
