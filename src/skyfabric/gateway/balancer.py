"""Clusters of endpoints, the load balancer that picks one, and passive outlier detection.

The outlier detector is a plain state machine driven by the current time (``now``), so it is tested with
a fake clock. Ejection grows with each repeated ejection (Envoy's base ejection time × count), capped;
when every endpoint of a cluster is ejected the balancer enters *panic* and uses them all anyway,
because a false positive must never turn into a total outage.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from skyfabric.core.endpoints import Endpoint
from skyfabric.core.retry_after import parse_retry_after as parse_retry_after
from skyfabric.gateway.affinity import prefer


@dataclass(slots=True)
class EndpointState:
    """What the gateway knows about one endpoint right now."""

    endpoint: Endpoint
    outstanding: int = 0
    consecutive_failures: int = 0
    ejected_until: float = 0.0
    ejections: int = 0
    last_failure: float = 0.0
    successes: int = 0
    failures: int = 0
    #: Load reported by the endpoint itself (vLLM's /metrics), when known.
    reported_running: float = 0.0
    reported_waiting: float = 0.0
    reported_kv_usage: float = 0.0
    #: After an ejection with active probes on, a probe must succeed before traffic returns (half-open).
    needs_probe: bool = False
    readmitted_at: float = -1e9
    #: Streaming attempts in flight and when a byte last came from this endpoint (the stall watchdog).
    streaming: int = 0
    last_activity: float = 0.0
    #: Open upstream responses, aborted at once when the endpoint is found dead.
    inflight: set[Any] = field(default_factory=set)
    #: Whether it continues an answer from a prefix: the pool's declaration until its continuation
    #: self-test, or a restart caught at run time, says otherwise (``gateway/selftest.py``, ``relay.py``).
    continues: bool = field(init=False)
    #: When it last answered a probe: a stream it broke may come back to it only after that.
    probed_ok: float = -1e9
    #: Removed by discovery, finishing what is in flight: not picked, not probed, not counted in a domain.
    draining: bool = False

    def __post_init__(self) -> None:
        self.continues = self.endpoint.can_continue

    def available(self, now: float) -> bool:
        """Not ejected at ``now`` (and, after an ejection, probed back in when probes are on)."""
        return now >= self.ejected_until and not self.needs_probe

    def load(self, now: float = 0.0, slow_start: float = 0.0) -> float:
        """Requests per unit of capacity: ours in flight plus what the endpoint says it queues.

        A readmitted endpoint ramps from 10 % to full share over ``slow_start`` seconds, so a host that
        has just come back is not flooded by every request queued while it was out.
        """
        load = (self.outstanding + self.reported_waiting) / self.endpoint.concurrency
        if slow_start > 0 and now - self.readmitted_at < slow_start:
            ramp = 0.1 + 0.9 * max(0.0, now - self.readmitted_at) / slow_start
            load = (load + 1.0 / self.endpoint.concurrency) / ramp
        return load


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    """Envoy-style knobs for passive health checking."""

    consecutive_failures: int = 3
    base_ejection: float = 2.0
    max_ejection: float = 60.0
    #: With active probes, an ejected endpoint comes back only through a successful probe.
    probes: bool = False
    domain_threshold: float = 0.5
    slow_start: float = 0.0


def record_success(state: EndpointState, now: float) -> None:
    """A completed attempt: clears the failure streak."""
    state.consecutive_failures = 0
    state.successes += 1
    if state.ejections and now - state.last_failure > 10 * state.endpoint.concurrency:
        state.ejections = 0


def record_failure(state: EndpointState, now: float, policy: OutlierPolicy, *, hard: bool = False) -> bool:
    """A failed attempt; returns True when it ejects the endpoint.

    ``hard`` failures (connection refused, reset before any byte) eject at once: they say the process or
    host is gone, and waiting for three of them costs three clients a retry.
    """
    state.failures += 1
    state.consecutive_failures += 1
    state.last_failure = now
    if hard or state.consecutive_failures >= policy.consecutive_failures:
        eject(state, now, policy)
        return True
    return False


def eject(state: EndpointState, now: float, policy: OutlierPolicy) -> None:
    """Take an endpoint out of rotation for a time that grows with each repeat ejection."""
    already = not state.available(now)
    if not already or state.ejected_until <= now:
        state.ejections += 1
    duration = min(policy.base_ejection * max(1, state.ejections), policy.max_ejection)
    state.ejected_until = max(state.ejected_until, now + duration)
    state.consecutive_failures = 0
    state.needs_probe = policy.probes


def readmit(state: EndpointState, now: float) -> None:
    """A probe succeeded: traffic may return, ramping up (slow start)."""
    state.needs_probe = False
    state.ejected_until = min(state.ejected_until, now)
    state.readmitted_at = now


def correlated_domain(
    states: list[EndpointState], failed: EndpointState, now: float, policy: OutlierPolicy
) -> list[EndpointState]:
    """When most of a region or provider is out, the rest of it should go too: return those endpoints.

    A failure that takes out a share ≥ ``domain_threshold`` of a domain's endpoints (at least two of them)
    is a domain failure (a region's network, a provider's control plane), and the endpoints that have not
    failed *yet* are about to: ejecting them now saves one failed attempt per endpoint.
    """
    for domain in failed.endpoint.domains[:2]:  # provider, then region
        members = [s for s in states if domain in s.endpoint.domains and not s.draining]
        if len(members) < 2:
            continue
        down = [s for s in members if not s.available(now)]
        if len(down) >= 2 and len(down) / len(members) >= policy.domain_threshold:
            return [s for s in members if s.available(now)]
    return []


@dataclass(slots=True)
class Cluster:
    """The endpoints serving one fleet model."""

    model: str
    states: list[EndpointState] = field(default_factory=list)
    slow_start: float = 0.0

    def pick(
        self,
        now: float,
        *,
        avoid_endpoints: Iterable[str] = (),
        avoid_providers: Iterable[str] = (),
        need_continuation: bool = False,
        cooldowns: dict[str, float] | None = None,
        affinity: int | None = None,
        holder: str | None = None,
    ) -> EndpointState | None:
        """Least-loaded available endpoint, preferring providers not in ``avoid_providers``.

        With ``affinity`` (a prefix key, :mod:`skyfabric.gateway.affinity`), the key's preferred endpoint
        among those while its load stays within the bound (``holder``, the endpoint reported to hold that
        prefix, before the rendezvous choice); least-loaded otherwise.

        Ties are broken at random so that equal endpoints share load. Returns None only when no endpoint
        is left that was not already tried (or none can continue, when that is needed).
        """
        if avoid_endpoints or need_continuation:
            avoid_e = set(avoid_endpoints)
            eligible = [
                s
                for s in self.states
                if s.endpoint.id not in avoid_e and (s.continues or not need_continuation)
            ]
            if not eligible:
                return None
        else:
            eligible = self.states
            if not eligible:
                return None
        if cooldowns:
            healthy = [
                s for s in eligible if s.available(now) and cooldowns.get(s.endpoint.provider, 0.0) <= now
            ]
        else:
            healthy = [s for s in eligible if s.available(now)]
        if len(healthy) == 1:
            return healthy[0]
        cool = cooldowns or {}
        avoid_p = set(avoid_providers)
        if not healthy:
            # Panic: every candidate is ejected or cooling; try the one whose wait ends first.
            return min(eligible, key=lambda s: max(s.ejected_until, cool.get(s.endpoint.provider, 0.0)))
        fresh = [s for s in healthy if s.endpoint.provider not in avoid_p] or healthy
        loads = [s.load(now, self.slow_start) for s in fresh]
        if affinity is not None and (chosen := prefer(affinity, fresh, loads, holder)) is not None:
            return chosen
        best = min(loads)
        ties = [s for s, load in zip(fresh, loads, strict=True) if load == best]
        return ties[0] if len(ties) == 1 else random.choice(ties)
