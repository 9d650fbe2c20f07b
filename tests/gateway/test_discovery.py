"""Discovery: endpoints learned at run time from Kubernetes, SkyPilot and the fleet file, without a restart.

Real HTTP over loopback everywhere: a fake Kubernetes API server (aiohttp) serving EndpointSlice lists in
the API's own JSON shape and checking the bearer token; a fake ``sky`` status command printing SkyPilot's
status records; fake engines behind the gateway, and the ``openai`` SDK in front of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import stat
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from skyfabric.core.endpoints import fleet_endpoints
from skyfabric.core.errors import ConfigError, DiscoveryError
from skyfabric.core.fleet import parse_fleet
from skyfabric.gateway import discovery as discovery_mod
from skyfabric.gateway.app import Gateway
from skyfabric.gateway.discovery import ready_replicas
from skyfabric.gateway.discovery_kubernetes import KubernetesSource, ready_addresses
from skyfabric.http.server import Listener
from tests.conftest import RunningGateway
from tests.support.fake_upstream import FakeUpstream, expected_text

TOKEN = "k8s-sa-token-0001"


class FakeKubernetes:
    """The part of the Kubernetes API discovery uses: list and watch the EndpointSlices of one Service.

    Like the API server: every change gets the next resourceVersion; a list answers with the current
    version; a watch (``watch=1``) streams newline-delimited WatchEvents after the version asked for,
    BOOKMARKs when asked, and ends after ``timeoutSeconds``; a version older than the compaction point
    gets an ERROR event with a 410 Status (``gone_as="status"``: an HTTP 410 instead).
    """

    def __init__(self, service: str = "llm", namespace: str = "serving") -> None:
        self.service = service
        self.namespace = namespace
        #: (address, port) → conditions.ready (None: the field is left out, which the API reads as ready).
        self.pods: dict[tuple[str, int], bool | None] = {}
        self.version = 100
        #: slice name → the EndpointSlice object now.
        self.slices: dict[str, dict[str, Any]] = {}
        #: (resourceVersion, event type, object), oldest first; versions at or below `compacted` are gone.
        self.history: list[tuple[int, str, dict[str, Any]]] = []
        self.compacted = 0
        self.gone_as = "event"
        #: "ok", or an HTTP status to answer with, or "hang".
        self.mode: str | int = "ok"
        self.queries: list[dict[str, str]] = []
        self.bad_tokens = 0
        self.runner: web.AppRunner | None = None
        self.stopping = asyncio.Event()
        self.changed = asyncio.Event()
        self.watching: list[web.Request] = []
        self.port = 0

    def _slice(self, name: str, port: int, endpoints: list[dict[str, Any]], version: int) -> dict[str, Any]:
        return {
            "kind": "EndpointSlice",
            "apiVersion": "discovery.k8s.io/v1",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": {"kubernetes.io/service-name": self.service},
                "resourceVersion": str(version),
            },
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [{"name": "http", "protocol": "TCP", "port": port}],
        }

    def set(self, pods: dict[tuple[str, int], bool | None]) -> None:
        """New pod states: one slice per port; each slice that changed is an event at a new version."""
        self.pods = dict(pods)
        by_port: dict[int, list[dict[str, Any]]] = {}
        for (address, port), ready in sorted(self.pods.items()):
            conditions: dict[str, Any] = {"serving": ready is not False, "terminating": ready is False}
            if ready is not None:
                conditions["ready"] = ready
            by_port.setdefault(port, []).append(
                {
                    "addresses": [address],
                    "conditions": conditions,
                    "nodeName": "node-1",
                    "targetRef": {"kind": "Pod", "namespace": self.namespace, "name": f"llm-{port}"},
                }
            )
        wanted = {f"{self.service}-{port}": (port, eps) for port, eps in by_port.items()}
        for name in sorted(set(self.slices) - set(wanted)):
            self.version += 1
            gone = self.slices.pop(name)
            gone["metadata"]["resourceVersion"] = str(self.version)
            self.history.append((self.version, "DELETED", gone))
        for name, (port, eps) in sorted(wanted.items()):
            old = self.slices.get(name)
            if old is not None and old["endpoints"] == eps:
                continue
            self.version += 1
            self.slices[name] = self._slice(name, port, eps, self.version)
            self.history.append((self.version, "ADDED" if old is None else "MODIFIED", self.slices[name]))
        self.version += 1  # an unrelated object's change: versions are cluster-wide, not per Service
        self.changed.set()
        self.changed = asyncio.Event()

    def compact(self) -> None:
        """etcd compaction: every version up to now can no longer be watched from."""
        self.compacted = self.version

    def drop_watches(self) -> None:
        """Cut every open watch connection (an API server restart, a load balancer's idle timeout)."""
        for request in self.watching:
            if request.transport is not None:
                request.transport.abort()
        self.watching = []
        self.changed.set()  # the handlers see they were dropped and end
        self.changed = asyncio.Event()

    def bookmark(self) -> None:
        self.version += 1
        self.history.append((self.version, "BOOKMARK", {}))
        self.changed.set()
        self.changed = asyncio.Event()

    async def start(self, ssl_context: Any = None) -> FakeKubernetes:
        app = web.Application()
        app.router.add_get("/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices", self.list)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        self.scheme = "https" if ssl_context is not None else "http"
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        self.stopping.set()
        self.drop_watches()
        if self.runner is not None:
            await self.runner.cleanup()

    @property
    def api(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def lists(self) -> list[dict[str, str]]:
        return [q for q in self.queries if q.get("watch") != "1"]

    @property
    def watches(self) -> list[dict[str, str]]:
        return [q for q in self.queries if q.get("watch") == "1"]

    def status(self, code: int, reason: str, message: str) -> web.Response:
        return web.json_response(self._status(code, reason, message), status=code)

    @staticmethod
    def _status(code: int, reason: str, message: str) -> dict[str, Any]:
        body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message}
        body.update({"reason": reason, "code": code})
        return body

    def _ours(self, request: web.Request) -> bool:
        selector = request.query.get("labelSelector", "")
        return selector == f"kubernetes.io/service-name={self.service}" and (
            request.match_info["ns"] == self.namespace
        )

    async def list(self, request: web.Request) -> web.StreamResponse:
        self.queries.append(dict(request.query))
        client_cert = request.transport.get_extra_info("peercert") if request.transport else None
        if request.headers.get("Authorization") != f"Bearer {TOKEN}" and not client_cert:
            self.bad_tokens += 1
            return self.status(401, "Unauthorized", "Unauthorized")
        if self.mode == "hang":
            await self.stopping.wait()
        if isinstance(self.mode, int):
            return self.status(self.mode, "Forbidden" if self.mode == 403 else "ServiceUnavailable", "no")
        if request.query.get("watch") == "1":
            return await self.watch(request)
        items = [self.slices[name] for name in sorted(self.slices)] if self._ours(request) else []
        return web.json_response(
            {
                "kind": "EndpointSliceList",
                "apiVersion": "discovery.k8s.io/v1",
                "metadata": {"resourceVersion": str(self.version)},
                "items": items,
            }
        )

    async def watch(self, request: web.Request) -> web.StreamResponse:
        since = int(request.query.get("resourceVersion") or self.version)
        bookmarks = request.query.get("allowWatchBookmarks") == "true"
        deadline = time.monotonic() + float(request.query.get("timeoutSeconds", "1800"))
        gone = self._status(410, "Expired", f"too old resource version: {since} ({self.compacted})")
        if since < self.compacted and self.gone_as == "status":
            return web.json_response(gone, status=410)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        self.watching.append(request)
        try:
            if since < self.compacted:
                await response.write(json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
                return response
            while time.monotonic() < deadline and request in self.watching:
                for version, kind, obj in self.history:
                    if version <= since or (kind == "BOOKMARK" and not bookmarks) or not self._ours(request):
                        continue
                    if kind == "BOOKMARK":
                        obj = {
                            "kind": "EndpointSlice",
                            "apiVersion": "discovery.k8s.io/v1",
                            "metadata": {"resourceVersion": str(version)},
                        }
                    await response.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
                    since = version
                changed = self.changed
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), max(0.01, deadline - time.monotonic()))
        except (ConnectionResetError, RuntimeError):
            pass  # dropped
        finally:
            if request in self.watching:
                self.watching.remove(request)
        return response


