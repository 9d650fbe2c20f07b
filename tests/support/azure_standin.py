"""A local stand-in for an Azure OpenAI resource (and the Entra ID token endpoint), its wire byte for byte.

Serves, on a loopback port that plays ``https://{resource}.openai.azure.com``:

* ``POST /openai/deployments/{deployment}/chat/completions?api-version=...`` — the deployment route. The
  ``api-version`` query is required (404 ``Resource not found`` without it, as Azure answers) and must be
  one of :data:`API_VERSIONS` (else 400 ``API version not supported``); the body's ``model`` is ignored.
* ``POST /openai/v1/chat/completions`` — the v1 GA route; the body's ``model`` names the deployment.
* ``POST /{tenant}/oauth2/v2.0/token`` — Entra ID's client-credentials grant (:class:`Issuer`), on a
  server of its own (its own thread: not the gateway's event loop) shared by the resources of one tenant.

**What it verifies.** Credentials before anything else: the ``api-key`` header equal to the resource's key,
or an ``Authorization: Bearer`` token that *its issuer issued* and that has not expired (401 with Azure's
wording otherwise). The token endpoint checks the tenant (400 ``AADSTS90002``), ``grant_type``,
``client_id``, the scope (``https://cognitiveservices.azure.com/.default``) and the client secret or the
federated assertion (401 ``invalid_client`` ``AADSTS7000215``); its tokens live ``token_lifetime`` seconds
(short in tests, so a gateway must refresh them). The deployment (404 ``DeploymentNotFound``). Every
top-level body field against the chat completions parameters Azure knows (400 ``Unrecognized request
argument supplied: <field>``: what ``continue_final_message``, ``chat_template_kwargs`` or ``top_k``
leaking through a gateway get). ``max_tokens``/``n`` and the context window as
:class:`~tests.support.fake_upstream.FakeUpstream` checks them (its deterministic answer and tokenizer are
reused: token ``i`` is ``"t{i} "``).

**What it answers, as Azure does:** compact JSON; ``apim-request-id``/``x-request-id``/``x-ms-region`` and
rate-limit headers; streams as ``text/event-stream; charset=utf-8`` that open with a chunk holding no choices,
an empty ``id`` and the ``prompt_filter_results``, then a role chunk, then content chunks of several tokens
each (sizes cycle through ``chunking``), each choice with its ``content_filter_results``, a closing chunk
with the ``finish_reason``, the usage chunk when ``stream_options.include_usage`` asks, ``data: [DONE]``. The
underlying model (``gpt-4o-2024-11-20``), not the deployment, names the answer. A ``tool_calls`` answer
(random ``call_`` id, arguments streamed in uneven pieces) when ``tool_choice`` forces one or the last user
text says "tool" or "call"; after a tool result, text.

**Faults** (the next of ``script``, else ``default``): ``"reset"``, ``"hang"``, ``{"delay": s}``,
``{"status": n}`` (Azure's error shape; a 429 carries ``retry-after-ms`` and ``retry-after``:
``retry_after_ms``), ``"context_length"``, ``"content_filter"`` (the prompt blocked: 400 ``code:
content_filter`` with ``innererror`` ``ResponsibleAIPolicyViolation`` and its ``content_filter_result``),
and after ``k`` tokens of a stream: ``{"cut_after": k}`` (the connection dropped), ``{"hang_after": k}``
(silence), ``{"filter_after": k}`` (the completion filtered: ``finish_reason: content_filter`` with
``violence`` filtered, then ``[DONE]``). A prompt containing :data:`BLOCKED_WORD` is blocked too.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import secrets
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiohttp import web

from tests.support.fake_upstream import BadRequest, FakeUpstream, Plan

#: Dated API versions the deployment route accepts (GA and preview versions Azure has published).
API_VERSIONS: tuple[str, ...] = (
    "2024-02-01",
    "2024-06-01",
    "2024-10-21",
    "2024-12-01-preview",
    "2025-01-01-preview",
    "2025-03-01-preview",
    "2025-04-01-preview",
)
SCOPE = "https://cognitiveservices.azure.com/.default"
UNDERLYING_MODEL = "gpt-4o-2024-11-20"
#: A prompt holding this word is blocked by the stand-in's content filter.
BLOCKED_WORD = "FORBIDDEN-TOPIC"

#: The chat completions parameters Azure OpenAI knows; anything else is "Unrecognized request argument".
KNOWN_FIELDS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "n",
        "stream",
        "stream_options",
        "stop",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "user",
        "seed",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "reasoning_effort",
        "data_sources",
        "store",
        "metadata",
        "modalities",
        "audio",
        "prediction",
        "user_security_context",
        "functions",
        "function_call",
    }
)

_SAFE = {"filtered": False, "severity": "safe"}
SAFE_RESULTS: dict[str, Any] = {
    "hate": _SAFE,
    "self_harm": _SAFE,
    "sexual": _SAFE,
    "violence": _SAFE,
}
PROMPT_RESULTS: dict[str, Any] = {**SAFE_RESULTS, "jailbreak": {"filtered": False, "detected": False}}
FILTERED_RESULTS: dict[str, Any] = {**SAFE_RESULTS, "violence": {"filtered": True, "severity": "medium"}}
PROMPT_FILTER_MESSAGE = (
    "The response was filtered due to the prompt triggering Azure OpenAI's content management policy. "
    "Please modify your prompt and retry. To learn more about our content filtering policies please read "
    "our documentation: https://go.microsoft.com/fwlink/?linkid=2198766"
)
KEY_MESSAGE = (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key "
    "for an active subscription and use a correct regional API endpoint for your resource."
)
TOKEN_MESSAGE = (
    "Unauthorized. Access token is missing, invalid, audience is incorrect "
    "(https://cognitiveservices.azure.com), or have expired."
)


def _abort(resp: web.StreamResponse) -> None:
    """Drop the connection under a response (a cut stream: RST, no more bytes)."""
    transport = resp._req.transport if resp._req is not None else None  # type: ignore[attr-defined]
    if transport is not None:
        transport.abort()


def dumps(obj: Any) -> bytes:
    """Azure's JSON: compact, raw UTF-8."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass
