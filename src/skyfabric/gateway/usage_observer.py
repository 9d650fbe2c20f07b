"""The keys' settlement and the usage ledger as one observer, for a gateway that has both on.

Why: both read a whole answer's usage at ``attempt_end`` and both act at ``request_end``. As two observers
each point is a fan-out (``observe.Observers``) to two methods, and the ledger's ``attempt_end`` looks the
usage the keys' settlement read up again in ``ctx.spent_memo``. In a serving process that bookkeeping costs
more than it does in a loop: between two requests of one connection the event loop runs the others', and
each hook starts with its code and data out of the CPU's caches, so every extra frame and object on the
path is paid for in cache misses (``bench/operations_cost.py --cold``). Here each point is one call that
reads the usage once and does both jobs; what each job does is still the keys filter's and the ledger's
own code (``KeysFilter.settle_answer``, ``LedgerObserver.request_end``), so the two stay the single source of
their rules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from skyfabric.gateway.keys_filter import KeysFilter
from skyfabric.gateway.ledger_observer import LedgerObserver, Tally
from skyfabric.gateway.observe import Observer
from skyfabric.gateway.spend import answer_spent_once

if TYPE_CHECKING:
    from skyfabric.gateway.balancer import EndpointState
    from skyfabric.gateway.context import RequestContext


class KeysAndLedger(Observer):
    """``keys``' settlement and ``ledger``'s records, each hook point one call (see the module docstring)."""

    counts_tokens = True

    def __init__(self, keys: KeysFilter, ledger: LedgerObserver) -> None:
        assert keys.limiter is not None, "a keys filter without limits settles nothing: no need to fuse"
        self.keys = keys
        self.ledger = ledger
        self.limiter = keys.limiter
        self.prices = ledger.prices
        # The hook only the ledger has is its own bound method on this instance: no frame of ours in
        # between (``observe.Observers`` looks for it on the class, where it is defined below).
        self.continued = ledger.continued  # type: ignore[method-assign]
        self._request_end = ledger.request_end

    def continued(
        self, ctx: RequestContext, failed: EndpointState, state: EndpointState, tokens: int
    ) -> None:
        self.ledger.continued(ctx, failed, state, tokens)

    def attempt_end(
        self,
        ctx: RequestContext,
        state: EndpointState,
        outcome: str,
        seconds: float | None = None,
        body: bytes | None = None,
    ) -> None:
        if outcome != "ok":
            return
        tally = ctx.tally  # the ledger's (``LedgerObserver.attempt_end``)
        if tally is None:
            tally = ctx.tally = Tally()
        endpoint = tally.endpoint = state.endpoint.id
        if body is None:  # a stream: settled and recorded at its end
            return
        spent = tally.spent = answer_spent_once(ctx, body, endpoint, self.prices)
        lease = ctx.lease
        if lease is not None:
            self.keys.settle_answer(lease, spent)

    def request_end(self, ctx: RequestContext, status: int, seconds: float) -> None:
        lease = ctx.lease
        if lease is not None and not lease.settled and (status != 200 or not ctx.stream):
            self.limiter.release(lease)  # ``KeysFilter.request_end``: failed before any usage
        self._request_end(ctx, status, seconds)

    def stream_end(self, ctx: RequestContext, state: EndpointState, tokens: int, completed: bool) -> None:
        self.keys.stream_end(ctx, state, tokens, completed)
        self.ledger.stream_end(ctx, state, tokens, completed)
