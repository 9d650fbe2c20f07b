"""Structured logs: one JSON object a line, and the router's decisions as log records of their own.

With ``observability.logs.format: json`` every record of the process (the gateway's warnings included)
is written as a JSON object: time, level, logger, message, and the fields a record carries. With
``observability.logs.decisions: true`` the :class:`DecisionLog` observer writes one record per request
listing the decisions the router took — each attempt sent (first try, retry, hedge, continuation) and
where, each failure and its outcome, each continuation — with the answer's status, the request's id
and, when tracing is on, its trace id, so that a log line leads to the trace; and one per ejection.
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
    """One record per request listing the router's decisions, with the request id and trace id.

    Decisions are collected on the request (a list append each) and written once when the request is
    over — its answer, or the end of its stream — so the happy path costs one log record. Ejections,
    which belong to no request, are records of their own.
    """

    def __init__(self) -> None:
        log.setLevel(logging.INFO)  # asked for in the fleet file: shown whatever the process's log level

    def request_start(self, ctx: RequestContext) -> None:
        observed = ctx.observed
        if observed is None:
            observed = ctx.observed = {}
        fields: dict[str, Any] = {"request_id": os.urandom(8).hex(), "model": ctx.model, "decisions": []}
        span = observed.get("span")
        if span is not None:
            fields["trace_id"] = f"{span.get_span_context().trace_id:032x}"
        observed["log"] = fields

    @staticmethod
    def _decide(ctx: RequestContext, decision: dict[str, Any]) -> None:
        fields = (ctx.observed or {}).get("log")
        if fields is not None:
            fields["decisions"].append(decision)

    def attempt_start(self, ctx: RequestContext, state: EndpointState, kind: str) -> None:
        if kind == ATTEMPT and ctx.attempts > 1:
            kind = "retry"
        self._decide(ctx, {"decision": kind, "endpoint": state.endpoint.id, "attempt": ctx.attempts})

    def attempt_end(
        self,
        ctx: RequestContext,
        state: EndpointState,
        outcome: str,
        seconds: float | None = None,
        body: bytes | None = None,
    ) -> None:
        if outcome != "ok":
            self._decide(ctx, {"decision": "failed", "endpoint": state.endpoint.id, "outcome": outcome})

    def continued(
        self, ctx: RequestContext, failed: EndpointState, state: EndpointState, tokens: int
    ) -> None:
        self._decide(
            ctx,
            {
                "decision": "continued",
                "endpoint": state.endpoint.id,
                "from": failed.endpoint.id,
                "tokens": tokens,
            },
        )

    def ejected(self, state: EndpointState, reason: str) -> None:
        log.info(
            "%s ejected: %s",
            state.endpoint.id,
            reason,
            extra={"event": "ejected", "endpoint": state.endpoint.id},
        )

    def request_end(self, ctx: RequestContext, status: int, seconds: float) -> None:
        fields = (ctx.observed or {}).get("log")
        if fields is None:
            return
        fields["status"] = status
        fields["seconds"] = round(seconds, 6)
        if not ctx.stream or status >= 400:
            log.info(
                "%s %s after %d attempts",
                status,
                ctx.model,
                ctx.attempts,
                extra={"event": "request", **fields},
            )

    def stream_end(self, ctx: RequestContext, state: EndpointState, tokens: int, completed: bool) -> None:
        fields = (ctx.observed or {}).get("log")
        if fields is None:
            return
        fields["tokens"] = tokens
        fields["completed"] = completed
        fields["endpoint"] = state.endpoint.id
        log.info(
            "stream %s: %d tokens, %d continuations",
            "completed" if completed else "interrupted",
            tokens,
            ctx.rescued,
            extra={"event": "request", **fields},
        )
