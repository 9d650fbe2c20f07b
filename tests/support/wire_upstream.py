"""An OpenAI-compatible upstream written at the socket level, which records what its client did to it.

:class:`~tests.support.fake_upstream.FakeUpstream` (aiohttp) cannot tell when the gateway walked away
from a request: aiohttp keeps a handler running after its client is gone. This one watches every
request's connection while it answers, so a test can assert that the upstream *saw* its client go away
(a real engine aborts the generation then) — and it knows when it is blocked writing to a gateway that
does not read (back-pressure).

Its streamed answer is the same deterministic text as the fake's (token ``i`` is ``"t{i} "``, padded with
``pad`` dots before the space when a test needs big chunks), several tokens per SSE chunk like a real
engine. Each request takes the next behaviour from ``script`` (then ``default``):

* ``"ok"`` — answer (streamed when the request asks for it);
* ``"hang"`` — read the request, never answer;
* ``"hang_body"`` — send the status line, headers and part of a JSON body, then nothing more;
* ``"reset_body"`` — the same, then reset the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass
class Seen:
    """One request as the upstream saw it."""

    method: str
    path: str
    body: dict[str, Any]
    at: float
    #: When the client closed or reset the connection before the answer was complete (None: it did not).
    gone_at: float | None = None
    #: The answer was written to its end.
    finished: bool = False
    #: Since when a write has been waiting for the client to read (None: not blocked now).
    blocked_since: float | None = None

    @property
    def inference(self) -> bool:
        return self.method == "POST" and self.path.endswith("completions")


class WireUpstream:
    """One upstream endpoint on a loopback port; ``url`` is its ``/v1`` base once started."""

    def __init__(
        self,
        name: str = "wire",
        *,
        tokens: int = 8,
        per_chunk: int = 3,
        token_delay: float = 0.0,
        pad: int = 0,
        default: str = "ok",
        can_continue: bool = True,
    ) -> None:
        self.name = name
        self.tokens = tokens
        self.per_chunk = per_chunk
        self.token_delay = token_delay
        self.pad = pad
        self.default = default
        self.can_continue = can_continue
        self.script: deque[str] = deque()
        self.seen: list[Seen] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def requests(self) -> list[Seen]:
        """Inference requests only (not probes)."""
        return [s for s in self.seen if s.inference]

    def then(self, *behaviours: str) -> WireUpstream:
        self.script.extend(behaviours)
        return self

    def token(self, i: int) -> str:
        return f"t{i}{'.' * self.pad} "

    def text(self, n: int | None = None) -> str:
        return "".join(self.token(i) for i in range(self.tokens if n is None else n))

    async def start(self) -> WireUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1.0)

    async def wait_gone(self, seen: Seen, within: float) -> float | None:
        """When ``seen``'s client went away, waiting up to ``within`` seconds for it (None: it stayed)."""
        deadline = time.monotonic() + within
        while seen.gone_at is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return seen.gone_at

    # -- serving ----------------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                    lines = head.decode("latin-1").split("\r\n")
                    method, path, _ = lines[0].split(" ", 2)
                    headers = {
                        k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:] if x)
                    }
                    length = int(headers.get("content-length", "0"))
                    raw = await reader.readexactly(length) if length else b""
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                seen = Seen(method, path, json.loads(raw) if raw else {}, time.monotonic())
                self.seen.append(seen)
                if not await self._answer(seen, reader, writer):
                    return
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.transport.abort()

    async def _answer(self, seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request while watching its connection; False when the connection must close."""
        if not seen.inference:
            if seen.path.endswith("/models"):
                body = json.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]}).encode()
                writer.write(_head(200, "application/json", len(body)) + body)
            else:
                writer.write(_head(404, "application/json", 2) + b"{}")
            seen.finished = True
            return True
        behaviour = self.script.popleft() if self.script else self.default
        watch = asyncio.ensure_future(reader.read(1))  # b"" or an error: the client went away
        watch.add_done_callback(lambda f: None if f.cancelled() else self._watched(seen, f))
        try:
            if behaviour == "hang":
                await self._hold(watch)
                return False
            if behaviour in ("hang_body", "reset_body"):
                writer.write(_head(200, "application/json", 1000) + b'{"id":"cmpl-wire","choices":[')
                if behaviour == "reset_body":
                    await asyncio.sleep(0.05)
                    writer.transport.abort()
                    return False
                await self._hold(watch)
                return False
            if seen.body.get("stream"):
                await self._stream(seen, writer, watch)
            else:
                await self._whole(seen, writer)
            seen.finished = True
            return not watch.done()
        except ConnectionError:
            self._mark_gone(seen)
            return False
        finally:
            if not watch.done():
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch

    def _watched(self, seen: Seen, watch: asyncio.Future[bytes]) -> None:
        if watch.exception() is not None or not watch.result():
            self._mark_gone(seen)

    def _mark_gone(self, seen: Seen) -> None:
        if seen.gone_at is None and not seen.finished:
            seen.gone_at = time.monotonic()

    async def _hold(self, watch: asyncio.Future[bytes]) -> None:
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({watch, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()

    async def _whole(self, seen: Seen, writer: asyncio.StreamWriter) -> None:
        kind = "chat" if seen.path.endswith("chat/completions") else "completions"
        count = min(self.tokens, seen.body.get("max_tokens") or self.tokens)
        if self.token_delay:
            await asyncio.sleep(self.token_delay * count)  # generating the whole answer first
        text = self.text(count)
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop" if count == self.tokens else "length"}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        body = json.dumps(
            {
                "id": f"{kind}-{self.name}",
                "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": 1700000000,
                "model": seen.body.get("model"),
                "choices": [choice],
                "usage": {"prompt_tokens": 10, "completion_tokens": count, "total_tokens": 10 + count},
            }
        ).encode()
        writer.write(_head(200, "application/json", len(body)) + body)
        await self._drain(seen, writer)

    async def _stream(self, seen: Seen, writer: asyncio.StreamWriter, watch: asyncio.Future[bytes]) -> None:
        kind = "chat" if seen.path.endswith("chat/completions") else "completions"
        prefix = _prefix(seen.body, kind)
        start = prefix.count(" ") if prefix else 0
        count = max(0, min(self.tokens - start, seen.body.get("max_tokens") or self.tokens))
        ident = f"{kind}-{self.name}-{len(self.seen)}"

        def event(text: str | None, reason: str | None, role: bool = False) -> bytes:
            choice: dict[str, Any] = {"index": 0, "finish_reason": reason}
            if kind == "chat":
                choice["delta"] = {"role": "assistant", "content": ""} if role else {"content": text or ""}
            else:
                choice["text"] = text or ""
            data = {
                "id": ident,
                "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                "created": 1700000000,
                "model": seen.body.get("model"),
                "choices": [choice],
            }
            return _chunk(b"data: " + json.dumps(data).encode() + b"\n\n")

        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        if kind == "chat":
            writer.write(event(None, None, role=True))
        for first in range(start, start + count, self.per_chunk):
            if watch.done():
                raise ConnectionResetError("client went away")
            if self.token_delay:
                await asyncio.sleep(self.token_delay)
            last = min(start + count, first + self.per_chunk)
            writer.write(event("".join(self.token(i) for i in range(first, last)), None))
            await self._drain(seen, writer)
        writer.write(event(None, "stop" if start + count >= self.tokens else "length"))
        writer.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await self._drain(seen, writer)

    async def _drain(self, seen: Seen, writer: asyncio.StreamWriter) -> None:
        seen.blocked_since = time.monotonic()
        try:
            await writer.drain()
        finally:
            seen.blocked_since = None


def _head(status: int, content_type: str, length: int) -> bytes:
    reason = {200: "OK", 404: "Not Found"}.get(status, "Error")
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {length}\r\n\r\n"
    ).encode()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _prefix(body: dict[str, Any], kind: str) -> str:
    if kind == "chat":
        messages = body.get("messages") or []
        if messages and messages[-1].get("role") == "assistant" and body.get("continue_final_message"):
            return str(messages[-1].get("content") or "")
        return ""
    prompt = str(body.get("prompt") or "")
    return prompt[prompt.find("t0") :] if "t0" in prompt else ""
