"""Tool calls (guided JSON arguments), reasoning, and their exact continuation, on both built-in engines.

A continuation is the original request plus the answer so far as a final assistant message
(``reasoning_content``, ``content``, ``tool_calls`` with partial ``arguments``) and
``continue_final_message``; joined to that prefix, its output must equal the uninterrupted answer exactly,
for cuts at every character of a tool call's arguments, of reasoning and of the text after it (greedy; a
spread of ten cuts of the latter two when sampling with a seed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest

from tests.engine.conftest import ReplicaProcess

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "metric": {"type": "boolean"},
                    "note": {"type": "string"},
                },
                "required": ["city", "days"],
            },
        },
    },
    {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}}},
]
CALL = [{"role": "user", "content": "Use the tool: what is the weather in Paris?"}]
THINK = {"chat_template_kwargs": {"enable_thinking": True, "thinking_budget": 10}}


def _client(replica: ReplicaProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=replica.base_url + "/v1", api_key="x", max_retries=0)


def _check_arguments(arguments: str) -> None:
    """Valid JSON with the schema's keys in order and values of the schema's types."""
    value = json.loads(arguments)
    assert list(value) == ["city", "days", "metric", "note"]
    assert isinstance(value["city"], str) and isinstance(value["note"], str)
    assert isinstance(value["days"], int) and not isinstance(value["days"], bool)
    assert isinstance(value["metric"], bool)


def test_tool_call_non_streamed_and_streamed(replica: ReplicaProcess) -> None:
    client = _client(replica)
    for temperature in (0.0, 0.8):
        result = client.chat.completions.create(
            model=replica.model, messages=CALL, tools=TOOLS, max_tokens=40, temperature=temperature, seed=7
        )  # type: ignore[call-overload]
        choice = result.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather"
        assert call.id.startswith("chatcmpl-tool-")
        _check_arguments(call.function.arguments)
        assert 0 < result.usage.completion_tokens <= 40

        chunks = list(
            client.chat.completions.create(
                model=replica.model, messages=CALL, tools=TOOLS, max_tokens=40, temperature=temperature,
                seed=7, stream=True, stream_options={"include_usage": True},
            )  # type: ignore[call-overload]
        )  # fmt: skip
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        calls = [d.tool_calls[0] for d in deltas if d.tool_calls]
        assert calls[0].id == call.id and calls[0].function.name == "get_weather"
        assert calls[0].function.arguments == "" and calls[0].type == "function"
        assert all(c.id is None and c.function.name is None and c.index == 0 for c in calls[1:])
        assert len(calls) >= 3  # several fragments, each of several characters
        assert "".join(c.function.arguments for c in calls) == call.function.arguments
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == result.usage.completion_tokens


def test_tool_choice_named_required_auto_and_none(replica: ReplicaProcess) -> None:
    client = _client(replica)
    plain = [{"role": "user", "content": "Hello there"}]

    def ask(messages: list[dict[str, str]], choice: Any) -> Any:
        kwargs = {} if choice is None else {"tool_choice": choice}
        return client.chat.completions.create(
            model=replica.model, messages=messages, tools=TOOLS, max_tokens=40, temperature=0, **kwargs
        ).choices[0]  # type: ignore[call-overload]

    named = ask(plain, {"type": "function", "function": {"name": "noop"}})
    assert named.message.tool_calls[0].function.name == "noop"
    assert named.message.tool_calls[0].function.arguments == "{}"
    assert ask(plain, "required").message.tool_calls[0].function.name == "get_weather"
    assert ask(plain, "auto").message.tool_calls is None
    assert ask(CALL, "auto").message.tool_calls[0].function.name == "get_weather"
    assert ask(CALL, None).finish_reason == "tool_calls"
    assert ask(CALL, "none").message.tool_calls is None
    with pytest.raises(openai.BadRequestError):
        ask(plain, {"type": "function", "function": {"name": "missing"}})


def test_reasoning_streamed_then_content(replica: ReplicaProcess) -> None:
    client = _client(replica)
    messages = [{"role": "user", "content": "Think first, then answer."}]
    result = client.chat.completions.create(
        model=replica.model, messages=messages, max_tokens=30, temperature=0, extra_body=THINK
    )  # type: ignore[call-overload]
    message = result.choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    assert reasoning and message.content is not None
    chunks = list(
        client.chat.completions.create(
            model=replica.model, messages=messages, max_tokens=30, temperature=0, stream=True,
            extra_body=THINK, stream_options={"include_usage": True},
        )  # type: ignore[call-overload]
    )  # fmt: skip
    kinds = []
    for chunk in chunks:
        if not chunk.choices:
            continue
        extra = chunk.choices[0].delta.model_extra or {}
        if extra.get("reasoning_content"):
            kinds.append(("reasoning", extra["reasoning_content"]))
        if chunk.choices[0].delta.content:
            kinds.append(("content", chunk.choices[0].delta.content))
    first_content = next(i for i, (k, _) in enumerate(kinds) if k == "content")
    assert all(k == "reasoning" for k, _ in kinds[:first_content])
    assert all(k == "content" for k, _ in kinds[first_content:])
    assert "".join(t for k, t in kinds if k == "reasoning") == reasoning
    assert "".join(t for k, t in kinds if k == "content") == message.content
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == result.usage.completion_tokens <= 30
    # reasoning_effort asks for it too; "none" does not
    effort = client.chat.completions.create(
        model=replica.model, messages=messages, max_tokens=30, temperature=0, reasoning_effort="low"
    )  # type: ignore[call-overload]
    assert effort.choices[0].message.model_extra.get("reasoning_content")
    plain = client.chat.completions.create(
        model=replica.model,
        messages=messages,
        max_tokens=8,
        temperature=0,
        extra_body={"reasoning_effort": "none"},
    )  # type: ignore[call-overload]
    assert not (plain.choices[0].message.model_extra or {}).get("reasoning_content")


# ------------------------------------------------------------------------------------------------------------
# Exact continuation
# ------------------------------------------------------------------------------------------------------------


@dataclass
class Streamed:
    """An answer read off the wire: its text per kind, the chunks' (kind, end offset, usage), and more."""

    reasoning: str = ""
    content: str = ""
    arguments: str = ""
    call_headers: list[dict[str, Any]] = field(default_factory=list)
    marks: list[tuple[str, int, int]] = field(default_factory=list)
    finish: str | None = None
    usage: int = 0


