"""``skyfabric replica``: one model behind an OpenAI-compatible HTTP API, the unit the fleet supervisor runs.

The gateway talks to a replica exactly as to any vLLM server: ``/v1/chat/completions``, ``/v1/completions``,
``/v1/models``, ``/health`` and Prometheus ``/metrics`` under vLLM's metric names, so the same routing and
load signals work for embedded replicas and for rented vLLM boxes. The HTTP layer owns the wire format,
validation and context-length policy; the model work is delegated to an
:class:`~skyfabric.engine.base.Engine`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import orjson
from aiohttp import web

from skyfabric.core.errors import PromptTooLong
from skyfabric.engine import DEFAULT_MODEL_DIR
from skyfabric.engine.architectures import pick_engine
from skyfabric.engine.base import (
    Engine,
    EngineError,
    EngineNotReady,
    GenerationDelta,
    GenerationRequest,
    create_engine,
    engine_names,
)
from skyfabric.engine.devices import resolve_device
from skyfabric.engine.external import (
    EXIT_ENGINE_UNAVAILABLE,
    EngineUnavailable,
    ServerSpec,
    exec_server,
    server_command,
    server_engine_names,
)
from skyfabric.engine.guided import Vocabulary
from skyfabric.engine.structured import (
    Answer,
    Piece,
    Plan,
    Prefix,
    merge,
    plan_of,
    prefix_of,
    tool_call_id,
)
from skyfabric.engine.structured_wire import StructuredMessage, StructuredShape

log = logging.getLogger("skyfabric.replica")

MAX_N = 16
MAX_STOP_STRINGS = 16
#: Prompts longer than this (characters) are tokenized in a worker thread: HF tokenizers release the GIL,
#: so the event loop keeps serving health checks and streams meanwhile (4 s for 1.8 MB on the tiny model).
OFF_LOOP_CHARS = 32_768

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


# ------------------------------------------------------------------------------------------------------------
# Errors in OpenAI's shape
# ------------------------------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return _json_response(self.body(), status=self.status)


def _bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type="application/json")


# ------------------------------------------------------------------------------------------------------------
# Request parsing
# ------------------------------------------------------------------------------------------------------------


def _opt_int(body: Mapping[str, Any], key: str, *, minimum: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"'{key}' must be an integer, got {type(value).__name__}", key, "invalid_type")
    if minimum is not None and value < minimum:
        raise _bad(f"'{key}' must be >= {minimum}, got {value}", key)
    return value


def _opt_number(
    body: Mapping[str, Any], key: str, *, minimum: float, maximum: float, exclusive_min: bool = False
) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(f"'{key}' must be a number, got {type(value).__name__}", key, "invalid_type")
    too_low = value <= minimum if exclusive_min else value < minimum
    if too_low or value > maximum:
        bound = f"> {minimum}" if exclusive_min else f">= {minimum}"
        raise _bad(f"'{key}' must be {bound} and <= {maximum}, got {value}", key)
    return float(value)


def _opt_bool(body: Mapping[str, Any], key: str) -> bool | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise _bad(f"'{key}' must be a boolean, got {type(value).__name__}", key, "invalid_type")
    return value


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    """Validated sampling fields of chat and completions; ``max_tokens=None`` means "fill the context"."""

    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    seed: int | None
    ignore_eos: bool
    min_tokens: int
    n: int
    stream: bool
    include_usage: bool
    #: vLLM's ``stream_options.continuous_usage_stats``: the running usage in every chunk (a gateway
    #: that continues a broken stream elsewhere counts the tokens sent by it).
    continuous_usage: bool = False


def parse_sampling(body: Mapping[str, Any], *, chat: bool) -> SamplingOptions:
    """Validate OpenAI sampling fields plus vLLM's extras (``ignore_eos``, ``min_tokens``, ``top_k``, …)."""
    max_tokens = _opt_int(body, "max_completion_tokens", minimum=1) if chat else None
    if max_tokens is None:
        max_tokens = _opt_int(body, "max_tokens", minimum=1)
    temperature = _opt_number(body, "temperature", minimum=0.0, maximum=2.0)
    top_p = _opt_number(body, "top_p", minimum=0.0, maximum=1.0, exclusive_min=True)
    top_k = _opt_int(body, "top_k", minimum=-1)
    seed = _opt_int(body, "seed")
    min_tokens = _opt_int(body, "min_tokens", minimum=0) or 0
    n = _opt_int(body, "n", minimum=1) or 1
    if n > MAX_N:
        raise _bad(f"'n' must be <= {MAX_N}, got {n}", "n")
    if max_tokens is not None and min_tokens > max_tokens:
        raise _bad(f"'min_tokens' ({min_tokens}) must be <= 'max_tokens' ({max_tokens})", "min_tokens")

    raw_stop = body.get("stop")
    if raw_stop is None:
        stop: tuple[str, ...] = ()
    elif isinstance(raw_stop, str):
        stop = (raw_stop,)
    elif isinstance(raw_stop, list) and all(isinstance(s, str) for s in raw_stop):
        stop = tuple(raw_stop)
    else:
        raise _bad("'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(stop) > MAX_STOP_STRINGS:
        raise _bad(f"at most {MAX_STOP_STRINGS} stop strings are supported", "stop")

    raw_stop_ids = body.get("stop_token_ids")
    if raw_stop_ids is None:
        stop_token_ids: tuple[int, ...] = ()
    elif isinstance(raw_stop_ids, list) and all(
        isinstance(i, int) and not isinstance(i, bool) for i in raw_stop_ids
    ):
        stop_token_ids = tuple(raw_stop_ids)
    else:
        raise _bad("'stop_token_ids' must be a list of integers", "stop_token_ids", "invalid_type")

    stream = bool(_opt_bool(body, "stream"))
    include_usage = continuous_usage = False
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise _bad("'stream_options' must be an object", "stream_options", "invalid_type")
        include_usage = bool(_opt_bool(stream_options, "include_usage"))
        continuous_usage = bool(_opt_bool(stream_options, "continuous_usage_stats"))

    for unsupported in ("logprobs", "top_logprobs", "echo", "best_of", "suffix"):
        value = body.get(unsupported)
        if value and not (unsupported == "best_of" and value == 1):
            raise _bad(
                f"'{unsupported}' is not supported by this server", unsupported, "unsupported_parameter"
            )

    return SamplingOptions(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop=stop,
        stop_token_ids=stop_token_ids,
        seed=seed,
        ignore_eos=bool(_opt_bool(body, "ignore_eos")),
        min_tokens=min_tokens,
        n=n,
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous_usage,
    )


def build_requests(
    prompt_ids: Sequence[int],
    opts: SamplingOptions,
    *,
    max_model_len: int,
    param: str,
    what: str,
    vocab_size: int = 0,
) -> list[GenerationRequest]:
    """Apply the context-length policy (vLLM's) and fan out ``n`` choices.

    An unset ``max_tokens`` becomes the room left in the context; a prompt that leaves no room, or an explicit
    ``max_tokens`` that does not fit, is a 400 ``context_length_exceeded`` worded like OpenAI/vLLM.
    """
    prompt_len = len(prompt_ids)
    if prompt_len == 0:
        raise _bad(f"the {what} is empty", param)
    if vocab_size:  # an id outside the vocabulary would index past the embedding table
        if any(not 0 <= t < vocab_size for t in prompt_ids):
            raise _bad(f"token ids in the {what} must be in [0, {vocab_size})", param)
        if any(not 0 <= t < vocab_size for t in opts.stop_token_ids):
            raise _bad(f"'stop_token_ids' must be in [0, {vocab_size})", "stop_token_ids")
    if opts.max_tokens is None:
        if prompt_len >= max_model_len:
            raise APIError(
                400,
                f"This model's maximum context length is {max_model_len} tokens. However, your {what} "
                f"resulted in {prompt_len} tokens. Please reduce the length of the {what}.",
                param=param,
                code="context_length_exceeded",
            )
        max_tokens = max_model_len - prompt_len
    else:
        max_tokens = opts.max_tokens
        if prompt_len + max_tokens > max_model_len:
            raise APIError(
                400,
                f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the {what}, {max_tokens} in the "
                f"completion). Please reduce the length of the {what} or completion.",
                param=param,
                code="context_length_exceeded",
            )
    return [
        GenerationRequest(
            prompt_ids=tuple(prompt_ids),
            max_tokens=max_tokens,
            stop=opts.stop,
            stop_token_ids=opts.stop_token_ids,
            seed=None if opts.seed is None else opts.seed + i,
            ignore_eos=opts.ignore_eos,
            min_tokens=min(opts.min_tokens, max_tokens),
            temperature=opts.temperature,
            top_p=opts.top_p,
            top_k=None if opts.top_k is None else max(0, opts.top_k),
        )
        for i in range(opts.n)
    ]


def _too_long(exc: PromptTooLong, max_model_len: int, what: str) -> APIError:
    """vLLM's context-length 400 for a prompt refused by its size, before it was tokenized."""
    return APIError(
        400,
        f"This model's maximum context length is {max_model_len} tokens. However, your {what} resulted in "
        f"at least {exc.at_least} tokens. Please reduce the length of the {what}.",
        param=what,
        code="context_length_exceeded",
    )


def _message_text(content: Any, index: int) -> str:
    """Chat content as text: a string, or a list of text parts (other part types are refused)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise _bad(f"messages[{index}].content: only text parts are supported", "messages")
            texts.append(part["text"])
        return "".join(texts)
    raise _bad(f"messages[{index}].content must be a string or a list of parts", "messages", "invalid_type")


def _tools(body: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The request's tool definitions for the chat template (the model sees them; it does not call them)."""
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise _bad("'tools' must be a list of objects", "tools", "invalid_type")
    return tools


def parse_messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Validate ``messages`` and normalize them for the template (text content, ``developer`` → system)."""
    if "messages" not in body or body["messages"] is None:
        raise _bad("Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    raw = body["messages"]
    if not isinstance(raw, list) or not raw:
        raise _bad("'messages' must be a non-empty list", "messages", "invalid_type")
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise _bad(f"messages[{i}] must be an object", "messages", "invalid_type")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise _bad(f"messages[{i}].role must be one of {sorted(CHAT_ROLES)}", "messages")
        normalized = {k: v for k, v in message.items() if k not in ("role", "content")}
        normalized["role"] = "system" if role == "developer" else role
        normalized["content"] = _message_text(message.get("content"), i)
        messages.append(normalized)
    return messages


# ------------------------------------------------------------------------------------------------------------
# Running choices
# ------------------------------------------------------------------------------------------------------------


async def run_choices(
    engine: Engine, requests: Sequence[GenerationRequest]
) -> AsyncGenerator[tuple[int, GenerationDelta], None]:
    """Run the choices concurrently (they batch together) and interleave their deltas as (index, delta).

    Closing this iterator cancels every choice still running, which cancels them in the engine.
    """
    if len(requests) == 1:
        async with contextlib.aclosing(engine.generate(requests[0])) as stream:
            async for delta in stream:
                yield 0, delta
        return

    queue: asyncio.Queue[tuple[int, GenerationDelta | None, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, request: GenerationRequest) -> None:
        try:
            async with contextlib.aclosing(engine.generate(request)) as stream:
                async for delta in stream:
                    queue.put_nowait((index, delta, None))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            queue.put_nowait((index, None, exc))

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
    try:
        remaining = len(tasks)
        while remaining:
            index, maybe_delta, exc = await queue.get()
            if exc is not None:
                raise exc
            assert maybe_delta is not None
            yield index, maybe_delta
            if maybe_delta.finish_reason is not None:
                remaining -= 1
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


#: The replica's prefix-cache report on each answer (see ``ReplicaApp._report_cache``).
PREFIX_CACHE_HEADER = "x-skyfabric-prefix-cache"

#: Where a request's prompt length is kept for the report.
PROMPT_TOKENS = web.RequestKey("prompt_tokens", int)

_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _sse(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


# ------------------------------------------------------------------------------------------------------------
# The HTTP app
# ------------------------------------------------------------------------------------------------------------


class ReplicaApp:
    """Route handlers bound to one engine and one served model name."""

    def __init__(self, engine: Engine, served_model_name: str, model_root: str = "") -> None:
        self.engine = engine
        self.model_name = served_model_name
        self.model_root = model_root
        self.created = int(time.time())
        self.epoch = uuid.uuid4().hex[:12]
        self.state = "loading"  # loading | ready | stopping | failed
        self._vocabulary: Vocabulary | None = None  # guided decoding's token masks, built on first use

    # ------------------------------------------------------------------------------------------ plumbing

    def application(self) -> web.Application:
        """The aiohttp application (usable in-process by tests and by other servers)."""
        app = web.Application(client_max_size=32 * 1024 * 1024, middlewares=[self._errors])
        app.on_response_prepare.append(self._report_cache)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def _report_cache(self, request: web.Request, response: web.StreamResponse) -> None:
        """Tell the gateway this replica caches prompt prefixes: ``x-skyfabric-prefix-cache`` on answers.

        ``capacity`` (tokens its prefix cache holds), ``prompt`` (this request's prompt tokens, now cached)
        and ``epoch`` (this process: a restarted replica's cache is empty). The gateway mirrors each
        replica's LRU from these (``gateway/affinity.py``) and routes a prefix back where it is cached.
        """
        prompt = request.get(PROMPT_TOKENS)
        capacity = self.engine.prefix_cache_tokens
        if prompt is None or capacity <= 0 or response.status != 200:
            return
        response.headers[PREFIX_CACHE_HEADER] = f"capacity={capacity}; prompt={prompt}; epoch={self.epoch}"

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Every failure leaves as an OpenAI error object, never as aiohttp's HTML page."""
        try:
            return await handler(request)
        except APIError as exc:
            return exc.response()
        except web.HTTPException as exc:
            kind = "not_found_error" if exc.status == 404 else "invalid_request_error"
            return APIError(exc.status, exc.reason or "error", type=kind, code=None).response()
        except EngineNotReady as exc:
            return APIError(
                503, str(exc), type="service_unavailable_error", code="engine_not_ready"
            ).response()
        except EngineError as exc:
            log.exception("engine error")
            return APIError(500, str(exc), type="internal_server_error", code="engine_error").response()
        except ValueError as exc:
            return _bad(str(exc), None).response()
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as exc:
            log.exception("unhandled error in %s", request.path)
            return APIError(500, f"internal error: {exc}", type="internal_server_error", code=None).response()

    async def _body(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise APIError(
                400, f"We could not parse the JSON body of your request: {exc}", code="invalid_json"
            ) from exc
        if not isinstance(body, dict):
            raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
        return body

    def _check_model(self, body: Mapping[str, Any]) -> None:
        model = body.get("model")
        if model is None or model == self.model_name:
            return
        if not isinstance(model, str):
            raise _bad("'model' must be a string", "model", "invalid_type")
        raise APIError(
            404,
            f"The model `{model}` does not exist. This replica serves `{self.model_name}`.",
            param="model",
            code="model_not_found",
        )

    def _check_ready(self) -> None:
        if self.state != "ready" or not self.engine.ready:
            raise EngineNotReady(f"replica is {self.state if self.state != 'ready' else 'unhealthy'}")

    # ------------------------------------------------------------------------------------------ endpoints

    async def health(self, request: web.Request) -> web.Response:
        ok = self.state == "ready" and self.engine.ready
        status = "ok" if ok else (self.state if self.state != "ready" else "unhealthy")
        return _json_response({"status": status}, status=200 if ok else 503)

    async def models(self, request: web.Request) -> web.Response:
        caps = self.engine.capabilities
        card = {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "skyfabric",
            "root": self.model_root or self.model_name,
            "parent": None,
            "max_model_len": self.engine.max_model_len,
            "capabilities": {
                "continue_final_message": caps.continue_final_message,
                "completions": caps.completions,
                "chat": caps.chat,
            },
        }
        return _json_response({"object": "list", "data": [card]})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            text=render_metrics(self.engine, self.model_name), content_type="text/plain", charset="utf-8"
        )

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        self._check_model(body)
        messages = parse_messages(body)
        opts = parse_sampling(body, chat=True)
        continue_flag = _opt_bool(body, "continue_final_message")
        add_generation_prompt = _opt_bool(body, "add_generation_prompt")
        last_is_assistant = messages[-1]["role"] == "assistant"
        if continue_flag and not last_is_assistant:
            raise _bad("continue_final_message needs the last message to be from the assistant", "messages")
        continue_final = last_is_assistant and (bool(continue_flag) or add_generation_prompt is False)
        self._check_ready()
        base_messages = messages[:-1] if continue_final else messages
        plan = plan_of(body, base_messages)
        prefix = prefix_of(messages[-1]) if continue_final else None
        if plan.active or (prefix is not None and (prefix.reasoning or prefix.arguments is not None)):
            return await self._structured(request, body, base_messages, plan, prefix, opts)
        _, requests = await self._chat_requests(
            messages,
            body,
            opts,
            generation_prompt=add_generation_prompt is not False and not continue_final,
            continue_final=continue_final,
        )
        request[PROMPT_TOKENS] = len(requests[0].prompt_ids)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if opts.stream:
            return await self._stream(request, requests, opts, completion_id, chat=True)
        return await self._complete(requests, completion_id, chat=True)

    async def _chat_requests(
        self,
        messages: list[dict[str, Any]],
        body: Mapping[str, Any],
        opts: SamplingOptions,
        *,
        generation_prompt: bool,
        continue_final: bool,
    ) -> tuple[list[int], list[GenerationRequest]]:
        """The prompt's token ids for ``messages`` rendered by the chat template (off the event loop when
        long) and the engine requests for it; a prompt that cannot fit or a template error is a 400."""
        try:
            tools = _tools(body)
            # ``tools`` only when the request has some: an engine plug-in written before the argument
            # existed still serves every request without tools.
            extra = {"tools": tools} if tools else {}
            render = functools.partial(
                self.engine.tokenize_chat,
                messages,
                add_generation_prompt=generation_prompt,
                continue_final_message=continue_final,
                **extra,
            )
            long = sum(len(m["content"]) for m in messages) > OFF_LOOP_CHARS
            prompt_ids = await asyncio.to_thread(render) if long else render()
        except PromptTooLong as exc:
            raise _too_long(exc, self.engine.max_model_len, "messages") from None
        except ValueError as exc:
            raise _bad(str(exc), "messages") from exc
        requests = build_requests(
            prompt_ids,
            opts,
            max_model_len=self.engine.max_model_len,
            param="messages",
            vocab_size=self.engine.vocab_size,
            what="messages",
        )
        return list(prompt_ids), requests

    async def _structured(
        self,
        request: web.Request,
        body: Mapping[str, Any],
        base_messages: list[dict[str, Any]],
        plan: Plan,
        prefix: Prefix | None,
        opts: SamplingOptions,
    ) -> web.StreamResponse:
        """An answer with reasoning and/or a tool call (engine/structured.py), or its continuation.

        ``usage.prompt_tokens`` is the messages before any continuation, rendered with the generation
        prompt; completion tokens are the sampled ones (a continuation's: only the new ones).
        """
        prompt_ids, requests = await self._chat_requests(
            base_messages, body, opts, generation_prompt=True, continue_final=False
        )
        request[PROMPT_TOKENS] = len(prompt_ids)
        vocabulary = None
        if plan.tool_name is not None:
            if self._vocabulary is None:
                engine = self.engine
                self._vocabulary = await asyncio.to_thread(
                    lambda: Vocabulary(engine.token_texts(), engine.eos_token_ids)
                )
            vocabulary = self._vocabulary
        raw = body["messages"]
        raw_base = raw[: len(base_messages)]
        shape = StructuredShape(
            call_ids=[
                (prefix.call_id if prefix is not None and prefix.call_id else None)
                or tool_call_id(raw_base, body, i)
                for i in range(len(requests))
            ],
            call_index=prefix.call_index if prefix is not None and prefix.arguments is not None else 0,
            tool_name=plan.tool_name,
        )
        answers = [Answer(self.engine, plan, prompt_ids, r, prefix, vocabulary).run() for r in requests]
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        stream = merge(answers)
        if opts.stream:
            return await self._stream_structured(request, stream, shape, opts, completion_id, len(prompt_ids))
        return await self._complete_structured(stream, shape, len(requests), completion_id, len(prompt_ids))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        self._check_model(body)
        if "prompt" not in body or body["prompt"] is None:
            raise _bad("Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter")
        opts = parse_sampling(body, chat=False)
        self._check_ready()
        prompt_ids = await self._completion_prompt(body["prompt"])
        requests = build_requests(
            prompt_ids,
            opts,
            max_model_len=self.engine.max_model_len,
            param="prompt",
            vocab_size=self.engine.vocab_size,
            what="prompt",
        )
        request[PROMPT_TOKENS] = len(prompt_ids)
        completion_id = f"cmpl-{uuid.uuid4().hex}"
        if opts.stream:
            return await self._stream(request, requests, opts, completion_id, chat=False)
        return await self._complete(requests, completion_id, chat=False)

    async def _completion_prompt(self, prompt: Any) -> list[int]:
        """One prompt: a string, a list of token ids, or a one-element list of either."""
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]
        if isinstance(prompt, str):
            try:
                if len(prompt) > OFF_LOOP_CHARS:
                    return await asyncio.to_thread(self.engine.tokenize, prompt)
                return self.engine.tokenize(prompt)
            except PromptTooLong as exc:
                raise _too_long(exc, self.engine.max_model_len, "prompt") from None
        if (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        ):
            return list(prompt)
        raise _bad(
            "'prompt' must be a string or a list of token ids (batches of prompts are not supported)",
            "prompt",
            "invalid_type",
        )

    # ------------------------------------------------------------------------------------------ responses

    async def _complete(
        self, requests: list[GenerationRequest], completion_id: str, *, chat: bool
    ) -> web.Response:
        texts: list[list[str]] = [[] for _ in requests]
        reasons: list[str | None] = [None] * len(requests)
        completion_tokens = 0
        async with contextlib.aclosing(run_choices(self.engine, requests)) as stream:
            async for index, delta in stream:
                texts[index].append(delta.text)
                completion_tokens += len(delta.token_ids)
                if delta.finish_reason is not None:
                    reasons[index] = delta.finish_reason
        choices: list[dict[str, Any]] = []
        for index, parts in enumerate(texts):
            text = "".join(parts)
            if chat:
                choices.append(
                    {
                        "index": index,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": reasons[index],
                    }
                )
            else:
                choices.append(
                    {"index": index, "text": text, "logprobs": None, "finish_reason": reasons[index]}
                )
        payload = {
            "id": completion_id,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": _usage(len(requests[0].prompt_ids), completion_tokens),
            "system_fingerprint": None,
        }
        return _json_response(payload)

    async def _complete_structured(
        self,
        stream: AsyncGenerator[tuple[int, Piece], None],
        shape: StructuredShape,
        n: int,
        completion_id: str,
        prompt_tokens: int,
    ) -> web.Response:
        """Non-streamed: ``message.reasoning_content``, ``content`` (null with a tool call), ``tool_calls``
        with the whole arguments string (a continuation's: the new characters only, as its content)."""
        messages = [StructuredMessage() for _ in range(n)]
        completion_tokens = 0
        async with contextlib.aclosing(stream) as pieces:
            async for index, piece in pieces:
                completion_tokens += piece.tokens
                messages[index].add(piece)
        payload = {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [
                {"index": i, "message": m.message(shape, i), "logprobs": None, "finish_reason": m.finish}
                for i, m in enumerate(messages)
            ],
            "usage": _usage(prompt_tokens, completion_tokens),
            "system_fingerprint": None,
        }
        return _json_response(payload)

    async def _stream_structured(
        self,
        request: web.Request,
        stream: AsyncGenerator[tuple[int, Piece], None],
        shape: StructuredShape,
        opts: SamplingOptions,
        completion_id: str,
        prompt_tokens: int,
    ) -> web.StreamResponse:
        """Streamed like vLLM: ``delta.reasoning_content``, then ``delta.content`` or ``delta.tool_calls``
        (the call's id, type and name with ``arguments: ""`` first, then argument fragments), then the
        finish reason (``tool_calls`` after a call)."""
        created = int(time.time())

        def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model_name,
                "choices": [choice],
            }

        response = web.StreamResponse(headers=_SSE_HEADERS)
        completion_tokens = 0
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            first = None
        except BaseException:
            await stream.aclose()
            raise
        try:
            await response.prepare(request)
            for i in range(len(shape.call_ids)):
                await response.write(_sse(chunk(i, {"role": "assistant", "content": ""})))
            pending = [first] if first is not None else []
            try:
                while True:
                    if pending:
                        index, piece = pending.pop()
                    else:
                        try:
                            index, piece = await anext(stream)
                        except StopAsyncIteration:
                            break
                    completion_tokens += piece.tokens
                    delta = shape.delta(piece, index)
                    if delta:
                        payload = chunk(index, delta)
                        if opts.continuous_usage:
                            payload["usage"] = _usage(prompt_tokens, completion_tokens)
                        await response.write(_sse(payload))
                    if piece.finish_reason is not None:
                        await response.write(_sse(chunk(index, {}, piece.finish_reason)))
            except ConnectionError:
                raise
            except Exception as exc:  # headers are sent: report in-band, as vLLM does, then end the stream
                if not isinstance(exc, EngineError):
                    log.exception("generation failed mid-stream in %s", completion_id)
                not_ready = isinstance(exc, EngineNotReady)
                kind = "service_unavailable_error" if not_ready else "internal_server_error"
                await response.write(_sse(APIError(503 if not_ready else 500, str(exc), type=kind).body()))
            if opts.include_usage:
                usage_chunk = {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": self.model_name,
                    "choices": [],
                    "usage": _usage(prompt_tokens, completion_tokens),
                }
                await response.write(_sse(usage_chunk))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionError:
            log.info("client went away during %s; cancelled", completion_id)
        finally:
            await stream.aclose()
        return response

    async def _stream(
        self,
        request: web.Request,
        requests: list[GenerationRequest],
        opts: SamplingOptions,
        completion_id: str,
        *,
        chat: bool,
    ) -> web.StreamResponse:
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
            return {
                "id": completion_id,
                "object": obj,
                "created": created,
                "model": self.model_name,
                "choices": choices,
            }

        def choice(
            index: int, text: str | None, finish_reason: str | None, role: bool = False
        ) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}

        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        # Starting the engine before sending headers lets admission errors still become a proper HTTP status.
        stream = run_choices(self.engine, requests)
        completion_tokens = 0
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            first = None
        except BaseException:
            await stream.aclose()
            raise
        try:
            await response.prepare(request)
            if chat:
                await response.write(
                    _sse(chunk([choice(i, "", None, role=True) for i in range(len(requests))]))
                )
            pending = [first] if first is not None else []
            try:
                while True:
                    if pending:
                        index, delta = pending.pop()
                    else:
                        try:
                            index, delta = await anext(stream)
                        except StopAsyncIteration:
                            break
                    completion_tokens += len(delta.token_ids)
                    if delta.text:
                        piece = chunk([choice(index, delta.text, None)])
                        if opts.continuous_usage:
                            piece["usage"] = _usage(len(requests[0].prompt_ids), completion_tokens)
                        await response.write(_sse(piece))
                    if delta.finish_reason is not None:
                        await response.write(
                            _sse(chunk([choice(index, None if chat else "", delta.finish_reason)]))
                        )
            except ConnectionError:
                raise
            except Exception as exc:  # headers are sent: report in-band, as vLLM does, then end the stream
                if not isinstance(exc, EngineError):
                    log.exception("generation failed mid-stream in %s", completion_id)
                kind = (
                    "service_unavailable_error"
                    if isinstance(exc, EngineNotReady)
                    else "internal_server_error"
                )
                status = 503 if isinstance(exc, EngineNotReady) else 500
                await response.write(_sse(APIError(status, str(exc), type=kind, code=None).body()))
            if opts.include_usage:
                usage_chunk = chunk([])
                usage_chunk["usage"] = _usage(len(requests[0].prompt_ids), completion_tokens)
                await response.write(_sse(usage_chunk))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionError:
            log.info("client went away during %s; cancelled", completion_id)
        finally:
            await stream.aclose()
        return response


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(engine: Engine, model_name: str) -> str:
    """Prometheus text exposition with vLLM's metric names (plus ``skyfabric:forward_passes_total``)."""
    stats = engine.stats()
    label = f'model_name="{_label(model_name)}"'
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, value: float, labels: str = label) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.append(f"{name}{{{labels}}} {float(value)}")

    metric(
        "vllm:num_requests_running", "gauge", "Number of requests in model execution batches.", stats.running
    )
    metric("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", stats.waiting)
    metric(
        "vllm:kv_cache_usage_perc",
        "gauge",
        "KV-cache usage. 1 means 100 percent usage.",
        stats.kv_cache_usage,
    )
    metric(
        "vllm:gpu_cache_usage_perc", "gauge", "KV-cache usage (deprecated name). 1 means 100 percent usage.",
        stats.kv_cache_usage,
    )  # fmt: skip
    metric(
        "vllm:prompt_tokens_total",
        "counter",
        "Number of prefill tokens processed.",
        stats.prompt_tokens_total,
    )
    metric(
        "vllm:generation_tokens_total", "counter", "Number of generation tokens processed.",
        stats.generation_tokens_total,
    )  # fmt: skip
    metric(
        "vllm:prefix_cache_queries_total", "counter",
        "Prefix cache queries, in terms of number of queried tokens.", stats.prefix_cache_queries_total,
    )  # fmt: skip
    metric(
        "vllm:prefix_cache_hits_total", "counter",
        "Prefix cache hits, in terms of number of cached tokens.", stats.prefix_cache_hits_total,
    )  # fmt: skip
    lines.append("# HELP vllm:request_success_total Count of finished requests by finish reason.")
    lines.append("# TYPE vllm:request_success_total counter")
    for reason, count in sorted(stats.finished_total.items()):
        lines.append(
            f'vllm:request_success_total{{finished_reason="{_label(reason)}",{label}}} {float(count)}'
        )
    metric(
        "skyfabric:forward_passes_total", "counter",
        "Batched forward steps run by the engine (all running requests share each one).",
        stats.forward_passes_total,
    )  # fmt: skip
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------
# Process entry points
# ------------------------------------------------------------------------------------------------------------


