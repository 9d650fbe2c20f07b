"""The steps around an inference request, composed in one place: the pipeline reads top to bottom.

listener → **parse** (the client protocol's frontend) → **authenticate** → **model** (resolve the name
and its aliases) → **deadline** and **priority** (headers) → **filters** (keys and limits plug in here)
→ **admission** and **metrics** (``Proxy.forward``) → router → backend adapter.

Each step is a small function of the request; :func:`inference` is the one function that runs them in
order, and a client error raised by any of them comes back in the client's protocol.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from skyfabric.core.errors import AuthenticationError, ClientError, InvalidRequest, UnknownModel
from skyfabric.core.fleet import Fleet
from skyfabric.gateway.admission import parse_priority
from skyfabric.gateway.api_errors import frontend_client_error
from skyfabric.gateway.context import RequestContext
from skyfabric.gateway.proxy import Proxy
from skyfabric.http.messages import Request, Response, StreamResponse
from skyfabric.protocols.base import Frontend
from skyfabric.protocols.canonical import CanonicalRequest

if TYPE_CHECKING:
    from skyfabric.ops.keycache import KeyCache
    from skyfabric.ops.keys import KeyRecord

Answer = Response | StreamResponse
#: A step that may refuse a request before it is routed (raise :class:`ClientError`), or answer it
#: itself (return a response); None lets it through. A step that must wait (a round trip to shared state)
#: returns an awaitable of the same instead: one that decides at once (most requests, with a key's limits
#: granted in this process) creates no coroutine and is not awaited.
Filter = Callable[[Request, RequestContext], Answer | Awaitable[Answer | None] | None]
_ANSWERS = (Response, StreamResponse)


class Gateway(Protocol):
    """What the pipeline reads of the gateway (``gateway/app.py``'s ``Gateway`` has it all)."""

    fleet: Fleet
    proxy: Proxy
    keys: set[bytes]
    #: Managed keys (``operations``): they and the fleet file's keys, looked up by digest; None: off.
    keyring: KeyCache | None
    model_names: list[str]
    filters: list[Filter]
    traceparent: bool


def presented_key(request: Request) -> bytes | None:
    """The key a request carries: ``Authorization: Bearer`` (OpenAI) or ``x-api-key`` (Anthropic)."""
    value = request.header(b"authorization")
    return value[7:].strip() if value and value[:7].lower() == b"bearer " else request.header(b"x-api-key")


def authenticate(gateway: Gateway, request: Request) -> KeyRecord | None:
    """The request's key: a managed one (its record), one of the fleet file's, or None when none is needed.

    Raises :class:`AuthenticationError` (never echoing the key).
    """
    keyring = gateway.keyring
    if keyring is not None:
        return keyring.lookup(presented_key(request)) if keyring.required else None
    keys = gateway.keys
    if not keys:
        return None
    key = presented_key(request)
    if key is None:
        raise AuthenticationError("no API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`")
    if key not in keys:
        raise AuthenticationError("the API key is not valid", code="invalid_api_key")
    return None


def resolve_model(gateway: Gateway, parsed: CanonicalRequest) -> str:
    """The fleet's canonical name for the model the client asked for."""
    canonical = gateway.fleet.canonical(parsed.model)
    if canonical is None:
        raise UnknownModel(
            f"The model `{parsed.model}` does not exist here. Models: {', '.join(gateway.model_names)}",
            param="model",
            code="model_not_found",
        )
    return canonical


def deadline(gateway: Gateway, request: Request) -> float:
    """The request's deadline: the fleet's total timeout, shortened by ``x-skyfabric-deadline``."""
    total = gateway.fleet.timeouts.total
    asked = request.header(b"x-skyfabric-deadline")
    if asked is not None:
        try:
            total = min(total, float(asked))
        except ValueError:
            raise InvalidRequest("x-skyfabric-deadline must be a number of seconds") from None
        if total <= 0:
            raise InvalidRequest("x-skyfabric-deadline must be positive")
    return gateway.proxy.clock() + total


def context(gateway: Gateway, request: Request, frontend: Frontend) -> RequestContext:
    """Parse, authenticate, resolve, and bound one request: what the router needs to route it."""
    key = authenticate(gateway, request)
    parsed = frontend.parse(request.path, request.body, request.headers)
    model = resolve_model(gateway, parsed)
    kind = "completions" if parsed.protocol == "openai.completions" else "chat"
    ctx = RequestContext(
        kind, parsed.body, request.body, model, parsed.stream, deadline(gateway, request), parsed, frontend
    )
    ctx.key = key
    priority = request.header(b"x-skyfabric-priority")
    if priority is not None:
        ctx.priority = parse_priority(priority)
    if gateway.traceparent:
        ctx.traceparent = request.header(b"traceparent")
    return ctx


async def inference(gateway: Gateway, request: Request, frontend: Frontend) -> Answer:
    """The whole pipeline for one inference request, in the client's protocol."""
    ctx: RequestContext | None = None
    try:
        ctx = context(gateway, request, frontend)
        for step in gateway.filters:
            decided = step(request, ctx)
            if decided is not None:
                answer = decided if isinstance(decided, _ANSWERS) else await decided
                if answer is not None:
                    return answer
        answer = await gateway.proxy.forward(ctx)
    except ClientError as exc:
        if ctx is not None and ctx.on_refused is not None:
            ctx.on_refused(ctx)  # refused after the filters took something for it (a key's limits)
        return frontend_client_error(frontend, exc)
    if ctx.headers is not None:
        answer.headers = [*answer.headers, *ctx.headers]
    return answer
