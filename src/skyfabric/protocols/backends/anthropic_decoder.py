"""Anthropic's Messages answers → canonical events: the SSE stream and the whole Message.

The stream is split into SSE events exactly (a blank line ends one; ``\\r\\n``, ``\\r`` and ``\\n`` line
ends are all SSE's), and every byte fed comes back once, inside the raw bytes of the event it belongs to:
the pass-through path forwards those bytes while the events track progress. An incomplete event waits for
more bytes, whatever the split (mid-line, mid-UTF-8 character, between ``\\r`` and ``\\n``).

Blocks are checked for order — a delta or a stop for a block that is not open, content before
``message_start`` — because a stream that breaks Anthropic's grammar cannot be continued honestly.
Block types the seam has no event for (server tool use and results, containers) are let through silently;
delta types newer than this code likewise.
"""

from __future__ import annotations

from typing import Any

import orjson

from skyfabric.core.errors import MalformedEvent
from skyfabric.protocols import anthropic_wire as wire
from skyfabric.protocols.canonical import (
    End,
    Event,
    Finish,
    PartEnd,
    PartStart,
    ReasoningDelta,
    ReasoningSignature,
    RedactedReasoning,
    Start,
    StreamError,
    TextDelta,
    ToolCallDelta,
    Usage,
)

#: The delta type each block kind the seam reads may carry.
_DELTAS: dict[str, frozenset[str]] = {
    "text": frozenset({"text_delta", "citations_delta"}),
    "tool_use": frozenset({"input_json_delta"}),
    "thinking": frozenset({"thinking_delta", "signature_delta"}),
    "redacted_thinking": frozenset(),
}


#: Content blocks the seam reads into parts (others — server tools, their results — pass by).
_READ_BLOCKS = frozenset({"text", "thinking", "tool_use", "redacted_thinking"})


