"""Kubernetes discovery: the ready endpoints of a Service, from its EndpointSlices, listed then watched.

How membership is followed is the API's own protocol, as client-go's informers do it:

1. **List** ``/apis/discovery.k8s.io/v1/namespaces/<ns>/endpointslices?labelSelector=kubernetes.io/
   service-name=<svc>``: the slices and the list's ``resourceVersion``.
2. **Watch** from that version (``watch=1&resourceVersion=V&allowWatchBookmarks=true``): the server
   streams newline-delimited ``WatchEvent`` objects — ``ADDED``, ``MODIFIED``, ``DELETED`` (the slice),
   ``BOOKMARK`` (only a newer ``resourceVersion``: nothing changed, but the place to resume from moved),
   ``ERROR`` (a ``Status``). Each change is applied at once: the discovery loop is woken, not left to its
   next tick, so a pod that became ready gets traffic within a probe, not within ``interval``.
3. The watch **ends** — the server's ``timeoutSeconds``, a dropped connection, an API server restart — and
   is resumed from the last version seen (events are not lost: the server replays from there).
4. **410 Gone** (as an ``ERROR`` event or an HTTP status) says that version was compacted away: resuming
   is impossible, so the slices are listed afresh (a quorum read) and watched from the new version.

While the watch cannot be re-established, ``fetch`` (called every ``interval`` by the discovery loop)
lists instead, so an API outage is seen and counted as such and the last known endpoints are kept — the
same rule as for every source. With ``watch: false`` it lists every ``interval`` and nothing else, with
``resourceVersionMatch=NotOlderThan`` the last version seen (the API server may answer from its cache and
membership never goes backwards).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote, urlsplit

import orjson

from skyfabric.core.errors import DiscoveryError, UpstreamError
from skyfabric.core.fleet import DiscoverySource
from skyfabric.gateway.kubeconfig import access_for
from skyfabric.http.client import ConnectionPool, HTTPClient, UpstreamResponse

log = logging.getLogger("skyfabric.gateway.discovery")

#: How long one watch request lasts before the server ends it (``timeoutSeconds``) and it is resumed.
WATCH_SECONDS = 240

#: Pause before retrying a watch that could not be opened (grows to ``interval``; a list runs meanwhile).
RETRY_FIRST = 0.1


class Gone(DiscoveryError):
    """410: the resourceVersion to resume from was compacted away; list afresh."""


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def slice_addresses(items: Iterable[Any], port: int | str | None) -> list[tuple[str, int]]:
    """The ready (address, port) pairs of some EndpointSlices.

    An endpoint is taken when ``conditions.ready`` is true — or absent, which the API defines as ready
    — and only its first address (the API's rule: the others are the same endpoint). ``port`` picks the
    slice port by name; a number is used as is; None takes the slice's only port.
    """
    found: set[tuple[str, int]] = set()
    for item in items:
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
    return sorted(found)


def ready_addresses(body: Any, port: int | str | None) -> tuple[str, list[tuple[str, int]]]:
    """(resourceVersion, ready (address, port) pairs) from an ``EndpointSliceList``."""
    if not isinstance(body, dict) or body.get("kind") != "EndpointSliceList":
        kind = body.get("kind") if isinstance(body, dict) else type(body).__name__
        raise DiscoveryError(f"expected an EndpointSliceList, got {kind!r}")
    version = str((body.get("metadata") or {}).get("resourceVersion") or "")
    return version, slice_addresses(body.get("items") or [], port)


def _status_message(data: bytes) -> str:
    try:
        return str(orjson.loads(data).get("message", ""))
    except (orjson.JSONDecodeError, AttributeError):
        return data[:200].decode(errors="replace")


class KubernetesSource:
    """Ready endpoints of a Service, from its EndpointSlices: listed, then followed by a watch."""

    def __init__(self, spec: DiscoverySource, environ: dict[str, str] | None = None) -> None:
        self.spec = spec
        self.access = access_for(spec, environ)
        parts = urlsplit(self.access.api)
        scheme = parts.scheme
        self.origin = (
            scheme,
            parts.hostname or "127.0.0.1",
            parts.port or (443 if scheme == "https" else 80),
        )
        self.client = HTTPClient()
        if scheme == "https":
            self.client.pools[self.origin] = ConnectionPool(*self.origin, ssl_context=self.access.ssl_context)
        selector = quote(f"kubernetes.io/service-name={spec.service}", safe="")
        self.base = (
            f"{parts.path.rstrip('/')}/apis/discovery.k8s.io/v1/namespaces/{spec.namespace}"
            f"/endpointslices?labelSelector={selector}"
        )
        #: The last resourceVersion seen (list, event or bookmark): where a watch resumes.
        self.version = ""
        #: slice name → the EndpointSlice object, as the last list and the events since left it.
        self.slices: dict[str, dict[str, Any]] = {}
        self.listed = False
        self.wake: Callable[[], None] | None = None
        self._task: asyncio.Task[None] | None = None
        #: Why the watch is not running now (None while it is).
        self.broken: str | None = None
        #: counts, for logs and tests: lists made, watches opened, events applied, 410s seen
        self.lists = 0
        self.watches = 0
        self.events = 0
        self.gone = 0

    def subscribe(self, wake: Callable[[], None]) -> None:
        """``wake`` is called whenever a watch event changed the slices."""
        self.wake = wake

    # -- requests ---------------------------------------------------------------------------------------

    def _headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(b"accept", b"application/json")]
        token = self.access.bearer()  # re-read each request: bound tokens rotate
        if token:
            headers.append((b"authorization", b"Bearer " + token.encode()))
        return headers

    async def _get(self, path: str, first_byte: float) -> UpstreamResponse:
        try:
            return await self.client.request(
                self.origin,
                b"GET",
                path.encode(),
                self._headers(),
                b"",
                connect_timeout=self.spec.timeout,
                first_byte_timeout=first_byte,
                endpoint="kubernetes-api",
            )
        except UpstreamError as exc:
            raise DiscoveryError(f"kubernetes API: {exc}") from None

    async def list_slices(self) -> None:
        """List the slices (resourceVersion not older than the last seen, unless it was Gone)."""
        spec = self.spec
        path = self.base
        if self.version:
            path += f"&resourceVersion={self.version}&resourceVersionMatch=NotOlderThan"
        resp = await self._get(path, spec.timeout)
        try:
            data = await resp.read(spec.timeout)
        except UpstreamError as exc:
            resp.abort()
            raise DiscoveryError(f"kubernetes API: {exc}") from None
        self.lists += 1
        if resp.status != 200:
            if resp.status == 410:
                self.version = ""  # our version was compacted away: list afresh next time
            raise DiscoveryError(f"kubernetes API answered {resp.status}: {_status_message(data)}")
        try:
            body = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise DiscoveryError(f"kubernetes API sent something that is not JSON: {exc}") from None
        if not isinstance(body, dict) or body.get("kind") != "EndpointSliceList":
            kind = body.get("kind") if isinstance(body, dict) else type(body).__name__
            raise DiscoveryError(f"expected an EndpointSliceList, got {kind!r}")
        try:
            items = {str(item["metadata"]["name"]): item for item in body.get("items") or []}
        except (KeyError, TypeError) as exc:
            raise DiscoveryError(f"kubernetes API: an EndpointSlice without a name: {exc}") from None
        self.slices = items
        self.version = str((body.get("metadata") or {}).get("resourceVersion") or "")
        self.listed = True

    async def watch_once(self) -> None:
        """One watch request from ``self.version``, applying events until the server or the network ends it.

        Returns when the stream ends (the server's timeout, or a dropped connection — both are resumed
        the same way); raises :class:`Gone` on 410 and :class:`DiscoveryError` on any other refusal.
        """
        spec = self.spec
        path = (
            f"{self.base}&watch=1&allowWatchBookmarks=true&timeoutSeconds={WATCH_SECONDS}"
            f"&resourceVersion={self.version}"
        )
        resp = await self._get(path, spec.timeout)
        if resp.status != 200:
            try:
                data = await resp.read(spec.timeout)
            except UpstreamError:
                resp.abort()
                data = b""
            error = Gone if resp.status == 410 else DiscoveryError
            raise error(f"kubernetes API answered the watch with {resp.status}: {_status_message(data)}")
        self.watches += 1
        self.broken = None
        buffer = b""
        try:
            while True:
                try:
                    piece = await resp.next(WATCH_SECONDS + spec.timeout)
                except UpstreamError as exc:
                    log.info("kubernetes watch of %s ended: %s; resuming", spec.service, exc)
                    return
                if piece is None:
                    return
                buffer += piece
                *lines, buffer = buffer.split(b"\n")
                changed = False
                for line in lines:
                    if line.strip():
                        changed |= self._apply(line)
                if changed and self.wake is not None:
                    self.wake()
        finally:
            resp.abort()

    def _apply(self, line: bytes) -> bool:
        """Apply one WatchEvent; whether the slices changed."""
        try:
            event = orjson.loads(line)
            kind, obj = event["type"], event["object"]
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise DiscoveryError(f"kubernetes watch sent something that is not a WatchEvent: {exc}") from None
        if kind == "ERROR":
            code = obj.get("code") if isinstance(obj, dict) else None
            message = obj.get("message", "") if isinstance(obj, dict) else ""
            if code == 410:
                self.gone += 1
                raise Gone(f"kubernetes watch: 410 Gone: {message}")
            raise DiscoveryError(f"kubernetes watch error {code}: {message}")
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        if not isinstance(meta, dict):
            raise DiscoveryError(f"kubernetes watch: a {kind} event without metadata")
        if meta.get("resourceVersion"):
            self.version = str(meta["resourceVersion"])
        if kind == "BOOKMARK":
            return False
        name = str(meta.get("name"))
        self.events += 1
        if kind in ("ADDED", "MODIFIED"):
            self.slices[name] = obj
        elif kind == "DELETED":
            self.slices.pop(name, None)
        else:
            raise DiscoveryError(f"kubernetes watch: unknown event type {kind!r}")
        return True

    async def follow(self) -> None:
        """Keep a watch open from the last version: resume when it ends, list afresh when it is Gone."""
        pause = RETRY_FIRST
        while True:
            try:
                await self.watch_once()
                # Until the next watch is open nothing says the slices are current: fetch lists meanwhile.
                self.broken = "the watch ended; resuming"
                pause = RETRY_FIRST
                continue
            except Gone as exc:
                log.warning("kubernetes watch of %s: %s; listing afresh", self.spec.service, exc)
                self.version = ""
                self.broken = str(exc)
                try:
                    await self.list_slices()
                    if self.wake is not None:
                        self.wake()
                    self.broken = None
                    continue
                except DiscoveryError as list_exc:
                    self.broken = str(list_exc)
            except DiscoveryError as exc:
                self.broken = str(exc)
            log.warning("kubernetes watch of %s failed: %s", self.spec.service, self.broken)
            await asyncio.sleep(pause)
            pause = min(self.spec.interval, pause * 2)

    # -- the Source interface ----------------------------------------------------------------------------

    async def fetch(self) -> list[str]:
        """The base URLs of the Service's ready endpoints now.

        With a healthy watch this costs no request: the watch keeps ``slices`` current. The first call,
        and every call while the watch is down, lists (and raises :class:`DiscoveryError` if that fails).
        """
        spec = self.spec
        if not spec.watch or not self.listed or self.broken is not None:
            await self.list_slices()
        if spec.watch and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self.follow())
        pairs = slice_addresses(self.slices.values(), spec.port)
        return [f"{spec.scheme}://{_host_port(host, port)}{spec.path}" for host, port in pairs]

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.client.close()
