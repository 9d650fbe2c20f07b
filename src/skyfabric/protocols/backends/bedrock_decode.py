"""Bedrock answers → canonical events: ConverseStream and InvokeModelWithResponseStream frames, and the
whole (non-streamed) Converse answer.

Both streams are AWS event-stream frames (:mod:`~skyfabric.protocols.backends.bedrock_eventstream`):

- **ConverseStream**: ``:event-type`` ``messageStart``, ``contentBlockStart`` (a tool call's id and name),
  ``contentBlockDelta`` (``text``, ``toolUse.input`` JSON pieces, ``reasoningContent`` text / signature /
  redacted bytes), ``contentBlockStop``, ``messageStop`` (the stop reason) and last ``metadata`` (usage):
  the answer ends at ``metadata``, so usage is inside it.
- **InvokeModelWithResponseStream**: ``chunk`` frames whose ``bytes`` (base64) hold one of Anthropic's JSON
  events each: decoded by the Anthropic decoder, so Claude's blocks mean the same on both vendors.

A frame of ``:message-type`` ``exception`` (``throttlingException``, ``modelStreamErrorException``,
``serviceUnavailableException``, ``validationException``, ...) or ``error`` is a :class:`StreamError`:
the relay then continues the stream elsewhere. Every frame's raw bytes come back with its events (no
client speaks this protocol, so they are never passed through; they keep the decoder's contract).
Payload fields this code does not know (the service pads each event with a ``p`` field) are ignored.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from typing import Any

import orjson

from skyfabric.core.errors import MalformedEvent
from skyfabric.protocols.backends.anthropic_decoder import AnthropicDecoder
from skyfabric.protocols.backends.bedrock_eventstream import Frame, FrameReader
from skyfabric.protocols.canonical import (
    End,
    Event,
    Finish,
    ReasoningDelta,
    ReasoningSignature,
    RedactedReasoning,
    Start,
    StreamError,
    TextDelta,
    ToolCallDelta,
    Usage,
)

#: Converse ``stopReason`` → canonical finish reason.
STOP_TO_CANONICAL: dict[str, str] = {
    "end_turn": "end",
    "stop_sequence": "stop_sequence",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "guardrail_intervened": "content_filter",
    "content_filtered": "content_filter",
    "model_context_window_exceeded": "length",
    "malformed_model_output": "end",
    "malformed_tool_use": "end",
}

#: An exception frame's type → the error type of the client's in-band error.
EXCEPTION_TYPES: dict[str, str] = {
    "throttlingException": "rate_limit_error",
    "serviceUnavailableException": "overloaded_error",
    "modelNotReadyException": "overloaded_error",
    "modelTimeoutException": "timeout_error",
    "modelStreamErrorException": "api_error",
    "internalServerException": "api_error",
    "validationException": "invalid_request_error",
}


def _answer_id() -> str:
    """Converse answers carry no message id: one of the shape clients expect."""
    return "msg_bdrk_" + uuid.uuid4().hex[:24]


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise MalformedEvent(f"Bedrock {what} is not JSON") from None
    if not isinstance(payload, dict):
        raise MalformedEvent(f"Bedrock {what} is not a JSON object")
    return payload


def stream_error(frame: Frame) -> StreamError:
    """An ``exception`` or ``error`` frame as the in-band error it is."""
    if frame.message_type == "error":
        message = str(frame.headers.get(":error-message", ""))
    else:
        try:
            payload = orjson.loads(frame.payload) if frame.payload else {}
        except orjson.JSONDecodeError:
            payload = {}
        message = str(payload.get("message", "")) if isinstance(payload, dict) else ""
    return StreamError(message=f"{frame.kind}: {message}", type=EXCEPTION_TYPES.get(frame.kind, "api_error"))


def converse_usage(raw: Any) -> Usage:
    """Converse's ``usage``; canonical input counts the whole prompt (Converse's ``inputTokens`` leaves out
    cache reads and writes, as Anthropic's does)."""
    if not isinstance(raw, dict):
        return Usage()
    read = _int(raw.get("cacheReadInputTokens")) or 0
    written = _int(raw.get("cacheWriteInputTokens")) or 0
    uncached = _int(raw.get("inputTokens"))
    return Usage(
        input_tokens=None if uncached is None else uncached + read + written,
        output_tokens=_int(raw.get("outputTokens")),
        cached_input_tokens=read,
        cache_creation_input_tokens=written,
    )


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _finish(reason: Any) -> Finish:
    native = str(reason or "end_turn")
    return Finish(reason=STOP_TO_CANONICAL.get(native, "end"), native=native)


