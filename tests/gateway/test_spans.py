"""The compact spans' export thread: batches, the queue's bound, the flush at shutdown."""

from __future__ import annotations

import threading

import orjson

from skyfabric.gateway.otlp_json import compact_request
from skyfabric.gateway.spans import CLIENT, SERVER, SpanPipeline, new_trace_id


class Receiver:
    """Stands in for the OTLP endpoint: keeps each posted body, can be held to fill the queue."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.posted = threading.Event()
        self.hold = threading.Event()
        self.hold.set()

    def post(self, body: bytes) -> bool:
        self.hold.wait(10)
        self.bodies.append(orjson.loads(body))
        self.posted.set()
        return True

    def spans(self) -> list[dict]:
        return [
            s for b in self.bodies for r in b["resourceSpans"] for sc in r["scopeSpans"] for s in sc["spans"]
        ]


def pipeline(receiver: Receiver, **kw: float) -> SpanPipeline:
    encode = lambda spans: compact_request(spans, {"service.name": "t"}, "skyfabric.gateway")  # noqa: E731
    return SpanPipeline(encode, receiver.post, **kw)  # type: ignore[arg-type]


def test_a_full_batch_is_sent_without_waiting_for_the_delay() -> None:
    receiver = Receiver()
    p = pipeline(receiver, delay=60.0, batch=4)
    root = p.span("chat m", SERVER, new_trace_id(), None, {"gen_ai.request.model": "m"})
    for i in range(3):
        p.span("chat m", CLIENT, root.trace_id, root.span_id, {"skyfabric.attempt.number": i + 1}).end()
    assert not receiver.posted.wait(0.2)  # three: under the batch, and the delay is a minute
    root.end()
    assert receiver.posted.wait(5)
    spans = receiver.spans()
    assert len(spans) == 4 and {s["traceId"] for s in spans} == {f"{root.trace_id:032x}"}
    assert [s.get("parentSpanId") for s in spans].count(f"{root.span_id:016x}") == 3
    root.end()  # ending twice exports once
    p.shutdown()
    assert len(receiver.spans()) == 4


def test_a_stuck_receiver_costs_dropped_spans_never_a_blocked_request() -> None:
    receiver = Receiver()
    receiver.hold.clear()  # the collector hangs
    p = pipeline(receiver, delay=60.0, batch=2, queue=4)
    trace_id = new_trace_id()
    for _ in range(2):
        p.span("s", SERVER, trace_id, None, {}).end()  # a batch: the thread takes it and hangs in post
    for _ in range(7):
        p.span("s", SERVER, trace_id, None, {}).end()
    assert p.dropped >= 3  # beyond the queue's 4 waiting spans; none of these calls waited
    receiver.hold.set()
    p.shutdown()
    assert len(receiver.spans()) + p.dropped == 9
