"""The simulator: the gateway's own router in front of simulated batching replicas, on a virtual clock.

What runs unchanged: ``gateway.proxy.Proxy.forward`` — admission control (``admission.py``), the
least-loaded, failure-domain-aware pick (``balancer.Cluster.pick``), outlier detection and domain
ejection (``record_failure``, ``correlated_domain``), the retry budget and jittered backoff
(``retry.py``), slow start after readmission — and ``gateway.health.HealthChecker``: half-open probes,
vLLM load signals, the stall watchdog. Only the transport is simulated: :class:`SimTransport` stands in
for ``http.client.HTTPClient`` (same ``request`` signature), and each endpoint is a :class:`Replica`.

The replica model (a batching server, like vLLM's continuous batching): ``slots`` sequences decode at
once; more wait in its queue (reported as ``vllm:num_requests_waiting``). A request admitted while
``running`` sequences are in the batch sees

    TTFT  = ttft0 · (0.5 + 0.5 · running / slots)
    TPOT  = tpot_full · (0.5 + 0.5 · running / slots),   tpot_full = (slots / rps − ttft0) / mean_out

so that a saturated replica completes its profile's requests/s for this workload's mean output length.
(Load is read when the request starts; later arrivals do not slow it down — a stated simplification.)

Granularity: at fleet scale one simulated request stands for ``k`` client requests of the same size
(``granularity``); replica slots, admission's queue limit and the retry budget's floor are divided by
``k`` so every ratio the policies act on is unchanged. ``k = 1`` simulates every request.

A share of the requests (``stream_share``) is streamed: those go through the gateway's own stream relay
— commit at the first token, the stall watchdog, mid-stream continuation on another endpoint when theirs
is lost — against a replica that writes vLLM's SSE stream at the times its tokens are made
(``sim/streams.py``); the client checks it got every token once, in order. The others are sent
non-streaming. A ``refused`` loss resets what is in flight there; a ``blackhole`` freezes it (and new
connections hang until the connect timeout) until the gateway gives up on it — its response or idle
timeout, the stall watchdog, or the health loop finding the endpoint dead and aborting its connections —
and the router retries it from scratch (a stream past its first token: continues it elsewhere).
TTFT is from the client's arrival: for a stream, to its first content at the client (through the relay);
for a plain answer, to the first token at the replica, on the attempt that answered. "Queueing" is the
time from arrival to the first attempt a live replica accepted (admission, backoff, dead attempts).
"""

from __future__ import annotations

import asyncio
import bisect
import csv
import math
import random
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from skyfabric.control.plan import Plan, load_profiles, retry_budget_percent, service_name
from skyfabric.core.endpoints import fleet_endpoints
from skyfabric.core.errors import ConnectError, Overloaded, RemoteProtocolError, UpstreamTimeout
from skyfabric.core.fleet import Fleet, parse_fleet
from skyfabric.gateway.context import RequestContext
from skyfabric.gateway.health import HealthChecker
from skyfabric.gateway.proxy import Proxy
from skyfabric.protocols.canonical import CanonicalRequest
from skyfabric.protocols.frontends.openai import OpenAIFrontend
from skyfabric.sim.clock import VirtualClockLoop
from skyfabric.sim.host import Host, HostSpec, SteppedReplica
from skyfabric.sim.streams import CHUNK_TOKENS, SimStream, continuation_of, read_client_chunk, token_text

# ------------------------------------------------------------------------------------------ the replicas


@dataclass(slots=True)
class _Job:
    req: SimRequest
    future: asyncio.Future[None]
    handles: list[asyncio.TimerHandle] = field(default_factory=list)
    stream: SimStream | None = None


@dataclass(slots=True)
class SimRequest:
    arrival: float
    prompt_tokens: int
    output_tokens: int
    first_token: float | None = None
    started: float | None = None  # first attempt sent (after admission)
    done: float | None = None
    status: int = 0
    attempts: int = 0
    stream: bool = False
    client_first: float | None = None  # a stream's first content at the client, through the relay
    continued: int = 0  # times its stream moved to another endpoint mid-answer


