"""The pre-commit policy: sends a request to the best endpoint, retries where safe, and commits.

The commit point is explicit. Before the first token reaches the client, any failure may be retried on
any endpoint (another failure domain first), within the retry budget and the request's deadline. After
it, a stream can only be *continued* (see :mod:`skyfabric.gateway.relay`). Picking, opening and accounting
for attempts is the router's (:mod:`skyfabric.gateway.router`), which the relay uses too; this module
adds the chain walk, retries and their budget, hedging, fallbacks and admission.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from skyfabric.core.endpoints import Endpoint
from skyfabric.core.errors import (
    InvalidRequest,
    MalformedEvent,
    NotSent,
    Overloaded,
    RemoteProtocolError,
    UpstreamError,
    UpstreamStatus,
    UpstreamTimeout,
)
from skyfabric.core.fleet import Fleet
from skyfabric.gateway.admission import Admission
from skyfabric.gateway.affinity import REPORT_HEADER, PrefixTable, prefix_key
from skyfabric.gateway.api_errors import upstream_error_response
from skyfabric.gateway.balancer import EndpointState, record_success
from skyfabric.gateway.classify import classify, request_fault
from skyfabric.gateway.context import RequestContext
from skyfabric.gateway.fit import prompt_token_floor
from skyfabric.gateway.hedge import race
from skyfabric.gateway.observe import ATTEMPT, HEDGE, upstream_headers
from skyfabric.gateway.relay import StreamRelay
from skyfabric.gateway.retry import backoff
from skyfabric.gateway.router import Router
from skyfabric.http.messages import Response, StreamResponse
from skyfabric.protocols.base import Backend, Capabilities
from skyfabric.protocols.canonical import Event, StreamError

log = logging.getLogger("skyfabric.gateway")


def unsupported(ctx: RequestContext, caps: Capabilities) -> str | None:
    """What the (lowered) request asks that a backend with ``caps`` cannot do, named; None when it can."""
    request = ctx.request
    if request.n > 1 and not caps.n:
        return "n > 1"
    if (request.logprobs or request.top_logprobs) and not caps.logprobs:
        return "logprobs"
    if not caps.images and any(
        block.get("type") == "image" for message in request.messages for block in message.content
    ):
        return "an image"
    return None


def _abandon(result: Response | StreamResponse) -> None:
    """Release a hedge's answer that lost the race after it had committed."""
    if isinstance(result, StreamResponse) and result.abandon is not None:
        result.abandon()


