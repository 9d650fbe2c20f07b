"""A small HTTP/1.1 transport on uvloop and httptools: the listener and the upstream connection pools.

Why not a framework: the gateway's hot path is "parse a request, pick an endpoint, forward bytes". The
measurements in ``bench/README.md`` show that a conventional stack (aiohttp server + client) spends most
of its time in layers the gateway does not need, so the transport is kept to llhttp's parser (through
httptools), asyncio protocols and uvloop's event loop, with nothing copied that need not be.
"""

from skyfabric.http.messages import Headers, Request, Response, StreamResponse

__all__ = ["Headers", "Request", "Response", "StreamResponse"]
