"""The upstream client: when a request is resent after a stale keep-alive connection, and what a failed
or abandoned read releases. Against a socket-level server on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from skyfabric.core.errors import EndpointAborted, RemoteProtocolError, UpstreamTimeout
from skyfabric.http.client import HTTPClient

OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
PARTIAL = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{"


class Server:
    """Answers each request as ``policy(connection number, request number on it)`` says:
    ``"ok"``, ``"drop"`` (close without a byte: a keep-alive connection the server timed out), ``"hang"``,
    or ``"partial"`` (headers and part of the body, then nothing)."""

    def __init__(self, policy: Callable[[int, int], str]) -> None:
        self.policy = policy
        self.connections = 0
        self.requests = 0
        self.closed_by_client = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=1)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number, nth = self.connections, 0
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.startswith(b"content-length")
                )
                await reader.readexactly(length)
                self.requests += 1
                nth += 1
                action = self.policy(number, nth)
                if action == "drop":
                    return
                if action in ("hang", "partial"):
                    if action == "partial":
                        writer.write(PARTIAL)
                    if not await reader.read(1):
                        self.closed_by_client += 1
                    return
                writer.write(OK)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_client += 1
        finally:
            self._handlers.discard(task)
            self._writers.discard(writer)
            writer.transport.abort()


@pytest.fixture
async def server_factory() -> AsyncIterator[Callable[[Callable[[int, int], str]], asyncio.Future[Server]]]:
    servers: list[Server] = []

    async def make(policy: Callable[[int, int], str]) -> Server:
        server = Server(policy)
        await server.start()
        servers.append(server)
        return server

    yield make  # type: ignore[misc]
    for server in servers:
        await server.stop()


async def _get(client: HTTPClient, server: Server, **kwargs: object) -> bytes:
    resp = await client.request(
        ("http", "127.0.0.1", server.port),
        b"POST",
        b"/x",
        [],
        b"{}",
        connect_timeout=1,
        first_byte_timeout=1,
        **kwargs,  # type: ignore[arg-type]
    )
    return await resp.read(1)


async def test_a_stale_keep_alive_connection_is_replaced_once_while_the_endpoint_is_healthy(
    server_factory: Callable[..., asyncio.Future[Server]],
) -> None:
    server = await server_factory(lambda conn, nth: "drop" if nth == 2 else "ok")
    client = HTTPClient()
    assert await _get(client, server) == b"{}"
    assert await _get(client, server, resend=lambda: True) == b"{}"  # dropped on reuse: resent, fresh
    assert (server.connections, server.requests) == (2, 3)


async def test_no_resend_to_an_endpoint_no_longer_believed_healthy(
    server_factory: Callable[..., asyncio.Future[Server]],
) -> None:
    server = await server_factory(lambda conn, nth: "drop" if nth == 2 else "ok")
    client = HTTPClient()
    await _get(client, server)
    with pytest.raises(RemoteProtocolError):
        await _get(client, server, resend=lambda: False)
    assert (server.connections, server.requests) == (1, 2)


async def test_our_own_abort_is_not_taken_for_a_stale_connection(
    server_factory: Callable[..., asyncio.Future[Server]],
) -> None:
    server = await server_factory(lambda conn, nth: "hang" if nth == 2 else "ok")
    client = HTTPClient()
    await _get(client, server)
    tracker: set[object] = set()
    pending = asyncio.ensure_future(_get(client, server, tracker=tracker, resend=lambda: True))
    while not tracker:
        await asyncio.sleep(0.01)
    for conn in list(tracker):
        conn.abort()  # type: ignore[attr-defined]  # what Proxy.after_ejection does
    with pytest.raises(EndpointAborted):
        await asyncio.wait_for(pending, 0.5)  # at once, not after a resend and a first-byte timeout
    assert (server.connections, server.requests) == (1, 2)
    assert not tracker


async def test_a_request_whose_endpoint_is_ejected_while_connecting_is_not_sent(
    server_factory: Callable[..., asyncio.Future[Server]],
) -> None:
    server = await server_factory(lambda conn, nth: "ok")
    verdicts = iter([True, False])  # healthy when the request starts, ejected once connected
    with pytest.raises(EndpointAborted):
        await _get(HTTPClient(), server, resend=lambda: next(verdicts))
    await asyncio.sleep(0.05)
    assert server.requests == 0


@pytest.mark.parametrize("ending", ["timeout", "cancel"])
async def test_a_body_read_that_does_not_finish_closes_and_forgets_its_connection(
    server_factory: Callable[..., asyncio.Future[Server]], ending: str
) -> None:
    server = await server_factory(lambda conn, nth: "partial")
    client = HTTPClient()
    tracker: set[object] = set()
    resp = await client.request(
        ("http", "127.0.0.1", server.port),
        b"POST",
        b"/x",
        [],
        b"{}",
        connect_timeout=1,
        first_byte_timeout=1,
        tracker=tracker,
    )
    assert tracker
    if ending == "timeout":
        with pytest.raises(UpstreamTimeout):
            await resp.read(0.1)
    else:
        reading = asyncio.ensure_future(resp.read(10))
        await asyncio.sleep(0.05)
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
    assert not tracker and resp.released
    for _ in range(50):
        if server.closed_by_client:
            break
        await asyncio.sleep(0.01)
    assert server.closed_by_client == 1  # the upstream saw the connection close: it stops generating
