"""Anthropic Messages API vocabulary shared by its frontend and its backend adapter.

Both sides of the seam speak the same words for stop reasons, error types and usage; keeping the tables
here means a word added by Anthropic is added once, and the frontend never imports a backend.

Usage convention of the seam (decided here, for both Anthropic directions): a canonical
:class:`~skyfabric.protocols.canonical.Usage`'s ``input_tokens`` counts the WHOLE prompt, cached tokens
included, as OpenAI's ``prompt_tokens`` does; ``cached_input_tokens`` and ``cache_creation_input_tokens``
are parts of it. Anthropic reports ``input_tokens`` *without* cache reads and cache writes, so its decoder
adds them and its encoder subtracts them: a usage that crosses the seam both ways comes back unchanged, and
an OpenAI adapter can map ``prompt_tokens`` straight across.
"""

from __future__ import annotations

from typing import Any

import orjson

from skyfabric.protocols.canonical import Usage

#: Anthropic ``stop_reason`` → canonical finish reason.
STOP_TO_CANONICAL: dict[str, str] = {
    "end_turn": "end",
    "stop_sequence": "stop_sequence",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "pause_turn": "pause",
    "refusal": "refusal",
    # The prompt plus the answer filled the model's window: the answer was cut for length.
    "model_context_window_exceeded": "length",
}

#: Canonical finish reason → Anthropic ``stop_reason`` (a content filter is Anthropic's refusal).
CANONICAL_TO_STOP: dict[str, str] = {
    "end": "end_turn",
    "stop_sequence": "stop_sequence",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
    "refusal": "refusal",
    "pause": "pause_turn",
}

#: Every ``error.type`` Anthropic documents (the SDK's ``ErrorType`` plus 413's ``request_too_large``).
ERROR_TYPES: frozenset[str] = frozenset(
    {
        "invalid_request_error",
        "authentication_error",
        "billing_error",
        "permission_error",
        "not_found_error",
        "request_too_large",
        "rate_limit_error",
        "timeout_error",
        "api_error",
        "overloaded_error",
        "conflict_error",
    }
)

#: HTTP status → Anthropic's ``error.type`` for it (https://docs.claude.com/en/api/errors).
STATUS_ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}

#: Words other protocols (and the gateway) use for in-band errors → Anthropic's.
_ERROR_ALIASES: dict[str, str] = {
    "server_error": "api_error",
    "internal_error": "api_error",
    "overloaded": "overloaded_error",
    "timeout": "timeout_error",
    "rate_limit_exceeded": "rate_limit_error",
    "rate_limited": "rate_limit_error",
    "invalid_request": "invalid_request_error",
}


def stop_reason(reason: str, native: str | None = None) -> str:
    """Anthropic's ``stop_reason`` for a canonical one; the backend's own word when it is Anthropic's.

    ``native`` wins only when it means the same thing (``model_context_window_exceeded`` survives an
    Anthropic → Anthropic trip, an OpenAI ``stop`` does not leak into an Anthropic answer).
    """
    if native is not None and STOP_TO_CANONICAL.get(native) == reason:
        return native
    return CANONICAL_TO_STOP.get(reason, "end_turn")


def error_type(error_type: str | None, status: int | None = None) -> str:
    """Anthropic's ``error.type``: by ``status`` when it has one, else ``error_type`` translated."""
    if status is not None and status in STATUS_ERROR_TYPES:
        return STATUS_ERROR_TYPES[status]
    if error_type is not None:
        if error_type in ERROR_TYPES:
            return error_type
        if error_type in _ERROR_ALIASES:
            return _ERROR_ALIASES[error_type]
    if status is not None and 400 <= status < 500:
        return "invalid_request_error"
    return "api_error"


def error_json(message: str, kind: str) -> dict[str, Any]:
    """Anthropic's error object: ``{"type": "error", "error": {"type", "message"}}``."""
    return {"type": "error", "error": {"type": kind, "message": message}}


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One event in Anthropic's framing: ``event: <type>``, ``data: <compact JSON>``, a blank line."""
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def canonical_usage(raw: dict[str, Any], *, known: Usage | None = None, with_output: bool = True) -> Usage:
    """A canonical :class:`Usage` from an Anthropic ``usage`` object (see the module's convention).

    Fields the object omits keep their ``known`` values: a ``message_delta`` may carry output tokens only,
    while the relay keeps only the latest usage, so each one must be whole.
    """
    uncached = _int(raw.get("input_tokens"))
    read = _int(raw.get("cache_read_input_tokens"))
    created = _int(raw.get("cache_creation_input_tokens"))
    if known is not None:
        read = known.cached_input_tokens if read is None else read
        created = known.cache_creation_input_tokens if created is None else created
    read, created = read or 0, created or 0
    if uncached is not None:
        total: int | None = uncached + read + created
    else:
        total = known.input_tokens if known is not None else None
    output = _int(raw.get("output_tokens")) if with_output else None
    if output is None and with_output and known is not None:
        output = known.output_tokens
    return Usage(
        input_tokens=total,
        output_tokens=output,
        cached_input_tokens=read,
        cache_creation_input_tokens=created,
    )


def anthropic_usage(usage: Usage | None) -> dict[str, int]:
    """Anthropic's four usage counts from a canonical :class:`Usage` (missing counts are 0)."""
    if usage is None:
        return {
            "input_tokens": 0,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 0,
        }
    read, created = usage.cached_input_tokens, usage.cache_creation_input_tokens
    uncached = max(0, (usage.input_tokens or 0) - read - created) if usage.input_tokens is not None else 0
    return {
        "input_tokens": uncached,
        "cache_creation_input_tokens": created,
        "cache_read_input_tokens": read,
        "output_tokens": usage.output_tokens or 0,
    }


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
