"""The processes of a drill: replicas for ``local`` pools, a fault proxy per endpoint, and the gateway.

The gateway is the real one, started as ``python -m skyfabric.cli serve`` on a fleet file the drill
writes: the user's fleet with local pools resolved to the replicas started here and every endpoint URL
rewritten to pass through its fault proxy. Child processes get ``PR_SET_PDEATHSIG`` (via the
supervisor's :class:`Child`) so that a drill killed with SIGKILL leaves no orphans behind, and
:meth:`Harness.stop` stops them in order: gateway first, then replicas.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import yaml

from skyfabric.control.supervisor import Child, EmbeddedFleet
from skyfabric.core.endpoints import Endpoint, fleet_endpoints
from skyfabric.core.errors import ConfigError, SkyfabricError
from skyfabric.core.fleet import Fleet, parse_fleet
from skyfabric.drills.faultproxy import FaultProxy

log = logging.getLogger("skyfabric.drills")


def free_port() -> int:
    """A port the kernel says is free on the loopback interface now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_range(count: int, start: int = 20000, stop: int = 60000) -> int:
    """The first port of ``count`` consecutive free ports (the supervisor numbers replicas from a base)."""
    port = start + (free_port() % 1000) * 10
    while port + count < stop:
        if all(_port_free(port + i) for i in range(count)):
            return port
        port += count + 1
    raise SkyfabricError(f"no {count} consecutive free ports between {start} and {stop}")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def proxied_url(url: str, authority: str) -> str:
    """``url`` with its host and port replaced by the proxy's, path kept."""
    parts = urlsplit(url)
    return urlunsplit(("http", authority, parts.path, parts.query, parts.fragment))


def baseline_fleet(data: dict[str, Any]) -> dict[str, Any]:
    """The same fleet with failover off: one attempt per request, no continuation, no hedging.

    ``retry.max_attempts: 1`` stops retries and ``retry.max_continuations: 0`` stops mid-stream
    failover; models lose their ``hedge``. Health checks and ejection stay on: the baseline is a gateway
    that routes around endpoints it knows are dead but never gives a failed request a second chance.
    """
    out = copy.deepcopy(data)
    retry = out.setdefault("retry", {})
    retry["max_attempts"] = 1
    retry["max_continuations"] = 0
    retry["outage_wait"] = 0
    for model in out["models"]:
        model.pop("hedge", None)
    return out


