"""Answers with reasoning and tool calls, and their exact continuation.

A chat request that asks for reasoning or gets a tool call is answered in *segments*, each one engine call:

1. **reasoning** — prompt ``P + "<think>\\n"`` (``P``: the messages rendered with the generation prompt),
   at most the reasoning budget, until ``</think>``; streamed as ``reasoning_content``.
2. then either **content** — prompt ``P + "<think>\\n" + R + "\\n</think>\\n\\n"`` — streamed as
   ``content``; or a **tool call** whose arguments are guided JSON (:mod:`skyfabric.engine.guided`): the
   engine writes the structure, and each value is one engine call whose prompt is
   ``P + wrap(R) + '<tool_call>{"name": …, "arguments": ' + arguments so far``.

**Why a continuation is exact.** Every segment's engine call is a pure function of characters the client
already has: its prompt is re-rendered from the text before the segment (the same string, tokenized the
same way, in the uninterrupted run and in the continuation), its seed is derived from the request's seed
and the segment (the sampler draws by (seed, position), never from a running generator), and its
length bound is intrinsic to the segment. So a continuation re-derives which segment the cut fell in
from the partial reasoning, content and arguments (JSON values that the partial arguments already close
are read back from them, not generated again) and *replays* that one segment's call: it produces the
same tokens as the first time, the characters the client already has are checked and dropped, and what
follows is what the uninterrupted answer would have sent. The replay costs at most one segment: a
reasoning budget, one argument value (a few tokens), or the content so far. Re-tokenizing a cut
mid-token could not do this: the first run's tokens are not recoverable from its text.

Exactness at ``temperature > 0`` needs a ``seed`` (an unseeded draw is not reproducible anywhere), and
the same engine numerics (the same model and dtype, as for any continuation). If a replay does not
reproduce the client's characters (another model wrote them), the segment continues from the text
instead: valid, not exact.

**Tokens.** ``max_tokens`` bounds the answer's sampled tokens; in a continuation it bounds the *new*
ones: the tokens of deltas that reach past the client's characters (what a gateway counted from the
chunks it saw is the rest). Structure the engine writes costs no tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from skyfabric.engine.base import Engine, GenerationRequest
from skyfabric.engine.guided import (
    NUMBER_TOKENS,
    STRING_TOKENS,
    Field,
    Vocabulary,
    closing,
    fields_of,
    number_text,
    opening,
    value_end,
)

THINK_OPEN = "<think>\n"
THINK_CLOSE = "\n</think>\n\n"
#: Reasoning budget (tokens) when the request names none, and per OpenAI ``reasoning_effort``.
DEFAULT_REASONING_TOKENS = 32
EFFORT_TOKENS = {"minimal": 8, "low": 16, "medium": 32, "high": 64}

PieceKind = Literal["reasoning", "content", "call", "arguments", "finish"]


class PrefixMismatch(ValueError):
    """The client's partial tool-call arguments are not this engine's JSON for the tool (HTTP 400)."""


@dataclass(frozen=True, slots=True)
class Plan:
    """What an answer holds: a reasoning budget (0: none) and the tool it calls (None: text)."""

    reasoning_tokens: int = 0
    tool_name: str | None = None
    fields: tuple[Field, ...] = ()

    @property
    def active(self) -> bool:
        return self.reasoning_tokens > 0 or self.tool_name is not None


@dataclass(frozen=True, slots=True)
class Prefix:
    """What the client already has of the answer: a continuation's final assistant message."""

    reasoning: str = ""
    content: str = ""
    arguments: str | None = None  # None: no tool call was started
    call_index: int = 0
    call_id: str | None = None

    @property
    def given(self) -> bool:
        return bool(self.reasoning or self.content) or self.arguments is not None


@dataclass(frozen=True, slots=True)
class Piece:
    """One step of an answer: text of a kind, the new tokens it cost, and the finish reason at the end."""

    kind: PieceKind
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None


