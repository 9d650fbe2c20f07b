"""A small pipelined Redis client for the request path: one connection, many commands in flight.

Why not redis-py's asyncio client: it takes a pooled connection per command and runs each through layers
of Python; measured on the overhead harness that cost ~140 µs of CPU per request (two calls: admit,
settle) and +0.4 ms p50 — past issue 13's speed bar. Here a command is one ``write`` of pre-encoded RESP
and one future, answered in order by hiredis' C parser; every request's admission shares the connection
(Redis answers in order, so no pool is needed), and a timed-out command leaves its slot in the queue so
later replies still line up. Supports ``redis://``, ``rediss://`` (TLS) and ``unix://`` URLs with a
password, a user (ACL) and a database number.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from typing import Any
from urllib.parse import unquote, urlparse

import hiredis


class RedisUnavailable(ConnectionError):
    """Raised when Redis cannot be reached, drops the connection, or does not answer in time."""


class RedisReplyError(Exception):
    """Raised when Redis answers a command with an error (a script's bug, a wrong type)."""


def pack(args: tuple[Any, ...]) -> bytes:
    """One command in RESP (hiredis' C encoder: a quarter of the time of doing it in Python)."""
    packed: bytes = hiredis.pack_command(args)
    return packed


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiters: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None
        #: Commands queued this loop iteration, written together by :meth:`flush`.
        self.outgoing: list[bytes] = []

    def flush(self) -> None:
        data, self.outgoing = b"".join(self.outgoing), []
        if self.transport is not None and data:
            self.transport.write(data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport subclasses

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            waiter = self.waiters.popleft()
            if waiter.done():
                continue  # its caller timed out; the reply is dropped, the order kept
            if isinstance(reply, hiredis.ReplyError):
                waiter.set_exception(RedisReplyError(str(reply)))
            else:
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or RedisUnavailable("the connection closed")
        self.transport = None
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(RedisUnavailable(f"the connection to Redis was lost: {self.lost!r}"))


class Resp:
    """Commands and Lua scripts over one lazily (re)opened connection."""

    def __init__(self, url: str, *, timeout: float) -> None:
        parsed = urlparse(url)
        self.unix = parsed.path if parsed.scheme == "unix" else None
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or 6379
        self.tls = ssl.create_default_context() if parsed.scheme == "rediss" else None
        self.username = unquote(parsed.username) if parsed.username else None
        self.password = unquote(parsed.password) if parsed.password else None
        db = parsed.path.lstrip("/") if parsed.scheme != "unix" else ""
        self.db = int(db) if db.isdigit() else 0
        self.timeout = timeout
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._scripts: dict[bytes, bytes] = {}

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            if self.unix is not None:
                connect = loop.create_unix_connection(_Protocol, self.unix)
            else:
                connect = loop.create_connection(_Protocol, self.host, self.port, ssl=self.tls)
            _, protocol = await asyncio.wait_for(connect, self.timeout)
        except (OSError, TimeoutError) as exc:
            raise RedisUnavailable(f"cannot connect to Redis: {exc!r}") from None
        setup: list[tuple[Any, ...]] = []
        if self.password is not None:
            setup.append(("AUTH", self.username, self.password) if self.username else ("AUTH", self.password))
        if self.db:
            setup.append(("SELECT", self.db))
        for command in setup:
            await self._send(protocol, command)
        return protocol

    async def _ready(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and protocol.transport is not None:
            return protocol
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:
            protocol = await asyncio.shield(connecting)
        finally:
            if self._connecting is connecting and connecting.done():
                self._connecting = None
        self._protocol = protocol
        return protocol

    def _send(self, protocol: _Protocol, command: tuple[Any, ...]) -> asyncio.Future[Any]:
        """Queue one command; the commands of one loop iteration go out in one write (one syscall)."""
        if protocol.transport is None:
            raise RedisUnavailable("the connection to Redis is closed")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        protocol.waiters.append(waiter)
        if not protocol.outgoing:
            loop.call_soon(protocol.flush)
        protocol.outgoing.append(pack(command))
        return waiter

    async def _wait(self, protocol: _Protocol, waiters: list[asyncio.Future[Any]]) -> list[Any]:
        """The replies, in order; Redis answers in order, so the last reply done means all are."""
        last = waiters[-1]
        timer = asyncio.get_running_loop().call_later(self.timeout, _expire, last)
        try:
            await last
        except TimeoutError:
            # No answer in time: the link is suspect. Drop it (reconnect next time); this call's other
            # waiters are cancelled so that no failure goes unread.
            for waiter in waiters:
                waiter.cancel()
            if protocol.transport is not None:
                protocol.transport.abort()
            raise RedisUnavailable(f"Redis did not answer within {self.timeout}s") from None
        except RedisReplyError:
            pass  # read below with the others
        except RedisUnavailable:
            for waiter in waiters:  # each failed with the connection: read them all
                if waiter.done() and not waiter.cancelled():
                    waiter.exception()
            raise
        finally:
            timer.cancel()
        failure: BaseException | None = None
        results = []
        for waiter in waiters:
            exc = waiter.exception()
            failure = failure or exc
            results.append(None if exc else waiter.result())
        if failure is not None:
            raise failure
        return results

    async def call(self, *command: Any) -> Any:
        """One command's reply; raises :class:`RedisUnavailable` or :class:`RedisReplyError`."""
        return (await self.pipeline([command]))[0]

    async def pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Several commands sent in one write, their replies in order."""
        protocol = await self._ready()
        waiters = [self._send(protocol, c) for c in commands]
        return await self._wait(protocol, waiters)

    # -- scripts ------------------------------------------------------------------------------------------

    def script(self, source: str) -> bytes:
        """Register a Lua script; its SHA1 names it in :meth:`evalsha`."""
        sha = hashlib.sha1(source.encode()).hexdigest().encode()
        self._scripts[sha] = source.encode()
        return sha

    async def load_scripts(self) -> None:
        await self.pipeline([("SCRIPT", "LOAD", s) for s in self._scripts.values()])

    async def evalsha(self, commands: list[tuple[bytes, list[Any], list[Any]]]) -> list[Any]:
        """Run (sha, keys, args) scripts in one pipeline; loads them once if Redis lost them (a restart)."""
        packed = [("EVALSHA", sha, len(keys), *keys, *args) for sha, keys, args in commands]
        try:
            return await self.pipeline(packed)
        except RedisReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        await self.load_scripts()
        return await self.pipeline(packed)

    async def close(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())