class Replica:
    """One endpoint: a continuous-batching server with ``slots`` sequences and a waiting queue."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, slots: int, rps: float, ttft0: float, mean_out: float
    ):
        self.loop = loop
        self.slots = max(1, slots)
        self.ttft0 = ttft0
        self.tpot_full = max(1e-4, (self.slots / rps - ttft0) / max(1.0, mean_out))
        self.running: list[_Job] = []
        self.waiting: list[_Job] = []
        self.up = True

    def submit(self, req: SimRequest, stream: SimStream | None = None) -> asyncio.Future[None]:
        job = _Job(req, self.loop.create_future(), stream=stream)
        if len(self.running) < self.slots:
            self._start(job)
        else:
            self.waiting.append(job)
        return job.future

    def _start(self, job: _Job) -> None:
        now = self.loop.time()
        load = 0.5 + 0.5 * len(self.running) / self.slots
        self.running.append(job)
        ttft = self.ttft0 * load
        tpot = self.tpot_full * load
        stream = job.stream
        tokens = job.req.output_tokens if stream is None else stream.tokens
        total = ttft + tokens * tpot
        job.handles = [
            self.loop.call_at(now + ttft, self._first_token, job),
            self.loop.call_at(now + total, self._finish, job),
        ]
        if stream is not None:
            # the first token alone at the TTFT, then a chunk every CHUNK_TOKENS tokens
            marks = [1, *range(1 + CHUNK_TOKENS, tokens, CHUNK_TOKENS)]
            job.handles += [self.loop.call_at(now + ttft + (m - 1) * tpot, stream.emit, m) for m in marks]

    def _first_token(self, job: _Job) -> None:
        job.req.first_token = self.loop.time()

    def _finish(self, job: _Job) -> None:
        self.running.remove(job)
        if job.stream is not None:
            job.stream.finish()
        if not job.future.done():
            job.future.set_result(None)
        while self.waiting and len(self.running) < self.slots:
            nxt = self.waiting.pop(0)
            if not nxt.future.done():
                self._start(nxt)

    def abandon(self, future: asyncio.Future[None]) -> None:
        """The caller gave up (a timeout): free its slot or its place in the queue."""
        for jobs in (self.running, self.waiting):
            for job in jobs:
                if job.future is future:
                    for h in job.handles:
                        h.cancel()
                    jobs.remove(job)
                    if jobs is self.running and self.up:  # a frozen host starts nothing new
                        job.handles = []
                        self._finish_slot()
                    return

    def _finish_slot(self) -> None:
        while self.waiting and len(self.running) < self.slots:
            self._start(self.waiting.pop(0))

    def freeze(self) -> None:
        """A blackhole: nothing in flight progresses and nothing new is answered; connections stay open."""
        for job in self.running:
            for h in job.handles:
                h.cancel()
            job.handles = []

    def fail(self, future: asyncio.Future[None], endpoint: str, why: str) -> None:
        """One connection is dropped (the gateway aborted it): its waiter gets a connection error."""
        for jobs in (self.running, self.waiting):
            for job in jobs:
                if job.future is future:
                    for h in job.handles:
                        h.cancel()
                    jobs.remove(job)
                    if not future.done():
                        future.set_exception(RemoteProtocolError(why, endpoint=endpoint))
                    if jobs is self.running and self.up:
                        self._finish_slot()
                    return

    def fail_all(self, endpoint: str) -> None:
        """The host is gone: every connection to it is reset."""
        for job in [*self.running, *self.waiting]:
            for h in job.handles:
                h.cancel()
            if job.stream is not None:
                job.stream.reset("connection reset by peer")
            if not job.future.done():
                job.future.set_exception(RemoteProtocolError("connection reset by peer", endpoint=endpoint))
        self.running.clear()
        self.waiting.clear()


#: An endpoint's server: an accelerator of its own, or a replica sharing a host's cores (``sim/host.py``).
AnyReplica = Replica | SteppedReplica


class _SimResponse:
    """What ``HTTPClient.request`` returns, as far as the proxy and the health checker read it."""

    __slots__ = ("body", "endpoint", "headers", "status")

    def __init__(self, status: int, body: bytes, endpoint: str) -> None:
        self.status = status
        self.body = body
        self.headers: list[tuple[bytes, bytes]] = []
        self.endpoint = endpoint

    def header(self, name: bytes) -> bytes | None:
        return None

    async def read(self, timeout: float) -> bytes:
        return self.body


class _SimConnection:
    """An open request as the gateway's ``EndpointState.inflight`` holds it: ``abort()`` drops it."""

    __slots__ = ("endpoint", "future", "replica")

    #: Never waiting on the endpoint mid-stream (it is not a stream): the stall watchdog's cue.
    awaited = False

    def __init__(self, replica: AnyReplica, future: asyncio.Future[None], endpoint: str) -> None:
        self.replica = replica
        self.future = future
        self.endpoint = endpoint

    def abort(self) -> None:
        self.replica.fail(self.future, self.endpoint, "aborted by the gateway (endpoint found dead)")


