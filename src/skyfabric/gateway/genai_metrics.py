"""Prometheus metrics in the OpenTelemetry GenAI semantic conventions' names, plus skyfabric's own.

Names follow the conventions as of their 2026 move to ``open-telemetry/semantic-conventions-genai``
(client inference: ``gen_ai.client.inference.*``), exposed the way the OTel → Prometheus compatibility
rules write them: dots become underscores, the unit ``s`` becomes a ``_seconds`` suffix, a unit in braces
(``{token}``) adds nothing, counters end in ``_total``:

- ``gen_ai.client.inference.duration`` (s) → ``gen_ai_client_inference_duration_seconds``
- ``gen_ai.client.inference.time_to_first_chunk`` (s) → ``…_time_to_first_chunk_seconds``
- ``gen_ai.client.inference.time_per_output_chunk`` (s) → ``…_time_per_output_chunk_seconds``
- ``gen_ai.client.inference.usage.output_tokens`` ({token}) → ``…_usage_output_tokens_total``
- ``gen_ai.client.inference.usage.input_tokens`` ({token}) → ``…_usage_input_tokens_total``

The gateway is the GenAI *client* of its fleet: one operation is one client request, attributed to the
backend that answered it (``gen_ai.provider.name`` is the fleet's provider name). Attributes become
labels the same way (``gen_ai_operation_name``, ``gen_ai_provider_name``, ``gen_ai_request_model``,
``error_type``, ``gen_ai_token_modality``); skyfabric adds ``skyfabric_region``, ``skyfabric_pool``,
``skyfabric_accelerator`` and ``skyfabric_client_protocol``. Every label value comes from the fleet file or
a fixed set, so the number of series is bounded by the fleet's size — never a key, a prompt or a user.

Two deliberate departures, both for the request path's cost: ``time_per_output_chunk`` is recorded once
per stream, as the stream's mean gap weighted by its chunk count (the same sum and count as one
observation per chunk, coarser buckets); input tokens are counted only where a backend reports usage
in a non-streaming answer (the relay does not parse usage out of streams).

skyfabric's own series cover what the conventions lack: attempts by kind and outcome, failovers before
and after the first token, ejections by cause, the admission queue, the retry budget, the fleet's price.
Recording is plain dict and list arithmetic on the event loop (no locks: one thread writes); the text is
built at scrape time.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from skyfabric.gateway.observe import ATTEMPT, Observer

if TYPE_CHECKING:
    from skyfabric.gateway.balancer import EndpointState
    from skyfabric.gateway.context import RequestContext
    from skyfabric.gateway.proxy import Proxy

#: The conventions' bucket boundaries for the seconds histograms.
SECONDS_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
OPERATIONS = {"chat": "chat", "completions": "text_completion"}
#: Labels of the per-operation series, in order.
OPERATION_LABELS = (
    "gen_ai_operation_name",
    "gen_ai_request_model",
    "gen_ai_provider_name",
    "skyfabric_region",
    "skyfabric_pool",
    "skyfabric_accelerator",
    "skyfabric_client_protocol",
)
_NO_BACKEND = ("", "", "", "")


class _Histogram:
    """Bucket counts, sum and count for one label set."""

    __slots__ = ("count", "counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(SECONDS_BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect.bisect_left(SECONDS_BUCKETS, value)] += n
        self.sum += value * n
        self.count += n


def _histogram_family(name: str, doc: str, labels: tuple[str, ...], data: dict[Any, _Histogram]) -> Any:
    family = HistogramMetricFamily(name, doc, labels=list(labels))
    for key, h in data.items():
        running, buckets = 0, []
        for bound, count in zip([*SECONDS_BUCKETS, float("inf")], h.counts, strict=True):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        family.add_metric(list(key), buckets, h.sum)
    return family


def _counter_family(name: str, doc: str, labels: tuple[str, ...], data: dict[Any, float]) -> Any:
    family = CounterMetricFamily(name, doc, labels=list(labels))
    for key, value in data.items():
        family.add_metric(list(key), value)
    return family


def ejection_cause(reason: str, last_outcome: str | None) -> str:
    """A bounded cause for an ejection: the health loop's reason, or the failure that ejected it."""
    if reason == "stall":
        return "stall"
    if reason.startswith("probe"):
        return "probe"
    if reason.startswith("its failing domain"):
        return "domain"
    return last_outcome or "unknown"


