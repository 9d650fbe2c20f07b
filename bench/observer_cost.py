"""In-process cost of the telemetry hooks per request: the router's observer calls in a tight loop.

The same hook sequence a non-streaming request makes (request start, attempt start, upstream headers,
attempt end with the answer's body, request end), timed with the no-op observer, the default observers
(GenAI metrics + dashboard recorder) and with tracing at 1 % and 100 % (SDK, no exporter; and the
gateway's compact spans, encoded as OTLP/JSON on their thread, whose CPU counts, posted nowhere). Free of the
load generator and of other processes' noise, which end-to-end runs on a shared machine are not.

    PYTHONPATH=src .venv/bin/python bench/observer_cost.py
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from opentelemetry.sdk.trace import TracerProvider

from skyfabric.core.endpoints import fleet_endpoints
from skyfabric.core.fleet import load_fleet
from skyfabric.gateway.context import RequestContext
from skyfabric.gateway.dashboard import FleetRecorder
from skyfabric.gateway.genai_metrics import GenAIMetrics
from skyfabric.gateway.observe import combine, upstream_headers
from skyfabric.gateway.otlp_json import compact_request
from skyfabric.gateway.proxy import Proxy
from skyfabric.gateway.spans import SpanPipeline
from skyfabric.gateway.tracing import Tracer

fleet = load_fleet(Path(__file__).resolve().parent / "fleet.yaml")
proxy = Proxy(fleet, fleet_endpoints(fleet))
state = next(iter(proxy.states.values()))
body = (
    b'{"id":"chatcmpl-mock","object":"chat.completion","created":1,"model":"tiny","choices":[{"index":0,'
    b'"finish_reason":"stop","message":{"role":"assistant","content":"' + b"hello " * 16 + b'"}}],'
    b'"usage":{"prompt_tokens":10,"completion_tokens":16,"total_tokens":26}}'
)


def run(variant, n):
    observer, sampler, traced = variant
    t = time.process_time()
    for _ in range(n):  # what Proxy.forward and Proxy.attempt do around one non-streaming request
        ctx = RequestContext("chat", {}, b"", "tiny", False, 0.0, None, None)  # type: ignore[arg-type]
        obs = observer
        if sampler is not None and sampler.sampled(ctx):
            obs, ctx.traced = traced, True
        obs.request_start(ctx)
        ctx.attempts = 1
        obs.attempt_start(ctx, state, "attempt")
        upstream_headers(obs, ctx, state)
        obs.attempt_end(ctx, state, "ok", 0.01, body)
        obs.request_end(ctx, 200, 0.01)
    return (time.process_time() - t) / n * 1e6


def untraced(observers):
    return (combine(observers), None, None)


def traced(observers, ratio, provider=None):
    tracer = Tracer(proxy, provider or TracerProvider(), ratio)
    return (combine(observers), tracer, combine([*observers, tracer]))


PIPELINE = SpanPipeline(lambda spans: compact_request(spans, {"service.name": "bench"}, "b"), lambda b: True)
m = GenAIMetrics(proxy)
r = FleetRecorder(proxy, m)
variants = {
    "off (no-op observer)": untraced([]),
    "default (metrics+dashboard)": untraced([m, r]),
    "default+tracing 0%": traced([m, r], 0.0),
    "default+tracing 1%": traced([m, r], 0.01),
    "default+tracing 100%": traced([m, r], 1.0),
    "default+tracing 1% compact": traced([m, r], 0.01, PIPELINE),
    "default+tracing 100% compact": traced([m, r], 1.0, PIPELINE),
}
res = {k: [] for k in variants}
for _ in range(7):
    for k, v in variants.items():
        res[k].append(run(v, 20000 if "100%" not in k else 3000))
base = min(res["off (no-op observer)"])
for k, v in res.items():
    print(
        f"{k:30} min {min(v):7.2f} µs  median {statistics.median(v):7.2f} µs  added {min(v) - base:7.2f} µs"
    )
if PIPELINE.dropped:
    print(f"(compact spans dropped at the queue's bound: {PIPELINE.dropped})")
