"""Requests and responses as the listener hands them to a service, and takes them back."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

#: Header names are lower-case bytes; values are bytes as received.
Headers = list[tuple[bytes, bytes]]


def find_header(headers: Headers, name: bytes) -> bytes | None:
    """The first value of a (lower-case) header in a parsed header list, or None."""
    for key, value in headers:
        if key == name:
            return value
    return None


class Request:
    """One HTTP request, body read in full (LLM API bodies are small next to their answers)."""

    __slots__ = ("body", "client_gone", "headers", "http10", "keep_alive", "method", "path", "query")

    def __init__(self, method: bytes, path: bytes, query: bytes, headers: Headers, body: bytes) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.keep_alive = True
        #: An HTTP/1.0 client: no chunked encoding; a streamed answer ends with the connection.
        self.http10 = False
        #: Set by the listener when the client closed its connection; long work checks it.
        self.client_gone = False

    def header(self, name: bytes) -> bytes | None:
        """The first value of a (lower-case) header, or None."""
        return find_header(self.headers, name)


@dataclass(slots=True)
class Response:
    """A whole response, written in one piece."""

    status: int
    body: bytes = b""
    headers: Headers = field(default_factory=list)
    content_type: bytes = b"application/json"


@dataclass(slots=True)
class StreamResponse:
    """A response whose body is produced while it is sent (SSE); written with chunked encoding.

    The listener closes ``body`` (``aclose``) when the client goes away, so the producer's ``finally``
    blocks run and upstream work is cancelled.
    """

    status: int
    body: AsyncIterator[bytes]
    headers: Headers = field(default_factory=list)
    content_type: bytes = b"text/event-stream"
    #: Releases what the producer holds if the response is dropped before it is ever sent.
    abandon: Callable[[], None] | None = None


#: A service in Finagle's sense: an async function from request to response.
Service = Callable[[Request], Awaitable[Response | StreamResponse]]
