"""Prometheus metrics of the gateway: what clients got, what it cost upstream, and endpoint health.

The series every request touches — requests by status, attempts by outcome, the latency and TTFT
histograms — are plain dicts and bucket lists written on the event loop (one thread: no lock) and turned
into metric families at scrape time: prometheus_client's ``Counter.inc`` and ``Histogram.observe`` take
a lock per value and walk the buckets in Python, 2.5–4 µs of every request, more than the GenAI metrics
spend. Their exposition is what prometheus_client's classes wrote (names, label order, ``le`` strings),
so scrapers, dashboards and the cross-worker merge see no change. The rare events (retries, hedges,
rescues, ejections, shed requests) stay prometheus_client counters. Endpoint gauges are computed at
scrape time from the balancer's state, so keeping them costs nothing per request.
"""

from __future__ import annotations

import bisect
import contextlib
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from skyfabric.gateway.balancer import EndpointState

disable_created_metrics()

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class PlainCounter(Collector):
    """A labelled counter kept as ``{label values: count}``; exposed as prometheus_client's ``Counter``."""

    def __init__(self, name: str, doc: str, labels: tuple[str, ...]) -> None:
        self.name, self.doc, self.labels = name, doc, labels
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, key: tuple[str, ...]) -> None:
        values = self.values
        values[key] = values.get(key, 0.0) + 1.0

    def collect(self) -> Iterator[Metric]:
        family = Metric(self.name, self.doc, "counter")
        total = self.name + "_total"
        for key, value in self.values.items():
            family.samples.append(Sample(total, dict(zip(self.labels, key, strict=True)), value, None, None))
        yield family


class PlainHistogram(Collector):
    """A per-model histogram kept as bucket counts, sum and count; exposed as prometheus_client's
    ``Histogram`` was (``le`` first among the labels, cumulative buckets, then ``_count`` and ``_sum``)."""

    def __init__(self, name: str, doc: str, label: str, buckets: tuple[float, ...]) -> None:
        self.name, self.doc, self.label = name, doc, label
        self.bounds = buckets
        self._le = [*(floatToGoString(b) for b in buckets), "+Inf"]
        #: Label value → [count per bucket (the last: above every bound)…, sum].
        self.values: dict[str, list[float]] = {}

    def observe(self, key: str, seconds: float) -> None:
        row = self.values.get(key)
        if row is None:
            row = self.values[key] = [0.0] * (len(self.bounds) + 2)
        row[bisect.bisect_left(self.bounds, seconds)] += 1.0
        row[-1] += seconds

    def collect(self) -> Iterator[Metric]:
        family = Metric(self.name, self.doc, "histogram")
        samples = family.samples
        for key, row in self.values.items():
            running = 0.0
            for le, count in zip(self._le, row, strict=False):
                running += count
                samples.append(
                    Sample(self.name + "_bucket", {"le": le, self.label: key}, running, None, None)
                )
            samples.append(Sample(self.name + "_count", {self.label: key}, running, None, None))
            samples.append(Sample(self.name + "_sum", {self.label: key}, row[-1], None, None))
        yield family


class _EndpointCollector(Collector):
    def __init__(self, states: list[EndpointState], clock: Callable[[], float]) -> None:
        self.states = states
        self.clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = self.clock()
        labels = ["endpoint", "provider", "region", "pool"]
        outstanding = GaugeMetricFamily("skyfabric_endpoint_outstanding", "requests in flight", labels=labels)
        available = GaugeMetricFamily("skyfabric_endpoint_available", "1 unless ejected", labels=labels)
        for s in self.states:
            e = s.endpoint
            values = [e.id, e.provider, e.region, e.pool]
            outstanding.add_metric(values, s.outstanding)
            available.add_metric(values, 1.0 if s.available(now) else 0.0)
        yield outstanding
        yield available


class GatewayMetrics:
    """The gateway's registry; one per process."""

    def __init__(self, states: list[EndpointState], clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # Registered in the order the exposition has always had (the families follow registration).
        self.requests = PlainCounter(
            "skyfabric_requests", "client requests by model and status", ("model", "status")
        )
        r.register(self.requests)
        self.attempts = PlainCounter(
            "skyfabric_attempts", "upstream attempts by endpoint and outcome", ("endpoint", "outcome")
        )
        r.register(self.attempts)
        self.retries = Counter("skyfabric_retries", "attempts after the first, before commit", registry=r)
        self.rescued = Counter(
            "skyfabric_rescued_streams", "streams continued on another backend", registry=r
        )
        self.hedges = Counter("skyfabric_hedges", "hedged attempts started", registry=r)
        self.ejections = Counter("skyfabric_ejections", "endpoint ejections", ["endpoint"], registry=r)
        self.stream_errors = Counter(
            "skyfabric_stream_errors", "streams ended with an in-band error event", registry=r
        )
        self.shed = Counter("skyfabric_shed", "requests refused by admission control", registry=r)
        self.ttft = PlainHistogram(
            "skyfabric_time_to_first_token_seconds",
            "streams: arrival to first token",
            "model",
            _LATENCY_BUCKETS,
        )
        r.register(self.ttft)
        self.latency = PlainHistogram(
            "skyfabric_request_seconds",
            "arrival to response headers (non-streaming: whole answer)",
            "model",
            _LATENCY_BUCKETS,
        )
        r.register(self.latency)
        #: The endpoints the gauges cover (discovery adds and drops them at run time).
        self.endpoint_states = states
        r.register(_EndpointCollector(states, clock))

    def request(self, model: str, status: str) -> None:
        """Count one client request by its final status."""
        self.requests.inc((model, status))

    def attempt(self, endpoint: str, outcome: str) -> None:
        """Count one upstream attempt by its outcome (``ok``, ``status_503``, an error class)."""
        self.attempts.inc((endpoint, outcome))

    def observe(self, histogram: PlainHistogram, model: str, seconds: float) -> None:
        """Record a latency in one of the per-model histograms."""
        histogram.observe(model, seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)

    def forget_endpoint(self, endpoint: str) -> None:
        """Drop an endpoint's labelled series once discovery has removed it (no stale series remain)."""
        for key in [k for k in self.attempts.values if k[0] == endpoint]:
            del self.attempts.values[key]
        with contextlib.suppress(KeyError):
            self.ejections.remove(endpoint)
