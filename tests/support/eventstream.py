"""AWS event-stream messages written from the spec, for stand-ins (botocore only reads them).

A message: total length and headers length (big-endian uint32 each), a CRC32 of those 8 bytes, the
headers, the payload, and a CRC32 of everything before it. A header is a 1-byte name length, the name, a
type byte (7: string) and, for a string, a 2-byte length and the UTF-8 value.
"""

from __future__ import annotations

import json
import struct
from binascii import crc32
from typing import Any

STRING = 7


def encode_headers(headers: dict[str, str]) -> bytes:
    out = bytearray()
    for name, value in headers.items():
        key, data = name.encode(), value.encode()
        out += struct.pack(">B", len(key)) + key + struct.pack(">BH", STRING, len(data)) + data
    return bytes(out)


def message(headers: dict[str, str], payload: bytes) -> bytes:
    """One event-stream message with real CRCs."""
    encoded = encode_headers(headers)
    prelude = struct.pack(">II", 12 + len(encoded) + len(payload) + 4, len(encoded))
    prelude += struct.pack(">I", crc32(prelude))
    body = prelude + encoded + payload
    return body + struct.pack(">I", crc32(body))


def event(kind: str, payload: dict[str, Any]) -> bytes:
    """An ``event`` message as the Bedrock runtime sends it (``:event-type``, JSON, ``:message-type``)."""
    return message(
        {":event-type": kind, ":content-type": "application/json", ":message-type": "event"},
        json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode(),
    )


def exception(kind: str, message_text: str) -> bytes:
    """An ``exception`` message (``throttlingException``, ...) with its JSON ``message``."""
    return message(
        {":exception-type": kind, ":content-type": "application/json", ":message-type": "exception"},
        json.dumps({"message": message_text}, separators=(",", ":")).encode(),
    )