def _fleet(pool: dict[str, Any], **extra: Any) -> dict[str, Any]:
    base = {"name": "pool", "accelerator": "cpu", "engine": "vllm", "model": "m", "continuation": True}
    data: dict[str, Any] = {
        "models": [{"name": "m"}],
        "providers": [{"name": "k8s", "regions": [{"name": "r1", "pools": [{**base, **pool}]}]}],
        "health": {"probe_interval": 0.2, "probe_timeout": 0.5, "selftest": False, "slow_start": 0.5},
    }
    data.update(extra)
    return data


@pytest.fixture
async def serve() -> AsyncIterator[Any]:
    running: list[tuple[Gateway, Listener]] = []

    async def start(data: dict[str, Any], fleet_path: Path | None = None) -> RunningGateway:
        fleet = parse_fleet(data)
        gateway = Gateway(fleet, fleet_endpoints(fleet), fleet_path=fleet_path)
        await gateway.start()
        listener = Listener(gateway)
        port = await listener.start("127.0.0.1", 0)
        running.append((gateway, listener))
        return RunningGateway(gateway, listener, port)

    yield start
    for gateway, listener in running:
        await listener.stop(grace=0.5)
        await gateway.close()


@pytest.fixture
async def upstreams() -> AsyncIterator[list[FakeUpstream]]:
    ups = [await FakeUpstream(f"u{i}").start() for i in range(3)]
    yield ups
    for up in ups:
        await up.stop()


@pytest.fixture
async def kube() -> AsyncIterator[FakeKubernetes]:
    api = await FakeKubernetes().start()
    yield api
    await api.stop()


def _token(tmp_path: Path) -> str:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return str(path)


def _k8s_pool(kube: FakeKubernetes, tmp_path: Path, **more: Any) -> dict[str, Any]:
    spec = {
        "kind": "kubernetes",
        "namespace": "serving",
        "service": "llm",
        "port": "http",
        "api": kube.api,
        "token_file": _token(tmp_path),
        "interval": 0.2,
        "timeout": 0.5,
        **more,
    }
    return {"discovery": spec}


