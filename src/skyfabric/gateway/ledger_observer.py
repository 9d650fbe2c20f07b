"""The usage ledger's view of the request path: one record per request, written from the observer hooks.

When a record is written, relative to the answer: a whole answer's record at ``request_end``, which the
router calls before it hands the response to the listener — so every answer a client ever received has
its record in the outbox, even if the gateway is killed the next instant. A stream gets an *open* record
at ``request_end`` too (its headers, with ``x-request-id``, are not sent yet), and its final record at
``stream_end``: complete, or cut by the client (billed for the tokens the backends generated, by their
usage), or — written at shutdown, or by the next run for a SIGKILLed one — ``interrupted``.

What a record holds: the client's protocol (``ctx.request.protocol``), its key's id, the endpoints that
served it in order, attempts, continuations (``ctx.rescued``), the tokens as the client was told them and
the cost of every backend's own usage at its own pool's prices (``spend.py``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from skyfabric.gateway.context import new_request_id
from skyfabric.gateway.observe import Observer
from skyfabric.gateway.spend import Spent, answer_spent_once, stream_spent
from skyfabric.ops.ledger import Ledger
from skyfabric.ops.pricing import PriceBook
from skyfabric.ops.record import ERROR, INCOMPLETE, INTERRUPTED, OK, OPEN, line_of

if TYPE_CHECKING:
    from collections.abc import Callable

    from skyfabric.gateway.balancer import EndpointState
    from skyfabric.gateway.context import RequestContext


#: A stream never continued: all its output tokens came from its one part.
_NO_SPLITS = [0]


class Tally:
    """One request's figures as the hooks deliver them (kept in ``ctx.tally``), made at its answer (or its
    end, if it had none): the ledger has no hook at a request's start nor at each attempt's — the calls
    sent and the last one's endpoint are the context's own (``ctx.sent``, ``ctx.last_endpoint``)."""

    __slots__ = ("endpoint", "spent", "splits", "started", "ttft", "wall")

    def __init__(self) -> None:
        self.endpoint: str | None = None  # the endpoint that answered (None: none did)
        #: Output tokens the client had when each continuation took over (for parts without usage);
        #: None until a stream is continued.
        self.splits: list[int] | None = None
        self.spent: Spent | None = None
        self.ttft: float | None = None
        #: The request's arrival, on the router's clock (a stream's latency counts from it) and as wall
        #: time (the record's ``ts``); set at ``request_end``.
        self.started = 0.0
        self.wall = 0.0


class LedgerObserver(Observer):
    """Writes one ledger record per request (two for a stream: open, then final)."""

    counts_tokens = True  # streams ask their backends for the final usage chunk

    def __init__(self, ledger: Ledger, prices: PriceBook, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.ledger = ledger
        self.prices = prices
        #: Streams whose open record is written and final one not yet: finished as interrupted at close.
        self.open: dict[str, RequestContext] = {}
        #: Endpoint id → (provider, region): split once per endpoint, not once per record.
        self._where: dict[str, tuple[str, str]] = {}
        #: ``Ledger.write``'s own step, for the whole answers' records (see ``request_end``).
        self._append = ledger.append

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
        tally: Tally | None = ctx.tally
        if tally is None:
            tally = ctx.tally = Tally()
        endpoint = tally.endpoint = state.endpoint.id
        if body is not None:
            tally.spent = answer_spent_once(ctx, body, endpoint, self.prices)

    def request_end(self, ctx: RequestContext, status: int, seconds: float) -> None:
        """The record (a stream's open one) before the answer goes out, and the answer's ``x-request-id``.

        Both are made here rather than at the request's start: nothing needs them sooner, and a hook less
        per request is a measurable part of the ledger's cost (docs/operations.md). The record's time is
        the request's arrival (``seconds`` ago, as the router measured it)."""
        tally: Tally | None = ctx.tally
        if tally is None:  # no answer (none came, or no attempt was made)
            tally = ctx.tally = Tally()
        request_id = ctx.request_id = new_request_id()
        ctx.add_headers([(b"x-request-id", request_id.encode())])
        tally.wall = time.time() - seconds
        if ctx.stream and status == 200:
            tally.ttft = seconds
            # The stream's latency, at its end, from its arrival as the router measured it (as its time to
            # first token is).
            tally.started = self.clock() - seconds
            self.open[request_id] = ctx
            self.ledger.write(self._record(ctx, tally, 200, OPEN, seconds))
            return
        # ``Ledger.write`` without its frame: the line straight into the outbox (this runs per answer).
        self._append(line_of(self._record(ctx, tally, status, OK if status < 400 else ERROR, seconds)))

    def continued(
        self, ctx: RequestContext, failed: EndpointState, state: EndpointState, tokens: int
    ) -> None:
        tally: Tally = ctx.tally  # made at the attempt_end that committed the stream, before any continuation
        if tally.splits is None:
            tally.splits = [0]
        tally.splits.append(tokens)

    def stream_end(self, ctx: RequestContext, state: EndpointState, tokens: int, completed: bool) -> None:
        tally: Tally = ctx.tally
        if self.open.pop(ctx.request_id or "", None) is None:
            return  # already closed (at shutdown)
        endpoints = ctx.parts_endpoints or [state.endpoint.id]
        tally.spent = stream_spent(
            ctx.usage_parts, endpoints, tokens, self.prices, tally.splits or _NO_SPLITS
        )
        outcome = OK if completed else INCOMPLETE
        self.ledger.write(self._record(ctx, tally, 200, outcome, self.clock() - tally.started))

    def _record(
        self, ctx: RequestContext, tally: Tally, status: int, outcome: str, seconds: float
    ) -> tuple[Any, ...]:
        """The record's values in ``record.LINE_FIELDS`` order (a tuple: the hot path builds no object)."""
        parts = ctx.parts_endpoints
        if parts:
            first: str | None = parts[0]
            served = ",".join(parts)
        else:  # a whole answer's endpoint (else the last one tried), without building a list to join
            first = tally.endpoint or ctx.last_endpoint
            served = first or ""
        provider: str | None = None
        region: str | None = None
        if first:
            where = self._where.get(first)
            if where is None:
                if len(self._where) > 100_000:  # endpoints come and go with discovery: stay bounded
                    self._where.clear()
                parts = first.split("/", 2)
                where = self._where[first] = (parts[0], parts[1] if len(parts) > 1 else "")
            provider, region = where
        spent = tally.spent
        key = ctx.key
        ttft = tally.ttft
        if spent is None:
            tokens_in = tokens_out = tokens_cached = 0
            cost = 0.0
        else:
            tokens_in, tokens_out, tokens_cached, cost = (
                spent.tokens_in or 0,
                spent.tokens_out,
                spent.tokens_cached,
                spent.cost,
            )
        return (
            ctx.request_id or "",
            tally.wall,
            ctx.model,
            ctx.request.protocol,
            ctx.kind,
            key.id if key is not None else None,
            served,
            provider,
            region,
            ctx.sent,
            ctx.rescued,
            tokens_in,
            tokens_out,
            tokens_cached,
            cost,
            # Milliseconds to the microsecond. Not ``round(x, 3)``: for a float that formats the number as
            # decimal digits and parses it back (``_Py_dg_dtoa``, ``snprintf``, ``strtod`` in ``perf``).
            int(seconds * 1_000_000.0 + 0.5) / 1000.0,
            None if ttft is None else int(ttft * 1_000_000.0 + 0.5) / 1000.0,
            status,
            outcome,
        )

    def interrupt_open(self) -> None:
        """At shutdown: streams still open get their final record, as interrupted, with what is known."""
        for ctx in list(self.open.values()):
            tally: Tally = ctx.tally
            self.ledger.write(self._record(ctx, tally, 200, INTERRUPTED, self.clock() - tally.started))
        self.open.clear()
