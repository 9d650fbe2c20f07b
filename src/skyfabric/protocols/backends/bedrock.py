"""Amazon Bedrock's runtime as a wire protocol (``engine: bedrock``): Converse and InvokeModel, SigV4-signed.

A pool's ``bedrock`` section says which API its endpoints speak:

- ``converse`` (default): ``POST /model/{modelId}/converse`` and ``/converse-stream``, one JSON shape for
  every model (:mod:`~skyfabric.protocols.backends.bedrock_converse`);
- ``invoke``: ``POST /model/{modelId}/invoke`` and ``/invoke-with-response-stream`` with Anthropic's
  Messages body (``anthropic_version: bedrock-2023-05-31``, no ``model``, no ``stream``), for Claude models
  only: the body is the Anthropic adapter's own (its translation rules and its prefill continuation), and
  the stream is Anthropic's events inside event-stream ``chunk`` frames.

``{modelId}`` is the pool's ``inference_profile`` when it has one (a cross-region profile such as
``us.anthropic.claude-sonnet-4-5-20250929-v1:0``, or a profile ARN), else its ``upstream_model``;
``upstream_model`` stays the foundation model, which says the model family (and so what it can do). The
id is percent-encoded whole in the path (``:`` and ``/`` included), as the AWS SDKs send it.

Requests are signed per request with SigV4 (:mod:`~skyfabric.protocols.backends.bedrock_auth`); the
credentials are resolved when the fleet loads (:meth:`BedrockBackend.prepare`) and refreshed in the
background. No client speaks this protocol (``family`` is ``bedrock``), so answers are always decoded
and re-encoded in the client's protocol.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import orjson

from skyfabric.core.endpoints import Endpoint
from skyfabric.core.errors import ConfigError
from skyfabric.core.fleet_bedrock import BedrockSettings as Bedrock
from skyfabric.protocols.backends.anthropic import (
    CONTEXT_LENGTH_WORDS,
    PREFILL_WORDS,
    AnthropicBackend,
    prefill_supported,
)
from skyfabric.protocols.backends.anthropic_decoder import decode_message
from skyfabric.protocols.backends.bedrock_auth import AwsCredentials, sign
from skyfabric.protocols.backends.bedrock_converse import converse_body, is_anthropic, thinking_budget
from skyfabric.protocols.backends.bedrock_decode import ConverseDecoder, InvokeDecoder, decode_converse
from skyfabric.protocols.backends.bedrock_eventstream import Frame, FrameReader
from skyfabric.protocols.base import Backend, Capabilities, Headers, Outcome, UpstreamCall
from skyfabric.protocols.canonical import CanonicalRequest, Event
from skyfabric.protocols.progress import Progress

#: The ``anthropic_version`` Bedrock's InvokeModel takes for Claude.
INVOKE_VERSION = "bedrock-2023-05-31"
#: Fields of Anthropic's body that Bedrock's InvokeModel does not take (the model is in the path, streaming
#: is the path, ``metadata`` is not accepted there).
_NOT_INVOKE_FIELDS = ("model", "stream", "metadata")
#: How Bedrock says a prompt does not fit, besides Anthropic's own wordings (which Claude's errors keep).
CONTEXT_WORDS: tuple[str, ...] = (
    *CONTEXT_LENGTH_WORDS,
    "too many tokens",
    "too many input tokens",
    "maximum context length",
    "context length exceeded",
)
#: Error types (``x-amzn-errortype``) that say this endpoint's credential or model id is wrong: not the
#: client's fault, another endpoint may hold a good one.
_CREDENTIAL_ERRORS = frozenset(
    {
        "AccessDeniedException",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "IncompleteSignatureException",
        "ExpiredTokenException",
        "MissingAuthenticationTokenException",
        "ResourceNotFoundException",
    }
)
#: Throttling without a ``Retry-After`` (Bedrock sends none): a back-off that doubles while throttling
#: goes on, from :data:`THROTTLE_BASE` to :data:`THROTTLE_MAX` seconds.
THROTTLE_BASE = 1.0
THROTTLE_MAX = 20.0

_JSON = b"application/json"
_EVENTSTREAM = b"application/vnd.amazon.eventstream"


def throttle_backoff(last_wait: float | None, last_at: float | None, now: float) -> float:
    """Seconds to leave a throttling Bedrock alone: doubled when the last throttle's wait has just ended
    (it is still throttling), back to the base once it has been quiet for as long again."""
    if last_wait is None or last_at is None or now - last_at > 2 * last_wait + THROTTLE_BASE:
        return THROTTLE_BASE
    return min(THROTTLE_MAX, 2 * last_wait)


def settings(endpoint: Endpoint) -> Bedrock:
    """The pool's ``bedrock`` section (the fleet schema requires one for ``engine: bedrock``)."""
    spec = endpoint.spec
    if spec is None or spec.bedrock is None:
        raise ConfigError(f"endpoint {endpoint.id}: engine 'bedrock' needs the pool's `bedrock` section")
    return spec.bedrock


