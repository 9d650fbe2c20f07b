"""Google Vertex AI as a backend (``engine: vertex``): Claude through ``rawPredict``, Gemini through
``generateContent``, both with OAuth access tokens kept fresh in the background.

The model is named in the URL — ``/projects/{project}/locations/{location}/publishers/{publisher}/models/
{model}:{method}`` after the pool's endpoint (``https://{location}-aiplatform.googleapis.com/v1``) — and
the pool's ``vertex`` section says which project, location and publisher (``core/vertex_settings.py``).

- **publisher anthropic**: Anthropic's Messages body (built by the Anthropic adapter, so every rule of it
  holds) without ``model`` and with ``anthropic_version: vertex-2023-10-16`` in the body instead of the
  header; ``:rawPredict``, or ``:streamRawPredict`` answering with Anthropic's own SSE events; a text part
  is continued by prefill as on Anthropic's API (Claude up to 4.5).
- **publisher google**: Gemini's ``:generateContent`` / ``:streamGenerateContent?alt=sse``
  (``vertex_gemini.py`` builds, ``vertex_gemini_decoder.py`` decodes). Gemini takes no prefill, so nothing
  is continued natively: the gateway replays (docs/protocols.md).

One adapter serves both publishers, and the seam's ``decoder()`` / ``decode_response()`` are not told the
endpoint: the answer's shape tells them (Anthropic's events carry ``event:`` lines and a ``type``; Gemini's
chunks never do), see :class:`VertexDecoder`. The adapter's wire family is its own (``vertex``), so a
client's bytes never pass through: an Anthropic client's body is rebuilt natively (extras kept) and the
answer re-encoded by its frontend.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import orjson

from skyfabric.core.endpoints import Endpoint
from skyfabric.core.errors import ConfigError
from skyfabric.core.retry_after import delta_seconds, header_value
from skyfabric.core.vertex_settings import VertexSettings
from skyfabric.protocols.backends.anthropic import CONTEXT_LENGTH_WORDS, PREFILL_WORDS, AnthropicBackend
from skyfabric.protocols.backends.anthropic_decoder import AnthropicDecoder, decode_message
from skyfabric.protocols.backends.vertex_auth import Tokens
from skyfabric.protocols.backends.vertex_gemini import gemini_body
from skyfabric.protocols.backends.vertex_gemini_decoder import GeminiDecoder
from skyfabric.protocols.backends.vertex_gemini_decoder import decode_response as decode_gemini
from skyfabric.protocols.base import Backend, Capabilities, Decoder, Headers, Outcome, UpstreamCall
from skyfabric.protocols.canonical import CanonicalRequest, Event
from skyfabric.protocols.progress import Progress

log = logging.getLogger("skyfabric.protocols.vertex")

#: The ``anthropic_version`` Claude on Vertex takes in the body.
VERTEX_ANTHROPIC_VERSION = "vertex-2023-10-16"
#: What a Vertex 400 says when a Gemini prompt does not fit (Claude's words are the Anthropic adapter's).
GEMINI_CONTEXT_WORDS: tuple[str, ...] = (
    "exceeds the maximum number of tokens",  # "The input token count (1048577) exceeds the maximum ..."
    "input token count",
    "too many tokens",
)
#: A 429 without ``Retry-After`` cools the provider 1, 2, 4 ... seconds while 429s keep coming, at most this.
THROTTLE_BACKOFF_MAX = 30.0


def settings_of(endpoint: Endpoint) -> VertexSettings:
    """The pool's ``vertex`` section (the fleet schema requires one for ``engine: vertex``)."""
    spec = endpoint.spec
    settings = getattr(spec, "vertex", None) if spec is not None else None
    if not isinstance(settings, VertexSettings):
        raise ConfigError(f"endpoint {endpoint.id} uses engine 'vertex' but its pool has no `vertex` section")
    return settings


def model_path(settings: VertexSettings, model: str, method: str) -> bytes:
    """``/projects/{p}/locations/{l}/publishers/{publisher}/models/{model}:{method}``."""
    return (
        f"/projects/{settings.project}/locations/{settings.location}/publishers/{settings.publisher}"
        f"/models/{model}:{method}"
    ).encode()


