"""Per-key limits for one gateway instance: shared through Redis, or local when there is none or it is down.

Admission turns a key and a request into an :class:`~skyfabric.ops.ratelimit.Ask` (the request's prompt
estimate plus its ``max_tokens`` reserved, their cost by the model's prices) and asks the shared store —
Redis, one atomic script — or, with no Redis configured, the same algorithm in this process. The answer
becomes a :class:`Lease`, settled with the real usage when the request ends — batched: the next
admission carries the settlements that piled up meanwhile in its own round trip (ahead of itself, so it
counts them), or, after 5 ms without one, a single pipelined write does.

**Redis unreachable** (a connection error or no answer within ``redis_timeout``): the instance goes
``degraded`` — logged once — and enforces, for each key, its share ``limit / N`` in process, N being the
instances last seen alive through the heartbeats (or ``operations.limits.instances``). A key whose failure
policy is ``closed`` is refused instead (503) until Redis answers again: for keys whose spend must never
exceed its cap, whatever the cost in availability. A probe each heartbeat brings the instance back —
logged once — and the shared counters resume; usage admitted locally meanwhile is not copied back, so none
is counted twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from skyfabric.core.errors import RateLimited
from skyfabric.core.fleet import Limits
from skyfabric.ops.database import redact
from skyfabric.ops.grants import ADMITTED_LOW, GRANT_TTL, RENEW_AHEAD, Grant, Shape, Want, shape, want
from skyfabric.ops.keys import KeyRecord
from skyfabric.ops.pricing import PriceBook, Prices
from skyfabric.ops.ratelimit import (
    BUDGET,
    CONCURRENCY,
    RPM,
    TPM,
    Ask,
    LocalLimits,
    Verdict,
    period_of,
    remaining,
)
from skyfabric.ops.resp import RedisUnavailable

log = logging.getLogger("skyfabric.ops")

#: Longest a settlement waits for an admission to carry it to Redis before it is sent alone (seconds).
SETTLE_DELAY = 0.005
_WHAT = {
    RPM: ("requests per minute", "rate_limit_exceeded"),
    TPM: ("tokens per minute", "rate_limit_exceeded"),
    BUDGET: ("budget", "insufficient_quota"),
    CONCURRENCY: ("concurrent requests", "concurrency_limit_exceeded"),
}


def duration(seconds: float) -> str:
    """OpenAI's form of a reset time: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.2f}".rstrip("0").rstrip(".") + "s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


def _rfc3339(wall: float) -> bytes:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(math.ceil(wall))).encode()


@dataclass(slots=True)
class Lease:
    """An admitted request's hold on its key's limits, until :meth:`Limiter.settle` replaces it by usage."""

    ask: Ask
    #: None for an admission from a grant (its headers are read from the grant, when they are built).
    verdict: Verdict | None
    #: Settled in Redis (else in this process).
    shared: bool
    prompt_tokens: int
    price: Prices
    settled: bool = False
    #: The grant it was admitted from (``grants.py``), else None: admitted by Redis or in process.
    grant: Grant | None = None
    #: When it was admitted from the grant (the limiter's clock): its headers' reset times count from then,
    #: on the grant's counters as they are when the headers are built (estimates either way).
    at: float = 0.0

    def headers(self, anthropic: bool, wall: float) -> list[tuple[bytes, bytes]]:
        """The rate-limit headers of the answer (OpenAI's, or Anthropic's on ``/v1/messages``).

        A granted admission's are estimates anyway (the shared counters as of the last top-up): they are
        built once per :data:`GRANT_HEADERS_TTL` per grant and protocol, not per request (their building
        was a tenth of the keys' cost per request)."""
        g = self.grant
        if g is None:
            assert self.verdict is not None
            return limit_headers(self.ask, self.verdict, anthropic, wall)
        memo = g.headers_memo
        if memo is not None and memo[0] == anthropic and wall < memo[1]:
            return memo[2]
        verdict = self.verdict or g.verdict(self.ask, self.at)
        out = limit_headers(self.ask, verdict, anthropic, wall)
        g.headers_memo = (anthropic, wall + GRANT_HEADERS_TTL, out)
        return out


