"""AWS's binary event-stream framing (``application/vnd.amazon.eventstream``), read with botocore's parser.

A message is a 12-byte prelude (total length, headers length, a CRC32 of those eight bytes), typed
headers, a payload and a CRC32 of everything before it. botocore's :class:`EventStreamBuffer` checks
both CRCs and the length limits; this module only adds what the gateway needs beside it: each message's
raw bytes (a message split across reads waits for the rest, whatever the split), and its three headers
that say what it is. A CRC mismatch or a malformed prelude is :class:`MalformedEvent`: the stream cannot
be trusted past it, so the relay treats it as a broken stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from botocore.eventstream import EventStreamBuffer, ParserError

from skyfabric.core.errors import MalformedEvent


@dataclass(frozen=True, slots=True)
class Frame:
    """One event-stream message: its bytes, ``:message-type`` (``event``, ``exception``, ``error``),
    ``:event-type`` or ``:exception-type``, the other headers and the payload."""

    raw: bytes
    message_type: str
    kind: str
    headers: dict[str, Any]
    payload: bytes


class FrameReader:
    """Bytes in, whole CRC-checked frames out (stateful: one per response)."""

    def __init__(self) -> None:
        self._parser = EventStreamBuffer()
        self._pending = b""  # bytes fed but not yet returned inside a frame

    def feed(self, data: bytes) -> list[Frame]:
        """Every frame completed by ``data``; :class:`MalformedEvent` for bytes that are not the framing."""
        self._pending += data
        self._parser.add_data(data)
        out: list[Frame] = []
        try:
            for message in self._parser:
                size = message.prelude.total_length
                raw, self._pending = self._pending[:size], self._pending[size:]
                headers = message.headers
                message_type = str(headers.get(":message-type", "event"))
                if message_type == "exception":
                    kind = str(headers.get(":exception-type", ""))
                elif message_type == "error":
                    kind = str(headers.get(":error-code", ""))
                else:
                    kind = str(headers.get(":event-type", ""))
                out.append(Frame(raw, message_type, kind, headers, bytes(message.payload)))
        except ParserError as exc:
            raise MalformedEvent(f"Bedrock event stream: {exc}") from None
        return out