class SimTransport:
    """Stands in for ``HTTPClient``: routes by endpoint id to a :class:`Replica`, honours the timeouts."""

    def __init__(self, loop: asyncio.AbstractEventLoop, replicas: dict[str, AnyReplica], mode: str) -> None:
        self.loop = loop
        self.replicas = replicas
        self.mode = mode  # how a lost provider fails: "refused" (fast) or "blackhole" (connect timeout)
        self.current: dict[int, SimRequest] = {}

    async def request(
        self,
        origin: tuple[str, str, int],
        method: bytes,
        path: bytes,
        headers: Any,
        body: bytes,
        *,
        connect_timeout: float,
        first_byte_timeout: float,
        endpoint: str = "",
        tracker: set[Any] | None = None,
        **options: Any,  # the real client's other keywords (e.g. resend policy): nothing to do here
    ) -> _SimResponse | SimStream:
        replica = self.replicas[endpoint]
        if not replica.up:
            if self.mode == "blackhole":
                await asyncio.sleep(connect_timeout)
                raise UpstreamTimeout("connect", connect_timeout, endpoint=endpoint)
            await asyncio.sleep(0.002)
            raise ConnectError("connection refused", endpoint=endpoint)
        if method == b"GET":
            if path.endswith(b"/metrics"):
                text = b"vllm:num_requests_running %d\nvllm:num_requests_waiting %d\n" % (
                    len(replica.running),
                    len(replica.waiting),
                )
                return _SimResponse(200, text, endpoint)
            return _SimResponse(200, b'{"object":"list","data":[]}', endpoint)
        if body[:1] == b"{":  # a streamed request (JSON, as the backend built it)
            return self._stream(replica, body, endpoint, tracker)
        req = self.current[int(body)]
        req.attempts += 1
        if req.started is None:
            req.started = self.loop.time()
        req.first_token = None
        future = replica.submit(req)
        conn = _SimConnection(replica, future, endpoint)
        if tracker is not None:
            tracker.add(conn)  # what the gateway aborts when it finds the endpoint dead (after_ejection)
        try:
            await asyncio.wait_for(asyncio.shield(future), first_byte_timeout)
        except TimeoutError:
            replica.abandon(future)
            raise UpstreamTimeout("response", first_byte_timeout, endpoint=endpoint) from None
        finally:
            if tracker is not None:
                tracker.discard(conn)
        return _SimResponse(200, b"{}", endpoint)

    def _stream(self, replica: AnyReplica, body: bytes, endpoint: str, tracker: set[Any] | None) -> SimStream:
        """Start a streamed answer; it is returned at once, as vLLM sends its headers before any token."""
        req = CURRENT.get()
        req.attempts += 1
        if req.started is None:
            req.started = self.loop.time()
        req.first_token = None
        start, tokens = continuation_of(orjson.loads(body), req.output_tokens)
        holder: list[asyncio.Future[None]] = []
        stream = SimStream(
            self.loop, endpoint, start, tokens, req.prompt_tokens, lambda: replica.abandon(holder[0]), tracker
        )
        holder.append(replica.submit(req, stream))
        holder[0].add_done_callback(_retrieve)
        if tracker is not None:
            tracker.add(stream)  # what the gateway aborts when it finds the endpoint dead
        return stream


