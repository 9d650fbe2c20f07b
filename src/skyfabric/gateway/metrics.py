"""Prometheus metrics of the gateway: what clients got, what it cost upstream, and endpoint health.

Counters are incremented on the request path (a lock and an add); endpoint gauges are computed at scrape
time from the balancer's state, so keeping them costs nothing per request.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from skyfabric.gateway.balancer import EndpointState

disable_created_metrics()

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


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
        self.requests = Counter(
            "skyfabric_requests", "client requests by model and status", ["model", "status"], registry=r
        )
        self.attempts = Counter(
            "skyfabric_attempts",
            "upstream attempts by endpoint and outcome",
            ["endpoint", "outcome"],
            registry=r,
        )
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
        self.ttft = Histogram(
            "skyfabric_time_to_first_token_seconds",
            "streams: arrival to first token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "skyfabric_request_seconds",
            "arrival to response headers (non-streaming: whole answer)",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        #: The endpoints the gauges cover (discovery adds and drops them at run time).
        self.endpoint_states = states
        r.register(_EndpointCollector(states, clock))

        self._children: dict[tuple[str, tuple[str, ...]], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        # prometheus_client's labels() hashes and locks on every call; the request path keeps its children.
        key = (metric._name, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def request(self, model: str, status: str) -> None:
        """Count one client request by its final status."""
        self._child(self.requests, model, status).inc()

    def attempt(self, endpoint: str, outcome: str) -> None:
        """Count one upstream attempt by its outcome (``ok``, ``status_503``, an error class)."""
        self._child(self.attempts, endpoint, outcome).inc()

    def observe(self, histogram: Histogram, model: str, seconds: float) -> None:
        """Record a latency in one of the per-model histograms."""
        self._child(histogram, model).observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)

    def forget_endpoint(self, endpoint: str) -> None:
        """Drop an endpoint's labelled series once discovery has removed it (no stale series remain)."""
        for key in [k for k in self._children if k[1] and k[1][0] == endpoint]:
            metric = self.attempts if key[0] == self.attempts._name else None
            if metric is not None:
                metric.remove(*key[1])
                del self._children[key]
        with contextlib.suppress(KeyError):
            self.ejections.remove(endpoint)
