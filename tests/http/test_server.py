"""The listener speaks HTTP/1.1 correctly at its edges: keep-alive, pipelining, chunked bodies, limits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from skyfabric.http.messages import Request, Response, StreamResponse
from skyfabric.http.server import Listener


async def echo(request: Request) -> Response | StreamResponse:
    if request.path == b"/stream":

        async def body() -> AsyncIterator[bytes]:
            for i in range(3):
                yield b"data: %d\n\n" % i

        return StreamResponse(200, body())
    return Response(
        200, request.method + b" " + request.path + b" " + request.body, content_type=b"text/plain"
    )


async def raw(port: int, payload: bytes, until: bytes, timeout: float = 2.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    data = b""
    try:
        async with asyncio.timeout(timeout):
            while until not in data:
                piece = await reader.read(65536)
                if not piece:
                    break
                data += piece
    finally:
        writer.close()
    return data


async def start(**kwargs: object) -> tuple[Listener, int]:
    listener = Listener(echo, **kwargs)  # type: ignore[arg-type]
    return listener, await listener.start("127.0.0.1", 0)


async def test_pipelined_requests_are_answered_in_order() -> None:
    listener, port = await start()
    payload = b"".join(
        b"POST /%d HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n%d" % (i, i) for i in range(3)
    )
    data = await raw(port, payload, b"POST /2 2")
    assert data.index(b"POST /0 0") < data.index(b"POST /1 1") < data.index(b"POST /2 2")
    await listener.stop(0.1)


async def test_chunked_request_body_and_chunked_stream_response() -> None:
    listener, port = await start()
    head = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    payload = head + b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    assert b"POST /echo abcde" in await raw(port, payload, b"abcde")
    data = await raw(port, b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n", b"0\r\n\r\n")
    assert b"transfer-encoding: chunked" in data and b"data: 2" in data
    await listener.stop(0.1)


async def test_oversized_body_gets_413_and_malformed_http_gets_400() -> None:
    listener, port = await start(max_body_bytes=1024)
    data = await raw(port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n", b"}}")
    assert data.startswith(b"HTTP/1.1 413")
    data = await raw(port, b"NOT HTTP AT ALL\r\n\r\n", b"}}")
    assert data.startswith(b"HTTP/1.1 400")
    await listener.stop(0.1)


async def test_http10_and_connection_close_close_after_the_response() -> None:
    listener, port = await start()
    data = await raw(port, b"GET /a HTTP/1.0\r\n\r\n", b"never", timeout=1.0)
    assert data.startswith(b"HTTP/1.1 200") and b"connection: close" in data
    await listener.stop(0.1)


async def test_idle_keepalive_connections_are_closed() -> None:
    listener, port = await start(keepalive_timeout=0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    await reader.readuntil(b"GET /a ")
    async with asyncio.timeout(2):
        while await reader.read(1024):
            pass
    writer.close()
    await listener.stop(0.1)
