"""The fault-injection proxy: one listening port in front of one upstream endpoint, faults switched live.

Why a proxy and not a flag in the gateway: a drill must test the gateway exactly as it runs in production,
so faults are made where real ones happen, on the wire between the gateway and a backend. The proxy parses
the gateway's HTTP/1.1 requests with ``httptools`` (it must know where a request ends to answer it with a
429 or a 500 itself, or to time the answer for a latency fault) and relays the backend's bytes untouched
otherwise, so streams keep their chunk framing and SSE events.

Modes (a :class:`FaultMode`; several may be combined, e.g. a brownout is latency plus errors):

* pass — relay both ways;
* blackhole — accept connections, read requests, never answer; connections already relaying freeze too
  (a partition, not a crash); they are closed when the blackhole ends, as the peer gave up on them long ago;
* refuse — close the listening socket (connections are refused) and reset every open connection: the
  process or host is gone;
* latency ×k (+ a fixed delay) — every piece of an answer is delivered k times later than the backend sent
  it, counted from when the request was forwarded, so time to first token and total time both grow ×k;
* error rate — answer a share of requests with HTTP 500/503 without forwarding them;
* throttle — answer a share of requests with 429, with or without ``Retry-After``;
* cut — relay a share of streams for N SSE events (or N bytes of body) and then close the connection.

Every request the proxy sees is logged with the time and what was done to it: the drill report computes,
from this log, when the gateway stopped sending traffic to a faulted endpoint and how many upstream
attempts each client request cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus

import httptools
import orjson

log = logging.getLogger("skyfabric.drills.faultproxy")

_READ_SIZE = 64 * 1024
_HOP_HEADERS = frozenset({b"content-length", b"transfer-encoding"})


@dataclass(frozen=True, slots=True)
class FaultMode:
    """What a proxy does to traffic right now; the default is a clean pass-through."""

    blackhole: bool = False
    refuse: bool = False
    latency_factor: float = 1.0
    latency_add: float = 0.0
    error_rate: float = 0.0
    error_statuses: tuple[int, ...] = (500, 503)
    throttle_rate: float = 0.0
    retry_after: float | None = None
    cut_rate: float = 0.0
    cut_after_events: int | None = None
    cut_after_bytes: int | None = None

    @property
    def delays(self) -> bool:
        """Whether answers must be re-timed (the relay then goes through a scheduled writer)."""
        return self.latency_factor != 1.0 or self.latency_add > 0.0

    def combine(self, other: FaultMode) -> FaultMode:
        """Both faults at once, each knob at its harsher setting: overlapping windows on one target add up."""
        return FaultMode(
            blackhole=self.blackhole or other.blackhole,
            refuse=self.refuse or other.refuse,
            latency_factor=max(self.latency_factor, other.latency_factor),
            latency_add=max(self.latency_add, other.latency_add),
            error_rate=max(self.error_rate, other.error_rate),
            error_statuses=other.error_statuses if other.error_rate > 0 else self.error_statuses,
            throttle_rate=max(self.throttle_rate, other.throttle_rate),
            retry_after=other.retry_after if other.throttle_rate > 0 else self.retry_after,
            cut_rate=max(self.cut_rate, other.cut_rate),
            cut_after_events=_min_set(self.cut_after_events, other.cut_after_events),
            cut_after_bytes=_min_set(self.cut_after_bytes, other.cut_after_bytes),
        )

    def describe(self) -> str:
        """A short human label, e.g. ``latency ×10 + 20% 5xx``."""
        parts: list[str] = []
        if self.refuse:
            parts.append("refuse")
        if self.blackhole:
            parts.append("blackhole")
        if self.delays:
            extra = f" +{self.latency_add:g}s" if self.latency_add else ""
            parts.append(f"latency ×{self.latency_factor:g}{extra}")
        if self.error_rate:
            parts.append(f"{self.error_rate:.0%} {'/'.join(map(str, self.error_statuses))}")
        if self.throttle_rate:
            after = f"Retry-After {self.retry_after:g}s" if self.retry_after is not None else "no Retry-After"
            parts.append(f"{self.throttle_rate:.0%} 429 ({after})")
        if self.cut_rate:
            if self.cut_after_events is not None:
                where = f"{self.cut_after_events} events"
            else:
                where = f"{self.cut_after_bytes} B"
            parts.append(f"cut {self.cut_rate:.0%} of streams after {where}")
        return " + ".join(parts) or "pass"


PASS = FaultMode()


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _min_set(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


@dataclass(frozen=True, slots=True)
class ProxyEvent:
    """One request seen by a proxy: when (proxy clock) and what was done to it."""

    t: float  # when the request arrived
    action: str  # forward | hold | error | throttle | cut | upstream_down
    status: int = 0
    #: An inference request (POST …/completions), not a health probe or a metrics scrape.
    inference: bool = True


def http_error(status: int, message: str, *, retry_after: float | None = None) -> bytes:
    """A complete keep-alive HTTP/1.1 error response with an OpenAI-shaped body."""
    kind = "rate_limit_error" if status == 429 else "server_error"
    body = orjson.dumps(
        {"error": {"message": message, "type": kind, "param": None, "code": "drill_injected_fault"}}
    )
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Error"
    head = [
        f"HTTP/1.1 {status} {reason}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: keep-alive",
    ]
    if retry_after is not None:
        head.append(f"retry-after: {max(0, math.ceil(retry_after))}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


#: How a model call's path ends, in every wire protocol the gateway speaks: OpenAI's (chat) completions,
#: Anthropic's Messages, Bedrock's Converse and InvokeModel, Vertex's rawPredict and generateContent. A
#: drill in front of a managed cloud must tell its requests from the gateway's probes too.
INFERENCE_SUFFIXES = (
    b"completions",
    b"/messages",
    b"/converse",
    b"/converse-stream",
    b"/invoke",
    b"/invoke-with-response-stream",
    b":rawPredict",
    b":streamRawPredict",
    b":generateContent",
    b":streamGenerateContent",
)


def is_inference_path(url: bytes) -> bool:
    """Whether a request target (query ignored) is a model call in one of the gateway's wire protocols."""
    return url.split(b"?", 1)[0].endswith(INFERENCE_SUFFIXES)


