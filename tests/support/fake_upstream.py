"""A scriptable OpenAI-compatible upstream that fails on cue, for gateway tests.

Its answer is deterministic — token ``i`` is ``"t{i} "`` — and it continues a final assistant message (or a
completions prompt) from where that text ends, exactly as a real engine with ``continue_final_message``
would. So a test can check that a stream rescued mid-answer is the exact, complete text.

Each request takes the next behaviour from ``script`` (then ``default``):
``"ok"``, ``"reset"`` (close before any byte), ``"hang"`` (never answer),
``{"status": 429, "retry_after": 2}``,
``{"status": 500}``, ``{"slow_first_token": s}``, ``{"cut_after": k}`` (drop the connection after k tokens),
``{"stall_after": k}``, ``{"malformed_after": k}``, ``{"no_finish_after": k}`` (end cleanly, no finish),
``"no_done"`` (finish but no ``[DONE]``), ``"context_length"``, ``"content_filter"``, ``{"delay": s}``.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import deque
from typing import Any

from aiohttp import web

Behaviour = str | dict[str, Any]


def token(i: int) -> str:
    return f"t{i} "


def expected_text(n: int) -> str:
    """The full answer of ``n`` tokens."""
    return "".join(token(i) for i in range(n))


class FakeUpstream:
    """One fake endpoint; ``url`` is its ``/v1`` base once started."""

    def __init__(
        self, name: str = "fake", *, tokens: int = 8, default: Behaviour = "ok", can_continue: bool = True
    ) -> None:
        self.name = name
        self.tokens = tokens
        self.default = default
        self.can_continue = can_continue
        self.script: deque[Behaviour] = deque()
        self.requests: list[dict[str, Any]] = []
        #: The headers of each request, in order (lower-case names).
        self.headers: list[dict[str, str]] = []
        self.token_delay = 0.0
        self.runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def then(self, *behaviours: Behaviour) -> FakeUpstream:
        self.script.extend(behaviours)
        return self

    async def start(self) -> FakeUpstream:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
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

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "completions")

    def _next(self) -> Behaviour:
        return self.script.popleft() if self.script else self.default

    async def _serve(self, request: web.Request, kind: str) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
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
            return web.json_response(
                {
                    "error": {
                        "message": "This model's maximum context length is 256 tokens.",
                        "type": "invalid_request_error",
                        "code": "context_length_exceeded",
                    }
                },
                status=400,
            )
        if b.get("content_filter"):
            return web.json_response(
                {
                    "error": {
                        "message": "blocked by the provider's content policy (reason: violence)",
                        "type": "invalid_request_error",
                        "code": "content_policy_violation",
                    }
                },
                status=400,
            )
        prefix = self._prefix(body, kind)
        if prefix and not self.can_continue:
            return web.json_response(
                {"error": {"message": "assistant prefill is not supported", "type": "invalid_request_error"}},
                status=400,
            )
        start = len(re.findall(r"t\d+ ", prefix))
        limit = body.get("max_tokens") or self.tokens
        count = max(0, min(self.tokens - start, limit))
        prompt_tokens = 10 + start
        if not body.get("stream"):
            text = "".join(token(start + i) for i in range(count))
            reason = "stop" if start + count >= self.tokens else "length"
            choice: dict[str, Any] = {"index": 0, "finish_reason": reason}
            if kind == "chat":
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            return web.json_response(
                {
                    "id": f"{kind}-{self.name}",
                    "object": "chat.completion" if kind == "chat" else "text_completion",
                    "created": int(time.time()),
                    "model": body["model"],
                    "choices": [choice],
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": count,
                        "total_tokens": prompt_tokens + count,
                    },
                }
            )
        return await self._stream(request, body, kind, b, start, count, prompt_tokens)

    def _prefix(self, body: dict[str, Any], kind: str) -> str:
        if kind == "chat":
            messages = body.get("messages") or []
            if messages and messages[-1].get("role") == "assistant" and body.get("continue_final_message"):
                return str(messages[-1].get("content") or "")
            return ""
        prompt = body.get("prompt") or ""
        return prompt[prompt.find("t0 ") :] if "t0 " in prompt else ""

    async def _stream(
        self,
        request: web.Request,
        body: dict[str, Any],
        kind: str,
        b: dict[str, Any],
        start: int,
        count: int,
        prompt_tokens: int,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        ident = f"{kind}-{self.name}-{len(self.requests)}"
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(delta: dict[str, Any] | None, text: str | None, reason: str | None) -> bytes:
            choice: dict[str, Any] = {"index": 0, "finish_reason": reason}
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
            return b"data: " + json.dumps(data).encode() + b"\n\n"

        if "slow_first_token" in b:
            await asyncio.sleep(b["slow_first_token"])
        if kind == "chat":
            await resp.write(chunk({"role": "assistant", "content": ""}, None, None))
        for i in range(count):
            if b.get("cut_after") == i:
                assert request.transport is not None
                request.transport.abort()
                return resp
            if b.get("stall_after") == i:
                await self._forever()
            if b.get("malformed_after") == i:
                await resp.write(b"data: {not json\n\n")
            if b.get("no_finish_after") == i:
                await resp.write_eof()
                return resp
            if self.token_delay:
                await asyncio.sleep(self.token_delay)
            await resp.write(chunk(None, token(start + i), None))
        reason = "stop" if start + count >= self.tokens else "length"
        await resp.write(chunk(None, None, reason))
        options = body.get("stream_options") or {}
        if options.get("include_usage"):
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": count,
                "total_tokens": prompt_tokens + count,
            }
            data = {
                "id": ident,
                "object": obj,
                "created": 1700000000,
                "model": body["model"],
                "choices": [],
                "usage": usage,
            }
            await resp.write(b"data: " + json.dumps(data).encode() + b"\n\n")
        if not b.get("no_done"):
            await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
