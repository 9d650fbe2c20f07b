"""OpenAI-compatible server-sent events (and whole responses) decoded into canonical events.

The decoder runs on every chunk of every stream, the passed-through ones included, so it is written for
speed: events are found with ``bytes.find`` (each event's raw bytes are one slice, its terminator
included), the common ``data: {...}`` event is recognised without splitting lines, and one
``orjson.loads`` per event is all the parsing done.

Mapping: the first chunk's ``id``, ``model`` and ``created`` give a :class:`Start`; ``delta.content`` (or a
completion's ``text``) a :class:`TextDelta`; ``reasoning_content`` (vLLM, SGLang, llama.cpp, DeepSeek) or
``reasoning`` (newer vLLM) a :class:`ReasoningDelta`; ``tool_calls`` pieces (and the legacy
``function_call``, as call 0) :class:`ToolCallDelta` s; a ``refusal`` text a :class:`TextDelta`;
``logprobs`` a :class:`Logprobs` ahead of the text it scores; ``finish_reason`` a :class:`Finish` —
``stop`` is ``end``, unless the engine names the stop string it matched (vLLM's ``stop_reason``), then
``stop_sequence``; ``function_call`` is ``tool_calls``; unknown words are ``end`` with the word kept in
``native``; ``usage`` a :class:`Usage` after the chunk's other events; ``data: [DONE]`` an :class:`End`;
an ``{"error": ...}`` event a :class:`StreamError`. Comments (keep-alives) are not returned at all: the
gateway sends its own heartbeat. Anything else that is not OpenAI's framing raises
:class:`~skyfabric.core.errors.MalformedEvent`.
"""

from __future__ import annotations

from typing import Any

import orjson

