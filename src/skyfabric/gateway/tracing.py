"""OpenTelemetry traces of the router: a span per request, a child span per attempt and per continuation.

The request span (kind ``SERVER``, named ``{gen_ai.operation.name} {gen_ai.request.model}`` as the GenAI
conventions name inference spans) continues the client's trace when it sent a W3C ``traceparent``. Each
attempt is a ``CLIENT`` child span carrying the backend (``gen_ai.provider.name``, ``server.address``,
``skyfabric.endpoint``), the kind (first try, retry, hedge, continuation) and the outcome; the attempt's
own ``traceparent`` goes upstream, so a traced engine's spans hang under it. A committed stream's attempt
span stays open until its part of the stream ends: a break mid-stream closes it with the error and opens
a ``continuation`` span on the next backend, with the number of tokens it continued from.

Off by default; when off no observer is installed and ``opentelemetry`` is never imported, so it costs
nothing. On, spans go to the fleet file's OTLP endpoint (``pip install skyfabric[otlp]``) or, without
one, to the process's global tracer provider (an application embedding the gateway, or a test).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from skyfabric.core.errors import ConfigError
from skyfabric.gateway.genai_metrics import OPERATIONS
from skyfabric.gateway.observe import ATTEMPT, CONTINUATION, Observer

if TYPE_CHECKING:
    from skyfabric.core.fleet import Tracing
    from skyfabric.gateway.balancer import EndpointState
    from skyfabric.gateway.context import RequestContext
    from skyfabric.gateway.proxy import Proxy

_PROPAGATOR = TraceContextTextMapPropagator()
_NONE: list[tuple[bytes, bytes]] = []


def tracer_provider(config: Tracing) -> Any:
    """The provider spans go to: an OTLP exporter when an endpoint is configured, else the global one."""
    if not config.otlp_endpoint:
        return trace.get_tracer_provider()
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise ConfigError(
            "observability.tracing.otlp_endpoint is set but the OTLP exporter is not installed: "
            "pip install 'skyfabric[otlp]'"
        ) from None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_endpoint)))
    return provider


class Tracer(Observer):
    counts_tokens = True
    """Turns the router's events into spans; per-request state lives in ``ctx.observed``."""

    def __init__(self, proxy: Proxy, provider: Any, sample_ratio: float = 1.0) -> None:
        self.proxy = proxy
        self.provider = provider
        self.tracer = provider.get_tracer("skyfabric.gateway")
        self.sample_ratio = sample_ratio

    # -- the request ------------------------------------------------------------------------------------

    def request_start(self, ctx: RequestContext) -> None:
        # Head sampling before any span exists: the client's decision when it sent a valid traceparent
        # (parent-based), else ``sample_ratio``. An unsampled request costs a random() and passes the
        # client's traceparent on unchanged, as a proxy outside the trace should.
        parent = None
        sampled = None
        if ctx.traceparent:
            parent = _PROPAGATOR.extract({"traceparent": ctx.traceparent.decode("latin-1")})
            client = trace.get_current_span(parent).get_span_context()
            if client.is_valid:
                sampled = client.trace_flags.sampled
        if sampled is None:
            sampled = random.random() < self.sample_ratio
        observed = ctx.observed
        if not sampled:
            if ctx.traceparent:
                if observed is None:
                    observed = ctx.observed = {}
                observed["traceparent"] = [(b"traceparent", ctx.traceparent)]
            return
        if observed is None:
            observed = ctx.observed = {}
        operation = OPERATIONS[ctx.kind]
        span = self.tracer.start_span(
            f"{operation} {ctx.model}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "gen_ai.operation.name": operation,
                "gen_ai.request.model": ctx.model,
                "gen_ai.request.stream": ctx.stream,
                "skyfabric.client_protocol": "openai",
            },
        )
        observed["span"] = span
        observed["attempt_spans"] = {}

    def request_end(self, ctx: RequestContext, status: int, seconds: float) -> None:
        observed = ctx.observed
        if observed is None or "span" not in observed:
            return
        span = observed["span"]
        span.set_attribute("http.response.status_code", status)
        span.set_attribute("skyfabric.attempts", ctx.attempts)
        if status >= 400:
            span.set_attribute("error.type", str(status))
            span.set_status(Status(StatusCode.ERROR))
        if ctx.stream and status < 400:
            span.set_attribute("gen_ai.response.time_to_first_chunk", seconds)
            return  # the stream goes on; stream_end closes the span
        self._close_attempts(observed, None)
        span.end()

    def stream_end(self, ctx: RequestContext, state: EndpointState, tokens: int, completed: bool) -> None:
        observed = ctx.observed
        if observed is None or "span" not in observed:
            return
        span = observed["span"]
        span.set_attribute("gen_ai.usage.output_tokens", tokens)
        span.set_attribute("skyfabric.continuations", ctx.rescued)
        if not completed:
            span.set_attribute("error.type", "stream_interrupted")
            span.set_status(Status(StatusCode.ERROR))
        self._close_attempts(observed, None if completed else "stream_interrupted")
        span.end()

    # -- attempts ---------------------------------------------------------------------------------------

    def attempt_start(self, ctx: RequestContext, state: EndpointState, kind: str) -> None:
        observed = ctx.observed
        if observed is None or "span" not in observed:
            return
        e = state.endpoint
        operation = OPERATIONS[ctx.kind]
        if kind == ATTEMPT and ctx.attempts > 1:
            kind = "retry"
        name = f"continuation {ctx.model}" if kind == CONTINUATION else f"{operation} {ctx.model}"
        span = self.tracer.start_span(
            name,
            context=trace.set_span_in_context(observed["span"]),
            kind=SpanKind.CLIENT,
            attributes={
                "gen_ai.operation.name": operation,
                "gen_ai.request.model": e.upstream_model,
                "gen_ai.provider.name": e.provider,
                "server.address": e.origin[1],
                "server.port": e.origin[2],
                "skyfabric.endpoint": e.id,
                "skyfabric.region": e.region,
                "skyfabric.pool": e.pool,
                "skyfabric.accelerator": e.accelerator,
                "skyfabric.attempt.kind": kind,
                "skyfabric.attempt.number": ctx.attempts,
            },
        )
        spans = observed["attempt_spans"]
        old = spans.pop(e.id, None)
        if old is not None:
            old.end()
        spans[e.id] = span

    def upstream_headers(self, ctx: RequestContext, state: EndpointState) -> list[tuple[bytes, bytes]]:
        observed = ctx.observed
        if observed is None:
            return _NONE
        if "span" not in observed:
            passthrough: list[tuple[bytes, bytes]] = observed.get("traceparent", _NONE)
            return passthrough
        span = observed["attempt_spans"].get(state.endpoint.id)
        if span is None:
            return _NONE
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        return [(k.encode(), v.encode()) for k, v in carrier.items()]

    def attempt_end(
        self,
        ctx: RequestContext,
        state: EndpointState,
        outcome: str,
        seconds: float | None = None,
        body: bytes | None = None,
    ) -> None:
        observed = ctx.observed
        if observed is None or "span" not in observed:
            return
        spans = observed["attempt_spans"]
        span = spans.get(state.endpoint.id)
        if span is None:
            return
        span.set_attribute("skyfabric.outcome", outcome)
        if outcome == "ok":
            if seconds is not None:
                span.set_attribute(
                    "gen_ai.response.time_to_first_chunk" if ctx.stream else "skyfabric.duration", seconds
                )
            if ctx.stream:
                span.add_event("first_token")
                return  # it serves the stream until the stream ends or breaks
        else:
            span.set_attribute("error.type", outcome)
            span.set_status(Status(StatusCode.ERROR))
        del spans[state.endpoint.id]
        span.end()

    def continued(
        self, ctx: RequestContext, failed: EndpointState, state: EndpointState, tokens: int
    ) -> None:
        observed = ctx.observed
        if observed is None or "span" not in observed:
            return
        span = observed["attempt_spans"].get(state.endpoint.id)
        if span is not None:
            span.set_attribute("skyfabric.continuation.from_endpoint", failed.endpoint.id)
            span.set_attribute("skyfabric.continuation.tokens_before", tokens)
            span.set_attribute("skyfabric.outcome", "continued")
        observed["span"].add_event(
            "continuation",
            {"from": failed.endpoint.id, "to": state.endpoint.id, "tokens_before": tokens},
        )

    def ejected(self, state: EndpointState, reason: str) -> None:
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event("ejection", {"endpoint": state.endpoint.id, "reason": reason})

    @staticmethod
    def _close_attempts(observed: dict[str, Any], error: str | None) -> None:
        for span in observed["attempt_spans"].values():
            if error:
                span.set_attribute("error.type", error)
                span.set_status(Status(StatusCode.ERROR))
            span.end()
        observed["attempt_spans"].clear()
