"""An upstream that answers every POST with a fixed script of raw bytes: for the framing a fake would not
produce on its own (a reset right after the finish, a stream that ends after ``message_delta``).

Each answer is ``status`` and ``content_type`` as headers, then the script's pieces as chunks, then
either a clean end (the final zero chunk) or a TCP reset (``reset=True``) with no end.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Sequence
from typing import Any

import orjson


class ScriptedUpstream:
    """``url`` once started; ``requests`` holds the parsed bodies it received."""

    def __init__(
        self,
        pieces: Sequence[bytes],
        *,
        reset: bool = False,
        content_type: bytes = b"text/event-stream",
        engine: str = "vllm",
        model: str = "m",
    ) -> None:
        self.pieces = list(pieces)
        self.reset = reset
        self.content_type = content_type
        self.engine = engine
        self.model = model
        self.can_continue = True
        self.requests: list[dict[str, Any]] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method = lines[0].split(" ")[0]
                length = 0
                for line in lines[1:]:
                    if line.lower().startswith("content-length:"):
                        length = int(line.split(":", 1)[1])
                body = await reader.readexactly(length) if length else b""
                if method != "POST":
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
                    )
                    await writer.drain()
                    continue
                self.requests.append(orjson.loads(body) if body else {})
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: "
                    + self.content_type
                    + b"\r\ntransfer-encoding: chunked\r\n\r\n"
                )
                for piece in self.pieces:
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    await writer.drain()
                    await asyncio.sleep(0.005)
                if self.reset:
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
