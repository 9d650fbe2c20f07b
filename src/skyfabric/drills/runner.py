"""Runs a drill: start the harness, play the fault timeline while the workload runs, collect, stop.

A ``--baseline`` drill runs the same plan twice on the same replicas and proxies — once through the
gateway as configured, once with failover off — so that the two reports differ only in what the gateway
did about the faults.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from skyfabric.core.fleet import Fleet
from skyfabric.drills.announce import DrillAnnouncer, drill_credential, drill_id
from skyfabric.drills.faultproxy import PASS, FaultProxy, ProxyEvent
from skyfabric.drills.harness import Harness, baseline_fleet
from skyfabric.drills.loadclient import LoadClient, RequestRecord
from skyfabric.drills.metrics import MetricsSampler
from skyfabric.drills.scenario import Scenario
from skyfabric.drills.timeline import FaultSpan, build_timeline, change_points, modes_at
from skyfabric.drills.workload import Plan, plan_workload

log = logging.getLogger("skyfabric.drills")


@dataclass(slots=True)
class DrillOptions:
    """Everything ``skyfabric drill`` was asked for."""

    scenario: Scenario
    fleet: Fleet
    fleet_path: Path
    out_dir: Path
    provider: str | None = None
    region: str | None = None
    duration: float | None = None
    speed: float = 1.0
    baseline: bool = False
    seed: int = 0
    replica_timeout: float = 300.0

    @property
    def seconds(self) -> float:
        """The workload's length: ``--duration`` or the scenario's."""
        return self.duration if self.duration is not None else self.scenario.duration


@dataclass(slots=True)
class PassResult:
    """One run of the workload through one gateway configuration."""

    label: str
    records: list[RequestRecord]
    spans: list[FaultSpan]
    proxy_events: dict[str, list[ProxyEvent]]
    metrics: MetricsSampler
    duration: float
    ended: float
    switches: list[tuple[float, str, str]] = field(default_factory=list)
    fleet_file: Path | None = None
    dropped: int = 0
    #: (time, seconds late) of the drill's own event loop: proxies and client share it, so a late loop
    #: would show up as latency that is not the gateway's.
    loop_lag: list[tuple[float, float]] = field(default_factory=list)
    load: tuple[float, float] = (0.0, 0.0)

    def stalls(self, threshold: float = 0.25) -> list[tuple[float, float]]:
        """(time, seconds) of the drill's own pauses longer than ``threshold``."""
        return [(t, lag) for t, lag in self.loop_lag if lag > threshold]


@dataclass(slots=True)
class DrillRun:
    """What a drill produced, before it is turned into a report."""

    options: DrillOptions
    plan: Plan
    spans: list[FaultSpan]
    endpoints: list[str]
    main: PassResult
    baseline: PassResult | None = None
    model: str = ""
    #: Endpoint id → the backend's own URL (before the proxy), e.g. a local replica's.
    upstreams: dict[str, str] = field(default_factory=dict)


async def run_drill(options: DrillOptions) -> DrillRun:
    """Run the drill (and its baseline twin if asked); always stops every process it started."""
    scenario = options.scenario
    options.out_dir.mkdir(parents=True, exist_ok=True)
    harness = Harness(
        options.fleet, options.out_dir, seed=options.seed, replica_timeout=options.replica_timeout
    )
    model = scenario.model or options.fleet.models[0].name
    context = options.fleet.model(options.fleet.canonical(model) or model).context_length
    plan = plan_workload(
        scenario.workload,
        duration=options.seconds,
        speed=options.speed,
        seed=options.seed,
        context_length=context,
    )
    try:
        await harness.start_replicas()
        spans = build_timeline(
            scenario,
            harness.endpoints,
            duration=options.seconds,
            provider=options.provider,
            region=options.region,
        )
        await harness.start_proxies()
        await harness.warm_up(model, scenario.warmup)
        data = harness.drill_fleet()
        fleet_file = harness.write_fleet(data, "fleet.drill.yaml")
        main = await _run_pass(harness, options, plan, spans, fleet_file, "skyfabric", model)
        run = DrillRun(options, plan, spans, [e.id for e in harness.endpoints], main, model=model)
        run.upstreams = {e.id: e.url for e in harness.endpoints}
        if options.baseline:
            base_file = harness.write_fleet(baseline_fleet(data), "fleet.baseline.yaml")
            run.baseline = await _run_pass(harness, options, plan, spans, base_file, "baseline", model)
        return run
    finally:
        await harness.stop()


