"""Streamed answers in the simulator: a replica's SSE stream, as vLLM writes it, through the gateway's relay.

A streamed request goes through the gateway's own ``StreamRelay`` — commit at the first token, the stall
watchdog, and, when the provider is lost mid-stream, *continuation* on another endpoint (a prefill with
``continue_final_message``, or a replay checked character by character) — exactly as in production. Only
the bytes are simulated: :class:`SimStream` stands in for ``http.client.UpstreamResponse`` and is fed by
the replica's batching model at the times its tokens are made.

The wire format is vLLM's OpenAI-compatible stream with ``continuous_usage_stats`` (what the gateway asks
a vLLM engine for, so that at a break it knows exactly how many tokens the client has): a role chunk,
content chunks each carrying the running usage, a finish chunk, the final usage chunk, ``[DONE]``. Token
``i`` of every answer is the text `` w<i>``, so the client can check that what it received is the whole
answer, once, in order — a continuation that lost or repeated a token shows up as a broken answer.

Granular pacing: tokens are sent ``CHUNK_TOKENS`` to a chunk (the first alone, at the TTFT), which keeps
a fleet-scale run to a few events per request while the break point stays exact to the token count.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson

from skyfabric.core.errors import EndpointAborted, RemoteProtocolError, UpstreamTimeout

#: Tokens per content chunk after the first (which is sent alone, at the time to first token).
CHUNK_TOKENS = 16

_HEAD = b'data: {"id":"sim","object":"chat.completion.chunk","created":0,"model":"sim","choices":'


def token_text(start: int, end: int) -> str:
    """The text of tokens ``start`` … ``end - 1`` of any simulated answer."""
    return "".join(f" w{i}" for i in range(start, end))


def _usage(prompt: int, done: int) -> bytes:
    return b'"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}' % (
        prompt,
        done,
        prompt + done,
    )


class SimStream:
    """One streamed response being produced by a replica (what the relay reads with ``next``).

    ``tokens`` are generated from token index ``start`` (a prefilled continuation starts after the
    prefix). The replica calls :meth:`emit` as tokens are made and :meth:`finish` at the end; a lost host
    calls :meth:`reset`; the gateway's :meth:`abort` closes the connection (the replica frees the slot).
    """

    __slots__ = (
        "_abandon",
        "_tracker",
        "awaited",
        "chunks",
        "done",
        "emitted",
        "endpoint",
        "error",
        "headers",
        "loop",
        "prompt",
        "released",
        "start",
        "status",
        "tokens",
        "waiter",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        endpoint: str,
        start: int,
        tokens: int,
        prompt: int,
        abandon: Callable[[], None],
        tracker: set[Any] | None,
    ) -> None:
        self.loop = loop
        self.endpoint = endpoint
        self.start = start
        self.tokens = tokens
        self.prompt = prompt
        self.emitted = 0
        self.status = 200
        self.headers: list[tuple[bytes, bytes]] = [(b"content-type", b"text/event-stream")]
        self.chunks: list[bytes] = []
        self.done = False
        self.error: Exception | None = None
        self.waiter: asyncio.Future[None] | None = None
        #: Waiting for the endpoint's next bytes after some were sent (the stall watchdog's cue).
        self.awaited = False
        self.released = False
        self._abandon = abandon
        self._tracker = tracker

    # -- the replica's side --------------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def emit(self, upto: int) -> None:
        """Tokens up to ``upto`` (of this segment) are made: send them as one content chunk."""
        if self.released or upto <= self.emitted:
            return
        out = []
        if self.emitted == 0:
            out.append(
                _HEAD + b'[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
            )
        text = orjson.dumps(token_text(self.start + self.emitted, self.start + upto))
        out.append(
            _HEAD
            + b'[{"index":0,"delta":{"content":'
            + text
            + b'},"finish_reason":null}],'
            + _usage(self.prompt, upto)
            + b"}\n\n"
        )
        self.emitted = upto
        self.chunks.extend(out)
        self._wake()

    def finish(self) -> None:
        """The last token is made: finish reason, final usage, ``[DONE]``; the message is complete."""
        if self.released:
            return
        self.emit(self.tokens)
        usage = _usage(self.prompt, self.tokens)
        finish = _HEAD + b'[{"index":0,"delta":{},"finish_reason":"length"}],' + usage + b"}\n\n"
        self.chunks += [finish, _HEAD + b"[]," + usage + b"}\n\n", b"data: [DONE]\n\n"]
        self.done = True
        self._wake()

    def reset(self, why: str) -> None:
        """The host is gone: the connection is reset under the reader."""
        if self.error is None and not self.done:
            self.error = RemoteProtocolError(why, endpoint=self.endpoint, sent_any=True)
            self._wake()

    # -- the gateway's side (``UpstreamResponse``'s interface) ----------------------------------------

    def header(self, name: bytes) -> bytes | None:
        return None

    async def next(self, timeout: float, phase: str = "idle", sent_any: bool = False) -> bytes | None:
        while True:
            if self.chunks:
                data = b"".join(self.chunks)
                self.chunks.clear()
                return data
            if self.error is not None:
                self.release()
                raise self.error
            if self.done:
                self.release()
                return None
            waiter = self.waiter = self.loop.create_future()
            self.awaited = sent_any
            try:
                await asyncio.wait_for(waiter, timeout)
            except TimeoutError:
                self.abort()
                raise UpstreamTimeout(phase, timeout, endpoint=self.endpoint, sent_any=sent_any) from None
            finally:
                self.waiter = None
                self.awaited = False

    async def read(self, timeout: float) -> bytes:
        parts = []
        while (piece := await self.next(timeout)) is not None:
            parts.append(piece)
        return b"".join(parts)

    def release(self) -> None:
        if not self.released:
            if not self.done:
                self.abort()
                return
            self.released = True
            if self._tracker is not None:
                self._tracker.discard(self)

    def abort(self) -> None:
        """The gateway closes the connection: a waiting reader fails, the replica drops the sequence."""
        if self.released:
            return
        self.released = True
        if self._tracker is not None:
            self._tracker.discard(self)
        if not self.done:
            if self.error is None:
                self.error = EndpointAborted(
                    "upstream connection lost: aborted", endpoint=self.endpoint, sent_any=True
                )
            self._wake()
            self._abandon()


def read_client_chunk(piece: bytes, texts: list[str]) -> bool:
    """Take one piece of the client's stream: append its content to ``texts``; True if it is an error."""
    error = False
    for line in piece.split(b"\n"):
        if not line.startswith(b"data: {"):
            continue
        event = orjson.loads(line[6:])
        if "error" in event:
            error = True
            continue
        for choice in event.get("choices") or ():
            content = (choice.get("delta") or {}).get("content")
            if content:
                texts.append(content)
    return error


def continuation_of(body: dict[str, Any], default_tokens: int) -> tuple[int, int]:
    """(first token index, tokens to make) a streamed request asks for: a prefill goes on after its prefix."""
    tokens = body.get("max_tokens")
    n = tokens if isinstance(tokens, int) else default_tokens
    start = 0
    messages = body.get("messages")
    if body.get("continue_final_message") and isinstance(messages, list) and messages:
        last = messages[-1]
        if isinstance(last, dict) and last.get("role") == "assistant":
            start = len(str(last.get("content") or "").split())
    return start, max(1, n)
