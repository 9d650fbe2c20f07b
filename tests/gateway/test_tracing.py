"""Traces: the span tree of a stream rescued mid-answer, the client's trace continued and passed upstream."""

from __future__ import annotations

import logging

import orjson
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from skyfabric.gateway.decisions import JsonFormatter
from tests.conftest import MakeGateway
from tests.support.fake_upstream import FakeUpstream, expected_text

EXPORTER = InMemorySpanExporter()
_PROVIDER = TracerProvider()
_PROVIDER.add_span_processor(SimpleSpanProcessor(EXPORTER))
trace.set_tracer_provider(_PROVIDER)  # tracing without an OTLP endpoint uses the global provider

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{CLIENT_TRACE}-00f067aa0ba902b7-01"


async def test_span_tree_of_a_stream_rescued_mid_answer(make_gateway: MakeGateway) -> None:
    EXPORTER.clear()
    aws = FakeUpstream("a", tokens=8).then({"cut_after": 3})
    gcp = FakeUpstream("b", tokens=8)
    gw = await make_gateway(
        {"aws": [aws], "gcp": [gcp]},
        health={"probe_interval": 0},
        observability={"tracing": {"enabled": True}},
    )
    gw.gateway.proxy.states["gcp/r1/pool/0"].reported_waiting = 1  # aws first, deterministically
    stream = await gw.client().chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},  # exact token counts across the break (see metrics test)
        extra_headers={"traceparent": TRACEPARENT},
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == expected_text(8)

    spans = EXPORTER.get_finished_spans()
    [root] = [s for s in spans if s.kind == SpanKind.SERVER]
    children = sorted((s for s in spans if s.parent and s.parent.span_id == root.context.span_id),
                      key=lambda s: s.start_time)  # fmt: skip
    assert len(spans) == 3 and len(children) == 2
    # The client's trace is continued: same trace id, the client's span as parent.
    assert f"{root.context.trace_id:032x}" == CLIENT_TRACE
    assert root.parent is not None and f"{root.parent.span_id:016x}" == "00f067aa0ba902b7"
    assert root.name == "chat m" and root.status.status_code != StatusCode.ERROR
    assert root.attributes["gen_ai.operation.name"] == "chat"
    assert root.attributes["gen_ai.usage.output_tokens"] == 8
    assert root.attributes["skyfabric.continuations"] == 1
    assert [e.name for e in root.events] == ["continuation"]
    assert root.events[0].attributes == {"from": "aws/r1/pool/0", "to": "gcp/r1/pool/0", "tokens_before": 3}

    first, rescue = children
    assert first.name == "chat m" and first.kind == SpanKind.CLIENT
    assert first.attributes["gen_ai.provider.name"] == "aws"
    assert first.attributes["skyfabric.endpoint"] == "aws/r1/pool/0"
    assert first.attributes["skyfabric.attempt.kind"] == "attempt"
    assert first.attributes["error.type"] == "RemoteProtocolError"
    assert first.status.status_code == StatusCode.ERROR
    assert [e.name for e in first.events] == ["first_token"]
    assert first.attributes["gen_ai.response.time_to_first_chunk"] > 0

    assert rescue.name == "continuation m" and rescue.kind == SpanKind.CLIENT
    assert rescue.attributes["gen_ai.provider.name"] == "gcp"
    assert rescue.attributes["skyfabric.attempt.kind"] == "continuation"
    assert rescue.attributes["skyfabric.continuation.tokens_before"] == 3
    assert rescue.attributes["skyfabric.continuation.from_endpoint"] == "aws/r1/pool/0"
    assert rescue.status.status_code != StatusCode.ERROR
    # Timings nest: the rescue starts after the first attempt broke, both within the request.
    assert root.start_time <= first.start_time < first.end_time <= rescue.start_time < rescue.end_time
    assert rescue.end_time <= root.end_time

    # Each attempt carried its own span upstream as W3C traceparent, in the client's trace.
    sent_a = aws.headers[-1]["traceparent"]
    sent_b = gcp.headers[-1]["traceparent"]
    assert sent_a == f"00-{CLIENT_TRACE}-{first.context.span_id:016x}-01"
    assert sent_b == f"00-{CLIENT_TRACE}-{rescue.context.span_id:016x}-01"
    for state in gw.gateway.proxy.states.values():
        assert state.outstanding == 0 and state.streaming == 0


