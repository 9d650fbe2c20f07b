"""The fleet file: providers → regions → pools → endpoints, the models clients ask for, and the knobs.

A fleet file is YAML validated by pydantic at load time. Errors name the file, the field (as a dotted
path such as ``providers[0].regions[1].pools[0].engine``) and what was expected, because the person who
reads them is usually an operator at 3 a.m. with the file open in another window.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from skyfabric.core.errors import ConfigError
from skyfabric.core.fleet_azure import AzureOpenAISettings, check_pool
from skyfabric.core.fleet_bedrock import BedrockSettings, default_endpoint
from skyfabric.core.fleet_bedrock import check_pool as check_bedrock_pool
from skyfabric.core.vertex_settings import VertexSettings, with_default_endpoint

#: Accelerator kinds skyfabric knows how to price, plan and launch. ``managed`` is a hosted API.
Accelerator = Literal[
    "cpu",
    "nvidia-h100",
    "nvidia-h200",
    "nvidia-b200",
    "nvidia-a100",
    "nvidia-l4",
    "nvidia-a10g",
    "tpu-v5e",
    "tpu-v5p",
    "tpu-v6e",
    "trainium1",
    "trainium2",
    "inferentia2",
    "managed",
]

#: How a pool's endpoints are served. All but ``local`` are reached over HTTP at the pool's endpoints.
#: Every kind here has a protocol adapter (``protocols/registry.py``; ``tests/protocols`` checks it):
#: a kind nothing speaks is not accepted. The managed clouds (Bedrock, Vertex AI, Azure OpenAI) join
#: with their adapters.
EngineKind = Literal[
    "local",
    "vllm",
    "vllm-tpu",
    "vllm-neuron",
    "sglang",
    "tgi",
    "llama-cpp",
    "openai",
    "anthropic",
    "azure-openai",
    "vertex",
    "bedrock",
]

#: Engines known to continue a final assistant message (vLLM's ``continue_final_message``) or a
#: completions prompt. A pool may override this with ``continuation``.
CONTINUING_ENGINES: frozenset[str] = frozenset(
    {"local", "vllm", "vllm-tpu", "vllm-neuron", "sglang", "anthropic", "vertex", "bedrock"}
)

Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:\-]*$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Capacity(_Strict):
    """What one endpoint (replica) of a pool can carry; the router and the planner read it."""

    concurrency: int = Field(32, ge=1, description="requests in flight one endpoint serves well")
    tokens_per_second: float | None = Field(None, gt=0, description="decode tokens/s of one endpoint")


#: Where an in-cluster pod finds its service account's credentials (Kubernetes' own paths).
SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
SERVICE_ACCOUNT_CA = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"


class DiscoverySource(_Strict):
    """Where a pool's endpoints are learned at run time, besides its static ``endpoints``.

    ``kubernetes``: the ready addresses of a Service's EndpointSlices; ``skypilot``: the READY replicas of
    a SkyServe service. Kubernetes membership is followed with a watch (or listed every ``interval``
    seconds), SkyPilot's is polled every ``interval``; either is applied without a restart.
    """

    kind: Literal["kubernetes", "skypilot"]
    service: Name = Field(description="the Kubernetes Service or the SkyServe service name")
    interval: float = Field(5.0, ge=0.05, description="seconds between polls")
    timeout: float = Field(5.0, gt=0, description="longest one poll may take; a late poll is a failure")
    path: str = Field("/v1", description="URL path of the OpenAI API on each discovered address")
    # kubernetes
    namespace: Name = "default"
    port: int | Name | None = Field(
        None, description="kubernetes: EndpointSlice port name, or a number; default: the slice's only port"
    )
    scheme: Literal["http", "https"] = Field("http", description="kubernetes: how to reach the pods")
    api: str | None = Field(
        None, description="kubernetes API base URL; default in-cluster (KUBERNETES_SERVICE_HOST/PORT)"
    )
    kubeconfig: str | None = Field(
        None,
        description="kubernetes: a kubeconfig file, for a gateway outside the cluster (server, CA, token or "
        "client certificate of its context); default: in-cluster service account",
    )
    context: str | None = Field(
        None, description="kubernetes: the kubeconfig context; default its current one"
    )
    watch: bool = Field(
        True,
        description="kubernetes: follow the EndpointSlices with a watch (changes applied as they happen); "
        "false: list every `interval`",
    )
    token_file: str | None = Field(
        SERVICE_ACCOUNT_TOKEN,
        description="bearer token, re-read each request (default: the service account's)",
    )
    ca_file: str | None = Field(
        None, description="CA for the API; default the kubeconfig's or service account's"
    )
    # skypilot
    command: list[str] | None = Field(
        None,
        description="skypilot: command printing the status records as JSON; `{service}` is replaced. "
        "Default: SkyPilot's Python SDK, sky.serve.status",
    )

    @model_validator(mode="after")
    def _kind_fields(self) -> DiscoverySource:
        if self.kind == "skypilot":
            k8s_only = {
                "namespace",
                "port",
                "scheme",
                "api",
                "token_file",
                "ca_file",
                "kubeconfig",
                "context",
                "watch",
            } & self.model_fields_set
            if k8s_only:
                raise ValueError(f"kind 'skypilot' takes no {', '.join(sorted(k8s_only))}")
        elif self.command is not None:
            raise ValueError("`command` is for kind 'skypilot'")
        if self.context is not None and self.kubeconfig is None:
            raise ValueError("`context` names a context of `kubeconfig`: set `kubeconfig` too")
        if self.api is not None and not self.api.startswith(("http://", "https://")):
            raise ValueError(f"api {self.api!r} must be an http:// or https:// URL")
        if self.path and not self.path.startswith("/"):
            raise ValueError(f"path {self.path!r} must start with /")
        return self


class Pool(_Strict):
    """Identical endpoints of one accelerator kind and engine, serving one model."""

    name: Name
    accelerator: Accelerator
    engine: EngineKind
    model: Name = Field(description="the fleet model this pool serves (a name under `models`)")
    upstream_model: str | None = Field(None, description="the model name the backend expects, if different")
    endpoints: list[str] = Field(default_factory=list, description="base URLs, e.g. http://10.0.0.5:8000/v1")
    replicas: int = Field(1, ge=0, le=64, description="for engine `local`: replica processes to start")
    model_dir: str | None = Field(None, description="for engine `local`: checkpoint dir (default: shipped)")
    price_per_hour: float = Field(0.0, ge=0, description="USD per endpoint-hour")
    price_per_mtok_in: float | None = Field(
        None, ge=0, description="USD per million prompt tokens billed (default: the model's price, else 0)"
    )
    price_per_mtok_out: float | None = Field(
        None, ge=0, description="USD per million completion tokens billed (default: the model's, else 0)"
    )
    price_per_mtok_cached: float | None = Field(
        None, ge=0, description="USD per million cached prompt tokens (default: the prompt token price)"
    )
    capacity: Capacity = Capacity()
    api_key_env: str | None = Field(None, description="environment variable holding the upstream API key")
    continuation: bool | None = Field(
        None, description="can continue a final assistant message; default from the engine kind"
    )
    discovery: DiscoverySource | None = Field(
        None, description="learn endpoints at run time (Kubernetes EndpointSlices, SkyPilot service status)"
    )
    azure: AzureOpenAISettings | None = Field(
        None, description="engine `azure-openai`: deployment, api_version, credentials (core/fleet_azure.py)"
    )
    vertex: VertexSettings | None = Field(
        None,
        description="engine `vertex`: project, location, publisher, credentials (default endpoint: the "
        "location's aiplatform.googleapis.com)",
    )
    bedrock: BedrockSettings | None = Field(
        None, description="engine `bedrock`: region, api, profile (core/fleet_bedrock.py)"
    )

    @model_validator(mode="before")
    @classmethod
    def _vertex_endpoint(cls, data: Any) -> Any:
        return with_default_endpoint(data)

    @model_validator(mode="before")
    @classmethod
    def _bedrock_endpoint(cls, data: Any) -> Any:
        return default_endpoint(data)

    @field_validator("endpoints")
    @classmethod
    def _urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"endpoint {url!r} must be an http:// or https:// base URL")
        return [url.rstrip("/") for url in urls]

    @model_validator(mode="after")
    def _endpoints_or_replicas(self) -> Pool:
        if self.engine == "local" and self.discovery is not None:
            raise ValueError("engine 'local' starts its own replicas: `discovery` is for remote engines")
        if (self.engine == "vertex") != (self.vertex is not None):
            raise ValueError(
                "engine 'vertex' needs a `vertex` section (project, location, publisher); no other takes one"
            )
        if self.engine != "local" and not self.endpoints and self.discovery is None:
            raise ValueError(f"engine {self.engine!r} needs at least one URL in `endpoints`, or `discovery`")
        if self.engine == "vertex" and self.api_key_env is not None:
            raise ValueError(
                "engine 'vertex' authenticates with Google OAuth: use vertex.credentials_*, not api_key_env"
            )
        return self

    @model_validator(mode="after")
    def _azure_section(self) -> Pool:
        check_pool(self.engine, self.azure, self.api_key_env)
        return self

    @model_validator(mode="after")
    def _bedrock_section(self) -> Pool:
        check_bedrock_pool(self.engine, self.bedrock)
        return self

    @property
    def can_continue(self) -> bool:
        """Whether a stream cut on this pool's endpoints' peers may be continued here."""
        if self.continuation is not None:
            return self.continuation
        return self.engine in CONTINUING_ENGINES


class Region(_Strict):
    """A region of one provider: the failure domain between a provider and its pools."""

    name: Name
    pools: list[Pool] = Field(min_length=1)


class Provider(_Strict):
    """A cloud (or a managed API vendor): the largest failure domain skyfabric plans around."""

    name: Name
    regions: list[Region] = Field(min_length=1)


class Hedge(_Strict):
    """Send a second copy of a slow request to another failure domain; the first token wins."""

    after: float | Literal["p95"] = Field(
        "p95",
        description="seconds without a first token before hedging, or the observed p95 time to first token",
    )
    min_after: float = Field(0.05, ge=0, description="floor for the p95-based threshold")
    max_hedges: int = Field(1, ge=1, le=3)


class Model(_Strict):
    """A model as clients name it, with aliases and the models to fall back to when it cannot answer."""

    name: Name
    aliases: list[Name] = Field(default_factory=list)
    fallbacks: list[Name] = Field(default_factory=list, description="tried in order when no pool can answer")
    context_length: int | None = Field(None, ge=1, description="max prompt + completion tokens")
    larger_context: Name | None = Field(None, description="model to send context-length overflows to")
    owned_by: str = "skyfabric"
    hedge: Hedge | None = Field(None, description="hedge streaming requests whose first token is late")
    price_per_mtok_in: float = Field(
        0.0, ge=0, description="USD per million prompt tokens (pools may differ)"
    )
    price_per_mtok_out: float = Field(0.0, ge=0, description="USD per million completion tokens")
    price_per_mtok_cached: float | None = Field(
        None, ge=0, description="USD per million cached prompt tokens (default: the prompt token price)"
    )
    affinity: bool = Field(
        False,
        description="send requests sharing a prefix (system prompt and first user message) to the same "
        "endpoint while its load allows, for the engines' prefix caches",
    )
    continue_on: list[Name] = Field(
        default_factory=list,
        description="other models that are the same model (the same weights under another name or vendor): "
        "a stream of this model cut mid-answer may go on there; by default only on this model's own pools",
    )


class Timeouts(_Strict):
    """Named timeout phases of one upstream attempt, plus the total deadline of a request (seconds)."""

    connect: float = Field(2.0, gt=0)
    first_byte: float = Field(10.0, gt=0, description="streaming: request sent → response headers")
    response: float = Field(120.0, gt=0, description="non-streaming: request sent → response headers")
    first_token: float = Field(30.0, gt=0, description="headers → first content of a stream")
    idle: float = Field(15.0, gt=0, description="longest silence between two stream events")
    total: float = Field(600.0, gt=0, description="whole request, all attempts (header x-skyfabric-deadline)")


class Retry(_Strict):
    """How many times, and how much extra load, a request may spend on other endpoints."""

    max_attempts: int = Field(3, ge=1, le=10, description="attempts before the first token")
    max_continuations: int = Field(
        3, ge=0, le=10, description="backends a stream may move to after its first token; 0: no failover"
    )
    budget_percent: float = Field(20.0, ge=0, le=100, description="retries ≤ this share of requests")
    min_retry_concurrency: int = Field(10, ge=0, description="retries in flight always allowed (the floor)")
    outage_wait: float = Field(
        10.0, ge=0, description="when every endpoint of a model is out, how long a request waits for one"
    )
    backoff_base: float = Field(0.025, ge=0)
    backoff_max: float = Field(1.0, ge=0)


class Health(_Strict):
    """Passive outlier detection, active probes, and failure-domain ejection."""

    consecutive_failures: int = Field(3, ge=1, description="soft failures (5xx, timeouts) that eject")
    base_ejection: float = Field(2.0, gt=0, description="first ejection (s); grows with each repeat")
    max_ejection: float = Field(60.0, gt=0)
    probe_interval: float = Field(1.0, ge=0, description="active probe period (s); 0 turns probes off")
    probe_timeout: float = Field(0.5, gt=0)
    probe: Literal["models", "completion"] = Field(
        "models", description="GET /models, or a one-token completion (a real request; costs a token)"
    )
    load_signals: bool = Field(True, description="read running/waiting from vLLM-style /metrics")
    stall: float = Field(
        0.8, gt=0, description="an endpoint with streams in flight silent this long is ejected"
    )
    domain_threshold: float = Field(
        0.5, gt=0, le=1, description="share of a region's/provider's endpoints failing that ejects it whole"
    )
    slow_start: float = Field(5.0, ge=0, description="seconds over which a readmitted endpoint ramps up")
    selftest: bool = Field(
        True, description="check that pools claiming `continuation` do continue (at start, on readmission)"
    )


class Admission(_Strict):
    """What happens when more requests arrive than the fleet left standing can carry."""

    queue_timeout: float = Field(5.0, ge=0, description="longest wait for capacity before 429")
    queue_limit: int = Field(256, ge=0, description="requests waiting per model; beyond it, shed by priority")


class Listener(_Strict):
    """Where the gateway listens, and what it allows a client (the defaults are nginx's)."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_request_line_bytes: int = Field(8192, ge=256, description="longer request target: 414")
    max_header_bytes: int = Field(32 * 1024, ge=1024, description="larger request head: 431")
    max_headers: int = Field(100, ge=8, le=10_000, description="more request header fields: 431")
    header_timeout: float = Field(60.0, gt=0, description="accept or first byte → whole head (else 408)")
    body_timeout: float = Field(60.0, gt=0, description="longest pause between two reads of a body (408)")
    write_timeout: float = Field(60.0, gt=0, description="a client that reads nothing this long is dropped")
    keepalive_timeout: float = Field(75.0, ge=0, description="idle keep-alive connections close; 0: never")
    max_connections: int = Field(4096, ge=1, description="open client connections; beyond, closed at once")
    tls_cert: str | None = Field(None, description="PEM certificate chain: serve HTTPS (with tls_key)")
    tls_key: str | None = Field(None, description="PEM private key of tls_cert")

    @model_validator(mode="after")
    def _tls_pair(self) -> Listener:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both, or neither")
        for name, path in (("tls_cert", self.tls_cert), ("tls_key", self.tls_key)):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: no readable file at {path!r}")
        if self.tls_cert is not None:
            self.ssl_context()  # a key that does not match, or a file that is not PEM, fails here
        return self

    def ssl_context(self) -> ssl.SSLContext | None:
        """The server-side TLS context for ``tls_cert``/``tls_key``, or None to serve plain HTTP."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"tls_cert/tls_key cannot be loaded: {exc}") from None
        context.set_alpn_protocols(["http/1.1"])
        return context


class ApiKey(_Strict):
    """A key clients present as ``Authorization: Bearer`` (or Anthropic's ``x-api-key``)."""

    key: str = Field(min_length=8)
    name: str = "default"


class Tracing(_Strict):
    """OpenTelemetry traces: a span per request, a child per attempt and continuation."""

    enabled: bool = Field(False, description="off: no spans, no cost")
    otlp_endpoint: str | None = Field(
        None, description="OTLP/HTTP traces URL, e.g. http://collector:4318/v1/traces"
    )
    otlp_encoding: Literal["json", "protobuf"] = Field(
        "json",
        description="json: skyfabric's own encoder, a few µs per span; protobuf: the OpenTelemetry "
        "exporter (skyfabric[otlp]), ~50 µs of the gateway's CPU per span",
    )
    service_name: str = "skyfabric-gateway"
    sample_ratio: float = Field(
        0.01, ge=0, le=1, description="share of requests traced when the client sent no sampling decision"
    )


class Logs(_Strict):
    """How the gateway writes its logs."""

    format: Literal["text", "json"] = Field("text", description="json: one JSON object a line")
    decisions: bool = Field(False, description="log each routing decision with the request (and trace) id")


class Observability(_Strict):
    """What the gateway shows of itself: the live dashboard, metrics, traces and logs."""

    # Off by default: together they measured ~10-17 µs of gateway CPU per request (bench/layers.py-style
    # A/B, 2026-12-01), more than their 5 % budget; `skyfabric up`'s embedded fleet turns them on.
    dashboard: bool = Field(False, description="serve the live dashboard at /dashboard (API keys guard it)")
    dashboard_interval: float = Field(1.0, gt=0, le=60, description="seconds between dashboard updates")
    metrics: bool = Field(False, description="OpenTelemetry GenAI metrics and skyfabric's own on /metrics")
    tracing: Tracing = Tracing()
    logs: Logs = Logs()


class Limits(_Strict):
    """How per-key limits behave, above all when their shared state (Redis) cannot be reached."""

    failure_policy: Literal["open", "closed"] = Field(
        "open",
        description="a key's default while Redis is unreachable: `open` serves it under this instance's "
        "share (limit / instances), `closed` refuses it (503) until Redis is back",
    )
    instances: int | None = Field(
        None, ge=1, description="the share's divisor while Redis is down; default: instances last seen alive"
    )
    default_max_tokens: int = Field(
        4096, ge=1, description="completion tokens reserved for a request that sets no max_tokens"
    )
    lease_ttl: float = Field(
        15.0, gt=0, description="seconds a concurrency slot outlives its instance's last renewal"
    )
    heartbeat: float = Field(1.0, gt=0, description="seconds between heartbeats, lease renewals, probes")
    redis_timeout: float = Field(0.5, gt=0, description="longest wait for Redis before it counts as down")


class LedgerConfig(_Strict):
    """The usage ledger: one record per request in the operations database, never lost.

    Records go first to a local append-only outbox before the client's answer is written, then in batches
    to the database; when the database is unreachable they wait there and ship when it returns.
    """

    enabled: bool = Field(False, description="record every request's usage (off: no cost)")
    outbox: str | None = Field(
        None, description="outbox directory (relative to the fleet file; default: `<database>.outbox`)"
    )
    batch_size: int = Field(5000, ge=1, le=100_000, description="records per database write, at most")
    ship_interval: float = Field(1.0, gt=0, le=60, description="seconds between shipments to the database")
    fsync_interval: float = Field(
        0.5,
        ge=0,
        le=1,
        description="seconds within which a record is on disk, in the database or the outbox (0: fsync each)",
    )
    retry_interval: float = Field(
        1.0, gt=0, le=60, description="seconds between tries of a database that is down"
    )


class SharedStateConfig(_Strict):
    """Fleet state shared between gateway instances through `operations.redis` pub/sub (ejections)."""

    enabled: bool = Field(True, description="share ejections whenever `operations.redis` is set")
    channel: str = Field("skyfabric:fleet-state", min_length=1, description="the pub/sub channel")
    reconnect_interval: float = Field(1.0, gt=0, le=60, description="seconds between reconnection tries")


class Operations(_Strict):
    """Running a gateway for many teams: managed keys, their limits, the usage ledger, shared fleet state.

    One database (SQLite by default, PostgreSQL when configured) holds the keys and the ledger; one Redis
    holds the limits' counters and carries the shared state. Secrets never go in this file: the admin
    credential and a PostgreSQL URL with a password are read from the environment.
    """

    keys: bool = Field(True, description="managed API keys: every request needs a key (managed or static)")
    database: str = Field(
        "skyfabric.db",
        description="SQLite file (relative to the fleet file), `sqlite:///path`, or a postgresql:// URL",
    )
    database_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="environment variable holding the database URL (wins over `database` when set)",
    )
    table_prefix: str = Field(
        "skyfabric_", pattern=r"^[a-z_][a-z0-9_]{0,30}$", description="prefix of every table's name"
    )
    database_timeout: float = Field(
        5.0, gt=0, le=120, description="longest one database call may take before it counts as down"
    )
    redis: str | None = Field(
        None, description="redis:// URL for limits and shared state; none: this instance alone"
    )
    admin_key_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="name of the environment variable holding the admin API's credential; none: API off",
    )
    key_refresh: float = Field(2.0, gt=0, description="seconds between reloads of the keys from the database")
    limits: Limits = Limits()
    ledger: LedgerConfig = LedgerConfig()
    shared_state: SharedStateConfig = SharedStateConfig()

    @field_validator("database")
    @classmethod
    def _database(cls, value: str) -> str:
        return _database_url(value)

    @field_validator("redis")
    @classmethod
    def _redis(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("redis must be a redis://, rediss:// or unix:// URL")
        return value

    def database_url(self) -> str:
        """The database: the variable ``database_env`` names when it is set, else ``database``."""
        if self.database_env:
            value = os.environ.get(self.database_env)
            if value:
                try:
                    return _database_url(value)
                except ValueError as exc:
                    raise ConfigError(f"{self.database_env}: {exc}") from None
        return self.database


def _database_url(value: str) -> str:
    if "://" in value and not value.startswith(("sqlite://", "postgresql://", "postgres://")):
        raise ValueError(f"database {value!r}: a SQLite path, sqlite:///path or postgresql://")
    if value.startswith("sqlite://") and not value.startswith("sqlite:///"):
        raise ValueError("a SQLite URL is sqlite:///relative.db or sqlite:////absolute.db")
    return value


class Fleet(_Strict):
    """A whole fleet file."""

    version: Literal[1] = 1
    listener: Listener = Listener()
    models: list[Model] = Field(min_length=1)
    providers: list[Provider] = Field(min_length=1)
    timeouts: Timeouts = Timeouts()
    retry: Retry = Retry()
    health: Health = Health()
    admission: Admission = Admission()
    api_keys: list[ApiKey] = Field(default_factory=list, description="empty: no authentication")
    observability: Observability = Observability()
    operations: Operations | None = Field(
        None, description="managed keys, their limits, the usage ledger, shared fleet state"
    )

    @model_validator(mode="after")
    def _names_resolve(self) -> Fleet:
        names: dict[str, str] = {}
        for model in self.models:
            for name in [model.name, *model.aliases]:
                if name in names:
                    raise ValueError(
                        f"model name or alias {name!r} is used twice ({names[name]}, {model.name})"
                    )
                names[name] = model.name
        for model in self.models:
            for other in [*model.fallbacks, *([model.larger_context] if model.larger_context else [])]:
                if other not in names:
                    raise ValueError(f"model {model.name!r} falls back to {other!r}, which is not a model")
            for other in model.continue_on:
                if other not in names:
                    raise ValueError(f"model {model.name!r} continues on {other!r}, which is not a model")
            if model.larger_context is not None and model.context_length is not None:
                larger = self.model(names[model.larger_context]).context_length
                if larger is not None and larger <= model.context_length:
                    raise ValueError(
                        f"model {model.name!r} sends context-length overflows to {model.larger_context!r}, "
                        f"whose context_length ({larger}) is not larger than its own ({model.context_length})"
                    )
        seen: set[str] = set()
        for provider in self.providers:
            if provider.name in seen:
                raise ValueError(f"provider {provider.name!r} is named twice")
            seen.add(provider.name)
            for region in provider.regions:
                for pool in region.pools:
                    if pool.model not in names:
                        raise ValueError(
                            f"pool {provider.name}/{region.name}/{pool.name} serves {pool.model!r}, "
                            f"which is not under `models` (there are: {', '.join(sorted(names))})"
                        )
        return self

    def canonical(self, name: str) -> str | None:
        """The model's own name for a name or alias, or None."""
        for model in self.models:
            if name == model.name or name in model.aliases:
                return model.name
        return None

    def model(self, name: str) -> Model:
        """The model of that canonical name."""
        for model in self.models:
            if model.name == name:
                return model
        raise KeyError(name)


def _where(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def parse_fleet(data: Any, source: str = "<fleet>") -> Fleet:
    """Validate already-parsed YAML/JSON data as a fleet; errors name ``source`` and the field."""
    try:
        return Fleet.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = _where(tuple(p for p in err["loc"] if not str(p).startswith("function-after")))
            got = err.get("input")
            got_text = "" if isinstance(got, dict | list) else f" (got {got!r})"
            lines.append(f"{source}: {loc}: {err['msg']}{got_text}")
        raise ConfigError("\n".join(lines)) from None


def load_fleet(path: str | Path) -> Fleet:
    """Read and validate a fleet file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read fleet file: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with `models` and `providers` at the top level")
    return parse_fleet(data, str(path))
