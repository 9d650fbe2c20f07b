"""The router: sends a request to the best endpoint, retries where safe, and commits.

The commit point is explicit. Before the first token reaches the client, any failure may be retried on
any endpoint (another failure domain first), within the retry budget and the request's deadline. After
it, a stream can only be *continued* (see :mod:`skyfabric.gateway.relay`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

import orjson

from skyfabric.core.endpoints import Endpoint
from skyfabric.core.errors import (
    ConnectError,
    EndpointAborted,
    InvalidRequest,
    Overloaded,
    RemoteProtocolError,
    UpstreamError,
    UpstreamStatus,
    UpstreamTimeout,
)
from skyfabric.core.fleet import Fleet
from skyfabric.gateway.admission import Admission
from skyfabric.gateway.affinity import prefix_key
from skyfabric.gateway.api_errors import error_response
from skyfabric.gateway.balancer import (
    Cluster,
    EndpointState,
    OutlierPolicy,
    correlated_domain,
    eject,
    parse_retry_after,
    record_failure,
    record_success,
)
from skyfabric.gateway.context import RequestContext
from skyfabric.gateway.fit import MAX_CHARS_PER_TOKEN, prompt_token_floor
from skyfabric.gateway.hedge import TtftWindow, race
from skyfabric.gateway.metrics import GatewayMetrics
from skyfabric.gateway.observe import ATTEMPT, HEDGE, Observer
from skyfabric.gateway.relay import StreamRelay
from skyfabric.gateway.retry import RetryBudget, backoff
from skyfabric.gateway.router import hold
from skyfabric.http.client import HTTPClient, UpstreamResponse
from skyfabric.http.messages import Response, StreamResponse

log = logging.getLogger("skyfabric.gateway")

_JSON = [(b"content-type", b"application/json"), (b"accept", b"application/json")]
_SSE = [(b"content-type", b"application/json"), (b"accept", b"text/event-stream")]


def retryable_status(status: int) -> bool:
    """429 and 5xx may succeed elsewhere; other 4xx are the client's and would fail anywhere."""
    return status == 429 or status >= 500


def is_context_length(exc: UpstreamStatus) -> bool:
    """Whether a 400 says the prompt does not fit the model (OpenAI's and vLLM's wordings)."""
    text = exc.body[:2000].lower()
    return b"context_length_exceeded" in text or b"maximum context length" in text


def _abandon(result: Response | StreamResponse) -> None:
    """Release a hedge's answer that lost the race after it had committed."""
    if isinstance(result, StreamResponse) and result.abandon is not None:
        result.abandon()