async def test_a_request_without_traceparent_starts_a_trace(make_gateway: MakeGateway) -> None:
    EXPORTER.clear()
    gw = await make_gateway(
        {"aws": [FakeUpstream("a")]}, observability={"tracing": {"enabled": True, "sample_ratio": 1.0}}
    )
    await gw.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    spans = EXPORTER.get_finished_spans()
    [root] = [s for s in spans if s.kind == SpanKind.SERVER]
    [attempt] = [s for s in spans if s.kind == SpanKind.CLIENT]
    assert root.parent is None and attempt.parent.span_id == root.context.span_id
    assert attempt.attributes["skyfabric.outcome"] == "ok"
    assert root.attributes["http.response.status_code"] == 200


async def test_tracing_off_by_default_sends_no_traceparent(make_gateway: MakeGateway) -> None:
    EXPORTER.clear()
    up = FakeUpstream("a")
    gw = await make_gateway({"aws": [up]})
    await gw.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}], extra_headers={"traceparent": TRACEPARENT}
    )
    assert EXPORTER.get_finished_spans() == ()
    assert "traceparent" not in up.headers[-1]


async def test_json_decision_logs_carry_request_and_trace_ids(
    make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture
) -> None:
    EXPORTER.clear()
    aws = FakeUpstream("a", tokens=4).then({"status": 503})
    gcp = FakeUpstream("b", tokens=4)
    gw = await make_gateway(
        {"aws": [aws], "gcp": [gcp]},
        health={"probe_interval": 0},
        observability={"tracing": {"enabled": True}, "logs": {"decisions": True}},
    )
    gw.gateway.proxy.states["gcp/r1/pool/0"].reported_waiting = 1
    with caplog.at_level(logging.INFO, logger="skyfabric.decisions"):
        await gw.client().chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], extra_headers={"traceparent": TRACEPARENT}
        )
    records = [r for r in caplog.records if r.name == "skyfabric.decisions"]
    [line] = [orjson.loads(JsonFormatter().format(r)) for r in records]
    assert line["event"] == "request" and line["status"] == 200 and line["level"] == "info"
    assert line["trace_id"] == CLIENT_TRACE and len(line["request_id"]) == 16
    assert line["decisions"] == [
        {"decision": "attempt", "endpoint": "aws/r1/pool/0", "attempt": 1},
        {"decision": "failed", "endpoint": "aws/r1/pool/0", "outcome": "status_503"},
        {"decision": "retry", "endpoint": "gcp/r1/pool/0", "attempt": 2},
    ]
    assert line["logger"] == "skyfabric.decisions" and line["message"] == "200 m after 2 attempts"


async def test_unsampled_requests_make_no_spans_and_pass_the_client_traceparent_on(
    make_gateway: MakeGateway,
) -> None:
    EXPORTER.clear()
    up = FakeUpstream("a")
    gw = await make_gateway({"aws": [up]}, observability={"tracing": {"enabled": True, "sample_ratio": 0.0}})
    client = gw.client()
    await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert "traceparent" not in up.headers[-1]
    unsampled = f"00-{CLIENT_TRACE}-00f067aa0ba902b7-00"  # the client decided: not sampled
    await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}], extra_headers={"traceparent": unsampled}
    )
    assert up.headers[-1]["traceparent"] == unsampled
    assert EXPORTER.get_finished_spans() == ()
    # A sampled client trace is always traced, whatever the ratio.
    await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}], extra_headers={"traceparent": TRACEPARENT}
    )
    assert len(EXPORTER.get_finished_spans()) == 2