class AnthropicDecoder:
    """One streamed Messages answer: bytes in, ``(raw event bytes, canonical events)`` out."""

    def __init__(self) -> None:
        self._buffer = b""
        self._scanned = 0  # where the line scan of the pending event resumes
        self._lines: list[bytes] = []  # the pending event's lines so far
        self._skip_lf = False  # the last byte fed was a \r ending a line
        self._started = False
        self._blocks: dict[int, str] = {}  # open block index → its type
        self._tools: dict[int, int] = {}  # block index → canonical tool call index
        self._next_tool = 0
        self._usage: Usage | None = None

    def feed(self, data: bytes) -> list[tuple[bytes, list[Event]]]:
        """Every event completed by ``data``, with its raw bytes (blank line included)."""
        buf = self._buffer + data if self._buffer else data
        out: list[tuple[bytes, list[Event]]] = []
        start = 0  # where the pending event's bytes begin
        pos = self._scanned
        size = len(buf)
        if self._skip_lf and pos < size:
            # The last feed ended on a \r that ended a line; a \n now is the rest of that line end.
            self._skip_lf = False
            if buf[pos] == 0x0A:
                pos += 1
                if not self._lines:  # that \r ended an event, already returned: return its \n alone
                    out.append((buf[:pos], []))
                    start = pos
        while pos < size:
            nl = buf.find(b"\n", pos)
            cr = buf.find(b"\r", pos, nl if nl >= 0 else size)
            if cr >= 0:
                # A \r ends a line now, even as the last byte (a stream framed with bare \r would otherwise
                # hold its last event back); a \n that follows it in the next feed is skipped.
                if cr + 1 == size:
                    self._skip_lf = True
                    end, after = cr, cr + 1
                else:
                    end, after = cr, cr + (2 if buf[cr + 1] == 0x0A else 1)
            elif nl >= 0:
                end, after = nl, nl + 1
            else:
                break
            line = buf[pos:end]
            pos = after
            if line:
                self._lines.append(line)
                continue
            lines, self._lines = self._lines, []
            out.append((buf[start:pos], self._event(lines)))
            start = pos
        self._buffer = buf[start:]
        self._scanned = pos - start
        return out

    def _event(self, lines: list[bytes]) -> list[Event]:
        name: str | None = None
        data: list[bytes] = []
        for line in lines:
            if line.startswith(b":"):
                continue  # a comment
            field, _, value = line.partition(b":")
            if value.startswith(b" "):
                value = value[1:]
            if field == b"event":
                name = value.decode("utf-8", "replace")
            elif field == b"data":
                data.append(value)
        if not data:
            return []
        try:
            payload = orjson.loads(b"\n".join(data))
        except orjson.JSONDecodeError:
            raise MalformedEvent(f"Anthropic event {name!r} has data that is not JSON") from None
        if not isinstance(payload, dict):
            raise MalformedEvent(f"Anthropic event {name!r} has data that is not a JSON object")
        kind = payload.get("type") or name
        return self.event(kind if isinstance(kind, str) else "", payload)

    def event(self, kind: str, payload: dict[str, Any]) -> list[Event]:
        """The canonical events of one parsed Anthropic event (also used for whole Messages)."""
        if kind == "content_block_delta":
            return self._block_delta(payload)
        if kind == "content_block_start":
            return self._block_start(payload)
        if kind == "content_block_stop":
            index = _index(payload)
            closed = self._blocks.pop(index, None)
            if closed is None:
                raise MalformedEvent(f"content_block_stop for block {index}, which is not open")
            # only the end of a block the seam reads ends a part (a server tool's block is not one)
            return [PartEnd()] if closed in _READ_BLOCKS else []
        if kind == "message_start":
            message = payload.get("message")
            if not isinstance(message, dict):
                raise MalformedEvent("message_start without a message")
            if self._started:
                raise MalformedEvent("a second message_start")
            self._started = True
            usage = message.get("usage")
            events: list[Event] = [
                Start(id=str(message.get("id") or ""), model=str(message.get("model") or ""))
            ]
            if isinstance(usage, dict):
                # Output so far is not known here: message_start's output_tokens counts nothing sent yet.
                self._usage = wire.canonical_usage(usage, with_output=False)
                events.append(self._usage)
            return events
        if kind == "message_delta":
            self._require_start(kind)
            events = []
            delta = payload.get("delta")
            reason = delta.get("stop_reason") if isinstance(delta, dict) else None
            if isinstance(reason, str):
                stop_sequence = delta.get("stop_sequence") if isinstance(delta, dict) else None
                events.append(
                    Finish(
                        reason=wire.STOP_TO_CANONICAL.get(reason, "end"),
                        stop_sequence=stop_sequence if isinstance(stop_sequence, str) else None,
                        native=reason,
                    )
                )
            usage = payload.get("usage")
            if isinstance(usage, dict):
                self._usage = wire.canonical_usage(usage, known=self._usage)
                events.append(self._usage)
            return events
        if kind == "message_stop":
            self._require_start(kind)
            return [End()]
        if kind == "error":
            error = payload.get("error")
            if isinstance(error, dict):
                return [
                    StreamError(
                        message=str(error.get("message", "")), type=str(error.get("type") or "api_error")
                    )
                ]
            return [StreamError(message=str(error or "error"))]
        return []  # ping, and event types newer than this code

    def _require_start(self, kind: str) -> None:
        if not self._started:
            raise MalformedEvent(f"{kind} before message_start")

    def _block_start(self, payload: dict[str, Any]) -> list[Event]:
        self._require_start("content_block_start")
        index = _index(payload)
        block = payload.get("content_block")
        if not isinstance(block, dict):
            raise MalformedEvent("content_block_start without a content_block")
        if index in self._blocks:
            raise MalformedEvent(f"content_block_start for block {index}, which is already open")
        kind = str(block.get("type"))
        self._blocks[index] = kind
        if kind == "text":
            text = block.get("text")
            return [PartStart("text"), *([TextDelta(text)] if isinstance(text, str) and text else [])]
        if kind == "tool_use":
            tool = self._tools[index] = self._next_tool
            self._next_tool += 1
            given = block.get("input")
            arguments = orjson.dumps(given).decode() if isinstance(given, dict) and given else ""
            return [
                ToolCallDelta(
                    index=tool,
                    id=str(block.get("id") or ""),
                    name=str(block.get("name") or ""),
                    arguments=arguments,
                )
            ]
        if kind == "thinking":
            events: list[Event] = [PartStart("reasoning")]
            if isinstance(block.get("thinking"), str) and block["thinking"]:
                events.append(ReasoningDelta(block["thinking"]))
            if isinstance(block.get("signature"), str) and block["signature"]:
                events.append(ReasoningSignature(block["signature"]))
            return events
        if kind == "redacted_thinking":
            return [RedactedReasoning(str(block.get("data") or ""))]
        return []

    def _block_delta(self, payload: dict[str, Any]) -> list[Event]:
        index = _index(payload)
        block = self._blocks.get(index)
        if block is None:
            raise MalformedEvent(f"content_block_delta for block {index}, which is not open")
        delta = payload.get("delta")
        if not isinstance(delta, dict):
            raise MalformedEvent("content_block_delta without a delta")
        kind = delta.get("type")
        allowed = _DELTAS.get(block)
        if allowed is None or kind not in _KNOWN_DELTAS:
            return []  # a block the seam does not read, or a delta newer than this code
        if kind not in allowed:
            raise MalformedEvent(f"{kind} in a {block} block")
        if kind == "text_delta":
            return [TextDelta(_text(delta, "text"))]
        if kind == "input_json_delta":
            piece = _text(delta, "partial_json")
            return [ToolCallDelta(index=self._tools[index], arguments=piece)] if piece else []
        if kind == "thinking_delta":
            return [ReasoningDelta(_text(delta, "thinking"))]
        if kind == "signature_delta":
            return [ReasoningSignature(_text(delta, "signature"))]
        return []  # citations: the seam keeps none


