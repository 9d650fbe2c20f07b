"""Errors as clients expect them: each client protocol's shape (through its frontend), the right status.

The listener's own errors (a malformed request line, a body too large) come before any protocol is known
and use OpenAI's shape, which Anthropic's SDK also reads (``error.message``).
"""

from __future__ import annotations

import math

import orjson

from skyfabric.core.errors import ClientError, Overloaded, RateLimited, UpstreamStatus
from skyfabric.http.messages import Response
from skyfabric.protocols.base import Frontend
from skyfabric.protocols.frontends.openai import OpenAIFrontend

#: OpenAI's shape, for what is answered before any client protocol is known (the listener's own errors,
#: unknown routes, the non-inference routes).
_OPENAI = OpenAIFrontend()


def error_response(
    status: int,
    message: str,
    *,
    error_type: str | None = None,
    param: str | None = None,
    code: str | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> Response:
    """An OpenAI-shaped error response."""
    return frontend_error(
        _OPENAI, status, message, error_type=error_type, param=param, code=code, headers=headers
    )


def error_body(status: int, message: str) -> tuple[bytes, bytes]:
    """The listener's own errors (400, 408, 413, 414, 417, 431, 500) in OpenAI's shape."""
    return b"application/json", _OPENAI.error(status, message)


def client_error_response(exc: ClientError) -> Response:
    """The response for a refused request, in OpenAI's shape."""
    return frontend_client_error(_OPENAI, exc)


def frontend_error(
    frontend: Frontend,
    status: int,
    message: str,
    *,
    error_type: str | None = None,
    param: str | None = None,
    code: str | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> Response:
    """An error response in ``frontend``'s protocol."""
    body = frontend.error(status, message, error_type=error_type, code=code, param=param)
    return Response(status, body, headers or [])


def frontend_client_error(frontend: Frontend, exc: ClientError) -> Response:
    """The response for a refused request, in the client's protocol."""
    return frontend_error(
        frontend,
        exc.status,
        exc.message,
        error_type=exc.error_type,
        param=exc.param,
        code=exc.code,
        headers=refusal_headers(exc),
    )


def refusal_headers(exc: ClientError) -> list[tuple[bytes, bytes]]:
    """``Retry-After`` for a shed or rate-limited request, and a key's rate-limit headers.

    A key's limit is rounded up, so that a client that waits exactly that long is admitted.
    """
    if not isinstance(exc, Overloaded):
        return []
    if isinstance(exc, RateLimited):
        return [(b"retry-after", str(max(1, math.ceil(exc.retry_after))).encode()), *exc.headers]
    return [(b"retry-after", str(max(1, round(exc.retry_after))).encode())]


def upstream_message(body: bytes) -> str:
    """The human message of an upstream's error body (OpenAI's and Anthropic's both nest it in ``error``)."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:500].decode("utf-8", "replace").strip() or "the backend refused the request"
    error = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    if isinstance(error, str):
        return error
    if isinstance(obj, dict) and isinstance(obj.get("message"), str):
        return str(obj["message"])
    return "the backend refused the request"


def upstream_error_response(frontend: Frontend, exc: UpstreamStatus, *, same: bool) -> Response:
    """An upstream's error answer for the client: as it came when the backend speaks the client's
    protocol (``same``), else its message re-worded in the client's shape with the nearest status."""
    headers = [(b"x-skyfabric-backend", exc.endpoint.encode())]
    retry_after = exc.header(b"retry-after")
    if retry_after is not None:
        headers.append((b"retry-after", retry_after))
    if same:
        content_type = exc.header(b"content-type") or b"application/json"
        return Response(exc.status, exc.body, headers, content_type=content_type)
    status = exc.status
    if frontend.family == "openai" and status == 529:
        status = 503  # Anthropic's "overloaded"; OpenAI's clients know 503 for it
    elif frontend.family == "anthropic" and status == 503:
        status = 529
    return frontend_error(frontend, status, upstream_message(exc.body), headers=headers)