from skyfabric.core.errors import MalformedEvent
from skyfabric.protocols.canonical import (
    End,
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

_REASONS = {
    "stop": "end",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
}
_DONE = b"[DONE]"


def finish(native: str, choice: int, stop_reason: Any) -> Finish:
    """The canonical finish for OpenAI's ``finish_reason`` (``stop_reason``: vLLM's matched stop)."""
    if native == "stop" and type(stop_reason) is str:
        return Finish("stop_sequence", choice, stop_sequence=stop_reason, native=native)
    return Finish(_REASONS.get(native, "end"), choice, native=native)


def _count(value: Any) -> int | None:
    """A token count as the backend gave it, if it is one (a hostile ``"2"`` or ``-1`` is not)."""
    return value if type(value) is int and value >= 0 else None


def usage(obj: Any) -> Usage:
    """OpenAI's ``usage`` object as canonical usage (cached prompt tokens included in ``input_tokens``)."""
    if type(obj) is not dict:
        raise MalformedEvent("upstream usage is not an object")
    details = obj.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if type(details) is dict else None
    return Usage(_count(obj.get("prompt_tokens")), _count(obj.get("completion_tokens")), _count(cached) or 0)


def stream_error(error: Any) -> StreamError:
    """An in-band ``{"error": ...}`` (an object with a message, or vLLM's bare string)."""
    if isinstance(error, dict):
        return StreamError(str(error.get("message") or error), str(error.get("type") or "api_error"))
    return StreamError(str(error))


class OpenAIDecoder:
    """Splits one upstream stream into events; see the module's doc for the mapping."""

    __slots__ = ("_buf", "_started")

    def __init__(self) -> None:
        self._buf = b""
        self._started = False

    def feed(self, data: bytes) -> list[tuple[bytes, list[Event]]]:
        """Each complete event's raw bytes (with its blank line) and its canonical events."""
        buf = self._buf + data if self._buf else data
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        out: list[tuple[bytes, list[Event]]] = []
        start = 0
        find = buf.find
        while True:
            end = find(b"\n\n", start)
            if end < 0:
                break
            if end > start:
                raw = buf[start : end + 2]
                if raw.startswith(b"data: ") and buf.find(b"\n", start + 6, end) < 0:
                    payload: bytes | None = raw[6:-2]  # the common one-line event
                else:
                    payload = _payload(raw)
                if payload is not None:
                    try:
                        out.append((raw, self._decode(payload)))
                    except MalformedEvent as exc:
                        # the events before the bad one were sent whole: the relay still takes them
                        exc.decoded = out  # type: ignore[attr-defined]
                        self._buf = b""
                        raise
            start = end + 2
        self._buf = buf[start:] if start else buf
        return out

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet terminated."""
        return self._buf

    def _decode(self, payload: bytes) -> list[Event]:
        if payload == _DONE:
            return [End()]
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise MalformedEvent(f"upstream sent an event that is not JSON: {payload[:80]!r}") from None
        if type(obj) is not dict:
            raise MalformedEvent("upstream sent an event that is not a JSON object")
        get = obj.get
        if "error" in obj and "choices" not in obj:
            return [stream_error(obj["error"])]
        events: list[Event] = []
        if not self._started:
            self._started = True
            created = get("created")
            events.append(
                Start(
                    str(get("id") or ""), str(get("model") or ""), created if type(created) is int else None
                )
            )
        choices = get("choices")
        if choices:
            if type(choices) is not list:
                raise MalformedEvent("upstream choices are not an array")
            for choice in choices:
                _choice(choice, events)
        used = get("usage")
        if used:
            if type(used) is dict and "prompt_tokens_details" not in used:  # inline: once per chunk on vLLM
                events.append(Usage(_count(used.get("prompt_tokens")), _count(used.get("completion_tokens"))))
            else:
                events.append(usage(used))
        return events


def _payload(raw: bytes) -> bytes | None:
    """The ``data:`` payload of one event (terminator included in ``raw``), or None for a comment."""
    data = [line[5:].lstrip(b" ") for line in raw[:-2].split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(data) if data else None


def _choice(choice: Any, events: list[Event]) -> None:
    if type(choice) is not dict:
        raise MalformedEvent("upstream chunk has a choice that is not an object")
    get = choice.get
    index = get("index", 0)
    if type(index) is not int:
        raise MalformedEvent("upstream choice index is not an integer")
    logprobs = get("logprobs")
    if logprobs:
        events.append(Logprobs(logprobs, index))
    delta = get("delta")
    if delta is not None:
        if type(delta) is not dict:
            raise MalformedEvent("upstream delta is not an object")
        if len(delta) == 1 and type(content := delta.get("content")) is str:  # most chunks: text only
            if content:
                events.append(TextDelta(content, index))
        elif delta:
            _delta(delta, index, events)
    else:
        text = get("text")
        if text:
            if type(text) is not str:
                raise MalformedEvent("upstream chunk text is not a string")
            events.append(TextDelta(text, index))
    reason = get("finish_reason")
    if reason:
        events.append(finish(str(reason), index, get("stop_reason")))


def _delta(delta: dict[str, Any], index: int, events: list[Event]) -> None:
    get = delta.get
    reasoning = get("reasoning_content") or get("reasoning")
    if reasoning:
        if type(reasoning) is not str:
            raise MalformedEvent("upstream reasoning is not a string")
        events.append(ReasoningDelta(reasoning, index))
    content = get("content")
    if content:
        if type(content) is not str:
            raise MalformedEvent("upstream chunk content is not a string")
        events.append(TextDelta(content, index))
    refusal = get("refusal")
    if refusal and type(refusal) is str:
        events.append(TextDelta(refusal, index))
    calls = get("tool_calls")
    if calls:
        if type(calls) is not list:
            raise MalformedEvent("upstream tool_calls are not an array")
        for call in calls:
            if type(call) is not dict:
                raise MalformedEvent("upstream tool call is not an object")
            events.append(_call(call.get("index", 0), call.get("id"), call.get("function"), index))
    legacy = get("function_call")
    if legacy:
        events.append(_call(0, None, legacy, index))


def _call(position: Any, call_id: Any, function: Any, choice: int) -> ToolCallDelta:
    if type(position) is not int:
        raise MalformedEvent("upstream tool call index is not an integer")
    if function is None:
        function = {}
    elif type(function) is not dict:
        raise MalformedEvent("upstream tool call function is not an object")
    arguments = function.get("arguments") or ""
    name = function.get("name")
    if type(arguments) is not str or (name is not None and type(name) is not str):
        raise MalformedEvent("upstream tool call arguments or name are not strings")
    return ToolCallDelta(position, arguments, call_id if type(call_id) is str else None, name, choice)


def decode_response(body: bytes) -> list[Event]:
    """A whole ``chat.completion`` / ``text_completion`` body as events (tool calls whole)."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise MalformedEvent(f"upstream sent a response that is not JSON: {body[:80]!r}") from None
    if type(obj) is not dict:
        raise MalformedEvent("upstream sent a response that is not a JSON object")
    if "error" in obj and "choices" not in obj:
        return [stream_error(obj["error"])]
    created = obj.get("created")
    events: list[Event] = [
        Start(
            str(obj.get("id") or ""), str(obj.get("model") or ""), created if type(created) is int else None
        )
    ]
    choices = obj.get("choices") or []
    if type(choices) is not list:
        raise MalformedEvent("upstream choices are not an array")
    for choice in choices:
        if type(choice) is not dict:
            raise MalformedEvent("upstream response has a choice that is not an object")
        message = choice.get("message")
        if message is None:
            _choice(choice, events)  # a completion: text, logprobs and finish as in a chunk
            continue
        if type(message) is not dict:
            raise MalformedEvent("upstream message is not an object")
        calls = message.get("tool_calls")
        if type(calls) is list:  # whole calls carry no index: their position is it
            message = {
                **message,
                "tool_calls": [{"index": i, **c} for i, c in enumerate(calls) if type(c) is dict],
            }
        _choice({**choice, "delta": message, "message": None}, events)
    used = obj.get("usage")
    if used:
        events.append(usage(used))
    return events
