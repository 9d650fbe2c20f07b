"""Gemini's answers → canonical events: ``streamGenerateContent?alt=sse`` chunks and a whole response.

Each SSE event (``data: <GenerateContentResponse>``, lines ended by ``\\r\\n`` as Google writes them, or
``\\n``) is one chunk of the answer: ``candidates[0].content.parts`` carry text, thought summaries
(``thought: true``) and whole function calls (``args`` as an object: one :class:`ToolCallDelta` with its
JSON text), the last chunk a ``finishReason`` and ``usageMetadata``. Gemini's stream has no end marker of
its own, so the chunk with a ``finishReason`` (or a prompt blocked outright, ``promptFeedback.blockReason``)
is the end: a stream that stops before one was cut. Every byte fed comes back once, in the raw bytes of its
event.

Finish reasons: ``STOP`` → ``end`` (``tool_calls`` when the answer called a function: Gemini says STOP
then), ``MAX_TOKENS`` → ``length``, the safety family (``SAFETY``, ``RECITATION``, ``BLOCKLIST``,
``PROHIBITED_CONTENT``, ``SPII``, image ones) → ``content_filter``; others → ``end``, the word kept as
``native``. Usage: ``promptTokenCount`` is the whole prompt (cached included, the seam's convention),
``cachedContentTokenCount`` its cached part, output = ``candidatesTokenCount`` + ``thoughtsTokenCount``
(thinking is billed as output, as OpenAI's ``completion_tokens`` counts reasoning).
"""

from __future__ import annotations

from typing import Any

import orjson

from skyfabric.core.errors import MalformedEvent
from skyfabric.protocols.canonical import (
    End,
    Event,
    Finish,
    ReasoningDelta,
    Start,
    StreamError,
    TextDelta,
    ToolCallDelta,
    Usage,
)

#: Gemini ``finishReason`` → canonical finish reason (anything else: ``end``).
FINISH_TO_CANONICAL: dict[str, str] = {
    "STOP": "end",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
    "IMAGE_PROHIBITED_CONTENT": "content_filter",
    "IMAGE_RECITATION": "content_filter",
    "MODEL_ARMOR": "content_filter",
    "JAILBREAK": "content_filter",
}


