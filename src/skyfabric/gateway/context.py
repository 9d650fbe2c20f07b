"""One client request as the router sees it: parsed once, with its deadline and what was tried."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from skyfabric.gateway.api_errors import frontend_error
from skyfabric.http.messages import Response
from skyfabric.protocols.base import Frontend
from skyfabric.protocols.canonical import CanonicalRequest, Usage

if TYPE_CHECKING:
    from skyfabric.ops.keys import KeyRecord
    from skyfabric.ops.limiter import Lease

_ids = itertools.count(1)
_prefix = ""


def _reseed() -> None:
    """A fresh random prefix: per process, so forked workers and restarts never reuse an id."""
    global _ids, _prefix
    _prefix = "req_" + os.urandom(8).hex()
    _ids = itertools.count(1)


_reseed()
os.register_at_fork(after_in_child=_reseed)


def new_request_id() -> str:
    """The gateway's id for a request: unique across processes and restarts, cheap (no syscall)."""
    return f"{_prefix}{next(_ids):x}"


@dataclass(slots=True)
class RequestContext:
    """A validated inference request and the bookkeeping of its attempts."""

    kind: str  # "chat" or "completions" (an Anthropic Messages request is a chat)
    body: dict[str, Any]
    raw: bytes
    model: str  # canonical fleet model name
    stream: bool
    deadline: float
    #: The request as the protocol seam sees it, and the client protocol's frontend that answers it.
    request: CanonicalRequest
    frontend: Frontend
    attempts: int = 0
    #: Calls sent for it, first attempts, retries and hedges (not continuations), and the endpoint of the
    #: last one: the ledger's ``attempts`` and, for an answer no endpoint gave, its endpoint. Kept here by
    #: ``Proxy.attempt``, not by an observer hook per attempt. (``attempts`` is the retry loop's bound:
    #: a request that waited for the fleet to come back gets it lowered, for one more round.)
    sent: int = 0
    last_endpoint: str | None = None
    tried: set[str] = field(default_factory=set)
    failed_providers: set[str] = field(default_factory=set)
    rescued: int = 0
    priority: int = 5
    #: Tokens the request is known to need at least (its prompt's size bound, or a context just
    #: exceeded): models whose known ``context_length`` is smaller are not tried.
    needs_tokens: int = 0
    #: Called once when the request is over (stream finished or abandoned): frees its admission slot.
    on_done: Callable[[], None] | None = None
    #: Called when the router refuses the request (admission, a prompt too long) after the filters let it
    #: through, before any observer saw it: gives back what a filter took (a key's limits).
    on_refused: Callable[[RequestContext], None] | None = None
    #: Endpoint id → when it broke this stream (or failed to take it over): it gets the stream back only
    #: once it has answered a probe since (``EndpointState.probed_ok``).
    broke: dict[str, float] = field(default_factory=dict)
    #: Endpoints that cannot continue this request (refused the prefix with a 4xx, or restarted the
    #: answer): never asked again for it, and not counted against their health.
    refused: set[str] = field(default_factory=set)
    #: Telemetry reports tokens: ask backends that can for the final usage (see ``stream_options_for``).
    wants_usage: bool = False
    #: Telemetry's per-request scratch (see ``gateway/observe.py``); None unless an observer is on.
    observed: dict[str, Any] | None = None
    #: The GenAI metrics' series of the backend that answered (``gateway/genai_metrics.py``): a slot of
    #: its own rather than an ``observed`` entry, since metrics write it on every request and a dict
    #: per request is an allocation (and the collector's work) that most requests need for nothing else.
    series: Any = None
    #: The usage ledger's figures of this request (``gateway/ledger_observer.py``), when the ledger is on.
    tally: Any = None
    #: A whole answer's usage and cost, read once for every observer (``gateway/spend.py``): (body, usage)
    #: and (body, endpoint, spent).
    usage_memo: tuple[bytes, Any] | None = None
    spent_memo: tuple[bytes, str, Any] | None = None
    #: Head sampling chose to trace this request: its hooks go to ``Router.traced_observer`` (which has
    #: the tracer) instead of ``Router.observer``. Decided once, in ``Proxy.forward``, so an unsampled
    #: request never reaches the tracer.
    traced: bool = False
    #: Each backend's own usage of a streamed answer, in order (what every part cost: the ledger's).
    usage_parts: list[Usage] = field(default_factory=list)
    #: The endpoint that served each part of a streamed answer, in order (``usage_parts``' owners).
    parts_endpoints: list[str] = field(default_factory=list)
    #: The client's W3C ``traceparent``, passed upstream unchanged (kept only while tracing is on; None
    #: once the gateway traces the request itself: then each attempt sends its own span's).
    traceparent: bytes | None = None
    #: The API key the request came with (managed or the fleet file's; None: the gateway needs none).
    key: KeyRecord | None = None
    #: Its hold on the key's limits, settled when the request ends (``gateway/keys_filter.py``).
    lease: Lease | None = None
    #: The gateway's id for the request (``x-request-id``, the ledger's idempotency key); set when used.
    request_id: str | None = None
    #: Headers the filters and observers add to the client's answer (rate limits, ``x-request-id``).
    headers: list[tuple[bytes, bytes]] | None = None
    #: Its prefix key when a model it may go to routes by prefix (``gateway/affinity.py``), else None.
    prefix_key: int | None = None

    def finish(self) -> None:
        """Run ``on_done`` once."""
        callback, self.on_done = self.on_done, None
        if callback is not None:
            callback()

    def add_headers(self, headers: list[tuple[bytes, bytes]]) -> None:
        """Headers for the client's answer (added to whatever answer the request gets)."""
        if self.headers is None:
            self.headers = list(headers)
        else:
            self.headers.extend(headers)

    def error(
        self,
        status: int,
        message: str,
        *,
        error_type: str | None = None,
        code: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> Response:
        """An error answer in the client's protocol."""
        return frontend_error(
            self.frontend, status, message, error_type=error_type, code=code, headers=headers
        )

    def token_limit(self) -> int | None:
        """The client's cap on output tokens, if it set one."""
        return self.request.max_tokens

    def counts_tokens(self) -> bool:
        """Whether a break mid-stream needs the exact count of tokens sent: a limit, or usage to report."""
        request = self.request
        return request.max_tokens is not None or request.include_usage or "min_tokens" in request.body

    def usage_needed(self) -> bool:
        """Whether a stream's backend is asked for its usage: to continue it exactly, or for telemetry."""
        return self.counts_tokens() or self.wants_usage

    def uncontinuable(self) -> str | None:
        """Why a break in this request's stream cannot be continued exactly, judged from the request.

        Several choices, log-probabilities, an echoed prompt and token-id prompts are not tracked by the
        relay: a stream of such a request that breaks ends with an in-band error.
        """
        request = self.request
        if request.n > 1:
            return "several choices (n > 1)"
        extras = request.body  # the client's own fields (a frontend lowers its extras lazily)
        if extras.get("best_of") not in (None, 1):
            return "best_of"
        if request.logprobs or request.top_logprobs:
            return "logprobs"
        if extras.get("echo"):
            return "echo"
        if request.protocol == "openai.completions" and not isinstance(request.prompt, str):
            return "a prompt that is not a single string"
        return None