class _ParsedRequest:
    """A whole request from the client side, re-serialised with a content-length."""

    __slots__ = ("body", "headers", "keep_alive", "method", "url")

    def __init__(self) -> None:
        self.method = b""
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.keep_alive = True

    @property
    def inference(self) -> bool:
        """POST to a model-call path: a client's request, as opposed to the gateway's own probes."""
        return self.method == b"POST" and is_inference_path(self.url)

    def raw(self) -> bytes:
        body = b"".join(self.body)
        lines = [b"%s %s HTTP/1.1\r\n" % (self.method, self.url)]
        for name, value in self.headers:
            if name.lower() not in _HOP_HEADERS:
                lines.append(b"%s: %s\r\n" % (name, value))
        lines.append(b"content-length: %d\r\n\r\n" % len(body))
        lines.append(body)
        return b"".join(lines)


class _RequestSink:
    """httptools callbacks for the client side: collects requests into a queue."""

    def __init__(self, queue: asyncio.Queue[_ParsedRequest | None]) -> None:
        self.queue = queue
        self.parser = httptools.HttpRequestParser(self)
        self.current = _ParsedRequest()

    def on_message_begin(self) -> None:
        self.current = _ParsedRequest()

    def on_url(self, url: bytes) -> None:
        self.current.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.current.method = self.parser.get_method()
        self.current.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.current.body.append(body)

    def on_message_complete(self) -> None:
        self.queue.put_nowait(self.current)


