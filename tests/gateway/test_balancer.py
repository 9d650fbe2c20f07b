"""Outlier detection and endpoint choice as plain functions of the time (a fake clock)."""

from __future__ import annotations

import random

from skyfabric.core.endpoints import Endpoint
from skyfabric.gateway.balancer import (
    Cluster,
    EndpointState,
    OutlierPolicy,
    correlated_domain,
    parse_retry_after,
    readmit,
    record_failure,
    record_success,
)
from skyfabric.gateway.retry import RetryBudget, backoff


def endpoint(provider: str, index: int = 0, *, can_continue: bool = True) -> Endpoint:
    return Endpoint(
        provider,
        "r",
        "p",
        index,
        f"http://127.0.0.1:{9000 + index}/v1",
        "m",
        "m",
        "vllm",
        "cpu",
        can_continue,
        10,
        1.0,
    )


def test_three_soft_failures_eject_with_growing_duration() -> None:
    state, policy = EndpointState(endpoint("aws")), OutlierPolicy(consecutive_failures=3, base_ejection=2.0)
    assert not record_failure(state, 100.0, policy)
    assert not record_failure(state, 100.1, policy)
    assert record_failure(state, 100.2, policy)
    assert not state.available(101.0) and state.available(102.3)
    for _ in range(3):
        record_failure(state, 110.0, policy)
    assert state.ejected_until == 114.0  # second ejection lasts twice as long


def test_a_success_clears_the_streak_and_hard_failures_eject_at_once() -> None:
    state, policy = EndpointState(endpoint("aws")), OutlierPolicy()
    record_failure(state, 1.0, policy)
    record_failure(state, 1.0, policy)
    record_success(state, 1.5)
    assert not record_failure(state, 2.0, policy)
    assert record_failure(state, 2.0, policy, hard=True)


def test_ejection_is_capped() -> None:
    state, policy = EndpointState(endpoint("aws")), OutlierPolicy(base_ejection=10, max_ejection=25)
    now = 0.0
    for _ in range(5):
        record_failure(state, now, policy, hard=True)
        now = state.ejected_until
    assert state.ejections == 5
    assert state.ejected_until - state.last_failure == 25


def test_failures_of_requests_already_in_flight_do_not_extend_an_ejection() -> None:
    state, policy = EndpointState(endpoint("aws")), OutlierPolicy(base_ejection=10)
    record_failure(state, 0.0, policy, hard=True)
    for _ in range(5):
        record_failure(state, 1.0, policy, hard=True)
    assert state.ejections == 1 and state.ejected_until == 11.0


def test_half_open_probe_and_slow_start() -> None:
    state = EndpointState(endpoint("aws"))
    policy = OutlierPolicy(base_ejection=2, probes=True)
    record_failure(state, 0.0, policy, hard=True)
    assert not state.available(5.0)  # ejection over, but no probe yet
    readmit(state, 5.0)
    assert state.available(5.0)
    other = EndpointState(endpoint("gcp", 1))
    other.outstanding = 5  # busier than the readmitted one, which still ramps up
    cluster = Cluster("m", [state, other], slow_start=10.0)
    assert cluster.pick(5.5) is other
    assert cluster.pick(20.0) is state


def test_correlated_failures_eject_the_whole_region() -> None:
    states = [EndpointState(endpoint("aws", i)) for i in range(4)] + [EndpointState(endpoint("gcp", 9))]
    policy = OutlierPolicy()
    record_failure(states[0], 0.0, policy, hard=True)
    assert correlated_domain(states, states[0], 0.0, policy) == []  # one of four: could be one host
    record_failure(states[1], 0.1, policy, hard=True)
    rest = correlated_domain(states, states[1], 0.1, policy)
    assert rest == states[2:4]  # half of aws is out: the rest of aws goes, gcp stays


def test_pick_prefers_least_loaded_then_other_providers_then_panics() -> None:
    a, b, c = (EndpointState(endpoint(p, i)) for i, p in enumerate(["aws", "aws", "gcp"]))
    cluster = Cluster("m", [a, b, c])
    a.outstanding, b.outstanding, c.outstanding = 3, 1, 2
    assert cluster.pick(0.0) is b
    assert cluster.pick(0.0, avoid_providers={"aws"}) is c
    assert cluster.pick(0.0, avoid_endpoints={b.endpoint.id}) is c
    for s in (a, b, c):
        s.ejected_until = 50.0 + s.endpoint.index
    assert cluster.pick(10.0) is a  # panic: all ejected, take the one back soonest
    assert cluster.pick(10.0, avoid_endpoints={s.endpoint.id for s in (a, b, c)}) is None


def test_pick_respects_continuation_capability_and_cooldowns() -> None:
    able, unable = EndpointState(endpoint("aws", 0)), EndpointState(endpoint("gcp", 1, can_continue=False))
    cluster = Cluster("m", [able, unable])
    able.outstanding = 5
    assert cluster.pick(0.0) is unable
    assert cluster.pick(0.0, need_continuation=True) is able
    assert cluster.pick(0.0, cooldowns={"gcp": 30.0}) is able
    assert cluster.pick(31.0, cooldowns={"gcp": 30.0}) is unable


def test_ties_are_broken_at_random() -> None:
    random.seed(1)
    states = [EndpointState(endpoint("aws", i)) for i in range(4)]
    cluster = Cluster("m", states)
    picked = {cluster.pick(0.0).endpoint.index for _ in range(200)}  # type: ignore[union-attr]
    assert picked == {0, 1, 2, 3}


def test_retry_budget_and_backoff() -> None:
    budget = RetryBudget(percent=20, min_concurrent=2, active_requests=100, active_retries=19)
    assert budget.allow()
    budget.active_retries = 20
    assert not budget.allow() and budget.refused == 1
    quiet = RetryBudget(percent=20, min_concurrent=2, active_requests=1, active_retries=1)
    assert quiet.allow()  # the floor lets a quiet gateway retry
    rng = random.Random(0)
    assert all(0 <= backoff(n, 0.1, 1.0, rng) <= min(1.0, 0.1 * 2 ** (n - 1)) for n in range(1, 8))


def test_retry_after_parsing() -> None:
    assert parse_retry_after(b"7", 0.0) == 7.0
    assert parse_retry_after(b"Wed, 21 Oct 2015 07:28:00 GMT", 1445412470.0) == 10.0
    assert parse_retry_after(b"soon", 0.0) is None
    assert parse_retry_after(None, 0.0) is None