async def serve_replica(
    engine: Engine,
    *,
    host: str,
    port: int,
    served_model_name: str,
    model_root: str = "",
    stop_event: asyncio.Event | None = None,
    drain_timeout: float = 5.0,
) -> None:
    """Listen first (so /health answers 503 while loading), start the engine, serve until ``stop_event``.

    Shutdown: refuse new work (503, /health 503), let in-flight requests finish for up to ``drain_timeout``
    seconds, then hard-stop the engine (leftover streams get an in-band error and ``[DONE]``), then close.
    """
    replica = ReplicaApp(engine, served_model_name, model_root)
    stop_event = stop_event or asyncio.Event()
    runner = web.AppRunner(
        replica.application(), handler_cancellation=True, access_log=None, shutdown_timeout=2
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("replica %s listening on http://%s:%d (loading)", served_model_name, host, port)

    async def start_engine() -> None:
        try:
            await engine.start()
        except Exception:
            replica.state = "failed"
            log.exception("engine failed to start")
            stop_event.set()
            raise
        chars = await asyncio.to_thread(lambda: engine.max_token_chars)  # read the vocabulary once, now
        replica.state = "ready"
        log.info("replica %s ready (a token spells at most %d characters)", served_model_name, chars)

    starting = asyncio.create_task(start_engine())
    try:
        await stop_event.wait()
    finally:
        was_ready = replica.state == "ready"
        if replica.state != "failed":
            replica.state = "stopping"
        starting.cancel()
        with contextlib.suppress(BaseException):
            await starting
        if was_ready:
            await _drain(engine, drain_timeout)
        await engine.stop()
        await runner.cleanup()
        log.info("replica %s stopped", served_model_name)
    if replica.state == "failed":
        raise SystemExit(1)


async def _drain(engine: Engine, timeout: float) -> None:
    """Wait (bounded) until the engine has nothing running or queued."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats.running == 0 and stats.waiting == 0:
            return
        await asyncio.sleep(0.05)
    log.info("drain timed out after %.1fs; aborting in-flight requests", timeout)


def run_replica(
    *,
    model_dir: Path = DEFAULT_MODEL_DIR,
    host: str = "127.0.0.1",
    port: int,
    served_model_name: str | None = None,
    max_num_seqs: int = 32,
    engine: str = "auto",
    threads: int = 1,
    max_model_len: int | None = None,
    kv_cache_mib: int | None = None,
    device: str | None = None,
    dtype: str = "auto",
    seed: int | None = None,
    drain_timeout: float = 5.0,
    core_cpus: frozenset[int] | None = None,
    max_num_batched_tokens: int | None = None,
    enable_chunked_prefill: bool = True,
    enable_prefix_caching: bool = True,
) -> None:
    """Run a replica in this process until SIGTERM/SIGINT; then drain, stop the engine's threads, return."""
    model_dir = Path(model_dir)
    name = served_model_name or model_dir.name
    if engine == "auto":
        engine = pick_engine(model_dir)
        log.info("--engine auto: %s for %s", engine, model_dir)
    if engine == "native":
        from skyfabric.engine.native_engine import keep_torch_out_of_this_process

        keep_torch_out_of_this_process()
    options: dict[str, Any] = {}
    if core_cpus:
        if engine != "native":
            raise click.UsageError(f"--core-cpus is for the native engine, not {engine}")
        options["core_cpus"] = sorted(core_cpus)
    if engine == "native":
        options["max_num_batched_tokens"] = max_num_batched_tokens
        options["enable_chunked_prefill"] = enable_chunked_prefill
        options["enable_prefix_caching"] = enable_prefix_caching
    elif max_num_batched_tokens is not None or not (enable_prefix_caching and enable_chunked_prefill):
        raise click.UsageError(
            "--max-num-batched-tokens, --no-enable-chunked-prefill and --no-enable-prefix-caching are for "
            f"the native engine, not {engine}"
        )
    engine_obj = create_engine(
        engine,
        model_dir=model_dir,
        max_num_seqs=max_num_seqs,
        threads=threads,
        max_model_len=max_model_len,
        kv_cache_mib=kv_cache_mib,
        device=device,
        dtype=dtype,
        seed=seed,
        **options,
    )

    async def main() -> None:
        stop_event = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop_event.set)
        await serve_replica(
            engine_obj,
            host=host,
            port=port,
            served_model_name=name,
            model_root=str(model_dir),
            stop_event=stop_event,
            drain_timeout=drain_timeout,
        )

    asyncio.run(main())
    fatal = getattr(engine_obj, "fatal", None)
    if fatal:  # the engine died under us: exit non-zero so the supervisor's log says why it restarts us
        log.error("replica %s exits: %s", name, fatal)
        raise SystemExit(1)


