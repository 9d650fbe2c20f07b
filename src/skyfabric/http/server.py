"""The listener: an asyncio protocol that parses HTTP/1.1 with httptools and calls a service.

One connection handles its requests in order (pipelined requests wait their turn). Bodies of responses
that stream are written with chunked encoding and flow control: when the client reads slowly the
producer waits, it does not buffer without bound. When the client goes away, the request's task is
cancelled, which closes the upstream attempt with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from http import HTTPStatus
from typing import cast

import httptools

from skyfabric.http.messages import Request, Response, Service, StreamResponse

log = logging.getLogger("skyfabric.http")

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_STATUS_LINES = {code: b"HTTP/1.1 %d %s\r\n" % (code, reason) for code, reason in _REASONS.items()}


def _status_line(status: int) -> bytes:
    return _STATUS_LINES.get(status) or b"HTTP/1.1 %d Unknown\r\n" % status


def _error_body(status: int, message: str) -> bytes:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return b'{"error":{"message":"%s","type":"%s","param":null,"code":null}}' % (
        message.replace('"', "'").encode(),
        kind.encode(),
    )


class _Connection(asyncio.Protocol):
    """One client connection: parse, dispatch in order, write, keep alive."""

    __slots__ = (
        "_body",
        "_busy",
        "_can_write",
        "_closed",
        "_current",
        "_headers",
        "_idle_handle",
        "_loop",
        "_max_body",
        "_parser",
        "_pending",
        "_server",
        "_service",
        "_task",
        "_transport",
        "_url",
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
        self._pending: deque[Request] = deque()
        self._busy = False
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._current: Request | None = None
        self._can_write: asyncio.Future[None] | None = None
        self._idle_handle: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._server.connections.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._server.connections.discard(self)
        if self._idle_handle is not None:
            self._idle_handle.cancel()
        if self._current is not None:
            self._current.client_gone = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._can_write is not None and not self._can_write.done():
            self._can_write.set_exception(ConnectionResetError("client went away"))

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject(400, "protocol upgrades are not supported")
        except (httptools.HttpParserError, _BodyTooLarge) as exc:
            # httptools wraps exceptions raised in callbacks; the cause says which it was.
            if isinstance(exc, _BodyTooLarge) or isinstance(exc.__context__, _BodyTooLarge):
                self._reject(413, f"request body over {self._max_body} bytes")
            else:
                self._reject(400, f"malformed HTTP request: {exc}")

    def pause_writing(self) -> None:
        if self._can_write is None or self._can_write.done():
            self._can_write = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._can_write is not None and not self._can_write.done():
            self._can_write.set_result(None)

    # -- httptools callbacks ----------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._body = []
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        for key, value in self._headers:
            if key == b"content-length" and value.isdigit() and int(value) > self._max_body:
                raise _BodyTooLarge

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        if len(self._body) > 1 and sum(map(len, self._body)) > self._max_body:
            raise _BodyTooLarge

    def on_message_complete(self) -> None:
        url = self._url
        path, _, query = url.partition(b"?")
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        request = Request(self._parser.get_method(), path, query, self._headers, body)
        request.keep_alive = self._parser.should_keep_alive()
        if self._busy:
            self._pending.append(request)
        else:
            self._start(request)

    # -- dispatch ---------------------------------------------------------------------------------------

    def _start(self, request: Request) -> None:
        self._busy = True
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
                response = Response(500, _error_body(500, "internal error in the gateway"))
            if isinstance(response, Response):
                self._write_whole(response, request.keep_alive)
            else:
                await self._write_stream(response, request.keep_alive)
        except (asyncio.CancelledError, ConnectionError):
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
            self._start(self._pending.popleft())
        else:
            self._arm_idle()

    def _write_whole(self, response: Response, keep_alive: bool) -> None:
        assert self._transport is not None
        head = [
            _status_line(response.status),
            b"content-type: %s\r\ncontent-length: %d\r\n" % (response.content_type, len(response.body)),
        ]
        for key, value in response.headers:
            head.append(b"%s: %s\r\n" % (key, value))
        if not keep_alive:
            head.append(b"connection: close\r\n")
        head.append(b"\r\n")
        head.append(response.body)
        self._transport.write(b"".join(head))

    async def _write_stream(self, response: StreamResponse, keep_alive: bool) -> None:
        assert self._transport is not None
        transport = self._transport
        head = [
            _status_line(response.status),
            b"content-type: %s\r\ntransfer-encoding: chunked\r\ncache-control: no-cache\r\n"
            % response.content_type,
        ]
        for key, value in response.headers:
            head.append(b"%s: %s\r\n" % (key, value))
        if not keep_alive:
            head.append(b"connection: close\r\n")
        head.append(b"\r\n")
        transport.write(b"".join(head))
        body = response.body
        try:
            async for chunk in body:
                if self._closed:
                    raise ConnectionResetError("client went away")
                if chunk:
                    transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    if self._can_write is not None and not self._can_write.done():
                        await self._can_write
            transport.write(b"0\r\n\r\n")
        finally:
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()

    # -- connection management --------------------------------------------------------------------------

    def _arm_idle(self) -> None:
        if self._server.keepalive_timeout > 0:
            self._idle_handle = self._loop.call_later(self._server.keepalive_timeout, self._close_if_idle)

    def _close_if_idle(self) -> None:
        if not self._busy:
            self._close()

    def _reject(self, status: int, message: str) -> None:
        if self._transport is not None and not self._busy:
            self._write_whole(Response(status, _error_body(status, message)), keep_alive=False)
        self._close()

    def _close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def close_when_idle(self) -> None:
        """Close now if idle, else after the current response (used by graceful shutdown)."""
        if not self._busy:
            self._close()


class _BodyTooLarge(Exception):
    pass


class Listener:
    """A listening socket whose connections feed one service."""

    def __init__(
        self,
        service: Service,
        *,
        max_body_bytes: int = 32 * 1024 * 1024,
        keepalive_timeout: float = 75.0,
    ) -> None:
        self.service = service
        self.max_body_bytes = max_body_bytes
        self.keepalive_timeout = keepalive_timeout
        self.connections: set[_Connection] = set()
        self.closing = False
        self._server: asyncio.Server | None = None

    async def start(
        self, host: str, port: int, *, reuse_port: bool = False, sock: socket.socket | None = None
    ) -> int:
        """Start listening; returns the bound port (useful with port 0)."""
        loop = asyncio.get_running_loop()
        if sock is not None:
            self._server = await loop.create_server(
                lambda: _Connection(self.service, self), sock=sock, backlog=4096
            )
        else:
            self._server = await loop.create_server(
                lambda: _Connection(self.service, self),
                host,
                port,
                reuse_port=reuse_port or None,
                backlog=4096,
            )
        return int(self._server.sockets[0].getsockname()[1])

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
