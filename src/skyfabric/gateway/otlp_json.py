"""OTLP/HTTP with JSON bodies: the gateway's span exporter, cheap enough to run in the serving process.

The OpenTelemetry protocol has two encodings over HTTP, protobuf and JSON, and every OTLP receiver (the
Collector, Jaeger, Tempo, Honeycomb, …) accepts both on ``/v1/traces``. The Python protobuf exporter
builds a message object per attribute: about 50 µs of CPU per span on the development machine — more
than the SDK spends creating the span — and the gateway pays it in its own process, holding the GIL while
the event loop waits. Written here as the JSON mapping of ``ExportTraceServiceRequest`` with ``orjson``
it is a few µs per span. It runs on the SDK's batch processor thread (``BatchSpanProcessor``), never on
the event loop; a failed export is dropped with a warning, as the SDK's exporters do (traces are
best effort; the request path never waits for them).

The mapping (OTLP/JSON, ``opentelemetry-proto`` ``trace/v1``): ids as lower-case hex, enum values as
integers, 64-bit integers as decimal strings, attributes as ``{"key", "value": {"stringValue" | "boolValue"
| "intValue" | "doubleValue" | "arrayValue"}}``.
"""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import orjson
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import StatusCode

from skyfabric.gateway.spans import Span

log = logging.getLogger("skyfabric.gateway")

_STATUS = {StatusCode.UNSET: 0, StatusCode.OK: 1, StatusCode.ERROR: 2}


def any_value(value: Any) -> dict[str, Any]:
    """An attribute value as OTLP/JSON's ``AnyValue``."""
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, str):
        return {"stringValue": value}
    if isinstance(value, list | tuple):
        return {"arrayValue": {"values": [any_value(v) for v in value]}}
    return {"stringValue": str(value)}


#: (key, text) → its KeyValue: most attribute values repeat (model, provider, endpoint, kind), and orjson
#: writes a shared dict as fast as a fresh one. Bounded: the fleet's names are; other values are not kept.
_KEPT: dict[tuple[str, str], dict[str, Any]] = {}
_KEPT_MAX = 4096


def _attributes(attributes: Any) -> list[dict[str, Any]]:
    out = []
    for k, v in (attributes or {}).items():
        if type(v) is str:
            kv = _KEPT.get((k, v))
            if kv is None:
                kv = {"key": k, "value": {"stringValue": v}}
                if len(_KEPT) < _KEPT_MAX:
                    _KEPT[(k, v)] = kv
            out.append(kv)
        else:
            out.append({"key": k, "value": any_value(v)})
    return out


def span_json(span: ReadableSpan) -> dict[str, Any]:
    """One finished span in OTLP/JSON."""
    context = span.get_span_context()
    assert context is not None  # a finished SDK span always has one
    out: dict[str, Any] = {
        "traceId": f"{context.trace_id:032x}",
        "spanId": f"{context.span_id:016x}",
        "name": span.name,
        "kind": span.kind.value + 1,  # the API's INTERNAL is 0, OTLP's SPAN_KIND_INTERNAL 1, and so on
        "startTimeUnixNano": str(span.start_time or 0),
        "endTimeUnixNano": str(span.end_time or 0),
        "attributes": _attributes(span.attributes),
        "status": {"code": _STATUS[span.status.status_code]},
    }
    if span.parent is not None:
        out["parentSpanId"] = f"{span.parent.span_id:016x}"
    if context.trace_state:
        out["traceState"] = context.trace_state.to_header()
    if span.status.description:
        out["status"]["message"] = span.status.description
    if span.events:
        out["events"] = [
            {"timeUnixNano": str(e.timestamp), "name": e.name, "attributes": _attributes(e.attributes)}
            for e in span.events
        ]
    return out


def compact_span_json(span: Span) -> dict[str, Any]:
    """One finished compact span (``gateway/spans.py``) in OTLP/JSON: the same fields as :func:`span_json`."""
    out: dict[str, Any] = {
        "traceId": f"{span.trace_id:032x}",
        "spanId": f"{span.span_id:016x}",
        "name": span.name,
        "kind": span.kind,
        "startTimeUnixNano": str(span.start_time),
        "endTimeUnixNano": str(span.end_time),
        "attributes": _attributes(span.attributes),
        "status": {"code": span.status},
    }
    if span.parent_id is not None:
        out["parentSpanId"] = f"{span.parent_id:016x}"
    if span.events:
        out["events"] = [
            {"timeUnixNano": str(t), "name": name, "attributes": _attributes(attributes)}
            for t, name, attributes in span.events
        ]
    return out


def compact_request(spans: Sequence[Span], resource: dict[str, Any], scope: str) -> bytes:
    """``ExportTraceServiceRequest`` of compact spans (one resource, one scope: the gateway's), encoded."""
    return orjson.dumps(
        {
            "resourceSpans": [
                {
                    "resource": {"attributes": _attributes(resource)},
                    "scopeSpans": [
                        {"scope": {"name": scope}, "spans": [compact_span_json(s) for s in spans]}
                    ],
                }
            ]
        }
    )


def export_request(spans: Sequence[ReadableSpan]) -> dict[str, Any]:
    """``ExportTraceServiceRequest`` in OTLP/JSON: spans grouped by resource, then by scope."""
    resources: dict[int, tuple[Any, dict[tuple[str, str], list[dict[str, Any]]]]] = {}
    for span in spans:
        resource = span.resource
        _, scopes = resources.setdefault(id(resource), (resource, {}))
        scope = span.instrumentation_scope
        key = (scope.name, scope.version or "") if scope is not None else ("", "")
        scopes.setdefault(key, []).append(span_json(span))
    return {
        "resourceSpans": [
            {
                "resource": {"attributes": _attributes(resource.attributes if resource else None)},
                "scopeSpans": [
                    {"scope": {"name": name, **({"version": version} if version else {})}, "spans": items}
                    for (name, version), items in scopes.items()
                ],
            }
            for resource, scopes in resources.values()
        ]
    }


class OTLPJsonExporter(SpanExporter):
    """Posts batches of spans to an OTLP/HTTP traces endpoint as JSON (called on the batch thread)."""

    def __init__(
        self, endpoint: str, *, timeout: float = 10.0, headers: dict[str, str] | None = None
    ) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.headers = {"content-type": "application/json", **(headers or {})}
        self._warned = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        ok = self.post(orjson.dumps(export_request(spans)))
        return SpanExportResult.SUCCESS if ok else SpanExportResult.FAILURE

    def post(self, body: bytes) -> bool:
        """Send one encoded ``ExportTraceServiceRequest``; False (and one warning) when it failed."""
        request = urllib.request.Request(self.endpoint, data=body, headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                resp.read()
        except (urllib.error.URLError, OSError, ValueError) as exc:
            if not self._warned:  # once: a collector that is down must not flood the gateway's log
                self._warned = True
                log.warning("OTLP export to %s failed (spans dropped): %s", self.endpoint, exc)
            return False
        self._warned = False
        return True

    def shutdown(self) -> None:
        """Nothing to release: each export is one request."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True
