"""Discovery: a pool's endpoints learned at run time, applied to the running proxy without a restart.

Three sources, each polled on its own interval:

* the **fleet file** itself (when the gateway was started from one): a change to a pool's ``endpoints``
  list is applied; any other change is logged as needing a restart, and left alone;
* **Kubernetes**: the ready addresses of a Service's EndpointSlices (``discovery.k8s.io/v1``), listed
  and then watched (``discovery_kubernetes.py``), in-cluster with the service account or from outside
  with a kubeconfig (``kubeconfig.py``);
* **SkyPilot**: the READY replicas of a SkyServe service, from SkyPilot's own status records.

What is applied is the *difference* between the endpoints a pool has and the ones it should have. A new
endpoint enters like one readmitted after an ejection — probed first, then ramped up by slow start — so
a pod that passed its readiness probe but not ours gets no client traffic. A removed one is drained: no
new picks, what is in flight finishes, then it is forgotten (states, metrics, idle connections).

A source that fails (API down, 403, timeout, garbage) keeps the last set it returned: the control plane
blinking must never empty a pool of endpoints that are still serving. Failures are logged and counted
(``skyfabric_discovery_errors``); an answer with no endpoint at all is believed only when the next poll
says the same.

SkyPilot is polled every ``interval`` (``sky serve status`` has no watch). Kubernetes is watched: a
change is applied as the event arrives — the source wakes the loop — and the watch is resumed from the
last resourceVersion when it ends, re-listed on 410 Gone; while it cannot be re-opened, each ``interval``
lists instead, so an API outage is seen at once rather than looking like a quiet watch.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import orjson
from prometheus_client import Counter, Gauge

from skyfabric.core.endpoints import Endpoint, pool_endpoint
from skyfabric.core.errors import ConfigError, DiscoveryError
from skyfabric.core.fleet import DiscoverySource, Fleet, Pool, load_fleet
from skyfabric.gateway.balancer import EndpointState
from skyfabric.gateway.discovery_kubernetes import KubernetesSource
from skyfabric.gateway.proxy import Proxy

log = logging.getLogger("skyfabric.gateway.discovery")

#: How often a watched fleet file is checked for a change (its size and modification time).
FILE_INTERVAL = 2.0

#: Prints SkyPilot's status records of one service as JSON (``sky serve status`` has no JSON output; its
#: Python SDK returns the records: ``name``, ``status``, ``replica_info`` with ``replica_id``, ``status``,
#: ``endpoint``). Enums are printed by value (``READY``).
SKY_STATUS_SCRIPT = (
    "import json, sys, sky\n"
    "records = sky.get(sky.serve.status([sys.argv[1]]))\n"
    "print(json.dumps(records, default=lambda o: getattr(o, 'value', str(o))))\n"
)

PoolKey = tuple[str, str, str]  # provider, region, pool


class Source(Protocol):
    """A discovery source: the base URLs its pool should have right now, or :class:`DiscoveryError`."""

    spec: DiscoverySource

    async def fetch(self) -> list[str]:
        """The pool's base URLs now; raises :class:`DiscoveryError` when the source cannot say."""
        ...

    def subscribe(self, wake: Callable[[], None]) -> None:
        """``wake`` is called when the source learns of a change by itself (a watch), between polls."""
        ...

    def close(self) -> None:
        """Release connections, stop what the source started."""
        ...


# -- SkyPilot ------------------------------------------------------------------------------------------


def ready_replicas(records: Any, service: str) -> list[str]:
    """Endpoints of the READY replicas of ``service`` in SkyPilot's status records (a JSON list)."""
    if not isinstance(records, list):
        raise DiscoveryError("SkyPilot status: expected a JSON list of service records")
    for record in records:
        if isinstance(record, dict) and record.get("name") == service:
            break
    else:
        raise DiscoveryError(f"SkyPilot status has no service {service!r}")
    out = []
    for replica in record.get("replica_info") or []:
        status = str(replica.get("status", "")).rpartition(".")[2]  # READY or ReplicaStatus.READY
        endpoint = replica.get("endpoint")
        if status == "READY" and isinstance(endpoint, str) and endpoint:
            out.append(endpoint if endpoint.startswith(("http://", "https://")) else "http://" + endpoint)
    return sorted(set(out))


class SkyPilotSource:
    """READY replicas of a SkyServe service, from a command that prints SkyPilot's status records."""

    def __init__(self, spec: DiscoverySource) -> None:
        self.spec = spec
        command = spec.command or [sys.executable, "-c", SKY_STATUS_SCRIPT, "{service}"]
        self.argv = [arg.replace("{service}", spec.service) for arg in command]

    async def fetch(self) -> list[str]:
        """Run the status command (bounded by ``timeout``); the base URLs of the READY replicas."""
        spec = self.spec
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
        except OSError as exc:
            raise DiscoveryError(f"cannot run {self.argv[0]}: {exc.strerror}") from None
        try:
            async with asyncio.timeout(spec.timeout):
                out, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise DiscoveryError(f"{self.argv[0]} gave no status within {spec.timeout}s") from None
        except asyncio.CancelledError:
            proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise DiscoveryError(f"{self.argv[0]} exited with {proc.returncode}: {tail[0]}")
        try:
            records = orjson.loads(out)
        except orjson.JSONDecodeError as exc:
            raise DiscoveryError(f"SkyPilot status is not JSON: {exc}") from None
        try:
            urls = ready_replicas(records, spec.service)
        except (AttributeError, TypeError) as exc:
            raise DiscoveryError(f"SkyPilot status records not as expected: {exc}") from None
        return [url.rstrip("/") + spec.path for url in urls]

    def subscribe(self, wake: Callable[[], None]) -> None:
        pass  # polled only: SkyPilot has no watch

    def close(self) -> None:
        pass


