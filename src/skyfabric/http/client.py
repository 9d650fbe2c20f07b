"""Upstream connections: keep-alive pools per origin, and responses read with named timeouts.

Every wait has a phase name (connect, first_byte, idle) so that a silent upstream is abandoned within
the timeout of the phase it is stuck in, and the error says which. Failures are translated here, at the
boundary, into :mod:`skyfabric.core.errors`; nothing above this module sees an ``OSError``.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import httptools

from skyfabric.core.errors import ConnectError, EndpointAborted, RemoteProtocolError, UpstreamTimeout
from skyfabric.http.messages import Headers, find_header

_READ_HIGH_WATER = 1 << 20


class _UpstreamConnection(asyncio.Protocol):
    """One connection to an upstream; carries one request at a time."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.status = 0
        self.headers: Headers = []
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.headers_done = False
        self.message_done = False
        self.keep_alive = True
        self.got_bytes = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False
        self.reused = False
        #: Dropped by the gateway because its endpoint was found dead (``abort``), not by the peer.
        self.aborted = False
        #: A committed stream waits for this upstream's next bytes right now. The stall watchdog counts an
        #: endpoint's silence only then: a stream held up by its own slow client is not the endpoint's fault.
        self.awaited = False
        #: The set this connection is registered in while a request is on it (see ``HTTPClient.request``).
        self.tracker: set[Any] | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.message_done and self.error is None:  # keep the first cause (e.g. our own abort)
            self.error = exc or ConnectionResetError("upstream closed the connection")
        self._wake()

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = exc
            self.close()
            self._wake()

    def eof_received(self) -> bool | None:
        return None

    # -- httptools callbacks ----------------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _READ_HIGH_WATER and self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.message_done = True
        self._wake()

    # -- helpers ----------------------------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def reset(self) -> None:
        # The parser carries on to the next response of a keep-alive connection by itself.
        self.status = 0
        self.headers = []
        self.chunks.clear()
        self.buffered = 0
        self.headers_done = False
        self.message_done = False
        self.got_bytes = False
        self.error = None

    async def wait(self, timeout: float, phase: str, endpoint: str, sent_any: bool) -> None:
        """Wait for the next parser event, or raise the phase's timeout / the connection's error."""
        if self.error is not None:
            raise _translate(self, endpoint, sent_any)
        waiter = self.loop.create_future()
        self.waiter = waiter
        self.awaited = sent_any
        handle = self.loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        except TimeoutError:
            self.close()
            raise UpstreamTimeout(phase, timeout, endpoint=endpoint, sent_any=sent_any) from None
        finally:
            handle.cancel()
            self.waiter = None
            self.awaited = False
        if self.error is not None and not self.message_done:
            raise _translate(self, endpoint, sent_any)

    def take(self) -> bytes:
        data = b"".join(self.chunks) if len(self.chunks) != 1 else self.chunks[0]
        self.chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    def close(self) -> None:
        self.closed = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection now: its endpoint was found dead. Whoever waits on it gets
        :class:`EndpointAborted` at once, and the request is not resent to that endpoint."""
        self.aborted = True
        self.close()
        if self.error is None and not self.message_done:
            self.error = ConnectionAbortedError("aborted by the gateway (endpoint found dead)")
        self._wake()

    def untrack(self) -> None:
        if self.tracker is not None:
            self.tracker.discard(self)
            self.tracker = None


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


def _translate(conn: _UpstreamConnection, endpoint: str, sent_any: bool) -> Exception:
    exc = conn.error
    if conn.aborted:
        return EndpointAborted(f"upstream connection lost: {exc}", endpoint=endpoint, sent_any=sent_any)
    if isinstance(exc, httptools.HttpParserError):
        return RemoteProtocolError(
            f"malformed HTTP from upstream: {exc}", endpoint=endpoint, sent_any=sent_any
        )
    return RemoteProtocolError(
        f"upstream connection lost: {exc or 'closed'}", endpoint=endpoint, sent_any=sent_any
    )


class UpstreamResponse:
    """A response being read from an upstream. Read it whole (``read``) or piece by piece (``next``).

    Call ``release`` when done: a fully read keep-alive connection goes back to its pool, anything else
    is closed (a half-read response cannot be reused).
    """

    __slots__ = ("_conn", "_released", "endpoint", "headers", "status")

    def __init__(self, conn: _UpstreamConnection, endpoint: str) -> None:
        self._conn = conn
        self.status = conn.status
        self.headers = conn.headers
        self.endpoint = endpoint
        self._released = False

    def header(self, name: bytes) -> bytes | None:
        """The first value of a (lower-case) header, or None."""
        return find_header(self.headers, name)

    async def read(self, timeout: float) -> bytes:
        """The whole body; ``timeout`` bounds each silence between pieces (phase ``idle``).

        However the read ends — error, timeout, cancellation — the connection is released (closed if the
        body was not read to its end), so the upstream stops and the endpoint's in-flight set forgets it.
        """
        conn = self._conn
        parts: list[bytes] = []
        try:
            while True:
                if conn.chunks:
                    parts.append(conn.take())
                if conn.message_done:
                    break
                await conn.wait(timeout, "idle", self.endpoint, False)
        except BaseException:
            self.abort()
            raise
        self.release()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def next(self, timeout: float, phase: str = "idle", sent_any: bool = False) -> bytes | None:
        """The next piece of the body (whatever has arrived), or None at its end.

        A failed or cancelled wait closes the connection: a half-read response cannot be reused.
        """
        conn = self._conn
        while True:
            if conn.chunks:
                return conn.take()
            if conn.message_done:
                self.release()
                return None
            try:
                await conn.wait(timeout, phase, self.endpoint, sent_any)
            except BaseException:
                self.abort()
                raise

    @property
    def released(self) -> bool:
        """Whether the connection was already given back or closed."""
        return self._released

    def abort(self) -> None:
        """Close the connection: the response will not be read to its end."""
        self._conn.close()
        self.release()

    def release(self) -> None:
        """Give the connection back (or close it, if it cannot carry another request)."""
        if self._released:
            return
        self._released = True
        conn = self._conn
        conn.untrack()
        if conn.message_done and conn.keep_alive and not conn.closed and not conn.chunks:
            conn.pool.put_back(conn)
        else:
            conn.close()


class ConnectionPool:
    """Idle keep-alive connections to one origin (scheme, host, port)."""

    def __init__(
        self,
        scheme: str,
        host: str,
        port: int,
        *,
        max_idle: int = 256,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.scheme = scheme
        self.host = host
        self.port = port
        self.max_idle = max_idle
        self.idle: deque[_UpstreamConnection] = deque()
        self.ssl_context = ssl_context if scheme == "https" else None
        if scheme == "https" and self.ssl_context is None:
            self.ssl_context = ssl.create_default_context()
        self.host_header = host.encode() if port in (80, 443) else f"{host}:{port}".encode()

    async def connect(self, timeout: float, endpoint: str) -> _UpstreamConnection:
        """A fresh connection, or :class:`ConnectError` within ``timeout``."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: _UpstreamConnection(self),
                    self.host,
                    self.port,
                    ssl=self.ssl_context,
                    server_hostname=self.host if self.ssl_context else None,
                )
        except TimeoutError:
            raise UpstreamTimeout("connect", timeout, endpoint=endpoint) from None
        except (OSError, ssl.SSLError) as exc:
            raise ConnectError(
                f"cannot connect to {self.host}:{self.port}: {exc}", endpoint=endpoint
            ) from None
        sock = conn.transport.get_extra_info("socket") if conn.transport else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def take_idle(self) -> _UpstreamConnection | None:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
        return None

    def put_back(self, conn: _UpstreamConnection) -> None:
        if len(self.idle) < self.max_idle:
            self.idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()


