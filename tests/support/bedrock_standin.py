"""A local stand-in for Amazon Bedrock's runtime: Converse, ConverseStream, InvokeModel and
InvokeModelWithResponseStream for Claude models, byte for byte, and failures on cue.

Serves ``POST /model/{modelId}/converse``, ``/converse-stream``, ``/invoke`` and
``/invoke-with-response-stream`` on a loopback port; the server loop, the fault script and the answer are
the Anthropic stand-in's (:class:`~tests.support.anthropic_standin.StandIn`, subclassed), so both vendors
give the same deterministic answer to the same conversation and a prefill continues it exactly.

**What it checks.** The SigV4 signature, recomputed with botocore from the request as received and the
stand-in's own secret (403 ``InvalidSignatureException`` "The request signature we calculated does not
match..." otherwise); the access key (403 ``UnrecognizedClientException``) and the session token; the
credential scope's region and service (``bedrock``); ``x-amz-date`` within 5 minutes ("Signature
expired"); an unsigned request is 403 ``MissingAuthenticationTokenException``. The model id in the path
(foundation model or a cross-region inference profile such as ``us.anthropic...``; else 400 "The provided
model identifier is invalid."). Converse bodies field by field: unknown top-level fields, alternating
roles starting with a user turn, one member per content block, blank text blocks, ``toolUse`` without a
``toolConfig``; then, translated into Anthropic's body, everything the Anthropic stand-in checks (prefill
whitespace, prefill with thinking, signatures, tool pairing, the context window: "Input is too long for
requested model."). InvokeModel bodies: ``anthropic_version: bedrock-2023-05-31``, no ``model`` or
``stream`` ("extraneous key [model] is not permitted").

**What it sends.** Event-stream frames with real CRCs (:mod:`tests.support.eventstream`), each payload
padded with a ``p`` field as the service does; a frame written in two TCP writes split inside it
(``split_frames``); Converse's ``messageStart``, ``contentBlockStart`` (tool calls), ``contentBlockDelta``
(several tokens each), ``contentBlockStop``, ``messageStop``, ``metadata`` (usage, latency); InvokeModel's
``chunk`` frames holding Anthropic's events (base64), ``message_stop`` with
``amazon-bedrock-invocationMetrics``. Errors as JSON ``{"message": ...}`` with ``x-amzn-ErrorType``.

**Faults** as the Anthropic stand-in's (``x-standin-fault`` header, :meth:`set_fault`, :meth:`then`):
``{"status": 429}`` (``ThrottlingException``), 503 (``ServiceUnavailableException``), 500, 424, 408, 403,
``{"status": 429, "error": "ModelNotReadyException"}``; in a stream ``cut_after`` / ``cut_in`` (RST),
``hang_after`` / ``hang_in``, ``error_after`` / ``error_in`` (an exception frame, ``throttlingException``
unless ``exception`` names another), ``bad_crc_after`` (a frame whose message CRC is wrong).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import email.utils
import hashlib
import hmac
import json
import re
import time
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from tests.support import eventstream
from tests.support.anthropic_answer import Answer, Block
from tests.support.anthropic_rules import ApiError, Conversation, parse
from tests.support.anthropic_standin import (
    DEFAULT_CHUNKING,
    Received,
    StandIn,
    _b58,
    _fault_index,
    _json,
    _reset,
    _stream_fault,
)

#: Bedrock model ids the stand-in serves → the Claude model each one is (the Anthropic stand-in's names).
DEFAULT_MODELS: dict[str, str] = {
    "anthropic.claude-sonnet-4-5-20250929-v1:0": "claude-sonnet-4-5-20250929",
    "anthropic.claude-haiku-4-5-20251001-v1:0": "claude-haiku-4-5-20251001",
}
ACCESS_KEY = "AKIASTANDIN000000001"
SECRET_KEY = "standin/secret+key/0123456789abcdefghijklmn"
INVOKE_VERSION = "bedrock-2023-05-31"
#: Geographic prefixes of cross-region inference profiles (``us.anthropic.claude-...``).
_GEO = re.compile(r"^(us|eu|apac|jp|au|ca|us-gov|global)\.")
_PAD = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0"
CONVERSE_FIELDS = frozenset(
    {
        "messages", "system", "inferenceConfig", "toolConfig", "additionalModelRequestFields",
        "guardrailConfig", "additionalModelResponseFieldPaths", "promptVariables", "requestMetadata",
        "performanceConfig", "serviceTier",
    }
)  # fmt: skip
INVOKE_FIELDS = frozenset(
    {
        "anthropic_version", "anthropic_beta", "max_tokens", "messages", "system", "stop_sequences", "tools",
        "tool_choice", "thinking", "temperature", "top_p", "top_k", "output_config", "context_management",
    }
)  # fmt: skip
BLOCK_MEMBERS = frozenset(
    {"text", "image", "document", "toolUse", "toolResult", "reasoningContent", "cachePoint", "guardContent"}
)
#: HTTP status → the error type Bedrock names it with, and its message.
ERRORS: dict[int, tuple[str, str]] = {
    400: ("ValidationException", "Malformed input request, please reformat your input and try again."),
    403: ("AccessDeniedException", "You don't have access to the model with the specified model ID."),
    404: ("ResourceNotFoundException", "The requested resource could not be found."),
    408: ("ModelTimeoutException", "Model has timed out in processing the request."),
    424: ("ModelErrorException", "The model returned an error."),
    429: ("ThrottlingException", "Too many requests, please wait before trying again."),
    500: ("InternalServerException", "The server encountered an internal error."),
    503: ("ServiceUnavailableException", "Bedrock is unable to process your request."),
}
REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    408: "Request Timeout",
    424: "Failed Dependency",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_FAULT_EXCEPTIONS = {
    "throttlingException": "Too many tokens, please wait before trying again.",
    "serviceUnavailableException": "Bedrock is unable to process your request.",
    "modelStreamErrorException": "The model stream had an error.",
    "internalServerException": "The server encountered an internal error while processing the request.",
    "validationException": "Malformed input request.",
    "modelTimeoutException": "Model has timed out in processing the request.",
}


class BedrockError(ApiError):
    """An error as Bedrock answers it: status, ``x-amzn-ErrorType`` name, message."""


def _amz_time(now: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))


def verify_sigv4(
    method: str,
    target: str,
    headers: dict[str, str],
    body: bytes,
    *,
    keys: dict[str, tuple[str, str | None]],
    region: str,
    service: str = "bedrock",
    now: float,
    max_skew: float = 300.0,
) -> None:
    """Raise :class:`BedrockError` (403) unless the request is signed as AWS verifies it.

    ``keys``: access key id → (secret, session token or None). The signature is recomputed with botocore's
    SigV4 from the request as received (method, path as sent, query, the signed headers, a hash of the
    body) and compared in constant time.
    """
    auth = headers.get("authorization")
    if auth is None:
        raise BedrockError(403, "MissingAuthenticationTokenException", "Missing Authentication Token")
    algorithm, _, rest = auth.partition(" ")
    params = dict(part.strip().split("=", 1) for part in rest.split(",") if "=" in part)
    if algorithm != "AWS4-HMAC-SHA256" or not {"Credential", "SignedHeaders", "Signature"} <= params.keys():
        raise BedrockError(
            403,
            "IncompleteSignatureException",
            "Authorization header requires 'Credential', 'Signature' and 'SignedHeaders' parameters.",
        )
    scope = params["Credential"].split("/")
    if len(scope) != 5 or scope[4] != "aws4_request":
        raise BedrockError(403, "IncompleteSignatureException", "Credential is not well formed.")
    access_key, day, scope_region, scope_service, _ = scope
    if access_key not in keys:
        raise BedrockError(
            403, "UnrecognizedClientException", "The security token included in the request is invalid."
        )
    secret, token = keys[access_key]
    if headers.get("x-amz-security-token") != token:
        raise BedrockError(
            403, "UnrecognizedClientException", "The security token included in the request is invalid."
        )
    if scope_service != service:
        raise BedrockError(
            403, "InvalidSignatureException", f"Credential should be scoped to correct service: '{service}'. "
        )
    if scope_region != region:
        raise BedrockError(
            403,
            "InvalidSignatureException",
            f"Credential should be scoped to a valid region. Expected '{region}', not '{scope_region}'.",
        )
    stamp = headers.get("x-amz-date", "")
    try:
        signed_at = dt.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC).timestamp()
    except ValueError:
        raise BedrockError(
            403, "IncompleteSignatureException", "Authorization header requires existence of X-Amz-Date."
        ) from None
    if signed_at < now - max_skew:
        raise BedrockError(
            403,
            "InvalidSignatureException",
            f"Signature expired: {stamp} is now earlier than {_amz_time(now - max_skew)} "
            f"({_amz_time(now)} - 5 min.)",
        )
    if signed_at > now + max_skew:
        raise BedrockError(
            403,
            "InvalidSignatureException",
            f"Signature not yet current: {stamp} is still later than {_amz_time(now + max_skew)} "
            f"({_amz_time(now)} + 5 min.)",
        )
    if day != stamp[:8]:
        raise BedrockError(403, "InvalidSignatureException", "Date in Credential scope does not match.")
    signed = params["SignedHeaders"].split(";")
    if "host" not in signed or "x-amz-date" not in signed:
        raise BedrockError(403, "InvalidSignatureException", "'Host' and 'X-Amz-Date' must be signed.")
    request = AWSRequest(
        method=method,
        url=f"http://{headers.get('host', '')}{target}",
        data=body,
        headers={name: headers.get(name, "") for name in signed},
    )
    request.context["timestamp"] = stamp
    signer = SigV4Auth(Credentials(access_key, secret, token), service, region)
    canonical = signer.canonical_request(request)
    expected = signer.signature(signer.string_to_sign(request, canonical), request)
    if not hmac.compare_digest(expected, params["Signature"]):
        raise BedrockError(
            403,
            "InvalidSignatureException",
            "The request signature we calculated does not match the signature you provided. Check your "
            "AWS Secret Access Key and signing method. Consult the service documentation for details.",
        )


def claude_name(model_id: str, models: dict[str, str]) -> str | None:
    """The Claude model a Bedrock model id (or cross-region inference profile id) names, if served."""
    return models.get(_GEO.sub("", model_id, count=1))


class BedrockStandIn(StandIn):
    """One Bedrock runtime endpoint; ``url`` is its base (``http://127.0.0.1:PORT``) once started."""

    def __init__(
        self,
        name: str = "bedrock",
        *,
        region: str = "us-east-1",
        api: str = "converse",
        access_key: str = ACCESS_KEY,
        secret_key: str = SECRET_KEY,
        session_token: str | None = None,
        models: dict[str, str] | None = None,
        chunking: Sequence[int] = DEFAULT_CHUNKING,
        split_frames: bool = True,
        inference_profile: str | None = None,
        profile: str | None = None,
        **options: Any,
    ) -> None:
        self.bedrock_models = dict(models or DEFAULT_MODELS)
        super().__init__(
            name, models=list(dict.fromkeys(self.bedrock_models.values())), chunking=chunking, **options
        )
        self.engine = "bedrock"
        self.api_key = ""  # no api_key_env: AWS credentials come from the standard chain
        self.model = next(iter(self.bedrock_models))  # the pool's upstream_model: a Bedrock model id
        self.region = region
        self.api = api
        self.inference_profile = inference_profile
        #: The shared-config profile the gateway's pool names (None: the default chain).
        self.profile = profile
        self.keys: dict[str, tuple[str, str | None]] = {access_key: (secret_key, session_token)}
        self.split_frames = split_frames
        #: Seconds the stand-in's clock is ahead of the real one (to test ``x-amz-date`` freshness).
        self.clock_skew = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pool_extra(self) -> dict[str, Any]:
        """What the gateway's fleet file declares for a pool of this stand-in (``tests/conftest.py``)."""
        section: dict[str, Any] = {"region": self.region, "api": self.api}
        if self.inference_profile:
            section["inference_profile"] = self.inference_profile
        if self.profile:
            section["profile"] = self.profile
        return {"accelerator": "managed", "bedrock": section}

    @property
    def messages(self) -> list[Received]:
        """The model requests only (``POST /model/...``)."""
        return [r for r in self.requests if r.method == "POST" and r.path.startswith("/model/")]

    @property
    def refusals(self) -> list[Received]:
        """Model requests refused for their signature or credentials (403; unsigned probes not counted)."""
        return [r for r in self.messages if r.status == 403]

    # -- the wire --------------------------------------------------------------------------------------------

    def _headers(self, seen: Received, content_type: str) -> dict[str, str]:
        return {
            "date": email.utils.formatdate(time.time(), usegmt=True),
            "content-type": content_type,
            "connection": "keep-alive",
            "x-amzn-requestid": seen.request_id,
        }

    @staticmethod
    def _head(status: int, headers: dict[str, str]) -> bytes:
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _error(
        self, writer: asyncio.StreamWriter, seen: Received, exc: ApiError, *, close: bool = False
    ) -> None:
        kind = (
            exc.kind if isinstance(exc, BedrockError) else ERRORS.get(exc.status, ("ValidationException",))[0]
        )
        namespace = "com.amazon.coral.service" if exc.status == 403 else "com.amazon.bedrock"
        extra = {"x-amzn-errortype": f"{kind}:http://internal.amazon.com/coral/{namespace}/"}
        if close:
            extra["connection"] = "close"
        await self._json_response(writer, seen, exc.status, {"message": exc.message}, extra)
        seen.completed = True

    async def _handle(
        self, seen: Received, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one request; False when the connection must close."""
        seen.request_id = str(uuid.UUID(bytes=hashlib.md5(seen.request_id.encode()).digest()))
        try:
            target = seen.path + (f"?{seen.query}" if seen.query else "")
            verify_sigv4(
                seen.method,
                target,
                seen.headers,
                seen.raw,
                keys=self.keys,
                region=self.region,
                now=time.time() + self.clock_skew,
            )
            match = re.fullmatch(
                r"/model/([^/]+)/(converse|converse-stream|invoke|invoke-with-response-stream)", seen.path
            )
            if seen.method != "POST" or match is None:
                raise BedrockError(404, "UnknownOperationException", "")
            model_id = unquote(match.group(1))
            operation = match.group(2)
            claude = claude_name(model_id, self.bedrock_models)
            if claude is None:
                raise BedrockError(400, "ValidationException", "The provided model identifier is invalid.")
            if seen.body is None or not isinstance(seen.body, dict):
                raise BedrockError(
                    400,
                    "ValidationException",
                    "Malformed input request, please reformat your input and try again.",
                )
            fault = seen.fault = self._fault(seen)
            f = fault if isinstance(fault, dict) else {fault: True}
            if f.get("close"):
                return False
            if f.get("reset"):
                _reset(writer)
                return False
            if f.get("hang"):
                await self._hold(reader)
                return False
            if "delay" in f:
                await asyncio.sleep(float(f["delay"]))
            if "status" in f:
                status = int(f["status"])
                kind, message = ERRORS.get(status, ("InternalServerException", "Error"))
                if f.get("error"):
                    kind = str(f["error"])
                raise BedrockError(status, kind, str(f.get("message", message)))
            if f.get("prompt_too_long"):
                raise BedrockError(400, "ValidationException", "Input is too long for requested model.")
            invoke = operation.startswith("invoke")
            anthropic = self._invoke_body(seen.body) if invoke else converse_to_anthropic(seen.body, claude)
            anthropic["model"] = claude
            headers = {"anthropic-version": "2023-06-01"}
            if anthropic.get("anthropic_beta"):
                headers["anthropic-beta"] = ",".join(anthropic.pop("anthropic_beta"))
            try:
                convo = parse(
                    anthropic,
                    headers=headers,
                    models=self.models,
                    max_output=self.max_output_tokens,
                    secret=self.secret,
                )
            except ApiError as exc:
                raise _as_bedrock(exc) from None
            convo.stream = operation.endswith("stream")
        except ApiError as exc:
            await self._error(writer, seen, exc if isinstance(exc, BedrockError) else _as_bedrock(exc))
            return True
        ident = seen.request_id.encode()
        answer = seen.answer = self.answer(convo, ident)
        usage = self.usage(convo, commit=True)
        try:
            where = _stream_fault(f)
        except ValueError as exc:
            await self._error(writer, seen, BedrockError(500, "InternalServerException", f"stand-in: {exc}"))
            return True
        if f.get("bad_crc_after") is not None:
            where = ("bad_crc", "after", int(f["bad_crc_after"]))
        message_id = "msg_bdrk_01" + _b58(hashlib.sha256(ident).digest(), 22)
        if not convo.stream:
            if invoke:
                data: Any = self._message(convo, answer, usage, message_id)
            else:
                data = converse_answer(answer, usage)
            return await self._whole_json(seen, reader, writer, data, answer, where)
        if invoke:
            frames = self._invoke_frames(convo, answer, usage, message_id)
        else:
            frames = converse_frames(answer, usage)
        return await self._stream_frames(seen, reader, writer, frames, where, f, invoke)

    def _invoke_body(self, body: dict[str, Any]) -> dict[str, Any]:
        for key in body:
            if key not in INVOKE_FIELDS:
                raise BedrockError(
                    400,
                    "ValidationException",
                    f"Malformed input request: #: extraneous key [{key}] is not permitted, please reformat "
                    "your input and try again.",
                )
        if body.get("anthropic_version") != INVOKE_VERSION:
            raise BedrockError(
                400,
                "ValidationException",
                "Malformed input request: #/anthropic_version: expected "
                f"{INVOKE_VERSION!r}, please reformat your input and try again.",
            )
        return {k: v for k, v in body.items() if k != "anthropic_version"}

    # -- answers -------------------------------------------------------------------------------------------

    def _invoke_frames(
        self, convo: Conversation, answer: Answer, usage: dict[str, int], message_id: str
    ) -> list[tuple[bytes, Block | None, int]]:
        """Anthropic's stream (the Anthropic stand-in's events, ``ping`` left out) in ``chunk`` frames."""
        out: list[tuple[bytes, Block | None, int]] = []
        for sse, block, n in self._events(convo, answer, usage, message_id):
            data = json.loads(sse.split(b"\ndata: ", 1)[1])
            if data["type"] == "ping":
                continue
            if data["type"] == "message_stop":
                data["amazon-bedrock-invocationMetrics"] = {
                    "inputTokenCount": usage["input_tokens"],
                    "outputTokenCount": answer.output_tokens,
                    "invocationLatency": 812,
                    "firstByteLatency": 245,
                }
            inner = base64.b64encode(_json(data)).decode()
            out.append((eventstream.event("chunk", {"bytes": inner, "p": _pad(inner)}), block, n))
        return out

    async def _whole_json(
        self,
        seen: Received,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        data: Any,
        answer: Answer,
        where: tuple[str, str, Any] | None,
    ) -> bool:
        body = _json(data)
        headers = self._headers(seen, "application/json")
        headers["content-length"] = str(len(body))
        seen.status = 200
        if where is not None and where[0] != "error":
            writer.write(self._head(200, headers) + body[: len(body) // 2])
            await writer.drain()
            if where[0] == "hang":
                await self._hold(reader)
            else:
                _reset(writer)
            return False
        if where is not None:
            await self._error(writer, seen, BedrockError(429, "ThrottlingException", ERRORS[429][1]))
            return True
        writer.write(self._head(200, headers) + body)
        await writer.drain()
        seen.sent_text = "".join(b.text for b in answer.blocks if b.kind == "text")
        seen.completed = True
        return True

    async def _stream_frames(
        self,
        seen: Received,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        frames: list[tuple[bytes, Block | None, int]],
        where: tuple[str, str, Any] | None,
        fault: dict[str, Any],
        invoke: bool,
    ) -> bool:
        stop_at = _fault_index(frames, where)
        headers = self._headers(seen, "application/vnd.amazon.eventstream")
        headers["transfer-encoding"] = "chunked"
        if invoke:
            headers["x-amzn-bedrock-content-type"] = "application/json"
        seen.status = 200
        writer.write(self._head(200, headers))
        async with self._watching(reader, seen) as watch:
            for i, (frame, block, n) in enumerate(frames):
                if watch.done():
                    seen.client_gone = True
                    return False
                if i == stop_at and where is not None:
                    kind = where[0]
                    if kind == "cut":
                        await writer.drain()
                        _reset(writer)
                        return False
                    if kind == "hang":
                        await writer.drain()
                        await self._hold_until(watch)
                        seen.client_gone = watch.done()
                        return False
                    if kind == "bad_crc":
                        broken = frame[:-1] + bytes([frame[-1] ^ 0xFF])
                        await self._frame(writer, broken)
                        await asyncio.sleep(0.05)
                        _reset(writer)
                        return False
                    name = str(fault.get("exception", "throttlingException"))
                    await self._frame(
                        writer, eventstream.exception(name, _FAULT_EXCEPTIONS.get(name, "Error"))
                    )
                    writer.write(b"0\r\n\r\n")
                    await writer.drain()
                    return not watch.done()
                if block is not None and self.delta_delay:
                    await asyncio.sleep(self.delta_delay)
                await self._frame(writer, frame)
                if block is not None:
                    seen.deltas_sent += 1
                    if block.kind == "text":
                        seen.sent_text += block.pieces[n]
            return await self._end_chunked(writer, seen, watch)
        return False  # the client went away mid-answer

    async def _frame(self, writer: asyncio.StreamWriter, frame: bytes) -> None:
        """One frame as an HTTP chunk; with ``split_frames``, two chunks split inside the frame."""
        if not self.split_frames or len(frame) < 16:
            writer.write(b"%x\r\n%s\r\n" % (len(frame), frame))
            await writer.drain()
            return
        at = 7 if len(frame) % 2 else len(frame) // 2  # inside the prelude, or mid-payload
        for part in (frame[:at], frame[at:]):
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
            await asyncio.sleep(0.0005)


def _pad(seed: str) -> str:
    """The ``p`` field the service pads each event with (a length that varies with the content)."""
    return _PAD[: 1 + len(seed) % len(_PAD)]


def _as_bedrock(exc: ApiError) -> BedrockError:
    """An Anthropic-side refusal as Bedrock words it (400 ValidationException; a long prompt as Bedrock's)."""
    if exc.status == 400 and ("prompt is too long" in exc.message or "exceed context limit" in exc.message):
        return BedrockError(400, "ValidationException", "Input is too long for requested model.")
    kind, _ = ERRORS.get(exc.status, ("ValidationException", ""))
    return BedrockError(exc.status, kind, exc.message)


# -- Converse ↔ Anthropic's body (the stand-in's own translation, written apart from the adapter's) ----------


def _invalid(message: str) -> BedrockError:
    return BedrockError(400, "ValidationException", message)


def converse_to_anthropic(body: dict[str, Any], model: str) -> dict[str, Any]:
    """A Converse request, validated as Bedrock does, as the Anthropic body Claude is given."""
    for key in body:
        if key not in CONVERSE_FIELDS:
            raise _invalid(
                f'Unknown parameter in input: "{key}", must be one of: {", ".join(sorted(CONVERSE_FIELDS))}'
            )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("The messages field is required.")
    out: dict[str, Any] = {"model": model}
    config = body.get("inferenceConfig") or {}
    out["max_tokens"] = config.get("maxTokens", 4096)
    if "temperature" in config:
        out["temperature"] = config["temperature"]
    if "topP" in config:
        out["top_p"] = config["topP"]
    if config.get("stopSequences"):
        out["stop_sequences"] = config["stopSequences"]
    system = body.get("system")
    if system:
        out["system"] = _blocks(system, "system")
    tool_config = body.get("toolConfig")
    uses_tools = False
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant"):
            raise _invalid(f"messages.{i}.role: must be one of user, assistant")
        if i == 0 and role != "user":
            raise _invalid(
                "A conversation must start with a user message. Try again with a conversation that starts "
                "with a user message."
            )
        if turns and turns[-1]["role"] == role:
            raise _invalid(
                "A conversation must alternate between user and assistant roles. Make sure the conversation "
                "alternates between user and assistant roles and try again."
            )
        content = message.get("content")
        if not isinstance(content, list):
            raise _invalid(f"messages.{i}.content: must be a list of content blocks")
        uses_tools |= any("toolUse" in b or "toolResult" in b for b in content if isinstance(b, dict))
        turns.append({"role": role, "content": _blocks(content, f"messages.{i}.content")})
    if uses_tools and not tool_config:
        raise _invalid(
            "The toolConfig field must be defined when using toolUse and toolResult content blocks."
        )
    out["messages"] = turns
    if tool_config:
        tools: list[dict[str, Any]] = []
        for tool in tool_config.get("tools", []):
            if "cachePoint" in tool and tools:
                tools[-1]["cache_control"] = {"type": "ephemeral"}
                continue
            spec = tool["toolSpec"]
            entry = {"name": spec["name"], "input_schema": spec["inputSchema"]["json"]}
            if spec.get("description"):
                entry["description"] = spec["description"]
            tools.append(entry)
        out["tools"] = tools
        choice = tool_config.get("toolChoice")
        if isinstance(choice, dict) and len(choice) == 1:
            ((kind, value),) = choice.items()
            out["tool_choice"] = {"type": kind, **({"name": value["name"]} if kind == "tool" else {})}
    out.update(body.get("additionalModelRequestFields") or {})
    return out


def _blocks(content: list[Any], where: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        here = f"{where}.{j}"
        if not isinstance(block, dict) or len(block) != 1 or next(iter(block)) not in BLOCK_MEMBERS:
            raise _invalid(f"{here}: a content block must have exactly one member of {sorted(BLOCK_MEMBERS)}")
        ((kind, value),) = block.items()
        if kind == "cachePoint":
            if out:
                out[-1]["cache_control"] = {"type": "ephemeral"}
            continue
        if kind == "text":
            if not isinstance(value, str) or not value.strip():
                raise _invalid(
                    f"The text field in the ContentBlock object at {here} is blank. Add text to the text "
                    "field, and try again."
                )
            out.append({"type": "text", "text": value})
        elif kind == "image":
            out.append(
                {
                    "type": "image",
                    "source": {
                        "type": "base64",
                        "media_type": f"image/{value['format']}",
                        "data": value["source"]["bytes"],
                    },
                }
            )
        elif kind == "document":
            media = "application/pdf" if value["format"] == "pdf" else "text/plain"
            data = value["source"]["bytes"]
            source = (
                {"type": "text", "media_type": "text/plain", "data": base64.b64decode(data).decode()}
                if media == "text/plain"
                else {"type": "base64", "media_type": media, "data": data}
            )
            out.append({"type": "document", "source": source, "title": value.get("name")})
        elif kind == "toolUse":
            out.append(
                {"type": "tool_use", "id": value["toolUseId"], "name": value["name"], "input": value["input"]}
            )
        elif kind == "toolResult":
            parts: list[dict[str, Any]] = []
            for part in value.get("content", []):
                if "text" in part:
                    parts.append({"type": "text", "text": part["text"]})
                elif "json" in part:
                    parts.append({"type": "text", "text": json.dumps(part["json"])})
                elif "image" in part:
                    parts.extend(_blocks([part], here))
            result: dict[str, Any] = {
                "type": "tool_result",
                "tool_use_id": value["toolUseId"],
                "content": parts,
            }
            if value.get("status") == "error":
                result["is_error"] = True
            out.append(result)
        elif kind == "reasoningContent":
            if "reasoningText" in value:
                text = value["reasoningText"]
                out.append(
                    {
                        "type": "thinking",
                        "thinking": text.get("text", ""),
                        "signature": text.get("signature", ""),
                    }
                )
            else:
                out.append({"type": "redacted_thinking", "data": value["redactedContent"]})
    return out


def converse_blocks(answer: Answer) -> list[dict[str, Any]]:
    """The answer's blocks as a Converse ``output.message.content``."""
    out: list[dict[str, Any]] = []
    for block in answer.blocks:
        if block.kind == "text":
            out.append({"text": block.text})
        elif block.kind == "thinking":
            out.append(
                {"reasoningContent": {"reasoningText": {"text": block.text, "signature": block.signature}}}
            )
        elif block.kind == "redacted_thinking":
            out.append({"reasoningContent": {"redactedContent": block.text}})
        else:
            value = block.content()
            out.append(
                {"toolUse": {"toolUseId": value["id"], "name": value["name"], "input": value["input"]}}
            )
    return out


def converse_usage(usage: dict[str, int], output: int) -> dict[str, int]:
    """Converse's ``usage``: ``inputTokens`` without cache reads and writes, as Anthropic counts them."""
    read, written = usage["cache_read_input_tokens"], usage["cache_creation_input_tokens"]
    out = {
        "inputTokens": usage["input_tokens"],
        "outputTokens": output,
        "totalTokens": usage["input_tokens"] + output + read + written,
    }
    if read or written:
        out["cacheReadInputTokens"] = read
        out["cacheWriteInputTokens"] = written
    return out


def converse_answer(answer: Answer, usage: dict[str, int]) -> dict[str, Any]:
    """A whole Converse answer."""
    return {
        "output": {"message": {"role": "assistant", "content": converse_blocks(answer)}},
        "stopReason": answer.stop_reason,
        "usage": converse_usage(usage, answer.output_tokens),
        "metrics": {"latencyMs": 812},
    }


def converse_frames(answer: Answer, usage: dict[str, int]) -> list[tuple[bytes, Block | None, int]]:
    """ConverseStream as (frame, the block a content delta belongs to, which delta of it) in order."""

    def ev(kind: str, payload: dict[str, Any]) -> bytes:
        return eventstream.event(kind, {**payload, "p": _pad(json.dumps(payload))})

    out: list[tuple[bytes, Block | None, int]] = [(ev("messageStart", {"role": "assistant"}), None, 0)]
    delta: dict[str, Any]
    for index, block in enumerate(answer.blocks):
        if block.kind == "tool_use":
            start = {"toolUse": {"toolUseId": block.tool_id, "name": block.tool_name}}
            out.append((ev("contentBlockStart", {"contentBlockIndex": index, "start": start}), None, 0))
            for n, piece in enumerate(block.pieces):
                delta = {"toolUse": {"input": piece}}
                out.append(
                    (ev("contentBlockDelta", {"contentBlockIndex": index, "delta": delta}), block, n + 1)
                )
        elif block.kind == "redacted_thinking":
            delta = {"reasoningContent": {"redactedContent": block.text}}
            out.append((ev("contentBlockDelta", {"contentBlockIndex": index, "delta": delta}), None, 0))
        else:
            for n, piece in enumerate(block.pieces):
                delta = {"text": piece} if block.kind == "text" else {"reasoningContent": {"text": piece}}
                out.append((ev("contentBlockDelta", {"contentBlockIndex": index, "delta": delta}), block, n))
            if block.kind == "thinking":
                delta = {"reasoningContent": {"signature": block.signature}}
                out.append((ev("contentBlockDelta", {"contentBlockIndex": index, "delta": delta}), None, 0))
        out.append((ev("contentBlockStop", {"contentBlockIndex": index}), None, 0))
    out.append((ev("messageStop", {"stopReason": answer.stop_reason}), None, 0))
    metadata = {"usage": converse_usage(usage, answer.output_tokens), "metrics": {"latencyMs": 812}}
    out.append((ev("metadata", metadata), None, 0))
    return out


async def start_bedrock(**options: Any) -> BedrockStandIn:
    """A started Bedrock stand-in (``await s.stop()``, or use it as ``async with``)."""
    started = await BedrockStandIn(**options).start()
    assert isinstance(started, BedrockStandIn)
    return started
