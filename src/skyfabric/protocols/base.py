"""The two interfaces of the seam: a client protocol's :class:`Frontend`, a wire protocol's :class:`Backend`.

A frontend parses a client's request into a :class:`~skyfabric.protocols.canonical.CanonicalRequest` and
encodes canonical events, errors and the end of a stream in the client's protocol. A backend adapter builds
the upstream request (auth included) for one endpoint, decodes the upstream's framing into events,
classifies failed answers, declares what the backend can do, and builds a request that continues an answer
from the progress made so far. The gateway knows these two interfaces and the canonical types, never a
protocol's JSON.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from skyfabric.core.endpoints import Endpoint
from skyfabric.protocols.canonical import CanonicalRequest, Event
from skyfabric.protocols.progress import Progress

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do, as the router and the relay need to know it."""

    #: Open parts of an answer it continues natively from a prefilled assistant turn (see
    #: :meth:`Backend.continuation`): ``text``, and for engines that take them, ``reasoning`` and ``tool``.
    #: A part kind not listed is continued by replay (regenerate, verify, drop what was sent).
    continues: frozenset[str] = frozenset()
    tools: bool = True
    thinking: bool = False
    n: bool = True
    logprobs: bool = True
    images: bool = False
    #: Puts the running usage in every chunk when asked (vLLM's ``continuous_usage_stats``).
    continuous_usage: bool = False
    #: Takes ``anthropic-beta`` flags (Anthropic's own API does; an OpenAI-compatible server does not).
    betas: bool = False
    #: Keeps a prefilled turn's trailing whitespace (skyfabric's own replicas). Others trim it (chat
    #: templates strip it; Anthropic refuses it): the relay then sends the prefix without it and drops
    #: that whitespace from the continuation's start, so the client's text stays exact.
    verbatim_prefix: bool = False


@dataclass(frozen=True, slots=True)
class UpstreamCall:
    """One request to send: the path after the endpoint's base path, headers (auth included), body."""

    path: bytes
    headers: Headers
    body: bytes


Verdict = Literal["ok", "retryable", "throttled", "context_length", "overloaded", "client"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a failed upstream answer is to be treated (the one response classifier's words).

    ``retryable``: may succeed elsewhere (5xx, a reset). ``throttled``: the provider limits us, leave it
    alone for ``retry_after`` seconds; not ill health. ``overloaded``: the backend is saturated (Anthropic's
    529, vLLM's 503); try elsewhere. ``context_length``: the prompt does not fit this model; try a larger
    one. ``client``: the request itself is wrong; any backend would refuse it: answer the client.
    """

    verdict: Verdict
    retry_after: float | None = None


class Encoder(Protocol):
    """Encodes one answer's canonical events as a client protocol's stream (stateful, one per stream)."""

    def encode(self, event: Event) -> bytes:
        """The bytes for ``event`` (may be empty: an event the protocol shows later or never)."""
        ...

    def resume(self, progress: Progress) -> None:
        """The client already has ``progress`` (passed through as a backend's own bytes): go on from there.

        Called before the encoder's first event when a stream that began on the pass-through path is
        continued, or has an event re-encoded: the encoder takes the answer's id, model and open block.
        """
        ...

    def end(self) -> bytes:
        """What ends a finished stream (``data: [DONE]``; ``message_delta`` + ``message_stop``)."""
        ...

    def error(self, message: str, error_type: str = "api_error", code: str | None = None) -> bytes:
        """An in-band error event that ends the stream, in the client protocol's shape."""
        ...


class Frontend(Protocol):
    """A client protocol: parse its requests, encode answers and errors in it."""

    #: The wire family this client speaks (``openai`` or ``anthropic``): when a backend speaks the same,
    #: bytes may pass through.
    family: str
    #: An SSE keep-alive in this protocol (a comment for OpenAI, ``event: ping`` for Anthropic).
    heartbeat: bytes

    def parse(self, path: bytes, body: bytes, headers: Headers) -> CanonicalRequest:
        """The canonical request; raises :class:`~skyfabric.core.errors.ClientError` for a bad one."""
        ...

    def encoder(self, request: CanonicalRequest) -> Encoder:
        """A fresh encoder for a streamed answer to ``request``."""
        ...

    def response(self, request: CanonicalRequest, events: Iterable[Event]) -> bytes:
        """A whole (non-streamed) answer as the client protocol's JSON body."""
        ...

    def error(
        self,
        status: int,
        message: str,
        *,
        error_type: str | None = None,
        code: str | None = None,
        param: str | None = None,
    ) -> bytes:
        """An error body in the client protocol's shape (JSON)."""
        ...


class Decoder(Protocol):
    """Splits a backend's streamed bytes into events (stateful, one per upstream response)."""

    def feed(self, data: bytes) -> list[tuple[bytes, list[Event]]]:
        """Each complete upstream event: its raw bytes (terminator included) and its canonical events.

        Raises :class:`~skyfabric.core.errors.MalformedEvent` for bytes that are not the protocol.
        """
        ...


class Backend(Protocol):
    """A wire protocol spoken by some engine kinds: build, decode, classify, continue."""

    #: The wire family (``openai``, ``anthropic``); the same as a frontend's allows pass-through.
    family: str

    def capabilities(self, endpoint: Endpoint) -> Capabilities:
        """What ``endpoint``'s engine can do."""
        ...

    def auth(self, endpoint: Endpoint) -> Headers:
        """The headers that carry ``endpoint``'s credentials (also used by health probes)."""
        ...

    def build(self, request: CanonicalRequest, endpoint: Endpoint, *, usage: bool = False) -> UpstreamCall:
        """The upstream request for ``request`` on ``endpoint`` (model renamed, auth added).

        ``usage``: ask for token usage in the stream even if the client did not (the relay counts tokens
        by the backend's usage; the frontend strips what the client did not ask for).
        """
        ...

    def continuation(
        self, request: CanonicalRequest, endpoint: Endpoint, progress: Progress, tokens_sent: int | None
    ) -> UpstreamCall | None:
        """A request whose answer goes on exactly from ``progress`` (a prefilled assistant turn).

        None when this backend cannot continue the open part natively (its kind is not in
        ``capabilities().continues``): the relay then replays — it sends :meth:`build`'s request,
        checks that the new answer repeats exactly what was sent, and forwards only what follows.
        """
        ...

    def decoder(self) -> Decoder:
        """A fresh decoder for one streamed response."""
        ...

    def decode_response(self, body: bytes) -> list[Event]:
        """A whole (non-streamed) response as events."""
        ...

    def classify(self, status: int, headers: Headers, body: bytes) -> Outcome:
        """What a non-2xx answer means (see :class:`Outcome`)."""
        ...


@dataclass(slots=True)
class Adapters:
    """The adapters a fleet uses, resolved once at load: engine kind → backend."""

    backends: dict[str, Backend] = field(default_factory=dict)
