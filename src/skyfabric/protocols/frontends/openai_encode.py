"""Canonical events as OpenAI's streamed chunks and whole responses.

The output conforms to OpenAI's published OpenAPI description (``openai/openai-openapi``):
``system_fingerprint`` is a string wherever it appears (the description types it ``string``, never null),
a chat response's ``message`` always has ``content`` and ``refusal`` (both required, nullable), a choice
always has ``logprobs`` and ``finish_reason``. Framing is the gateway's as before: ``data: `` + compact JSON
+ a blank line, ``data: [DONE]`` at the end, an in-band ``{"error": {...}}`` event for a stream that cannot
be finished.

**Segments.** A stream continued on another backend is one stream to the client: the first
:class:`~skyfabric.protocols.canonical.Start` gives every chunk its ``id``, ``created`` and ``model``; a
later ``Start`` (a continuation's) is ignored (no second role chunk). Usage is reported as given: the
relay owns summing it over the backends that served the stream (``gateway/relay.py``,
``_client_usage``), so the encoder never offsets it a second time.

Finish reasons map back: ``end`` and ``stop_sequence`` → ``stop``; ``length``; ``tool_calls``;
``content_filter`` and ``refusal`` → ``content_filter``; ``pause`` (Anthropic's ``pause_turn``: the turn
ended and the client may send it again) → ``stop``. A backend's own OpenAI word (``Finish.native``) wins,
so ``function_call`` survives.

Usage canon: ``Usage.input_tokens`` is every prompt token, cached ones included (OpenAI's
``prompt_tokens``); ``cached_input_tokens`` is ``prompt_tokens_details.cached_tokens``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Any

import orjson

from skyfabric.protocols.canonical import (
    CanonicalRequest,
    Event,
    Finish,
    Logprobs,
    ReasoningDelta,
    Start,
    StreamError,
    TextDelta,
    ToolCallDelta,
    Usage,
)
from skyfabric.protocols.progress import Progress

#: What every chunk and response says as its ``system_fingerprint`` (OpenAI types it a string).
SYSTEM_FINGERPRINT = "fp_skyfabric"

_FINISH = {
    "end": "stop",
    "stop_sequence": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "content_filter": "content_filter",
    "refusal": "content_filter",
    "pause": "stop",
}
_OPENAI_FINISH = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})

_DONE = b"data: [DONE]\n\n"
_END = b"]}\n\n"


def finish_reason(event: Finish) -> str:
    """OpenAI's ``finish_reason`` for a canonical finish."""
    native = event.native
    if native is not None and native in _OPENAI_FINISH:
        return native
    return _FINISH.get(event.reason, "stop")


def usage_object(usage: Usage) -> dict[str, Any]:
    """OpenAI's ``usage`` (``prompt_tokens`` counts cached tokens too, as ``Usage.input_tokens`` does)."""
    prompt = usage.input_tokens or 0
    completion = usage.output_tokens or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": usage.cached_input_tokens},
    }


def _new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