def make_source(spec: DiscoverySource) -> Source:
    """The source a pool's ``discovery`` names."""
    if spec.kind == "kubernetes":
        return KubernetesSource(spec)
    return SkyPilotSource(spec)


# -- applying membership -------------------------------------------------------------------------------


def _without_endpoints(fleet: Fleet) -> dict[str, Any]:
    """The fleet as data with every pool's endpoint list blanked: what must not change without a restart."""
    data = fleet.model_dump()
    for provider in data["providers"]:
        for region in provider["regions"]:
            for pool in region["pools"]:
                pool["endpoints"] = []
    return data


class _PoolMembers:
    """One pool: its static URLs, what its source last said, and the endpoints it has now."""

    def __init__(self, key: PoolKey, pool: Pool, source: Source | None) -> None:
        self.key = key
        self.pool = pool
        self.source = source
        self.static = list(pool.endpoints)
        self.discovered: list[str] = []
        self.empty_once = False
        self.due = 0.0
        #: URL → endpoint now in rotation.
        self.active: dict[str, Endpoint] = {}
        #: URL → index, never forgotten: a URL that returns gets its old id back.
        self.indexes: dict[str, int] = {}

    def desired(self) -> list[str]:
        return list(dict.fromkeys([*self.static, *self.discovered]))

    def endpoint(self, url: str) -> Endpoint:
        index = self.indexes.get(url)
        if index is None:
            index = self.indexes[url] = len(self.indexes)
        # Static URLs keep ``.../<index>`` (the ids they had before discovery existed); discovered ones
        # are named by their address, which is what an operator sees in `kubectl get pods -o wide`.
        key = "" if url in self.static else (urlsplit(url).netloc or url)
        return pool_endpoint(self.key[0], self.key[1], self.pool, index, url, key)