class CpuList(click.ParamType):
    """``0``, ``0-3``, ``0-3,8``: a set of CPU numbers (the ``taskset -c`` syntax)."""

    name = "cpus"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> frozenset[int]:
        if isinstance(value, frozenset):
            return value
        cpus: set[int] = set()
        try:
            for part in str(value).split(","):
                first, _, last = part.strip().partition("-")
                cpus.update(range(int(first), int(last or first) + 1))
        except ValueError:
            self.fail(f"{value!r} is not a CPU list like 0 or 0-3,8", param, ctx)
        available = os.sched_getaffinity(0)
        if not cpus or not cpus <= available:
            self.fail(f"{value!r}: this process may run on CPUs {sorted(available)}", param, ctx)
        return frozenset(cpus)


def _exec_server_engine(engine_name: str, spec: ServerSpec) -> None:
    """Become the server of an engine that is its own server (vLLM, llama.cpp); see engine/external.py.

    Returns only by exiting: with :data:`EXIT_ENGINE_UNAVAILABLE` and an operator-readable message when the
    engine is not installed or cannot read the model, so the supervisor's log says what to install.
    """
    try:
        command = server_command(engine_name, spec)
    except EngineUnavailable as exc:
        click.echo(f"skyfabric replica: error: {exc}", err=True)
        sys.exit(EXIT_ENGINE_UNAVAILABLE)
    try:
        exec_server(command)
    except OSError as exc:  # validated, yet not executable (noexec mount, wrong architecture, ...)
        click.echo(f"skyfabric replica: error: cannot exec {command.argv[0]}: {exc}", err=True)
        sys.exit(EXIT_ENGINE_UNAVAILABLE)