#: Seconds a granted admission's rate-limit headers are reused for (see :meth:`Lease.headers`).
GRANT_HEADERS_TTL = 0.1


@functools.lru_cache(maxsize=1024)
def _header_names(what: str, limit: int, anthropic: bool) -> tuple[tuple[bytes, bytes], bytes, bytes]:
    """A limit's constant header (its value) and the names of the other two: built once per limit."""
    if anthropic:
        prefix = b"anthropic-ratelimit-" + what.encode()
        return (prefix + b"-limit", str(limit).encode()), prefix + b"-remaining", prefix + b"-reset"
    tail = what.encode()
    return (
        (b"x-ratelimit-limit-" + tail, str(limit).encode()),
        b"x-ratelimit-remaining-" + tail,
        b"x-ratelimit-reset-" + tail,
    )


def limit_headers(ask: Ask, verdict: Verdict, anthropic: bool, wall: float) -> list[tuple[bytes, bytes]]:
    """Headers that tell a client where it stands on the request and token limits it has."""
    out: list[tuple[bytes, bytes]] = []
    for limit, reset, what in (
        (ask.rpm, verdict.requests_reset, "requests"),
        (ask.tpm, verdict.tokens_reset, "tokens"),
    ):
        if limit <= 0:
            continue
        fixed, left_name, reset_name = _header_names(what, limit, anthropic)
        left = str(remaining(limit, reset)).encode()
        when = _rfc3339(wall + reset) if anthropic else duration(reset).encode()
        out += [fixed, (left_name, left), (reset_name, when)]
    return out


def _share(limit: int | None, n: int) -> int:
    return 0 if limit is None else max(1, math.ceil(limit / n))


