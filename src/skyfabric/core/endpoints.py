"""Endpoints and the failure domains they sit in: replica → pool → region → provider."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from skyfabric.core.errors import ConfigError
from skyfabric.core.fleet import Fleet, Pool


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One upstream base URL serving one fleet model, placed in its failure domains."""

    provider: str
    region: str
    pool: str
    index: int
    url: str
    model: str
    upstream_model: str
    engine: str
    accelerator: str
    can_continue: bool
    concurrency: int
    price_per_hour: float
    api_key: str | None = field(default=None, repr=False)
    #: The last part of the id, when not the index: a discovered endpoint is named by its address, so
    #: its id stays the same however the set around it changes.
    key: str = ""
    #: The pool as the fleet file declares it: protocol adapters read their engine's own settings there
    #: (a managed cloud's region, project, deployment, API version, credential references).
    spec: Pool | None = field(default=None, repr=False, compare=False)
    #: ``provider/region/pool/index`` (or ``.../key``): the name in logs, metrics and ``x-skyfabric-backend``.
    id: str = field(init=False)
    #: (scheme, host, port) for the connection pool.
    origin: tuple[str, str, int] = field(init=False)
    #: The URL path prefix that API paths (``/chat/completions``) are appended to.
    base_path: str = field(init=False)

    def __post_init__(self) -> None:
        # Computed once: the request path reads these on every attempt.
        parts = urlsplit(self.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        last = self.key or str(self.index)
        object.__setattr__(self, "id", f"{self.provider}/{self.region}/{self.pool}/{last}")
        object.__setattr__(self, "origin", (parts.scheme, parts.hostname or "127.0.0.1", port))
        object.__setattr__(self, "base_path", parts.path.rstrip("/"))

    @property
    def domains(self) -> tuple[str, str, str]:
        """The failure domains that contain this endpoint, largest first."""
        return (
            self.provider,
            f"{self.provider}/{self.region}",
            f"{self.provider}/{self.region}/{self.pool}",
        )


def fleet_endpoints(fleet: Fleet) -> list[Endpoint]:
    """Every endpoint of the fleet, in file order. Local pools must have been given URLs already."""
    out: list[Endpoint] = []
    for provider in fleet.providers:
        for region in provider.regions:
            for pool in region.pools:
                if pool.engine == "local" and not pool.endpoints and pool.replicas:
                    raise ConfigError(
                        f"pool {provider.name}/{region.name}/{pool.name} uses engine 'local' and has no "
                        "endpoints: start the fleet with `skyfabric up`, which starts its replicas"
                    )
                for index, url in enumerate(pool.endpoints):
                    out.append(pool_endpoint(provider.name, region.name, pool, index, url))
    return out


def pool_endpoint(provider: str, region: str, pool: Pool, index: int, url: str, key: str = "") -> Endpoint:
    """One endpoint of ``pool`` at ``url`` (discovery makes them at run time, the fleet file at start)."""
    return Endpoint(
        provider=provider,
        region=region,
        pool=pool.name,
        index=index,
        url=url,
        model=pool.model,
        upstream_model=pool.upstream_model or pool.model,
        engine=pool.engine,
        accelerator=pool.accelerator,
        can_continue=pool.can_continue,
        concurrency=pool.capacity.concurrency,
        price_per_hour=pool.price_per_hour,
        api_key=os.environ.get(pool.api_key_env) if pool.api_key_env else None,
        key=key,
        spec=pool,
    )