def reasoning_budget(body: Mapping[str, Any]) -> int:
    """The reasoning budget a request asks for, as vLLM reads it (0: no reasoning).

    ``chat_template_kwargs: {"enable_thinking": true}`` (Qwen3's switch in vLLM; an optional
    ``thinking_budget``), OpenAI's ``reasoning_effort`` (``none`` turns it off), and as a skyfabric
    pass-through Anthropic's ``thinking: {"type": "enabled", "budget_tokens": N}``.
    """
    thinking = body.get("thinking")
    if isinstance(thinking, Mapping):
        if thinking.get("type") == "disabled":
            return 0
        budget = thinking.get("budget_tokens")
        if isinstance(budget, int) and not isinstance(budget, bool) and budget > 0:
            return budget
        if thinking.get("type") in ("enabled", "adaptive"):
            return DEFAULT_REASONING_TOKENS
    kwargs = body.get("chat_template_kwargs")
    if isinstance(kwargs, Mapping) and kwargs.get("enable_thinking") is True:
        budget = kwargs.get("thinking_budget")
        if isinstance(budget, int) and not isinstance(budget, bool) and budget > 0:
            return budget
        return DEFAULT_REASONING_TOKENS
    effort = body.get("reasoning_effort")
    if isinstance(effort, str):
        return EFFORT_TOKENS.get(effort, 0 if effort == "none" else DEFAULT_REASONING_TOKENS)
    return 0