async def _run_pass(
    harness: Harness,
    options: DrillOptions,
    plan: Plan,
    spans: list[FaultSpan],
    fleet_file: Path,
    label: str,
    model: str,
) -> PassResult:
    scenario = options.scenario
    workload = scenario.workload
    base = await harness.start_gateway(fleet_file, f"gateway-{label}.log")
    clock = time.monotonic
    api_key = options.fleet.api_keys[0].key if options.fleet.api_keys else "drill"
    try:
        for proxy in harness.proxies.values():
            await proxy.set_mode(PASS)
            proxy.events.clear()
        t0 = clock()
        client = LoadClient(
            f"{base}/v1",
            api_key=api_key,
            model=model,
            timeout=workload.request_timeout,
            seed=options.seed,
            clock=clock,
            t0=t0,
        )
        sampler = MetricsSampler(f"{base}/metrics", clock=clock, t0=t0)
        announcer = DrillAnnouncer(base, drill_credential(options.fleet), drill_id(scenario.name, label))
        await announcer.send("start", scenario=scenario.name, duration=options.seconds)
        stop = asyncio.Event()
        sampling = asyncio.create_task(sampler.run(stop))
        switches: list[tuple[float, str, str]] = []
        lag: list[tuple[float, float]] = []
        load_before = os.getloadavg()[0]
        watching = asyncio.create_task(_watch_loop(lag, t0, clock))
        faults_on: set[str] = set()
        playing = asyncio.create_task(
            _play(spans, harness.proxies, t0, clock, switches, announcer, faults_on)
        )
        try:
            records, dropped = await _drive(client, options, plan, t0, clock)
        finally:
            for task in (playing, watching):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            for proxy in harness.proxies.values():
                await proxy.set_mode(PASS)
            ended = clock() - t0
            for span in spans:  # a fault the workload's end cut short is over now
                if span.label in faults_on:
                    await _announce(announcer, span, on=False)
            await announcer.send("end")
            await announcer.close()
            stop.set()
            await sampling
            await client.close()
        events = {
            eid: [ProxyEvent(e.t - t0, e.action, e.status, e.inference) for e in proxy.events]
            for eid, proxy in harness.proxies.items()
        }
        return PassResult(
            label,
            records,
            spans,
            events,
            sampler,
            options.seconds,
            ended,
            switches,
            fleet_file,
            dropped,
            lag,
            (load_before, os.getloadavg()[0]),
        )
    finally:
        await harness.stop_gateway()


async def _watch_loop(lag: list[tuple[float, float]], t0: float, clock: Callable[[], float]) -> None:
    """Measure how late the drill's event loop wakes up (every 100 ms)."""
    while True:
        before = clock()
        await asyncio.sleep(0.1)
        lag.append((before - t0, max(0.0, clock() - before - 0.1)))


async def _play(
    spans: list[FaultSpan],
    proxies: dict[str, FaultProxy],
    t0: float,
    clock: Callable[[], float],
    switches: list[tuple[float, str, str]],
    announcer: DrillAnnouncer | None = None,
    on: set[str] | None = None,
) -> None:
    """Switch each proxy's mode at every change point of the timeline (and tell the gateway's dashboard
    which faults went on or off, after the switch, so the timeline never shows a fault early)."""
    ids = list(proxies)
    on = set() if on is None else on  # the labels of the faults announced on
    for t in change_points(spans):
        delay = t0 + t - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        for eid, mode in modes_at(spans, t, ids).items():
            if proxies[eid].mode != mode:
                await proxies[eid].set_mode(mode)
                switches.append((clock() - t0, eid, mode.describe()))
        if announcer is not None:
            for span in spans:
                if span.active(t) != (span.label in on):
                    on.symmetric_difference_update({span.label})
                    await _announce(announcer, span, on=span.active(t))


async def _announce(announcer: DrillAnnouncer, span: FaultSpan, *, on: bool) -> None:
    await announcer.send(
        "fault_on" if on else "fault_off", fault=span.label, target=span.target, mode=span.kind
    )


async def _drive(
    client: LoadClient, options: DrillOptions, plan: Plan, t0: float, clock: Callable[[], float]
) -> tuple[list[RequestRecord], int]:
    """Send the workload, then wait up to the scenario's ``drain`` for answers still in flight."""
    scenario = options.scenario
    workload = scenario.workload
    duration = options.seconds
    records: list[RequestRecord] = []
    tasks: list[asyncio.Task[RequestRecord]] = []

    in_flight = 0

    def landed(_: asyncio.Task[RequestRecord]) -> None:
        nonlocal in_flight
        in_flight -= 1

    def launch(prompt: int, output: int, stream: bool) -> asyncio.Task[RequestRecord]:
        nonlocal in_flight
        record = client.new(len(records), prompt, output, stream)
        records.append(record)
        task = asyncio.create_task(client.send(record))
        in_flight += 1
        task.add_done_callback(landed)
        tasks.append(task)
        return task

    dropped = 0
    if workload.kind == "closed":
        assert plan.sizer is not None
        sizer = plan.sizer
        rng = random.Random(options.seed + 1)
        think = workload.think_time / options.speed

        async def user() -> None:
            while clock() - t0 < duration:
                prompt, output = sizer.draw(rng)
                await asyncio.wait({launch(prompt, output, rng.random() < workload.stream_fraction)})
                if think > 0:
                    await asyncio.sleep(rng.expovariate(1.0 / think))

        users = [asyncio.create_task(user()) for _ in range(workload.users)]
        await asyncio.sleep(max(0.0, t0 + duration - clock()))
        for u in users:
            u.cancel()
        await asyncio.gather(*users, return_exceptions=True)
    else:
        for planned in plan.arrivals:
            delay = t0 + planned.at - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            if in_flight >= workload.max_in_flight:
                dropped += 1
                continue
            launch(planned.prompt_tokens, planned.output_tokens, planned.stream)
        await asyncio.sleep(max(0.0, t0 + duration - clock()))
    pending = [t for t in tasks if not t.done()]
    if pending:
        await asyncio.wait(pending, timeout=scenario.drain)
    unfinished = [t for t in tasks if not t.done()]
    if unfinished:
        log.warning(
            "%d requests still unanswered %gs after the workload ended", len(unfinished), scenario.drain
        )
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)
        for record in records:
            if record.end is None:
                record.error = "unfinished"
                record.message = f"no answer {scenario.drain:g}s after the workload ended (drain limit)"
    return records, dropped
