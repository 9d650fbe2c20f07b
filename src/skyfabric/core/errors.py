"""Every exception skyfabric raises on purpose, in one place.

The tree::

    SkyfabricError
    ├── ConfigError                 a fleet file is wrong (names the file, the field, what was expected)
    │   └── PlanInfeasible          no fleet plan meets demand and loss constraints (which one, by how much)
    ├── DiscoveryError              a discovery source (Kubernetes, SkyPilot) did not answer usably
    ├── ClientError                 the caller sent something we must refuse (becomes a 4xx)
    │   ├── InvalidRequest          400: malformed JSON, missing or mistyped field
    │   ├── AuthenticationError     401: no or unknown API key
    │   ├── UnknownModel            404: no model or alias of that name
    │   ├── PermissionDenied        403: the key may not use that model
    │   ├── NotFound                404: no such resource (an admin API key id)
    │   ├── PayloadTooLarge         413
    │   └── Overloaded              429/503: shed by admission control, with an honest Retry-After
    │       └── RateLimited         429/503: over a key's limit (or its limits cannot be checked)
    ├── PromptTooLong               (also a ValueError) a prompt certainly over the context, not tokenized
    └── UpstreamError               one attempt against one endpoint failed
        ├── ConnectError            no connection (refused, unreachable, TLS): nothing was sent
        ├── UpstreamTimeout         a named phase (connect, first_byte, first_token, idle) ran out
        ├── RemoteProtocolError     the upstream broke HTTP or SSE (reset, malformed event, no [DONE])
        │   └── ContinuationRefused the upstream cannot continue this answer (it restarted it)
        │   └── EndpointAborted     the gateway itself dropped the connection: its endpoint was found dead
        └── UpstreamStatus          the upstream answered with an error status; carries its body

Upstream errors carry ``sent_any``: whether any byte of the answer already reached the client. That flag
is the commit point: before it the gateway may retry anywhere; after it only continuation can help.
"""

from __future__ import annotations


class SkyfabricError(Exception):
    """Raised for any failure skyfabric itself detects and names."""


class ConfigError(SkyfabricError):
    """Raised when a fleet file cannot be loaded: says which file, which field, and what was expected."""


class PlanInfeasible(ConfigError):
    """Raised when no replica counts meet the peak and the loss constraints; names the shortfall."""


class DiscoveryError(SkyfabricError):
    """Raised when a discovery source fails (API down, 403, timeout, bad answer): the last set is kept."""


class ClientError(SkyfabricError):
    """Raised when a request must be refused; maps to an OpenAI-shaped error body."""

    status = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequest(ClientError):
    """Raised when the body is not JSON, or a required field is missing or of the wrong type."""


class AuthenticationError(ClientError):
    """Raised when the API key is missing or unknown."""

    status = 401
    error_type = "authentication_error"


class UnknownModel(ClientError):
    """Raised when no model or alias of the requested name is in the fleet."""

    status = 404
    error_type = "invalid_request_error"


class PermissionDenied(ClientError):
    """Raised when a valid key asks for something it is not allowed (a model outside its list)."""

    status = 403
    error_type = "permission_error"


class NotFound(ClientError):
    """Raised when an addressed resource (an API key's id in the admin API) does not exist."""

    status = 404


class PayloadTooLarge(ClientError):
    """Raised when a request body exceeds the listener's limit."""

    status = 413


class Overloaded(ClientError):
    """Raised when admission control sheds a request; ``retry_after`` is an honest wait in seconds."""

    status = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: float, status: int = 429) -> None:
        super().__init__(message, code="overloaded")
        self.retry_after = retry_after
        self.status = status


class RateLimited(Overloaded):
    """Raised when a key is over one of its limits; carries the rate-limit headers the client reads."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float,
        code: str,
        headers: list[tuple[bytes, bytes]],
        status: int = 429,
        error_type: str = "rate_limit_error",
    ) -> None:
        super().__init__(message, retry_after=retry_after, status=status)
        self.code = code
        self.headers = headers
        self.error_type = error_type


class PromptTooLong(SkyfabricError, ValueError):
    """Raised when a prompt is certainly longer than the model's context, known from its size alone."""

    def __init__(self, at_least: int) -> None:
        super().__init__(f"the prompt has at least {at_least} tokens")
        self.at_least = at_least


class UpstreamError(SkyfabricError):
    """Raised when one attempt against one upstream endpoint fails."""

    def __init__(self, message: str, *, endpoint: str = "", sent_any: bool = False) -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.sent_any = sent_any


class ConnectError(UpstreamError):
    """Raised when no connection could be made; the request certainly did not reach the upstream."""


class UpstreamTimeout(UpstreamError):
    """Raised when a named timeout phase (connect, first_byte, first_token, idle) runs out."""

    def __init__(self, phase: str, seconds: float, *, endpoint: str = "", sent_any: bool = False) -> None:
        super().__init__(f"{phase} timeout after {seconds:.3g}s", endpoint=endpoint, sent_any=sent_any)
        self.phase = phase


class RemoteProtocolError(UpstreamError):
    """Raised when the upstream closes early, resets, or sends malformed HTTP or SSE."""


class ContinuationRefused(RemoteProtocolError):
    """Raised when a backend asked to continue an answer restarts it instead (repeats the prefix)."""


class EndpointAborted(RemoteProtocolError):
    """Raised when the gateway aborted the connection because its endpoint was found dead (stall, probe).

    Not a peer reset: the request is never resent to that endpoint (not even as a stale keep-alive
    connection), and the failure is not counted against the endpoint a second time.
    """


class NotSent(UpstreamError):
    """Raised when an endpoint left rotation between its pick and the send: nothing was sent.

    A pick and its send are apart whenever an attempt starts as its own task (a hedged race) or waits
    out a backoff first; an ejection learnt meanwhile must stop the call, and the request picks again.
    Not a failure of the endpoint, so nothing counts it against one.
    """


class UpstreamStatus(UpstreamError):
    """Raised when the upstream answers with a non-2xx status; keeps its status, headers and body."""

    def __init__(
        self,
        status: int,
        body: bytes,
        *,
        headers: list[tuple[bytes, bytes]] | None = None,
        endpoint: str = "",
    ) -> None:
        super().__init__(f"upstream answered {status}", endpoint=endpoint)
        self.status = status
        self.body = body
        self.headers = headers or []

    def header(self, name: bytes) -> bytes | None:
        """The first header of that (lower-case) name, if any."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


class MalformedEvent(ValueError):
    """Raised when an upstream's stream event is not its protocol (bad SSE, JSON, or event order)."""
