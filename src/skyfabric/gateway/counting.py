"""``POST /v1/messages/count_tokens``: the prompt's tokens as the serving model's own tokenizer counts them.

An estimate from characters would be wrong by tens of percent on code; a client that sizes its context by
it would overflow. So the count is asked of a backend of the model: Anthropic's API has the endpoint
itself; an OpenAI-compatible engine is sent the prompt with ``max_tokens: 1`` and its usage's prompt
tokens are the answer (one token of generation is the price of an exact figure).
"""

from __future__ import annotations

from dataclasses import replace

import orjson

from skyfabric.core.errors import UpstreamError, UpstreamStatus
from skyfabric.gateway.api_errors import frontend_error, upstream_error_response
from skyfabric.gateway.router import Router
from skyfabric.http.messages import Response
from skyfabric.protocols.base import Frontend, UpstreamCall
from skyfabric.protocols.canonical import CanonicalRequest, Usage


async def count_tokens(
    router: Router, anthropic: Frontend, request: CanonicalRequest, model: str, deadline: float
) -> Response:
    """The Anthropic-shaped answer ``{"input_tokens": N}`` for ``request`` on ``model`` (errors in the
    ``anthropic`` frontend's shape)."""
    tried: set[str] = set()
    last: UpstreamError | None = None
    for name in router.chain_of(model):
        for _ in range(2):
            state = router.clusters[name].pick(
                router.clock(), avoid_endpoints=tried, cooldowns=router.cooldowns
            )
            if state is None:
                break
            tried.add(state.endpoint.id)
            backend = router.backend(state.endpoint)
            asked = replace(request, model=request.model, max_tokens=1, stream=False)
            call = backend.build(asked, state.endpoint)
            if backend.family == "anthropic":
                body = orjson.loads(call.body)
                for key in (
                    "max_tokens",
                    "stream",
                    "temperature",
                    "top_p",
                    "top_k",
                    "stop_sequences",
                    "metadata",
                ):
                    body.pop(key, None)
                call = UpstreamCall(b"/messages/count_tokens", call.headers, orjson.dumps(body))
            try:
                resp = await router.open(state, call, False, deadline)
                data = await resp.read(max(0.001, deadline - router.clock()))
            except UpstreamStatus as exc:
                if router.classify(state, exc) in ("client", "context_length"):
                    return upstream_error_response(anthropic, exc, same=backend.family == "anthropic")
                last = exc
                continue
            except UpstreamError as exc:
                last = exc
                continue
            if backend.family == "anthropic":
                return Response(200, data)
            usage = next((e for e in backend.decode_response(data) if isinstance(e, Usage)), None)
            if usage is None or usage.input_tokens is None:
                last = UpstreamError("the backend reported no usage", endpoint=state.endpoint.id)
                continue
            return Response(200, orjson.dumps({"input_tokens": usage.input_tokens}))
    detail = f"no backend could count the tokens; last error: {last}" if last else "no backend is available"
    return frontend_error(anthropic, 529 if last is None else 502, detail)