def _retrieve(future: asyncio.Future[None]) -> None:
    """A stream's completion future is read by nobody (the stream carries the outcome): mark it seen."""
    if not future.cancelled():
        future.exception()


#: The simulated request the current client task is sending (a streamed body does not name it).
CURRENT: ContextVar[SimRequest] = ContextVar("skyfabric_sim_request")


# ------------------------------------------------------------------------------------------ the workload


@dataclass(frozen=True, slots=True)
class Workload:
    """Client requests: a rate (req/s, before granularity) shaped over time, with sizes from a sample."""

    rate: float
    sizes: list[tuple[int, int]]  # (prompt tokens, output tokens)
    shape: list[float] = field(default_factory=lambda: [1.0])  # relative rate per shape_period seconds
    shape_period: float = 60.0
    #: Exact arrivals instead of a Poisson process at ``rate``: (time, prompt tokens, output tokens,
    #: streamed), e.g. a drill's own request log, for a like-for-like comparison at small scale.
    arrivals: list[tuple[float, int, int, bool]] | None = None

    @property
    def mean_output(self) -> float:
        return sum(o for _, o in self.sizes) / len(self.sizes)

    def rate_at(self, t: float) -> float:
        return self.rate * self.shape[int(t // self.shape_period) % len(self.shape)]


def trace_workload(path: Path, rate: float | None, peak: float | None = None) -> Workload:
    """Sizes and the per-minute rate shape of an Azure-style trace.

    ``rate`` rescales its mean rate; or ``peak`` rescales it so that its busiest minute is ``peak`` req/s
    (a plan's peak demand). Neither: the trace's own rate.
    """
    stamps: list[float] = []
    sizes: list[tuple[int, int]] = []
    from datetime import datetime

    with open(path, newline="") as handle:
        t0 = None
        for row in csv.DictReader(handle):
            t = datetime.fromisoformat(row["TIMESTAMP"].strip()[:26]).timestamp()
            t0 = t if t0 is None else t0
            stamps.append(t - t0)
            sizes.append((int(row["ContextTokens"]), max(1, int(row["GeneratedTokens"]))))
    minutes = int(stamps[-1] // 60) + 1
    counts = [0] * minutes
    for s in stamps:
        counts[int(s // 60)] += 1
    mean = sum(counts) / minutes
    shape = [c / mean for c in counts]
    if rate is None and peak is not None:
        rate = peak / max(shape)
    return Workload(rate if rate is not None else mean / 60.0, sizes, shape, 60.0)


# ------------------------------------------------------------------------------------------ the fleet


def sim_fleet(
    plan: Plan, model: str, granularity: int, overrides: dict[str, Any] | None = None, group: int = 1
) -> Fleet:
    """A fleet file with one endpoint per ``group`` planned replicas.

    ``group = 1``: the gateway sees every replica (as with per-replica discovery). ``group > 1``: each
    endpoint is a service load balancer in front of ``group`` replicas — what ``skyfabric plan`` writes
    (one URL per pool) and what the gateway's O(endpoints) pick can afford at thousands of replicas.
    """
    providers: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for offer, count in zip(plan.offers, plan.replicas, strict=True):
        if count <= 0:
            continue
        name = service_name(offer)
        providers.setdefault(offer.provider, {}).setdefault(offer.region, []).append(
            {
                "name": offer.pool,
                "accelerator": offer.accelerator,
                "engine": offer.engine,
                "model": model,
                "endpoints": [
                    f"http://{name}-{i}.sim.invalid:8000/v1" for i in range(math.ceil(count / group))
                ],
                "price_per_hour": offer.price_per_hour * min(group, count),
                # the last group of a pool may hold fewer replicas; the gateway's knob is per pool
                "capacity": {
                    "concurrency": max(1, round(offer.concurrency * min(group, count) / granularity))
                },
            }
        )
    data: dict[str, Any] = {
        "version": 1,
        "models": [{"name": model}],
        "providers": [
            {"name": p, "regions": [{"name": r, "pools": pools} for r, pools in regions.items()]}
            for p, regions in providers.items()
        ],
        "retry": {"budget_percent": retry_budget_percent(plan)},  # as `skyfabric plan` writes it
    }
    for key, value in (overrides or {}).items():
        data[key] = value
    return parse_fleet(data, "<simulated fleet>")


# ------------------------------------------------------------------------------------------ the run


@dataclass(slots=True)
class Loss:
    """A failure domain lost for a window: a provider (``aws``) or one region of it (``aws/us-east-1``)."""

    provider: str
    at: float
    duration: float
    mode: str = "refused"


@dataclass(slots=True)
class Phase:
    name: str
    requests: int = 0
    ok: int = 0
    errors: int = 0
    shed: int = 0
    retries: int = 0
    ttft: list[float] = field(default_factory=list)
    queueing: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    #: streamed requests: how many, how many moved endpoint mid-answer, how many reached the client
    #: broken (an in-band error, or an answer with a token lost or repeated), TTFT at the client
    streams: int = 0
    continued: int = 0
    broken: int = 0
    stream_ttft: list[float] = field(default_factory=list)


@dataclass(slots=True)
class Result:
    phases: list[Phase]
    simulated_seconds: float
    wall_seconds: float
    events: int
    granularity: int
    endpoints: int
    capacity_rps: float
    leftovers: dict[str, float]
    held: bool = False
    verdict: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


async def _run(
    plan: Plan,
    model: str,
    workload: Workload,
    duration: float,
    loss: Loss | None,
    granularity: int,
    seed: int,
    fleet_overrides: dict[str, Any] | None,
    progress: Callable[[float], None] | None,
    group: int,
    ttft0: float | None,
    stream_share: float,
    hosts: dict[str, HostSpec] | None,
) -> Result:
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    random.seed(seed)  # the balancer's tie-break and the backoff jitter use the module's generator
    profiles = load_profiles()
    fleet = sim_fleet(plan, model, granularity, fleet_overrides, group)
    endpoints = fleet_endpoints(fleet)
    proxy = Proxy(fleet, endpoints, clock=loop.time)
    proxy.admission.queue_limit = max(1, fleet.admission.queue_limit // granularity)
    proxy.budget.min_concurrent = max(1, fleet.retry.min_retry_concurrency // granularity)
    replicas: dict[str, AnyReplica] = {}
    machines: dict[str, Host] = {}  # hosts by name: pools placed on one name share its cores
    offer_of = {
        (o.provider, o.region, o.pool): (o, x)
        for o, x in zip(plan.offers, plan.replicas, strict=True)
        if x > 0
    }
    capacity = 0.0
    for e in endpoints:
        offer, count = offer_of[(e.provider, e.region, e.pool)]
        members = min(group, count - e.index * group)  # replicas behind this endpoint
        profile = profiles.get(offer.accelerator)
        rps = (
            offer.throughput
            if plan.requirements.unit == "requests"
            else offer.throughput / workload.mean_output
        )
        rps *= members
        capacity += rps
        first = ttft0 if ttft0 is not None else (profile.ttft_seconds if profile else 1.0)
        slots = max(1, round(offer.concurrency * members / granularity))
        spec = (hosts or {}).get(e.pool)
        if spec is not None:
            host = machines.get(spec.name)
            if host is None:
                host = machines[spec.name] = Host(spec.name, spec.cores, spec.background)
                for at, value in spec.background_at:
                    loop.call_at(at, setattr, host, "background", value)
            replicas[e.id] = SteppedReplica(loop, host, spec.profile, min(slots, spec.profile.slots))
        else:
            replicas[e.id] = Replica(loop, slots, rps / granularity, first, workload.mean_output)
    transport = SimTransport(loop, replicas, loss.mode if loss else "refused")
    proxy.client = transport  # type: ignore[assignment]
    health = HealthChecker(proxy)
    health_task = loop.create_task(health.run())

    bounds = [0.0, duration] if loss is None else [0.0, loss.at, loss.at + loss.duration, duration]
    names = ["all"] if loss is None else ["before", "during", "after"]
    phases = [Phase(n) for n in names]
    pending: set[asyncio.Task[None]] = set()
    counter = 0

    openai = OpenAIFrontend()

    async def client(req: SimRequest, ident: int) -> None:
        transport.current[ident] = req
        CURRENT.set(req)  # this task's own context: the transport finds a streamed request by it
        if req.stream:
            raw = orjson.dumps(
                {
                    "model": model,
                    "messages": [{"role": "user", "content": "…"}],
                    "stream": True,
                    "max_tokens": req.output_tokens,
                }
            )
            request = openai.parse(b"/v1/chat/completions", raw, [])
            body = request.body
        else:
            raw = str(ident).encode()  # the transport knows the request by it
            body = {"model": model}
            request = CanonicalRequest(protocol="openai.chat", model=model, body=body, raw=raw)
        deadline = req.arrival + fleet.timeouts.total
        ctx = RequestContext("chat", body, raw, model, req.stream, deadline, request, openai)
        broken = False
        try:
            response = await proxy.forward(ctx)
            req.status = response.status
            if not isinstance(response.body, bytes):  # a stream (the relay's), not an error answer
                texts: list[str] = []
                async for piece in response.body:
                    if read_client_chunk(piece, texts):
                        broken = True
                    if req.client_first is None and texts:
                        req.client_first = loop.time()
                # the whole answer, each token once and in order, or the client got a broken one
                broken = broken or "".join(texts) != token_text(0, req.output_tokens)
                req.continued = ctx.rescued
        except Overloaded:
            req.status = 429
        finally:
            del transport.current[ident]
        req.done = loop.time()
        # a request counts in the phase in which its outcome reached the client
        # (+1 µs: the virtual clock reaches a timer's time within the loop's clock resolution, not exactly)
        phase = phases[min(len(phases) - 1, max(0, bisect.bisect_right(bounds, req.done + 1e-6) - 1))]
        phase.requests += 1
        phase.retries += max(0, req.attempts - 1 - req.continued)
        if req.stream:
            phase.streams += 1
            phase.continued += req.continued > 0
            if req.status == 200 and broken:
                phase.broken += 1
                req.status = 502  # what the client holds is not the answer
            elif req.client_first is not None:
                phase.stream_ttft.append(req.client_first - req.arrival)
        if req.status == 200:
            phase.ok += 1
            # a stream's TTFT is the client's, through the relay; a plain answer's, at the replica
            first = req.client_first if req.stream else req.first_token
            if first is not None:
                phase.ttft.append(first - req.arrival)
            phase.latency.append(req.done - req.arrival)
        elif req.status == 429:
            phase.shed += 1
        else:
            phase.errors += 1
        if req.started is not None:
            phase.queueing.append(req.started - req.arrival)

    def lose(domain: str, up: bool) -> None:
        blackhole = loss is not None and loss.mode == "blackhole"
        for e in endpoints:
            if domain in (e.provider, f"{e.provider}/{e.region}"):
                replica = replicas[e.id]
                if not up and blackhole:
                    replica.up = False
                    replica.freeze()  # in flight: silence until the gateway gives up or aborts them
                elif not up:
                    replica.up = False
                    replica.fail_all(e.id)  # refused: open connections are reset
                else:
                    if blackhole:
                        replica.fail_all(e.id)  # the partition heals: frozen connections are closed
                    replica.up = True

    if loss is not None:
        loop.call_at(loss.at, lose, loss.provider, False)
        loop.call_at(loss.at + loss.duration, lose, loss.provider, True)

    started = time.perf_counter()
    t = 0.0
    next_report = 60.0
    for at, prompt, out, streamed in workload.arrivals or ():
        if at >= duration:
            break
        if at > loop.time():
            await asyncio.sleep(at - loop.time())
        counter += 1
        task = loop.create_task(client(SimRequest(at, prompt, out, stream=streamed), counter))
        pending.add(task)
        task.add_done_callback(pending.discard)
    while workload.arrivals is None:
        rate = workload.rate_at(t) / granularity
        t += rng.expovariate(rate)
        if t >= duration:
            break
        if t > loop.time():
            await asyncio.sleep(t - loop.time())
        prompt, out = workload.sizes[rng.randrange(len(workload.sizes))]
        counter += 1
        streamed = stream_share > 0 and rng.random() < stream_share
        task = loop.create_task(client(SimRequest(t, prompt, out, stream=streamed), counter))
        pending.add(task)
        task.add_done_callback(pending.discard)
        if progress is not None and t >= next_report:
            next_report += 60.0
            progress(t)
    while pending:
        await asyncio.wait(set(pending))
    health_task.cancel()
    try:
        await health_task
    except asyncio.CancelledError:
        pass
    stop_probes = getattr(health, "stop_probes", None)  # probes that run as tasks of their own
    if stop_probes is not None:
        await stop_probes()
    wall = time.perf_counter() - started
    leftovers = {
        "outstanding": float(sum(s.outstanding for s in proxy.states.values())),
        "admission_inflight": float(sum(g.inflight for g in proxy.admission.gates.values())),
        "admission_waiting": float(proxy.admission.waiting(model)),
        "retry_budget_active_requests": float(proxy.budget.active_requests),
        "retry_budget_active_retries": float(proxy.budget.active_retries),
        "replica_running": float(sum(len(r.running) + len(r.waiting) for r in replicas.values())),
    }
    return Result(
        phases,
        loop.time(),
        wall,
        counter,
        granularity,
        sum(x for x in plan.replicas if x > 0),
        capacity,
        leftovers,
        extra={
            "gateway_endpoints": len(endpoints),
            "retry_budget_refused": proxy.budget.refused,
            "shed_by_admission": proxy.admission.shed,
        },
    )


def simulate(
    plan: Plan,
    model: str,
    workload: Workload,
    duration: float,
    loss: Loss | None = None,
    *,
    granularity: int = 1,
    group: int = 1,
    ttft0: float | None = None,
    stream_share: float = 0.0,
    seed: int = 0,
    fleet_overrides: dict[str, Any] | None = None,
    hosts: dict[str, HostSpec] | None = None,
    slo_ttft_p99: float = 5.0,
    max_error_rate: float = 0.01,
    progress: Callable[[float], None] | None = None,
) -> Result:
    """Run one simulation on a fresh virtual-clock loop; judge whether the plan held.

    ``hosts`` places pools (by name) on shared machines: their replicas are stepped embedded-engine
    batchers sharing the host's cores (``sim/host.py``); every other pool is independent accelerators.
    """
    loop = VirtualClockLoop()
    try:
        result = loop.run_until_complete(
            _run(
                plan,
                model,
                workload,
                duration,
                loss,
                granularity,
                seed,
                fleet_overrides,
                progress,
                group,
                ttft0,
                stream_share,
                hosts,
            )
        )
    finally:
        loop.close()
    failing = []
    for phase in result.phases:
        bad = phase.errors + phase.shed
        if phase.requests and bad / phase.requests > max_error_rate:
            failing.append(f"{phase.name}: {bad / phase.requests:.2%} of requests failed or shed")
        p99 = _pct(phase.ttft, 0.99)
        if phase.ttft and p99 > slo_ttft_p99:
            failing.append(f"{phase.name}: TTFT p99 {p99:.2f}s > {slo_ttft_p99:.2f}s")
    result.held = not failing
    result.verdict = (
        f"the plan held (errors+shed ≤ {max_error_rate:.0%}, TTFT p99 ≤ {slo_ttft_p99}s in every phase)"
        if not failing
        else "the plan did NOT hold: " + "; ".join(failing)
    )
    return result


def render(result: Result) -> str:
    """The report: per phase what clients felt, then the verdict and the simulator's own speed."""
    k = result.granularity
    lines = [
        f"{result.endpoints} replicas behind {result.extra['gateway_endpoints']} gateway endpoints, "
        f"capacity {result.capacity_rps:,.0f} req/s; "
        f"granularity {k} (one simulated request = {k} client requests)",
        "",
        f"{'phase':<8} {'requests':>10} {'ok':>10} {'errors':>7} {'shed':>7} {'retries':>8} "
        f"{'queue p50':>9} {'queue p99':>9} {'queue max':>9} {'TTFT p50':>8} {'TTFT p95':>8} {'TTFT p99':>8} "
        f"{'TTFT max':>8}",
    ]
    for p in result.phases:
        lines.append(
            f"{p.name:<8} {p.requests * k:>10,} {p.ok * k:>10,} {p.errors * k:>7,} {p.shed * k:>7,} "
            f"{p.retries * k:>8,} {_pct(p.queueing, 0.5):>9.3f} {_pct(p.queueing, 0.99):>9.3f} "
            f"{max(p.queueing, default=float('nan')):>9.3f} {_pct(p.ttft, 0.5):>8.3f} "
            f"{_pct(p.ttft, 0.95):>8.3f} "
            f"{_pct(p.ttft, 0.99):>8.3f} {max(p.ttft, default=float('nan')):>8.3f}"
        )
    if any(p.streams for p in result.phases):
        lines += [
            "",
            f"{'streams':<8} {'streamed':>10} {'continued':>10} {'broken':>7} "
            f"{'TTFT p50':>8} {'TTFT p99':>8} {'TTFT max':>8}   (at the client, through the relay)",
        ]
        for p in result.phases:
            lines.append(
                f"{p.name:<8} {p.streams * k:>10,} {p.continued * k:>10,} {p.broken * k:>7,} "
                f"{_pct(p.stream_ttft, 0.5):>8.3f} {_pct(p.stream_ttft, 0.99):>8.3f} "
                f"{max(p.stream_ttft, default=float('nan')):>8.3f}"
            )
    lines += [
        "",
        result.verdict,
        f"retry budget refusals: {result.extra['retry_budget_refused']}; "
        f"shed by admission: {result.extra['shed_by_admission']}",
        "in flight at the end (must be 0): "
        + ", ".join(f"{key}={value:g}" for key, value in result.leftovers.items()),
        f"simulated {result.simulated_seconds:,.0f}s in {result.wall_seconds:,.1f}s wall "
        f"({result.simulated_seconds / max(result.wall_seconds, 1e-9):,.1f}× real time), "
        f"{result.events:,} simulated requests ({result.events / max(result.wall_seconds, 1e-9):,.0f}/s)",
    ]
    return "\n".join(lines)