def called_tool(body: Mapping[str, Any], messages: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The tool this answer calls, if any.

    ``tool_choice`` ``"required"`` calls the first tool, ``{"type": "function", "function": {"name"}}`` the
    named one. Under ``"auto"`` (or unset, OpenAI's default with tools) a real model decides; this engine's
    deterministic stand-in calls the first tool when the last user message mentions "tool" or "call".
    """
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools:
        return None
    functions = [t.get("function") if isinstance(t.get("function"), Mapping) else t for t in tools]
    choice = body.get("tool_choice")
    if isinstance(choice, Mapping):
        function_choice = choice.get("function")
        wanted = function_choice.get("name") if isinstance(function_choice, Mapping) else None
        for function in functions:
            if function.get("name") == wanted:
                return function
        raise ValueError(f"tool_choice names function {wanted!r}, which is not in 'tools'")
    if choice == "required":
        return functions[0]
    if choice in (None, "auto"):
        users = [m for m in messages if m.get("role") == "user"]
        text = str(users[-1].get("content") or "").lower() if users else ""
        if "tool" in text or "call" in text:
            return functions[0]
        return None
    if choice == "none":
        return None
    raise ValueError("'tool_choice' must be 'none', 'auto', 'required' or a named function")


def plan_of(body: Mapping[str, Any], messages: Sequence[Mapping[str, Any]]) -> Plan:
    """The plan for a chat request whose messages (without a continuation's final one) are ``messages``."""
    tool = called_tool(body, messages)
    name = None if tool is None else str(tool.get("name") or "")
    fields = () if tool is None else tuple(fields_of(tool.get("parameters")))
    return Plan(reasoning_budget(body), name, fields)


def prefix_of(message: Mapping[str, Any]) -> Prefix:
    """What a continuation's final assistant message says the client has (``reasoning`` also accepted)."""
    reasoning = message.get("reasoning_content")
    if not isinstance(reasoning, str):
        reasoning = message.get("reasoning")
    calls = message.get("tool_calls")
    arguments: str | None = None
    call_id = None
    index = 0
    if isinstance(calls, list) and calls:
        last = calls[-1] if isinstance(calls[-1], Mapping) else {}
        function = last.get("function")
        raw = function.get("arguments") if isinstance(function, Mapping) else None
        arguments = raw if isinstance(raw, str) else ""
        call_id = last.get("id") if isinstance(last.get("id"), str) else None
        index = len(calls) - 1
    return Prefix(
        reasoning=reasoning if isinstance(reasoning, str) else "",
        content=str(message.get("content") or ""),
        arguments=arguments,
        call_index=index,
        call_id=call_id,
    )


def tool_call_id(base_messages: Any, body: Mapping[str, Any], choice: int) -> str:
    """A tool call's id from the request (messages before any continuation, tools, seed, choice): the same
    for an uninterrupted answer and for its continuation, so a client never sees two conflicting ids."""
    key = orjson.dumps(
        [base_messages, body.get("tools"), body.get("tool_choice"), body.get("seed"), choice],
        option=orjson.OPT_SORT_KEYS,
    )
    return "chatcmpl-tool-" + hashlib.sha256(key).hexdigest()[:32]


def derive_seed(seed: int | None, tag: int) -> int | None:
    """The seed of one segment: a function of the request's seed and the segment, never of time."""
    return None if seed is None else (seed * 1_000_003 + tag) & 0x7FFF_FFFF_FFFF_FFFF


class _Diverged(Exception):
    """A replay did not reproduce the client's characters."""


@dataclass(slots=True)
class _Call:
    """One engine call's result: its full text (the client's part included), ids, and how it ended."""

    text: str = ""
    ids: tuple[int, ...] = ()
    finish: str | None = None


class Answer:
    """One choice of a structured answer, continued after ``prefix`` (see the module docstring)."""

    def __init__(
        self,
        engine: Engine,
        plan: Plan,
        prompt_ids: Sequence[int],
        template: GenerationRequest,
        prefix: Prefix | None = None,
        vocabulary: Vocabulary | None = None,
    ) -> None:
        self.engine = engine
        self.plan = plan
        self.prompt = list(prompt_ids)
        self.template = template
        self.prefix = prefix or Prefix()
        self.vocabulary = vocabulary
        self.left = template.max_tokens  # new tokens this answer may still sample
        self._held = ""  # structure written but not yet sent (it goes out with the next value's text)
        self.last = _Call()  # the last text segment's call
        self.args = ""  # the arguments' full text so far (the client's part included)

    # ---------------------------------------------------------------------------------------- one call

    def _request(self, suffix: str, bound: int, given: str, **fields: Any) -> GenerationRequest | None:
        """The call for a segment after ``suffix``; None when the context has no room left."""
        prompt = self.prompt + self.engine.tokenize_fragment(suffix)
        room = self.engine.max_model_len - len(prompt)
        limit = min(bound, room) if given else min(bound, room, self.left)
        if limit <= 0:
            return None
        base = self.template
        return GenerationRequest(
            prompt_ids=tuple(prompt),
            max_tokens=limit,
            temperature=base.temperature,
            top_p=base.top_p,
            top_k=base.top_k,
            **fields,
        )

    async def _run(
        self, request: GenerationRequest, given: str, call: _Call
    ) -> AsyncGenerator[tuple[str, int], None]:
        """Run one call whose first ``len(given)`` characters the client has; yield (new text, new tokens).

        A delta's tokens are new when its text reaches past ``given`` (a textless delta's tokens go with the
        next delta's text, as a stream's usage counts them with the next chunk; textless at the end, they
        are new unless the client's characters run past them). Past :attr:`left` new tokens the output is
        cut at that token, as the engine's own ``max_tokens`` would have cut it, so a replay ends where the
        uninterrupted call ended.
        """
        skip = len(given)
        produced = 0
        ids: list[int] = []
        held: list[int] = []
        async with contextlib.aclosing(self.engine.generate(request)) as stream:
            async for delta in stream:
                text = delta.text
                if not text and delta.finish_reason is None:
                    held.extend(delta.token_ids)
                    continue
                new_ids, held = held + list(delta.token_ids), []
                start = produced
                new = start + len(text) > skip or (not text and start >= skip)
                cut = new and len(new_ids) > self.left
                if cut:
                    new_ids = new_ids[: self.left]
                    full = self.engine.decode(ids + new_ids)
                    text = full[start:]
                if start < skip:
                    seen = text[: skip - start]
                    if given[start : start + len(seen)] != seen:
                        raise _Diverged
                ids.extend(new_ids)
                produced += len(text)
                call.text += text
                fresh = text[max(0, skip - start) :]
                tokens = len(new_ids) if new else 0
                self.left -= tokens
                if fresh or tokens:
                    yield fresh, tokens
                if cut:
                    call.finish = "length"
                    break
                if delta.finish_reason is not None:
                    call.finish = delta.finish_reason
        call.ids = tuple(ids)
        if produced < skip:
            raise _Diverged

    async def _segment(
        self, kind: PieceKind, suffix: str, given: str, bound: int, **fields: Any
    ) -> AsyncGenerator[Piece, None]:
        """A text segment (reasoning or content) after ``suffix``, replayed past ``given``; its full text
        ends up in :attr:`last`."""
        self.last = _Call()
        request = self._request(suffix, bound, given, **fields)
        if request is None:
            self.last = _Call(given, (), "length")
            return
        try:
            async for text, tokens in self._run(request, given, self.last):
                yield Piece(kind, text, tokens)
        except _Diverged:  # not ours to replay: continue from the text (valid, not exact)
            request = self._request(suffix + given, bound, "", **fields)
            self.last = _Call(given)
            if request is None:
                self.last.finish = "length"
                return
            async for text, tokens in self._run(request, "", self.last):
                yield Piece(kind, text, tokens)
            self.last.text = given + self.last.text

    # ---------------------------------------------------------------------------------------- the answer

    async def run(self) -> AsyncGenerator[Piece, None]:
        """The answer's pieces after the prefix; the last one is ``finish``."""
        plan, prefix, seed = self.plan, self.prefix, self.template.seed
        reasoning = prefix.reasoning
        if plan.reasoning_tokens and not (prefix.content or prefix.arguments is not None):
            async for piece in self._segment(
                "reasoning", THINK_OPEN, reasoning, plan.reasoning_tokens,
                stop=("</think>",), ignore_eos=True, seed=derive_seed(seed, 1),
            ):  # fmt: skip
                yield piece
            reasoning = self.last.text
            if self.left <= 0:
                yield Piece("finish", finish_reason="length")
                return
        wrap = THINK_OPEN + reasoning + THINK_CLOSE if plan.reasoning_tokens or reasoning else ""
        if plan.tool_name is None:
            base = self.template
            async for piece in self._segment(
                "content", wrap, prefix.content, self.engine.max_model_len,
                stop=base.stop, stop_token_ids=base.stop_token_ids, ignore_eos=base.ignore_eos,
                min_tokens=base.min_tokens, seed=derive_seed(seed, 2),
            ):  # fmt: skip
                yield piece
            yield Piece("finish", finish_reason=self.last.finish or "stop")
            return
        if prefix.arguments is None:
            yield Piece("call", plan.tool_name)
        async for piece in self._arguments(wrap):
            yield piece

    async def _arguments(self, wrap: str) -> AsyncGenerator[Piece, None]:
        """The guided JSON arguments, continued after the client's partial ``arguments``."""
        plan = self.plan
        given = self.prefix.arguments or ""
        head = wrap + '<tool_call>{"name": ' + json.dumps(plan.tool_name) + ', "arguments": '
        self.args = ""
        fields = plan.fields
        if not fields:
            self._write("{", given)
        for index, field in enumerate(fields):
            self._write(opening(fields, index), given)
            if field.kind == "fixed":
                self._write(field.fixed, given)
                continue
            rest = given[len(self.args) :] if len(self.args) < len(given) else None
            end = None if rest is None else value_end(field.kind, rest)
            if rest is not None and end is not None:  # the client has the whole value: read it back
                self.args += rest[:end]
            else:
                finished = True
                async for piece in self._value(head, index, field, rest or ""):
                    finished = piece.kind != "finish"
                    yield piece
                if not finished:
                    return
            self._write(closing(fields, index), given)
        self._write("}", given)
        if self._held:
            yield Piece("arguments", self._flush())
        yield Piece("finish", finish_reason="tool_calls")

    def _write(self, text: str, given: str) -> None:
        """Structure the engine writes: checked against the client's characters, held for the next piece."""
        start = len(self.args)
        self.args += text
        seen = given[start : start + len(text)]
        if seen != text[: len(seen)]:
            raise PrefixMismatch(
                "the final assistant message's tool-call arguments are not this engine's JSON for "
                f"{self.plan.tool_name!r} (at character {start}); continue on the backend that wrote them"
            )
        self._held += text[len(seen) :]

    def _flush(self) -> str:
        held, self._held = self._held, ""
        return held

    async def _value(self, head: str, index: int, field: Field, given: str) -> AsyncGenerator[Piece, None]:
        """Generate one value (replaying past the client's ``given`` part of it)."""
        vocabulary = self.vocabulary
        assert vocabulary is not None
        bound = STRING_TOKENS if field.kind == "string" else NUMBER_TOKENS if field.kind == "integer" else 1
        request = self._request(
            head + self.args, bound, given,
            allowed_token_ids=vocabulary.allowed(field.kind), min_tokens=1,
            seed=derive_seed(self.template.seed, 16 + index),
        )  # fmt: skip
        call = _Call()
        if request is None:
            yield from_held(self, "length")
            return
        if field.kind == "string":
            try:
                async for text, tokens in self._run(request, given, call):
                    yield Piece("arguments", self._flush() + text, tokens)
            except _Diverged:  # continue from the client's text: valid JSON, not exact
                request = self._request(head + self.args + given, bound, "", **_guided(request))
                call = _Call()
                if request is not None:
                    async for text, tokens in self._run(request, "", call):
                        yield Piece("arguments", self._flush() + text, tokens)
                call.text = given + call.text
            self.args += call.text
            if call.finish == "length" and self.left <= 0:
                yield from_held(self, "length")
            return
        # Numbers and booleans go out whole, once sampled: their tokens are all before a cut or all after.
        # So the call runs outside the budget, which then applies to it as a whole, as the engine's own
        # max_tokens did in the uninterrupted run.
        budget, self.left = self.left, bound
        async for _ in self._run(request, "", call):
            pass
        self.left = budget
        ids = call.ids
        new = len(self._value_text(field, call.text, ids)) > len(given)
        if new and len(ids) > self.left:
            ids = ids[: self.left]
        text = self._value_text(field, self.engine.decode(ids), ids) if ids else ""
        if not text.startswith(given):
            raise PrefixMismatch(f"the value of {field.key!r} value {given!r} is not this engine's {text!r}")
        if not ids:
            yield from_held(self, "length")
            return
        self.args += text
        if new:
            self.left -= len(ids)
            yield Piece("arguments", self._flush() + text[len(given) :], len(ids))

    def _value_text(self, field: Field, text: str, ids: Sequence[int]) -> str:
        if field.kind == "integer":
            return number_text(text)
        assert self.vocabulary is not None
        return self.vocabulary.boolean(ids[0]) if ids else ""


def from_held(answer: Answer, reason: str) -> Piece:
    """The last piece when the budget ends the arguments: what structure was held, then the finish."""
    return Piece("finish", answer._flush(), 0, reason)


def _guided(request: GenerationRequest) -> dict[str, Any]:
    return {
        "allowed_token_ids": request.allowed_token_ids,
        "min_tokens": request.min_tokens,
        "seed": request.seed,
    }


async def merge(
    streams: Sequence[AsyncGenerator[Piece, None]],
) -> AsyncGenerator[tuple[int, Piece], None]:
    """Interleave choices' pieces as (index, piece); closing this cancels every choice still running."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for piece in only:
                yield 0, piece
        return
    queue: asyncio.Queue[tuple[int, Piece | None, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncGenerator[Piece, None]) -> None:
        try:
            async with contextlib.aclosing(stream) as pieces:
                async for piece in pieces:
                    queue.put_nowait((index, piece, None))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            queue.put_nowait((index, None, exc))
        finally:
            queue.put_nowait((index, None, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item, exc = await queue.get()
            if exc is not None:
                raise exc
            if item is None:
                remaining -= 1
                continue
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
