"""The points of the request path that telemetry watches, as one observer object the router calls.

The router (``proxy.py``) and the stream relay (``relay.py``) call a handful of methods at well-defined
moments — a request starts and gets its answer, an attempt starts and ends, a stream ends, a stream is
continued elsewhere, an endpoint is ejected — and know nothing of what is done with them. The base
:class:`Observer` does nothing, so a gateway with every kind of telemetry off pays one method call per
point. The dashboard's recorder, the GenAI metrics and the tracer each subclass it; :class:`Observers`
fans the calls out when more than one is on.

Per-request scratch (a span, the time the request began) lives in ``RequestContext.observed``, a dict
that only an enabled observer ever creates.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from skyfabric.gateway.balancer import EndpointState
    from skyfabric.gateway.context import RequestContext

_NO_HEADERS: list[tuple[bytes, bytes]] = []

#: Kinds of attempt: the first try or a retry before the commit point, a hedge racing it, or a
#: continuation of a stream past the commit point.
ATTEMPT, HEDGE, CONTINUATION = "attempt", "hedge", "continuation"


class Observer:
    """Telemetry's view of the request path. Every method is a no-op here; subclasses pick what they need."""

    def request_start(self, ctx: RequestContext) -> None:
        """An inference request was admitted and is about to be routed."""

    def request_end(self, ctx: RequestContext, status: int, seconds: float) -> None:
        """The client's answer starts (a stream: its first token) or fails; ``seconds`` since arrival."""

    def attempt_start(self, ctx: RequestContext, state: EndpointState, kind: str) -> None:
        """An attempt (``ATTEMPT``, ``HEDGE`` or ``CONTINUATION``) is being sent to ``state``'s endpoint."""

    def upstream_headers(self, ctx: RequestContext, state: EndpointState) -> list[tuple[bytes, bytes]]:
        """Headers to add to the attempt just started on ``state`` (a tracer's ``traceparent``)."""
        return _NO_HEADERS

    def attempt_end(
        self,
        ctx: RequestContext,
        state: EndpointState,
        outcome: str,
        seconds: float | None = None,
        body: bytes | None = None,
    ) -> None:
        """An attempt ended: ``ok`` (committed; ``seconds`` from its start), or a failure's outcome name.

        ``body`` is a non-streaming answer, for its usage; streams report tokens in :meth:`stream_end`.
        """

    def stream_end(self, ctx: RequestContext, state: EndpointState, tokens: int, completed: bool) -> None:
        """A client stream is over (complete, failed with an in-band error, or abandoned by the client)."""

    def continued(
        self, ctx: RequestContext, failed: EndpointState, state: EndpointState, tokens: int
    ) -> None:
        """A stream broke on ``failed`` after ``tokens`` tokens and goes on at ``state``."""

    def ejected(self, state: EndpointState, reason: str) -> None:
        """An endpoint left rotation; ``reason`` is the failure that ejected it."""


class Observers(Observer):
    """Several observers as one: each call goes to each, in order."""

    def __init__(self, observers: list[Observer]) -> None:
        self.observers = list(observers)

    def request_start(self, ctx: RequestContext) -> None:
        for o in self.observers:
            o.request_start(ctx)

    def request_end(self, ctx: RequestContext, status: int, seconds: float) -> None:
        for o in self.observers:
            o.request_end(ctx, status, seconds)

    def attempt_start(self, ctx: RequestContext, state: EndpointState, kind: str) -> None:
        for o in self.observers:
            o.attempt_start(ctx, state, kind)

    def upstream_headers(self, ctx: RequestContext, state: EndpointState) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        for o in self.observers:
            out.extend(o.upstream_headers(ctx, state))
        return out

    def attempt_end(
        self,
        ctx: RequestContext,
        state: EndpointState,
        outcome: str,
        seconds: float | None = None,
        body: bytes | None = None,
    ) -> None:
        for o in self.observers:
            o.attempt_end(ctx, state, outcome, seconds, body)

    def stream_end(self, ctx: RequestContext, state: EndpointState, tokens: int, completed: bool) -> None:
        for o in self.observers:
            o.stream_end(ctx, state, tokens, completed)

    def continued(
        self, ctx: RequestContext, failed: EndpointState, state: EndpointState, tokens: int
    ) -> None:
        for o in self.observers:
            o.continued(ctx, failed, state, tokens)

    def ejected(self, state: EndpointState, reason: str) -> None:
        for o in self.observers:
            o.ejected(state, reason)


def combine(observers: list[Observer]) -> Observer:
    """The cheapest observer that does what ``observers`` do together (the no-op one when empty)."""
    if not observers:
        return Observer()
    if len(observers) == 1:
        return observers[0]
    return Observers(observers)


_NUMBER = re.compile(rb"\s*:\s*(\d+)")


def usage_counts(body: bytes) -> tuple[int, int]:
    """``usage``'s (prompt_tokens, completion_tokens) of a non-streaming answer, without parsing the body.

    Both are 0 when the answer reports no usage. Searched from the end, where servers put ``usage``.
    """
    out = []
    for key in (b'"prompt_tokens"', b'"completion_tokens"'):
        at = body.rfind(key)
        found = _NUMBER.match(body, at + len(key)) if at >= 0 else None
        out.append(int(found.group(1)) if found else 0)
    return out[0], out[1]
