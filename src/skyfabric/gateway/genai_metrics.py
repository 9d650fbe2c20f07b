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
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from skyfabric.gateway.observe import ATTEMPT, Observer
from skyfabric.gateway.spend import answer_tokens

if TYPE_CHECKING:
    from skyfabric.core.endpoints import Endpoint
    from skyfabric.gateway.balancer import EndpointState
    from skyfabric.gateway.context import RequestContext
    from skyfabric.gateway.proxy import Proxy

#: Non-streaming answers whose token usage is read together, in one loop, rather than one by one as they
#: end (unless the keys or the ledger read it already). Read one at a time, between two requests' other
#: work, the search took ~4 µs of CPU (its code and data cold in the caches each time: 2.5× its cost in a
#: loop), as much as everything else the metrics do per request; 64 at a time it is ~1.3 µs each, and a
#: batch delays the event loop by ~0.1 ms. Scrapes and the dashboard read what is pending first, so
#: figures are never behind what they show.
UNREAD_BATCH = 64
#: ... or fewer, when they are long: the bodies held waiting stay under this many bytes.
UNREAD_BYTES = 1 << 20
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


def _summed(pairs: Iterable[tuple[tuple[str, ...], float]]) -> dict[tuple[str, ...], float]:
    """Values that share a label set, added up (several endpoints of one pool)."""
    out: dict[tuple[str, ...], float] = {}
    for key, value in pairs:
        out[key] = out.get(key, 0) + value
    return out


def _summed_histograms(
    pairs: Iterable[tuple[tuple[str, ...], _Histogram]],
) -> dict[tuple[str, ...], _Histogram]:
    """Histograms that share a label set, added up into new ones (the recorded ones are left alone)."""
    out: dict[tuple[str, ...], _Histogram] = {}
    for key, h in pairs:
        total = out.get(key)
        if total is None:
            total = out[key] = _Histogram()
        total.counts = [a + b for a, b in zip(total.counts, h.counts, strict=True)]
        total.sum += h.sum
        total.count += h.count
    return out


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


class _Series:
    """Everything recorded for one (operation, model, backend endpoint): found once per request."""

    __slots__ = ("duration", "endpoint", "input_tokens", "labels", "ok", "output_tokens", "tpoc", "ttfc")

    def __init__(self, labels: tuple[str, ...], endpoint: str) -> None:
        self.labels = labels
        self.endpoint = endpoint
        #: Its endpoint's attempts that ended ``ok`` for this series (counted here, where the request's
        #: hook already is, rather than once more in ``GenAIMetrics.attempts``: see ``attempt_counts``).
        self.ok = 0
        self.duration = _Histogram()
        self.ttfc = _Histogram()
        self.tpoc = _Histogram()
        self.output_tokens = 0
        self.input_tokens = 0


