"""A key's allowance and limits on the request path: a pipeline filter before routing, an observer after.

Before (the filter, in ``Gateway.filters``): the key (``ctx.key``, found by ``pipeline.authenticate``) must
allow the model — else 403 — and be within its limits: :meth:`Limiter.admit` reserves the prompt's size
estimate plus ``max_tokens`` and the cost of both at the dearest pool the request may reach, or refuses
with 429 (503 for a key that fails closed while Redis is down), in the client's protocol, with
``Retry-After`` and the rate-limit headers (OpenAI's ``x-ratelimit-*``; ``anthropic-ratelimit-*`` for a
client of ``/v1/messages``). An admitted request's answer carries the same headers.

After (the observer, through ``telemetry.install``): the reservation is replaced by what was used — a
whole answer's usage at ``attempt_end``, a stream's at ``stream_end`` (each backend's own usage, priced at
its own pool; see ``spend.py``), nothing for a request that failed or was refused.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from skyfabric.core.errors import PermissionDenied
from skyfabric.gateway.observe import Observer
from skyfabric.gateway.spend import Spent, answer_spent_once, stream_spent
from skyfabric.http.messages import Request
from skyfabric.ops.limiter import Limiter
from skyfabric.ops.pricing import PriceBook

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from skyfabric.gateway.balancer import EndpointState
    from skyfabric.gateway.context import RequestContext
    from skyfabric.ops.keys import KeyRecord
    from skyfabric.ops.limiter import Lease
    from skyfabric.ops.pricing import Prices
    from skyfabric.ops.ratelimit import Ask

#: A prompt's tokens estimated from its request body's bytes (JSON included): about 4 bytes a token.
BYTES_PER_TOKEN = 4


class KeysFilter(Observer):
    """The key's model allowance and limits (see the module's docstring)."""

    def __init__(self, limiter: Limiter | None, prices: PriceBook) -> None:
        self.limiter = limiter
        self.prices = prices
        #: Streams ask their backends for the final usage: settlement is by the backends' count.
        self.counts_tokens = limiter is not None
        #: ``ctx.on_refused`` of an admitted request: bound once here, not per request.
        self._refused = self.refused

    def __call__(self, request: Request, ctx: RequestContext) -> Awaitable[None] | None:
        """None once decided here (no limits, or admitted from the key's grant: no coroutine, nothing to
        await); an awaitable when the shared script must decide. Refusals raise."""
        record = ctx.key
        if record is None:
            return None
        if record.models and not record.allows(ctx.request.model, ctx.model):
            raise PermissionDenied(
                f"this API key may not use the model `{ctx.request.model}`",
                param="model",
                code="model_not_allowed",
            )
        limiter = self.limiter
        if limiter is None or not record.limited:
            return None
        prompt = len(ctx.raw) // BYTES_PER_TOKEN
        lease, ask, price = limiter.granted(record, ctx.model, prompt, ctx.request.max_tokens)
        if lease is None:
            return self._admit(limiter, record, ask, price, prompt, ctx)
        ctx.lease = lease
        ctx.on_refused = self._refused
        ctx.add_headers(lease.headers(ctx.frontend.family == "anthropic", time.time()))
        return None

    def refused(self, ctx: RequestContext) -> None:
        """The router refused an admitted request before sending it anywhere: nothing was used."""
        if ctx.lease is not None and self.limiter is not None:
            self.limiter.release(ctx.lease)

    async def _admit(
        self, limiter: Limiter, record: KeyRecord, ask: Ask, price: Prices, prompt: int, ctx: RequestContext
    ) -> None:
        """Past the grant: the shared script (or this instance's share while Redis is down) decides."""
        anthropic = ctx.frontend.family == "anthropic"
        lease = ctx.lease = await limiter.admit_asked(record, ask, price, prompt, anthropic=anthropic)
        ctx.on_refused = self._refused
        ctx.add_headers(lease.headers(anthropic, time.time()))

    # -- settlement ---------------------------------------------------------------------------------------

    def attempt_end(
        self,
        ctx: RequestContext,
        state: EndpointState,
        outcome: str,
        seconds: float | None = None,
        body: bytes | None = None,
    ) -> None:
        lease = ctx.lease
        if lease is None or body is None or outcome != "ok" or self.limiter is None:
            return
        self.settle_answer(lease, answer_spent_once(ctx, body, state.endpoint.id, self.prices))

    def settle_answer(self, lease: Lease, spent: Spent | None) -> None:
        """A whole answer's lease replaced by what it used (None: no usage reported, the reservation
        stands). The keys filter has limits (``self.limiter``)."""
        assert self.limiter is not None
        if spent is None:
            self.limiter.settle(lease, None, lease.ask.tokens - lease.prompt_tokens)
        else:
            self.limiter.settle(lease, spent.tokens_in, spent.tokens_out, spent.cost)

    def request_end(self, ctx: RequestContext, status: int, seconds: float) -> None:
        lease = ctx.lease
        if lease is None or lease.settled:  # a whole answer was settled at attempt_end
            return
        if self.limiter is not None and (status != 200 or not ctx.stream):
            self.limiter.release(lease)  # failed (a whole answer was settled at attempt_end)

    def stream_end(self, ctx: RequestContext, state: EndpointState, tokens: int, completed: bool) -> None:
        lease = ctx.lease
        if lease is None or self.limiter is None:
            return
        endpoints = ctx.parts_endpoints or [state.endpoint.id]
        spent = stream_spent(ctx.usage_parts, endpoints, tokens, self.prices)
        self.limiter.settle(lease, spent.tokens_in, spent.tokens_out, spent.cost)
