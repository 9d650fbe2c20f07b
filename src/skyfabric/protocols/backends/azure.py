"""Azure OpenAI: OpenAI's chat completions at a resource's deployment, with Azure's URL, auth and filters.

The wire is OpenAI's (the family is ``openai``: an OpenAI client's body passes through as it came), so this
adapter is :class:`~skyfabric.protocols.backends.openai.OpenAIBackend` with what Azure changes:

* **URL** — the endpoint is the resource (``https://{resource}.openai.azure.com``); the pool's ``azure``
  section (:mod:`skyfabric.core.fleet_azure`) chooses the route: ``api_version: v1`` →
  ``/openai/v1/chat/completions`` with the deployment as the body's ``model`` (re-encoded only when the
  client's model name differs); a dated version → ``/openai/deployments/{deployment}/chat/completions
  ?api-version=...``, where Azure ignores the body's ``model`` and the client's bytes always pass as sent.
* **auth** — ``api-key: <key>`` from the pool's ``api_key_env``, or ``Authorization: Bearer`` with an Entra
  ID token kept fresh off the request path (:mod:`skyfabric.protocols.backends.azure_entra`).
* **content filters** — a stream opens with a chunk that has no choices, no id and the prompt's
  ``prompt_filter_results``: it is passed on (an OpenAI client expects it from Azure) but yields no event,
  so the answer's ``Start`` comes from the first real chunk. Every later chunk carries
  ``content_filter_results`` per choice, which decode to nothing. A completion cut by the filter ends with
  ``finish_reason: content_filter`` (→ canonical ``content_filter``: OpenAI clients see ``content_filter``,
  Anthropic clients ``refusal``). A prompt the filter blocks is a 400 with ``code: content_filter``: the
  client's fault, answered in the client's protocol.
* **continuation** — Azure takes no ``continue_final_message`` and no assistant prefill: it continues
  nothing natively, and a stream cut elsewhere is replayed here (deterministic at temperature 0 or with a
  seed).
* **classification** — :meth:`AzureOpenAIBackend.classify`.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.parse

import orjson

from skyfabric.core.endpoints import Endpoint
from skyfabric.core.errors import MalformedEvent
from skyfabric.core.fleet_azure import AzureOpenAISettings
from skyfabric.core.retry_after import retry_after
from skyfabric.protocols.backends.azure_entra import EntraToken
from skyfabric.protocols.backends.openai import OpenAIBackend, is_context_length
from skyfabric.protocols.backends.openai_body import chat_body
from skyfabric.protocols.backends.openai_decode import OpenAIDecoder
from skyfabric.protocols.base import Capabilities, Headers, Outcome, UpstreamCall
from skyfabric.protocols.canonical import CanonicalRequest, Event
from skyfabric.protocols.progress import Progress

log = logging.getLogger("skyfabric.protocols.azure")

#: A pool with no ``azure`` section: the v1 route, the deployment named like the upstream model, api-key.
DEFAULT_SETTINGS = AzureOpenAISettings()

_JSON = [(b"content-type", b"application/json"), (b"accept", b"application/json")]
_SSE = [(b"content-type", b"application/json"), (b"accept", b"text/event-stream")]
_FILTER_CHUNK = b'"prompt_filter_results"'
_ANNOTATIONS_CHUNK = b'"prompt_annotations"'  # the name in API versions of 2023

CAPABILITIES = Capabilities(
    continues=frozenset(),  # no continue_final_message, no prefill: the gateway replays
    tools=True,
    thinking=True,  # o-series deployments take reasoning_effort
    n=True,
    logprobs=True,
    images=True,
    continuous_usage=False,
    betas=False,
    verbatim_prefix=False,
)


def settings_of(endpoint: Endpoint) -> AzureOpenAISettings:
    """The pool's ``azure`` section, or the defaults."""
    spec = endpoint.spec
    settings = getattr(spec, "azure", None) if spec is not None else None
    return settings if isinstance(settings, AzureOpenAISettings) else DEFAULT_SETTINGS


def deployment_of(endpoint: Endpoint, settings: AzureOpenAISettings) -> str:
    """The deployment: the section's, else the pool's upstream model name."""
    return settings.deployment or endpoint.upstream_model


def route(settings: AzureOpenAISettings, deployment: str, completions: bool = False) -> bytes:
    """The path (and query) of a chat completions (or completions) call on the resource."""
    operation = "completions" if completions else "chat/completions"
    if not settings.deployment_route:
        return f"/openai/v1/{operation}".encode()
    name = urllib.parse.quote(deployment, safe="")
    version = urllib.parse.quote(settings.api_version, safe="")
    return f"/openai/deployments/{name}/{operation}?api-version={version}".encode()


def azure_retry_after(headers: Headers, now_epoch: float) -> float | None:
    """Azure's ``retry-after-ms`` (the precise one) when sent, else ``retry-after``."""
    for name, value in headers:
        if name.lower() == b"retry-after-ms":
            try:
                return max(0.0, float(value) / 1000)
            except ValueError:
                break
    return retry_after([(n, v) for n, v in headers if n.lower() != b"retry-after-ms"], now_epoch)