def _pod(up: FakeUpstream) -> tuple[str, int]:
    return "127.0.0.1", up.port


async def _backends(gw: RunningGateway, n: int, **kwargs: Any) -> list[str]:
    client = gw.client()
    out = []
    for _ in range(n):
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}], **kwargs
        )
        raw.parse()
        out.append(raw.headers["x-skyfabric-backend"])
    return out


async def _assert_idle(gw: RunningGateway, within: float = 1.0) -> None:
    """Every in-flight counter back to zero (releases run a moment after the client saw the end)."""
    proxy = gw.gateway.proxy

    def held() -> list[str]:
        out = [
            s.endpoint.id
            for s in proxy.states.values()
            if (s.outstanding, s.streaming, len(s.inflight)) != (0, 0, 0)
        ]
        return out + [m for m, g in proxy.admission.gates.items() if g.inflight]

    deadline = time.monotonic() + within
    while held() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert held() == []


# -- Kubernetes ----------------------------------------------------------------------------------------


def _id(up: FakeUpstream, provider: str = "k8s") -> str:
    return f"{provider}/r1/pool/127.0.0.1:{up.port}"


async def _first_request_on(gw: RunningGateway, backend: str, within: float) -> float | None:
    """Send requests until one is answered by ``backend``; seconds it took, or None."""
    client = gw.client()
    started = time.monotonic()
    while time.monotonic() - started < within:
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )
        raw.parse()
        if raw.headers["x-skyfabric-backend"] == backend:
            return time.monotonic() - started
        await asyncio.sleep(0.01)
    return None


@pytest.mark.parametrize("watch", [True, False])
async def test_kubernetes_scale_up_reaches_the_new_pod_within_the_interval(
    kube: FakeKubernetes, upstreams: list[FakeUpstream], tmp_path: Path, serve: Any, watch: bool
) -> None:
    u0, u1, u2 = upstreams
    # u1's pod is not ready yet (its readiness probe fails); u2's is terminating: neither gets traffic.
    kube.set({("127.0.0.1", u0.port): None, ("127.0.0.1", u1.port): False, ("127.0.0.1", u2.port): False})
    listed = str(kube.version)
    gw = await serve(_fleet(_k8s_pool(kube, tmp_path, watch=watch)))
    proxy = gw.gateway.proxy
    assert sorted(proxy.states) == [_id(u0)]
    assert set(await _backends(gw, 4)) == {_id(u0)}
    assert proxy.capacity("m") == 32

    kube.set({("127.0.0.1", u0.port): True, ("127.0.0.1", u1.port): True, ("127.0.0.1", u2.port): False})
    took = await _first_request_on(gw, _id(u1), within=5.0)
    assert took is not None, "the new pod never got a request"
    # interval 0.2 s + an immediate probe; slow start gives it a 10 % share from its first moment.
    assert took < 1.5, took
    assert sorted(proxy.states) == sorted([_id(u0), _id(u1)])
    assert proxy.capacity("m") == 64
    assert u2.requests == []
    assert kube.bad_tokens == 0
    assert all(q["labelSelector"] == "kubernetes.io/service-name=llm" for q in kube.queries)
    if watch:
        # one list, then a watch from its version that carried the change: no polling at all
        assert len(kube.lists) == 1 and "resourceVersion" not in kube.lists[0]
        assert kube.watches[0]["resourceVersion"] == listed  # the version the list answered with
        assert kube.watches[0]["allowWatchBookmarks"] == "true"
    else:
        # Later lists ask for nothing older than what was seen (the API server may answer from its cache).
        assert kube.queries[-1]["resourceVersionMatch"] == "NotOlderThan"
        assert kube.queries[-1]["resourceVersion"] == str(kube.version)
        assert kube.watches == []
    await _assert_idle(gw)


async def test_kubernetes_scale_down_drains_the_pod_and_its_stream_completes(
    kube: FakeKubernetes, upstreams: list[FakeUpstream], tmp_path: Path, serve: Any
) -> None:
    u0, u1, _ = upstreams
    for up in (u0, u1):
        up.tokens = 40
        up.token_delay = 0.03  # a stream of ~1.2 s
    kube.set({("127.0.0.1", u0.port): True, ("127.0.0.1", u1.port): True})
    gw = await serve(_fleet(_k8s_pool(kube, tmp_path)))
    proxy = gw.gateway.proxy
    client = gw.client()
    raw = await client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    victim_id = raw.headers["x-skyfabric-backend"]
    victim, other = (u0, u1) if victim_id == _id(u0) else (u1, u0)
    stream = raw.parse()
    text = ""
    async for chunk in stream:
        text += chunk.choices[0].delta.content or "" if chunk.choices else ""
        if len(text) > 10:
            break
    # The pod is scaled away while its stream is running.
    kube.set({("127.0.0.1", other.port): True})
    await asyncio.sleep(0.5)  # > interval
    state = proxy.states[victim_id]  # still known: its stream is in flight
    assert state not in proxy.clusters["m"].states
    assert state.streaming == 1
    assert proxy.capacity("m") == 32
    before = len(victim.requests)
    for up in (u0, u1):
        up.token_delay = 0.0
    assert set(await _backends(gw, 6)) == {_id(other)}  # no new picks on the drained pod
    assert len(victim.requests) == before
    async for chunk in stream:
        text += chunk.choices[0].delta.content or "" if chunk.choices else ""
    assert text == expected_text(40)  # the stream on the drained pod completed, whole
    deadline = time.monotonic() + 2.0
    while victim_id in proxy.states and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert victim_id not in proxy.states  # then it was forgotten: states, gauges, counters
    metrics = (await _get(gw, "/metrics")).decode()
    assert victim_id not in metrics
    assert _id(other) in metrics
    await _assert_idle(gw)