_KNOWN_DELTAS = frozenset().union(*_DELTAS.values())


def _index(payload: dict[str, Any]) -> int:
    index = payload.get("index")
    if not isinstance(index, int) or isinstance(index, bool):
        raise MalformedEvent(f"{payload.get('type')} without an index")
    return index


def _text(delta: dict[str, Any], name: str) -> str:
    value = delta.get(name)
    if not isinstance(value, str):
        raise MalformedEvent(f"{delta.get('type')} without {name}")
    return value


def decode_message(body: bytes) -> list[Event]:
    """A whole (non-streamed) Message as the events its stream would have carried; an error body as one."""
    try:
        message = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise MalformedEvent("Anthropic answer is not JSON") from None
    if not isinstance(message, dict):
        raise MalformedEvent("Anthropic answer is not a JSON object")
    if message.get("type") == "error":
        return AnthropicDecoder().event("error", message)
    content = message.get("content")
    if not isinstance(content, list):
        raise MalformedEvent("Anthropic answer without content")
    usage = message.get("usage")
    events: list[Event] = [Start(id=str(message.get("id") or ""), model=str(message.get("model") or ""))]
    tool = 0
    for block in content:
        if not isinstance(block, dict):
            raise MalformedEvent("Anthropic answer with a content block that is not an object")
        kind = block.get("type")
        if kind == "text" and block.get("text"):
            events.append(TextDelta(str(block["text"])))
        elif kind == "thinking":
            if block.get("thinking"):
                events.append(ReasoningDelta(str(block["thinking"])))
            if block.get("signature"):
                events.append(ReasoningSignature(str(block["signature"])))
        elif kind == "redacted_thinking":
            events.append(RedactedReasoning(str(block.get("data") or "")))
        elif kind == "tool_use":
            given = block.get("input")
            arguments = orjson.dumps(given if isinstance(given, dict) else {}).decode()
            events.append(
                ToolCallDelta(
                    index=tool,
                    id=str(block.get("id") or ""),
                    name=str(block.get("name") or ""),
                    arguments=arguments,
                )
            )
            tool += 1
    reason = message.get("stop_reason")
    if isinstance(reason, str):
        stop_sequence = message.get("stop_sequence")
        events.append(
            Finish(
                reason=wire.STOP_TO_CANONICAL.get(reason, "end"),
                stop_sequence=stop_sequence if isinstance(stop_sequence, str) else None,
                native=reason,
            )
        )
    if isinstance(usage, dict):
        events.append(wire.canonical_usage(usage))
    events.append(End())
    return events