class GenAIMetrics(Observer, Collector):
    counts_tokens = True
    """Records the router's events and renders them as Prometheus metric families."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        #: (operation kind, model, endpoint id, client protocol) → its series.
        self.series: dict[tuple[str, str, str, str], _Series] = {}
        #: Durations and counts of requests that ended in an error, by labels + error type.
        self.error_duration: dict[tuple[str, ...], _Histogram] = {}
        self.errors: dict[tuple[str, ...], float] = {}
        #: Endpoint id → outcome → attempts (endpoints found by discovery join as they first appear).
        self.attempts: defaultdict[str, dict[str, int]] = defaultdict(dict)
        self.failovers: dict[tuple[str, ...], float] = {}
        self.ejections: dict[tuple[str, ...], float] = {}
        self._last_outcome: dict[str, str] = {}
        #: Called for every attempt but a first try (retries, hedges, continuations): the dashboard's feed
        #: hears of them here, so that a first try costs one hook call, not one per observer.
        self.rare_attempts: list[Callable[[RequestContext, EndpointState, str], None]] = []
        #: Non-streaming answers whose usage is still to be read: (series, body, client protocol family).
        self._unread: list[tuple[_Series, bytes, str]] = []
        self._unread_bytes = 0

    def attempt_counts(self) -> dict[str, dict[str, int]]:
        """Endpoint id → outcome → attempts: the failures and continuations counted by endpoint, the
        successes summed from the series (each request's success is counted once, in its series)."""
        out = {endpoint: dict(counts) for endpoint, counts in self.attempts.items()}
        for series in self.series.values():
            if series.ok:
                counts = out.setdefault(series.endpoint, {})
                counts["ok"] = counts.get("ok", 0) + series.ok
        return out

    def _series(self, ctx: RequestContext, endpoint: Endpoint) -> _Series:
        family = ctx.frontend.family
        key = (ctx.kind, ctx.model, endpoint.id, family)
        found = self.series.get(key)
        if found is None:
            e = endpoint
            labels = (
                OPERATIONS[ctx.kind],
                ctx.model,
                e.provider,
                e.region,
                e.pool,
                e.accelerator,
                family,
            )
            found = self.series[key] = _Series(labels, endpoint.id)
        return found

    def _error(self, ctx: RequestContext, series: _Series | None, error: str, seconds: float | None) -> None:
        labels = (
            series.labels if series else (OPERATIONS[ctx.kind], ctx.model, *_NO_BACKEND, ctx.frontend.family)
        )
        key = (*labels, error)
        self.errors[key] = self.errors.get(key, 0) + 1
        if seconds is not None:
            _get(self.error_duration, key).observe(seconds)

    # -- the hooks --------------------------------------------------------------------------------------

    def attempt_start(self, ctx: RequestContext, state: EndpointState, kind: str) -> None:
        if kind == ATTEMPT and ctx.attempts == 1:
            return  # the common case: a first try
        if kind == ATTEMPT:
            key = (ctx.model, "before_first_token")
            self.failovers[key] = self.failovers.get(key, 0) + 1
        for listener in self.rare_attempts:
            listener(ctx, state, kind)

    def attempt_end(
        self,
        ctx: RequestContext,
        state: EndpointState,
        outcome: str,
        seconds: float | None = None,
        body: bytes | None = None,
    ) -> None:
        e = state.endpoint
        if outcome != "ok":
            counts = self.attempts[e.id]
            counts[outcome] = counts.get(outcome, 0) + 1
            self._last_outcome[e.id] = outcome
            return
        key = (ctx.kind, ctx.model, e.id, ctx.frontend.family)
        series = ctx.series = self.series.get(key) or self._series(ctx, e)
        series.ok += 1
        if body is not None:
            memo = ctx.usage_memo
            if memo is not None and memo[0] is body:  # read already (the keys' settlement, the ledger)
                tokens = memo[1]
                if tokens is not None:
                    series.input_tokens += tokens[0] or 0
                    series.output_tokens += tokens[1]
                return
            unread = self._unread
            unread.append((series, body, ctx.frontend.family))
            self._unread_bytes += len(body)
            if len(unread) >= UNREAD_BATCH or self._unread_bytes > UNREAD_BYTES:
                self.read_usage()

    def read_usage(self) -> None:
        """Count the tokens of the answers whose usage is not read yet (see :data:`UNREAD_BATCH`)."""
        unread, self._unread, self._unread_bytes = self._unread, [], 0
        for series, body, family in unread:
            tokens = answer_tokens(body, family)  # in the client's protocol, OpenAI's or Anthropic's
            if tokens is not None:
                series.input_tokens += tokens[0] or 0
                series.output_tokens += tokens[1]

    def request_end(self, ctx: RequestContext, status: int, seconds: float) -> None:
        series: _Series | None = ctx.series
        if status >= 400 or series is None:
            self._error(ctx, series, str(status), seconds)
        elif not ctx.stream:
            series.duration.observe(seconds)
        else:
            series.ttfc.observe(seconds)
            observed = ctx.observed
            if observed is None:
                observed = ctx.observed = {}
            observed["ttfc"] = seconds
            # The stream's start, for its duration when it ends: from the arrival the router measured,
            # so that no hook is needed when a request starts.
            observed["started"] = self.proxy.clock() - seconds

    def stream_end(self, ctx: RequestContext, state: EndpointState, tokens: int, completed: bool) -> None:
        observed = ctx.observed
        if observed is None or "ttfc" not in observed:
            return
        series = self._series(ctx, state.endpoint)  # the backend that finished the stream
        seconds = self.proxy.clock() - observed["started"]
        series.output_tokens += tokens
        if not completed:
            self._error(ctx, series, "stream_interrupted", seconds)
            return
        series.duration.observe(seconds)
        gaps = seconds - observed["ttfc"]
        if tokens > 1 and gaps >= 0:  # chunks that arrived with the first one: gaps of 0, still gaps
            series.tpoc.observe(gaps / (tokens - 1), tokens - 1)

    def continued(
        self, ctx: RequestContext, failed: EndpointState, state: EndpointState, tokens: int
    ) -> None:
        key = (ctx.model, "after_first_token")
        self.failovers[key] = self.failovers.get(key, 0) + 1
        counts = self.attempts[state.endpoint.id]
        counts["continued"] = counts.get("continued", 0) + 1

    def ejected(self, state: EndpointState, reason: str) -> None:
        e = state.endpoint
        key = (e.provider, e.region, e.pool, ejection_cause(reason, self._last_outcome.get(e.id)))
        self.ejections[key] = self.ejections.get(key, 0) + 1

    # -- the scrape -------------------------------------------------------------------------------------

    def collect(self) -> Iterator[Any]:
        self.read_usage()
        with_error = (*OPERATION_LABELS, "error_type")
        with_modality = (*OPERATION_LABELS, "gen_ai_token_modality")
        # A series per endpoint, labels per pool: the endpoints of a pool add up to one labelled series.
        series = list(self.series.values())
        ok = _summed_histograms(((*x.labels, ""), x.duration) for x in series if x.duration.count)
        yield _histogram_family(
            "gen_ai_client_inference_duration_seconds",
            "GenAI operation duration: client request to its last byte (gen_ai.client.inference.duration)",
            with_error,
            {**ok, **self.error_duration},
        )
        yield _histogram_family(
            "gen_ai_client_inference_time_to_first_chunk_seconds",
            "Streams: client request to the first content chunk (.time_to_first_chunk)",
            OPERATION_LABELS,
            _summed_histograms((x.labels, x.ttfc) for x in series if x.ttfc.count),
        )
        yield _histogram_family(
            "gen_ai_client_inference_time_per_output_chunk_seconds",
            "Streams: mean time between output chunks, weighted by chunks (.time_per_output_chunk)",
            OPERATION_LABELS,
            _summed_histograms((x.labels, x.tpoc) for x in series if x.tpoc.count),
        )
        yield _counter_family(
            "gen_ai_client_inference_usage_output_tokens",
            "Output tokens sent to clients (gen_ai.client.inference.usage.output_tokens)",
            with_modality,
            _summed(((*x.labels, "unknown"), x.output_tokens) for x in series if x.output_tokens),
        )
        yield _counter_family(
            "gen_ai_client_inference_usage_input_tokens",
            "Input tokens reported by backends, non-streaming answers (.usage.input_tokens)",
            with_modality,
            _summed(((*x.labels, "unknown"), x.input_tokens) for x in series if x.input_tokens),
        )
        yield _counter_family(
            "skyfabric_operation_errors",
            "client requests that ended in an error, by error type (HTTP status or stream_interrupted)",
            with_error,
            self.errors,
        )
        backend = ("gen_ai_provider_name", "skyfabric_region", "skyfabric_pool")
        counts = self.attempt_counts()
        yield _counter_family(
            "skyfabric_upstream_attempts",
            "upstream attempts (first tries, retries, hedges, continuations) by outcome",
            ("gen_ai_request_model", *backend, "outcome"),
            _summed(
                ((e.model, e.provider, e.region, e.pool, outcome), n)
                for e in (s.endpoint for s in self.proxy.states.values())
                for outcome, n in counts.get(e.id, {}).items()
            ),
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