async def _get(gw: RunningGateway, path: str) -> bytes:
    import httpx

    async with httpx.AsyncClient() as http:
        return (await http.get(gw.root + path)).content


@pytest.mark.parametrize("outage", [503, 403, "hang", "bad_token", "empty_once"])
async def test_kubernetes_api_outage_keeps_the_last_known_endpoints(
    kube: FakeKubernetes, upstreams: list[FakeUpstream], tmp_path: Path, outage: Any, serve: Any
) -> None:
    u0, u1, _ = upstreams
    kube.set({("127.0.0.1", u0.port): True, ("127.0.0.1", u1.port): True})
    # "empty_once" is the discovery loop's rule, tested on plain lists (a watch would deliver the
    # emptying and the refilling as events, with no poll between to restore the pods at)
    gw = await serve(_fleet(_k8s_pool(kube, tmp_path, watch=outage != "empty_once")))
    proxy = gw.gateway.proxy
    before = sorted(proxy.states)
    assert len(before) == 2
    if outage == "bad_token":
        (tmp_path / "token").write_text("expired")
    elif outage == "empty_once":
        kube.set({})
    else:
        kube.mode = outage
    # the API server going away (or the token expiring at the next watch) ends the open watch
    kube.drop_watches()
    polls = len(kube.queries)
    worst = 0.0
    client = gw.client()
    for _ in range(12):  # ~1.2 s: several failed polls (interval 0.2 s, timeout 0.5 s)
        started = time.monotonic()
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        worst = max(worst, time.monotonic() - started)
        await asyncio.sleep(0.1)
        if outage == "empty_once" and len(kube.queries) > polls:
            kube.set({("127.0.0.1", u0.port): True, ("127.0.0.1", u1.port): True})
    assert sorted(proxy.states) == before
    assert all(s in proxy.clusters["m"].states for s in proxy.states.values())
    assert worst < 0.5, worst  # a failing control plane never slows the data path
    metrics = (await _get(gw, "/metrics")).decode()
    if outage == "empty_once":
        assert "skyfabric_discovery_errors_total{" not in metrics
    else:
        assert 'skyfabric_discovery_errors_total{kind="kubernetes",pool="k8s/r1/pool"}' in metrics
        line = next(x for x in metrics.splitlines() if x.startswith("skyfabric_discovery_errors_total{"))
        assert float(line.split()[-1]) >= 2
    await _assert_idle(gw)


async def test_an_empty_answer_repeated_empties_the_pool(
    kube: FakeKubernetes, upstreams: list[FakeUpstream], tmp_path: Path, serve: Any
) -> None:
    u0 = upstreams[0]
    kube.set({("127.0.0.1", u0.port): True})
    gw = await serve(_fleet(_k8s_pool(kube, tmp_path)))
    kube.set({})  # scaled to zero, and it stays so
    await asyncio.sleep(0.8)
    assert gw.gateway.proxy.states == {}
    assert gw.gateway.proxy.clusters["m"].states == []


