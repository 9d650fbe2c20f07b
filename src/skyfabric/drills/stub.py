"""A stub OpenAI-compatible backend: streams N fixed tokens fast, on as many ports as asked.

Why: drills and their tests must exercise the gateway's failover (which only needs the wire format) in
seconds, without loading a model. The stub honours what drills rely on — ``max_tokens`` with vLLM's
``min_tokens``/``ignore_eos`` (it always produces exactly ``max_tokens`` tokens), ``stream_options.
include_usage`` (and vLLM's ``continuous_usage_stats``: usage in every chunk), and
``continue_final_message`` (it just goes on) — and nothing else.

Run ``python -m skyfabric.drills.stub --port 9001 --port 9002`` and point a fleet file's pools at
``http://127.0.0.1:9001/v1`` (engine ``vllm``, so the gateway may continue streams there).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import time
from typing import Any

import orjson
from aiohttp import web

_ids = itertools.count()


class Stub:
    """The request handlers; ``ttft`` and ``token_delay`` set the pace (seconds)."""

    def __init__(self, ttft: float = 0.02, token_delay: float = 0.005) -> None:
        self.ttft = ttft
        self.token_delay = token_delay

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "stub", "object": "model"}]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completions")

    async def _generate(self, request: web.Request, kind: str) -> web.StreamResponse:
        body: dict[str, Any] = orjson.loads(await request.read())
        n = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        model = str(body.get("model", "stub"))
        rid = f"stub-{next(_ids)}"
        created = int(time.time())
        prompt_tokens = max(1, len(orjson.dumps(body.get("messages") or body.get("prompt") or "")) // 4)
        obj_kind = "chat.completion.chunk" if kind == "chat" else "text_completion"
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
        if not body.get("stream"):
            await asyncio.sleep(self.ttft + n * self.token_delay)
            text = " tok" * n
            choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
            if kind == "chat":
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            return _json(
                {
                    "id": rid,
                    "object": "chat.completion" if kind == "chat" else "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [choice],
                    "usage": usage,
                }
            )
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
        await resp.prepare(request)

        async def send(choice: dict[str, Any] | None, extra: dict[str, Any] | None = None) -> None:
            obj: dict[str, Any] = {"id": rid, "object": obj_kind, "created": created, "model": model}
            obj["choices"] = [choice] if choice is not None else []
            if extra:
                obj.update(extra)
            await resp.write(b"data: " + orjson.dumps(obj) + b"\n\n")

        options = body.get("stream_options")
        continuous = isinstance(options, dict) and bool(options.get("continuous_usage_stats"))
        try:
            await asyncio.sleep(self.ttft)
            if kind == "chat":
                await send({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
            for i in range(n):
                if i:
                    await asyncio.sleep(self.token_delay)
                choice = {"index": 0, "finish_reason": "length" if i == n - 1 else None}
                if kind == "chat":
                    choice["delta"] = {"content": " tok"}
                else:
                    choice["text"] = " tok"
                if continuous:
                    done = {"prompt_tokens": prompt_tokens, "completion_tokens": i + 1}
                    await send(choice, {"usage": {**done, "total_tokens": prompt_tokens + i + 1}})
                else:
                    await send(choice)
            options = body.get("stream_options")
            if isinstance(options, dict) and options.get("include_usage"):
                await send(None, {"usage": usage})
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionResetError:
            pass  # the client (the gateway, or a drill's cut) went away: stop generating, as vLLM does
        return resp


def _json(obj: dict[str, Any]) -> web.Response:
    return web.Response(body=orjson.dumps(obj), content_type="application/json")


async def serve(ports: list[int], ttft: float, token_delay: float) -> None:
    """Serve the stub on every port until SIGINT/SIGTERM."""
    runner = web.AppRunner(Stub(ttft, token_delay).app(), access_log=None)
    await runner.setup()
    for port in ports:
        await web.TCPSite(runner, "127.0.0.1", port).start()
    print("stub ready on " + " ".join(str(p) for p in ports), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    """``python -m skyfabric.drills.stub --port P [--port P2 ...]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, action="append", required=True)
    parser.add_argument("--ttft", type=float, default=0.02, help="seconds before the first token")
    parser.add_argument("--token-delay", type=float, default=0.005, help="seconds between tokens")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.ttft, args.token_delay))


if __name__ == "__main__":
    main()
