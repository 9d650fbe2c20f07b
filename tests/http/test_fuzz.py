"""Property-based fuzz: hostile bytes at the parser and random requests at the public endpoints.

The property: no 5xx, no crash (no exception reaches the event loop or the service-failure log), and the
listener answers a good request after every example. Servers run on a uvloop loop in a thread, as in
production; the fuzzing client uses blocking sockets (hypothesis drives plain functions).
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import httpx
import pytest
import uvloop
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skyfabric.core.endpoints import fleet_endpoints
from skyfabric.core.fleet import parse_fleet
from skyfabric.gateway.app import Gateway
from skyfabric.gateway.serve import make_listener
from skyfabric.http.messages import Request, Response
from skyfabric.http.server import Listener
from tests.conftest import fleet_data
from tests.support.fake_upstream import FakeUpstream

T = TypeVar("T")
FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


class LoopThread:
    """A uvloop event loop in a thread: the servers under fuzz live there."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(self._record)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def _record(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # A client of an earlier test, collected here after its own loop closed, is not the server's fault.
        exc = context.get("exception")
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        self.errors.append(context)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class Failures(logging.Handler):
    """Collects ERROR records: a service exception or a protocol crash is logged there."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def failures() -> Iterator[Failures]:
    handler = Failures()
    logging.getLogger().addHandler(handler)
    yield handler
    logging.getLogger().removeHandler(handler)


def exchange(port: int, payload: bytes, pieces: int = 1, timeout: float = 2.0) -> bytes:
    """Send ``payload`` (in ``pieces``), shut the write side, and read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        step = max(1, len(payload) // pieces)
        try:
            for i in range(0, len(payload), step):
                s.sendall(payload[i : i + step])
            s.shutdown(socket.SHUT_WR)
        except OSError:  # the listener refused and closed while we were still sending
            pass
        data = b""
        try:
            while piece := s.recv(65536):
                data += piece
        except (ConnectionResetError, TimeoutError):
            pass
    return data


def assert_serves(port: int, path: bytes = b"/ok") -> None:
    data = exchange(port, b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
    assert data.startswith(b"HTTP/1.1 200"), data[:200]


# -- the parser ---------------------------------------------------------------------------------------------


async def echo(request: Request) -> Response:
    return Response(
        200, request.method + b" " + request.path + b" " + request.body, content_type=b"text/plain"
    )


@pytest.fixture(scope="module")
def parser_port() -> Iterator[tuple[LoopThread, int]]:
    thread = LoopThread()
    listener = Listener(echo, max_body_bytes=4096, max_header_bytes=2048, max_headers=20, header_timeout=2.0)
    port = thread.run(listener.start("127.0.0.1", 0))
    yield thread, port
    thread.run(listener.stop(0.2))
    thread.close()


token = st.binary(min_size=0, max_size=12)
methods = (
    st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"CONNECT", b"PRI"]) | token
)
targets = st.sampled_from([b"/", b"/v1/models", b"*", b"http://x/", b"/a?b=c"]) | st.binary(max_size=40)
versions = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.10", b""]) | token
header_names = st.sampled_from(
    [b"Host", b"Content-Length", b"Transfer-Encoding", b"Expect", b"Connection", b"Upgrade", b"X-A"]
) | st.binary(max_size=10)
header_values = (
    st.sampled_from([b"chunked", b"100-continue", b"close", b"keep-alive", b"0", b"5", b"-1", b"99999999999"])
    | st.integers(0, 5000).map(lambda n: b"%d" % n)
    | st.binary(max_size=30)
)
headers = st.lists(st.tuples(header_names, header_values), max_size=25)


@st.composite
def chunked_bodies(draw: st.DrawFn) -> bytes:
    out = b""
    for data in draw(st.lists(st.binary(max_size=64), max_size=5)):
        size = draw(st.sampled_from([len(data), len(data) + 1, max(0, len(data) - 1)]))
        ext = draw(st.sampled_from([b"", b";x=y", b" ", b"zz"]))
        out += b"%x%s\r\n%s\r\n" % (size, ext, data)
    return out + draw(st.sampled_from([b"0\r\n\r\n", b"0\r\nTrailer: x\r\n\r\n", b"", b"0\r\n"]))


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    line = draw(methods) + b" " + draw(targets) + b" " + draw(versions) + b"\r\n"
    head = b"".join(name + b": " + value + b"\r\n" for name, value in draw(headers))
    body = draw(st.binary(max_size=300) | chunked_bodies())
    return line + head + b"\r\n" + body


