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

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from skyfabric.gateway.balancer import EndpointState
    from skyfabric.gateway.context import RequestContext

_NO_HEADERS: list[tuple[bytes, bytes]] = []

#: Kinds of attempt: the first try or a retry before the commit point, a hedge racing it, or a
#: continuation of a stream past the commit point.
ATTEMPT, HEDGE, CONTINUATION = "attempt", "hedge", "continuation"


class Observer:
    """Telemetry's view of the request path. Every method is a no-op here; subclasses pick what they need."""

    #: Whether this observer reports tokens: then streams ask backends for their final usage (stripped
    #: from the client's stream unless it asked), so token figures are the backend's count, not chunks.
    counts_tokens = False

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


class Sampler(Protocol):
    """Head sampling of traces: whether a request is traced, decided once before any of its hooks runs."""

    def sampled(self, ctx: RequestContext) -> bool:
        """Trace ``ctx``? (The client's ``traceparent`` decides when it carries a decision.)"""
        ...


#: The hook points an :class:`Observers` dispatches.
_HOOKS = (
    "request_start",
    "request_end",
    "attempt_start",
    "upstream_headers",
    "attempt_end",
    "stream_end",
    "continued",
    "ejected",
)


class Observers(Observer):
    """Several observers as one: each call goes, in order, to those that override that hook."""

    def __init__(self, observers: list[Observer]) -> None:
        self.observers = list(observers)
        self.counts_tokens = any(o.counts_tokens for o in self.observers)

        def hook(name: str) -> tuple[Any, ...]:
            # Only the observers that do something at this point: a no-op inherited hook costs nothing.
            return tuple(
                getattr(o, name) for o in observers if getattr(type(o), name) is not getattr(Observer, name)
            )

        self._request_start = hook("request_start")
        self._request_end = hook("request_end")
        self._attempt_start = hook("attempt_start")
        self._upstream_headers = hook("upstream_headers")
        self._attempt_end = hook("attempt_end")
        self._stream_end = hook("stream_end")
        self._continued = hook("continued")
        self._ejected = hook("ejected")
        # A point only one observer watches calls it directly: no loop, no extra frame on the request path.
        # None does: the no-op itself (no loop over an empty tuple).
        noop = Observer()
        for name in _HOOKS:
            found = getattr(self, f"_{name}")
            if len(found) == 1:
                setattr(self, name, found[0])
            elif not found:
                setattr(self, name, getattr(noop, name))

    def request_start(self, ctx: RequestContext) -> None:
        for f in self._request_start:
            f(ctx)

    def request_end(self, ctx: RequestContext, status: int, seconds: float) -> None:
        for f in self._request_end:
            f(ctx, status, seconds)

    def attempt_start(self, ctx: RequestContext, state: EndpointState, kind: str) -> None:
        for f in self._attempt_start:
            f(ctx, state, kind)

    def upstream_headers(self, ctx: RequestContext, state: EndpointState) -> list[tuple[bytes, bytes]]:
        if not self._upstream_headers:
            return _NO_HEADERS
        if len(self._upstream_headers) == 1:
            only: list[tuple[bytes, bytes]] = self._upstream_headers[0](ctx, state)
            return only
        out: list[tuple[bytes, bytes]] = []
        for f in self._upstream_headers:
            out.extend(f(ctx, state))
        return out

    def attempt_end(
        self,
        ctx: RequestContext,
        state: EndpointState,
        outcome: str,
        seconds: float | None = None,
        body: bytes | None = None,
    ) -> None:
        for f in self._attempt_end:
            f(ctx, state, outcome, seconds, body)

    def stream_end(self, ctx: RequestContext, state: EndpointState, tokens: int, completed: bool) -> None:
        for f in self._stream_end:
            f(ctx, state, tokens, completed)

    def continued(
        self, ctx: RequestContext, failed: EndpointState, state: EndpointState, tokens: int
    ) -> None:
        for f in self._continued:
            f(ctx, failed, state, tokens)

    def ejected(self, state: EndpointState, reason: str) -> None:
        for f in self._ejected:
            f(state, reason)


def upstream_headers(
    observer: Observer, ctx: RequestContext, state: EndpointState
) -> list[tuple[bytes, bytes]]:
    """What an attempt adds to its upstream request: its observers' headers (a traced request's own
    ``traceparent``), or the client's ``traceparent`` unchanged when the gateway does not trace it."""
    extra = observer.upstream_headers(ctx, state)
    if ctx.traceparent is not None:
        return [*extra, (b"traceparent", ctx.traceparent)]
    return extra


def combine(observers: list[Observer]) -> Observer:
    """The cheapest observer that does what ``observers`` do together (the no-op one when empty)."""
    if not observers:
        return Observer()
    if len(observers) == 1:
        return observers[0]
    return Observers(observers)
