"""Assembles the gateway's telemetry from the fleet file's ``observability`` section, in one place.

Each kind — the dashboard's recorder, and later metrics and traces — is an observer of the router; this
function builds the ones that are on and hands the router their combination (the no-op observer when
all are off, so that off costs nothing beyond a method call per hook).
"""

from __future__ import annotations

from skyfabric.gateway.dashboard import Dashboard
from skyfabric.gateway.decisions import DecisionLog, use_json_logs
from skyfabric.gateway.genai_metrics import GenAIMetrics
from skyfabric.gateway.observe import Observer, combine
from skyfabric.gateway.proxy import Proxy


def install(proxy: Proxy, keys: set[bytes], extra: list[Observer] | None = None) -> Dashboard | None:
    """Attach the observers the fleet file turns on to ``proxy``; returns the dashboard when it is on.

    ``keys`` are the credentials that open the dashboard (the fleet's API keys and the admin credential).
    ``extra`` observers (operations: the keys' settlement, the usage ledger, shared fleet state) come
    first.
    """
    config = proxy.fleet.observability
    observers: list[Observer] = list(extra or [])
    dashboard = None
    if config.metrics or config.dashboard:
        metrics = GenAIMetrics(proxy)  # the dashboard's charts are read from these counters too
        observers.append(metrics)
        if config.metrics:
            proxy.metrics.registry.register(metrics)
        if config.dashboard:
            dashboard = Dashboard(proxy, metrics, keys, interval=config.dashboard_interval)
            observers.append(dashboard.recorder)
    if config.tracing.enabled:
        from skyfabric.gateway.tracing import Tracer, tracer_provider

        observers.append(Tracer(proxy, tracer_provider(config.tracing), config.tracing.sample_ratio))
    if config.logs.format == "json":
        use_json_logs()
    if config.logs.decisions:
        observers.append(DecisionLog())  # after the tracer: it reads the request's trace id
    proxy.observer = combine(observers)
    return dashboard