@dataclass
class Harness:
    """Starts and stops everything a drill runs against; see the module docstring."""

    fleet: Fleet
    run_dir: Path
    seed: int = 0
    replica_timeout: float = 300.0
    embedded: EmbeddedFleet | None = None
    resolved: dict[str, Any] = field(default_factory=dict)
    endpoints: list[Endpoint] = field(default_factory=list)
    proxies: dict[str, FaultProxy] = field(default_factory=dict)
    gateway: Child | None = None
    gateway_port: int = 0

    # -- replicas ---------------------------------------------------------------------------------------

    async def start_replicas(self) -> None:
        """Resolve local pools to replica processes, start them, and wait until each answers /health."""
        logs = self.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        local = sum(
            pool.replicas
            for provider in self.fleet.providers
            for region in provider.regions
            for pool in region.pools
            if pool.engine == "local"
        )
        base = free_port_range(max(1, local))
        self.embedded = EmbeddedFleet(self.fleet, replica_base_port=base, run_dir=logs)
        self.resolved = self.embedded.resolve()
        try:
            self.endpoints = fleet_endpoints(parse_fleet(self.resolved, "resolved fleet"))
        except ConfigError as exc:
            raise ConfigError(f"the fleet cannot be resolved: {exc}") from None
        for endpoint in self.endpoints:
            if endpoint.origin[0] != "http":
                raise ConfigError(
                    f"endpoint {endpoint.id} ({endpoint.url}) is not plain http://: the drill's fault proxy "
                    "must read the gateway's requests, which TLS hides"
                )
        for child in self.embedded.replicas:
            child.start()
        if self.embedded.replicas:
            await self._wait_healthy(self.embedded.replicas, self.replica_timeout)

    async def _wait_healthy(self, children: list[Child], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = list(children)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as session:
            while pending:
                for child in list(pending):
                    if not child.alive():
                        tail = (
                            child.log_path.read_text(errors="replace")[-2000:]
                            if child.log_path.exists()
                            else ""
                        )
                        raise SkyfabricError(f"{child.name} exited while starting; its log ends:\n{tail}")
                    try:
                        async with session.get(child.health_url) as resp:
                            if resp.status == 200:
                                pending.remove(child)
                    except (aiohttp.ClientError, TimeoutError):
                        pass
                if pending and time.monotonic() > deadline:
                    names = ", ".join(c.name for c in pending)
                    raise SkyfabricError(f"not ready after {timeout:.0f}s: {names} (logs in {self.run_dir})")
                if pending:
                    await asyncio.sleep(0.2)

    async def warm_up(self, model: str, requests: int) -> None:
        """Send a few small requests straight to every endpoint (not through the proxies or the gateway),
        so that first-request costs (lazy loading, compilation) do not land in the drill's numbers."""
        if requests <= 0:
            return
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "def add(a, b):"}],
            "max_tokens": 4,
            "temperature": 0.0,
        }
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120.0)) as session:

            async def one(endpoint: Endpoint) -> None:
                headers = {"authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
                payload = {**body, "model": endpoint.upstream_model}
                for _ in range(requests):
                    try:
                        async with session.post(
                            f"{endpoint.url}/chat/completions", json=payload, headers=headers
                        ) as r:
                            await r.read()
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        log.warning("warm-up of %s failed: %s", endpoint.id, exc)

            await asyncio.gather(*(one(e) for e in self.endpoints))

    # -- proxies and fleet files ------------------------------------------------------------------------

    async def start_proxies(self) -> None:
        """One fault proxy per endpoint, on a kernel-chosen port."""
        for endpoint in self.endpoints:
            _, host, port = endpoint.origin
            proxy = FaultProxy(host, port, name=endpoint.id, seed=self.seed)
            await proxy.start()
            self.proxies[endpoint.id] = proxy

    def drill_fleet(self) -> dict[str, Any]:
        """The resolved fleet with every endpoint behind its proxy and the gateway on a free port."""
        data = copy.deepcopy(self.resolved)
        for provider in data["providers"]:
            for region in provider["regions"]:
                for pool in region["pools"]:
                    urls = []
                    for index, url in enumerate(pool.get("endpoints", [])):
                        eid = f"{provider['name']}/{region['name']}/{pool['name']}/{index}"
                        urls.append(proxied_url(url, self.proxies[eid].url_authority))
                    pool["endpoints"] = urls
        if not self.gateway_port:
            self.gateway_port = free_port()
        data["listener"] = {**data.get("listener", {}), "host": "127.0.0.1", "port": self.gateway_port}
        return data

    def write_fleet(self, data: dict[str, Any], name: str) -> Path:
        """Validate and write a fleet file into the run directory."""
        parse_fleet(data, name)
        path = self.run_dir / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    # -- the gateway ------------------------------------------------------------------------------------

    async def start_gateway(
        self, fleet_file: Path, log_name: str = "gateway.log", timeout: float = 60.0
    ) -> str:
        """Start the real gateway on ``fleet_file``; returns its base URL once ``/readyz`` answers 200."""
        argv = [
            sys.executable,
            "-m",
            "skyfabric.cli",
            "--log-level",
            "warning",
            "serve",
            "--config",
            str(fleet_file),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.gateway_port),
        ]
        base = f"http://127.0.0.1:{self.gateway_port}"
        self.gateway = Child("gateway", argv, f"{base}/readyz", self.run_dir / "logs" / log_name)
        self.gateway.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.gateway.start()
        await self._wait_healthy([self.gateway], timeout)
        return base

    async def stop_gateway(self) -> None:
        """Stop the gateway (SIGTERM, then SIGKILL after 5 s)."""
        if self.gateway is not None:
            await asyncio.to_thread(self.gateway.stop, 5.0)
            self.gateway = None

    async def stop(self) -> None:
        """Stop everything: gateway first (no client is cut by a replica stop), proxies, then replicas."""
        await self.stop_gateway()
        for proxy in self.proxies.values():
            await proxy.stop()
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)
