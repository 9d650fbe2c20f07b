"""A scriptable OpenAI-compatible upstream that behaves like a real engine, and fails on cue.

Its answer is deterministic — token ``i`` is ``"t{i} "``, so ``expected_text(n)`` is the whole answer — and
it continues a final assistant message (or a completions prompt) from where that text ends, as an engine
with ``continue_final_message`` does. A test can so check that a stream rescued mid-answer is the exact,
complete text.

**Realistic by default.** The fake behaves like vLLM, SGLang, TGI or a hosted API, not like what the gateway
would find convenient:

* Several tokens per SSE chunk: chunk sizes cycle through ``chunking`` (default ``(1, 3, 2, 4)``; engines
  batch tokens with stream intervals, speculative decoding, or detokenizers that hold back partial
  characters). ``usage`` reports tokens, never chunks, and the finish reason rides on the last content chunk
  (vLLM's framing; ``finish_chunk="separate"`` gives OpenAI's empty closing chunk instead).
* The chat template trims a continued final assistant message, as Llama 3's, Qwen's and most templates do
  (``{{ message['content'] | trim }}``): the model sees the prefix without its trailing whitespace, and its
  continuation starts with that whitespace again (the first token it generates is the rest of the token
  the trim cut: ``" t4 "`` after ``"t0 t1 t2 t3"``). ``template="verbatim"`` renders content as is.
* ``prefill``: what the backend does with an assistant prefill (``continue_final_message``):
  ``"continue"`` (default), ``"restart"`` (ignores it and answers from the start, as a backend that does not
  support it but accepts the field does — it repeats the text the client already has) or ``"reject"``
  (400, like an API that refuses unknown fields). ``can_continue`` is what the fleet file *declares* for
  the pool (``tests.conftest.fleet_data``); it defaults to ``prefill != "reject"``, so a restarting backend
  claims it continues (issue 10, item 4) and ``FakeUpstream(prefill="reject", can_continue=True)`` claims to
  continue and then refuses (item 3).
* Hostile input is answered like an engine answers it, never with a crash: a body that is not JSON, a
  request without ``messages``/``prompt``, a bad ``max_tokens`` get a 400 in OpenAI's error shape; an
  unknown model a 404; a prompt beyond ``context_length`` tokens vLLM's context-length 400 (bounded by the
  prompt's size before it is counted, so a 30 MB prompt is refused at once); bodies up to 64 MiB are read.
* ``reasoning``: that many ``reasoning_content`` deltas open a chat stream (a reasoning model).
* The knobs can also be set as attributes after construction: ``trims_prefill``, ``restarts``,
  ``rejects_prefill`` (``prefill``/``template`` spelled as flags) and ``tokens_per_chunk``.
* ``n`` choices are generated and interleaved in the stream, as engines do; ``stream_options``
  ``include_usage`` adds the closing usage chunk, and with vLLM's ``continuous_usage_stats`` every chunk
  carries the tokens generated so far (how a gateway can count tokens it has relayed, where supported).

Each request takes the next behaviour from ``script`` (then ``default``):
``"ok"``, ``"reset"`` (close before any byte), ``"hang"`` (never answer),
``"hang_after_headers"`` (200 and headers, then nothing — a stream without a first event, or a JSON body
that never comes), ``"hang_mid_body"`` (non-streaming: half the JSON body, then nothing),
``{"status": 429, "retry_after": 2}``, ``{"status": 500}``, ``{"slow_first_token": s}``, ``{"delay": s}``,
``"context_length"``, ``"content_filter"``, ``"no_done"`` (finish but no ``[DONE]``), and faults after
``k`` tokens of this response (a chunk boundary is placed there; ``k`` = all of them puts the fault between
the last token and the finish): ``{"cut_after": k}`` (drop the connection),
``{"stall_after": k}`` (go silent), ``{"malformed_after": k}`` (one event that is not JSON, then go on),
``{"no_finish_after": k}`` (end cleanly without a finish reason), ``{"error_after": k}`` (an in-band error
event, then end).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from aiohttp import web

Behaviour = str | dict[str, Any]

#: Chunk sizes (tokens per SSE event) a stream cycles through unless told otherwise.
DEFAULT_CHUNKING: tuple[int, ...] = (1, 3, 2, 4)

#: Faults placed after ``k`` tokens of a streamed response.
STREAM_FAULTS = ("cut_after", "stall_after", "malformed_after", "no_finish_after", "error_after")

#: A prompt longer than this many characters per allowed token is refused before it is tokenized (an
#: engine bounds its tokenizer's work by the context; no tokenizer packs more than this into one token).
_MAX_CHARS_PER_TOKEN = 1024

_WORDS = re.compile(r"\S+\s*|\s+")


def token(i: int) -> str:
    return f"t{i} "


def expected_text(n: int) -> str:
    """The full answer of ``n`` tokens."""
    return "".join(token(i) for i in range(n))


def count_tokens(text: str) -> int:
    """The fake tokenizer: a word with the whitespace after it is one token (``"t3 "``, ``"def "``)."""
    return len(_WORDS.findall(text))


class BadRequest(Exception):
    """An engine-side validation error: answered with ``status`` and OpenAI's error shape."""

    def __init__(self, message: str, *, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


#: A request's prompt size, for the prefix-cache report.
_PROMPT_TOKENS = web.RequestKey("prompt_tokens", int)


class FakeUpstream:
    """One fake endpoint; ``url`` is its ``/v1`` base once started."""

    def __init__(
        self,
        name: str = "fake",
        *,
        tokens: int = 8,
        default: Behaviour = "ok",
        can_continue: bool | None = None,
        prefill: str | None = None,
        template: str = "trim",
        chunking: Sequence[int] = DEFAULT_CHUNKING,
        finish_chunk: str = "last",
        context_length: int = 8192,
        model: str = "m",
        prefix_cache: int = 0,
    ) -> None:
        if prefill is None:
            prefill = "reject" if can_continue is False else "continue"
        if prefill not in ("continue", "restart", "reject"):
            raise ValueError(f"prefill must be continue, restart or reject, not {prefill!r}")
        if template not in ("trim", "verbatim"):
            raise ValueError(f"template must be trim or verbatim, not {template!r}")
        if finish_chunk not in ("last", "separate"):
            raise ValueError(f"finish_chunk must be last or separate, not {finish_chunk!r}")
        if not chunking or any(size < 1 for size in chunking):
            raise ValueError("chunking needs positive chunk sizes")
        self.name = name
        self.tokens = tokens
        self.default = default
        self.prefill = prefill
        #: What the fleet file declares for this backend's pool (``continuation:``).
        self.can_continue = prefill != "reject" if can_continue is None else can_continue
        self.template = template
        self.chunking = tuple(chunking)
        self.finish_chunk = finish_chunk
        self.context_length = context_length
        self.model = model
        #: Tokens of prefix cache it reports on answers, as skyfabric's replicas do (0: reports nothing).
        self.prefix_cache = prefix_cache
        #: Bumped at every start: a restarted replica reports a new epoch (its cache is empty).
        self.starts = 0
        self.script: deque[Behaviour] = deque()
        #: Every request body received (a body that is not a JSON object is recorded as ``{"_invalid": …}``).
        self.requests: list[dict[str, Any]] = []
        #: Tokens actually written per generated response (per choice), in order: what a client really got.
        self.sent_tokens: list[int] = []
        #: Seconds per token: a chunk of k tokens is written after k × token_delay (an engine decodes tokens).
        #: The headers of each request, in order (lower-case names).
        self.headers: list[dict[str, str]] = []
        self.token_delay = 0.0
        #: Chat streams open with this many ``reasoning_content`` deltas (a reasoning model) first.
        self.reasoning = 0
        self.runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self.port = 0

    # -- the same knobs as attributes (``up.restarts = True``): tests written against either spelling work --

    @property
    def trims_prefill(self) -> bool:
        """The chat template strips the continued assistant message (``template == "trim"``)."""
        return self.template == "trim"

    @trims_prefill.setter
    def trims_prefill(self, value: bool) -> None:
        self.template = "trim" if value else "verbatim"

    @property
    def restarts(self) -> bool:
        """Accepts a prefill, ignores it and answers from the start (``prefill == "restart"``)."""
        return self.prefill == "restart"

    @restarts.setter
    def restarts(self, value: bool) -> None:
        self.prefill = "restart" if value else "continue"

    @property
    def rejects_prefill(self) -> bool:
        """Answers a prefill with 400 whatever its pool declares (``prefill == "reject"``)."""
        return self.prefill == "reject"

    @rejects_prefill.setter
    def rejects_prefill(self, value: bool) -> None:
        self.prefill = "reject" if value else "continue"

    @property
    def tokens_per_chunk(self) -> int:
        """The first chunk size; setting it makes every chunk that size."""
        return self.chunking[0]

    @tokens_per_chunk.setter
    def tokens_per_chunk(self, value: int) -> None:
        if value < 1:
            raise ValueError("tokens_per_chunk must be positive")
        self.chunking = (value,)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def answer(self) -> str:
        """The whole answer this backend gives."""
        return expected_text(self.tokens)

    def then(self, *behaviours: Behaviour) -> FakeUpstream:
        self.script.extend(behaviours)
        return self

    async def start(self) -> FakeUpstream:
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.on_response_prepare.append(self._report_cache)
        self.starts += 1
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.2)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        self._stopping.set()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def _forever(self) -> None:
        """Hold a request until the fake is stopped (a hung or stalled upstream)."""
        await self._stopping.wait()

    # -- handlers ---------------------------------------------------------------------------------------

    async def _report_cache(self, request: web.Request, response: web.StreamResponse) -> None:
        prompt = request.get(_PROMPT_TOKENS)
        if self.prefix_cache and prompt is not None and response.status == 200:
            response.headers["x-skyfabric-prefix-cache"] = (
                f"capacity={self.prefix_cache}; prompt={prompt}; epoch={self.name}-{self.starts}"
            )

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "completions")

    def _next(self) -> Behaviour:
        return self.script.popleft() if self.script else self.default

    @staticmethod
    def _error(message: str, status: int, *, type_: str, code: str | None = None) -> web.Response:
        error = {"message": message, "type": type_, "param": None, "code": code}
        return web.json_response({"error": error}, status=status)

    async def _serve(self, request: web.Request, kind: str) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        self.requests.append(body if isinstance(body, dict) else {"_invalid": raw[:200]})
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        behaviour = self._next()
        b = behaviour if isinstance(behaviour, dict) else {behaviour: True}
        if b.get("reset"):
            assert request.transport is not None
            request.transport.abort()
            await self._forever()
        if b.get("hang"):
            await self._forever()
        if "delay" in b:
            await asyncio.sleep(b["delay"])
        if "status" in b:
            headers = {"Retry-After": str(b["retry_after"])} if "retry_after" in b else {}
            return web.json_response(
                {"error": {"message": f"{self.name} says {b['status']}", "type": "server_error"}},
                status=b["status"],
                headers=headers,
            )
        if b.get("context_length"):
            return self._error(
                "This model's maximum context length is 256 tokens.",
                400,
                type_="invalid_request_error",
                code="context_length_exceeded",
            )
        if b.get("content_filter"):
            return self._error(
                "blocked by the provider's content policy (reason: violence)",
                400,
                type_="invalid_request_error",
                code="content_policy_violation",
            )
        try:
            if not isinstance(body, dict):
                raise BadRequest("the request body is not a JSON object")
            plan = self._plan(body, kind)
            request[_PROMPT_TOKENS] = plan.prompt_tokens
        except BadRequest as exc:
            return self._error(str(exc), exc.status, type_="BadRequestError", code=exc.code)
        if b.get("hang_after_headers") or (b.get("hang_mid_body") and not body.get("stream")):
            return await self._hang_in_body(request, body, kind, plan, mid_body=bool(b.get("hang_mid_body")))
        if not body.get("stream"):
            self.sent_tokens.extend([len(plan.pieces)] * plan.n)
            return web.json_response(self._whole(body, kind, plan))
        return await self._stream(request, body, kind, b, plan)

    # -- what to generate -------------------------------------------------------------------------------

    def _plan(self, body: dict[str, Any], kind: str) -> Plan:
        """Validate the request like an engine would and decide the pieces (tokens) of the answer."""
        if body.get("model") != self.model:
            raise BadRequest(f"The model `{body.get('model')}` does not exist.", status=404)
        limit = body.get("max_tokens", body.get("max_completion_tokens"))
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise BadRequest("max_tokens must be a positive integer")
        n = body.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 16:
            raise BadRequest("n must be an integer from 1 to 16")
        if kind == "chat":
            prompt, seen = self._render_chat(body)
        else:
            prompt, seen = self._completions_prompt(body)
        if len(prompt) > self.context_length * _MAX_CHARS_PER_TOKEN:
            raise BadRequest(
                f"This model's maximum context length is {self.context_length} tokens. However, your "
                f"prompt is far longer ({len(prompt)} characters).",
                code="context_length_exceeded",
            )
        prompt_tokens = count_tokens(prompt)
        if prompt_tokens + (limit or 0) > self.context_length:
            raise BadRequest(
                f"This model's maximum context length is {self.context_length} tokens. However, you "
                f"requested {prompt_tokens + (limit or 0)} tokens ({prompt_tokens} in the messages, "
                f"{limit or 0} in the completion). Please reduce the length of the messages or completion.",
                code="context_length_exceeded",
            )
        pieces = self._continue_from(seen)
        reason = "stop"
        if limit is not None and limit < len(pieces):
            pieces, reason = pieces[:limit], "length"
        return Plan(pieces, reason, prompt_tokens, n)

    def _render_chat(self, body: dict[str, Any]) -> tuple[str, str]:
        """(the prompt as the chat template renders it, the assistant text the model continues)."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages must be a non-empty list")
        rendered, contents = [], []
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise BadRequest("each message must be an object with a role")
            content = message.get("content") or ""
            if isinstance(content, list):  # content parts: the text ones count
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if not isinstance(content, str):
                raise BadRequest("message content must be a string or a list of parts")
            contents.append(content)
            rendered.append(f"<|{message['role']}|>\n{content}<|end|>\n")
        continues = messages[-1]["role"] == "assistant" and bool(body.get("continue_final_message"))
        if not continues:
            return "".join(rendered) + "<|assistant|>\n", ""
        if self.prefill == "reject":
            raise BadRequest("continue_final_message is not supported by this backend")
        if self.prefill == "restart":
            return "".join(rendered[:-1]) + "<|assistant|>\n", ""  # the prefill is dropped: a new answer
        seen = contents[-1].strip() if self.template == "trim" else contents[-1]
        return "".join(rendered[:-1]) + f"<|assistant|>\n{seen}", seen

    @staticmethod
    def _completions_prompt(body: dict[str, Any]) -> tuple[str, str]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return " ".join(map(str, prompt)), ""  # token ids: one token each, no answer text to continue
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]  # a batch of one prompt (engines answer a batch with one choice per prompt)
        elif isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
            raise BadRequest("this fake answers one prompt per request, not a batch")
        if not isinstance(prompt, str):
            raise BadRequest("prompt must be a string or a list of token ids")
        start = prompt.find("t0")
        return prompt, prompt[start:] if start >= 0 else ""

    def _continue_from(self, seen: str) -> list[str]:
        """The pieces (one token each) the model generates after it has seen ``seen`` of its answer."""
        answer = self.answer
        if seen and answer.startswith(seen):
            done = length = 0
            while done < self.tokens and length + len(token(done)) <= len(seen):
                length += len(token(done))
                done += 1
            pieces = [token(i) for i in range(done, self.tokens)]
            if length < len(seen):  # the text ends inside token ``done``: its rest rides on the next token
                tail = answer[len(seen) : length + len(token(done))]
                pieces = [tail + pieces[1], *pieces[2:]] if len(pieces) > 1 else [tail]
            return pieces
        # Text the model did not write (a repeated answer, say): it goes on after the last token it knows.
        known = re.findall(r"t(\d+)", seen)
        return [token(i) for i in range(int(known[-1]) + 1 if known else 0, self.tokens)]

    # -- answers ----------------------------------------------------------------------------------------

    def _usage(self, plan: Plan) -> dict[str, int]:
        completion = len(plan.pieces) * plan.n
        return {
            "prompt_tokens": plan.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": plan.prompt_tokens + completion,
        }

    def _whole(self, body: dict[str, Any], kind: str, plan: Plan) -> dict[str, Any]:
        text = "".join(plan.pieces)
        choices = []
        for index in range(plan.n):
            choice: dict[str, Any] = {"index": index, "finish_reason": plan.reason}
            if kind == "chat":
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choices.append(choice)
        return {
            "id": f"{kind}-{self.name}-{len(self.requests)}",
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": choices,
            "usage": self._usage(plan),
        }

    async def _hang_in_body(
        self, request: web.Request, body: dict[str, Any], kind: str, plan: Plan, *, mid_body: bool
    ) -> web.StreamResponse:
        """Send the status line and headers (and, ``mid_body``, half the JSON), then never another byte."""
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
        else:
            data = json.dumps(self._whole(body, kind, plan)).encode()
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.content_length = len(data)
            await resp.prepare(request)
            if mid_body:
                await resp.write(data[: len(data) // 2])
        await self._forever()
        return resp

    async def _stream(
        self, request: web.Request, body: dict[str, Any], kind: str, b: dict[str, Any], plan: Plan
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        ident = f"{kind}-{self.name}-{len(self.requests)}"
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def event(data: dict[str, Any]) -> bytes:
            return b"data: " + json.dumps(data).encode() + b"\n\n"

        def chunk(
            index: int, text: str | None, reason: str | None, delta: dict[str, Any] | None = None
        ) -> bytes:
            choice: dict[str, Any] = {"index": index, "finish_reason": reason}
            if kind == "chat":
                choice["delta"] = delta if delta is not None else ({"content": text} if text else {})
            else:
                choice["text"] = text or ""
            data = {
                "id": ident,
                "object": obj,
                "created": 1700000000,
                "model": body["model"],
                "choices": [choice],
            }
            if continuous:  # vLLM's continuous_usage_stats: every chunk says how many tokens so far
                completion = progress[0]
                data["usage"] = {
                    "prompt_tokens": plan.prompt_tokens,
                    "completion_tokens": completion,
                    "total_tokens": plan.prompt_tokens + completion,
                }
            return event(data)

        options = body.get("stream_options") or {}
        continuous = bool(options.get("include_usage") and options.get("continuous_usage_stats"))
        progress = [0]  # tokens generated so far by each choice (they advance together)

        async def send(text: str | None, reason: str | None, tokens: int = 0) -> None:
            progress[0] += tokens
            await resp.write(b"".join(chunk(i, text, reason) for i in range(plan.n)))

        def record(sent: int) -> None:
            self.sent_tokens.extend([sent] * plan.n)

        async def write() -> None:
            if "slow_first_token" in b:
                await asyncio.sleep(b["slow_first_token"])
            if kind == "chat":
                await resp.write(
                    b"".join(
                        chunk(i, None, None, {"role": "assistant", "content": ""}) for i in range(plan.n)
                    )
                )
            for _ in range(self.reasoning):  # a reasoning model thinks before it answers
                await resp.write(
                    b"".join(chunk(i, None, None, {"reasoning_content": "hmm "}) for i in range(plan.n))
                )
            pieces, total = plan.pieces, len(plan.pieces)
            faults = {
                b[name]: name
                for name in STREAM_FAULTS
                if isinstance(b.get(name), int) and 0 <= b[name] <= total
            }
            # A fault after the last token comes before the finish, which then cannot ride on that token.
            finish_last = self.finish_chunk == "last" and total not in faults
            sizes = itertools.cycle(self.chunking)
            pos = 0
            while True:
                fault = faults.pop(pos, None)
                if fault == "cut_after":
                    record(pos)
                    assert request.transport is not None
                    request.transport.abort()
                    return
                if fault == "stall_after":
                    record(pos)
                    await self._forever()
                    return
                if fault == "malformed_after":
                    await resp.write(b"data: {not json\n\n")
                if fault == "no_finish_after":
                    record(pos)
                    await resp.write_eof()
                    return
                if fault == "error_after":
                    record(pos)
                    await resp.write(
                        b'data: {"error": {"message": "engine crashed", "type": "server_error"}}\n\n'
                    )
                    await resp.write_eof()
                    return
                if pos >= total:
                    break
                end = min([pos + next(sizes), total, *(k for k in faults if k > pos)])
                if self.token_delay:
                    await asyncio.sleep(self.token_delay * (end - pos))
                last = end == total and finish_last
                await send("".join(pieces[pos:end]), plan.reason if last else None, end - pos)
                pos = end
            if total == 0 or not finish_last:
                await send(None, plan.reason)
            record(total)
            if options.get("include_usage"):
                await resp.write(
                    event(
                        {
                            "id": ident,
                            "object": obj,
                            "created": 1700000000,
                            "model": body["model"],
                            "choices": [],
                            "usage": self._usage(plan),
                        }
                    )
                )
            if not b.get("no_done"):
                await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return

        try:
            await write()
        except ConnectionResetError:
            pass  # the client (the gateway) went away mid-stream, as it may: an engine just stops
        return resp


class Plan:
    """What one request generates: the answer's pieces (one token each), why it ends, the prompt's size."""

    __slots__ = ("n", "pieces", "prompt_tokens", "reason")

    def __init__(self, pieces: list[str], reason: str, prompt_tokens: int, n: int) -> None:
        self.pieces = pieces
        self.reason = reason
        self.prompt_tokens = prompt_tokens
        self.n = n