async def test_kubernetes_api_over_tls_is_checked_against_the_cluster_ca(tmp_path: Path) -> None:
    import ssl

    import trustme

    ca, other = trustme.CA(), trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    kube = await FakeKubernetes().start(ssl_context=server)
    try:
        kube.set({("10.1.2.3", 8000): True})
        ca.cert_pem.write_to_path(str(tmp_path / "ca.crt"))
        other.cert_pem.write_to_path(str(tmp_path / "other.crt"))
        spec = parse_fleet(_fleet(_k8s_pool(kube, tmp_path, ca_file=str(tmp_path / "ca.crt"))))
        pool = spec.providers[0].regions[0].pools[0]
        assert pool.discovery is not None and kube.api.startswith("https://")
        source = KubernetesSource(pool.discovery)
        assert await source.fetch() == ["http://10.1.2.3:8000/v1"]
        source.close()
        spec = parse_fleet(_fleet(_k8s_pool(kube, tmp_path, ca_file=str(tmp_path / "other.crt"))))
        impostor = spec.providers[0].regions[0].pools[0].discovery
        assert impostor is not None
        source = KubernetesSource(impostor)
        with pytest.raises(DiscoveryError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            await source.fetch()
        source.close()
        assert len(kube.queries) == 1  # the request never left a connection it could not trust
    finally:
        await kube.stop()


# -- the watch ------------------------------------------------------------------------------------------


async def test_a_watch_applies_a_change_long_before_the_next_poll(
    kube: FakeKubernetes, upstreams: list[FakeUpstream], tmp_path: Path, serve: Any
) -> None:
    u0, u1, _ = upstreams
    kube.set({_pod(u0): True})
    gw = await serve(_fleet(_k8s_pool(kube, tmp_path, interval=30.0)))  # a poll every 30 s only
    assert sorted(gw.gateway.proxy.states) == [_id(u0)]
    kube.set({_pod(u0): True, _pod(u1): True})
    took = await _first_request_on(gw, _id(u1), within=5.0)
    assert took is not None and took < 1.5, took  # the event, not the 30 s poll
    kube.set({_pod(u1): True})  # u0 scaled away: DELETED from its slice, as a MODIFIED event
    await asyncio.sleep(0.3)
    assert sorted(gw.gateway.proxy.states) == [_id(u1)]
    assert len(kube.lists) == 1 and len(kube.watches) == 1
    await _assert_idle(gw)


async def _until(check: Any, within: float = 3.0) -> bool:
    deadline = time.monotonic() + within
    while not check() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return bool(check())


def _source(kube: FakeKubernetes, tmp_path: Path, **more: Any) -> KubernetesSource:
    fleet = parse_fleet(_fleet(_k8s_pool(kube, tmp_path, **more)))
    spec = fleet.providers[0].regions[0].pools[0].discovery
    assert spec is not None
    return KubernetesSource(spec)


async def test_a_dropped_watch_resumes_from_the_last_version_and_misses_nothing(
    kube: FakeKubernetes, tmp_path: Path
) -> None:
    kube.set({("10.0.0.1", 8000): True})
    source = _source(kube, tmp_path, interval=30.0)
    woken: list[float] = []
    source.subscribe(lambda: woken.append(time.monotonic()))
    try:
        assert await source.fetch() == ["http://10.0.0.1:8000/v1"]
        assert await _until(lambda: source.watches == 1 and source.broken is None)
        kube.bookmark()  # nothing changed, but the place to resume from moved
        assert await _until(lambda: source.version == str(kube.version))
        resume_from = source.version
        kube.drop_watches()  # the connection is cut…
        kube.set({("10.0.0.1", 8000): True, ("10.0.0.2", 8000): True})  # …and a pod comes up meanwhile
        assert await _until(lambda: len(kube.watches) == 2)
        assert kube.watches[1]["resourceVersion"] == resume_from  # resumed, not re-listed from scratch
        assert await _until(lambda: "10.0.0.2" in str(source.slices))  # the missed event was replayed
        assert woken, "the discovery loop was not woken by the event"
        assert await source.fetch() == ["http://10.0.0.1:8000/v1", "http://10.0.0.2:8000/v1"]
        assert source.gone == 0
    finally:
        source.close()


@pytest.mark.parametrize("gone_as", ["event", "status"])
async def test_410_gone_lists_afresh_then_watches_from_the_new_version(
    kube: FakeKubernetes, tmp_path: Path, gone_as: str
) -> None:
    """The version to resume from was compacted away while the watch was down: list, then watch again."""
    kube.gone_as = gone_as
    kube.set({("10.0.0.1", 8000): True})
    source = _source(kube, tmp_path, interval=30.0)
    try:
        assert await source.fetch() == ["http://10.0.0.1:8000/v1"]
        assert await _until(lambda: source.watches == 1 and source.broken is None)
        kube.drop_watches()  # the watch is cut…
        kube.set({("10.0.0.3", 8000): True})  # …the pods change…
        kube.compact()  # …and etcd compacts past the version we saw, before the watch is resumed

        def rewatched() -> bool:
            latest = kube.watches[-1]["resourceVersion"]
            return source.broken is None and int(latest) >= kube.compacted

        assert await _until(rewatched, within=5.0)
        assert await source.fetch() == ["http://10.0.0.3:8000/v1"]
        resumes = [q for q in kube.watches if int(q["resourceVersion"]) < kube.compacted]
        assert resumes, "the resume from the compacted version was never tried"
        fresh = [q for q in kube.lists if "resourceVersion" not in q]
        assert len(fresh) == 2  # the first list and the one after 410 (a quorum read, no cached version)
        if gone_as == "event":
            assert source.gone == 1
    finally:
        source.close()


# -- kubeconfig ----------------------------------------------------------------------------------------


def _kubeconfig(
    tmp_path: Path, server: str, users: dict[str, dict[str, Any]], cluster: dict[str, Any]
) -> Path:
    data = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "prod",
        "clusters": [{"name": "c1", "cluster": {"server": server, **cluster}}],
        "users": [{"name": name, "user": user} for name, user in users.items()],
        "contexts": [
            {"name": name, "context": {"cluster": "c1", "user": name, "namespace": "serving"}}
            for name in users
        ],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(data))
    return path


