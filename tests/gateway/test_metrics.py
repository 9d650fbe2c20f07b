"""The per-request skyfabric_* series: plain counters and bucket lists, exposed as prometheus_client did."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from skyfabric.gateway.metrics import _LATENCY_BUCKETS, GatewayMetrics


def _samples(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


def test_exposition_matches_prometheus_client_for_the_same_observations() -> None:
    """Scrapers, dashboards and the cross-worker merge read these lines: byte for byte what the
    prometheus_client classes that kept them before wrote (label order with ``le`` first, ``le``
    strings like ``1.0``, cumulative buckets, ``_count`` before ``_sum``, float sums in the same order)."""
    metrics = GatewayMetrics([])
    registry = CollectorRegistry()
    requests = Counter("skyfabric_requests", "d", ["model", "status"], registry=registry)
    latency = Histogram(
        "skyfabric_request_seconds", "d", ["model"], buckets=_LATENCY_BUCKETS, registry=registry
    )
    observations = [("m", 0.0001), ("m", 0.005), ("n", 0.3), ("m", 1.0), ("m", 121.0), ("n", 0.0049)]
    for model, seconds in observations:
        metrics.request(model, "200")
        requests.labels(model, "200").inc()
        metrics.observe(metrics.latency, model, seconds)
        latency.labels(model).observe(seconds)
    metrics.request("m", "429")
    requests.labels("m", "429").inc()
    ours, theirs = metrics.render().decode(), generate_latest(registry).decode()
    for name in ("skyfabric_requests_total", "skyfabric_request_seconds_"):
        assert _samples(ours, name) == _samples(theirs, name) != []
    assert 'skyfabric_request_seconds_bucket{le="1.0",model="m"} 3.0' in ours  # 1.0 falls in le="1.0"
    assert 'skyfabric_request_seconds_bucket{le="+Inf",model="m"} 4.0' in ours
    assert 'skyfabric_requests_total{model="m",status="429"} 1.0' in ours


def test_a_removed_endpoint_leaves_no_attempt_series() -> None:
    metrics = GatewayMetrics([])
    metrics.attempt("a/r/p/0", "ok")
    metrics.attempt("b/r/p/0", "ok")
    metrics.attempt("b/r/p/0", "status_503")
    metrics.forget_endpoint("b/r/p/0")
    text = metrics.render().decode()
    assert _samples(text, "skyfabric_attempts_total") == [
        'skyfabric_attempts_total{endpoint="a/r/p/0",outcome="ok"} 1.0'
    ]