class Discovery:
    """Keeps the proxy's endpoints in step with the fleet file and the pools' discovery sources."""

    def __init__(
        self,
        proxy: Proxy,
        fleet: Fleet,
        *,
        fleet_path: str | Path | None = None,
        probe: Callable[[EndpointState], Awaitable[None]] | None = None,
    ) -> None:
        self.proxy = proxy
        self.fleet = fleet
        self.fleet_path = Path(fleet_path) if fleet_path is not None else None
        self.probe = probe
        self.pools: dict[PoolKey, _PoolMembers] = {}
        for provider in fleet.providers:
            for region in provider.regions:
                for pool in region.pools:
                    key = (provider.name, region.name, pool.name)
                    source = make_source(pool.discovery) if pool.discovery else None
                    members = self.pools[key] = _PoolMembers(key, pool, source)
                    if source is not None:
                        source.subscribe(self._waker(members))
                    for index, url in enumerate(pool.endpoints):
                        members.indexes.setdefault(url, index)
                        endpoint_id = f"{'/'.join(key)}/{index}"
                        if endpoint_id in proxy.states:
                            members.active[url] = proxy.states[endpoint_id].endpoint
        #: endpoint id → when it began draining.
        self.draining: dict[str, float] = {}
        #: Set by a source that learned of a change by itself: the loop runs a round now.
        self.woken = asyncio.Event()
        self._stamp = self._file_stamp()
        self._file_due = 0.0
        registry = proxy.metrics.registry
        self.errors = Counter(
            "skyfabric_discovery_errors",
            "discovery polls that failed (the last known endpoints were kept)",
            ["pool", "kind"],
            registry=registry,
        )
        self.known = Gauge(
            "skyfabric_discovery_endpoints",
            "endpoints a pool's source last reported",
            ["pool"],
            registry=registry,
        )
        self.reloads = Counter(
            "skyfabric_fleet_reloads", "fleet file changes seen, by outcome", ["outcome"], registry=registry
        )

    # -- the loop -------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Poll every source when due, apply the difference, reap drained endpoints; until cancelled."""
        try:
            while True:
                try:
                    await self.step()
                except Exception:  # a bug here must not end discovery for good, nor the gateway
                    log.exception("discovery round failed; trying again next round")
                try:
                    async with asyncio.timeout(self.tick):
                        await self.woken.wait()
                except TimeoutError:
                    pass
                self.woken.clear()
        finally:
            await self.close()

    def _waker(self, members: _PoolMembers) -> Callable[[], None]:
        """What a source calls on a change it saw by itself: make its pool due and wake the loop."""

        def wake() -> None:
            members.due = 0.0
            self.woken.set()

        return wake

    @property
    def tick(self) -> float:
        """How often the loop looks: a quarter of the shortest interval, so a poll is late by ≤ 25 %."""
        intervals = [m.source.spec.interval for m in self.pools.values() if m.source is not None]
        if self.fleet_path is not None:
            intervals.append(FILE_INTERVAL)
        return max(0.05, min([*intervals, 1.0]) / 4)

    async def step(self) -> None:
        """One round: the file if due, the sources that are due (concurrently), then the reaper."""
        now = self.proxy.clock()
        if self.fleet_path is not None and now >= self._file_due:
            self._file_due = now + FILE_INTERVAL
            await self.check_file()
        due = [m for m in self.pools.values() if m.source is not None and now >= m.due]
        for members in due:
            assert members.source is not None
            members.due = now + members.source.spec.interval
        if due:
            await asyncio.gather(*(self.poll(m) for m in due))
        self.reap()

    async def poll(self, members: _PoolMembers) -> None:
        """Ask one source; on success apply what it says, on failure keep what it said last."""
        source = members.source
        assert source is not None
        name = "/".join(members.key)
        try:
            urls = await source.fetch()
        except DiscoveryError as exc:
            self.errors.labels(name, source.spec.kind).inc()
            log.warning(
                "discovery for %s failed, keeping its %d endpoints: %s", name, len(members.active), exc
            )
            return
        if not urls and members.discovered and not members.empty_once:
            members.empty_once = True  # believe an empty answer only when the next poll repeats it
            log.warning("discovery for %s found no ready endpoint: waiting for the next poll", name)
            return
        members.empty_once = False
        members.discovered = urls
        self.known.labels(name).set(len(urls))
        await self.apply(members)

    async def apply(self, members: _PoolMembers) -> None:
        """Make the pool's endpoints in the proxy equal to what it should have: add new, drain gone.

        Make before break: the new endpoints are added and probed before the gone ones are drained, so
        replacing every endpoint of a pool leaves no moment with none in rotation.
        """
        desired = members.desired()
        added = []
        for url in desired:
            if url not in members.active:
                endpoint = members.endpoint(url)
                members.active[url] = endpoint
                self.draining.pop(endpoint.id, None)
                added.append(self.proxy.add_endpoint(endpoint))
                log.warning(
                    "%s joined %s (%s): probing, then slow start", endpoint.id, "/".join(members.key), url
                )
        if added and self.probe is not None:
            # Probed now rather than at the health loop's next round: a new endpoint is idle until then.
            await asyncio.gather(*(self.probe(s) for s in added if s.needs_probe), return_exceptions=True)
        gone = [url for url in members.active if url not in desired]
        for url in gone:
            endpoint = members.active.pop(url)
            if self.proxy.drain_endpoint(endpoint.id) is not None:
                self.draining[endpoint.id] = self.proxy.clock()
                log.warning("%s left %s: draining", endpoint.id, "/".join(members.key))
        if added or gone:
            self.proxy.admission.dispatch_all()

    def reap(self) -> None:
        """Forget drained endpoints whose last request has finished (or that outlived any request)."""
        now = self.proxy.clock()
        limit = self.proxy.timeouts.total
        for endpoint_id, since in list(self.draining.items()):
            if self.proxy.drop_if_idle(endpoint_id, force=now - since > limit):
                del self.draining[endpoint_id]
                log.info("%s drained and removed", endpoint_id)

    # -- the fleet file -------------------------------------------------------------------------------

    def _file_stamp(self) -> tuple[int, int] | None:
        if self.fleet_path is None:
            return None
        try:
            st = self.fleet_path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    async def check_file(self) -> bool:
        """Re-read the fleet file if it changed; apply endpoint lists; returns whether it was re-read."""
        stamp = self._file_stamp()
        if stamp is None or stamp == self._stamp:
            return False
        self._stamp = stamp
        assert self.fleet_path is not None
        try:
            fleet = load_fleet(self.fleet_path)
        except ConfigError as exc:
            self.reloads.labels("invalid").inc()
            log.error("fleet file changed but is not valid; nothing applied:\n%s", exc)
            return True
        if _without_endpoints(fleet) != _without_endpoints(self.fleet):
            self.reloads.labels("restart_required").inc()
            log.warning(
                "%s: changes other than pools' `endpoints` need a restart (only endpoint lists are applied)",
                self.fleet_path,
            )
        else:
            self.reloads.labels("applied").inc()
        changed = []
        for provider in fleet.providers:
            for region in provider.regions:
                for pool in region.pools:
                    members = self.pools.get((provider.name, region.name, pool.name))
                    if members is not None and members.static != list(pool.endpoints):
                        members.static = list(pool.endpoints)
                        changed.append(members)
        for members in changed:
            await self.apply(members)
        return True

    async def close(self) -> None:
        """Stop what this started and close the sources' connections."""
        for members in self.pools.values():
            if members.source is not None:
                members.source.close()
