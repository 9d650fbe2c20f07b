"""Assembles the gateway's telemetry from the fleet file's ``observability`` section, in one place.

Each kind — the dashboard's recorder, the GenAI metrics, the decision log, the tracer — is an observer of
the router; this function builds the ones that are on and hands the router their combination (the no-op
observer when all are off, so that off costs nothing beyond a method call per hook). The tracer is also
the router's head sampler: only the requests it samples get the combination that includes it.
"""

from __future__ import annotations

from skyfabric.gateway.dashboard import Dashboard
from skyfabric.gateway.decisions import DecisionLog, use_json_logs
from skyfabric.gateway.genai_metrics import GenAIMetrics
from skyfabric.gateway.observe import Observer, combine
from skyfabric.gateway.proxy import Proxy


def install(
    proxy: Proxy, keys: set[bytes], extra: list[Observer] | None = None, admin: bytes | None = None
) -> Dashboard | None:
    """Attach the observers the fleet file turns on to ``proxy``; returns the dashboard when it is on.

    ``keys`` are the credentials that open the dashboard (the fleet's API keys and the admin credential);
    ``admin``, the admin credential alone, is what a drill runner announces its phases with.
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
            dashboard = Dashboard(proxy, metrics, keys, interval=config.dashboard_interval, admin=admin)
            observers.append(dashboard.recorder)
    tracer = None
    if config.tracing.enabled:
        from skyfabric.gateway.tracing import Tracer, tracer_provider

        tracer = Tracer(proxy, tracer_provider(config.tracing), config.tracing.sample_ratio)
    if config.logs.format == "json":
        use_json_logs()
    after: list[Observer] = [DecisionLog()] if config.logs.decisions else []
    proxy.observer = combine(observers + after)
    if tracer is not None:
        # A sampled request's observers: the same plus the tracer, before the decision log (it reads the
        # request's trace id). The router picks one of the two once per request.
        proxy.sampler = tracer
        proxy.traced_observer = combine([*observers, tracer, *after])
    else:
        proxy.sampler = None
        proxy.traced_observer = proxy.observer
    return dashboard