async def test_kubeconfig_token_and_ca_data_outside_the_cluster(tmp_path: Path) -> None:
    import base64
    import ssl

    import trustme

    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    kube = await FakeKubernetes().start(ssl_context=server)
    try:
        kube.set({("10.1.2.3", 8000): True})
        ca_data = base64.b64encode(ca.cert_pem.bytes()).decode()
        (tmp_path / "tok").write_text(TOKEN)
        path = _kubeconfig(
            tmp_path,
            kube.api,
            {"prod": {"token": TOKEN}, "expired": {"token": "old"}, "filed": {"tokenFile": "tok"}},
            {"certificate-authority-data": ca_data},
        )
        for context in (None, "filed"):
            spec = {"kind": "kubernetes", "namespace": "serving", "service": "llm", "kubeconfig": str(path)}
            if context:
                spec["context"] = context
            pool = parse_fleet(_fleet({"discovery": spec})).providers[0].regions[0].pools[0]
            assert pool.discovery is not None
            source = KubernetesSource(pool.discovery, {})  # not in a pod: no KUBERNETES_SERVICE_HOST
            assert await source.fetch() == ["http://10.1.2.3:8000/v1"]
            source.close()
        assert kube.bad_tokens == 0
        spec = {"kind": "kubernetes", "service": "llm", "namespace": "serving", "watch": False}
        spec.update(kubeconfig=str(path), context="expired")
        pool = parse_fleet(_fleet({"discovery": spec})).providers[0].regions[0].pools[0]
        assert pool.discovery is not None
        source = KubernetesSource(pool.discovery, {})
        with pytest.raises(DiscoveryError, match="401"):
            await source.fetch()
        source.close()
        assert kube.bad_tokens == 1
    finally:
        await kube.stop()


async def test_kubeconfig_client_certificate(tmp_path: Path) -> None:
    import ssl

    import trustme

    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    server.verify_mode = ssl.CERT_REQUIRED  # no client certificate, no TLS session
    ca.configure_trust(server)
    kube = await FakeKubernetes().start(ssl_context=server)
    try:
        kube.set({("10.9.9.9", 8000): True})
        client = ca.issue_cert("gateway@skyfabric")
        ca.cert_pem.write_to_path(str(tmp_path / "ca.crt"))
        client.cert_chain_pems[0].write_to_path(str(tmp_path / "gw.crt"))
        client.private_key_pem.write_to_path(str(tmp_path / "gw.key"))
        path = _kubeconfig(
            tmp_path,
            kube.api,
            {"prod": {"client-certificate": "gw.crt", "client-key": "gw.key"}, "anon": {}},
            {"certificate-authority": "ca.crt"},  # relative to the kubeconfig, as kubectl reads it
        )
        spec = {"kind": "kubernetes", "service": "llm", "namespace": "serving", "kubeconfig": str(path)}
        pool = parse_fleet(_fleet({"discovery": spec})).providers[0].regions[0].pools[0]
        assert pool.discovery is not None
        source = KubernetesSource(pool.discovery, {})
        assert await source.fetch() == ["http://10.9.9.9:8000/v1"]
        source.close()
        pool = (
            parse_fleet(_fleet({"discovery": {**spec, "context": "anon"}})).providers[0].regions[0].pools[0]
        )
        assert pool.discovery is not None
        source = KubernetesSource(pool.discovery, {})
        with pytest.raises(DiscoveryError):  # the server wants a certificate this user does not have
            await source.fetch()
        source.close()
    finally:
        await kube.stop()


def test_kubeconfig_refusals(tmp_path: Path) -> None:
    from skyfabric.gateway.kubeconfig import from_kubeconfig

    path = _kubeconfig(
        tmp_path,
        "https://10.0.0.1:6443",
        {
            "prod": {"exec": {"command": "aws", "args": ["eks", "get-token"]}},
            "half": {"client-key-data": "eA=="},
        },
        {},
    )
    with pytest.raises(ConfigError, match="`exec` plugin"):
        from_kubeconfig(path)
    with pytest.raises(ConfigError, match="no context named 'staging'"):
        from_kubeconfig(path, "staging")
    with pytest.raises(ConfigError, match="both a client certificate and its key"):
        from_kubeconfig(path, "half")
    with pytest.raises(ConfigError, match="set `kubeconfig` too"):
        parse_fleet(_fleet({"discovery": {"kind": "kubernetes", "service": "a", "context": "x"}}))