class Limiter:
    """Admits and settles requests against their keys' limits (see the module's docstring)."""

    def __init__(
        self,
        settings: Limits,
        redis_url: str | None,
        prices: PriceBook,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.prices = prices
        self.clock = clock
        self.wall = wall
        self.local = LocalLimits()
        self.redis_url = redis_url
        self.redis = None
        if redis_url is not None:
            from skyfabric.ops.redislimits import RedisLimits

            self.redis = RedisLimits(redis_url, timeout=settings.redis_timeout)
        #: ``local`` (no Redis configured), ``ok`` (Redis shared), ``degraded`` (Redis unreachable).
        self.state = "local" if self.redis is None else "ok"
        #: Instances seen alive through Redis at the last heartbeat (this one included).
        self.instances = 1
        self.instance = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        #: Last known micro-USD spent per key and period (from Redis): the local share's starting point.
        self._spent: dict[tuple[str, str], int] = {}
        self._pending: list[tuple[Ask, int, int]] = []
        self._wake = asyncio.Event()
        #: Shared leases of requests running here, renewed each heartbeat: lease id → ask.
        self._running: dict[str, Ask] = {}
        self._loaded = False
        self._leases = 0
        #: Each key's grant on this instance (``grants.py``), and grants waiting to be given back.
        self.grants: dict[str, Grant] = {}
        self._returning: list[Grant] = []
        self._fetches: set[asyncio.Task[None]] = set()
        self._grants_asked = 0
        #: Budget period kind → (id, end, a time inside it).
        self._periods: dict[str, tuple[str, float, float]] = {}

    # -- admission ----------------------------------------------------------------------------------------

    def _limits(self, record: KeyRecord) -> tuple[Shape, float]:
        """``record``'s limits as a grant's :data:`~skyfabric.ops.grants.Shape`, and the end of its budget
        period (wall clock; 0 without a budget)."""
        budget, period, period_end = -1, "", 0.0
        if record.budget is not None:
            budget = round(record.budget * 1_000_000)
            period, period_end = self._period(record.budget_period)
        return (record.rpm or 0, record.tpm or 0, budget, record.max_concurrent or 0, period), period_end

    def _name_lease(self, ask: Ask) -> None:
        """A concurrency slot's own member name (admission by the script, not from a grant)."""
        if ask.max_concurrent > 0:
            self._leases += 1
            ask.lease = f"{self.instance}:{self._leases}"

    def _period(self, kind: str) -> tuple[str, float]:
        """The current budget period (computed once per period, not per request)."""
        wall = self.wall()
        known = self._periods.get(kind)
        if known is None or not known[2] <= wall < known[1]:
            period, end = period_of(wall, kind)
            known = self._periods[kind] = (period, end, wall)
        return known[0], known[1]

    async def admit(
        self,
        record: KeyRecord,
        model: str,
        prompt_tokens: int,
        max_tokens: int | None,
        *,
        anthropic: bool = False,
    ) -> Lease | None:
        """Charge the request to its key's limits (None: it has none); raises :class:`RateLimited`."""
        if not record.limited:
            return None
        lease, ask, price = self.granted(record, model, prompt_tokens, max_tokens)
        if lease is not None:
            return lease
        return await self.admit_asked(record, ask, price, prompt_tokens, anthropic=anthropic)

    def granted(
        self, record: KeyRecord, model: str, prompt_tokens: int, max_tokens: int | None
    ) -> tuple[Lease | None, Ask, Prices]:
        """The common case of :meth:`admit`, with no coroutine: the request admitted from its key's grant
        here (a lease), else None and its ask for :meth:`admit_asked`. ``record`` must be limited.

        A grant cut for this very record (records are immutable: the same object, the same limits) within
        its budget period gives the request's limits without reading the record or the period again;
        otherwise :meth:`_grant_for` gets, replaces or starts the key's grant first.

        The request's ask — its prompt estimate plus its output cap reserved, and their cost at the dearest
        pool it may reach (settlement only gives back) — is made here, in this frame: this runs for every
        request of a limited key, and in a serving process each call on the path costs cache misses more
        than instructions (``bench/operations_cost.py --cold``)."""
        g = self.grants.get(record.id)  # none while Redis is unreachable (``_degrade`` drops them)
        if g is not None and g.record is record and (g.shape[2] < 0 or self.wall() < g.period_end):
            limits, period_end = g.shape, g.period_end
        else:
            g = None
            limits, period_end = self._limits(record)
        rpm, tpm, budget, concurrent, period = limits
        price = self.prices.ceiling(model)
        out = max_tokens if max_tokens is not None and max_tokens > 0 else self.settings.default_max_tokens
        cost = math.ceil(prompt_tokens * price.tokens_in + out * price.tokens_out) if budget >= 0 else 0
        ttl = self.settings.lease_ttl if concurrent > 0 else 15.0
        # Positional, in one call.
        ask = Ask(
            record.id, rpm, tpm, prompt_tokens + out, budget, cost, period, period_end, concurrent, "", ttl
        )
        if g is None and self.redis is not None and self.state == "ok":
            g = self._grant_for(ask, record)
        if g is not None:
            return self._take(g, ask, price, prompt_tokens), ask, price
        return None, ask, price

    async def admit_asked(
        self, record: KeyRecord, ask: Ask, price: Prices, prompt_tokens: int, *, anthropic: bool = False
    ) -> Lease:
        """:meth:`admit` past the grant: the shared script, or this instance's share while Redis is down."""
        if self.redis is not None and self.state == "ok":
            self._name_lease(ask)
            settle, self._pending = self._pending, []  # they ride along: one round trip, and counted first
            try:
                verdict = await self.redis.admit(ask, settle)
            except Exception as exc:
                if not _unreachable(exc):
                    raise
                self._degrade(exc)
            else:
                if ask.budget >= 0:
                    self._spent[(ask.key, ask.period)] = verdict.spent
                return self._decide(Lease(ask, verdict, True, prompt_tokens, price), record, anthropic)
        if self.state == "degraded":
            policy = record.failure_policy or self.settings.failure_policy
            if policy == "closed":
                raise RateLimited(
                    "this key's limits cannot be checked (their shared state is unreachable) and it is set "
                    "to fail closed; try again shortly",
                    retry_after=self.settings.heartbeat,
                    code="limits_unavailable",
                    headers=[],
                    status=503,
                    error_type="api_error",
                )
            ask = self._local_share(ask)
        self._name_lease(ask)
        verdict = self.local.admit(ask, self.clock(), self.wall())
        return self._decide(Lease(ask, verdict, False, prompt_tokens, price), record, anthropic)

    # -- grants: admission without a round trip for keys far from their limits (see grants.py) -------------

    def _grant_for(self, ask: Ask, record: KeyRecord) -> Grant | None:
        """The key's grant here if it was cut from ``ask``'s limits (remembering ``record``, the fast path's
        key); else None, a grant of the new limits asked for where they can be sliced."""
        g = self.grants.get(ask.key)
        if g is None or g.shape != shape(ask):
            size = want(ask)
            if size is None:
                return None
            if g is not None:
                self._retire(g)
            g = self.grants[ask.key] = Grant(ask.key, shape(ask), size)
            g.record, g.period_end = record, ask.period_end
            self._top_up(g, ask)
            return None
        g.record, g.period_end = record, ask.period_end
        return g

    def _take(self, g: Grant, ask: Ask, price: Prices, prompt_tokens: int) -> Lease | None:
        """Admit ``ask`` from grant ``g``, or None (then Redis decides); tops the grant up when it runs low
        or cannot admit. The lease's verdict is read from the grant when its headers are built."""
        now = self.clock()
        admitted = g.admit(ask, now)
        if admitted:
            if ask.lease:
                self._running[ask.lease] = ask
            if not g.fetching and now >= g.near_until:
                if admitted == ADMITTED_LOW:
                    self._top_up(g, ask)
                elif now >= g.expires - RENEW_AHEAD:
                    self._renew(g, ask)
            return Lease(ask, None, True, prompt_tokens, price, False, g, now)
        if not g.fetching and now >= g.near_until:
            self._top_up(g, ask)
        return None

    def _top_up(self, g: Grant, ask: Ask) -> None:
        self._spawn(g, self._fetch(g, ask))

    def _spawn(self, g: Grant, work: Coroutine[Any, Any, None]) -> None:
        """Run a grant's fetch (a top-up or a successor) in the background; ``g`` fetches until it ends."""
        g.fetching = True
        task = asyncio.get_running_loop().create_task(work)
        self._fetches.add(task)
        task.add_done_callback(self._fetches.discard)

    async def _charge(
        self, g: Grant, ask: Ask, size: Want
    ) -> tuple[tuple[float, float, int], list[str], float] | None:
        """Ask Redis for a grant of ``size`` on ``g``'s behalf: (the counters' resets and spend, the slot
        members, now), or None — refused (near a limit: direct admission for a while), failed, or Redis
        unreachable (degraded). ``g`` is no longer fetching either way."""
        assert self.redis is not None
        self._grants_asked += 1
        prefix = f"{self.instance}:g{self._grants_asked}:"
        try:
            got = await self.redis.grant(ask, size, prefix)
        except Exception as exc:
            g.fetching = False
            if not _unreachable(exc):
                log.exception("limits: a grant failed")
                g.near_until = self.clock() + GRANT_TTL
                return None
            self._degrade(exc)
            return None
        g.fetching = False
        now = self.clock()
        if got is None:
            g.near_until = now + GRANT_TTL
            return None
        return got, [prefix + str(i) for i in range(1, size.slots + 1)], now

    async def _fetch(self, g: Grant, ask: Ask) -> None:
        size = g.missing()
        charged = await self._charge(g, ask, size)
        if charged is None:
            return
        (requests_reset, tokens_reset, spent), slots, now = charged
        if not g.live:  # given back while this was in flight: give this part back too
            late = Grant(g.key, g.shape, size, size.requests, size.tokens, size.budget, slots, live=False)
            self._returning.append(late)
            self._wake.set()
            return
        g.add(size.requests, size.tokens, size.budget, slots, now + GRANT_TTL)
        g.requests_tat, g.tokens_tat, g.spent = now + requests_reset, now + tokens_reset, spent
        if ask.budget >= 0:
            self._spent[(ask.key, ask.period)] = spent

    def _renew(self, g: Grant, ask: Ask) -> None:
        """A grant in use near its end (it never ran low): a fresh one replaces it before it expires."""
        self._spawn(g, self._successor(g, ask))

    async def _successor(self, g: Grant, ask: Ask) -> None:
        """Charge a new grant of ``g``'s size and put it in ``g``'s place; ``g`` admits meanwhile, then is
        retired (its unused part given back, its requests in flight settled with Redis). Why not extend
        ``g``: its units were charged up to a grant's lifetime ago, and a grant's units must be used within
        its lifetime of their charge (``grants.py``); without this, a busy key's grant expired every
        ``GRANT_TTL`` and its requests went to the script one by one until the next grant arrived. Refused
        (near a limit now): ``g`` lives out its time, then direct admission."""
        size = g.size
        charged = await self._charge(g, ask, size)
        if charged is None:
            return
        (requests_reset, tokens_reset, spent), slots, now = charged
        fresh = Grant(g.key, g.shape, size, size.requests, size.tokens, size.budget, slots, now + GRANT_TTL)
        if not g.live or self.grants.get(g.key) is not g:  # replaced or dropped meanwhile: give it back
            fresh.live = False
            self._returning.append(fresh)
            self._wake.set()
            return
        fresh.requests_tat, fresh.tokens_tat, fresh.spent = now + requests_reset, now + tokens_reset, spent
        fresh.record, fresh.period_end = g.record, g.period_end
        self._retire(g)
        self.grants[g.key] = fresh
        if ask.budget >= 0:
            self._spent[(ask.key, ask.period)] = spent

    def _retire(self, g: Grant) -> None:
        """Stop admitting from ``g`` and queue its unused part to be given back."""
        g.live = False
        if self.grants.get(g.key) is g:
            del self.grants[g.key]
        if g.requests or g.tokens or g.budget or g.slots:
            self._returning.append(g)
            self._wake.set()

    def _expire_grants(self) -> None:
        """Give back the grants not topped up for ``GRANT_TTL`` (an idle instance holds nothing long)."""
        now = self.clock()
        for g in list(self.grants.values()):
            if now >= g.expires and now >= g.near_until and not g.fetching:
                self._retire(g)

    def _local_share(self, ask: Ask) -> Ask:
        """This instance's share of each limit while Redis is down."""
        n = self.settings.instances or self.instances
        if n > 1:
            ask.rpm = _share(ask.rpm or None, n)
            ask.tpm = _share(ask.tpm or None, n)
            ask.max_concurrent = _share(ask.max_concurrent or None, n)
        if ask.budget >= 0:
            left = max(0, ask.budget - self._spent.get((ask.key, ask.period), 0))
            ask.budget = left // n
        return ask

    def _decide(self, lease: Lease, record: KeyRecord, anthropic: bool) -> Lease:
        verdict = lease.verdict
        assert verdict is not None  # decided by Redis or in process, not from a grant
        if verdict.admitted:
            if lease.shared and lease.ask.lease:
                self._running[lease.ask.lease] = lease.ask
            return lease
        what, code = _WHAT[verdict.reason]
        ask = lease.ask
        if verdict.reason == TPM and ask.tokens * 60.0 / ask.tpm > 60.0:
            message = (
                f"this request needs {ask.tokens} tokens (prompt estimate + max_tokens), more than the key's "
                f"whole {ask.tpm} tokens per minute: lower max_tokens"
            )
        elif verdict.reason == BUDGET:
            message = (
                f"the key's {record.budget_period}ly budget is spent "
                "(or this request's reservation would exceed it)"
            )
        else:
            limit = {RPM: ask.rpm, TPM: ask.tpm, CONCURRENCY: ask.max_concurrent}[verdict.reason]
            message = f"rate limit reached for key {record.id}: {limit} {what}"
        headers = limit_headers(ask, verdict, anthropic, self.wall())
        raise RateLimited(
            message,
            retry_after=verdict.retry_after,
            code=code,
            headers=headers,
            error_type="insufficient_quota" if verdict.reason == BUDGET else "rate_limit_error",
        )

    # -- settlement ---------------------------------------------------------------------------------------

    def settle(
        self, lease: Lease, input_tokens: int | None, output_tokens: int, cost: float | None = None
    ) -> None:
        """Replace the lease's reservation by the tokens used (input: the estimate when not reported) and
        their ``cost`` in USD by the pools that served them (None: at the reservation's prices)."""
        if lease.settled:
            return
        lease.settled = True
        ask = lease.ask
        prompt = lease.prompt_tokens if input_tokens is None else input_tokens
        tokens = prompt + output_tokens
        if cost is None:
            micro = math.ceil(prompt * lease.price.tokens_in + output_tokens * lease.price.tokens_out)
        else:
            micro = math.ceil(cost * 1_000_000 - 1e-6)
        if lease.shared:
            self._running.pop(ask.lease, None)
            grant = lease.grant
            if grant is not None and grant.live:
                grant.settle(ask, tokens, micro)
                return
            if tokens != ask.tokens or micro != ask.cost or ask.lease:
                self._pending.append((ask, tokens, micro))
                self._wake.set()
        else:
            self.local.settle(ask, tokens, micro, self.clock())

    def release(self, lease: Lease) -> None:
        """The request failed before producing anything: settle it with no tokens used."""
        self.settle(lease, 0, 0)

    # -- Redis health, heartbeats, batched settlements -------------------------------------------------------

    def _degrade(self, exc: BaseException) -> None:
        if self.state == "ok":
            n = self.settings.instances or self.instances
            log.warning(
                "limits: degraded — Redis at %s unreachable (%s); enforcing each key's share 1/%d here "
                "(keys that fail closed are refused)",
                redact(self.redis_url or ""),
                f"{type(exc).__name__}: {exc}",
                n,
            )
        self.state = "degraded"
        # Grants are charged in Redis already: dropping them can only admit less. Their requests settle
        # with Redis when it is back (or their reservations outlive them, conservatively).
        for g in list(self.grants.values()):
            g.live = False
        self.grants.clear()
        self._returning.clear()

    async def beat(self) -> None:
        """One heartbeat: say this instance is alive, renew its leases, learn the instances alive."""
        if self.redis is None:
            return
        try:
            if self.state != "ok" or not self._loaded:
                await self.redis.load()
                self._loaded = True
            held = [(g, self.settings.lease_ttl) for g in self.grants.values() if g.slots]
            n = await self.redis.heartbeat(
                self.instance, 3 * self.settings.heartbeat, list(self._running.values()), held
            )
        except Exception as exc:
            if not _unreachable(exc):
                raise
            self._degrade(exc)
            return
        self.instances = max(1, n)
        if self.state == "degraded":
            log.warning(
                "limits: ok — Redis at %s is reachable again; limits are shared", redact(self.redis_url or "")
            )
            self.local = LocalLimits()
            self.state = "ok"

    async def flush(self) -> None:
        """Send the settlements that piled up and the grants' unused parts given back, in one round trip
        each; dropped if Redis is unreachable."""
        if self.redis is None:
            return
        self._expire_grants()
        batch, self._pending = self._pending, []
        returning, self._returning = self._returning, []
        try:
            if returning:
                await self.redis.give_back(returning)
            if batch:
                await self.redis.settle(batch)
        except Exception as exc:
            # Reservations outlive their requests (conservative) until the window passes; slots expire.
            if not _unreachable(exc):
                raise
            self._degrade(exc)

    async def run(self) -> None:
        """Heartbeats every ``heartbeat`` seconds and settlements as they come, until cancelled."""
        if self.redis is None:
            return
        flusher = asyncio.get_running_loop().create_task(self._flush_loop())
        try:
            while True:
                await self.beat()
                await asyncio.sleep(self.settings.heartbeat)
        finally:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher

    async def _flush_loop(self) -> None:
        while True:
            # Woken by a settlement, or every quarter of a grant's life to give back the expired ones.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), GRANT_TTL / 4)
            # A moment's grace: the next admission usually comes first and takes them along for free.
            await asyncio.sleep(SETTLE_DELAY)
            self._wake.clear()
            try:
                await self.flush()
            except Exception:  # a script error must not stop settlements for good
                log.exception("limits: settling with Redis failed")

    async def close(self) -> None:
        if self.redis is None:
            return
        for task in list(self._fetches):
            task.cancel()
        for g in list(self.grants.values()):
            self._retire(g)
        with contextlib.suppress(Exception):
            await self.flush()
            await self.redis.leave(self.instance)
        await self.redis.close()


def _unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` means Redis cannot be reached now (rather than a bug in a script)."""
    return isinstance(exc, RedisUnavailable | OSError | TimeoutError)