def model_path(endpoint: Endpoint, section: Bedrock) -> bytes:
    """``/model/{modelId}``: the inference profile when the pool names one, percent-encoded whole."""
    model = section.inference_profile or endpoint.upstream_model
    return b"/model/" + quote(model, safe="").encode()


class BedrockBackend:
    """Amazon Bedrock's runtime (``engine: bedrock``), Converse or InvokeModel per pool."""

    family = "bedrock"

    def __init__(
        self,
        engine: str = "bedrock",
        *,
        default_max_tokens: int = 4096,
        credentials: Callable[[str | None], AwsCredentials] = AwsCredentials,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.default_max_tokens = default_max_tokens
        #: The InvokeModel body is Anthropic's Messages body: built by the Anthropic adapter.
        self._anthropic = AnthropicBackend(engine, default_max_tokens=default_max_tokens)
        self._new_credentials = credentials
        self._credentials: dict[str | None, AwsCredentials] = {}
        self._lock = threading.Lock()
        self._caps: dict[str, Capabilities] = {}
        self._clock = clock
        self._throttle: tuple[float, float] | None = None  # (last wait, when)

    # -- set-up (at fleet load) ---------------------------------------------------------------------------

    def prepare(self, endpoint: Endpoint) -> None:
        """Check the pool's settings and resolve its credentials now, off the request path."""
        section = settings(endpoint)
        if section.api == "invoke" and not is_anthropic(endpoint.upstream_model):
            raise ConfigError(
                f"pool {endpoint.provider}/{endpoint.region}/{endpoint.pool}: bedrock api 'invoke' speaks "
                f"Anthropic's body, for Claude models; {endpoint.upstream_model!r} is not one "
                "(use 'converse')"
            )
        self._chain(section.profile)

    def close(self) -> None:
        """Stop the credential refresh threads."""
        for chain in self._credentials.values():
            chain.close()

    def _chain(self, profile: str | None) -> AwsCredentials:
        chain = self._credentials.get(profile)
        if chain is None:
            with self._lock:  # an endpoint added at run time (not prepared): resolved once
                chain = self._credentials.get(profile)
                if chain is None:
                    chain = self._credentials[profile] = self._new_credentials(profile)
        return chain

    # -- the seam -----------------------------------------------------------------------------------------

    def capabilities(self, endpoint: Endpoint) -> Capabilities:
        """By model family: Claude continues a prefilled text part (up to Claude 4.5, through either API),
        thinks, takes images and Anthropic's betas; other families are replayed and think through
        ``reasoningContent`` only when they do it by themselves."""
        caps = self._caps.get(endpoint.id)
        if caps is None:
            model = endpoint.upstream_model
            claude = is_anthropic(model)
            continues = claude and prefill_supported(model) and endpoint.can_continue
            caps = self._caps[endpoint.id] = Capabilities(
                continues=frozenset({"text"}) if continues else frozenset(),
                tools=True,
                thinking=claude,
                n=False,
                logprobs=False,
                images=True,
                betas=claude,
            )
        return caps

    def auth(self, endpoint: Endpoint) -> Headers:
        """Nothing: SigV4 signs each request whole (path, headers, body), so no header stands alone.

        A health probe (``GET .../models``) goes unsigned; the runtime answers it with a 4xx, which says
        the endpoint is up.
        """
        return []

    def build(self, request: CanonicalRequest, endpoint: Endpoint, *, usage: bool = False) -> UpstreamCall:
        """The signed request (usage: Bedrock always reports it)."""
        section = settings(endpoint)
        request.lower()
        if section.api == "invoke":
            return self._invoke(request, endpoint, section, self._anthropic.build(request, endpoint).body)
        body = converse_body(request, endpoint.upstream_model, self._max_tokens(request))
        return self._converse(request, endpoint, section, body)

    def continuation(
        self, request: CanonicalRequest, endpoint: Endpoint, progress: Progress, tokens_sent: int | None
    ) -> UpstreamCall | None:
        """The request with the text sent so far as a final assistant turn (Claude), or None (replay).

        The same rules as Anthropic's API, through either Bedrock API: only an all-text answer, no thinking,
        no forced tool call, Claude up to 4.5, the prefix without its trailing whitespace, ``max_tokens``
        lowered by the tokens already sent.
        """
        section = settings(endpoint)
        request.lower()
        if section.api == "invoke":
            call = self._anthropic.continuation(request, endpoint, progress, tokens_sent)
            return None if call is None else self._invoke(request, endpoint, section, call.body)
        model = endpoint.upstream_model
        if not (is_anthropic(model) and prefill_supported(model)):
            return None
        if any(p.kind != "text" for p in progress.parts) or not progress.parts:
            return None
        if thinking_budget(request.thinking) or (
            request.tool_choice is not None and request.tool_choice.type in ("any", "tool")
        ):
            return None
        prefix = progress.text.rstrip()
        if not prefix:
            return None
        max_tokens = self._max_tokens(request)
        if tokens_sent is not None:
            max_tokens -= tokens_sent
            if max_tokens <= 0:
                return None
        body = converse_body(request, model, max_tokens, prefill=prefix)
        return self._converse(request, endpoint, section, body)

    def decoder(self) -> BedrockDecoder:
        """A fresh decoder for one streamed answer (its frames say which API it is)."""
        return BedrockDecoder()

    def decode_response(self, body: bytes) -> list[Event]:
        """A whole answer: Converse's JSON (``output``) or, from InvokeModel, Anthropic's Message."""
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            data = None
        if isinstance(data, dict) and "output" in data:
            return decode_converse(data)
        return decode_message(body)

    def classify(self, status: int, headers: Headers, body: bytes) -> Outcome:
        """What a Bedrock error status means for the gateway (``x-amzn-errortype`` names the error).

        - ``ModelNotReadyException`` (a 429 too), ``ServiceUnavailableException``, 503: overloaded, elsewhere;
        - ``ThrottlingException``, other 429s, ``ServiceQuotaExceededException``: throttled, with a back-off
          (``Retry-After`` when a proxy sends one; else doubling while it lasts, see
          :func:`throttle_backoff`);
        - 500, ``ModelTimeoutException`` (408), ``ModelErrorException`` / ``ModelStreamErrorException``
          (424), other 5xx: retryable elsewhere;
        - access denied, unrecognized client, bad or expired signature (401/403), an unknown model id (404):
          this endpoint's credential or model, not the client's request: retryable elsewhere;
        - ``ValidationException`` (400) saying the input does not fit: context length; refusing a prefill
          (only our continuation sends one): retryable; any other 4xx: the client's request.
        """
        kind = error_type(headers, body)
        message = error_message(body).lower()
        if kind == "ModelNotReadyException" or kind == "ServiceUnavailableException" or status == 503:
            return Outcome("overloaded")
        if status == 429 or kind in ("ThrottlingException", "ServiceQuotaExceededException"):
            return Outcome("throttled", retry_after=self._throttle_wait(headers))
        if status >= 500 or status in (408, 424) or kind in ("ModelTimeoutException", "ModelErrorException"):
            return Outcome("retryable")
        if status in (401, 403, 404) or kind in _CREDENTIAL_ERRORS:
            return Outcome("retryable")
        if any(words in message for words in CONTEXT_WORDS):
            return Outcome("context_length")
        if any(words in message for words in PREFILL_WORDS):
            return Outcome("retryable")
        return Outcome("client")

    # -- helpers ------------------------------------------------------------------------------------------

    def _max_tokens(self, request: CanonicalRequest) -> int:
        if request.max_tokens is not None:
            return request.max_tokens
        return self.default_max_tokens + thinking_budget(request.thinking)

    def _throttle_wait(self, headers: Headers) -> float:
        for name, value in headers:
            if name.lower() == b"retry-after":
                try:
                    return max(0.0, float(value))
                except ValueError:
                    break
        now = self._clock()
        last_wait, last_at = self._throttle if self._throttle is not None else (None, None)
        wait = throttle_backoff(last_wait, last_at, now)
        self._throttle = (wait, now)
        return wait

    def _converse(
        self, request: CanonicalRequest, endpoint: Endpoint, section: Bedrock, body: dict[str, Any]
    ) -> UpstreamCall:
        suffix = b"/converse-stream" if request.stream else b"/converse"
        headers: Headers = [
            (b"content-type", _JSON),
            (b"accept", _EVENTSTREAM if request.stream else _JSON),
        ]
        return self._signed(
            endpoint, section, model_path(endpoint, section) + suffix, headers, orjson.dumps(body)
        )

    def _invoke(
        self, request: CanonicalRequest, endpoint: Endpoint, section: Bedrock, messages: bytes
    ) -> UpstreamCall:
        """Anthropic's body (from the Anthropic adapter) as InvokeModel takes it."""
        anthropic = orjson.loads(messages)
        body: dict[str, Any] = {"anthropic_version": INVOKE_VERSION}
        body.update((k, v) for k, v in anthropic.items() if k not in _NOT_INVOKE_FIELDS)
        if request.betas:
            body["anthropic_beta"] = request.betas
        if request.stream:
            suffix = b"/invoke-with-response-stream"
            headers: Headers = [
                (b"content-type", _JSON),
                (b"accept", _EVENTSTREAM),
                (b"x-amzn-bedrock-accept", _JSON),
            ]
        else:
            suffix = b"/invoke"
            headers = [(b"content-type", _JSON), (b"accept", _JSON)]
        return self._signed(
            endpoint, section, model_path(endpoint, section) + suffix, headers, orjson.dumps(body)
        )

    def _signed(
        self, endpoint: Endpoint, section: Bedrock, path: bytes, headers: Headers, body: bytes
    ) -> UpstreamCall:
        credentials = self._chain(section.profile).current()
        url = endpoint.url + path.decode()
        return UpstreamCall(
            path=path, headers=sign(credentials, section.region, url, headers, body), body=body
        )


class BedrockDecoder:
    """One streamed answer of either API: ``chunk`` frames are InvokeModel's, the others Converse's."""

    def __init__(self) -> None:
        self._frames = FrameReader()
        self._converse: ConverseDecoder | None = None
        self._invoke: InvokeDecoder | None = None

    def feed(self, data: bytes) -> list[tuple[bytes, list[Event]]]:
        """Every frame completed by ``data``, with its raw bytes and its canonical events."""
        return [(frame.raw, self._frame(frame)) for frame in self._frames.feed(data)]

    def _frame(self, frame: Frame) -> list[Event]:
        if frame.kind == "chunk" or (self._invoke is not None and self._converse is None):
            self._invoke = self._invoke or InvokeDecoder()
            return self._invoke.frame(frame)
        self._converse = self._converse or ConverseDecoder()
        return self._converse.frame(frame)


def error_type(headers: Headers, body: bytes) -> str:
    """The error's name: ``x-amzn-errortype`` (``ValidationException:http://internal...``), else the body's
    ``__type`` (as JSON 1.0/1.1 services word it)."""
    for name, value in headers:
        if name.lower() == b"x-amzn-errortype":
            return value.decode("latin-1").split(":", 1)[0].strip()
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ""
    kind = data.get("__type") if isinstance(data, dict) else None
    return str(kind).rsplit("#", 1)[-1] if isinstance(kind, str) else ""


def error_message(body: bytes) -> str:
    """The ``message`` (or ``Message``) of a Bedrock error body, else its text."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:2000].decode("utf-8", "replace")
    if isinstance(data, dict):
        for key in ("message", "Message"):
            if isinstance(data.get(key), str):
                return str(data[key])
    return body[:2000].decode("utf-8", "replace")


if TYPE_CHECKING:  # mypy checks that the class keeps the seam's interface
    _BACKEND: Backend = BedrockBackend()