@click.command("replica")
@click.option(
    "--model-dir",
    type=click.Path(path_type=Path),
    default=DEFAULT_MODEL_DIR,
    show_default=True,
    help="Local HF checkpoint directory (config.json, weights, tokenizer, chat template); for "
    "--engine llama-cpp a .gguf file or a directory holding one.",
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), required=True)
@click.option("--served-model-name", default=None, help="Model id clients use [default: the directory name].")
@click.option(
    "--max-num-seqs",
    type=click.IntRange(1),
    default=32,
    show_default=True,
    help="Most sequences batched at once; more wait in a queue.",
)
@click.option(
    "--engine",
    "engine_name",
    type=click.Choice(["auto", *engine_names(), *server_engine_names()]),
    default="auto",
    show_default=True,
    envvar="SKYFABRIC_ENGINE",
    show_envvar=True,
    help="Engine plug-in: native (Llama, Qwen2, Mistral; batching in a core process) and transformers "
    "(any HF decoder, in this process) are built in; auto picks native when it can run the checkpoint. "
    "vllm and llama-cpp replace this process with their own OpenAI server (see docs/engines.md). The "
    "variable sets it for every replica that `skyfabric up` starts on this host.",
)
@click.option(
    "--vllm-python",
    default=None,
    envvar="SKYFABRIC_VLLM_PYTHON",
    show_envvar=True,
    help="--engine vllm: Python interpreter that has vLLM installed [default: this one].",
)
@click.option(
    "--llama-server",
    default=None,
    envvar="SKYFABRIC_LLAMA_SERVER",
    show_envvar=True,
    help="--engine llama-cpp: the llama-server binary [default: llama-server on PATH].",
)
@click.option(
    "--engine-arg",
    "engine_args",
    multiple=True,
    help="--engine vllm/llama-cpp: one argument passed verbatim to the engine's server (repeatable), "
    "e.g. --engine-arg=--enforce-eager.",
)
@click.option(
    "--threads", type=click.IntRange(1), default=1, show_default=True, help="torch intra-op threads."
)
@click.option(
    "--max-model-len",
    type=click.IntRange(16),
    default=None,
    envvar="SKYFABRIC_MAX_MODEL_LEN",
    show_envvar=True,
    help="Cap on prompt + completion tokens [default: the model's, if the KV cache fits it].",
)
@click.option(
    "--kv-cache-mib",
    type=click.IntRange(1),
    default=None,
    envvar="SKYFABRIC_KV_CACHE_MIB",
    show_envvar=True,
    help="KV cache budget in MiB [default: 128 on CPU, 4096 on GPU]. The native engine maps it lazily on "
    "CPU: memory grows with the tokens held, up to the budget.",
)
@click.option(
    "--device",
    default=None,
    help="torch device: cpu, cuda[:N], mps, xla (torch_xla/TPU), neuron (torch-neuronx) "
    "[default: cuda if available, else cpu].",
)
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    default="auto",
    show_default=True,
    envvar="SKYFABRIC_DTYPE",
    show_envvar=True,
    help="Compute dtype. auto: native runs a bfloat16 checkpoint in bfloat16 on CPUs with bf16 instructions "
    "(else float32), transformers float32 on CPU; both bfloat16 on GPU. `skyfabric up` sets float32 so that "
    "failover continuations read like uninterrupted answers (docs/engines.md).",
)
@click.option("--seed", type=int, default=None, help="Seed for unseeded sampling (reproducible runs).")
@click.option(
    "--core-cpus",
    type=CpuList(),
    default=None,
    help="native engine: bind its core process (the forward passes) to these CPUs, e.g. 0 or 0-3,8; this "
    "process (HTTP) then keeps off them. Default: unbound, since `skyfabric up` runs several replicas per "
    "host. vLLM-CPU binds its engine this way by default (VLLM_CPU_OMP_THREADS_BIND).",
)
@click.option(
    "--max-num-batched-tokens",
    type=click.IntRange(1),
    default=None,
    help="native engine: prefill tokens per step (longer prompts are prefilled in chunks between decode "
    "steps, which are also limited to about the decode pass's time while streams run) [default: 512].",
)
@click.option(
    "--enable-chunked-prefill/--no-enable-chunked-prefill",
    default=True,
    show_default=True,
    help="native engine: prefill long prompts in chunks between decode steps; off, a prompt is prefilled "
    "whole in one step (running streams wait for it).",
)
@click.option(
    "--enable-prefix-caching/--no-enable-prefix-caching",
    default=True,
    show_default=True,
    help="native engine: reuse the KV blocks of prompt prefixes seen before (a quarter of --kv-cache-mib, "
    "plus what the slots leave over, evicted least recently used first).",
)
@click.option(
    "--drain-timeout",
    type=click.FloatRange(0),
    default=5.0,
    show_default=True,
    help="On SIGTERM, seconds in-flight requests may take to finish before they are aborted.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
def replica_command(
    model_dir: Path,
    host: str,
    port: int,
    served_model_name: str | None,
    max_num_seqs: int,
    engine_name: str,
    vllm_python: str | None,
    llama_server: str | None,
    engine_args: tuple[str, ...],
    threads: int,
    max_model_len: int | None,
    kv_cache_mib: int | None,
    device: str | None,
    dtype: str,
    seed: int | None,
    core_cpus: frozenset[int] | None,
    max_num_batched_tokens: int | None,
    enable_chunked_prefill: bool,
    enable_prefix_caching: bool,
    drain_timeout: float,
    log_level: str,
) -> None:
    """Serve one model over an OpenAI-compatible API (started by the fleet supervisor)."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if engine_name in server_engine_names():
        ctx = click.get_current_context()
        threads_given = ctx.get_parameter_source("threads") is not click.core.ParameterSource.DEFAULT
        _exec_server_engine(
            engine_name,
            ServerSpec(
                model_dir=model_dir.absolute(),
                host=host,
                port=port,
                served_model_name=served_model_name
                or (model_dir.stem if model_dir.is_file() else model_dir.name),
                max_num_seqs=max_num_seqs,
                max_model_len=max_model_len,
                dtype=dtype,
                threads=threads if threads_given else None,
                seed=seed,
                device=device,
                kv_cache_mib=kv_cache_mib,
                executable=vllm_python if engine_name == "vllm" else llama_server,
                extra_args=engine_args,
            ),
        )
        return
    if engine_args:
        raise click.UsageError(f"--engine-arg is for engines that run their own server, not {engine_name}")
    if model_dir.is_file():
        raise click.BadParameter(f"{engine_name} needs a checkpoint directory", param_hint="--model-dir")
    try:
        device = resolve_device(device)
    except EngineUnavailable as exc:
        click.echo(f"skyfabric replica: error: {exc}", err=True)
        sys.exit(EXIT_ENGINE_UNAVAILABLE)
    _quiet_transformers()
    run_replica(
        model_dir=model_dir,
        host=host,
        port=port,
        served_model_name=served_model_name,
        max_num_seqs=max_num_seqs,
        engine=engine_name,
        threads=threads,
        max_model_len=max_model_len,
        kv_cache_mib=kv_cache_mib,
        device=device,
        dtype=dtype,
        seed=seed,
        drain_timeout=drain_timeout,
        core_cpus=core_cpus,
        max_num_batched_tokens=max_num_batched_tokens,
        enable_chunked_prefill=enable_chunked_prefill,
        enable_prefix_caching=enable_prefix_caching,
    )


def _quiet_transformers() -> None:
    """Progress bars and info chatter from transformers only clutter the supervisor's log."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("transformers").setLevel(logging.WARNING)


if __name__ == "__main__":
    replica_command()