class Proxy:
    """Clusters by model, the upstream client, and the policies that decide where a request goes."""

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
        self.admission = Admission(
            self.capacity,
            queue_timeout=fleet.admission.queue_timeout,
            queue_limit=fleet.admission.queue_limit,
            clock=clock,
        )
        #: Telemetry's hooks (dashboard, GenAI metrics, traces); the no-op observer when all are off.
        self.observer: Observer = Observer()
        self._backend_headers = {
            e.id: [(b"x-skyfabric-backend", e.id.encode()), (b"x-skyfabric-model", e.model.encode())]
            for e in endpoints
        }

    # -- the request path -------------------------------------------------------------------------------

    async def forward(self, ctx: RequestContext) -> Response | StreamResponse:
        """Answer one inference request: pick, attempt, classify, retry or fall back, commit."""
        started = self.clock()
        chain = self._chain(ctx)
        try:
            charged = await self.admission.acquire(chain, ctx.priority, ctx.deadline)
        except Overloaded:
            self.metrics.shed.inc()
            self.metrics.request(ctx.model, "429")
            raise
        ctx.on_done = lambda: self.admission.release(charged, self.clock() - started)
        ctx.wants_usage = self.observer.counts_tokens
        self.observer.request_start(ctx)
        try:
            result = await self._forward(ctx, chain)
        except BaseException:
            ctx.finish()
            self.observer.request_end(ctx, 499, self.clock() - started)
            raise
        if not isinstance(result, StreamResponse):
            ctx.finish()  # a stream's relay frees the slot when the stream ends
        status = str(result.status)
        self.metrics.request(ctx.model, status)
        if isinstance(result, StreamResponse):
            self.metrics.observe(self.metrics.ttft, ctx.model, self.clock() - started)
        else:
            self.metrics.observe(self.metrics.latency, ctx.model, self.clock() - started)
        self.observer.request_end(ctx, result.status, self.clock() - started)
        return result

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

    def _chain(self, ctx: RequestContext) -> tuple[str, ...]:
        """The request's chain, without the models its prompt certainly does not fit.

        Raises a 400 ``context_length_exceeded`` (OpenAI's shape) when it fits none: the prompt is refused
        before any upstream spends time and memory on it.
        """
        reach = self._reaches[ctx.model]
        if len(ctx.raw) <= self._bound_above[ctx.model]:
            return reach  # the common case: the body is too small for the size bound to exclude anything
        floor = prompt_token_floor(ctx.kind, ctx.body, enough=self._known_context[ctx.model])
        ctx.needs_tokens = max(ctx.needs_tokens, floor)
        chain = tuple(m for m in reach if self.fits(m, ctx.needs_tokens))
        if chain:
            return chain
        limit = max(self._models[m].context_length or 0 for m in reach)
        raise InvalidRequest(
            f"This model's maximum context length is {limit} tokens. However, your "
            f"{'messages' if ctx.kind == 'chat' else 'prompt'} resulted in at least {ctx.needs_tokens} "
            f"tokens. Please reduce the length of the {'messages' if ctx.kind == 'chat' else 'prompt'}.",
            param="messages" if ctx.kind == "chat" else "prompt",
            code="context_length_exceeded",
        )

    def _after_overflow(
        self, ctx: RequestContext, model: str, rest: Sequence[str], refused: set[str]
    ) -> list[str]:
        """What to try after ``model`` said the request does not fit its context.

        Its ``larger_context`` models first, then the rest of the chain; never a model that already said
        so, nor one whose known ``context_length`` is not larger than the one just exceeded.
        """
        limit = self._models[model].context_length
        if limit is not None:
            ctx.needs_tokens = max(ctx.needs_tokens, limit + 1)
        out: list[str] = []
        for candidate in [*self._larger(model), *rest]:
            if candidate not in out and candidate not in refused and self.fits(candidate, ctx.needs_tokens):
                out.append(candidate)
        return out

    def stream_chain(self, ctx: RequestContext) -> list[str]:
        """Models a broken stream of ``ctx`` may move to: its chain, less those it is known not to fit."""
        return [m for m in self._reaches[ctx.model] if self.fits(m, ctx.needs_tokens)]

    def _in_rotation(self, model: str, now: float) -> bool:
        return any(s.available(now) for s in self.clusters[model].states)

    # -- the request's own fault ------------------------------------------------------------------------

    @staticmethod
    def failure_class(exc: UpstreamError) -> str | None:
        """How an attempt failed, when that may be the request's own doing (else None).

        A request that times out waiting for its answer, breaks the connection, or gets a 500/504 may have
        done it itself (a prompt that takes minutes to tokenize, an input that crashes the engine). A
        refused connection (the request never arrived), a 502/503 (a proxy or an overloaded server) and a
        429 say nothing about the request.
        """
        if isinstance(exc, UpstreamTimeout):
            return None if exc.phase == "connect" else f"timeout ({exc.phase})"
        if isinstance(exc, UpstreamStatus):
            return f"status {exc.status}" if exc.status >= 500 and exc.status not in (502, 503) else None
        if isinstance(exc, RemoteProtocolError):
            return "connection lost"
        return None

    def _settle(self, ctx: RequestContext, pending: list[tuple[EndpointState, UpstreamError]] | None) -> None:
        """Count the failures held back as suspect: the request was not at fault after all."""
        if pending:
            for failed, error in pending:
                self.note_failure(ctx, failed, error)
            pending.clear()

    def _request_fault(self, last: UpstreamError, first: str, second: str, why: str) -> Response:
        """The answer to a request that failed the same way on two providers: not retried again."""
        log.warning("%s on %s and %s: the request's fault; not retried, none blamed", why, first, second)
        self.metrics.attempt(last.endpoint, "request_fault")
        if isinstance(last, UpstreamStatus):
            return self._passthrough(last)
        return error_response(
            504 if isinstance(last, UpstreamTimeout) else 502,
            f"the request failed the same way ({why}) on two providers, {first} and {second}: it is most "
            "likely the request itself (a prompt too long or too slow to process); not retried further",
            code="request_failed_on_two_providers",
        )

    async def _forward(self, ctx: RequestContext, chain: tuple[str, ...]) -> Response | StreamResponse:
        prefix = prefix_key(ctx.body) if any(self._models[m].affinity for m in chain) else None
        last: UpstreamError | None = None
        self.budget.active_requests += 1
        retrying = False
        waited = False
        refused: set[str] | None = None  # models that said the request does not fit their context
        #: Request-suspect failures seen so far: class → the provider it happened on first.
        seen: dict[str, str] | None = None
        #: Failures on endpoints that were answering other requests meanwhile; counted against them only
        #: if the request turns out not to be at fault (it succeeds elsewhere or fails another way).
        pending: list[tuple[EndpointState, UpstreamError]] | None = None
        try:
            while True:
                i = 0
                while i < len(chain):
                    model = chain[i]
                    i += 1
                    cluster = self.clusters[model]
                    while ctx.attempts < self.max_attempts:
                        now = self.clock()
                        if now >= ctx.deadline:
                            self._settle(ctx, pending)
                            return error_response(
                                504, "the request's deadline passed before any backend answered"
                            )
                        if not waited and not self.any_available(chain, now):
                            # The whole fleet for this model is out: wait for it rather than send into it.
                            waited = True
                            await self.wait_for_endpoint(chain, ctx.deadline)
                            continue
                        if (
                            i < len(chain)
                            and not self._in_rotation(model, now)
                            and any(self._in_rotation(later, now) for later in chain[i:])
                        ):
                            break  # all of this model is out but a later one is in: go there, no panic
                        state = cluster.pick(
                            now,
                            avoid_endpoints=ctx.tried,
                            avoid_providers=ctx.failed_providers,
                            cooldowns=self.cooldowns,
                            affinity=prefix if self._models[model].affinity else None,
                        )
                        if state is None:
                            break
                        if ctx.attempts > 0:
                            if not self.budget.allow():
                                self._settle(ctx, pending)
                                return self._exhausted(last, "retry budget exhausted")
                            if state.endpoint.provider in ctx.failed_providers:
                                pause = backoff(
                                    ctx.attempts, self.fleet.retry.backoff_base, self.fleet.retry.backoff_max
                                )
                                await asyncio.sleep(min(pause, max(0.0, ctx.deadline - now)))
                            if not retrying:
                                retrying = True
                                self.budget.active_retries += 1
                            self.metrics.retries.inc()
                        ctx.attempts += 1
                        ctx.tried.add(state.endpoint.id)
                        served_before = state.successes
                        try:
                            answer = await self._attempt_or_race(ctx, state, model)
                        except UpstreamError as exc:
                            last = exc
                            failed = self.states.get(exc.endpoint, state)
                            if isinstance(exc, UpstreamStatus) and not retryable_status(exc.status):
                                if exc.status == 400 and is_context_length(exc):
                                    refused = refused or set()
                                    refused.add(model)
                                    chain = (
                                        *chain[:i],
                                        *self._after_overflow(ctx, model, chain[i:], refused),
                                    )
                                    break
                                self._settle(ctx, pending)
                                self.metrics.attempt(failed.endpoint.id, f"status_{exc.status}")
                                self.observer.attempt_end(ctx, failed, f"status_{exc.status}")
                                return self._passthrough(exc)
                            why = self.failure_class(exc)
                            provider = failed.endpoint.provider
                            if why is not None:
                                seen = seen or {}
                                first = seen.setdefault(why, provider)
                                if first != provider:
                                    # The same failure on a second provider: the request's fault, not theirs.
                                    return self._request_fault(exc, first, provider, why)
                            if why is not None and failed is state and state.successes > served_before:
                                # It answered others while this one failed: suspect the request, judge later.
                                pending = pending or []
                                pending.append((failed, exc))
                                ctx.failed_providers.add(provider)
                                continue
                            self._settle(ctx, pending)
                            self.note_failure(ctx, failed, exc)
                        else:
                            self._settle(ctx, pending)  # another endpoint answered: they were at fault
                            return answer
                if isinstance(last, UpstreamStatus) and last.status == 400 and refused:
                    return self._passthrough(last)  # no model left that the request might fit
                self._settle(ctx, pending)
                if not waited and not self.any_available(chain, self.clock()):
                    # Every endpoint failed this request and all are out now: one more round once one is back.
                    waited = True
                    if await self.wait_for_endpoint(chain, ctx.deadline):
                        ctx.tried.clear()
                        ctx.failed_providers.clear()
                        ctx.attempts = min(ctx.attempts, self.max_attempts - 1)
                        continue
                return self._exhausted(last, "no backend could answer")
        finally:
            self.budget.active_requests -= 1
            if retrying:
                self.budget.active_retries -= 1

    async def _attempt_or_race(
        self, ctx: RequestContext, state: EndpointState, model: str
    ) -> Response | StreamResponse:
        """One attempt, or — for a hedged model's stream — a race of attempts on different providers."""
        hedge = self._models[model].hedge
        if hedge is None or not ctx.stream:
            return await self.attempt(ctx, state, model)
        if hedge.after == "p95":
            p95 = self.ttft[model].p95()
            after = max(hedge.min_after, p95) if p95 is not None else self.timeouts.first_token / 2
        else:
            after = hedge.after
        racing = {state.endpoint.provider}

        def another(n: int) -> Callable[[], Awaitable[Response | StreamResponse]] | None:
            other = self.clusters[model].pick(
                self.clock(),
                avoid_endpoints=ctx.tried,
                avoid_providers=racing | ctx.failed_providers,
                cooldowns=self.cooldowns,
            )
            if other is None or other.endpoint.provider in racing or not self.budget.allow():
                return None
            racing.add(other.endpoint.provider)
            ctx.attempts += 1
            ctx.tried.add(other.endpoint.id)
            self.metrics.hedges.inc()
            return lambda: self.attempt(ctx, other, model, HEDGE)

        return await race(
            lambda: self.attempt(ctx, state, model),
            another,
            after,
            hedge.max_hedges,
            on_error=lambda exc: self.note_failure(ctx, self.states.get(exc.endpoint, state), exc),
            discard=_abandon,
        )

    async def attempt(
        self, ctx: RequestContext, state: EndpointState, model: str, kind: str = ATTEMPT
    ) -> Response | StreamResponse:
        """One attempt on one endpoint, up to the commit point; raises :class:`UpstreamError`."""
        endpoint = state.endpoint
        body = ctx.body_for(endpoint, ctx.body.get("model", model))
        state.outstanding += 1
        handed_off = False
        started = self.clock()
        self.observer.attempt_start(ctx, state, kind)
        try:
            extra = self.observer.upstream_headers(ctx, state)
            resp = await self.open(state, ctx.path, body, ctx.stream, ctx.deadline, extra)
            if not ctx.stream:
                remaining = max(0.001, ctx.deadline - self.clock())
                data = await resp.read(min(self.timeouts.idle, remaining))
                record_success(state, self.clock())
                self.metrics.attempt(endpoint.id, "ok")
                self.observer.attempt_end(ctx, state, "ok", self.clock() - started, data)
                return Response(200, data, self._backend_headers[endpoint.id])
            relay = StreamRelay(self, ctx, state, resp)
            await relay.prime()
            handed_off = True
            self.ttft[model].add(self.clock() - started)
            self.metrics.attempt(endpoint.id, "ok")
            self.observer.attempt_end(ctx, state, "ok", self.clock() - started)
            headers = self._backend_headers[endpoint.id]
            return StreamResponse(200, relay.run(), headers, abandon=relay.abandon, heartbeat=b":\n\n")
        finally:
            if not handed_off:
                state.outstanding -= 1

    def auth_headers(self, endpoint: Endpoint) -> list[tuple[bytes, bytes]]:
        """Credentials the endpoint expects, if its pool names an API key."""
        if endpoint.api_key:
            return [(b"authorization", b"Bearer " + endpoint.api_key.encode())]
        return []

    async def open(
        self,
        state: EndpointState,
        path: bytes,
        body: bytes,
        stream: bool,
        deadline: float,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> UpstreamResponse:
        """Send to an endpoint and wait for a 2xx status; errors carry the upstream's answer."""
        endpoint = state.endpoint
        remaining = max(0.001, deadline - self.clock())
        headers = _SSE if stream else _JSON
        if endpoint.api_key:
            headers = [*headers, *self.auth_headers(endpoint)]
        if extra:
            headers = [*headers, *extra]
        first_byte = self.timeouts.first_byte if stream else self.timeouts.response
        resp = await self.client.request(
            endpoint.origin,
            b"POST",
            endpoint.base_path.encode() + path,
            headers,
            body,
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

    # -- bookkeeping ------------------------------------------------------------------------------------

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
        self.observer.attempt_end(ctx, state, outcome)
        ctx.failed_providers.add(state.endpoint.provider)
        if isinstance(exc, EndpointAborted):
            return  # we aborted it ourselves when its endpoint was ejected: nothing new to count
        if isinstance(exc, UpstreamStatus) and exc.status == 429:
            wait = parse_retry_after(exc.header(b"retry-after"), time.time())
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

    def _passthrough(self, exc: UpstreamStatus) -> Response:
        content_type = exc.header(b"content-type") or b"application/json"
        headers = [(b"x-skyfabric-backend", exc.endpoint.encode())]
        return Response(exc.status, exc.body, headers, content_type=content_type)

    def _exhausted(self, last: UpstreamError | None, why: str) -> Response:
        if isinstance(last, UpstreamStatus) and last.status == 429:
            retry_after = last.header(b"retry-after") or b"1"
            return error_response(
                429,
                f"{why}: every backend is throttling",
                error_type="rate_limit_error",
                headers=[(b"retry-after", retry_after)],
            )
        detail = f"{why}; last error: {last}" if last else why
        return error_response(502 if last else 503, detail, code="upstream_unavailable")

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