class HTTPClient:
    """Pools by origin; sends one request and returns once the response headers are in."""

    def __init__(self) -> None:
        self.pools: dict[tuple[str, str, int], ConnectionPool] = {}

    def pool(self, origin: tuple[str, str, int]) -> ConnectionPool:
        pool = self.pools.get(origin)
        if pool is None:
            pool = self.pools[origin] = ConnectionPool(*origin)
        return pool

    async def request(
        self,
        origin: tuple[str, str, int],
        method: bytes,
        path: bytes,
        headers: Headers,
        body: bytes,
        *,
        connect_timeout: float,
        first_byte_timeout: float,
        endpoint: str = "",
        tracker: set[Any] | None = None,
        resend: Callable[[], bool] | None = None,
    ) -> UpstreamResponse:
        """Send a request; return when the status and headers have arrived.

        A pooled connection that turns out to be dead before any byte came back is replaced by a fresh
        one once: that is a stale keep-alive connection, not a failed upstream — but only when ``resend``
        (if given) says the endpoint is still believed healthy, and never after the gateway aborted the
        connection itself (:class:`EndpointAborted`): a dead endpoint's kernel may still accept, and a
        resend there would wait out the whole first-byte timeout. For the same reason a request whose
        endpoint was ejected while its fresh connection was being opened is not sent.
        """
        pool = self.pool(origin)
        head = [
            b"%s %s HTTP/1.1\r\nhost: %s\r\ncontent-length: %d\r\n"
            % (method, path, pool.host_header, len(body))
        ]
        for key, value in headers:
            head.append(b"%s: %s\r\n" % (key, value))
        head.append(b"\r\n")
        head.append(body)
        payload = b"".join(head)
        conn = pool.take_idle()
        if conn is not None:
            conn.reset()
            conn.reused = True
            try:
                return await self._exchange(conn, payload, first_byte_timeout, endpoint, tracker)
            except RemoteProtocolError:
                if conn.got_bytes or conn.aborted or (resend is not None and not resend()):
                    raise
        believed = resend is not None and resend()
        conn = await pool.connect(connect_timeout, endpoint)
        if believed and resend is not None and not resend():
            # Ejected while we connected (a blackhole's kernel accepts at once): send nothing there.
            conn.close()
            raise EndpointAborted("endpoint ejected while connecting to it", endpoint=endpoint)
        return await self._exchange(conn, payload, first_byte_timeout, endpoint, tracker)

    async def _exchange(
        self,
        conn: _UpstreamConnection,
        payload: bytes,
        timeout: float,
        endpoint: str,
        tracker: set[Any] | None,
    ) -> UpstreamResponse:
        assert conn.transport is not None
        if tracker is not None:
            conn.tracker = tracker
            tracker.add(conn)
        conn.transport.write(payload)
        try:
            while not conn.headers_done:
                await conn.wait(timeout, "first_byte", endpoint, False)
        except BaseException:
            conn.untrack()
            conn.close()
            raise
        return UpstreamResponse(conn, endpoint)

    def close(self) -> None:
        """Close every idle connection."""
        for pool in self.pools.values():
            pool.close()