payloads = (
    st.lists(requests(), min_size=1, max_size=3).map(b"".join)
    | st.binary(max_size=400)
    | st.tuples(requests(), st.binary(max_size=50)).map(lambda t: t[0] + t[1])
)


@FUZZ
@given(payload=payloads, pieces=st.integers(1, 4))
def test_the_parser_never_answers_5xx_nor_crashes(
    parser_port: tuple[LoopThread, int], failures: Failures, payload: bytes, pieces: int
) -> None:
    thread, port = parser_port
    data = exchange(port, payload, pieces)
    statuses = [int(code) for code in STATUS.findall(data)]
    assert all(status < 500 for status in statuses), (statuses, data[:300])
    assert not thread.errors, thread.errors
    assert not failures.records, failures.records
    assert_serves(port)


# -- the public endpoints -----------------------------------------------------------------------------------


class EngineLikeUpstream(FakeUpstream):
    """Answers malformed bodies with a 400 the way an engine validating its input does (the plain fake
    raises on them, which would test the fake rather than the gateway)."""

    async def _serve(self, request: web.Request, kind: str) -> web.StreamResponse:
        try:
            body = await request.json()
            assert isinstance(body, dict) and isinstance(body.get("model"), str)
            max_tokens = body.get("max_tokens")
            assert max_tokens is None or (isinstance(max_tokens, int) and max_tokens >= 0)
            if kind == "chat":
                assert all(isinstance(m, dict) for m in body["messages"])
            else:
                assert isinstance(body.get("prompt"), str)
            assert body.get("stream_options") is None or isinstance(body["stream_options"], dict)
        except Exception:
            return web.json_response(
                {"error": {"message": "invalid request", "type": "BadRequestError"}}, status=400
            )
        return await super()._serve(request, kind)


@pytest.fixture(scope="module")
def gateway_port() -> Iterator[tuple[LoopThread, int]]:
    thread = LoopThread()
    up = EngineLikeUpstream("a", tokens=3)
    thread.run(up.start())
    fleet = parse_fleet(fleet_data({"aws": [up]}, health={"probe_interval": 0}))
    gateway = Gateway(fleet, fleet_endpoints(fleet))
    listener = make_listener(gateway, fleet.listener)
    port = thread.run(listener.start("127.0.0.1", 0))
    yield thread, port
    thread.run(listener.stop(0.2))
    thread.run(gateway.close())
    thread.run(up.stop())
    thread.close()


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool"]) | json_values},
        optional={"content": st.text(max_size=40) | json_values},
    )
    | json_values,
    max_size=3,
)
openai_bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["m", "alias-m", "nope"]) | json_values,
        "messages": messages,
        "prompt": st.text(max_size=40) | json_values,
        "stream": st.booleans() | json_values,
        "max_tokens": st.integers(-5, 10) | json_values,
        "stream_options": st.just({"include_usage": True}) | json_values,
        "n": st.integers(0, 3),
        "temperature": json_values,
    },
)
bodies = openai_bodies.map(lambda b: httpx.Request("POST", "/", json=b).content) | st.binary(max_size=200)
paths = st.sampled_from(
    ["/v1/chat/completions", "/v1/completions", "/v1/models", "/healthz", "/readyz", "/metrics", "/"]
)
http_methods = st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH"])
extra_headers = st.fixed_dictionaries(
    {},
    optional={
        "x-skyfabric-deadline": st.sampled_from(["1", "0", "-3", "abc", "1e309", "nan", "inf"]),
        "x-skyfabric-priority": st.sampled_from(["high", "low", "0", "zz", "999"]),
        "content-type": st.sampled_from(["application/json", "text/plain", "x"]),
    },
)


@FUZZ
@given(method=http_methods, path=paths, body=bodies, headers=extra_headers)
def test_the_public_endpoints_never_answer_5xx(
    gateway_port: tuple[LoopThread, int],
    failures: Failures,
    method: str,
    path: str,
    body: bytes,
    headers: dict[str, str],
) -> None:
    thread, port = gateway_port
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        response = client.request(method, path, content=body, headers=headers)
        if method == "HEAD":
            assert response.content == b""
    assert response.status_code < 500, (response.status_code, response.text[:300])
    assert not thread.errors, thread.errors
    assert not failures.records, failures.records
    assert_serves(port, b"/healthz")
