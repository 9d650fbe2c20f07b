"""Structured logs: one JSON object a line, and the router's decisions as log records of their own.

With ``observability.logs.format: json`` every record of the process (the gateway's warnings included)
is written as a JSON object: time, level, logger, message, and the fields a record carries. With
``observability.logs.decisions: true`` the :class:`DecisionLog` observer writes one record per decision
the router takes — an attempt sent (first try, retry, hedge, continuation) and where, an attempt's
failure, a stream continued elsewhere, an endpoint ejected, the answer's status — each with the
request's id and, when tracing is on, its trace id, so that a log line leads to the trace.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

import orjson

from skyfabric.gateway.observe import ATTEMPT, Observer

if TYPE_CHECKING:
    from skyfabric.gateway.balancer import EndpointState
    from skyfabric.gateway.context import RequestContext

log = logging.getLogger("skyfabric.decisions")

#: Attributes every LogRecord has; anything else on a record was passed in ``extra`` and is a field.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """A record as one JSON line: ``time``, ``level``, ``logger``, ``message`` and its extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def use_json_logs() -> None:
    """Write every record of the process as JSON (adds a stderr handler when none is configured)."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    for handler in root.handlers:
        handler.setFormatter(JsonFormatter())


class DecisionLog(Observer):
    """Logs each routing decision with the request id (and trace id when a tracer runs before it)."""

    def __init__(self) -> None:
        log.setLevel(logging.INFO)  # asked for in the fleet file: shown whatever the process's log level

    def request_start(self, ctx: RequestContext) -> None:
        observed = ctx.observed
        if observed is None:
            observed = ctx.observed = {}
        fields: dict[str, Any] = {"request_id": os.urandom(8).hex(), "model": ctx.model}
        span = observed.get("span")
        if span is not None:
            fields["trace_id"] = f"{span.get_span_context().trace_id:032x}"
        observed["log"] = fields

    def _emit(self, ctx: RequestContext, event: str, message: str, **fields: Any) -> None:
        base = (ctx.observed or {}).get("log") or {}
        log.info(message, extra={**base, "event": event, **fields})

    def attempt_start(self, ctx: RequestContext, state: EndpointState, kind: str) -> None:
        if kind == ATTEMPT and ctx.attempts > 1:
            kind = "retry"
        e = state.endpoint
        self._emit(
            ctx,
            kind,
            f"{kind} #{ctx.attempts} → {e.id}",
            endpoint=e.id,
            provider=e.provider,
            attempt=ctx.attempts,
        )

    def attempt_end(
        self,
        ctx: RequestContext,
        state: EndpointState,
        outcome: str,
        seconds: float | None = None,
        body: bytes | None = None,
    ) -> None:
        if outcome != "ok":
            e = state.endpoint
            self._emit(ctx, "attempt_failed", f"{e.id} failed: {outcome}", endpoint=e.id, outcome=outcome)

    def continued(
        self, ctx: RequestContext, failed: EndpointState, state: EndpointState, tokens: int
    ) -> None:
        self._emit(
            ctx,
            "continued",
            f"stream continued on {state.endpoint.id} after {tokens} tokens from {failed.endpoint.id}",
            endpoint=state.endpoint.id,
            failed=failed.endpoint.id,
            tokens_before=tokens,
        )

    def ejected(self, state: EndpointState, reason: str) -> None:
        log.info(
            f"{state.endpoint.id} ejected: {reason}",
            extra={"event": "ejected", "endpoint": state.endpoint.id},
        )

    def request_end(self, ctx: RequestContext, status: int, seconds: float) -> None:
        self._emit(
            ctx,
            "answered",
            f"status {status} after {seconds * 1000:.1f} ms",
            status=status,
            attempts=ctx.attempts,
        )

    def stream_end(self, ctx: RequestContext, state: EndpointState, tokens: int, completed: bool) -> None:
        self._emit(
            ctx,
            "stream_end",
            f"stream {'completed' if completed else 'interrupted'} after {tokens} tokens "
            f"on {state.endpoint.id}",
            endpoint=state.endpoint.id,
            tokens=tokens,
            completed=completed,
        )
