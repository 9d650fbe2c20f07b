"""Server-sent events as OpenAI and vLLM stream them: split into events, read what failover needs.

The relay forwards each event's bytes untouched while it is on the first backend; it only parses the
JSON to learn what the client has seen so far (text, finish reason, usage), which is exactly what a
continuation on another backend needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from skyfabric.core.errors import MalformedEvent

DONE = object()


class EventSplitter:
    """Turns arbitrary byte pieces into complete SSE events (without the blank-line terminator)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf + data if self._buf else data
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        parts = buf.split(b"\n\n")
        self._buf = parts.pop()
        return [p for p in parts if p]

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet terminated."""
        return self._buf


def event_data(event: bytes) -> bytes | None:
    """The ``data:`` payload of an event, or None for a comment/keep-alive event."""
    lines = event.split(b"\n")
    if len(lines) == 1:
        line = lines[0]
        if line.startswith(b"data:"):
            return line[5:].lstrip(b" ")
        return None
    data = [ln[5:].lstrip(b" ") for ln in lines if ln.startswith(b"data:")]
    return b"\n".join(data) if data else None


def parse_event(event: bytes) -> Any:
    """The event's JSON object, :data:`DONE` for ``[DONE]``, or None for comments."""
    data = event_data(event)
    if data is None:
        return None
    if data == b"[DONE]":
        return DONE
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise MalformedEvent(f"upstream sent an event that is not JSON: {data[:80]!r}") from exc
    if not isinstance(obj, dict):
        raise MalformedEvent("upstream sent an event that is not a JSON object")
    return obj


@dataclass(slots=True)
class StreamProgress:
    """What the client has been sent of one stream: enough to continue it elsewhere, or to know it can't.

    Only choice 0's text is tracked. Anything the relay cannot reproduce in a continuation — another
    choice (``n > 1``), tool-call or reasoning deltas, log-probabilities — sets :attr:`blocker`.
    Tokens are counted from the backend's ``usage`` (sent in every chunk when the backend was asked for
    ``continuous_usage_stats``), never from chunks: one chunk may carry several tokens.
    """

    kind: str  # "chat" or "completions"
    id: str | None = None
    created: int | None = None
    text: list[str] = field(default_factory=list)
    #: Chunks with text, over all segments (for logs; not a token count).
    chunks: int = 0
    #: Of the current backend's part: chunks with text, and its completion tokens as its usage says.
    seg_chunks: int = 0
    seg_tokens: int | None = None
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    sent_role: bool = False
    #: Why this stream cannot be continued exactly, when something seen in it says so.
    blocker: str | None = None

    def observe(self, obj: dict[str, Any]) -> bool:
        """Record one chunk; returns True when it carries content or a finish (a 'token' event)."""
        if self.id is None:
            self.id = obj.get("id")
            self.created = obj.get("created")
        usage = obj.get("usage")
        if usage:
            if not isinstance(usage, dict):
                raise MalformedEvent("upstream usage is not an object")
            self.usage = usage
            completion = usage.get("completion_tokens")
            if isinstance(completion, int):
                self.seg_tokens = completion
        choices = obj.get("choices") or []
        if not choices:
            return False
        token = False
        for choice in choices:
            if not isinstance(choice, dict):
                raise MalformedEvent("upstream chunk has a choice that is not an object")
            if choice.get("index", 0) != 0:
                self.blocker = "several choices"
                token = True
                continue
            piece: Any
            if self.kind == "chat":
                delta = choice.get("delta") or {}
                if delta.get("role"):
                    self.sent_role = True
                piece = delta.get("content")
                if delta.get("tool_calls") or delta.get("function_call"):
                    self.blocker, token = "tool calls", True
                if delta.get("reasoning_content") or delta.get("reasoning"):
                    self.blocker, token = "reasoning", True
            else:
                piece = choice.get("text")
            if choice.get("logprobs"):
                self.blocker = "logprobs"
            if piece:
                if not isinstance(piece, str):
                    raise MalformedEvent("upstream chunk content is not a string")
                self.text.append(piece)
                self.chunks += 1
                self.seg_chunks += 1
                token = True
            reason = choice.get("finish_reason")
            if reason:
                self.finish_reason = reason
                token = True
        return token

    def new_segment(self) -> None:
        """Another backend takes over: its usage counts from zero."""
        self.seg_chunks = 0
        self.seg_tokens = None

    @property
    def segment_tokens(self) -> int | None:
        """Completion tokens of the current backend's part, exactly, or None when not known."""
        if self.seg_tokens is not None:
            return self.seg_tokens
        return 0 if self.seg_chunks == 0 else None

    @property
    def content(self) -> str:
        return "".join(self.text)
