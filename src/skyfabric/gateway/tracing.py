"""OpenTelemetry traces of the router: a span per request, a child span per attempt and per continuation.

The request span (kind ``SERVER``, named ``{gen_ai.operation.name} {gen_ai.request.model}`` as the GenAI
conventions name inference spans) continues the client's trace when it sent a W3C ``traceparent``. Each
attempt is a ``CLIENT`` child span carrying the backend (``gen_ai.provider.name``, ``server.address``,
``skyfabric.endpoint``), the kind (first try, retry, hedge, continuation) and the outcome; the attempt's
own ``traceparent`` goes upstream, so a traced engine's spans hang under it. A committed stream's attempt
span stays open until its part of the stream ends: a break mid-stream closes it with the error and opens
a ``continuation`` span on the next backend, with the number of tokens it continued from.

Off by default; when off no observer is installed and ``opentelemetry`` is never imported, so it costs
nothing. On, spans go to the fleet file's OTLP endpoint (OTLP/HTTP, JSON by default) or, without one, to
the process's global tracer provider (an application embedding the gateway, or a test).
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
from skyfabric.gateway.spans import CLIENT, SERVER, SpanPipeline, new_trace_id

if TYPE_CHECKING:
    from skyfabric.core.fleet import Tracing
    from skyfabric.gateway.balancer import EndpointState
    from skyfabric.gateway.context import RequestContext
    from skyfabric.gateway.proxy import Proxy

_PROPAGATOR = TraceContextTextMapPropagator()
_NONE: list[tuple[bytes, bytes]] = []
_ZERO_TRACE = b"0" * 32
SCOPE = "skyfabric.gateway"


def client_decision(header: bytes) -> bool | None:
    """The sampled flag of a W3C ``traceparent`` (``00-<trace id>-<parent id>-<flags>``); None when the
    header is not a valid one (then the gateway decides, as if none had been sent)."""
    if len(header) < 55 or header[2:3] != b"-" or header[35:36] != b"-" or header[52:53] != b"-":
        return None
    if header[:2] == b"ff" or header[3:35] == _ZERO_TRACE or header[36:52] == b"0" * 16:
        return None
    if len(header) > 55 and (header[:2] == b"00" or header[55:56] != b"-"):
        return None  # version 00 has exactly four fields; later versions may append more after a dash
    try:
        int(header[:2], 16), int(header[3:35], 16), int(header[36:52], 16)
        flags = int(header[53:55], 16)
    except ValueError:
        return None
    return bool(flags & 1)


def tracer_provider(config: Tracing) -> Any:
    """The provider spans go to: an OTLP exporter when an endpoint is configured, else the global one.

    Spans are exported in batches on a thread of their own: never on the event loop. The default
    encoding, OTLP/JSON (``gateway/otlp_json.py``, a tenth of the protobuf exporter's CPU per span),
    records compact spans (``gateway/spans.py``) instead of the SDK's: nothing but the exporter reads
    them, and a traced request costs a fraction of the SDK's path. ``otlp_encoding: protobuf`` uses the
    SDK, its ``BatchSpanProcessor`` and the official exporter.
    """
    if not config.otlp_endpoint:
        return trace.get_tracer_provider()
    if config.otlp_encoding == "json":
        from skyfabric.gateway.otlp_json import OTLPJsonExporter, compact_request
        from skyfabric.gateway.spans import SpanPipeline

        resource = _resource(config.service_name)
        poster = OTLPJsonExporter(config.otlp_endpoint)
        return SpanPipeline(lambda spans: compact_request(spans, resource, SCOPE), poster.post)
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise ConfigError(_NO_SDK) from None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise ConfigError(
            "observability.tracing.otlp_encoding is protobuf but the OTLP exporter is not installed: "
            "pip install 'skyfabric[otlp]'"
        ) from None
    exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint)
    provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


_NO_SDK = (
    "observability.tracing.otlp_endpoint is set but the OpenTelemetry SDK is not installed: "
    "pip install 'skyfabric[otlp]'"
)


def _resource(service_name: str) -> dict[str, Any]:
    """The resource attributes the SDK would report (``service.name``, ``telemetry.sdk.*``, and
    ``OTEL_RESOURCE_ATTRIBUTES``), computed once at start."""
    try:
        from opentelemetry.sdk.resources import Resource
    except ImportError:
        raise ConfigError(_NO_SDK) from None
    return dict(Resource.create({"service.name": service_name}).attributes)


class Tracer(Observer):
    """Head sampling and the spans of sampled requests; per-request state lives in ``ctx.observed``.

    Installed as the router's ``sampler``, and in its ``traced_observer`` only: the hooks below run for
    sampled requests alone, so they need not ask whether the request is traced. The spans are never made
    the current context (nothing on the request path reads it), and an ejection, which no request owns,
    is not an event of any span (the dashboard's feed and the decision log have it).
    """

    counts_tokens = True

    def __init__(self, proxy: Proxy, provider: Any, sample_ratio: float = 1.0) -> None:
        self.proxy = proxy
        self.provider = provider
        #: The gateway's own exporter: compact spans (``gateway/spans.py``), not the SDK's.
        self.pipeline: SpanPipeline | None = provider if isinstance(provider, SpanPipeline) else None
        self.tracer = None if self.pipeline is not None else provider.get_tracer(SCOPE)
        self.sample_ratio = sample_ratio

    # -- head sampling, once per request (the router asks before any hook runs) ----------------------------

    def sampled(self, ctx: RequestContext) -> bool:
        """The client's decision when its ``traceparent`` carries a valid one (parent-based), else
        ``sample_ratio``. Only a sampled request reaches the hooks below: an unsampled one costs this
        method (a ``random()``, or a look at the header's flags) and nothing else — no span, no context,
        no header formatting; its client's ``traceparent`` goes upstream unchanged."""
        header = ctx.traceparent
        if header is not None:
            decision = client_decision(header)
            if decision is not None:
                return decision
        ratio = self.sample_ratio
        return ratio >= 1.0 or (ratio > 0.0 and random.random() < ratio)

    # -- the request ------------------------------------------------------------------------------------

    def request_start(self, ctx: RequestContext) -> None:
        header = ctx.traceparent
        if header is not None:
            ctx.traceparent = None  # this gateway's spans continue the trace: attempts send their own
        observed = ctx.observed
        if observed is None:
            observed = ctx.observed = {}
        operation = OPERATIONS[ctx.kind]
        attributes = {
            "gen_ai.operation.name": operation,
            "gen_ai.request.model": ctx.model,
            "gen_ai.request.stream": ctx.stream,
            "skyfabric.client_protocol": "openai",
        }
        span: Any
        if self.pipeline is not None:
            if header is not None and client_decision(header) is not None:
                trace_id, parent_id = int(header[3:35], 16), int(header[36:52], 16)
            else:
                trace_id, parent_id = new_trace_id(), None
            span = self.pipeline.span(f"{operation} {ctx.model}", SERVER, trace_id, parent_id, attributes)
        else:
            assert self.tracer is not None
            parent = None
            if header is not None:
                parent = _PROPAGATOR.extract({"traceparent": header.decode("latin-1")})
            span = self.tracer.start_span(
                f"{operation} {ctx.model}", context=parent, kind=SpanKind.SERVER, attributes=attributes
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
        attributes = {
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
        }
        parent = observed["span"]
        span: Any
        if self.pipeline is not None:
            span = self.pipeline.span(name, CLIENT, parent.trace_id, parent.span_id, attributes)
        else:
            assert self.tracer is not None
            span = self.tracer.start_span(
                name, context=trace.set_span_in_context(parent), kind=SpanKind.CLIENT, attributes=attributes
            )
        spans = observed["attempt_spans"]
        old = spans.pop(e.id, None)
        if old is not None:
            old.end()
        spans[e.id] = span

    def upstream_headers(self, ctx: RequestContext, state: EndpointState) -> list[tuple[bytes, bytes]]:
        observed = ctx.observed
        span = observed["attempt_spans"].get(state.endpoint.id) if observed else None
        if span is None:
            return _NONE
        c = span.get_span_context()
        if not c.is_valid:
            return _NONE  # a non-recording span of the API's no-op provider (no SDK installed): no trace
        header = b"00-%032x-%016x-%02x" % (c.trace_id, c.span_id, c.trace_flags)
        out = [(b"traceparent", header)]
        if c.trace_state:
            out.append((b"tracestate", c.trace_state.to_header().encode()))
        return out

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

    @staticmethod
    def _close_attempts(observed: dict[str, Any], error: str | None) -> None:
        for span in observed["attempt_spans"].values():
            if error:
                span.set_attribute("error.type", error)
                span.set_status(Status(StatusCode.ERROR))
            span.end()
        observed["attempt_spans"].clear()
