"""The live dashboard at ``/dashboard``: the fleet's health, per-provider charts and a feed of incidents.

Three parts, each with one job:

* :class:`FleetRecorder` turns the counters :class:`~skyfabric.gateway.genai_metrics.GenAIMetrics` keeps
  anyway into one chart point per provider per tick (differences; nothing more per request), and as an
  :class:`~skyfabric.gateway.observe.Observer` appends the rare events — failovers, continuations,
  hedges, ejections — to a bounded feed.
* :class:`DashboardHub` turns that into one JSON snapshot per tick — the tree providers → regions → pools
  → endpoints with health and the cause of each ejection, the newest chart point per provider, the feed
  items since the last tick — and broadcasts the *same bytes* to every open dashboard over server-sent
  events. The work per tick does not grow with the number of dashboards; the hub runs only while one is
  open.
* :class:`Dashboard` serves the page, its static assets (shipped in the package: no CDN, no internet),
  the event stream and a JSON snapshot (``skyfabric status`` reads it), with security headers and the
  fleet's API keys as the credential. A browser signs in once through a form that sets an ``HttpOnly``,
  ``SameSite=Strict`` cookie holding a digest of the key (never the key itself).

With several gateway workers (``--workers N``) the worker that ticks a dashboard asks the others for their
totals, health, feed and drill events each tick and shows the whole instance (``gateway/instance.py``).
A drill runner announces its phases at ``POST /dashboard/drill`` (``gateway/drill_log.py``); the page
draws that drill's timeline over the charts while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import orjson

from skyfabric.core.errors import ClientError
from skyfabric.gateway.drill_log import DrillLog, timeline
from skyfabric.gateway.genai_metrics import SECONDS_BUCKETS, GenAIMetrics
from skyfabric.gateway.observe import CONTINUATION, HEDGE, Observer
from skyfabric.http.messages import Request, Response, StreamResponse

if TYPE_CHECKING:
    from skyfabric.gateway.balancer import EndpointState
    from skyfabric.gateway.context import RequestContext
    from skyfabric.gateway.instance import WorkerPeers
    from skyfabric.gateway.proxy import Proxy

#: An endpoint's health words, least to most severe: the instance shows the worst any worker sees.
SEVERITY = {"up": 0, "cooling": 1, "probing": 2, "down": 3}
_SUMMED = ("outstanding", "streaming", "ejections", "successes", "failures")

#: Seconds of chart history a freshly opened dashboard receives.
HISTORY = 300
#: Feed items kept (and sent to a freshly opened dashboard).
FEED = 200

SECURITY_HEADERS: list[tuple[bytes, bytes]] = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]
_COOKIE = b"skyfabric_dashboard"
_ASSETS = {
    b"/dashboard/app.js": ("dashboard.js", b"text/javascript; charset=utf-8"),
    b"/dashboard/app.css": ("dashboard.css", b"text/css; charset=utf-8"),
}


def cookie_token(key: bytes) -> bytes:
    """What the sign-in cookie holds for an API key: a digest, so the cookie never carries the key."""
    return hashlib.sha256(b"skyfabric-dashboard\x00" + key).hexdigest().encode()


def bucket_quantile(counts: list[int], q: float) -> float | None:
    """The ``q`` quantile of a histogram's bucket counts, interpolated within its bucket (as Prometheus'
    ``histogram_quantile`` does); None when the histogram is empty."""
    total = sum(counts)
    if not total:
        return None
    rank, seen = q * total, 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            lower = SECONDS_BUCKETS[i - 1] if i > 0 else 0.0
            upper = SECONDS_BUCKETS[i] if i < len(SECONDS_BUCKETS) else SECONDS_BUCKETS[-1]
            return round(lower + (upper - lower) * (rank - seen) / count, 4)
        seen += count
    return SECONDS_BUCKETS[-1]


@dataclass(slots=True)
class _Totals:
    """One provider's cumulative counts, as last read from the metrics."""

    attempts: int = 0
    errors: int = 0
    tokens: int = 0
    ttft: list[int] = field(default_factory=lambda: [0] * (len(SECONDS_BUCKETS) + 1))