class ConverseDecoder:
    """One ConverseStream answer: bytes in, ``(raw frame bytes, canonical events)`` out."""

    def __init__(self) -> None:
        self._frames = FrameReader()
        self._started = False
        self._blocks: dict[int, str] = {}  # open block index → text | tool | reasoning
        self._tools: dict[int, int] = {}  # block index → canonical tool call index

    def feed(self, data: bytes) -> list[tuple[bytes, list[Event]]]:
        """Every frame completed by ``data``, with its raw bytes."""
        return [(frame.raw, self.frame(frame)) for frame in self._frames.feed(data)]

    def frame(self, frame: Frame) -> list[Event]:
        """The canonical events of one frame."""
        if frame.message_type != "event":
            return [stream_error(frame)]
        kind = frame.kind
        payload = _json(frame.payload, f"{kind} event")
        if kind == "messageStart":
            if self._started:
                raise MalformedEvent("a second messageStart")
            self._started = True
            return [Start(id=_answer_id(), model="")]
        if not self._started and kind in ("contentBlockStart", "contentBlockDelta", "messageStop"):
            raise MalformedEvent(f"{kind} before messageStart")
        if kind == "contentBlockStart":
            return self._block_start(payload)
        if kind == "contentBlockDelta":
            return self._block_delta(payload)
        if kind == "contentBlockStop":
            self._blocks.pop(_index(payload), None)
            return []
        if kind == "messageStop":
            return [_finish(payload.get("stopReason"))]
        if kind == "metadata":
            return [converse_usage(payload.get("usage")), End()]
        return []  # event types newer than this code

    def _block_start(self, payload: dict[str, Any]) -> list[Event]:
        index = _index(payload)
        start = payload.get("start")
        tool = start.get("toolUse") if isinstance(start, dict) else None
        if not isinstance(tool, dict):
            return []  # a kind of block the seam does not read (server tool results, images)
        if index in self._blocks:
            raise MalformedEvent(f"contentBlockStart for block {index}, which is already open")
        self._blocks[index] = "tool"
        number = self._tools[index] = len(self._tools)
        return [
            ToolCallDelta(index=number, id=str(tool.get("toolUseId") or ""), name=str(tool.get("name") or ""))
        ]

    def _block_delta(self, payload: dict[str, Any]) -> list[Event]:
        index = _index(payload)
        delta = payload.get("delta")
        if not isinstance(delta, dict):
            raise MalformedEvent("contentBlockDelta without a delta")
        kind = self._blocks.get(index)
        if "text" in delta:
            self._expect(index, kind, "text")
            return [TextDelta(str(delta["text"]))] if delta["text"] else []
        if "toolUse" in delta:
            if kind != "tool":
                raise MalformedEvent(f"a toolUse delta for block {index}, which is not a tool call")
            piece = delta["toolUse"].get("input") if isinstance(delta["toolUse"], dict) else None
            return [ToolCallDelta(index=self._tools[index], arguments=piece)] if piece else []
        reasoning = delta.get("reasoningContent")
        if isinstance(reasoning, dict):
            self._expect(index, kind, "reasoning")
            if isinstance(reasoning.get("text"), str):
                return [ReasoningDelta(reasoning["text"])] if reasoning["text"] else []
            if isinstance(reasoning.get("signature"), str):
                return [ReasoningSignature(reasoning["signature"])]
            if isinstance(reasoning.get("redactedContent"), str):
                return [RedactedReasoning(reasoning["redactedContent"])]
        return []  # citations and other deltas the seam keeps none of

    def _expect(self, index: int, kind: str | None, wanted: str) -> None:
        if kind is None:
            self._blocks[index] = wanted  # text and reasoning blocks open with their first delta
        elif kind != wanted:
            raise MalformedEvent(f"a {wanted} delta in block {index}, a {kind} block")


def _index(payload: dict[str, Any]) -> int:
    index = payload.get("contentBlockIndex")
    if not isinstance(index, int) or isinstance(index, bool):
        raise MalformedEvent("a content block event without a contentBlockIndex")
    return index


class InvokeDecoder:
    """One InvokeModelWithResponseStream answer of a Claude model: Anthropic's events inside ``chunk``s."""

    def __init__(self) -> None:
        self._frames = FrameReader()
        self._anthropic = AnthropicDecoder()

    def feed(self, data: bytes) -> list[tuple[bytes, list[Event]]]:
        """Every frame completed by ``data``, with its raw bytes."""
        return [(frame.raw, self.frame(frame)) for frame in self._frames.feed(data)]

    def frame(self, frame: Frame) -> list[Event]:
        """The canonical events of one frame."""
        if frame.message_type != "event":
            return [stream_error(frame)]
        if frame.kind != "chunk":
            return []
        part = _json(frame.payload, "chunk")
        try:
            inner = base64.b64decode(str(part.get("bytes") or ""), validate=True)
        except (binascii.Error, ValueError):
            raise MalformedEvent("Bedrock chunk whose bytes are not base64") from None
        payload = _json(inner, "chunk's Anthropic event")
        kind = payload.get("type")
        return self._anthropic.event(kind if isinstance(kind, str) else "", payload)


def decode_converse(body: bytes | dict[str, Any]) -> list[Event]:
    """A whole Converse answer (its bytes, or parsed) as the events its stream would have carried."""
    answer = body if isinstance(body, dict) else _json(body, "answer")
    output = answer.get("output")
    message = output.get("message") if isinstance(output, dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        raise MalformedEvent("Bedrock Converse answer without output.message.content")
    events: list[Event] = [Start(id=_answer_id(), model="")]
    tool = 0
    for block in content:
        if not isinstance(block, dict):
            raise MalformedEvent("Bedrock Converse answer with a content block that is not an object")
        if isinstance(block.get("text"), str) and block["text"]:
            events.append(TextDelta(block["text"]))
        elif isinstance(block.get("toolUse"), dict):
            use = block["toolUse"]
            given = use.get("input")
            events.append(
                ToolCallDelta(
                    index=tool,
                    id=str(use.get("toolUseId") or ""),
                    name=str(use.get("name") or ""),
                    arguments=orjson.dumps(given if isinstance(given, dict) else {}).decode(),
                )
            )
            tool += 1
        elif isinstance(block.get("reasoningContent"), dict):
            reasoning = block["reasoningContent"]
            text = reasoning.get("reasoningText")
            if isinstance(text, dict):
                if text.get("text"):
                    events.append(ReasoningDelta(str(text["text"])))
                if text.get("signature"):
                    events.append(ReasoningSignature(str(text["signature"])))
            elif isinstance(reasoning.get("redactedContent"), str):
                events.append(RedactedReasoning(reasoning["redactedContent"]))
    events.append(_finish(answer.get("stopReason")))
    events.append(converse_usage(answer.get("usage")))
    events.append(End())
    return events