class GenAIMetrics(Observer, Collector):
    """Records the router's events and renders them as Prometheus metric families."""

    def __init__(self, proxy: Proxy, protocol: str = "openai") -> None:
        self.proxy = proxy
        self.protocol = protocol
        self.duration: dict[tuple[str, ...], _Histogram] = {}
        self.ttfc: dict[tuple[str, ...], _Histogram] = {}
        self.tpoc: dict[tuple[str, ...], _Histogram] = {}
        self.output_tokens: dict[tuple[str, ...], float] = {}
        self.input_tokens: dict[tuple[str, ...], float] = {}
        self.errors: dict[tuple[str, ...], float] = {}
        self.attempts: dict[tuple[str, ...], float] = {}
        self.failovers: dict[tuple[str, ...], float] = {}
        self.ejections: dict[tuple[str, ...], float] = {}
        self._last_outcome: dict[str, str] = {}
        self._backend: dict[str, tuple[str, str, str, str]] = {
            e.id: (e.provider, e.region, e.pool, e.accelerator)
            for e in (s.endpoint for s in proxy.states.values())
        }

    # -- the hooks --------------------------------------------------------------------------------------

    def request_start(self, ctx: RequestContext) -> None:
        if ctx.observed is None:
            ctx.observed = {}
        ctx.observed["started"] = self.proxy.clock()
        ctx.observed["backend"] = None

    def _labels(self, ctx: RequestContext, backend: tuple[str, str, str, str] | None) -> tuple[str, ...]:
        return (OPERATIONS[ctx.kind], ctx.model, *(backend or _NO_BACKEND), self.protocol)

    def attempt_start(self, ctx: RequestContext, state: EndpointState, kind: str) -> None:
        if kind == ATTEMPT and ctx.attempts > 1:
            key = (ctx.model, "before_first_token")
            self.failovers[key] = self.failovers.get(key, 0) + 1

    def attempt_end(
        self,
        ctx: RequestContext,
        state: EndpointState,
        outcome: str,
        seconds: float | None = None,
        body: bytes | None = None,
    ) -> None:
        e = state.endpoint
        key = (ctx.model, e.provider, e.region, e.pool, outcome)
        self.attempts[key] = self.attempts.get(key, 0) + 1
        if outcome != "ok":
            self._last_outcome[e.id] = outcome
            return
        observed = ctx.observed
        if observed is not None:
            observed["backend"] = self._backend[e.id]
            if body is not None:
                observed["body"] = body

    def request_end(self, ctx: RequestContext, status: int, seconds: float) -> None:
        observed = ctx.observed or {}
        labels = self._labels(ctx, observed.get("backend"))
        if status >= 400 or observed.get("backend") is None:
            key = (*labels, str(status))
            self.errors[key] = self.errors.get(key, 0) + 1
            _get(self.duration, key).observe(seconds)
            return
        if not ctx.stream:
            _get(self.duration, (*labels, "")).observe(seconds)
            body = observed.pop("body", None)
            if body is not None:
                self._usage(labels, body)
            return
        _get(self.ttfc, labels).observe(seconds)
        observed["ttfc"] = seconds
        observed["labels"] = labels

    def stream_end(self, ctx: RequestContext, state: EndpointState, tokens: int, completed: bool) -> None:
        observed = ctx.observed
        if observed is None or "labels" not in observed:
            return
        started = observed.get("started")
        labels = self._labels(ctx, self._backend[state.endpoint.id])
        error = "" if completed else "stream_interrupted"
        seconds = self.proxy.clock() - started if started is not None else None
        if seconds is not None:
            _get(self.duration, (*labels, error)).observe(seconds)
            gap_total = seconds - observed["ttfc"]
            if tokens > 1 and gap_total > 0:
                _get(self.tpoc, labels).observe(gap_total / (tokens - 1), tokens - 1)
        key = (*labels, "unknown")
        self.output_tokens[key] = self.output_tokens.get(key, 0) + tokens
        if error:
            ekey = (*labels, error)
            self.errors[ekey] = self.errors.get(ekey, 0) + 1

    def continued(
        self, ctx: RequestContext, failed: EndpointState, state: EndpointState, tokens: int
    ) -> None:
        key = (ctx.model, "after_first_token")
        self.failovers[key] = self.failovers.get(key, 0) + 1
        e = state.endpoint
        attempt = (ctx.model, e.provider, e.region, e.pool, "continued")
        self.attempts[attempt] = self.attempts.get(attempt, 0) + 1

    def ejected(self, state: EndpointState, reason: str) -> None:
        e = state.endpoint
        key = (e.provider, e.region, e.pool, ejection_cause(reason, self._last_outcome.get(e.id)))
        self.ejections[key] = self.ejections.get(key, 0) + 1

    def _usage(self, labels: tuple[str, ...], body: bytes) -> None:
        import orjson

        try:
            usage = orjson.loads(body).get("usage") or {}
        except (orjson.JSONDecodeError, AttributeError):
            return
        for field, counter in (
            ("prompt_tokens", self.input_tokens),
            ("completion_tokens", self.output_tokens),
        ):
            value = usage.get(field)
            if isinstance(value, int):
                key = (*labels, "unknown")
                counter[key] = counter.get(key, 0) + value

    # -- the scrape -------------------------------------------------------------------------------------

    def collect(self) -> Iterator[Any]:
        with_error = (*OPERATION_LABELS, "error_type")
        with_modality = (*OPERATION_LABELS, "gen_ai_token_modality")
        yield _histogram_family(
            "gen_ai_client_inference_duration_seconds",
            "GenAI operation duration: client request to its last byte (gen_ai.client.inference.duration)",
            with_error,
            self.duration,
        )
        yield _histogram_family(
            "gen_ai_client_inference_time_to_first_chunk_seconds",
            "Streams: client request to the first content chunk (.time_to_first_chunk)",
            OPERATION_LABELS,
            self.ttfc,
        )
        yield _histogram_family(
            "gen_ai_client_inference_time_per_output_chunk_seconds",
            "Streams: mean time between output chunks, weighted by chunks (.time_per_output_chunk)",
            OPERATION_LABELS,
            self.tpoc,
        )
        yield _counter_family(
            "gen_ai_client_inference_usage_output_tokens",
            "Output tokens sent to clients (gen_ai.client.inference.usage.output_tokens)",
            with_modality,
            self.output_tokens,
        )
        yield _counter_family(
            "gen_ai_client_inference_usage_input_tokens",
            "Input tokens reported by backends, non-streaming answers (.usage.input_tokens)",
            with_modality,
            self.input_tokens,
        )
        yield _counter_family(
            "skyfabric_operation_errors",
            "client requests that ended in an error, by error type (HTTP status or stream_interrupted)",
            with_error,
            self.errors,
        )
        backend = ("gen_ai_provider_name", "skyfabric_region", "skyfabric_pool")
        yield _counter_family(
            "skyfabric_upstream_attempts",
            "upstream attempts (first tries, retries, hedges, continuations) by outcome",
            ("gen_ai_request_model", *backend, "outcome"),
            self.attempts,
        )
        yield _counter_family(
            "skyfabric_failovers",
            "requests moved to another backend: before the first token (retry) or after (continuation)",
            ("gen_ai_request_model", "phase"),
            self.failovers,
        )
        yield _counter_family(
            "skyfabric_endpoint_ejections",
            "endpoints taken out of rotation, by cause (an outcome, stall, probe or domain)",
            (*backend, "cause"),
            self.ejections,
        )
        proxy = self.proxy
        queued = GaugeMetricFamily(
            "skyfabric_admission_queued", "requests waiting for capacity", labels=["gen_ai_request_model"]
        )
        for model in proxy.clusters:
            queued.add_metric([model], proxy.admission.waiting(model))
        yield queued
        budget = proxy.budget
        yield GaugeMetricFamily(
            "skyfabric_retry_budget_active_requests", "requests in flight", value=budget.active_requests
        )
        yield GaugeMetricFamily(
            "skyfabric_retry_budget_active_retries",
            "requests in flight that are retrying",
            value=budget.active_retries,
        )
        yield GaugeMetricFamily(
            "skyfabric_retry_budget_limit",
            "retries in flight the budget allows now",
            value=max(budget.min_concurrent, budget.active_requests * budget.percent / 100.0),
        )
        yield CounterMetricFamily(
            "skyfabric_retry_budget_refused", "retries the budget refused", value=budget.refused
        )
        prices: dict[tuple[str, str, str, str], float] = {}
        for state in proxy.states.values():
            e = state.endpoint
            if e.price_per_hour > 0:
                key = (e.provider, e.region, e.pool, e.accelerator)
                prices[key] = prices.get(key, 0.0) + e.price_per_hour
        if prices:
            cost = GaugeMetricFamily(
                "skyfabric_pool_cost_usd_per_hour",
                "what the pool's endpoints cost per hour (fleet file price_per_hour × endpoints)",
                labels=[*backend, "skyfabric_accelerator"],
            )
            for key, value in prices.items():
                cost.add_metric(list(key), value)
            yield cost


def _get(table: dict[tuple[str, ...], _Histogram], key: tuple[str, ...]) -> _Histogram:
    h = table.get(key)
    if h is None:
        h = table[key] = _Histogram()
    return h
