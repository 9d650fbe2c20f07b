"""The one response classifier: what a failed attempt means, apart from the policies that act on it.

Finagle keeps the classifier (is this response a success, a retryable failure, the caller's fault?) apart
from the retry and ejection policies that use the answer; so does this module. The wire-level reading of
a status and body is the backend adapter's (each protocol words its errors its own way: Anthropic's 529
``overloaded_error``, OpenAI's ``context_length_exceeded``); transport failures (timeouts, resets, refused
connections) mean the same for every protocol and are classified here.
"""

from __future__ import annotations

from skyfabric.core.errors import RemoteProtocolError, UpstreamError, UpstreamStatus, UpstreamTimeout
from skyfabric.protocols.base import Backend, Outcome

_RETRYABLE = Outcome("retryable")


def classify(backend: Backend, exc: UpstreamError) -> Outcome:
    """What ``exc`` (from an attempt on an endpoint spoken to by ``backend``) means for the request."""
    if isinstance(exc, UpstreamStatus):
        return backend.classify(exc.status, exc.headers, exc.body)
    return _RETRYABLE


def request_fault(exc: UpstreamError) -> str | None:
    """How an attempt failed, when that may be the request's own doing (else None).

    A request that times out waiting for its answer, breaks the connection, or gets a 500/504 may have
    done it itself (a prompt that takes minutes to tokenize, an input that crashes the engine). A refused
    connection (the request never arrived), a 502/503 (a proxy or an overloaded server) and a 429 say
    nothing about the request.
    """
    if isinstance(exc, UpstreamTimeout):
        return None if exc.phase == "connect" else f"timeout ({exc.phase})"
    if isinstance(exc, UpstreamStatus):
        return f"status {exc.status}" if exc.status >= 500 and exc.status not in (502, 503, 529) else None
    if isinstance(exc, RemoteProtocolError):
        return "connection lost"
    return None
