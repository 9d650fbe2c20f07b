"""The ``/admin/…`` routes: the key admin API (``ops/admin.py``) on the gateway's listener."""

from __future__ import annotations

from skyfabric.core.errors import ClientError
from skyfabric.gateway.api_errors import client_error_response
from skyfabric.http.messages import Request, Response
from skyfabric.ops.admin import AdminApi


async def handle_admin(api: AdminApi, request: Request) -> Response:
    """One admin request; its errors in OpenAI's shape (the admin API's clients are tools, not SDKs)."""
    try:
        status, body = await api.handle(
            request.method.decode(errors="replace"),
            request.path.decode(errors="replace"),
            request.header(b"authorization"),
            request.body,
        )
    except ClientError as exc:
        return client_error_response(exc)
    return Response(status, body)