def test_in_cluster_defaults_and_the_error_outside_a_cluster(tmp_path: Path) -> None:
    spec = parse_fleet(_fleet({"discovery": {"kind": "kubernetes", "service": "llm"}})).providers[0]
    pool = spec.regions[0].pools[0]
    assert pool.discovery is not None
    source = KubernetesSource(
        pool.discovery, {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    )
    assert source.origin == ("https", "10.96.0.1", 443)
    assert source.base == (
        "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"
        "?labelSelector=kubernetes.io%2Fservice-name%3Dllm"
    )
    assert pool.discovery.token_file == "/var/run/secrets/kubernetes.io/serviceaccount/token"
    with pytest.raises(ConfigError, match="KUBERNETES_SERVICE_HOST"):
        KubernetesSource(pool.discovery, {})


def test_endpoint_slice_parsing() -> None:
    body = {
        "kind": "EndpointSliceList",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {"resourceVersion": "7"},
        "items": [
            {
                "addressType": "IPv6",
                "ports": [{"name": "http", "port": 8000}, {"name": "metrics", "port": 9090}],
                "endpoints": [
                    {"addresses": ["fd00::1", "fd00::99"], "conditions": {"ready": True}},
                    {"addresses": ["fd00::2"], "conditions": {}},
                    {"addresses": ["fd00::3"], "conditions": {"ready": False, "terminating": True}},
                    {"addresses": [], "conditions": {"ready": True}},
                ],
            },
            {"addressType": "IPv4", "ports": None, "endpoints": [{"addresses": ["10.0.0.9"]}]},
        ],
    }
    assert ready_addresses(body, "http") == ("7", [("fd00::1", 8000), ("fd00::2", 8000)])
    assert ready_addresses(body, 8443)[1] == [("10.0.0.9", 8443), ("fd00::1", 8443), ("fd00::2", 8443)]
    with pytest.raises(DiscoveryError, match="several ports"):
        ready_addresses(body, None)
    with pytest.raises(DiscoveryError, match="EndpointSliceList"):
        ready_addresses({"kind": "Status"}, None)


# -- SkyPilot ------------------------------------------------------------------------------------------


def _sky_records(service: str, replicas: list[tuple[int, str, str | None]]) -> list[dict[str, Any]]:
    """What SkyPilot's ``sky.serve.status`` returns (enums by value), for one service."""
    return [
        {
            "name": service,
            "active_versions": [1],
            "controller_job_id": 3,
            "uptime": 1200,
            "status": "READY",
            "controller_port": 20001,
            "load_balancer_port": 30001,
            "endpoint": "http://34.1.2.3:30001",
            "policy": "Autoscaling [1-4]",
            "requested_resources_str": "1x GCP({'L4': 1})",
            "load_balancing_policy": "least_load",
            "replica_info": [
                {
                    "replica_id": rid,
                    "name": f"{service}-{rid}",
                    "status": status,
                    "version": 1,
                    "endpoint": endpoint,
                    "is_spot": False,
                    "launched_at": 1764590000 + rid,
                    "handle": f"ResourceHandle(cluster_name={service}-{rid})",
                }
                for rid, status, endpoint in replicas
            ],
        }
    ]


def _fake_sky(tmp_path: Path) -> tuple[Path, Path]:
    """A ``sky``-like status command: prints the records in ``records.json``; fails if ``fail`` exists."""
    records = tmp_path / "records.json"
    script = tmp_path / "fake-sky"
    script.write_text(
        f"#!{sys.executable}\n"
        "import pathlib, sys\n"
        f"here = pathlib.Path({str(tmp_path)!r})\n"
        "if (here / 'fail').exists():\n"
        "    sys.exit('sky.exceptions.ClusterNotUpError: the sky serve controller is not up')\n"
        "assert sys.argv[1:] == ['status', 'chat'], sys.argv\n"
        "print((here / 'records.json').read_text())\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script, records


async def test_skypilot_ready_replicas_join_and_a_failing_status_keeps_them(
    upstreams: list[FakeUpstream], tmp_path: Path, serve: Any
) -> None:
    u0, u1, u2 = upstreams
    script, records = _fake_sky(tmp_path)
    records.write_text(
        json.dumps(
            _sky_records(
                "chat",
                [
                    (1, "READY", f"127.0.0.1:{u0.port}"),
                    (2, "PROVISIONING", None),
                    (3, "NOT_READY", u2.url[:-3]),
                ],
            )
        )
    )
    spec = {
        "kind": "skypilot",
        "service": "chat",
        "interval": 0.2,
        "command": [str(script), "status", "{service}"],
    }
    gw = await serve(_fleet({"discovery": spec}))
    proxy = gw.gateway.proxy
    assert sorted(proxy.states) == [_id(u0)]
    assert proxy.states[_id(u0)].endpoint.url == f"http://127.0.0.1:{u0.port}/v1"

    records.write_text(
        json.dumps(
            _sky_records(
                "chat",
                [
                    (1, "READY", f"127.0.0.1:{u0.port}"),
                    (2, "READY", f"http://127.0.0.1:{u1.port}"),
                    (3, "FAILED", None),
                ],
            )
        )
    )
    took = await _first_request_on(gw, _id(u1), within=5.0)
    assert took is not None and took < 2.0, took
    (tmp_path / "fail").write_text("")
    await asyncio.sleep(0.8)
    assert sorted(proxy.states) == sorted([_id(u0), _id(u1)])
    metrics = (await _get(gw, "/metrics")).decode()
    assert 'skyfabric_discovery_errors_total{kind="skypilot",pool="k8s/r1/pool"}' in metrics
    assert u2.requests == []
    await _assert_idle(gw)


def test_skypilot_record_parsing() -> None:
    records = _sky_records(
        "a", [(1, "ReplicaStatus.READY", "10.0.0.1:8000"), (2, "STARTING", "10.0.0.2:8000")]
    )
    assert ready_replicas(records, "a") == ["http://10.0.0.1:8000"]
    with pytest.raises(DiscoveryError, match="no service 'b'"):
        ready_replicas(records, "b")
    default = discovery_mod.SkyPilotSource(
        parse_fleet(_fleet({"discovery": {"kind": "skypilot", "service": "a"}}))
        .providers[0]
        .regions[0]
        .pools[0]
        .discovery
    )  # type: ignore[arg-type]
    assert default.argv[-1] == "a" and "sky.serve.status" in default.argv[2]


# -- the fleet file ------------------------------------------------------------------------------------


async def test_fleet_file_endpoint_changes_apply_without_a_restart(
    upstreams: list[FakeUpstream], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any, serve: Any
) -> None:
    monkeypatch.setattr(discovery_mod, "FILE_INTERVAL", 0.1)
    caplog.set_level(logging.WARNING, logger="skyfabric.gateway.discovery")  # whatever earlier tests set
    u0, u1, _ = upstreams
    path = tmp_path / "fleet.yaml"
    data = _fleet({"endpoints": [u0.url]})
    path.write_text(yaml.safe_dump(data))
    gw = await serve(data, fleet_path=path)
    proxy = gw.gateway.proxy
    assert sorted(proxy.states) == ["k8s/r1/pool/0"]

    data["providers"][0]["regions"][0]["pools"][0]["endpoints"] = [u0.url, u1.url]
    path.write_text(yaml.safe_dump(data))
    took = await _first_request_on(gw, "k8s/r1/pool/1", within=5.0)
    assert took is not None and took < 1.5, took

    # u0 leaves: u1 keeps its id (ids are per address, not per position in the list).
    data["providers"][0]["regions"][0]["pools"][0]["endpoints"] = [u1.url]
    path.write_text(yaml.safe_dump(data) + "# u0 removed\n")
    await asyncio.sleep(0.5)
    assert sorted(proxy.states) == ["k8s/r1/pool/1"]
    assert set(await _backends(gw, 4)) == {"k8s/r1/pool/1"}

    # A change that is not endpoint membership is not applied: it needs a restart, and says so.
    data["timeouts"] = {"total": 5}
    path.write_text(yaml.safe_dump(data))
    for _ in range(60):  # the file is looked at every 0.1 s; a loaded machine may take a while
        if "need a restart" in caplog.text:
            break
        await asyncio.sleep(0.05)
    assert "need a restart" in caplog.text
    assert proxy.timeouts.total == 600.0
    # A broken file changes nothing.
    path.write_text("providers: [")
    await asyncio.sleep(0.5)
    assert sorted(proxy.states) == ["k8s/r1/pool/1"]
    assert "not valid" in caplog.text
    await _assert_idle(gw)


def test_fleet_schema_for_discovery() -> None:
    with pytest.raises(ConfigError, match="or `discovery`"):
        parse_fleet(_fleet({}))
    with pytest.raises(ConfigError, match="takes no namespace"):
        parse_fleet(_fleet({"discovery": {"kind": "skypilot", "service": "a", "namespace": "x"}}))
    with pytest.raises(ConfigError, match="remote engines"):
        parse_fleet(_fleet({"engine": "local", "discovery": {"kind": "kubernetes", "service": "a"}}))
    with pytest.raises(ConfigError, match="`command` is for kind 'skypilot'"):
        parse_fleet(_fleet({"discovery": {"kind": "kubernetes", "service": "a", "command": ["x"]}}))


def test_a_draining_endpoint_does_not_count_in_a_failing_domain() -> None:
    """Pods scaled away and dying under their last streams must not take their healthy peers down."""
    from skyfabric.core.endpoints import pool_endpoint
    from skyfabric.gateway.balancer import EndpointState, OutlierPolicy, correlated_domain, eject

    pool = parse_fleet(_fleet({"endpoints": ["http://a/v1"]})).providers[0].regions[0].pools[0]
    states = [EndpointState(pool_endpoint("k8s", "r1", pool, i, f"http://10.0.0.{i}/v1")) for i in range(3)]
    policy = OutlierPolicy(domain_threshold=0.5)
    for state in states[:2]:
        eject(state, 10.0, policy)
    assert correlated_domain(states, states[0], 10.0, policy) == [states[2]]  # a real domain failure
    for state in states[:2]:
        state.draining = True
    assert correlated_domain(states, states[0], 10.0, policy) == []


async def test_replacing_every_endpoint_of_a_pool_fails_no_request(
    upstreams: list[FakeUpstream], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve: Any
) -> None:
    """Swapping a pool's only endpoint through the fleet file: every request answered, none slow."""
    monkeypatch.setattr(discovery_mod, "FILE_INTERVAL", 0.1)
    u0, u1, _ = upstreams
    path = tmp_path / "fleet.yaml"
    data = _fleet({"endpoints": [u0.url]})
    data["retry"] = {"outage_wait": 0}  # a moment with no endpoint would fail a request, not hold it
    path.write_text(yaml.safe_dump(data))
    gw = await serve(data, fleet_path=path)
    client = gw.client()
    assert await _backends(gw, 1) == ["k8s/r1/pool/0"]  # the client is warm: timing below is the swap's
    data["providers"][0]["regions"][0]["pools"][0]["endpoints"] = [u1.url]
    path.write_text(yaml.safe_dump(data))
    worst, backends = 0.0, []
    for _ in range(40):
        started = time.monotonic()
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )
        raw.parse()  # raises on any error status
        worst = max(worst, time.monotonic() - started)
        backends.append(raw.headers["x-skyfabric-backend"])
        await asyncio.sleep(0.01)
    assert backends[-1] == "k8s/r1/pool/1" and "k8s/r1/pool/0" in backends
    assert worst < 0.5, worst
    assert sorted(gw.gateway.proxy.states) == ["k8s/r1/pool/1"]
    await _assert_idle(gw)
