"""Canonical events → Anthropic's streaming events, byte for byte as Anthropic frames them.

The stream an Anthropic client expects: ``message_start`` (a whole Message with empty content), then per
content block ``content_block_start`` / ``content_block_delta`` ... / ``content_block_stop`` with running
indices, then one ``message_delta`` (stop reason and usage) and ``message_stop``. Canonical events carry no
block boundaries, so the encoder opens a block at the first delta of a new part and closes the previous
one. It is a small state machine with no I/O: each call returns the bytes to send now.

Two things are deferred on purpose. ``message_start`` waits for the first thing worth sending (content, a
finish, the end), so the input usage that an Anthropic backend reports beside its ``Start`` is in it, and
a backend that fails before its first token has sent the client nothing. ``message_delta`` waits for
:meth:`AnthropicEncoder.end`: OpenAI-compatible backends report usage after their finish reason.
"""

from __future__ import annotations

import os
import re

from skyfabric.protocols import anthropic_wire as wire
from skyfabric.protocols.canonical import (
    CanonicalRequest,
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
from skyfabric.protocols.progress import Progress

_NOT_ID = re.compile(r"[^A-Za-z0-9_-]")


def message_id(raw: str | None) -> str:
    """An Anthropic message id: ``raw`` if it is one, else ``msg_`` + ``raw``'s id characters (or random)."""
    if raw and raw.startswith("msg_"):
        return raw
    tail = _NOT_ID.sub("", raw or "")
    return "msg_" + (tail or os.urandom(12).hex())


def tool_id(raw: str | None) -> str:
    """A tool_use id Anthropic accepts back (``^[a-zA-Z0-9_-]+$``): ``raw`` cleaned, or a fresh ``toolu_``."""
    tail = _NOT_ID.sub("_", raw or "")
    return tail or "toolu_" + os.urandom(12).hex()


class AnthropicEncoder:
    """One streamed answer in Anthropic's events; choice 0 only (Anthropic has no ``n``)."""

    def __init__(self, request: CanonicalRequest) -> None:
        self._request = request
        self._id: str | None = None
        self._model: str | None = None
        self._started = False  # message_start sent
        self._ended = False  # message_stop or an error sent
        self._index = -1  # index of the last block opened
        self._open: str | None = None  # kind of the open block: text, thinking, tool_use
        self._signed = False  # the open thinking block has its signature (it is complete)
        self._tool: int | None = None  # canonical index of the open tool call
        self._finish: Finish | None = None
        self._usage: Usage | None = None
        #: The client already has the message_delta (it passed through): only message_stop is left.
        self._delta_sent = False

    def encode(self, event: Event) -> bytes:
        """The bytes for ``event`` now (often none: see the module's notes)."""
        if self._ended:
            return b""
        if isinstance(event, TextDelta):
            if event.choice != 0 or not event.text:
                return b""
            out = self._begin("text") if self._open != "text" else b""
            return out + self._delta({"type": "text_delta", "text": event.text})
        if isinstance(event, ToolCallDelta):
            if event.choice != 0:
                return b""
            out = b""
            if self._open != "tool_use" or self._tool != event.index:
                out = self._begin("tool_use", event)
                self._tool = event.index
            if event.arguments:
                out += self._delta({"type": "input_json_delta", "partial_json": event.arguments})
            return out
        if isinstance(event, ReasoningDelta):
            if event.choice != 0 or not event.text:
                return b""
            out = self._begin("thinking") if self._open != "thinking" or self._signed else b""
            return out + self._delta({"type": "thinking_delta", "thinking": event.text})
        if isinstance(event, ReasoningSignature):
            if event.choice != 0:
                return b""
            out = self._begin("thinking") if self._open != "thinking" or self._signed else b""
            self._signed = True
            return out + self._delta({"type": "signature_delta", "signature": event.signature})
        if isinstance(event, RedactedReasoning):
            if event.choice != 0:
                return b""
            out = self._begin("redacted_thinking", data=event.data)
            return out + self._close()
        if isinstance(event, PartStart):
            if event.choice != 0:
                return b""
            return self._begin("thinking" if event.kind == "reasoning" else "text")
        if isinstance(event, PartEnd):
            return self._close() if event.choice == 0 else b""
        if isinstance(event, Finish):
            if event.choice != 0:
                return b""
            self._finish = event
            return self._begin_message() + self._close()
        if isinstance(event, Usage):
            self._usage = event
            return b""
        if isinstance(event, Start):
            if self._id is None:
                self._id, self._model = event.id, event.model
            return b""
        if isinstance(event, StreamError):
            return self.error(event.message, event.type)
        if isinstance(event, End):
            return b""  # the gateway calls end() once the answer is whole
        return b""  # logprobs: Anthropic has none

    def resume(self, progress: Progress) -> None:
        """The client got ``progress`` as an Anthropic backend's own events: go on in the same message.

        ``message_start`` was sent; each part was one content block, in order, so the open block is the
        last part's, at index ``len(parts) - 1`` (a signed thinking block or a redacted one is closed).
        """
        self._id = self._id or progress.id
        self._model = self._model or progress.model
        self._started = True
        self._index = len(progress.parts) - 1
        last = progress.open_part
        if progress.finish is not None:
            # The finish came in Anthropic's message_delta, which the client already has: every block is
            # closed and only message_stop is missing.
            self._finish, self._delta_sent = progress.finish, True
        if last is None or last.kind == "redacted" or last.closed or progress.finish is not None:
            self._open, self._tool = None, None
            return
        self._open = {"text": "text", "reasoning": "thinking", "tool": "tool_use"}[last.kind]
        self._signed = last.signature is not None
        self._tool = last.index if last.kind == "tool" else None

    def end(self) -> bytes:
        """``message_delta`` (stop reason, usage) and ``message_stop``; nothing the second time."""
        if self._ended:
            return b""
        if self._delta_sent:
            self._ended = True
            return wire.sse("message_stop", {"type": "message_stop"})
        out = self._begin_message() + self._close()
        self._ended = True
        finish = self._finish
        usage = wire.anthropic_usage(self._usage)
        delta_usage: dict[str, int] = {"output_tokens": usage["output_tokens"]}
        if self._usage is not None and self._usage.input_tokens is not None:
            # Cumulative like Anthropic's own: input known only at the end (OpenAI backends) still lands.
            delta_usage = {**usage}
        return (
            out
            + wire.sse(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {
                        "stop_reason": wire.stop_reason(finish.reason, finish.native)
                        if finish
                        else "end_turn",
                        "stop_sequence": finish.stop_sequence if finish else None,
                    },
                    "usage": delta_usage,
                },
            )
            + wire.sse("message_stop", {"type": "message_stop"})
        )

    def error(self, message: str, error_type: str = "api_error", code: str | None = None) -> bytes:
        """An ``event: error`` with Anthropic's error object; the stream ends with it."""
        if self._ended:
            return b""
        self._ended = True
        return wire.sse("error", wire.error_json(message, wire.error_type(error_type)))

    # -- blocks -------------------------------------------------------------------------------------------

    def _begin_message(self) -> bytes:
        if self._started:
            return b""
        self._started = True
        usage = wire.anthropic_usage(self._usage)
        return wire.sse(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": message_id(self._id),
                    "type": "message",
                    "role": "assistant",
                    "model": self._model or self._request.model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": usage,
                },
            },
        )

    def _begin(self, kind: str, tool: ToolCallDelta | None = None, data: str = "") -> bytes:
        """Close the open block and open a ``kind`` block at the next index."""
        out = self._begin_message() + self._close()
        self._index += 1
        self._open, self._signed, self._tool = kind, False, None
        block: dict[str, object]
        if kind == "text":
            block = {"type": "text", "text": ""}
        elif kind == "thinking":
            block = {"type": "thinking", "thinking": "", "signature": ""}
        elif kind == "redacted_thinking":
            block = {"type": "redacted_thinking", "data": data}
        else:
            assert tool is not None
            block = {"type": "tool_use", "id": tool_id(tool.id), "name": tool.name or "", "input": {}}
        return out + wire.sse(
            "content_block_start",
            {"type": "content_block_start", "index": self._index, "content_block": block},
        )

    def _delta(self, delta: dict[str, object]) -> bytes:
        return wire.sse(
            "content_block_delta", {"type": "content_block_delta", "index": self._index, "delta": delta}
        )

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        self._open, self._tool = None, None
        return wire.sse("content_block_stop", {"type": "content_block_stop", "index": self._index})
