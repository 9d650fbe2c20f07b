"""Discovery: a pool's endpoints learned at run time, applied to the running proxy without a restart.

Three sources, each polled on its own interval:

* the **fleet file** itself (when the gateway was started from one): a change to a pool's ``endpoints``
  list is applied; any other change is logged as needing a restart, and left alone;
* **Kubernetes**: the ready addresses of a Service's EndpointSlices (``discovery.k8s.io/v1``), listed
  with the service account's bearer token;
* **SkyPilot**: the READY replicas of a SkyServe service, from SkyPilot's own status records.

What is applied is the *difference* between the endpoints a pool has and the ones it should have. A new
endpoint enters like one readmitted after an ejection — probed first, then ramped up by slow start — so
a pod that passed its readiness probe but not ours gets no client traffic. A removed one is drained: no
new picks, what is in flight finishes, then it is forgotten (states, metrics, idle connections).

A source that fails (API down, 403, timeout, garbage) keeps the last set it returned: the control plane
blinking must never empty a pool of endpoints that are still serving. Failures are logged and counted
(``skyfabric_discovery_errors``); an answer with no endpoint at all is believed only when the next poll
says the same.

Polling, not a watch: a list every few seconds bounds staleness by the interval, costs one small request
per pool, and a failure shows at once (a broken watch looks like a quiet one). The list asks for
``resourceVersionMatch=NotOlderThan`` the last version seen, so the API server may answer from its watch
cache (no etcd quorum read) and the gateway never sees membership go backwards.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

import orjson
from prometheus_client import Counter, Gauge

from skyfabric.core.endpoints import Endpoint, pool_endpoint
from skyfabric.core.errors import ConfigError, DiscoveryError, UpstreamError
from skyfabric.core.fleet import SERVICE_ACCOUNT_CA, DiscoverySource, Fleet, Pool, load_fleet
from skyfabric.gateway.balancer import EndpointState
from skyfabric.gateway.proxy import Proxy
from skyfabric.http.client import ConnectionPool, HTTPClient

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

    def close(self) -> None:
        """Release connections."""
        ...


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- Kubernetes ----------------------------------------------------------------------------------------


def ready_addresses(body: Any, port: int | str | None) -> tuple[str, list[tuple[str, int]]]:
    """(resourceVersion, ready (address, port) pairs) from an ``EndpointSliceList``.

    An endpoint is taken when ``conditions.ready`` is true — or absent, which the API defines as ready
    — and only its first address (the API's rule: the others are the same endpoint). ``port`` picks the
    slice port by name; a number is used as is; None takes the slice's only port.
    """
    if not isinstance(body, dict) or body.get("kind") != "EndpointSliceList":
        kind = body.get("kind") if isinstance(body, dict) else type(body).__name__
        raise DiscoveryError(f"expected an EndpointSliceList, got {kind!r}")
    version = str((body.get("metadata") or {}).get("resourceVersion") or "")
    found: set[tuple[str, int]] = set()
    for item in body.get("items") or []:
        ports = item.get("ports") or []
        if isinstance(port, int):
            number: int | None = port
        else:
            chosen = [p for p in ports if port is None or p.get("name") == port]
            if port is None and len(chosen) > 1:
                names = ", ".join(str(p.get("name")) for p in chosen)
                raise DiscoveryError(f"the service has several ports ({names}): name one in `port`")
            number = chosen[0].get("port") if chosen else None
        if not isinstance(number, int):
            continue  # a slice without the port (yet): nothing to reach there
        for ep in item.get("endpoints") or []:
            ready = (ep.get("conditions") or {}).get("ready")
            addresses = ep.get("addresses") or []
            if ready is False or not addresses:
                continue
            found.add((str(addresses[0]), number))
    return version, sorted(found)


def _read_token(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise DiscoveryError(f"cannot read token file {path}: {exc.strerror}") from None


class KubernetesSource:
    """Ready endpoints of a Service, from its EndpointSlices (``GET .../endpointslices?labelSelector=``)."""

    def __init__(self, spec: DiscoverySource, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.spec = spec
        api = spec.api
        if api is None:
            host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
            if not host:
                raise ConfigError(
                    f"discovery of service {spec.service!r}: not running in a Kubernetes pod "
                    "(no KUBERNETES_SERVICE_HOST): set `api`"
                )
            api = f"https://{_host_port(host, int(port))}"
        parts = urlsplit(api)
        scheme = parts.scheme
        self.origin = (
            scheme,
            parts.hostname or "127.0.0.1",
            parts.port or (443 if scheme == "https" else 80),
        )
        self.client = HTTPClient()
        if scheme == "https":
            ca = spec.ca_file or (SERVICE_ACCOUNT_CA if Path(SERVICE_ACCOUNT_CA).exists() else None)
            try:
                context = ssl.create_default_context(cafile=ca)
            except OSError as exc:
                raise ConfigError(f"discovery: cannot read CA file {ca}: {exc.strerror}") from None
            self.client.pools[self.origin] = ConnectionPool(*self.origin, ssl_context=context)
        selector = quote(f"kubernetes.io/service-name={spec.service}", safe="")
        self.base = (
            f"{parts.path.rstrip('/')}/apis/discovery.k8s.io/v1/namespaces/{spec.namespace}"
            f"/endpointslices?labelSelector={selector}"
        )
        self.version = ""

    async def fetch(self) -> list[str]:
        """List the Service's EndpointSlices; the base URLs of its ready endpoints."""
        spec = self.spec
        headers = [(b"accept", b"application/json")]
        if spec.token_file:
            token = _read_token(spec.token_file)  # re-read each poll: bound tokens rotate
            headers.append((b"authorization", b"Bearer " + token.encode()))
        path = self.base
        if self.version:
            path += f"&resourceVersion={self.version}&resourceVersionMatch=NotOlderThan"
        try:
            resp = await self.client.request(
                self.origin,
                b"GET",
                path.encode(),
                headers,
                b"",
                connect_timeout=spec.timeout,
                first_byte_timeout=spec.timeout,
                endpoint="kubernetes-api",
            )
        except UpstreamError as exc:
            raise DiscoveryError(f"kubernetes API: {exc}") from None
        try:
            data = await resp.read(spec.timeout)
        except UpstreamError as exc:
            resp.abort()
            raise DiscoveryError(f"kubernetes API: {exc}") from None
        if resp.status != 200:
            try:
                message = orjson.loads(data).get("message", "")
            except (orjson.JSONDecodeError, AttributeError):
                message = data[:200].decode(errors="replace")
            if resp.status == 410:
                self.version = ""  # our version was compacted away: list afresh next time
            raise DiscoveryError(f"kubernetes API answered {resp.status}: {message}")
        try:
            body = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise DiscoveryError(f"kubernetes API sent something that is not JSON: {exc}") from None
        try:
            version, pairs = ready_addresses(body, spec.port)
        except (AttributeError, TypeError) as exc:
            raise DiscoveryError(f"kubernetes API: not an EndpointSlice list as expected: {exc}") from None
        self.version = version
        return [f"{spec.scheme}://{_host_port(host, port)}{spec.path}" for host, port in pairs]

    def close(self) -> None:
        self.client.close()


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
                    for index, url in enumerate(pool.endpoints):
                        members.indexes.setdefault(url, index)
                        endpoint_id = f"{'/'.join(key)}/{index}"
                        if endpoint_id in proxy.states:
                            members.active[url] = proxy.states[endpoint_id].endpoint
        #: endpoint id → when it began draining.
        self.draining: dict[str, float] = {}
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
                await asyncio.sleep(self.tick)
        finally:
            await self.close()

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
