"""A TCP relay a test can cut: put it between the gateway and a database, then blackhole it.

Byte-level (any protocol: PostgreSQL's, Redis's). ``blackhole()`` is a partition, not a crash: connections
stay open and new ones are accepted, but nothing is relayed either way, so the client sees silence (its
timeouts must notice). ``restore()`` drops the frozen connections (the peers gave up on them long ago) and
relays again.
"""

from __future__ import annotations

import asyncio
import contextlib


class TcpCut:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.cut = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self._drop()

    def blackhole(self) -> None:
        self.cut = True

    def restore(self) -> None:
        self._drop()
        self.cut = False

    def _drop(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.CancelledError):  # the test's loop ends with connections open
            await self._relay(reader, writer)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        while self.cut:  # accepted, never answered
            if writer.transport.is_closing():
                return
            await asyncio.sleep(0.05)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.add(up_writer)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    while self.cut:  # frozen: hold the bytes, relay nothing
                        if dst.transport.is_closing():
                            return
                        await asyncio.sleep(0.05)
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