class GeminiDecoder:
    """One streamed Gemini answer: bytes in, ``(raw event bytes, canonical events)`` out."""

    def __init__(self) -> None:
        self._buffer = b""
        self._lines: list[bytes] = []
        self._scanned = 0
        self._started = False
        self._ended = False
        self._tools = 0
        self._usage: Usage | None = None

    def feed(self, data: bytes) -> list[tuple[bytes, list[Event]]]:
        """Every event completed by ``data`` (an event ends at a blank line), with its raw bytes."""
        buf = self._buffer + data if self._buffer else data
        out: list[tuple[bytes, list[Event]]] = []
        start = 0
        pos = self._scanned
        while True:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                break
            line = buf[pos:nl]
            if line.endswith(b"\r"):
                line = line[:-1]
            pos = nl + 1
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
        data = [line[5:].lstrip(b" ") if line.startswith(b"data:") else None for line in lines]
        payload = b"\n".join(d for d in data if d is not None)
        if not payload:
            return []  # a comment or a keep-alive
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise MalformedEvent("Gemini event with data that is not JSON") from None
        if isinstance(chunk, list):  # errors come as a JSON array of one status
            chunk = chunk[0] if chunk and isinstance(chunk[0], dict) else {}
        if not isinstance(chunk, dict):
            raise MalformedEvent("Gemini event with data that is not a JSON object")
        return self.chunk(chunk)

    def chunk(self, chunk: dict[str, Any]) -> list[Event]:
        """The canonical events of one ``GenerateContentResponse`` (also a whole one)."""
        error = chunk.get("error")
        if isinstance(error, dict):
            status = str(error.get("status") or "")
            kind = "overloaded_error" if status in ("UNAVAILABLE", "RESOURCE_EXHAUSTED") else "api_error"
            return [StreamError(message=str(error.get("message") or status or "error"), type=kind)]
        if self._ended:
            raise MalformedEvent("a Gemini chunk after the one that finished the answer")
        events: list[Event] = []
        if not self._started:
            self._started = True
            events.append(
                Start(id=str(chunk.get("responseId") or ""), model=str(chunk.get("modelVersion") or ""))
            )
        candidates = chunk.get("candidates")
        finish: Finish | None = None
        if isinstance(candidates, list) and candidates:
            candidate = candidates[0]
            if not isinstance(candidate, dict):
                raise MalformedEvent("a Gemini candidate that is not an object")
            content = candidate.get("content")
            parts = content.get("parts") if isinstance(content, dict) else None
            if isinstance(parts, list):
                for part in parts:
                    events.extend(self._part(part))
            reason = candidate.get("finishReason")
            if isinstance(reason, str) and reason:
                canonical = FINISH_TO_CANONICAL.get(reason, "end")
                if canonical == "end" and self._tools:
                    canonical = "tool_calls"
                finish = Finish(reason=canonical, native=reason)
        else:
            feedback = chunk.get("promptFeedback")
            blocked = feedback.get("blockReason") if isinstance(feedback, dict) else None
            if isinstance(blocked, str) and blocked:
                finish = Finish(reason="content_filter", native=blocked)
        if finish is not None:
            events.append(finish)
        usage = chunk.get("usageMetadata")
        if isinstance(usage, dict):
            self._usage = canonical_usage(usage, self._usage)
            events.append(self._usage)
        if finish is not None:
            self._ended = True
            events.append(End())
        return events

    def _part(self, part: Any) -> list[Event]:
        if not isinstance(part, dict):
            raise MalformedEvent("a Gemini part that is not an object")
        text = part.get("text")
        if isinstance(text, str):
            if not text:
                return []
            return [ReasoningDelta(text)] if part.get("thought") is True else [TextDelta(text)]
        call = part.get("functionCall")
        if isinstance(call, dict):
            index = self._tools
            self._tools += 1
            args = call.get("args")
            ident = call.get("id")
            return [
                ToolCallDelta(
                    index=index,
                    id=str(ident) if isinstance(ident, str) and ident else f"call_{index}",
                    name=str(call.get("name") or ""),
                    arguments=orjson.dumps(args if isinstance(args, dict) else {}).decode(),
                )
            ]
        return []  # executable code, inline images and the like: the seam has no event for them


def canonical_usage(raw: dict[str, Any], known: Usage | None = None) -> Usage:
    """A canonical :class:`Usage` from ``usageMetadata`` (see the module's convention)."""
    prompt = _int(raw.get("promptTokenCount"))
    answer = _int(raw.get("candidatesTokenCount"))
    thoughts = _int(raw.get("thoughtsTokenCount"))
    cached = _int(raw.get("cachedContentTokenCount"))
    output = None if answer is None and thoughts is None else (answer or 0) + (thoughts or 0)
    return Usage(
        input_tokens=prompt if prompt is not None else (known.input_tokens if known else None),
        output_tokens=output if output is not None else (known.output_tokens if known else None),
        cached_input_tokens=cached if cached is not None else (known.cached_input_tokens if known else 0),
    )


def decode_response(body: bytes) -> list[Event]:
    """A whole ``generateContent`` answer as the events its stream would have carried."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise MalformedEvent("Gemini answer is not JSON") from None
    if isinstance(data, list):  # a stream's chunks as one JSON array (streamGenerateContent without alt=sse)
        decoder = GeminiDecoder()
        events: list[Event] = []
        for chunk in data:
            if isinstance(chunk, dict):
                events.extend(decoder.chunk(chunk))
        return events
    if not isinstance(data, dict):
        raise MalformedEvent("Gemini answer is not a JSON object")
    events = GeminiDecoder().chunk(data)
    if not any(isinstance(e, End) for e in events) and not any(isinstance(e, StreamError) for e in events):
        events.append(End())
    return events


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
