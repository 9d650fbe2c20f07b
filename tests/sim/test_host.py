"""Replicas on a shared host: processor sharing of its cores, the embedded batcher's steps, measured costs."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from skyfabric.control.plan import Offer, Plan, Requirements
from skyfabric.core.errors import RemoteProtocolError
from skyfabric.sim.clock import VirtualClockLoop
from skyfabric.sim.fleetsim import Loss, SimRequest, Workload, _pct, simulate
from skyfabric.sim.host import Host, HostSpec, SteppedReplica, StepProfile, load_step_profile

#: Round figures, so expected times can be written down: prefill 10 ms + 0.1 ms/token, decode 5 + 1 ms/seq.
PROFILE = StepProfile(0.010, 0.0001, 0.005, 0.001, slots=16)


T = TypeVar("T")


def _run(body: Callable[[asyncio.AbstractEventLoop], Awaitable[T]]) -> T:
    loop = VirtualClockLoop()
    try:
        return loop.run_until_complete(body(loop))
    finally:
        loop.close()


def _one_request_time(loop: asyncio.AbstractEventLoop, replica: SteppedReplica) -> asyncio.Future[None]:
    return replica.submit(SimRequest(loop.time(), prompt_tokens=100, output_tokens=11))


def test_a_lone_request_takes_its_prefill_step_then_one_decode_step_per_token() -> None:
    async def body(loop: asyncio.AbstractEventLoop) -> tuple[float, float | None]:
        replica = SteppedReplica(loop, Host("box", cores=2), PROFILE, slots=16)
        req = SimRequest(0.0, prompt_tokens=100, output_tokens=11)
        await replica.submit(req)
        return loop.time(), req.first_token

    done, first = _run(body)
    assert first == pytest.approx(0.010 + 100 * 0.0001)  # the prefill step samples the first token
    assert done == pytest.approx(0.020 + 10 * 0.006)  # then ten decode steps of a batch of one


def test_replicas_on_one_host_share_its_cores_and_losing_one_speeds_the_others_up() -> None:
    """Three busy replicas on two cores step at 2/3 speed; two busy ones at full speed; accelerators
    of their own are never slowed by a neighbour."""

    async def body(loop: asyncio.AbstractEventLoop, busy: int, cores: float | None) -> float:
        shared = Host("box", cores=cores or 1)
        replicas = [
            SteppedReplica(loop, shared if cores else Host(f"own-{i}", cores=1), PROFILE, slots=16)
            for i in range(busy)
        ]
        futures = [_one_request_time(loop, r) for r in replicas]
        await asyncio.gather(*futures)
        assert shared.busy == 0  # every replica went idle and said so
        return loop.time()

    alone = 0.020 + 10 * 0.006
    assert _run(lambda loop: body(loop, 3, 2)) == pytest.approx(alone * 1.5)
    assert _run(lambda loop: body(loop, 2, 2)) == pytest.approx(alone)
    assert _run(lambda loop: body(loop, 3, None)) == pytest.approx(alone)


def test_background_work_on_the_host_slows_every_step() -> None:
    async def body(loop: asyncio.AbstractEventLoop) -> float:
        replica = SteppedReplica(loop, Host("box", cores=2, background=3.0), PROFILE, slots=16)
        await _one_request_time(loop, replica)
        return loop.time()

    assert _run(body) == pytest.approx((0.020 + 10 * 0.006) * 2.0)  # (1 busy + 3) / 2 cores


def test_a_batch_decodes_together_and_a_full_replica_queues() -> None:
    async def body(loop: asyncio.AbstractEventLoop) -> list[float]:
        replica = SteppedReplica(loop, Host("box", cores=1), PROFILE, slots=2)
        reqs = [SimRequest(0.0, prompt_tokens=10, output_tokens=3) for _ in range(3)]
        futures = [replica.submit(r) for r in reqs]
        assert len(replica.waiting) == 3 and replica.stepping
        await asyncio.gather(*futures)
        return [r.first_token or math.nan for r in reqs]

    first = _run(body)
    both = 0.010 + 20 * 0.0001  # the first two prompts share one prefill step
    assert first[0] == first[1] == pytest.approx(both)
    # the third waits for a slot: two decode steps of two, then its own prefill
    assert first[2] == pytest.approx(both + 2 * (0.005 + 2 * 0.001) + 0.010 + 10 * 0.0001)


def test_a_blackholed_replica_computes_on_unseen_and_a_gateway_abort_frees_it() -> None:
    async def body(loop: asyncio.AbstractEventLoop) -> None:
        host = Host("box", cores=2)
        replica = SteppedReplica(loop, host, PROFILE, slots=16)
        a = replica.submit(SimRequest(0.0, prompt_tokens=10, output_tokens=200))
        b = replica.submit(SimRequest(0.0, prompt_tokens=10, output_tokens=5))
        replica.freeze()
        await asyncio.sleep(0.2)
        assert host.busy == 1 and replica.steps > 5  # still stepping: only its network is cut
        assert not a.done() and not b.done()  # b finished, but its answer went nowhere
        assert len(replica.limbo) == 1
        replica.fail(a, "aws", "aborted by the gateway")
        replica.fail(b, "aws", "aborted by the gateway")
        for future in (a, b):
            with pytest.raises(RemoteProtocolError):
                await future
        await asyncio.sleep(0.1)
        assert host.busy == 0 and not replica.running and not replica.limbo

    _run(body)


def test_the_shipped_embedded_profile_is_a_measurement_with_its_source() -> None:
    profile = load_step_profile()
    assert "bench/replica_steps.py" in profile.source
    assert 0 < profile.prefill_per_token_s < profile.decode_fixed_s  # a token of prefill ≪ a decode pass
    assert profile.decode_s(16) > profile.decode_s(1) > 0
    assert profile.slots == 16  # what the embedded fleet's capacity.concurrency says


def _embedded_outage(hosts: dict[str, HostSpec] | None) -> tuple[float, float]:
    offers = [
        Offer("aws", "us-east-1", "trainium2", "local", 1.34, 20.0, concurrency=16, name="trn2"),
        Offer("gcp", "us-central1", "tpu-v6e", "local", 1.38, 20.0, concurrency=16, name="v6e"),
        Offer("azure", "eastus", "nvidia-h100", "local", 2.49, 20.0, concurrency=16, name="h100"),
    ]
    plan = Plan(offers, [1, 1, 1], Requirements(6.0), 0.0)
    work = Workload(6.0, [(60, 30), (120, 50), (30, 10)])
    result = simulate(
        plan,
        "skyfabric-code",
        work,
        120.0,
        Loss("aws", 40.0, 40.0, "blackhole"),
        ttft0=0.02,
        seed=1,
        hosts=hosts,
        fleet_overrides={"timeouts": {"connect": 1.0, "first_byte": 10.0, "idle": 5.0, "total": 300.0}},
    )
    before, during, _ = result.phases
    assert before.ok == before.requests and during.ok == during.requests
    return _pct(before.latency, 0.5), _pct(during.latency, 0.5)


def test_on_a_shared_host_the_survivors_speed_up_when_a_replica_is_lost() -> None:
    """The drill's own observation, reproduced: three replicas on two cores, one blackholed — the two left
    get a core each, so latency does not grow by the half more load each carries, as it does on
    independent accelerators."""
    spec = HostSpec("embedded", 2.0, 0.0, PROFILE)
    shared_before, shared_during = _embedded_outage({"trn2": spec, "v6e": spec, "h100": spec})
    own_before, own_during = _embedded_outage(
        {p: HostSpec(p, 1.0, 0.0, PROFILE) for p in ("trn2", "v6e", "h100")}
    )
    assert shared_during / shared_before < own_during / own_before
    assert own_during > own_before  # independent: the survivors batch more, each request is slower
