"""Errors as clients expect them: OpenAI's ``{"error": {...}}`` with the right status."""

from __future__ import annotations

import orjson

from skyfabric.core.errors import ClientError, Overloaded
from skyfabric.http.messages import Response

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


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
    kind = error_type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})
    return Response(status, body, headers or [])


def error_body(status: int, message: str) -> tuple[bytes, bytes]:
    """The listener's own errors (400, 408, 413, 414, 417, 431, 500) in OpenAI's shape."""
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}})
    return b"application/json", body


def client_error_response(exc: ClientError) -> Response:
    """The response for a refused request."""
    headers: list[tuple[bytes, bytes]] = []
    if isinstance(exc, Overloaded):
        headers.append((b"retry-after", str(max(1, round(exc.retry_after))).encode()))
    return error_response(
        exc.status, exc.message, error_type=exc.error_type, param=exc.param, code=exc.code, headers=headers
    )


def error_event(message: str, *, error_type: str = "server_error", code: str | None = None) -> bytes:
    """An in-band SSE error event: how a stream that cannot be finished says so, instead of just ending."""
    payload = orjson.dumps({"error": {"message": message, "type": error_type, "param": None, "code": code}})
    return b"data: " + payload + b"\n\n"