class _ResponseSink:
    """httptools callbacks for the upstream side: only where the answer ends and what it is."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.event_stream = False
        self.headers_done = False
        self.done = False
        self.keep_alive = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-type" and b"text/event-stream" in value.lower():
            self.event_stream = True

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self.headers_done = True

    def on_message_complete(self) -> None:
        self.done = True


class _Cutter:
    """Finds where to cut an answer: after N SSE events or N body bytes of the raw response."""

    def __init__(self, after_events: int | None, after_bytes: int | None) -> None:
        self.after_events = after_events
        self.after_bytes = after_bytes
        self.head = b""
        self.in_body = False
        self.events = 0
        self.body_bytes = 0

    def feed(self, data: bytes) -> int | None:
        """The index in ``data`` to cut at (bytes before it are relayed), or None to relay it all."""
        start = 0
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return None
            self.in_body = True
            start = len(data) - (len(self.head) - (end + 4))
            self.head = b""
        if self.after_bytes is not None:
            left = self.after_bytes - self.body_bytes
            self.body_bytes += len(data) - start
            if len(data) - start >= left:
                return start + max(0, left)
        if self.after_events is not None:
            pos = start
            while True:
                found = data.find(b"\n\n", pos)
                if found < 0:
                    break
                self.events += 1
                pos = found + 2
                if self.events >= self.after_events:
                    return pos
        return None


def _cuttable(response: _ResponseSink, cutter: _Cutter) -> bool:
    """Only successful answers are cut; event counts only make sense in an event stream."""
    return response.status == 200 and (response.event_stream or cutter.after_bytes is not None)


class _Session:
    """One client connection through the proxy, with its (lazily opened) upstream connection."""

    def __init__(self, proxy: FaultProxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.reader = reader
        self.writer = writer
        self.requests: asyncio.Queue[_ParsedRequest | None] = asyncio.Queue()
        self.sink = _RequestSink(self.requests)
        self.up_reader: asyncio.StreamReader | None = None
        self.up_writer: asyncio.StreamWriter | None = None
        self.held = False
        self.closed = asyncio.Event()

    async def run(self) -> None:
        reading = asyncio.create_task(self._read_client())
        try:
            await self._dispatch()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            reading.cancel()
            self.abort()
            with contextlib.suppress(BaseException):
                await reading

    def abort(self) -> None:
        """Close both sides at once (a reset, not a graceful close)."""
        self.closed.set()
        for writer in (self.writer, self.up_writer):
            if writer is not None and not writer.is_closing():
                writer.transport.abort()

    def _close_upstream(self) -> None:
        if self.up_writer is not None and not self.up_writer.is_closing():
            self.up_writer.transport.abort()
        self.up_reader = self.up_writer = None

    async def _read_client(self) -> None:
        try:
            while True:
                data = await self.reader.read(_READ_SIZE)
                if not data:
                    break
                self.sink.parser.feed_data(data)
        except (OSError, httptools.HttpParserError, httptools.HttpParserUpgrade):
            pass
        # The client went away (or spoke nonsense): nothing more to answer, stop the upstream too.
        self.requests.put_nowait(None)
        self.abort()

    async def _dispatch(self) -> None:
        proxy = self.proxy
        while True:
            request = await self.requests.get()
            if request is None or self.closed.is_set():
                return
            mode = proxy.mode
            arrived = proxy.clock()
            if mode.refuse:
                return
            if mode.blackhole:
                proxy.record("hold", t=arrived, inference=request.inference)
                await self._hold()
                return
            if mode.throttle_rate and proxy.rng.random() < mode.throttle_rate:
                proxy.record("throttle", 429, t=arrived, inference=request.inference)
                self.writer.write(http_error(429, "injected throttle (drill)", retry_after=mode.retry_after))
                await self.writer.drain()
                continue
            if mode.error_rate and proxy.rng.random() < mode.error_rate:
                status = proxy.rng.choice(mode.error_statuses)
                proxy.record("error", status, t=arrived, inference=request.inference)
                self.writer.write(http_error(status, f"injected HTTP {status} (drill)"))
                await self.writer.drain()
                continue
            if not await self._forward(request, mode, arrived):
                return
            if not request.keep_alive:
                return

    async def _hold(self) -> None:
        """Blackhole: answer nothing, keep the connection open until the peer or the drill drops it."""
        self.held = True
        self._close_upstream()
        await self.closed.wait()

    async def _connect_upstream(self) -> bool:
        if self.up_writer is not None and not self.up_writer.is_closing():
            return True
        try:
            async with asyncio.timeout(5.0):
                self.up_reader, self.up_writer = await asyncio.open_connection(
                    self.proxy.upstream_host, self.proxy.upstream_port
                )
        except (OSError, TimeoutError):
            return False
        _nodelay(self.up_writer)
        return True

    async def _forward(self, request: _ParsedRequest, mode: FaultMode, arrived: float) -> bool:
        """Relay one request and its answer; False when the connection must close afterwards.

        The request is logged exactly once, however the relay ends (completed, cut, frozen, reset).
        """
        proxy = self.proxy
        response = _ResponseSink()
        action = "forward"
        try:
            if not await self._connect_upstream():
                action = "upstream_down"
                return False
            assert self.up_reader is not None and self.up_writer is not None
            up_reader = self.up_reader
            cutter: _Cutter | None = None
            if mode.cut_rate and proxy.rng.random() < mode.cut_rate:
                cutter = _Cutter(mode.cut_after_events, mode.cut_after_bytes)
            sent_at = proxy.clock()
            self.up_writer.write(request.raw())
            scheduled = _ScheduledWriter(self.writer, proxy.clock) if mode.delays else None
            while not response.done:
                data = await up_reader.read(_READ_SIZE)
                if not data:
                    if scheduled is not None:
                        await scheduled.finish()
                    return False
                now_mode = proxy.mode
                if now_mode.blackhole or now_mode.refuse:
                    # The partition (or crash) starts mid-answer: nothing more flows either way.
                    action = "hold" if now_mode.blackhole else action
                    if scheduled is not None:
                        scheduled.cancel()
                    await self._hold()
                    return False
                response.parser.feed_data(data)
                cut_at = None
                if cutter is not None:
                    cut_at = cutter.feed(data)
                    if response.headers_done and not _cuttable(response, cutter):
                        cutter, cut_at = None, None
                if cut_at is not None:
                    data = data[:cut_at]
                    action = "cut"
                if scheduled is not None:
                    due = sent_at + mode.latency_factor * (proxy.clock() - sent_at) + mode.latency_add
                    scheduled.put(due, data)
                else:
                    self.writer.write(data)
                    await self.writer.drain()
                if cut_at is not None:
                    if scheduled is not None:
                        await scheduled.finish()
                    return False
            if scheduled is not None:
                await scheduled.finish()
            return response.keep_alive
        except httptools.HttpParserError:
            return False
        finally:
            proxy.record(action, response.status, t=arrived, inference=request.inference)


class _ScheduledWriter:
    """Writes pieces of an answer at given times, in order, without holding up the upstream reads.

    Reading and writing are separate tasks so that the arrival time of each upstream piece is measured when
    it arrives, not after the previous piece's delay (which would compound the delays).
    """

    def __init__(self, writer: asyncio.StreamWriter, clock: Callable[[], float]) -> None:
        self.writer = writer
        self.clock = clock
        self.queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        self.task = asyncio.create_task(self._run())

    def put(self, due: float, data: bytes) -> None:
        self.queue.put_nowait((due, data))

    async def _run(self) -> None:
        last = 0.0
        while True:
            item = await self.queue.get()
            if item is None:
                return
            due, data = item
            due = max(due, last)
            wait = due - self.clock()
            if wait > 0:
                await asyncio.sleep(wait)
            last = due
            self.writer.write(data)
            await self.writer.drain()

    async def finish(self) -> None:
        """Wait until everything queued has been written."""
        self.queue.put_nowait(None)
        with contextlib.suppress(OSError):
            await self.task

    def cancel(self) -> None:
        self.task.cancel()


@dataclass
class FaultProxy:
    """A listening port relaying to ``upstream_host:upstream_port`` under the current :class:`FaultMode`."""

    upstream_host: str
    upstream_port: int
    name: str = ""
    host: str = "127.0.0.1"
    port: int = 0
    seed: int = 0
    clock: Callable[[], float] = time.monotonic
    mode: FaultMode = PASS
    events: list[ProxyEvent] = field(default_factory=list)
    connections: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(f"{self.seed}:{self.name}")
        self._server: asyncio.Server | None = None
        self._sessions: set[_Session] = set()

    # -- lifecycle --------------------------------------------------------------------------------------

    async def start(self) -> int:
        """Start listening; returns the port (chosen by the kernel the first time when ``port`` is 0)."""
        await self._listen()
        return self.port

    async def stop(self) -> None:
        """Stop listening and reset every connection."""
        await self._unlisten()
        for session in list(self._sessions):
            session.abort()

    async def _listen(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._on_client, self.host, self.port, reuse_address=True, limit=_READ_SIZE
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _unlisten(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await server.wait_closed()

    @property
    def url_authority(self) -> str:
        """``host:port`` of the listening side, for rewriting endpoint URLs."""
        return f"{self.host}:{self.port}"

    # -- faults -----------------------------------------------------------------------------------------

    async def set_mode(self, mode: FaultMode) -> None:
        """Switch faults now. Refusing closes the listener and resets connections; recovering reopens it."""
        old, self.mode = self.mode, mode
        if mode == old:
            return
        log.info("%s: %s -> %s", self.name, old.describe(), mode.describe())
        if mode.refuse and not old.refuse:
            await self._unlisten()
            for session in list(self._sessions):
                session.abort()
        elif old.refuse and not mode.refuse:
            await self._listen()
        if old.blackhole and not mode.blackhole:
            # Held connections were frozen mid-request; their peers gave up on them. Drop them.
            for session in list(self._sessions):
                if session.held:
                    session.abort()

    def record(self, action: str, status: int = 0, *, t: float | None = None, inference: bool = True) -> None:
        """Log what was done to one request that arrived at ``t`` (default: now)."""
        self.events.append(ProxyEvent(self.clock() if t is None else t, action, status, inference))

    def counts(self, *, inference: bool = True) -> Counter[str]:
        """Inference requests (or, with ``inference=False``, the other requests) by action."""
        return Counter(e.action for e in self.events if e.inference == inference)

    # -- connections ------------------------------------------------------------------------------------

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode.refuse:
            writer.transport.abort()
            return
        self.connections += 1
        _nodelay(writer)
        session = _Session(self, reader, writer)
        self._sessions.add(session)
        try:
            await session.run()
        finally:
            self._sessions.discard(session)