class FleetRecorder(Observer):
    """Per-provider chart points and the feed of incidents.

    The points are differences, tick to tick, of the counters :class:`GenAIMetrics` keeps anyway (so
    the dashboard adds nothing per request); the hooks here only see the rare events of the feed.
    """

    def __init__(self, proxy: Proxy, metrics: GenAIMetrics, *, wall: Callable[[], float] = time.time) -> None:
        self.proxy = proxy
        self.metrics = metrics
        self.wall = wall
        self.providers = sorted({s.endpoint.provider for s in proxy.states.values()})
        self._totals = self._read()
        self.series: dict[str, deque[list[Any]]] = {p: deque(maxlen=HISTORY) for p in self.providers}
        self.feed: deque[dict[str, Any]] = deque(maxlen=FEED)
        self.seq = 0
        #: Endpoint id → (why it was last ejected, when, wall clock).
        self.causes: dict[str, tuple[str, float]] = {}
        self._was_available = {i: True for i in proxy.states}
        self.cost_per_hour = {p: 0.0 for p in self.providers}
        for s in proxy.states.values():
            self.cost_per_hour[s.endpoint.provider] += s.endpoint.price_per_hour
        metrics.rare_attempts.append(self._rare_attempt)

    # -- the hooks --------------------------------------------------------------------------------------

    def _rare_attempt(self, ctx: RequestContext, state: EndpointState, kind: str) -> None:
        """A retry, hedge or continuation starting (told by the metrics: no hook call per first try)."""
        if kind == HEDGE:
            self._note("hedge", f"hedged on {state.endpoint.id}", state.endpoint.id, ctx.model)
        elif kind != CONTINUATION and ctx.attempts > 1:
            self._note(
                "failover",
                f"retry #{ctx.attempts - 1} before the first token → {state.endpoint.id}",
                state.endpoint.id,
                ctx.model,
            )

    def continued(
        self, ctx: RequestContext, failed: EndpointState, state: EndpointState, tokens: int
    ) -> None:
        self._note(
            "continuation",
            f"stream broke on {failed.endpoint.id} after {tokens} tokens → continued on {state.endpoint.id}",
            state.endpoint.id,
            ctx.model,
        )

    def ejected(self, state: EndpointState, reason: str) -> None:
        self.causes[state.endpoint.id] = (reason, self.wall())
        self._note("ejection", f"{state.endpoint.id} ejected: {reason}", state.endpoint.id, None)

    def _note(self, kind: str, text: str, endpoint: str | None, model: str | None) -> None:
        self.seq += 1
        self.feed.append(
            {
                "seq": self.seq,
                "t": self.wall(),
                "kind": kind,
                "text": text,
                "endpoint": endpoint,
                "model": model,
            }
        )

    # -- what the hub reads -----------------------------------------------------------------------------

    def _read(self) -> dict[str, _Totals]:
        """Every provider's cumulative attempts, failed attempts, output tokens and TTFT buckets now."""
        totals = {p: _Totals() for p in self.providers}
        metrics = self.metrics
        metrics.read_usage()
        attempts = metrics.attempt_counts()
        for state in self.proxy.states.values():
            counts = attempts.get(state.endpoint.id, {})
            t = totals[state.endpoint.provider]
            n = sum(counts.values())
            t.attempts += n
            t.errors += n - counts.get("ok", 0) - counts.get("continued", 0)
        for series in metrics.series.values():
            t = totals[series.labels[2]]
            t.tokens += series.output_tokens
            for i, count in enumerate(series.ttfc.counts):
                t.ttft[i] += count
        return totals

    def totals(self, peers: Sequence[dict[str, Any]] = ()) -> dict[str, _Totals]:
        """This worker's totals (:meth:`_read`) plus the peers' (their :meth:`peer_totals`)."""
        totals = self._read()
        for view in peers:
            for provider, (attempts, errors, tokens, ttft) in view.get("totals", {}).items():
                t = totals.get(provider)
                if t is None:
                    continue
                t.attempts += attempts
                t.errors += errors
                t.tokens += tokens
                t.ttft = [a + b for a, b in zip(t.ttft, ttft, strict=True)]
        return totals

    def peer_totals(self) -> dict[str, list[Any]]:
        """This worker's totals as a peer sends them."""
        return {p: [t.attempts, t.errors, t.tokens, t.ttft] for p, t in self._read().items()}

    def rebase(self, totals: dict[str, _Totals]) -> None:
        """Start the next chart point from ``totals`` (a dashboard opened after a quiet spell)."""
        self._totals = totals

    def roll(self, elapsed: float, totals: dict[str, _Totals] | None = None) -> dict[str, list[Any]]:
        """Close the last ``elapsed`` seconds into one chart point per provider.

        A point is ``[wall time, seconds, attempts, failed attempts, ttft p50, ttft p99, tokens]`` — counts,
        not rates, so that nothing is lost to rounding; the page divides. The TTFTs (client's time to first
        token of the streams whose first token this provider sent) are None when there was none.
        """
        now = self.wall()
        if totals is None:
            totals = self._read()
        points: dict[str, list[Any]] = {}
        for provider in self.providers:
            new, old = totals[provider], self._totals[provider]
            ttft = [a - b for a, b in zip(new.ttft, old.ttft, strict=True)]
            point = [
                round(now, 3),
                round(max(elapsed, 1e-3), 3),
                new.attempts - old.attempts,
                new.errors - old.errors,
                bucket_quantile(ttft, 0.5),
                bucket_quantile(ttft, 0.99),
                new.tokens - old.tokens,
            ]
            self.series[provider].append(point)
            points[provider] = point
        self._totals = totals
        return points

    def readmissions(self, now: float) -> None:
        """Note endpoints that came back into rotation since the last look (probes readmit them)."""
        for endpoint_id, state in self.proxy.states.items():
            up = state.available(now)
            if up and not self._was_available.get(endpoint_id, True):
                self._note("recovery", f"{endpoint_id} back in rotation", endpoint_id, None)
            self._was_available[endpoint_id] = up

    def topology(self, now: float) -> list[dict[str, Any]]:
        """Providers → regions → pools → endpoints, each endpoint with its health right now."""
        tree: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {}
        pools: dict[tuple[str, str, str], dict[str, Any]] = {}
        cooldowns = self.proxy.cooldowns
        for state in self.proxy.states.values():
            e = state.endpoint
            tree.setdefault(e.provider, {}).setdefault(e.region, {}).setdefault(e.pool, [])
            pools.setdefault(
                (e.provider, e.region, e.pool),
                {"accelerator": e.accelerator, "engine": e.engine, "model": e.model},
            )
            if state.available(now):
                health = "cooling" if cooldowns.get(e.provider, 0.0) > now else "up"
            else:
                health = "probing" if state.needs_probe and now >= state.ejected_until else "down"
            cause = self.causes.get(e.id)
            tree[e.provider][e.region][e.pool].append(
                {
                    "id": e.id,
                    "url": e.url,
                    "health": health,
                    "cause": cause[0] if cause and health != "up" else None,
                    "since": cause[1] if cause and health != "up" else None,
                    "back_in": round(max(0.0, state.ejected_until - now), 1) if health == "down" else None,
                    "outstanding": state.outstanding,
                    "streaming": state.streaming,
                    "ejections": state.ejections,
                    "successes": state.successes,
                    "failures": state.failures,
                }
            )
        out = []
        for provider, regions in tree.items():
            out.append(
                {
                    "name": provider,
                    "cost_per_hour": self.cost_per_hour.get(provider) or None,
                    "regions": [
                        {
                            "name": region,
                            "pools": [
                                {"name": pool, **pools[(provider, region, pool)], "endpoints": endpoints}
                                for pool, endpoints in region_pools.items()
                            ],
                        }
                        for region, region_pools in regions.items()
                    ],
                }
            )
        return out


