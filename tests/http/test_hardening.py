"""The listener holds to nginx's defaults against rude clients: limits, timeouts, pipelining, half-close.

Every test speaks raw HTTP over a real loopback socket, because what is checked is the bytes on the wire.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator

from skyfabric.http.messages import Request, Response, StreamResponse
from skyfabric.http.server import Listener

#: Set by the ``/forever`` stream's ``finally``: the producer was closed (what stops an upstream).
closed_streams: list[str] = []


async def echo(request: Request) -> Response | StreamResponse:
    if request.path == b"/stream":

        async def body() -> AsyncIterator[bytes]:
            for i in range(3):
                yield b"data: %d\n\n" % i

        return StreamResponse(200, body())
    if request.path == b"/forever":

        async def endless() -> AsyncIterator[bytes]:
            try:
                while True:
                    yield b"x" * 65536
                    await asyncio.sleep(0)
            finally:
                closed_streams.append("forever")

        return StreamResponse(200, endless())
    if request.path == b"/slow":
        await asyncio.sleep(0.3)
    if request.path == b"/big":
        return Response(200, b"y" * (8 * 1024 * 1024), content_type=b"text/plain")
    return Response(
        200, request.method + b" " + request.path + b" " + request.body, content_type=b"text/plain"
    )


async def start(**kwargs: object) -> tuple[Listener, int]:
    listener = Listener(echo, **kwargs)  # type: ignore[arg-type]
    return listener, await listener.start("127.0.0.1", 0)


async def read_all(reader: asyncio.StreamReader, timeout: float = 3.0) -> bytes:
    """Everything the server sends until it closes (or ``timeout``)."""
    data = b""
    try:
        async with asyncio.timeout(timeout):
            while piece := await reader.read(65536):
                data += piece
    except (TimeoutError, ConnectionResetError):
        pass
    return data


async def exchange(port: int, payload: bytes, timeout: float = 3.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    try:
        return await read_all(reader, timeout)
    finally:
        writer.close()


def good_request_works(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
        s.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while piece := s.recv(65536):
            data += piece
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"GET /ok "), data


# -- limits ------------------------------------------------------------------------------------------------


async def test_a_request_target_over_the_limit_gets_414() -> None:
    listener, port = await start()
    data = await exchange(port, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 414"), data[:80]
    await asyncio.to_thread(good_request_works, port)
    await listener.stop(0.1)


async def test_too_many_header_fields_get_431() -> None:
    listener, port = await start()
    fields = b"".join(b"X-H%d: v\r\n" % i for i in range(150))
    data = await exchange(port, b"GET /a HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
    assert data.startswith(b"HTTP/1.1 431"), data[:80]
    await listener.stop(0.1)


async def test_a_head_over_the_size_limit_gets_431_even_if_one_line_never_ends() -> None:
    listener, port = await start()
    big = b"GET /a HTTP/1.1\r\nHost: x\r\nCookie: " + b"c" * 40_000 + b"\r\n\r\n"
    assert (await exchange(port, big)).startswith(b"HTTP/1.1 431")
    # A header line that never ends, sent piece by piece: the parser holds it without a callback.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\nX-Endless: ")
    await asyncio.sleep(0.05)
    for _ in range(64):
        writer.write(b"z" * 4096)
        await asyncio.sleep(0)
        if writer.is_closing():
            break
    data = await read_all(reader)
    writer.close()
    assert data.startswith(b"HTTP/1.1 431"), data[:80]
    await listener.stop(0.1)


async def test_limits_do_not_refuse_ordinary_requests_pipelined_in_one_burst() -> None:
    listener, port = await start(max_header_bytes=2048)
    one = b"GET /p HTTP/1.1\r\nHost: x\r\nUser-Agent: " + b"u" * 900 + b"\r\n\r\n"
    data = await exchange(port, one * 40 + b"GET /last HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert data.count(b"HTTP/1.1 200") == 41 and b"431" not in data
    await listener.stop(0.1)


# -- timeouts ----------------------------------------------------------------------------------------------


async def test_slowloris_gets_408_when_the_head_takes_longer_than_header_timeout() -> None:
    listener, port = await start(header_timeout=0.4)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    writer.write(b"GET /a HTTP/1.1\r\n")

    async def drip() -> None:
        for i in range(30):  # a header every 0.1 s: each read is prompt, the head never ends
            await asyncio.sleep(0.1)
            writer.write(b"X-%d: v\r\n" % i)

    dripping = asyncio.create_task(drip())
    async with asyncio.timeout(3):
        first = await reader.read(65536)
    waited = time.monotonic() - started
    data = first + await read_all(reader)
    dripping.cancel()
    writer.close()
    assert data.startswith(b"HTTP/1.1 408"), data[:80]
    assert 0.3 < waited < 1.5
    await asyncio.to_thread(good_request_works, port)
    await listener.stop(0.1)


async def test_a_connection_that_sends_nothing_is_closed_after_header_timeout() -> None:
    listener, port = await start(header_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    assert await read_all(reader) == b""
    assert time.monotonic() - started < 1.5
    writer.close()
    await listener.stop(0.1)


async def test_a_body_that_stalls_gets_408() -> None:
    listener, port = await start(body_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly some")
    started = time.monotonic()
    data = await read_all(reader)
    writer.close()
    assert data.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 1.5, data[:80]
    await listener.stop(0.1)


async def test_a_client_that_stops_reading_is_dropped_alone_and_its_producer_closed() -> None:
    closed_streams.clear()
    listener, port = await start(write_timeout=0.3)
    stuck = socket.create_connection(("127.0.0.1", port))
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.sendall(b"GET /forever HTTP/1.1\r\nHost: x\r\n\r\n")  # and never read
    started = time.monotonic()
    # Meanwhile another client is served as usual.
    await asyncio.to_thread(good_request_works, port)
    while listener.connections and time.monotonic() - started < 5:
        await asyncio.sleep(0.05)
    assert not listener.connections, "the client that stopped reading was never dropped"
    assert time.monotonic() - started < 2.0
    for _ in range(40):
        if closed_streams:
            break
        await asyncio.sleep(0.05)
    assert closed_streams == ["forever"]  # the producer's finally ran: the upstream would stop
    stuck.close()
    await asyncio.to_thread(good_request_works, port)
    await listener.stop(0.1)


# -- pipelining, Expect, half-close, HTTP/1.0, HEAD --------------------------------------------------------


async def test_pipelining_is_bounded_the_listener_stops_reading_behind_a_request_in_flight() -> None:
    release = asyncio.Event()
    seen: list[bytes] = []

    async def held(request: Request) -> Response:
        seen.append(request.path)
        await release.wait()
        return Response(200, b"ok", content_type=b"text/plain")

    listener = Listener(held)
    port = await listener.start("127.0.0.1", 0)
    client = socket.create_connection(("127.0.0.1", port))
    client.setblocking(False)
    one = b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 16384\r\n\r\n" + b"b" * 16384
    sent, limit, stalled_since = 0, 64 * 1024 * 1024, None
    while sent < limit:
        try:
            sent += client.send(one)
            stalled_since = None
        except BlockingIOError:
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > 0.5:
                break
            await asyncio.sleep(0.01)
    # Kernel buffers on both sides hold a few MB; a listener that kept reading would take all 64 MB.
    assert sent < 32 * 1024 * 1024, f"the listener read {sent} bytes of pipelined requests"
    assert seen == [b"/p"]
    release.set()
    client.close()
    await listener.stop(0.1)


async def test_expect_100_continue_is_answered_before_the_body_is_sent() -> None:
    listener, port = await start()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /e HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    async with asyncio.timeout(2):
        interim = await reader.readuntil(b"\r\n\r\n")
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"hello")
    async with asyncio.timeout(2):
        assert b"POST /e hello" in await reader.readuntil(b"hello")
    writer.close()
    data = await exchange(port, b"POST /e HTTP/1.1\r\nHost: x\r\nExpect: teapot\r\nContent-Length: 1\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 417"), data[:80]
    # Too large: refused at once, no 100 asking for the body.
    listener2, port2 = await start(max_body_bytes=1024)
    data = await exchange(
        port2, b"POST /e HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n"
    )
    assert data.startswith(b"HTTP/1.1 413"), data[:80]
    await listener.stop(0.1)
    await listener2.stop(0.1)


async def test_a_half_closed_client_still_gets_its_answer() -> None:
    listener, port = await start()

    def ask() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
            s.sendall(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
            s.shutdown(socket.SHUT_WR)
            data = b""
            while piece := s.recv(65536):
                data += piece
            return data

    data = await asyncio.to_thread(ask)
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"POST /slow hi"), data
    assert not listener.connections or all(c._eof for c in listener.connections)
    await listener.stop(0.1)


async def test_http10_clients_get_a_stream_without_chunked_encoding() -> None:
    listener, port = await start()
    data = await exchange(port, b"GET /stream HTTP/1.0\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding" not in head.lower() and b"connection: close" in head.lower()
    assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    # HTTP/1.0 with keep-alive gets a whole response it can frame, and is told the connection stays.
    data = await exchange(port, b"GET /k HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", timeout=0.5)
    assert b"connection: keep-alive" in data.lower() and b"content-length: 7" in data.lower()
    await listener.stop(0.1)


async def test_head_gets_the_headers_of_get_and_no_body() -> None:
    listener, port = await start()
    payload = b"HEAD /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    data = await exchange(port, payload)
    first, _, rest = data.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200") and b"content-length: 8" in first  # len(b"HEAD /a ")
    assert rest.startswith(b"HTTP/1.1 200"), rest[:40]  # nothing between the HEAD answer and the next
    assert rest.endswith(b"GET /b ")
    data = await exchange(port, b"HEAD /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert data.endswith(b"\r\n\r\n") and b"data:" not in data
    await listener.stop(0.1)


# -- connection cap, error bodies ----------------------------------------------------------------------------


async def test_connections_over_max_connections_are_closed_at_once() -> None:
    listener, port = await start(max_connections=2)
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    await asyncio.sleep(0.05)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    started = time.monotonic()
    assert await read_all(reader) == b""  # closed unread
    assert time.monotonic() - started < 1.0 and listener.refused == 1
    writer.close()
    for _, w in held:
        w.close()
    await asyncio.sleep(0.1)
    await asyncio.to_thread(good_request_works, port)  # room again once they are gone
    await listener.stop(0.1)


async def test_the_service_words_the_listeners_errors() -> None:
    def teapot(status: int, message: str) -> tuple[bytes, bytes]:
        return b"application/x-teapot", b"<%d %s>" % (status, message.encode())

    listener = Listener(echo, error_body=teapot, max_body_bytes=1024)
    port = await listener.start("127.0.0.1", 0)
    data = await exchange(port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
    assert b"content-type: application/x-teapot" in data and data.endswith(
        b"<413 request body over 1024 bytes>"
    )
    await listener.stop(0.1)


def test_openai_error_bodies_survive_backslashes_quotes_and_control_characters() -> None:
    from skyfabric.gateway.api_errors import error_body

    message = 'bad \\ path "C:\\x"\n\x01\ttab'
    content_type, body = error_body(400, message)
    assert content_type == b"application/json"
    assert json.loads(body) == {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    }