class VertexBackend:
    """Vertex AI's Claude and Gemini models (``engine: vertex``)."""

    family = "vertex"

    def __init__(
        self,
        engine: str = "vertex",
        *,
        tokens: Tokens | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.tokens = tokens if tokens is not None else Tokens()
        self._anthropic = AnthropicBackend("anthropic")
        self._clock = clock
        self._backoff = 0.0  # the current 429 back-off, and when the last 429 came
        self._last_429 = -1e18
        self._starting: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifetime: tokens are fetched at start and refreshed in the background ----------------------------

    async def start(self, endpoints: Iterable[Endpoint]) -> None:
        """Load every credential the fleet's Vertex pools name and fetch their first tokens."""
        await self.tokens.start([settings_of(e) for e in endpoints if e.engine == self.engine])

    async def close(self) -> None:
        """Stop refreshing tokens."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.tokens.close()

    # -- the seam -----------------------------------------------------------------------------------------

    def capabilities(self, endpoint: Endpoint) -> Capabilities:
        """Claude: Anthropic's own (text continued by prefill up to Claude 4.5). Gemini: tools, thinking,
        images; no prefill (replayed), one candidate (``n``), no logprobs through this adapter."""
        if settings_of(endpoint).publisher == "anthropic":
            return self._anthropic.capabilities(endpoint)
        return Capabilities(
            continues=frozenset(), tools=True, thinking=True, n=False, logprobs=False, images=True
        )

    def auth(self, endpoint: Endpoint) -> Headers:
        """``authorization: Bearer <token>`` from the cache; never fetches (see ``vertex_auth``)."""
        settings = settings_of(endpoint)
        source = self.tokens.source(settings)
        if source is None:
            self._start_later(settings)
            return []
        return source.header()

    def build(self, request: CanonicalRequest, endpoint: Endpoint, *, usage: bool = False) -> UpstreamCall:
        """The Vertex request for ``request`` (usage: both publishers always report it)."""
        settings = settings_of(endpoint)
        request.lower()
        if settings.publisher == "anthropic":
            return self._claude(self._anthropic.build(request, endpoint), settings, endpoint, request.stream)
        method = "streamGenerateContent?alt=sse" if request.stream else "generateContent"
        headers: Headers = [
            (b"content-type", b"application/json"),
            (b"accept", b"text/event-stream" if request.stream else b"application/json"),
            *self.auth(endpoint),
        ]
        return UpstreamCall(
            model_path(settings, endpoint.upstream_model, method), headers, orjson.dumps(gemini_body(request))
        )

    def continuation(
        self, request: CanonicalRequest, endpoint: Endpoint, progress: Progress, tokens_sent: int | None
    ) -> UpstreamCall | None:
        """Claude: the Anthropic adapter's prefill, sent the Vertex way. Gemini: None (replayed)."""
        settings = settings_of(endpoint)
        if settings.publisher != "anthropic":
            return None
        request.lower()
        call = self._anthropic.continuation(request, endpoint, progress, tokens_sent)
        return None if call is None else self._claude(call, settings, endpoint, request.stream)

    def decoder(self) -> Decoder:
        """A decoder that tells Anthropic's events from Gemini's chunks by the first event."""
        return VertexDecoder()

    def decode_response(self, body: bytes) -> list[Event]:
        """A whole answer: an Anthropic Message (or error) or a Gemini ``GenerateContentResponse``."""
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            data = None
        if isinstance(data, dict) and "type" in data:
            return decode_message(body)
        return decode_gemini(body)

    def classify(self, status: int, headers: Headers, body: bytes) -> Outcome:
        """What a Vertex error status means (Google's ``{"error": {code, message, status}}`` or, from a
        Claude model, Anthropic's own error body).

        - 429 (``RESOURCE_EXHAUSTED``: our project's quota): throttled for ``Retry-After``, which Vertex
          rarely sends; else a back-off of 1, 2, 4 ... 30 s while 429s keep coming.
        - 529 or ``overloaded_error`` (Claude's capacity on Vertex): overloaded, try elsewhere.
        - 503 ``UNAVAILABLE``, 500 ``INTERNAL``, 504 ``DEADLINE_EXCEEDED``, other 5xx: retryable elsewhere.
        - 401 ``UNAUTHENTICATED``, 403 ``PERMISSION_DENIED``: our credential for this project, not the
          client's request: retryable elsewhere. 404 likewise (the model is not in this location/project).
        - 400 saying the prompt does not fit (Gemini's "exceeds the maximum number of tokens", Claude's
          "prompt is too long" and kin): context length.
        - 400 refusing a prefill: only our continuation sends one: retryable elsewhere.
        - other 4xx (``INVALID_ARGUMENT``, ``FAILED_PRECONDITION``, ...): the client's request.
        """
        message, kind = _error_of(body)
        if status == 429:
            return Outcome("throttled", retry_after=self._retry_after(headers))
        if status == 529 or kind == "overloaded_error":
            return Outcome("overloaded", retry_after=delta_seconds(header_value(headers, b"retry-after")))
        if status >= 500 or status in (401, 403, 404, 408, 409, 499):
            return Outcome("retryable")
        lowered = message.lower()
        if any(words in lowered for words in (*GEMINI_CONTEXT_WORDS, *CONTEXT_LENGTH_WORDS)):
            return Outcome("context_length")
        if any(words in lowered for words in PREFILL_WORDS):
            return Outcome("retryable")
        return Outcome("client")

    # -- helpers ------------------------------------------------------------------------------------------

    def _claude(
        self, call: UpstreamCall, settings: VertexSettings, endpoint: Endpoint, stream: bool
    ) -> UpstreamCall:
        """The Anthropic adapter's request, moved to Vertex: model in the URL, version in the body."""
        body = orjson.loads(call.body)
        body.pop("model", None)
        body = {"anthropic_version": VERTEX_ANTHROPIC_VERSION, **body}
        headers: Headers = [(k, v) for k, v in call.headers if k not in (b"anthropic-version", b"x-api-key")]
        headers.extend(self.auth(endpoint))
        method = "streamRawPredict" if stream else "rawPredict"
        return UpstreamCall(
            model_path(settings, endpoint.upstream_model, method), headers, orjson.dumps(body)
        )

    def _retry_after(self, headers: Headers) -> float:
        given = delta_seconds(header_value(headers, b"retry-after"))
        if given is not None:
            return given
        now = self._clock()
        if now - self._last_429 <= 2 * max(self._backoff, 1.0):
            self._backoff = min(THROTTLE_BACKOFF_MAX, max(1.0, self._backoff * 2))
        else:
            self._backoff = 1.0
        self._last_429 = now
        return self._backoff

    def _start_later(self, settings: VertexSettings) -> None:
        """A pool first seen on the request path (discovered later): fetch its token in the background."""
        key = settings.credential_key
        if key in self._starting:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._starting.add(key)
        task = loop.create_task(self._start_one(settings))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start_one(self, settings: VertexSettings) -> None:
        try:
            await self.tokens.start([settings])
        except ConfigError as exc:
            log.error("vertex: %s", exc)
        finally:
            self._starting.discard(settings.credential_key)


class VertexDecoder:
    """Anthropic's SSE events (Claude) or Gemini's chunks, told apart by the first complete event."""

    def __init__(self) -> None:
        self._inner: AnthropicDecoder | GeminiDecoder | None = None
        self._held = b""

    def feed(self, data: bytes) -> list[tuple[bytes, list[Event]]]:
        if self._inner is not None:
            return self._inner.feed(data)
        self._held += data
        held = self._held.replace(b"\r\n", b"\n")
        end = held.find(b"\n\n")
        if end < 0:
            return []
        first = held[:end]
        anthropic = first.startswith(b"event:") or b"\nevent:" in first or b'"type"' in first
        self._inner = AnthropicDecoder() if anthropic else GeminiDecoder()
        held, self._held = self._held, b""
        return self._inner.feed(held)


def _error_of(body: bytes) -> tuple[str, str]:
    """(message, kind) of a Google or Anthropic error body; kind is Anthropic's type or Google's status."""
    try:
        data: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:2000].decode("utf-8", "replace"), ""
    if isinstance(data, list) and data:
        data = data[0]
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        kind = error.get("type") or error.get("status") or ""
        return str(error.get("message") or ""), str(kind)
    return body[:2000].decode("utf-8", "replace"), ""


if TYPE_CHECKING:  # mypy checks that the class keeps the seam's interface
    _BACKEND: Backend = VertexBackend()