def _stream(client: httpx.Client, body: dict[str, Any]) -> Streamed:
    out = Streamed()
    body = {**body, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            if chunk.get("usage"):
                out.usage = chunk["usage"]["completion_tokens"]
            if not chunk["choices"]:
                continue
            choice = chunk["choices"][0]
            delta = choice["delta"]
            out.finish = choice["finish_reason"] or out.finish
            for kind in ("reasoning", "content"):
                text = delta.get(f"{kind}_content" if kind == "reasoning" else kind)
                if text:
                    setattr(out, kind, getattr(out, kind) + text)
                    out.marks.append((kind, len(getattr(out, kind)), out.usage))
            for call in delta.get("tool_calls") or []:
                assert call["index"] == 0
                if "id" in call:
                    out.call_headers.append(call)
                    out.marks.append(("arguments", 0, out.usage))
                if call["function"].get("arguments"):
                    out.arguments += call["function"]["arguments"]
                    out.marks.append(("arguments", len(out.arguments), out.usage))
    return out


def _used(full: Streamed, kind: str, cut: int) -> int:
    """Completion tokens a gateway had counted when the stream broke ``cut`` characters into ``kind``:
    the usage of the last chunk that the cut does not split."""
    order = ["reasoning", "content", "arguments"]
    used = 0
    for mark_kind, end, usage in full.marks:
        if order.index(mark_kind) < order.index(kind) or (mark_kind == kind and end <= cut):
            used = usage
    return used


def _continue(
    http: httpx.Client, body: dict[str, Any], full: Streamed, kind: str, cut: int
) -> tuple[Streamed, int]:
    """Continue ``body``'s answer from ``cut`` characters into ``kind``; return the part and the tokens the
    gateway had counted before it."""
    message: dict[str, Any] = {"role": "assistant", "content": ""}
    if kind == "reasoning":
        message["reasoning_content"] = full.reasoning[:cut]
    else:
        if full.reasoning:
            message["reasoning"] = full.reasoning  # the other spelling is read too
        if kind == "content":
            message["content"] = full.content[:cut]
        else:
            header = full.call_headers[0]
            message["tool_calls"] = [
                {
                    "id": header["id"],
                    "type": "function",
                    "function": {"name": header["function"]["name"], "arguments": full.arguments[:cut]},
                }
            ]
    used = _used(full, kind, cut)
    rest = {
        **body,
        "messages": [*body["messages"], message],
        "continue_final_message": True,
        "add_generation_prompt": False,
        "max_tokens": body["max_tokens"] - used,
    }
    return _stream(http, rest), used


def _sweep(http: httpx.Client, body: dict[str, Any], kind: str, every: bool) -> int:
    """Cut ``body``'s answer at characters of ``kind`` and check each continuation; return the cuts made."""
    full = _stream(http, body)
    assert full.finish != "length"  # then every budget a cut leaves is enough
    text = getattr(full, kind)
    assert text, f"the uninterrupted answer has no {kind}"
    cuts = (
        range(len(text) + 1)
        if every
        else sorted({*range(0, len(text) + 1, max(1, len(text) // 9)), len(text)})
    )
    for cut in cuts:
        part, used = _continue(http, body, full, kind, cut)
        where = f"{kind} cut at {cut} of {text!r}"
        if kind == "reasoning":
            assert full.reasoning[:cut] + part.reasoning == full.reasoning, where
            assert part.content == full.content and part.arguments == full.arguments, where
        elif kind == "content":
            assert part.reasoning == "" and full.content[:cut] + part.content == full.content, where
        else:
            assert part.reasoning == "" and part.content == ""
            assert full.arguments[:cut] + part.arguments == full.arguments, where
            assert part.call_headers == [], where  # the call being continued gets no second id/name
        if kind == "reasoning" and full.call_headers:
            assert part.call_headers == full.call_headers, where  # same id: derived from the request
        assert part.finish == full.finish, where
        if any(k == kind and end == cut for k, end, _ in full.marks) or cut == 0:
            # A real stream breaks between chunks: there the gateway's count plus the continuation's is the
            # whole answer's. (Inside a chunk, the tokens a segment ends with that spell nothing are sent
            # with the next chunk: a prefix holding part of that chunk shows them received.)
            assert used + part.usage == full.usage, where
    return len(cuts)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_continuation_is_exact_at_every_cut(replica: ReplicaProcess, temperature: float) -> None:
    base = {"model": replica.model, "temperature": temperature, "seed": 11, "max_tokens": 60}
    with httpx.Client(base_url=replica.base_url, timeout=60) as http:
        call = {**base, "messages": CALL, "tools": TOOLS, **THINK}
        arguments = _sweep(http, call, "arguments", every=True)
        assert arguments > 30
        _sweep(http, call, "reasoning", every=temperature == 0)
        text = {**base, "messages": [{"role": "user", "content": "Think, then say hi."}], **THINK}
        _sweep(http, text, "content", every=temperature == 0)
        json.loads(_stream(http, call).arguments)


def test_continuation_refuses_arguments_it_did_not_write(replica: ReplicaProcess) -> None:
    function = {"name": "get_weather", "arguments": '{"town'}
    body = {
        "model": replica.model, "temperature": 0, "max_tokens": 20, "tools": TOOLS,
        "messages": [
            *CALL,
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_1", "type": "function", "function": function}
            ]},
        ],
        "continue_final_message": True, "add_generation_prompt": False,
    }  # fmt: skip
    response = httpx.post(replica.base_url + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400
    assert "not this engine's JSON" in response.json()["error"]["message"]