class Proxy(Router):
    """The router plus the policies that decide where a request goes before its commit point."""

    def __init__(
        self, fleet: Fleet, endpoints: list[Endpoint], *, clock: Callable[[], float] = time.monotonic
    ):
        super().__init__(fleet, endpoints, clock=clock)
        self.admission = Admission(
            self.capacity,
            queue_timeout=fleet.admission.queue_timeout,
            queue_limit=fleet.admission.queue_limit,
            clock=clock,
        )
        #: Where prefixes are cached, from the replicas that report it (``gateway/affinity.py``).
        self.prefix_table = PrefixTable()

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
        observer = self.observer
        sampler = self.sampler
        if sampler is not None and sampler.sampled(ctx):
            observer = self.traced_observer
            ctx.traced = True
        ctx.wants_usage = observer.counts_tokens
        observer.request_start(ctx)
        try:
            result = await self._forward(ctx, chain)
        except BaseException:
            ctx.finish()
            observer.request_end(ctx, 499, self.clock() - started)
            raise
        if not isinstance(result, StreamResponse):
            ctx.finish()  # a stream's relay frees the slot when the stream ends
        status = str(result.status)
        self.metrics.request(ctx.model, status)
        if isinstance(result, StreamResponse):
            self.metrics.observe(self.metrics.ttft, ctx.model, self.clock() - started)
        else:
            self.metrics.observe(self.metrics.latency, ctx.model, self.clock() - started)
        observer.request_end(ctx, result.status, self.clock() - started)
        return result

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

    # -- the request's own fault ------------------------------------------------------------------------

    def _settle(self, ctx: RequestContext, pending: list[tuple[EndpointState, UpstreamError]] | None) -> None:
        """Count the failures held back as suspect: the request was not at fault after all."""
        if pending:
            for failed, error in pending:
                self.note_failure(ctx, failed, error)
            pending.clear()

    def _request_fault(
        self, ctx: RequestContext, last: UpstreamError, first: str, second: str, why: str
    ) -> Response:
        """The answer to a request that failed the same way on two providers: not retried again."""
        log.warning("%s on %s and %s: the request's fault; not retried, none blamed", why, first, second)
        self.metrics.attempt(last.endpoint, "request_fault")
        if isinstance(last, UpstreamStatus):
            return self._passthrough(ctx, last)
        return ctx.error(
            504 if isinstance(last, UpstreamTimeout) else 502,
            f"the request failed the same way ({why}) on two providers, {first} and {second}: it is most "
            "likely the request itself (a prompt too long or too slow to process); not retried further",
            code="request_failed_on_two_providers",
        )

    async def _forward(self, ctx: RequestContext, chain: tuple[str, ...]) -> Response | StreamResponse:
        prefix = prefix_key(ctx.body) if any(self._models[m].affinity for m in chain) else None
        ctx.prefix_key = prefix
        holder = self.prefix_table.holder(prefix) if prefix is not None else None
        last: UpstreamError | None = None
        self.budget.active_requests += 1
        retrying = False
        waited = False
        repick = False  # the last pick went stale before its send (NotSent)
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
                            return ctx.error(504, "the request's deadline passed before any backend answered")
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
                            holder=holder,
                        )
                        if state is None:
                            break
                        in_rotation = state.available(now)  # not a panic pick: must still be at the send
                        if ctx.attempts > 0:
                            if not self.budget.allow():
                                self._settle(ctx, pending)
                                return self._exhausted(ctx, last, "retry budget exhausted")
                            if not repick:  # a stale pick's retry: backed off and counted already
                                if state.endpoint.provider in ctx.failed_providers:
                                    pause = backoff(
                                        ctx.attempts,
                                        self.fleet.retry.backoff_base,
                                        self.fleet.retry.backoff_max,
                                    )
                                    await asyncio.sleep(min(pause, max(0.0, ctx.deadline - now)))
                                self.metrics.retries.inc()
                            if not retrying:
                                retrying = True
                                self.budget.active_retries += 1
                        repick = False
                        ctx.attempts += 1
                        ctx.tried.add(state.endpoint.id)
                        served_before = state.successes
                        try:
                            answer = await self._attempt_or_race(ctx, state, model, in_rotation)
                        except NotSent:
                            ctx.attempts -= 1  # ejected between pick and send: nothing sent, pick again
                            repick = True
                            continue
                        except UpstreamError as exc:
                            last = exc
                            failed = self.states.get(exc.endpoint, state)
                            verdict = classify(self.backend(failed.endpoint), exc).verdict
                            if verdict in ("client", "context_length"):
                                assert isinstance(exc, UpstreamStatus)  # transport failures are retryable
                                if verdict == "context_length":
                                    refused = refused or set()
                                    refused.add(model)
                                    chain = (
                                        *chain[:i],
                                        *self._after_overflow(ctx, model, chain[i:], refused),
                                    )
                                    break
                                self._settle(ctx, pending)
                                self.metrics.attempt(failed.endpoint.id, f"status_{exc.status}")
                                self.observer_of(ctx).attempt_end(ctx, failed, f"status_{exc.status}")
                                return self._passthrough(ctx, exc)
                            why = request_fault(exc)
                            provider = failed.endpoint.provider
                            if why is not None:
                                seen = seen or {}
                                first = seen.setdefault(why, provider)
                                if first != provider:
                                    # The same failure on a second provider: the request's fault, not theirs.
                                    return self._request_fault(ctx, exc, first, provider, why)
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
                if isinstance(last, UpstreamStatus) and refused:
                    return self._passthrough(ctx, last)  # no model left that the request might fit
                self._settle(ctx, pending)
                if not waited and not self.any_available(chain, self.clock()):
                    # Every endpoint failed this request and all are out now: one more round once one is back.
                    waited = True
                    if await self.wait_for_endpoint(chain, ctx.deadline):
                        ctx.tried.clear()
                        ctx.failed_providers.clear()
                        ctx.attempts = min(ctx.attempts, self.max_attempts - 1)
                        continue
                return self._exhausted(ctx, last, "no backend could answer")
        finally:
            self.budget.active_requests -= 1
            if retrying:
                self.budget.active_retries -= 1

    async def _attempt_or_race(
        self, ctx: RequestContext, state: EndpointState, model: str, in_rotation: bool
    ) -> Response | StreamResponse:
        """One attempt, or — for a hedged model's stream — a race of attempts on different providers.

        ``in_rotation``: ``state`` was in rotation when picked (not a panic pick), so the attempt is
        called off should it be ejected before the send. A hedge only ever goes to an endpoint in rotation.
        """
        hedge = self._models[model].hedge
        if hedge is None or not ctx.stream:
            return await self.attempt(ctx, state, model, in_rotation=in_rotation)
        if hedge.after == "p95":
            p95 = self.ttft[model].p95()
            after = max(hedge.min_after, p95) if p95 is not None else self.timeouts.first_token / 2
        else:
            after = hedge.after
        racing = {state.endpoint.provider}

        def another(n: int) -> Callable[[], Awaitable[Response | StreamResponse]] | None:
            now = self.clock()
            other = self.clusters[model].pick(
                now,
                avoid_endpoints=ctx.tried,
                avoid_providers=racing | ctx.failed_providers,
                cooldowns=self.cooldowns,
            )
            # The pick panics into an ejected or cooling endpoint when no other is left; an extra
            # attempt is never worth sending into one.
            if (
                other is None
                or other.endpoint.provider in racing
                or not other.available(now)
                or self.cooldowns.get(other.endpoint.provider, 0.0) > now
                or not self.budget.allow()
            ):
                return None
            racing.add(other.endpoint.provider)
            ctx.attempts += 1
            ctx.tried.add(other.endpoint.id)
            self.metrics.hedges.inc()
            return lambda: self.attempt(ctx, other, model, HEDGE, in_rotation=True)

        def failed(exc: UpstreamError) -> None:
            if isinstance(exc, NotSent):
                ctx.attempts -= 1  # ejected before its task could send: not an attempt, not a failure
            else:
                self.note_failure(ctx, self.states.get(exc.endpoint, state), exc)

        return await race(
            lambda: self.attempt(ctx, state, model, in_rotation=in_rotation),
            another,
            after,
            hedge.max_hedges,
            on_error=failed,
            discard=_abandon,
        )

    async def attempt(
        self,
        ctx: RequestContext,
        state: EndpointState,
        model: str,
        kind: str = ATTEMPT,
        *,
        in_rotation: bool = False,
    ) -> Response | StreamResponse:
        """One attempt on one endpoint, up to the commit point; raises :class:`UpstreamError`.

        With ``in_rotation`` (it was when picked) an endpoint ejected since, or removed by discovery
        (draining), raises :class:`NotSent` before anything is sent: the pick is stale, not the
        endpoint's answer.
        """
        endpoint = state.endpoint
        started = self.clock()
        if in_rotation and (state.draining or not state.available(started)):
            raise NotSent(f"{endpoint.id} left rotation before the call was sent", endpoint=endpoint.id)
        backend = self.backend(endpoint)
        passthrough = backend.family == ctx.frontend.family
        if not passthrough:
            ctx.request.lower()  # translated: the backend builds its body from the canonical fields
            missing = unsupported(ctx, backend.capabilities(endpoint))
            if missing is not None:
                # refused as the backend would refuse it (a 400, the client's): never silently dropped
                body = b'{"error":{"message":"%s is not supported by this model\'s backend (%s)"}}' % (
                    missing.encode(),
                    endpoint.engine.encode(),
                )
                raise UpstreamStatus(400, body, endpoint=endpoint.id)
        usage = ctx.stream and ctx.usage_needed()
        call = backend.build(ctx.request, endpoint, usage=usage)
        state.outstanding += 1
        handed_off = False
        observer = self.traced_observer if ctx.traced else self.observer
        ctx.sent += 1
        ctx.last_endpoint = endpoint.id
        observer.attempt_start(ctx, state, kind)
        try:
            extra = upstream_headers(observer, ctx, state)
            resp = await self.open(state, call, ctx.stream, ctx.deadline, extra)
            if ctx.prefix_key is not None and (report := resp.header(REPORT_HEADER)) is not None:
                self.prefix_table.learn(ctx.prefix_key, endpoint.id, report)
            if not ctx.stream:
                remaining = max(0.001, ctx.deadline - self.clock())
                data = await resp.read(min(self.timeouts.idle, remaining))
                if not passthrough:
                    data = ctx.frontend.response(ctx.request, self._decoded(backend, endpoint, data))
                record_success(state, self.clock())
                self.metrics.attempt(endpoint.id, "ok")
                observer.attempt_end(ctx, state, "ok", self.clock() - started, data)
                return Response(200, data, self._backend_headers[endpoint.id])
            # The relay strips usage it asked for and the client did not: only an OpenAI client can
            # not ask (Anthropic's protocol always reports usage).
            options = ctx.body.get("stream_options") if passthrough else None
            continuous = isinstance(options, dict) and bool(options.get("continuous_usage_stats"))
            added = usage and passthrough and ctx.frontend.family == "openai" and not continuous
            relay = StreamRelay(self, ctx, state, resp, passthrough=passthrough, usage_added=added)
            await relay.prime()
            handed_off = True
            self.ttft[model].add(self.clock() - started)
            self.metrics.attempt(endpoint.id, "ok")
            observer.attempt_end(ctx, state, "ok", self.clock() - started)
            headers = self._backend_headers[endpoint.id]
            return StreamResponse(
                200,
                relay.run(),
                headers,
                abandon=relay.abandon,
                heartbeat=ctx.frontend.heartbeat,
            )
        finally:
            if not handed_off:
                state.outstanding -= 1

    @staticmethod
    def _decoded(backend: Backend, endpoint: Endpoint, data: bytes) -> list[Event]:
        """A whole answer's events; an answer that is not the protocol, or an error sent with a 200, is
        a failed attempt (retried elsewhere), never an empty success."""
        try:
            events = backend.decode_response(data)
        except MalformedEvent as exc:
            raise RemoteProtocolError(
                f"upstream answer is not its protocol: {exc}", endpoint=endpoint.id
            ) from None
        for event in events:
            if isinstance(event, StreamError):
                raise RemoteProtocolError(
                    f"upstream answered an error: {event.message}", endpoint=endpoint.id
                )
        return events

    def _passthrough(self, ctx: RequestContext, exc: UpstreamStatus) -> Response:
        """An upstream's refusal, for the client: as it came when it speaks the client's protocol."""
        state = self.states.get(exc.endpoint)
        same = state is not None and self.backend(state.endpoint).family == ctx.frontend.family
        return upstream_error_response(ctx.frontend, exc, same=same)

    def _exhausted(self, ctx: RequestContext, last: UpstreamError | None, why: str) -> Response:
        if isinstance(last, UpstreamStatus) and last.status == 429:
            retry_after = last.header(b"retry-after") or b"1"
            return ctx.error(
                429,
                f"{why}: every backend is throttling",
                error_type="rate_limit_error",
                headers=[(b"retry-after", retry_after)],
            )
        detail = f"{why}; last error: {last}" if last else why
        return ctx.error(502 if last else 503, detail, code="upstream_unavailable")