class Issuer:
    """An Entra ID tenant's token endpoint: issues tokens to one app and remembers them to verify."""

    tenant: str = "72f988bf-86f1-41af-91ab-2d7cd011db47"
    client_id: str = "0b1c5e6f-3a2d-4c8e-9f10-aa11bb22cc33"
    client_secret: str = "entra-secret-Q8~abcDEF123"
    #: The federated (workload identity) assertion it accepts instead of the secret.
    assertion: str = "eyJhbGciOiJSUzI1NiJ9.federated-assertion.sig"
    token_lifetime: float = 3600.0
    #: token → monotonic expiry
    issued: dict[str, float] = field(default_factory=dict)
    #: (monotonic time, how the client proved itself) per token granted.
    grants: list[tuple[float, str]] = field(default_factory=list)
    refusals: int = 0
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        """The authority host (``https://login.microsoftonline.com`` in Azure's public cloud)."""
        assert self.server is not None, "start the issuer first"
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> Issuer:
        """Serve the token endpoint on its own thread: Entra is not in the gateway's process, and a
        client that blocked its event loop on a token would not be hidden by a shared loop."""
        if self.server is not None:
            return self
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                parts = self.path.strip("/").split("/")
                length = int(self.headers.get("Content-Length") or 0)
                form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
                if len(parts) == 4 and parts[1:] == ["oauth2", "v2.0", "token"]:
                    status, answer = issuer.grant(parts[0], form)
                else:
                    status, answer = 404, {"error": "not_found"}
                data = dumps(answer)
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, name="entra-standin", daemon=True).start()
        return self

    def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def valid(self, token: str) -> bool:
        expiry = self.issued.get(token)
        return expiry is not None and time.monotonic() < expiry

    def grant(self, tenant: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """Entra's answer to one token request: (status, JSON)."""
        trace = str(uuid.uuid4())
        if tenant != self.tenant:
            self.refusals += 1
            return 400, {
                "error": "invalid_request",
                "error_description": f"AADSTS90002: Tenant '{tenant}' not found. Check to make sure you have "
                f"the correct tenant ID and are signing into the correct cloud.\r\nTrace ID: {trace}",
                "error_codes": [90002],
                "trace_id": trace,
            }
        if form.get("grant_type") != "client_credentials":
            self.refusals += 1
            return 400, {"error": "unsupported_grant_type", "error_description": "AADSTS70003: ..."}
        if form.get("scope") != SCOPE:
            self.refusals += 1
            return 400, {
                "error": "invalid_scope",
                "error_description": f"AADSTS1002012: The provided value for scope {form.get('scope')} is "
                "not valid. Client credential flows must have a scope value with /.default suffixed.",
            }
        if form.get("client_id") != self.client_id:
            self.refusals += 1
            return 400, {
                "error": "unauthorized_client",
                "error_description": f"AADSTS700016: Application with identifier '{form.get('client_id')}' "
                "was not found in the directory.",
            }
        if "client_assertion" in form:
            ok = (
                form.get("client_assertion_type") == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
                and form["client_assertion"] == self.assertion
            )
            how = "assertion"
        else:
            ok = form.get("client_secret") == self.client_secret
            how = "secret"
        if not ok:
            self.refusals += 1
            return 401, {
                "error": "invalid_client",
                "error_description": "AADSTS7000215: Invalid client secret provided. Ensure the secret being "
                "sent in the request is the client secret value, not the client secret ID, for a secret "
                f"added to app '{self.client_id}'.\r\nTrace ID: {trace}",
                "error_codes": [7000215],
                "trace_id": trace,
            }
        token = "eyJ0eXAiOiJKV1QifQ." + secrets.token_urlsafe(24)
        self.issued[token] = time.monotonic() + self.token_lifetime
        self.grants.append((time.monotonic(), how))
        lifetime = round(self.token_lifetime)
        return 200, {
            "token_type": "Bearer",
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": token,
        }


@dataclass
class Received:
    """One request as the stand-in got it."""

    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: dict[str, Any]


class AzureStandIn(FakeUpstream):
    """One Azure OpenAI resource with one deployment; ``url`` is its root (the resource URL)."""

    engine = "azure-openai"

    def __init__(
        self,
        name: str = "azure",
        *,
        deployment: str = "gpt-4o-prod",
        api_key: str | None = "azure-key-5f2c9d1e7b3a4c6d8e0f1a2b3c4d5e6f",
        issuer: Issuer | None = None,
        auth: str = "api-key",
        api_version: str = "2024-10-21",
        pool: dict[str, Any] | None = None,
        tokens: int = 12,
        chunking: tuple[int, ...] = (3, 2, 4),
        **options: Any,
    ) -> None:
        super().__init__(
            name, tokens=tokens, model=deployment, chunking=chunking, can_continue=False, **options
        )
        self.deployment = deployment
        #: The key the resource accepts; the pool is given it (``api_key_env``) only with ``auth: api-key``.
        self.resource_key = api_key
        self.api_key = api_key if auth == "api-key" else None
        self.issuer = issuer or Issuer()
        self.auth = auth
        self.api_version = api_version
        #: More of the pool's ``azure`` section (or a wrong secret's variable, say), over the defaults.
        self.pool = pool or {}
        #: The fleet model the pool serves (the deployment is its upstream model).
        self.fleet_model = "m"
        self.received: list[Received] = []
        self.auth_failures = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pool_extra(self) -> dict[str, Any]:
        """The pool's ``azure`` section for this resource (``tests.conftest.fleet_data`` adds it)."""
        section: dict[str, Any] = {"api_version": self.api_version, "auth": self.auth}
        if self.auth == "entra":
            secret_env = f"SKYFABRIC_TEST_ENTRA_{abs(hash(self.issuer.client_secret)) % 10**8}"
            os.environ[secret_env] = self.issuer.client_secret
            section.update(
                tenant_id=self.issuer.tenant,
                client_id=self.issuer.client_id,
                client_secret_env=secret_env,
                authority=self.issuer.url,
            )
        return {"azure": {**section, **self.pool}}

    async def start(self) -> AzureStandIn:
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_route("*", "/{tail:.*}", self.dispatch)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.2)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.issuer.start()
        return self

    async def stop(self) -> None:
        await super().stop()
        self.issuer.stop()

    # -- routing ------------------------------------------------------------------------------------------

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        parts = path.strip("/").split("/")
        if request.method == "POST" and path == "/openai/v1/chat/completions":
            return await self._chat(request, deployment=None)
        if (
            request.method == "POST"
            and len(parts) == 5
            and parts[:2] == ["openai", "deployments"]
            and parts[3:] == ["chat", "completions"]
        ):
            version = request.query.get("api-version")
            if version is None:
                return self._azure_error(404, "404", "Resource not found")
            if version not in API_VERSIONS:
                return self._azure_error(400, "BadRequest", "API version not supported")
            return await self._chat(request, deployment=urllib.parse.unquote(parts[2]))
        return self._azure_error(404, "404", "Resource not found")

    @staticmethod
    def _azure_error(
        status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> web.Response:
        return web.Response(
            body=dumps({"error": {"code": code, "message": message}}),
            status=status,
            content_type="application/json",
            headers=headers,
        )

    @staticmethod
    def _openai_error(
        http_status: int,
        message: str,
        *,
        type_: str | None,
        code: str | None,
        param: str | None = None,
        **more: Any,
    ) -> web.Response:
        error = {"message": message, "type": type_, "param": param, "code": code, **more}
        return web.Response(body=dumps({"error": error}), status=http_status, content_type="application/json")

    def _authorized(self, request: web.Request) -> web.Response | None:
        key = request.headers.get("api-key")
        bearer = request.headers.get("Authorization", "")
        if key is not None:
            if self.resource_key is not None and secrets.compare_digest(key, self.resource_key):
                return None
            self.auth_failures += 1
            return self._azure_error(401, "401", KEY_MESSAGE)
        if bearer.startswith("Bearer ") and self.issuer.valid(bearer[7:]):
            return None
        self.auth_failures += 1
        return self._azure_error(401, "401", TOKEN_MESSAGE if bearer else KEY_MESSAGE)

    # -- chat completions ---------------------------------------------------------------------------------

    async def _chat(self, request: web.Request, deployment: str | None) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.received.append(
            Received(request.path, dict(request.query), headers, body if isinstance(body, dict) else {})
        )
        self.headers.append(headers)
        self.requests.append(body if isinstance(body, dict) else {"_invalid": raw[:200]})
        refused = self._authorized(request)
        if refused is not None:
            return refused
        if not isinstance(body, dict):
            return self._openai_error(
                400,
                "We could not parse the JSON body of your request.",
                type_="invalid_request_error",
                code=None,
            )
        name = deployment if deployment is not None else body.get("model")
        if name != self.deployment:
            return self._azure_error(
                404,
                "DeploymentNotFound",
                "The API deployment for this resource does not exist. If you created the deployment within "
                "the last 5 minutes, please wait a moment and try again.",
            )
        unknown = sorted(set(body) - KNOWN_FIELDS)
        if unknown:
            return self._openai_error(
                400,
                f"Unrecognized request argument supplied: {unknown[0]}",
                type_="invalid_request_error",
                code=None,
            )
        behaviour = self._next()
        b = behaviour if isinstance(behaviour, dict) else {behaviour: True}
        if b.get("reset"):
            assert request.transport is not None
            request.transport.abort()
            await self._forever()
        if b.get("hang"):
            await self._forever()
        if "delay" in b:
            await asyncio.sleep(b["delay"])
        if "status" in b:
            return self._status(b)
        if b.get("context_length"):
            return self._openai_error(
                400,
                "This model's maximum context length is 128000 tokens. However, your messages resulted in "
                "131000 tokens. Please reduce the length of the messages.",
                type_="invalid_request_error",
                code="context_length_exceeded",
                param="messages",
            )
        if b.get("content_filter") or BLOCKED_WORD in raw.decode("utf-8", "replace"):
            return self._openai_error(
                400,
                PROMPT_FILTER_MESSAGE,
                type_=None,
                code="content_filter",
                param="prompt",
                status=400,
                innererror={
                    "code": "ResponsibleAIPolicyViolation",
                    "content_filter_result": {
                        **PROMPT_RESULTS,
                        "violence": {"filtered": True, "severity": "medium"},
                    },
                },
            )
        try:
            plan = self._plan({**body, "model": self.model}, "chat")
        except BadRequest as exc:
            return self._openai_error(exc.status, str(exc), type_="invalid_request_error", code=exc.code)
        call = self._tool_call(body)
        if call is not None:
            plan = Plan([call["arguments"]], "tool_calls", plan.prompt_tokens, plan.n)
        if not body.get("stream"):
            return self._whole_response(body, plan, call, b)
        return await self._azure_stream(request, body, plan, call, b)

    def _status(self, b: dict[str, Any]) -> web.Response:
        status = int(b["status"])
        if status == 429:
            ms = int(b.get("retry_after_ms", 1500))
            seconds = max(1, -(-ms // 1000))
            return self._azure_error(
                429,
                "429",
                "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 "
                "have exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after "
                f"{seconds} seconds. Go here for more details: https://aka.ms/oai/quotaincrease if you would "
                "like to further increase the default rate limit.",
                {
                    "retry-after-ms": str(ms),
                    "retry-after": str(seconds),
                    "x-ratelimit-remaining-requests": "0",
                },
            )
        if status == 408:
            return self._azure_error(408, "Timeout", "The operation was timeout.")
        if status >= 500:
            return self._openai_error(
                status,
                "The server had an error while processing your request. Sorry about that!",
                type_="server_error",
                code=None,
            )
        return self._azure_error(status, str(status), f"{self.name} says {status}")

    def _tool_call(self, body: dict[str, Any]) -> dict[str, str] | None:
        """The call this request gets (deterministic arguments), or None for a text answer."""
        tools = body.get("tools")
        if not isinstance(tools, list) or not tools:
            return None
        messages = body.get("messages") or []
        last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
        if last.get("role") == "tool":
            return None
        choice = body.get("tool_choice", "auto")
        name = tools[0].get("function", {}).get("name", "tool")
        if isinstance(choice, dict):
            name = choice.get("function", {}).get("name", name)
        elif choice == "none":
            return None
        content = last.get("content") or ""
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        if choice == "auto" and not any(word in content.lower() for word in ("tool", "call")):
            return None
        words = [w.strip(".,?!") for w in content.split() if w[:1].isupper()]
        city = words[-1] if words else "Paris"
        arguments = dumps({"city": city, "days": 3, "note": 'say "hi" — ok'}).decode()
        return {"id": "call_" + secrets.token_hex(12), "name": name, "arguments": arguments}

    def _usage(self, plan: Plan) -> dict[str, Any]:
        completion = len(plan.pieces) * plan.n if plan.reason != "tool_calls" else 19
        return {
            "completion_tokens": completion,
            "completion_tokens_details": {
                "accepted_prediction_tokens": 0,
                "audio_tokens": 0,
                "reasoning_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
            "prompt_tokens": plan.prompt_tokens,
            "prompt_tokens_details": {"audio_tokens": 0, "cached_tokens": 0},
            "total_tokens": plan.prompt_tokens + completion,
        }

    def _response_headers(self, stream: bool) -> dict[str, str]:
        return {
            "Content-Type": "text/event-stream; charset=utf-8" if stream else "application/json",
            "apim-request-id": str(uuid.uuid4()),
            "x-request-id": str(uuid.uuid4()),
            "x-ms-region": "East US 2",
            "x-ratelimit-remaining-requests": "99",
            "x-ratelimit-remaining-tokens": "99000",
            "azureml-model-session": "d089-20250301",
        }

    def _whole_response(
        self, body: dict[str, Any], plan: Plan, call: dict[str, str] | None, b: dict[str, Any]
    ) -> web.Response:
        pieces, reason, results = plan.pieces, plan.reason, SAFE_RESULTS
        if "filter_after" in b:
            pieces, reason, results = pieces[: b["filter_after"]], "content_filter", FILTERED_RESULTS
        message: dict[str, Any] = {"annotations": [], "content": "".join(pieces), "refusal": None}
        message["role"] = "assistant"
        if call is not None:
            message["content"] = None
            message["tool_calls"] = [
                {
                    "function": {"arguments": call["arguments"], "name": call["name"]},
                    "id": call["id"],
                    "type": "function",
                }
            ]
        answer = {
            "choices": [
                {
                    "content_filter_results": results if call is None else {},
                    "finish_reason": reason,
                    "index": i,
                    "logprobs": None,
                    "message": message,
                }
                for i in range(plan.n)
            ],
            "created": int(time.time()),
            "id": "chatcmpl-" + secrets.token_urlsafe(22),
            "model": UNDERLYING_MODEL,
            "object": "chat.completion",
            "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": PROMPT_RESULTS}],
            "system_fingerprint": "fp_ee1d74bde0",
            "usage": self._usage(Plan(pieces, reason, plan.prompt_tokens, plan.n)),
        }
        self.sent_tokens.extend([len(pieces)] * plan.n)
        return web.Response(body=dumps(answer), headers=self._response_headers(False))

    async def _azure_stream(
        self,
        request: web.Request,
        body: dict[str, Any],
        plan: Plan,
        call: dict[str, str] | None,
        b: dict[str, Any],
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers=self._response_headers(True))
        await resp.prepare(request)
        ident = "chatcmpl-" + secrets.token_urlsafe(22)
        created = int(time.time())

        def event(data: dict[str, Any]) -> bytes:
            return b"data: " + dumps(data) + b"\n\n"

        def chunk(choices: list[dict[str, Any]], **more: Any) -> bytes:
            return event(
                {
                    "choices": choices,
                    "created": created,
                    "id": ident,
                    "model": UNDERLYING_MODEL,
                    "object": "chat.completion.chunk",
                    "system_fingerprint": "fp_ee1d74bde0",
                    **more,
                }
            )

        def choice(
            index: int, delta: dict[str, Any], reason: str | None, results: dict[str, Any]
        ) -> dict[str, Any]:
            return {
                "content_filter_results": results,
                "delta": delta,
                "finish_reason": reason,
                "index": index,
                "logprobs": None,
            }

        async def write() -> None:
            # Azure's first event: the prompt's filter verdict, no choices, no id yet
            await resp.write(
                event(
                    {
                        "choices": [],
                        "created": 0,
                        "id": "",
                        "model": "",
                        "object": "",
                        "prompt_filter_results": [
                            {"prompt_index": 0, "content_filter_results": PROMPT_RESULTS}
                        ],
                    }
                )
            )
            role = {"content": "", "refusal": None, "role": "assistant"}
            await resp.write(b"".join(chunk([choice(i, role, None, {})]) for i in range(plan.n)))
            if call is not None:
                await self._stream_call(resp, chunk, choice, call, b)
                reason = "tool_calls"
            else:
                reason = await self._stream_text(resp, chunk, choice, plan, b)
                if reason is None:
                    return
            options = body.get("stream_options") or {}
            if options.get("include_usage"):
                await resp.write(chunk([], usage=self._usage(plan)))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()

        try:
            await write()
        except ConnectionResetError:
            pass
        return resp

    async def _stream_text(
        self, resp: web.StreamResponse, chunk: Any, choice: Any, plan: Plan, b: dict[str, Any]
    ) -> str | None:
        """Content chunks; the finish reason written, or None when a fault ended the stream."""
        pieces, total = plan.pieces, len(plan.pieces)
        faults = {b[k]: k for k in ("cut_after", "hang_after", "filter_after") if isinstance(b.get(k), int)}
        sizes = itertools.cycle(self.chunking)
        pos = 0
        while True:
            fault = faults.pop(pos, None)
            if fault == "cut_after":
                self.sent_tokens.append(pos)
                _abort(resp)
                return None
            if fault == "hang_after":
                self.sent_tokens.append(pos)
                await self._forever()
                return None
            if fault == "filter_after":
                self.sent_tokens.append(pos)
                await resp.write(
                    b"".join(
                        chunk([choice(i, {}, "content_filter", FILTERED_RESULTS)]) for i in range(plan.n)
                    )
                )
                return "content_filter"
            if pos >= total:
                break
            end = min([pos + next(sizes), total, *(k for k in faults if k > pos)])
            if self.token_delay:
                await asyncio.sleep(self.token_delay * (end - pos))
            text = "".join(pieces[pos:end])
            await resp.write(
                b"".join(chunk([choice(i, {"content": text}, None, SAFE_RESULTS)]) for i in range(plan.n))
            )
            pos = end
        self.sent_tokens.append(total)
        await resp.write(b"".join(chunk([choice(i, {}, plan.reason, {})]) for i in range(plan.n)))
        return plan.reason

    async def _stream_call(
        self, resp: web.StreamResponse, chunk: Any, choice: Any, call: dict[str, str], b: dict[str, Any]
    ) -> None:
        """A tool call: id and name first (empty arguments), then the arguments in uneven pieces."""
        head = {
            "tool_calls": [
                {
                    "function": {"arguments": "", "name": call["name"]},
                    "id": call["id"],
                    "index": 0,
                    "type": "function",
                }
            ]
        }
        await resp.write(chunk([choice(0, head, None, {})]))
        arguments = call["arguments"]
        sizes = itertools.cycle((7, 3, 11, 5))
        pos = 0
        cut = b.get("cut_after")
        written = 0
        while pos < len(arguments):
            if isinstance(cut, int) and written == cut:
                _abort(resp)
                raise ConnectionResetError
            piece = arguments[pos : pos + next(sizes)]
            pos += len(piece)
            written += 1
            delta = {"tool_calls": [{"function": {"arguments": piece}, "index": 0}]}
            await resp.write(chunk([choice(0, delta, None, {})]))
        await resp.write(chunk([choice(0, {}, "tool_calls", {})]))