class AzureDecoder(OpenAIDecoder):
    """OpenAI's decoder, but Azure's prompt-filter chunk (no choices, no id) is not the answer's start."""

    __slots__ = ()

    def _decode(self, payload: bytes) -> list[Event]:
        if not self._started and (_FILTER_CHUNK in payload or _ANNOTATIONS_CHUNK in payload):
            try:
                obj = orjson.loads(payload)
            except orjson.JSONDecodeError:
                raise MalformedEvent(f"upstream sent an event that is not JSON: {payload[:80]!r}") from None
            if type(obj) is dict and not obj.get("choices") and not obj.get("id") and "usage" not in obj:
                return []
        return super()._decode(payload)


class AzureOpenAIBackend(OpenAIBackend):
    """Engine kind ``azure-openai``; see the module's doc."""

    family = "openai"

    def __init__(self, engine: str = "azure-openai") -> None:
        super().__init__(engine)
        self._tokens: dict[tuple[str | None, ...], EntraToken] = {}
        self._tokens_lock = threading.Lock()

    def capabilities(self, endpoint: Endpoint) -> Capabilities:
        """Azure continues nothing natively (see :data:`CAPABILITIES`)."""
        return CAPABILITIES

    # -- credentials ----------------------------------------------------------------------------------------

    def prepare(self, endpoint: Endpoint) -> None:
        """Called when the fleet loads: obtain the endpoint's first Entra token (bounded wait) and keep it
        fresh from then on, so that no request waits for one."""
        settings = settings_of(endpoint)
        if settings.auth == "entra" and not self.entra(settings).wait_first():
            log.warning("no Entra token yet for %s: its requests fail over until one comes", endpoint.id)

    def entra(self, settings: AzureOpenAISettings) -> EntraToken:
        """The token source of ``settings``' credential (one per credential, shared by its endpoints)."""
        key = (
            settings.authority,
            settings.tenant_id,
            settings.client_id,
            settings.secret_env,
            settings.federated_token_file,
        )
        with self._tokens_lock:
            source = self._tokens.get(key)
            if source is None:
                source = self._tokens[key] = EntraToken(settings)
            return source

    def auth(self, endpoint: Endpoint) -> Headers:
        """``api-key``, or ``Authorization: Bearer`` with the current Entra token."""
        settings = settings_of(endpoint)
        if settings.auth == "entra":
            header = self.entra(settings).header()
            return [(b"authorization", header)] if header is not None else []
        if endpoint.api_key:
            return [(b"api-key", endpoint.api_key.encode())]
        return []

    def close(self) -> None:
        """Stop the token refreshers."""
        with self._tokens_lock:
            for source in self._tokens.values():
                source.close()

    # -- requests -----------------------------------------------------------------------------------------

    def build(self, request: CanonicalRequest, endpoint: Endpoint, *, usage: bool = False) -> UpstreamCall:
        """The call on the route the pool's ``api_version`` chooses (see the module's doc)."""
        settings = settings_of(endpoint)
        deployment = deployment_of(endpoint, settings)
        path = route(settings, deployment, request.protocol == "openai.completions")
        if request.protocol.startswith("openai."):
            if settings.deployment_route or request.model == deployment:
                body = request.raw  # the deployment route ignores the body's model
            else:
                body = orjson.dumps({**request.body, "model": deployment})
        else:
            translated = chat_body(request, deployment, "openai")  # Azure takes OpenAI's own fields
            if request.stream:
                translated["stream_options"] = {"include_usage": True}
            body = orjson.dumps(translated)
        headers = _SSE if request.stream else _JSON
        return UpstreamCall(path, [*headers, *self.auth(endpoint)], body)

    def continuation(
        self, request: CanonicalRequest, endpoint: Endpoint, progress: Progress, tokens_sent: int | None
    ) -> UpstreamCall | None:
        """None once anything was sent (Azure cannot continue a prefix: the relay replays); else the
        request itself."""
        if progress.parts:
            return None
        return self.build(request, endpoint, usage=True)

    # -- answers ------------------------------------------------------------------------------------------

    def decoder(self) -> AzureDecoder:
        """A fresh decoder that knows Azure's prompt-filter chunk."""
        return AzureDecoder()

    def classify(self, status: int, headers: Headers, body: bytes) -> Outcome:
        """429 throttled (``retry-after-ms``, else ``retry-after``); 408 and 5xx retryable; 401/403 retryable
        (our key or token); 404 retryable (our deployment name or API version: the client names neither);
        a 400 ``context_length_exceeded`` context_length; other 4xx (a ``content_filter`` 400 among them)
        the client's."""
        if status < 400:
            return Outcome("ok")
        if status == 429:
            return Outcome("throttled", azure_retry_after(headers, time.time()))
        if status >= 500 or status in (401, 403, 404, 408):
            return Outcome("retryable", azure_retry_after(headers, time.time()) if status == 503 else None)
        if status in (400, 413, 422) and is_context_length(body):
            return Outcome("context_length")
        return Outcome("client")
