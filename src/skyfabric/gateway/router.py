"""The router: the fleet's endpoints and their health, and the one place that opens and accounts for attempts.

Both sides of the commit point use it: the proxy (:mod:`skyfabric.gateway.proxy`, the pre-commit policy —
chain walk, retries, budget, hedging) and the stream relay (:mod:`skyfabric.gateway.relay`, the post-commit
policy — continuation). It picks an endpoint, opens an attempt through the endpoint's protocol adapter's
request, counts a failure against its endpoint (ejecting it and its failing domain), waits for capacity in
an outage, and keeps membership as discovery changes it. Imports run ``proxy → relay → router``: no circle.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

import orjson

from skyfabric.core.endpoints import Endpoint
from skyfabric.core.errors import (
    ConnectError,
    EndpointAborted,
    RemoteProtocolError,
    UpstreamError,
    UpstreamStatus,
    UpstreamTimeout,
)
from skyfabric.core.fleet import Fleet
from skyfabric.gateway.balancer import (
    Cluster,
    EndpointState,
    OutlierPolicy,
    correlated_domain,
    eject,
    record_failure,
)
from skyfabric.gateway.classify import classify
from skyfabric.gateway.context import RequestContext
from skyfabric.gateway.fit import MAX_CHARS_PER_TOKEN
from skyfabric.gateway.hedge import TtftWindow
from skyfabric.gateway.metrics import GatewayMetrics
from skyfabric.gateway.observe import Observer, Sampler
from skyfabric.gateway.retry import RetryBudget
from skyfabric.http.client import HTTPClient, UpstreamResponse
from skyfabric.protocols.base import Backend, UpstreamCall
from skyfabric.protocols.registry import backends_for

log = logging.getLogger("skyfabric.gateway")


async def hold(ready: Callable[[], bool], clock: Callable[[], float], deadline: float, wait: float) -> bool:
    """Wait (≤ ``wait`` seconds, never past ``deadline``) until ``ready()``; returns its last answer.

    A fleet-wide outage seen from the gateway is usually its own network blinking: a request, or a stream
    to be continued, with time left is better held for a few seconds than failed or sent into a blackhole.
    Polled every 50 ms, a bounded number of times even under a frozen test clock.
    """
    limit = min(deadline, clock() + wait)
    for _ in range(int(wait / 0.05)):
        if ready() or clock() >= limit:
            break
        await asyncio.sleep(0.05)
    return ready()


class Router:
    """Clusters by model, the upstream client, endpoint health, and attempts' accounting."""

    def __init__(
        self, fleet: Fleet, endpoints: list[Endpoint], *, clock: Callable[[], float] = time.monotonic
    ):
        self.fleet = fleet
        self.clock = clock
        self.client = HTTPClient()
        health = fleet.health
        self.clusters: dict[str, Cluster] = {
            m.name: Cluster(m.name, slow_start=health.slow_start) for m in fleet.models
        }
        self.states: dict[str, EndpointState] = {}
        for endpoint in endpoints:
            state = EndpointState(endpoint)
            self.clusters[endpoint.model].states.append(state)
            self.states[endpoint.id] = state
        self.outlier = OutlierPolicy(
            consecutive_failures=health.consecutive_failures,
            base_ejection=health.base_ejection,
            max_ejection=health.max_ejection,
            probes=health.probe_interval > 0,
            domain_threshold=health.domain_threshold,
            slow_start=health.slow_start,
        )
        #: Provider → monotonic time until which it is left alone (it said 429 with Retry-After).
        self.cooldowns: dict[str, float] = {}
        self.budget = RetryBudget(fleet.retry.budget_percent, fleet.retry.min_retry_concurrency)
        self.timeouts = fleet.timeouts
        self.max_attempts = fleet.retry.max_attempts
        self.max_continuations = fleet.retry.max_continuations
        self.ttft = {m.name: TtftWindow() for m in fleet.models}
        self._capacity: dict[str, tuple[float, int]] = {}
        self._models = {m.name: m for m in fleet.models}
        #: Each model's chain, and the body size above which a prompt might not fit some model of it.
        self._reaches = {m.name: self._reach(m.name) for m in fleet.models}
        self._bound_above = {
            name: min((self._models[m].context_length or 1 << 40 for m in reach), default=1 << 40)
            * MAX_CHARS_PER_TOKEN
            for name, reach in self._reaches.items()
        }
        #: The largest known context in each chain: past it, a prompt's size changes nothing.
        self._known_context = {
            name: max((self._models[m].context_length or 0 for m in reach), default=0)
            for name, reach in self._reaches.items()
        }
        self.metrics = GatewayMetrics(list(self.states.values()), clock)
        #: Telemetry's hooks (dashboard, GenAI metrics, logs); the no-op observer when all are off.
        self.observer: Observer = Observer()
        #: Tracing's head sampling (None: tracing off) and the hooks of a request it chose to trace (the
        #: same plus the tracer): the choice is made once per request, so an unsampled one costs the
        #: tracer nothing past the choice.
        self.sampler: Sampler | None = None
        self.traced_observer: Observer = self.observer
        #: The protocol adapter of each engine kind in the fleet, resolved now: a kind with none is a
        #: configuration error at load, not a surprise at the first request.
        self.backends: dict[str, Backend] = backends_for(fleet, endpoints)
        self._backend_headers = {
            e.id: [(b"x-skyfabric-backend", e.id.encode()), (b"x-skyfabric-model", e.model.encode())]
            for e in endpoints
        }

    def observer_of(self, ctx: RequestContext) -> Observer:
        """The hooks of ``ctx``: the traced request's (with the tracer) or everyone else's."""
        return self.traced_observer if ctx.traced else self.observer

    # -- chains: which models may serve a request, in which order ---------------------------------------

    def _reach(self, model: str) -> tuple[str, ...]:
        """The models a request for ``model`` can reach, in the router's order.

        The model, then its ``fallbacks``, then the ``larger_context`` models of all of them (transitively).
        A larger-context model can answer whatever the smaller one can, so it is the last resort when the
        model and its fallbacks are all out; a context-length error goes to it first
        (:meth:`_after_overflow`).
        """
        chain: list[str] = []
        for name in [model, *self._models[model].fallbacks]:
            canonical = self.fleet.canonical(name)
            if canonical is not None and canonical not in chain:
                chain.append(canonical)
        for name in list(chain):
            chain.extend(m for m in self._larger(name) if m not in chain)
        return tuple(chain)

    def _larger(self, model: str) -> list[str]:
        """``model``'s ``larger_context``, that one's, and so on (canonical names, no cycles)."""
        out: list[str] = []
        bigger = self._models[model].larger_context
        while bigger is not None:
            canonical = self.fleet.canonical(bigger)
            if canonical is None or canonical == model or canonical in out:
                break
            out.append(canonical)
            bigger = self._models[canonical].larger_context
        return out

    def fits(self, model: str, tokens: int) -> bool:
        """Whether a request known to need more than ``tokens - 1`` tokens may fit ``model``'s context.

        A model whose ``context_length`` is not known is given the benefit of the doubt.
        """
        limit = self._models[model].context_length
        return limit is None or tokens <= limit

    def chain_of(self, model: str) -> tuple[str, ...]:
        """``model``'s chain (the model, its fallbacks, the larger-context models)."""
        return self._reaches[model]

    def stream_chain(self, ctx: RequestContext, model: str) -> list[str]:
        """Models a stream of ``model`` cut mid-answer may move to: the same model only — ``model`` and the
        models it declares the same (``continue_on``) — less those the request is known not to fit.

        A fallback is another model: going on there would splice two models' words into one answer.
        """
        same = [model, *(self.fleet.canonical(m) for m in self._models[model].continue_on)]
        return [m for m in dict.fromkeys(same) if m is not None and self.fits(m, ctx.needs_tokens)]

    def _in_rotation(self, model: str, now: float) -> bool:
        return any(s.available(now) for s in self.clusters[model].states)

    # -- attempts --------------------------------------------------------------------------------------

    def backend(self, endpoint: Endpoint) -> Backend:
        """The protocol adapter that speaks ``endpoint``'s engine."""
        return self.backends[endpoint.engine]

    async def open(
        self,
        state: EndpointState,
        call: UpstreamCall,
        stream: bool,
        deadline: float,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> UpstreamResponse:
        """Send ``call`` to an endpoint and wait for a 2xx status; errors carry the upstream's answer."""
        endpoint = state.endpoint
        remaining = max(0.001, deadline - self.clock())
        headers = [*call.headers, *extra] if extra else call.headers
        first_byte = self.timeouts.first_byte if stream else self.timeouts.response
        resp = await self.client.request(
            endpoint.origin,
            b"POST",
            endpoint.base_path.encode() + call.path,
            headers,
            call.body,
            connect_timeout=min(self.timeouts.connect, remaining),
            first_byte_timeout=min(first_byte, remaining),
            endpoint=endpoint.id,
            tracker=state.inflight,
            # a stale keep-alive connection is replaced only while the endpoint is not serving an ejection
            resend=lambda: self.clock() >= state.ejected_until,
        )
        if resp.status >= 300:
            try:
                data = await resp.read(min(self.timeouts.idle, remaining))
            except UpstreamError:
                data = b""
            raise UpstreamStatus(resp.status, data, headers=resp.headers, endpoint=endpoint.id)
        return resp

    def classify(self, state: EndpointState, exc: UpstreamError) -> str:
        """The verdict of the one response classifier on ``exc`` from ``state``'s endpoint."""
        return classify(self.backend(state.endpoint), exc).verdict

    def auth_headers(self, endpoint: Endpoint) -> list[tuple[bytes, bytes]]:
        """Credentials ``endpoint`` expects (its adapter knows how they are sent)."""
        return self.backend(endpoint).auth(endpoint)

    def note_failure(
        self, ctx: RequestContext, state: EndpointState, exc: Exception, *, hard: bool = False
    ) -> None:
        """Count a failed attempt against its endpoint (and maybe eject it); avoid its provider."""
        hard = (
            hard
            or isinstance(exc, ConnectError)
            or (isinstance(exc, RemoteProtocolError | UpstreamTimeout) and not exc.sent_any)
        )
        outcome = f"status_{exc.status}" if isinstance(exc, UpstreamStatus) else type(exc).__name__
        self.metrics.attempt(state.endpoint.id, outcome)
        self.observer_of(ctx).attempt_end(ctx, state, outcome)
        ctx.failed_providers.add(state.endpoint.provider)
        if isinstance(exc, EndpointAborted):
            return  # we aborted it ourselves when its endpoint was ejected: nothing new to count
        if isinstance(exc, UpstreamError):
            judged = classify(self.backend(state.endpoint), exc)
            if judged.verdict == "throttled":
                wait = judged.retry_after
                if wait is not None:
                    provider = state.endpoint.provider
                    self.cooldowns[provider] = max(self.cooldowns.get(provider, 0.0), self.clock() + wait)
                    log.warning("provider %s throttles: cooling it for %.1fs", provider, wait)
                return  # throttling is not ill health: no ejection
        if record_failure(state, self.clock(), self.outlier, hard=hard):
            self.after_ejection(state, str(exc))

    def eject_now(self, state: EndpointState, now: float, *, reason: str) -> None:
        """Eject an endpoint found dead by the health loop (a stall, a failed probe)."""
        eject(state, now, self.outlier)
        self.after_ejection(state, reason)

    def after_ejection(self, state: EndpointState, reason: str) -> None:
        """Count it, take down the rest of a failing domain, and abort what is stuck on them."""
        now = self.clock()
        ejected = [state]
        self.metrics.ejections.labels(state.endpoint.id).inc()
        self.observer.ejected(state, reason)
        log.warning("ejected %s: %s", state.endpoint.id, reason)
        for peer in correlated_domain(list(self.states.values()), state, now, self.outlier):
            eject(peer, now, self.outlier)
            self.metrics.ejections.labels(peer.endpoint.id).inc()
            self.observer.ejected(peer, f"its failing domain (with {state.endpoint.id})")
            log.warning("ejected %s with its failing domain", peer.endpoint.id)
            ejected.append(peer)
        # Ejected by the health loop (silence, failed probes) or with its domain: what is in flight
        # there is stuck, so move it now. A single failed request says nothing about its neighbours.
        found_dead = reason == "stall" or reason.startswith("probe")
        for dead in ejected:
            if found_dead or dead is not state:
                for conn in list(dead.inflight):
                    conn.abort()

    def any_available(self, chain: Sequence[str], now: float) -> bool:
        """Whether any endpoint of these models is in rotation."""
        return any(s.available(now) for model in chain for s in self.clusters[model].states)

    async def wait_for_endpoint(self, chain: Sequence[str], deadline: float) -> bool:
        """When every endpoint of ``chain`` is out, wait (≤ ``retry.outage_wait``) for one to come back."""
        wait = self.fleet.retry.outage_wait
        return await hold(lambda: self.any_available(chain, self.clock()), self.clock, deadline, wait)

    def capacity(self, model: str) -> int:
        """Requests the available endpoints of ``model`` serve well, together (recomputed every 50 ms).

        Zero while every endpoint is out: requests then queue (bounded by ``admission.queue_timeout``) and
        are admitted as soon as a probe brings one back.
        """
        now = self.clock()
        cached = self._capacity.get(model)
        if cached is not None and now - cached[0] < 0.05:
            return cached[1]
        states = self.clusters[model].states
        if not states:
            return 0  # served only through its fallbacks: admission charges those
        total = sum(s.endpoint.concurrency for s in states if s.available(now))
        self._capacity[model] = (now, total)
        return total

    def model_list(self) -> bytes:
        """``GET /v1/models`` body: every model and alias that has at least one endpoint or fallback."""
        data = []
        for model in self.fleet.models:
            for name in [model.name, *model.aliases]:
                data.append({"id": name, "object": "model", "created": 0, "owned_by": model.owned_by})
        return orjson.dumps({"object": "list", "data": data})

    # -- picking for a stream past its commit point --------------------------------------------------

    def excluded(self, ctx: RequestContext) -> set[str]:
        """Endpoints ``ctx``'s stream must not go to: refused it, or broke it and not probed since."""
        out = set(ctx.refused)
        for endpoint, when in ctx.broke.items():
            state = self.states.get(endpoint)
            if state is None or state.probed_ok <= when:
                out.add(endpoint)
        return out

    def usable(self, ctx: RequestContext, chain: Sequence[str]) -> bool:
        """Whether an endpoint of ``chain`` that ``ctx``'s stream may go to is in rotation now."""
        now, excluded = self.clock(), self.excluded(ctx)
        return any(self._open_to(model, now, excluded) for model in chain)

    def _open_to(self, model: str, now: float, excluded: set[str]) -> bool:
        """Whether ``model`` has an endpoint in rotation that is not in ``excluded`` (a stream's)."""
        return any(s.available(now) and s.endpoint.id not in excluded for s in self.clusters[model].states)

    def reachable(self, ctx: RequestContext, chain: Sequence[str]) -> bool:
        """Whether ``chain`` has an endpoint ``ctx``'s stream may go to once it is back in rotation
        (waiting is pointless when every endpoint refused this stream; one that broke it may pass a probe)."""
        refused = ctx.refused
        return any(s.endpoint.id not in refused for model in chain for s in self.clusters[model].states)

    def pick_for_stream(self, ctx: RequestContext, chain: Sequence[str]) -> EndpointState | None:
        """The endpoint to take over ``ctx``'s broken stream: the first model of ``chain`` with one.

        A model none of whose endpoints this stream may use is in rotation is passed over for a later one
        that has one: the balancer's panic pick (an ejected endpoint) is for when nothing else is left.
        """
        excluded = self.excluded(ctx)
        now = self.clock()
        live = [model for model in chain if self._open_to(model, now, excluded)]
        for model in live or chain:
            state = self.clusters[model].pick(
                now,
                avoid_endpoints=excluded,
                avoid_providers=ctx.failed_providers,
                cooldowns=self.cooldowns,
            )
            if state is not None:
                return state
        return None

    async def wait_for_stream(self, ctx: RequestContext, chain: Sequence[str]) -> bool:
        """Hold a broken stream (≤ ``retry.outage_wait``) for an endpoint it may go to to come back."""
        return await hold(
            lambda: self.usable(ctx, chain), self.clock, ctx.deadline, self.fleet.retry.outage_wait
        )

    # -- membership at run time (gateway/discovery.py) --------------------------------------------------

    def add_endpoint(self, endpoint: Endpoint) -> EndpointState:
        """Put a discovered endpoint into rotation: probed first (when probes are on), then slow start.

        An endpoint still draining under the same id (it left and came back) is simply taken back.
        """
        now = self.clock()
        cluster = self.clusters[endpoint.model]
        state = self.states.get(endpoint.id)
        if state is None:
            state = EndpointState(endpoint)
            state.last_activity = now
            # A host nobody has talked to yet is treated like one coming back from an ejection.
            state.needs_probe = self.outlier.probes
            state.readmitted_at = now
            self.states[endpoint.id] = state
            self.metrics.endpoint_states.append(state)
            self._backend_headers[endpoint.id] = [
                (b"x-skyfabric-backend", endpoint.id.encode()),
                (b"x-skyfabric-model", endpoint.model.encode()),
            ]
        if state not in cluster.states:
            cluster.states.append(state)
        state.draining = False
        self._capacity.pop(endpoint.model, None)
        return state

    def drain_endpoint(self, endpoint_id: str) -> EndpointState | None:
        """Take an endpoint out of rotation; what is in flight on it finishes (``drop_if_idle`` reaps it)."""
        state = self.states.get(endpoint_id)
        if state is None:
            return None
        cluster = self.clusters[state.endpoint.model]
        if state in cluster.states:
            cluster.states.remove(state)
        state.draining = True
        self._capacity.pop(state.endpoint.model, None)
        return state

    def drop_if_idle(self, endpoint_id: str, *, force: bool = False) -> bool:
        """Forget a drained endpoint once nothing is in flight on it (or ``force``): states, metrics."""
        state = self.states.get(endpoint_id)
        if state is None:
            return True
        if not state.draining:
            return False  # back in rotation
        if not force and (state.outstanding or state.streaming or state.inflight):
            return False
        for conn in list(state.inflight):
            conn.abort()
        del self.states[endpoint_id]
        self.metrics.endpoint_states.remove(state)
        self.metrics.forget_endpoint(endpoint_id)
        self._backend_headers.pop(endpoint_id, None)
        origin = state.endpoint.origin
        if not any(s.endpoint.origin == origin for s in self.states.values()):
            pool = self.client.pools.pop(origin, None)
            if pool is not None:
                pool.close()
        return True
