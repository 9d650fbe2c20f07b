"""Spans exported as OTLP/HTTP JSON to a collector stand-in: the span tree of a request that was retried.

The stand-in is an HTTP server that reads ``/v1/traces`` the way an OpenTelemetry Collector's OTLP/HTTP
receiver does with ``Content-Type: application/json`` (the JSON mapping of ``ExportTraceServiceRequest``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from skyfabric.gateway.otlp_json import any_value
from tests.conftest import MakeGateway
from tests.support.fake_upstream import FakeUpstream, expected_text


class Collector:
    """Accepts OTLP/HTTP JSON trace exports and keeps their bodies."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.content_types: list[str] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> Collector:
        async def traces(request: web.Request) -> web.Response:
            self.content_types.append(request.content_type)
            self.bodies.append(orjson.loads(await request.read()))
            return web.json_response({})

        app = web.Application()
        app.router.add_post("/v1/traces", traces)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/v1/traces"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def attributes(span: dict[str, Any]) -> dict[str, Any]:
    return {a["key"]: next(iter(a["value"].values())) for a in span.get("attributes", [])}


def test_attribute_values_follow_the_json_mapping() -> None:
    assert any_value(True) == {"boolValue": True}
    assert any_value(8080) == {"intValue": "8080"}  # 64-bit integers are strings in OTLP/JSON
    assert any_value(0.25) == {"doubleValue": 0.25}
    assert any_value("aws") == {"stringValue": "aws"}
    assert any_value(("a", 1)) == {"arrayValue": {"values": [{"stringValue": "a"}, {"intValue": "1"}]}}


async def test_a_retried_request_reaches_the_collector_as_one_tree(make_gateway: MakeGateway) -> None:
    collector = await Collector().start()
    try:
        aws = FakeUpstream("a").then({"status": 503})
        gcp = FakeUpstream("b")
        tracing = {"enabled": True, "sample_ratio": 1.0, "otlp_endpoint": collector.url}
        gw = await make_gateway({"aws": [aws], "gcp": [gcp]}, observability={"tracing": tracing})
        gw.gateway.proxy.states["gcp/r1/pool/0"].reported_waiting = 1  # aws first, then the retry on gcp
        client = gw.client()
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        sampler: Any = gw.gateway.proxy.sampler
        assert await asyncio.to_thread(sampler.provider.force_flush, 10_000)
    finally:
        await collector.stop()
    assert collector.content_types and set(collector.content_types) == {"application/json"}
    [resource] = [r for body in collector.bodies for r in body["resourceSpans"]]
    assert attributes(resource["resource"])["service.name"] == "skyfabric-gateway"
    [scope] = resource["scopeSpans"]
    assert scope["scope"]["name"] == "skyfabric.gateway"
    spans = scope["spans"]
    [server] = [s for s in spans if s["kind"] == 2]  # SPAN_KIND_SERVER
    clients = sorted((s for s in spans if s["kind"] == 3), key=lambda s: int(s["startTimeUnixNano"]))
    assert server["name"] == "chat m" and "parentSpanId" not in server
    assert len(server["traceId"]) == 32 and len(server["spanId"]) == 16
    assert [attributes(c)["skyfabric.attempt.kind"] for c in clients] == ["attempt", "retry"]
    assert all(c["traceId"] == server["traceId"] and c["parentSpanId"] == server["spanId"] for c in clients)
    failed, ok = clients
    assert failed["status"]["code"] == 2 and attributes(failed)["error.type"] == "status_503"
    assert (
        attributes(failed)["gen_ai.provider.name"] == "aws"
        and attributes(ok)["gen_ai.provider.name"] == "gcp"
    )
    assert ok["status"]["code"] == 0 and isinstance(attributes(ok)["server.port"], str)
    assert attributes(server)["http.response.status_code"] == "200"
    assert int(server["endTimeUnixNano"]) >= int(ok["endTimeUnixNano"]) > int(ok["startTimeUnixNano"])


async def test_a_stream_rescued_mid_answer_exports_the_same_tree_from_compact_spans(
    make_gateway: MakeGateway,
) -> None:
    """With an OTLP/JSON endpoint the gateway records its own compact spans (not the SDK's): the tree
    of a rescued stream in a client's trace — ids, parents, events, statuses, upstream traceparents —
    is what the SDK path gives (``test_tracing.py``'s span-tree test)."""
    client_trace, client_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    collector = await Collector().start()
    try:
        aws = FakeUpstream("a", tokens=8).then({"cut_after": 3})
        gcp = FakeUpstream("b", tokens=8)
        tracing = {"enabled": True, "sample_ratio": 0.0, "otlp_endpoint": collector.url}
        gw = await make_gateway(
            {"aws": [aws], "gcp": [gcp]}, health={"probe_interval": 0}, observability={"tracing": tracing}
        )
        gw.gateway.proxy.states["gcp/r1/pool/0"].reported_waiting = 1  # aws first, deterministically
        stream = await gw.client().chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"traceparent": f"00-{client_trace}-{client_span}-01"},  # sampled by the client
        )
        assert "".join(
            [c.choices[0].delta.content or "" async for c in stream if c.choices]
        ) == expected_text(8)
        sampler: Any = gw.gateway.proxy.sampler
        assert sampler.pipeline is not None and sampler.tracer is None  # not the SDK's spans
        assert await asyncio.to_thread(sampler.provider.force_flush, 10_000)
    finally:
        await collector.stop()
    spans = [
        s
        for body in collector.bodies
        for r in body["resourceSpans"]
        for sc in r["scopeSpans"]
        for s in sc["spans"]
    ]
    [root] = [s for s in spans if s["kind"] == 2]
    first, rescue = sorted((s for s in spans if s["kind"] == 3), key=lambda s: int(s["startTimeUnixNano"]))
    assert len(spans) == 3
    assert root["traceId"] == client_trace and root["parentSpanId"] == client_span
    assert root["name"] == "chat m" and root["status"]["code"] == 0
    assert attributes(root)["gen_ai.usage.output_tokens"] == "8"
    assert [e["name"] for e in root["events"]] == ["continuation"]
    assert attributes(root["events"][0]) == {
        "from": "aws/r1/pool/0",
        "to": "gcp/r1/pool/0",
        "tokens_before": "3",
    }
    for child in (first, rescue):
        assert child["traceId"] == client_trace and child["parentSpanId"] == root["spanId"]
    assert first["status"]["code"] == 2 and attributes(first)["error.type"] == "RemoteProtocolError"
    assert [e["name"] for e in first["events"]] == ["first_token"]
    assert rescue["name"] == "continuation m" and rescue["status"]["code"] == 0
    assert attributes(rescue)["skyfabric.continuation.tokens_before"] == "3"
    assert attributes(rescue)["skyfabric.continuation.from_endpoint"] == "aws/r1/pool/0"
    start, end = int(root["startTimeUnixNano"]), int(root["endTimeUnixNano"])
    assert start <= int(first["startTimeUnixNano"]) < int(first["endTimeUnixNano"])
    assert (
        int(first["endTimeUnixNano"])
        <= int(rescue["startTimeUnixNano"])
        < int(rescue["endTimeUnixNano"])
        <= end
    )
    assert aws.headers[-1]["traceparent"] == f"00-{client_trace}-{first['spanId']}-01"
    assert gcp.headers[-1]["traceparent"] == f"00-{client_trace}-{rescue['spanId']}-01"