def summarize(topology: list[dict[str, Any]]) -> dict[str, str]:
    """Each provider's health in one word: ``up``, ``degraded`` (some endpoints out) or ``down``."""
    out = {}
    for provider in topology:
        healths = [e["health"] for r in provider["regions"] for p in r["pools"] for e in p["endpoints"]]
        up = sum(1 for h in healths if h in ("up", "cooling"))
        out[provider["name"]] = "up" if up == len(healths) else ("down" if up == 0 else "degraded")
    return out


def merge_topology(own: list[dict[str, Any]], others: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The instance's tree from each worker's: an endpoint shows the worst health any worker sees (with
    that worker's cause), and its counters summed over the workers."""
    if not others:
        return own
    found: dict[str, list[dict[str, Any]]] = {}
    for tree in others:
        for provider in tree:
            for region in provider["regions"]:
                for pool in region["pools"]:
                    for e in pool["endpoints"]:
                        found.setdefault(e["id"], []).append(e)
    for provider in own:
        for region in provider["regions"]:
            for pool in region["pools"]:
                for e in pool["endpoints"]:
                    for other in found.get(e["id"], ()):
                        for name in _SUMMED:
                            e[name] += other[name]
                        if SEVERITY.get(other["health"], 0) > SEVERITY.get(e["health"], 0):
                            for name in ("health", "cause", "since", "back_in"):
                                e[name] = other[name]
    return own


class DashboardHub:
    """One snapshot per tick, broadcast as the same bytes to every subscriber."""

    def __init__(self, recorder: FleetRecorder, drills: DrillLog, interval: float = 1.0) -> None:
        self.recorder = recorder
        self.drills = drills
        self.interval = interval
        #: The instance's other workers, when there are (their figures join every tick).
        self.peers: WorkerPeers | None = None
        self.subscribers: set[asyncio.Queue[bytes]] = set()
        self._task: asyncio.Task[None] | None = None
        self._last = time.monotonic()
        #: Worker index → the newest feed item already sent (this worker's own is -1).
        self._sent: dict[int, int] = {}
        self.ticks = 0

    def peer_view(self) -> dict[str, Any]:
        """What this worker tells the worker that ticks a dashboard: totals, health, feed, drill events."""
        rec = self.recorder
        now = rec.proxy.clock()
        rec.readmissions(now)
        waiting = getattr(rec.proxy.admission, "waiting", None)
        return {
            "totals": rec.peer_totals(),
            "topology": rec.topology(now),
            "feed": list(rec.feed),
            "drill": list(self.drills.events),
            "queued": {name: waiting(name) for name in rec.proxy.clusters} if waiting else {},
        }

    async def _peers(self) -> list[tuple[int, dict[str, Any]]]:
        return await self.peers.gather("dashboard") if self.peers is not None else []

    def _feed(self, views: Sequence[tuple[int, dict[str, Any]]]) -> list[tuple[int, dict[str, Any]]]:
        """Every worker's feed items as (worker, item), oldest first (this worker's is -1)."""
        items = [(-1, item) for item in self.recorder.feed]
        for worker, view in views:
            items.extend((worker, item) for item in view.get("feed", ()))
        items.sort(key=lambda pair: pair[1]["t"])
        return items

    @staticmethod
    def _keyed(worker: int, item: dict[str, Any]) -> dict[str, Any]:
        # Each worker numbers its own feed: the page tells items apart by worker and number together.
        return item if worker < 0 else {**item, "seq": f"{worker}.{item['seq']}"}

    def snapshot(self, *, history: bool, views: Sequence[tuple[int, dict[str, Any]]] = ()) -> dict[str, Any]:
        """The whole picture now (``views``: the peers' :meth:`peer_view`); with ``history``, every
        stored chart point and feed item."""
        rec = self.recorder
        now = rec.proxy.clock()
        rec.readmissions(now)
        topology = merge_topology(rec.topology(now), [v["topology"] for _, v in views])
        waiting = getattr(rec.proxy.admission, "waiting", None)
        queued = {name: waiting(name) for name in rec.proxy.clusters} if waiting else {}
        for _, view in views:
            for name, n in view.get("queued", {}).items():
                queued[name] = queued.get(name, 0) + n
        events = list(self.drills.events)
        for _, view in views:
            events.extend(view.get("drill", ()))
        out: dict[str, Any] = {
            "time": rec.wall(),
            "interval": self.interval,
            "topology": topology,
            "summary": summarize(topology),
            "queued": queued,
            "drill": timeline(events),
            "workers": 1 + len(views),
        }
        if history:
            out["series"] = {p: list(points) for p, points in rec.series.items()}
            out["feed"] = [self._keyed(w, item) for w, item in self._feed(views)][-FEED:]
        return out

    async def history(self) -> dict[str, Any]:
        """The snapshot a freshly opened dashboard (or ``skyfabric status``) gets."""
        return self.snapshot(history=True, views=await self._peers())

    async def tick(self) -> bytes:
        """Roll the instance's second and encode the event every subscriber receives."""
        views = await self._peers()
        now = time.monotonic()
        points = self.recorder.roll(now - self._last, self.recorder.totals([v for _, v in views]))
        self._last = now
        data = self.snapshot(history=False, views=views)
        data["points"] = points
        fresh = []
        for worker, item in self._feed(views):
            if item["seq"] > self._sent.get(worker, 0):
                fresh.append(self._keyed(worker, item))
                self._sent[worker] = item["seq"]
        data["feed"] = fresh
        self.ticks += 1
        return b"event: tick\ndata: " + orjson.dumps(data) + b"\n\n"

    async def _start(self) -> None:
        """The first subscriber: charts start from now, the feed from what it was sent in its hello."""
        views = await self._peers()
        self.recorder.rebase(self.recorder.totals([v for _, v in views]))
        self._last = time.monotonic()
        self._sent = {-1: self.recorder.seq}
        for worker, view in views:
            feed = view.get("feed") or [{"seq": 0}]
            self._sent[worker] = feed[-1]["seq"]

    async def run(self) -> None:
        """Tick while anyone watches; the charts keep accruing between ticks through the recorder."""
        try:
            await self._start()
            while self.subscribers:
                await asyncio.sleep(self.interval)
                event = await self.tick()
                for queue in self.subscribers:
                    if queue.qsize() < 8:  # a dashboard that stopped reading loses ticks, not memory
                        queue.put_nowait(event)
        finally:
            self._task = None

    async def subscribe(self) -> AsyncIterator[bytes]:
        """The event stream of one dashboard: the history first, then a tick each interval."""
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.subscribers.add(queue)
        if self._task is None:  # set before any await: two dashboards opening at once start one ticker
            self._task = asyncio.get_running_loop().create_task(self.run())
        try:
            hello = await self.history()
            yield b"retry: 1000\nevent: hello\ndata: " + orjson.dumps(hello) + b"\n\n"
            while True:
                try:
                    yield await asyncio.wait_for(queue.get(), 15.0)
                except TimeoutError:
                    yield b": keep-alive\n\n"
        finally:
            self.subscribers.discard(queue)

    async def close(self) -> None:
        """Stop ticking (the gateway is shutting down)."""
        self.subscribers.clear()
        task = self._task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class Dashboard:
    """The routes under ``/dashboard``; authenticated by the fleet's API keys (none: open)."""

    def __init__(
        self,
        proxy: Proxy,
        metrics: GenAIMetrics,
        keys: set[bytes],
        *,
        interval: float = 1.0,
        admin: bytes | None = None,
    ) -> None:
        self.recorder = FleetRecorder(proxy, metrics)
        self.drills = DrillLog()
        self.hub = DashboardHub(self.recorder, self.drills, interval)
        self.keys = keys
        self.tokens = {cookie_token(k) for k in keys}
        #: Who may announce a drill: the admin credential when the gateway has one, else whoever may
        #: open the dashboard (a fleet file's keys; nobody needs one on a fleet without keys).
        self.writers = {admin} if admin is not None else keys
        self._files: dict[str, bytes] = {}

    def join_workers(self, peers: WorkerPeers) -> None:
        """Show the whole instance: tick with the other workers' figures, and answer theirs."""
        self.hub.peers = peers
        peers.providers["dashboard"] = self.hub.peer_view

    def _asset(self, name: str) -> bytes:
        data = self._files.get(name)
        if data is None:
            data = self._files[name] = (
                resources.files("skyfabric.gateway").joinpath("static", name).read_bytes()
            )
        return data

    def _authorized(self, request: Request) -> bool:
        if not self.keys:
            return True
        value = request.header(b"authorization")
        if value and value[:7].lower() == b"bearer " and value[7:].strip() in self.keys:
            return True
        cookies = request.header(b"cookie") or b""
        for part in cookies.split(b";"):
            name, _, token = part.strip().partition(b"=")
            if name == _COOKIE and token in self.tokens:
                return True
        return False

    def _page(
        self, status: int, body: bytes, content_type: bytes, extra: list[tuple[bytes, bytes]] | None = None
    ) -> Response:
        return Response(status, body, [*SECURITY_HEADERS, *(extra or [])], content_type=content_type)

    async def handle(self, request: Request) -> Response | StreamResponse:
        """Serve one request whose path starts with ``/dashboard``."""
        path, method = request.path, request.method
        if path in _ASSETS and method == b"GET":
            name, content_type = _ASSETS[path]
            return self._page(200, self._asset(name), content_type)
        if path == b"/dashboard/login":
            if method != b"POST":
                return self._page(405, b"method not allowed", b"text/plain")
            form = parse_qs(request.body.decode("utf-8", "replace"))
            key = (form.get("key") or [""])[0].strip().encode()
            if key not in self.keys:
                return self._page(401, self._login(failed=True), b"text/html; charset=utf-8")
            cookie = _COOKIE + b"=" + cookie_token(key) + b"; Path=/dashboard; HttpOnly; SameSite=Strict"
            return self._page(
                303, b"", b"text/plain", [(b"location", b"/dashboard"), (b"set-cookie", cookie)]
            )
        if path == b"/dashboard/drill":
            return self._drill_event(request)
        if method != b"GET":
            return self._page(405, b"method not allowed", b"text/plain")
        if not self._authorized(request):
            if path == b"/dashboard":
                return self._page(401, self._login(failed=False), b"text/html; charset=utf-8")
            return self._page(
                401,
                b'{"error":"sign in at /dashboard or send Authorization: Bearer <key>"}',
                b"application/json",
            )
        if path == b"/dashboard":
            return self._page(200, self._asset("dashboard.html"), b"text/html; charset=utf-8")
        if path == b"/dashboard/events":
            return StreamResponse(200, self.hub.subscribe(), list(SECURITY_HEADERS))
        if path == b"/dashboard/state":
            return self._page(200, orjson.dumps(await self.hub.history()), b"application/json")
        return self._page(404, b"no such page", b"text/plain")

    def _drill_event(self, request: Request) -> Response:
        """``POST /dashboard/drill``: a drill runner's phase (bearer credential only: no cookie, so a
        page cannot be made to post one)."""
        if request.method != b"POST":
            return self._page(405, b"method not allowed", b"text/plain", [(b"allow", b"POST")])
        if self.writers:
            value = request.header(b"authorization") or b""
            if value[:7].lower() != b"bearer " or value[7:].strip() not in self.writers:
                body = b'{"error":"announcing a drill needs the admin credential (Authorization: Bearer)"}'
                return self._page(401, body, b"application/json")
        try:
            event = self.drills.record(request.body)
        except ClientError as exc:
            return self._page(400, orjson.dumps({"error": str(exc)}), b"application/json")
        return self._page(202, orjson.dumps(event), b"application/json")

    def _login(self, *, failed: bool) -> bytes:
        page = self._asset("login.html")
        message = b'<p class="error">That key is not valid.</p>' if failed else b""
        return page.replace(b"<!--message-->", message)
