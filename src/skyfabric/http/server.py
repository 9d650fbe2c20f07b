"""The listener: an asyncio protocol that parses HTTP/1.1 with httptools and calls a service.

Held to nginx's defaults where a client can hurt it:

- **Limits**: a request target over ``max_request_line_bytes`` gets 414, a head over ``max_header_bytes``
  or with more than ``max_headers`` fields gets 431, a body over ``max_body_bytes`` gets 413.
- **Read timeouts** (nginx ``client_header_timeout``/``client_body_timeout``): the head must arrive
  within ``header_timeout`` of its first byte, and the body may not pause longer than ``body_timeout``
  between reads; either gets 408 and the connection is closed (slowloris, slow body).
- **Write timeout** (nginx ``send_timeout``): a client that stops reading for ``write_timeout`` while the
  listener has data for it is dropped alone; its request task is cancelled, which stops the upstream.
- **Pipelining bounded**: one request is served at a time; once another complete request waits behind
  it, the connection stops reading until the queue drains. Reading on while a single request is in
  flight is deliberate: it is how the listener notices a client that resets the connection.
- **Half-close**: a client that sends its request and shuts its write side still gets its answer.
- **Connections capped** at ``max_connections``; beyond it a new connection is closed at once, unread
  (nginx logs "worker_connections are not enough" and drops it too): a client refused fast can retry
  elsewhere, where one left waiting in the accept queue cannot tell a full gateway from a dead one.

Bodies of responses that stream are written with chunked encoding (raw with ``connection: close`` to
HTTP/1.0 clients) and flow control: when the client reads slowly the producer waits, it does not buffer
without bound. ``HEAD`` is answered with the headers ``GET`` would have had and no body.

The transport is protocol-neutral: the bodies of the errors it answers itself (400, 408, 413, 414, 417,
431, 500) come from the service's ``error_body`` callable.

Every timeout is checked by one sweep per listener (eight times per shortest timeout, at most once a
second) rather than by a timer per request, and deadlines are computed from the sweep's clock reading:
a request costs two stores, not a timer handle created and cancelled. The price is precision: a timeout
may fire up to one sweep period (1/8 of the shortest timeout) early or late.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl as _ssl
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import cast

import httptools

from skyfabric.http.messages import Request, Response, Service, StreamResponse

log = logging.getLogger("skyfabric.http")

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_STATUS_LINES = {code: b"HTTP/1.1 %d %s\r\n" % (code, reason) for code, reason in _REASONS.items()}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
#: Sent to a client that shut its write side before its answer began: an interim answer every HTTP/1.1
#: client must accept (RFC 9110 §15.2), whose only purpose is to make a client that has really gone away
#: answer with a reset, so that its request is cancelled instead of generating for nobody.
_PROCESSING = b"HTTP/1.1 102 Processing\r\n\r\n"
_TCP_CLOSE = 7  # tcpi_state once the peer has reset the connection (Linux's TCP_CLOSE)
_INF = float("inf")
#: How long a refused client's leftover input is read and dropped before the connection closes.
_LINGER = 2.0

#: What the connection's parser is reading: nothing yet, a request head, or a request body.
_IDLE, _HEAD, _BODY = 0, 1, 2

#: ``error_body(status, message) -> (content type, body)``: how the service words the listener's errors.
ErrorBody = Callable[[int, str], tuple[bytes, bytes]]


def plain_error_body(status: int, message: str) -> tuple[bytes, bytes]:
    """The default error body: the message as plain text (services pass their protocol's shape)."""
    return b"text/plain; charset=utf-8", message.encode() + b"\n"


def _status_line(status: int) -> bytes:
    return _STATUS_LINES.get(status) or b"HTTP/1.1 %d Unknown\r\n" % status


class _Reject(Exception):
    """Raised in a parser callback: the request is refused with ``status`` before it reaches the service."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Connection(asyncio.Protocol):
    """One client connection: parse, dispatch in order, write, keep alive."""

    __slots__ = (
        "_body",
        "_body_size",
        "_broken",
        "_busy",
        "_can_write",
        "_closed",
        "_current",
        "_eof",
        "_head_raw",
        "_head_size",
        "_headers",
        "_loop",
        "_max_body",
        "_messages",
        "_parser",
        "_paused",
        "_pending",
        "_phase",
        "_probing",
        "_read_deadline",
        "_server",
        "_service",
        "_started",
        "_streaming",
        "_task",
        "_transport",
        "_url",
        "_write_deadline",
    )

    def __init__(self, service: Service, server: Listener) -> None:
        self._service = service
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._max_body = server.max_body_bytes
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._body_size = 0
        self._head_size = 0
        self._head_raw = 0
        self._messages = 0
        self._phase = _IDLE
        self._pending: deque[Request | Response] = deque()
        self._busy = False
        self._closed = False
        self._broken = False
        self._eof = False
        self._probing = False
        self._started = False
        self._streaming: StreamResponse | None = None
        self._paused = False
        self._task: asyncio.Task[None] | None = None
        self._current: Request | None = None
        self._can_write: asyncio.Future[None] | None = None
        self._read_deadline = _INF
        self._write_deadline = _INF

    # -- asyncio.Protocol -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        server = self._server
        if len(server.connections) >= server.max_connections:
            self._closed = True
            server.refuse()
            self._transport.abort()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        server.connections.add(self)
        # nginx's client_header_timeout runs from the accept: the first request must arrive within it.
        self._read_deadline = server.now + server.header_timeout

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._server.connections.discard(self)
        if self._current is not None:
            self._current.client_gone = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._can_write is not None and not self._can_write.done():
            self._can_write.cancel()

    def eof_received(self) -> bool:
        # The client shut its write side. It may still read (a half-close): answer what it asked, then
        # close. Or it has gone for good, which TCP cannot tell apart until something is written: an
        # HTTP/1.1 client whose answer has not begun gets an interim 102, which a closed socket answers
        # with a reset; ``gone()`` then sees the connection closed and the request is cancelled.
        self._eof = True
        keep = self._busy and self._transport is not None and self._server.ssl is None
        current = self._current
        if keep and current is not None and not current.http10 and not self._started:
            assert self._transport is not None
            self._transport.write(_PROCESSING)
            self._probing = True
        elif keep and self._streaming is not None and self._streaming.heartbeat:
            assert self._transport is not None  # mid-stream: pieces are whole, so this lands between two
            beat = self._streaming.heartbeat
            http10 = current is not None and current.http10
            self._transport.write(beat if http10 else b"%x\r\n%s\r\n" % (len(beat), beat))
            self._probing = True
        if self._probing:
            for delay in (0.02, 0.1, 0.3):  # a reset comes back within a round trip; the sweep goes on
                self._loop.call_later(delay, self.gone)
        return keep

    def gone(self) -> bool:
        """Whether a half-closed client has really gone (its socket reset): then drop the connection."""
        if not self._probing or self._closed or self._transport is None:
            return False
        sock = self._transport.get_extra_info("socket")
        try:
            state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] if sock is not None else 0
        except (OSError, AttributeError, TypeError):
            return False
        if state != _TCP_CLOSE:
            return False
        self._probing = False
        self._transport.abort()
        return True

    def data_received(self, data: bytes) -> None:
        if self._broken:
            return
        head_before = self._phase == _HEAD
        messages = self._messages
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject(400, "protocol upgrades are not supported")
            return
        except httptools.HttpParserError as exc:
            # httptools wraps exceptions raised in callbacks; the cause says which it was.
            cause = exc.__context__
            if isinstance(cause, _Reject):
                self._reject(cause.status, cause.message)
            else:
                self._reject(400, f"malformed HTTP request: {exc}")
            return
        except _Reject as exc:
            self._reject(exc.status, exc.message)
            return
        phase = self._phase
        if phase == _BODY:
            self._read_deadline = self._server.now + self._server.body_timeout
        elif phase == _HEAD and head_before and messages == self._messages:
            # The whole piece belongs to an unfinished head: this also bounds a header line that never
            # ends, which the parser holds without a callback.
            self._head_raw += len(data)
            if self._head_raw > self._server.max_header_bytes:
                self._reject(431, f"request header fields over {self._server.max_header_bytes} bytes")

    def pause_writing(self) -> None:
        if self._can_write is None or self._can_write.done():
            self._can_write = self._loop.create_future()
        self._write_deadline = self._server.now + self._server.write_timeout

    def resume_writing(self) -> None:
        self._write_deadline = _INF
        if self._can_write is not None and not self._can_write.done():
            self._can_write.set_result(None)

    # -- httptools callbacks ----------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._body = []
        self._body_size = 0
        self._head_size = 0
        self._head_raw = 0
        self._messages += 1
        self._phase = _HEAD
        self._read_deadline = self._server.now + self._server.header_timeout

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._server.max_request_line_bytes:
            raise _Reject(414, f"request target over {self._server.max_request_line_bytes} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        headers.append((name.lower(), value))
        self._head_size += len(name) + len(value) + 4
        if len(headers) > self._server.max_headers:
            raise _Reject(431, f"more than {self._server.max_headers} request header fields")
        if self._head_size > self._server.max_header_bytes:
            raise _Reject(431, f"request header fields over {self._server.max_header_bytes} bytes")

    def on_headers_complete(self) -> None:
        self._phase = _BODY
        expect = None
        for key, value in self._headers:
            if key == b"content-length" and value.isdigit() and int(value) > self._max_body:
                raise _Reject(413, f"request body over {self._max_body} bytes")
            if key == b"expect":
                expect = value
        if expect is not None:
            if expect.strip().lower() != b"100-continue":
                raise _Reject(417, f"expectation {expect.decode(errors='replace')!r} is not supported")
            # Ask for the body now. A request pipelined behind another gets no 100 (it would land in the
            # middle of the other's answer); the client sends its body after its own short wait.
            if not self._busy and self._transport is not None and self._parser.get_http_version() == "1.1":
                self._transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._body_size += len(body)
        if self._body_size > self._max_body:
            raise _Reject(413, f"request body over {self._max_body} bytes")

    def on_message_complete(self) -> None:
        self._phase = _IDLE
        url = self._url
        path, _, query = url.partition(b"?")
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        parser = self._parser
        request = Request(parser.get_method(), path, query, self._headers, body)
        request.keep_alive = parser.should_keep_alive()
        request.http10 = parser.get_http_version() == "1.0"
        if self._busy:
            # Pipelined: it waits its turn, and nothing more is read until the queue drains.
            self._pending.append(request)
            if self._transport is not None and not self._paused:
                self._paused = True
                self._transport.pause_reading()
        else:
            self._start(request)

    # -- dispatch ---------------------------------------------------------------------------------------

    def _start(self, request: Request) -> None:
        self._busy = True
        self._started = False
        self._streaming = None
        self._current = request
        self._task = self._loop.create_task(self._run(request))

    async def _run(self, request: Request) -> None:
        try:
            try:
                response = await self._service(request)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("service failed on %s %s", request.method, request.path)
                response = self._error(500, "internal error in the gateway")
            if isinstance(response, Response):
                self._write_whole(response, request)
                # Drain before the next request: a pipelining client that does not read would otherwise
                # make the listener buffer every answer.
                if self._can_write is not None and not self._can_write.done():
                    await self._can_write
            else:
                await self._write_stream(response, request)
        except (asyncio.CancelledError, ConnectionError):
            self._close()
            return
        except Exception:
            # A stream body that failed half-way: its framing cannot be finished honestly, so the
            # connection is closed (the client sees a truncated body, never a hang).
            log.exception("stream failed on %s %s", request.method, request.path)
            self._close()
            return
        self._finish(request.keep_alive)

    def _finish(self, keep_alive: bool) -> None:
        self._busy = False
        self._current = None
        self._task = None
        if not keep_alive or self._closed or self._server.closing:
            self._close()
            return
        if self._pending:
            following = self._pending.popleft()
            if isinstance(following, Response):  # a malformed request behind the one just answered
                self._send_error(following)
                return
            self._start(following)
            return
        if self._eof:
            self._close()
            return
        assert self._transport is not None
        if self._paused:
            self._paused = False
            self._transport.resume_reading()
        if self._phase == _IDLE:
            timeout = self._server.keepalive_timeout
            self._read_deadline = self._server.now + timeout if timeout > 0 else _INF

    def _head(self, response: Response | StreamResponse, request: Request, framing: bytes) -> list[bytes]:
        self._started = True
        self._probing = False
        if isinstance(response, StreamResponse):
            self._streaming = response
        head = [_status_line(response.status), b"content-type: %s\r\n%s" % (response.content_type, framing)]
        for key, value in response.headers:
            head.append(b"%s: %s\r\n" % (key, value))
        if not request.keep_alive:
            head.append(b"connection: close\r\n")
        elif request.http10:
            head.append(b"connection: keep-alive\r\n")
        head.append(b"\r\n")
        return head

    def _write_whole(self, response: Response, request: Request) -> None:
        assert self._transport is not None
        head = self._head(response, request, b"content-length: %d\r\n" % len(response.body))
        if request.method != b"HEAD":
            head.append(response.body)
        self._transport.write(b"".join(head))

    async def _write_stream(self, response: StreamResponse, request: Request) -> None:
        assert self._transport is not None
        transport = self._transport
        body = response.body
        chunked = not request.http10
        if not chunked:  # HTTP/1.0 has no chunked encoding: the end of the body is the end of the connection
            request.keep_alive = False
        framing = (
            b"transfer-encoding: chunked\r\ncache-control: no-cache\r\n"
            if chunked
            else b"cache-control: no-cache\r\n"
        )
        transport.write(b"".join(self._head(response, request, framing)))
        if request.method == b"HEAD":
            if response.abandon is not None:
                response.abandon()
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()
            return
        try:
            async for chunk in body:
                if self._closed:
                    raise ConnectionResetError("client went away")
                if chunk:
                    transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                    if self._can_write is not None and not self._can_write.done():
                        await self._can_write
            self._streaming = None  # the body is complete: nothing may follow it now
            if chunked:
                transport.write(b"0\r\n\r\n")
        finally:
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()

    # -- errors and connection management ---------------------------------------------------------------

    def _error(self, status: int, message: str) -> Response:
        content_type, body = self._server.error_body(status, message)
        return Response(status, body, content_type=content_type)

    def _reject(self, status: int, message: str) -> None:
        """Refuse what the client sent, after the answer in flight if there is one, and close."""
        self._broken = True
        self._read_deadline = _INF
        response = self._error(status, message)
        if self._busy:
            if self._transport is not None and not self._transport.is_closing() and not self._paused:
                self._paused = True
                self._transport.pause_reading()
            self._pending.append(response)
        else:
            self._send_error(response)

    def _send_error(self, response: Response) -> None:
        """Answer, then close the way nginx's ``lingering_close`` does: shut the write side and read
        (and drop) what the client still sends for a moment. Closing at once would make the kernel
        answer the client's next bytes with a reset, which destroys the error before it is read."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        closing = Request(b"", b"", b"", [], b"")
        closing.keep_alive = False
        self._write_whole(response, closing)
        if not transport.can_write_eof():
            self._close()
            return
        transport.write_eof()
        if self._paused:
            self._paused = False
            transport.resume_reading()
        self._read_deadline = self._server.now + _LINGER

    def _close(self) -> None:
        self._read_deadline = _INF
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def check(self, now: float) -> None:
        """Enforce the deadlines (called by the listener's sweep)."""
        if self._probing and self.gone():
            return
        if now >= self._write_deadline:
            log.info("a client read nothing for %.0f s: connection dropped", self._server.write_timeout)
            self._write_deadline = _INF
            if self._transport is not None:
                self._transport.abort()
            return
        if not self._busy and now >= self._read_deadline:
            if self._broken or self._phase == _IDLE:
                self._close()
            else:
                self._reject(408, "the request was not received in time")

    def close_when_idle(self) -> None:
        """Close now if idle, else after the current response (used by graceful shutdown)."""
        if not self._busy:
            self._close()


class Listener:
    """A listening socket whose connections feed one service.

    Every limit and timeout is a keyword argument (the fleet file's ``listener`` section sets them in
    ``skyfabric serve``); the defaults are nginx's where nginx has one.
    """

    def __init__(
        self,
        service: Service,
        *,
        error_body: ErrorBody = plain_error_body,
        max_body_bytes: int = 32 * 1024 * 1024,
        max_request_line_bytes: int = 8192,
        max_header_bytes: int = 32 * 1024,
        max_headers: int = 100,
        header_timeout: float = 60.0,
        body_timeout: float = 60.0,
        write_timeout: float = 60.0,
        keepalive_timeout: float = 75.0,
        max_connections: int = 4096,
    ) -> None:
        self.service = service
        self.error_body = error_body
        self.max_body_bytes = max_body_bytes
        self.max_request_line_bytes = max_request_line_bytes
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.write_timeout = write_timeout
        self.keepalive_timeout = keepalive_timeout
        self.max_connections = max_connections
        self.connections: set[_Connection] = set()
        self.closing = False
        self.refused = 0
        self.ssl: _ssl.SSLContext | None = None
        #: The event loop's clock as of the last sweep: deadlines are computed from it.
        self.now = 0.0
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._refuse_logged = -_INF

    async def start(
        self,
        host: str,
        port: int,
        *,
        reuse_port: bool = False,
        sock: socket.socket | None = None,
        ssl: _ssl.SSLContext | None = None,
    ) -> int:
        """Start listening (TLS when ``ssl`` is given); returns the bound port (useful with port 0)."""
        loop = asyncio.get_running_loop()
        self.ssl = ssl
        self.now = loop.time()
        handshake = self.header_timeout if ssl is not None else None
        if sock is not None:
            self._server = await loop.create_server(
                lambda: _Connection(self.service, self),
                sock=sock,
                backlog=4096,
                ssl=ssl,
                ssl_handshake_timeout=handshake,
            )
        else:
            self._server = await loop.create_server(
                lambda: _Connection(self.service, self),
                host,
                port,
                reuse_port=reuse_port or None,
                backlog=4096,
                ssl=ssl,
                ssl_handshake_timeout=handshake,
            )
        self._sweeper = loop.create_task(self._sweep())
        return int(self._server.sockets[0].getsockname()[1])

    async def _sweep(self) -> None:
        """Check every connection's deadlines a few times per shortest timeout (at most once a second)."""
        loop = asyncio.get_running_loop()
        timeouts = [self.header_timeout, self.body_timeout, self.write_timeout]
        if self.keepalive_timeout > 0:
            timeouts.append(self.keepalive_timeout)
        period = min(1.0, max(0.01, min(timeouts) / 8))
        while True:
            await asyncio.sleep(period)
            now = self.now = loop.time()
            for conn in list(self.connections):
                conn.check(now)

    def refuse(self) -> None:
        """Count a connection refused over ``max_connections``; log it at most once a second."""
        self.refused += 1
        now = asyncio.get_running_loop().time()
        if now - self._refuse_logged >= 1.0:
            self._refuse_logged = now
            log.warning(
                "%d open connections: max_connections reached, new connections are closed (%d so far)",
                len(self.connections),
                self.refused,
            )

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, let responses in flight finish for up to ``grace`` seconds, then close."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close_when_idle()
        deadline = asyncio.get_running_loop().time() + grace
        while self.connections and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn._close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