class OpenAIEncoder:
    """One answer's events as ``chat.completion.chunk`` / ``text_completion`` SSE events."""

    __slots__ = (
        "_pending",
        "_prefix",
        "_tools",
        "_usage",
        "chat",
        "include_usage",
        "model",
        "n",
    )

    def __init__(self, request: CanonicalRequest) -> None:
        self.chat = request.protocol != "openai.completions"
        self.include_usage = request.include_usage
        self.n = request.n
        self.model = request.model
        #: The bytes every chunk begins with (``data: {"id":…,"choices":[``), fixed by the first Start.
        self._prefix: bytes | None = None
        #: (choice, tool call index) of the calls already opened (their first delta carried id and name).
        self._tools: set[tuple[int, int]] = set()
        #: Log-probabilities waiting for the text they belong to (the decoder gives them first).
        self._pending: Logprobs | None = None
        self._usage: Usage | None = None

    # -- events -------------------------------------------------------------------------------------------

    def encode(self, event: Event) -> bytes:
        """The SSE bytes for ``event`` (empty for events OpenAI has no place for, or shows at the end)."""
        if type(event) is TextDelta:
            return self._text(event)
        if type(event) is Usage:
            self._usage = event
            return b""
        out = self._flush() if self._pending is not None else b""
        if type(event) is Start:
            return out + self._start(event)
        if type(event) is ToolCallDelta:
            return out + self._tool(event)
        if type(event) is ReasoningDelta:
            if not self.chat or not event.text:
                return out
            return out + self._delta(event.choice, {"reasoning_content": event.text}, None)
        if type(event) is Finish:
            return out + self._delta(event.choice, {} if self.chat else "", None, finish_reason(event))
        if type(event) is Logprobs:
            self._pending = event
            return out
        if type(event) is StreamError:
            return out + self.error(event.message, event.type)
        return out  # End, and what OpenAI cannot show (signatures, redacted thinking)

    def resume(self, progress: Progress) -> None:
        """The client got ``progress`` as an OpenAI backend's own chunks: keep its id, created and model,
        and know the tool calls it has opened (their later deltas carry no id or name)."""
        if self._prefix is None:
            self._open(progress.id, progress.model, progress.created)
        for part in progress.parts:
            if part.kind == "tool":
                self._tools.add((0, part.index))

    def end(self) -> bytes:
        """The usage chunk when the client asked for it, then ``data: [DONE]``."""
        out = self._flush() if self._pending is not None else b""
        if self.include_usage and self._usage is not None:
            usage = orjson.dumps(usage_object(self._usage))
            out += self._opening() + b'],"usage":' + usage + b"}\n\n"
        return out + _DONE

    def error(self, message: str, error_type: str = "api_error", code: str | None = None) -> bytes:
        """An in-band ``{"error": {...}}`` event (``api_error`` is OpenAI's ``server_error``)."""
        kind = "server_error" if error_type == "api_error" else error_type
        payload = orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})
        return b"data: " + payload + b"\n\n"

    # -- pieces -------------------------------------------------------------------------------------------

    def _start(self, event: Start) -> bytes:
        if self._prefix is not None:  # a continuation's: the stream keeps its id and opening
            return b""
        self._open(event.id, event.model, event.created)
        if not self.chat:
            return b""
        role = orjson.dumps(
            [
                {
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                for i in range(self.n)
            ]
        )
        assert self._prefix is not None
        return self._prefix + role[1:-1] + _END

    def _open(self, chunk_id: str | None, model: str | None, created: int | None) -> None:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        head = orjson.dumps(
            {
                "id": chunk_id or _new_id(self.chat),
                "object": obj,
                "created": created if created is not None else int(time.time()),
                "model": model or self.model,
                "system_fingerprint": SYSTEM_FINGERPRINT,
            }
        )
        self._prefix = b"data: " + head[:-1] + b',"choices":['

    def _opening(self) -> bytes:
        if self._prefix is None:
            self._open(None, None, None)
            assert self._prefix is not None
        return self._prefix

    def _delta(self, choice: int, delta: Any, logprobs: Any, reason: str | None = None) -> bytes:
        key = "delta" if self.chat else "text"
        body = orjson.dumps({"index": choice, key: delta, "logprobs": logprobs, "finish_reason": reason})
        return self._opening() + body + _END

    def _text(self, event: TextDelta) -> bytes:
        pending, out = self._pending, b""
        logprobs = None
        if pending is not None:
            if pending.choice == event.choice:
                logprobs, self._pending = pending.content, None
            else:
                out = self._flush()
        delta: Any = {"content": event.text} if self.chat else event.text
        return out + self._delta(event.choice, delta, logprobs)

    def _flush(self) -> bytes:
        """Log-probabilities with no text after them, sent on their own."""
        pending, self._pending = self._pending, None
        assert pending is not None
        return self._delta(pending.choice, {} if self.chat else "", pending.content)

    def _tool(self, event: ToolCallDelta) -> bytes:
        if not self.chat:
            return b""
        call: dict[str, Any] = {"index": event.index}
        key = (event.choice, event.index)
        if key not in self._tools:
            self._tools.add(key)
            call["id"] = event.id or "call_" + uuid.uuid4().hex[:24]
            call["type"] = "function"
            call["function"] = {"name": event.name or "", "arguments": event.arguments}
        else:
            call["function"] = {"arguments": event.arguments}
        return self._delta(event.choice, {"tool_calls": [call]}, None)


def response(request: CanonicalRequest, events: Iterable[Event]) -> bytes:
    """A whole ``chat.completion`` / ``text_completion`` body from one answer's events."""
    chat = request.protocol != "openai.completions"
    start: Start | None = None
    texts: dict[int, list[str]] = {0: []}
    reasoning: dict[int, list[str]] = {}
    calls: dict[int, dict[int, dict[str, Any]]] = {}
    logprobs: dict[int, Any] = {}
    finishes: dict[int, str] = {}
    usage: Usage | None = None
    for event in events:
        if isinstance(event, TextDelta):
            texts.setdefault(event.choice, []).append(event.text)
        elif isinstance(event, ToolCallDelta):
            texts.setdefault(event.choice, [])
            call = calls.setdefault(event.choice, {}).setdefault(
                event.index,
                {"id": event.id, "type": "function", "function": {"name": event.name, "arguments": ""}},
            )
            call["id"] = call["id"] or event.id
            call["function"]["name"] = call["function"]["name"] or event.name
            call["function"]["arguments"] += event.arguments
        elif isinstance(event, ReasoningDelta):
            texts.setdefault(event.choice, [])
            reasoning.setdefault(event.choice, []).append(event.text)
        elif isinstance(event, Logprobs):
            logprobs[event.choice] = _merge_logprobs(logprobs.get(event.choice), event.content)
        elif isinstance(event, Finish):
            texts.setdefault(event.choice, [])
            finishes[event.choice] = finish_reason(event)
        elif isinstance(event, Usage):
            usage = event
        elif isinstance(event, Start) and start is None:
            start = event
    choices: list[dict[str, Any]] = []
    for index in sorted(texts):
        text = "".join(texts[index])
        reason = finishes.get(index, "stop")
        if not chat:
            choices.append(
                {"index": index, "text": text, "logprobs": logprobs.get(index), "finish_reason": reason}
            )
            continue
        tool_calls = [
            {
                **c,
                "id": c["id"] or "call_" + uuid.uuid4().hex[:24],
                "function": {**c["function"], "name": c["function"]["name"] or ""},
            }
            for _, c in sorted(calls.get(index, {}).items())
        ]
        message: dict[str, Any] = {
            "role": "assistant",
            "content": None if tool_calls and not text else text,
            "refusal": None,
        }
        if index in reasoning:
            message["reasoning_content"] = "".join(reasoning[index])
        if tool_calls:
            message["tool_calls"] = tool_calls
        choices.append(
            {"index": index, "message": message, "logprobs": logprobs.get(index), "finish_reason": reason}
        )
    body: dict[str, Any] = {
        "id": start.id if start is not None else _new_id(chat),
        "object": "chat.completion" if chat else "text_completion",
        "created": start.created if start is not None and start.created is not None else int(time.time()),
        "model": start.model if start is not None and start.model else request.model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = usage_object(usage)
    return orjson.dumps(body)


def _merge_logprobs(have: Any, more: Any) -> Any:
    """Log-probabilities of consecutive pieces as one object (lists concatenated, key by key)."""
    if not isinstance(have, dict) or not isinstance(more, dict):
        return more if have is None else have
    merged = dict(have)
    for key, value in more.items():
        old = merged.get(key)
        merged[key] = old + value if isinstance(old, list) and isinstance(value, list) else value
    return merged
