"""The vendor-outage drill: one Claude model on Bedrock, Vertex AI and Anthropic's API; AWS partitioned away.

Issue #12's last acceptance check. The fleet serves one model (``m``, Claude Sonnet 4.5) from three vendors'
stand-ins — two Bedrock runtime endpoints (us-east-1, us-west-2; SigV4 checked), one Vertex AI endpoint
(publisher ``anthropic``, OAuth checked) and Anthropic's API — which share one deterministic "model", so a
stream cut on one vendor continues exactly on another. Each Bedrock endpoint sits behind a drill
:class:`~skyfabric.drills.faultproxy.FaultProxy`. Concurrent clients on both official SDKs (OpenAI's and
Anthropic's; text and tool calls) stream through the real gateway (in process, so its in-flight counters can
be checked) for a baseline phase; then every Bedrock proxy is blackholed (connections freeze, nothing
answers: a partition, not an error) and the load goes on until the end of the run.

What must hold: no client sees an error; every answer — above all the streams that were flowing on Bedrock
when it vanished — is exactly the uninterrupted answer for its request (computed first, with no fault); the
gateway sends no model call to Bedrock once it has ejected it (timed where the gateway sends it: the fault
proxies, in this process too, may read a call sent just before the ejection just after it); TTFT p99
during the outage within 1.5× of the baseline's; every in-flight counter back to zero. The worst case
depends on hedging, so both are run: with the model's ``hedge`` on, the max TTFT too stays within 1.5×;
without it, a request sent into the hole in the instant before detection waits for the stall watchdog, and
the max is bounded by ``health.stall``.

How TTFT phases are counted (honestly): *baseline* is every stream that started before the blackhole and had
its first token before it; *outage* is every other stream — those started during the outage, and those that
had started but were still waiting for their first token when the blackhole began (they wait for detection:
they are the outage's cost, not the baseline's).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from skyfabric.core.endpoints import fleet_endpoints
from skyfabric.core.fleet import parse_fleet
from skyfabric.drills.faultproxy import FaultMode, FaultProxy
from skyfabric.gateway.app import Gateway
from skyfabric.gateway.serve import make_listener
from tests.conftest import fleet_data
from tests.support.anthropic_standin import StandIn
from tests.support.aws_env import clean_aws_env
from tests.support.bedrock_standin import BedrockStandIn
from tests.support.counters import assert_released
from tests.support.tools import OPENAI_TOOLS, TOOLS
from tests.support.vertex_standin import VertexStandIn

pytestmark = pytest.mark.slow

CLAUDE = "claude-sonnet-4-5-20250929"
#: Seconds between two content deltas of every stand-in (a model decoding; 40–80 tokens, ~3 per delta).
DELTA_DELAY = 0.004
CLIENTS_PER_SDK = 6
BASELINE_S = 9.0
OUTAGE_S = 9.0
#: The fleet's failure detection, tuned to the stand-ins' pace (deltas every few ms), not to a test's
#: impatience: a stream silent for 0.5 s while its peers flow is gone; a real fleet would use ~1-2 s.
TUNING: dict[str, Any] = {
    "health": {"stall": 0.5, "probe_interval": 0.5, "probe_timeout": 0.3, "base_ejection": 5.0},
    "timeouts": {"connect": 0.5, "first_byte": 2.0, "first_token": 5.0, "idle": 2.0, "total": 60.0},
    "retry": {"outage_wait": 2.0},
}
#: Hedging of late first tokens (``models[].hedge``): a request sent into the hole before the gateway has
#: noticed it gets a second copy on another vendor once its first token is later than the fleet's p95,
#: instead of waiting for detection (``health.stall``). The floor is the stand-ins' scale (TTFT ~10 ms).
HEDGE: dict[str, Any] = {"after": "p95", "min_after": 0.02}
PROMPTS = [
    "Write some code",
    "Explain the router in a few lines",
    "How does a stream continue after a cut?",
    "Describe the retry budget",
    "What does the gateway do when a region drains?",
    "Call the tool for Paris, please",  # a tool call
    "Summarise the latency window",
    "Call the tool for Lisbon",  # a tool call
]


@dataclass(frozen=True, slots=True)
class Ask:
    """One request of the catalogue: which SDK, which prompt."""

    sdk: str  # "openai" | "anthropic"
    prompt: str

    @property
    def tools(self) -> bool:
        return self.prompt.startswith("Call the tool")


@dataclass(slots=True)
class Seen:
    """What one client saw of one request; times on the monotonic clock."""

    ask: Ask
    start: float
    ttft: float | None = None
    end: float | None = None
    text: str = ""
    tool: tuple[str, Any] | None = None  # (name, parsed arguments)
    finish: str | None = None
    backend: str = ""
    error: str | None = None

    @property
    def answer(self) -> tuple[str, tuple[str, Any] | None]:
        return self.text, self.tool


FINISHED = {"openai": {"stop", "tool_calls"}, "anthropic": {"end_turn", "tool_use"}}


async def ask_openai(client: openai.AsyncOpenAI, ask: Ask, seen: Seen) -> None:
    extra: dict[str, Any] = {"tools": OPENAI_TOOLS} if ask.tools else {}
    stream = await client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": ask.prompt}],
        max_tokens=400,
        temperature=0,
        stream=True,
        **extra,
    )
    seen.backend = stream.response.headers.get("x-skyfabric-backend", "")
    name, args = "", ""
    async for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta
            if (delta.content or delta.tool_calls) and seen.ttft is None:
                seen.ttft = time.monotonic() - seen.start
            seen.text += delta.content or ""
            for call in delta.tool_calls or []:
                name += call.function.name or "" if call.function else ""
                args += call.function.arguments or "" if call.function else ""
            seen.finish = choice.finish_reason or seen.finish
    if name:
        seen.tool = (name, json.loads(args))


async def ask_anthropic(client: anthropic.AsyncAnthropic, ask: Ask, seen: Seen) -> None:
    extra: dict[str, Any] = {"tools": TOOLS} if ask.tools else {}
    async with client.messages.stream(
        model="m",
        max_tokens=400,
        extra_body={"temperature": 0},
        messages=[{"role": "user", "content": ask.prompt}],
        **extra,
    ) as stream:
        seen.backend = stream.response.headers.get("x-skyfabric-backend", "")
        async for event in stream:
            if event.type == "content_block_delta" and seen.ttft is None:
                seen.ttft = time.monotonic() - seen.start
        message = await stream.get_final_message()
    seen.finish = message.stop_reason
    seen.text = "".join(b.text for b in message.content if b.type == "text")
    calls = [b for b in message.content if b.type == "tool_use"]
    if calls:
        seen.tool = (calls[0].name, calls[0].input)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The stand-ins' AWS keys in the environment; no host files, no metadata service."""
    clean_aws_env(monkeypatch, tmp_path)


@dataclass
class Fleet:
    """The running drill: stand-ins, Bedrock's fault proxies, the gateway, both SDK clients."""

    bedrock: list[BedrockStandIn]
    vertex: VertexStandIn
    vendor: StandIn
    proxies: dict[str, FaultProxy]  # endpoint id → the fault proxy in front of it
    gateway: Gateway
    openai: openai.AsyncOpenAI
    anthropic: anthropic.AsyncAnthropic
    #: (when, endpoint id, why) of every ejection, as the gateway decided it.
    ejections: list[tuple[float, str, str]] = field(default_factory=list)
    #: (when, endpoint id) of every model call the gateway sent.
    calls: list[tuple[float, str]] = field(default_factory=list)

    async def ask(self, ask: Ask) -> Seen:
        seen = Seen(ask, time.monotonic())
        try:
            if ask.sdk == "openai":
                await ask_openai(self.openai, ask, seen)
            else:
                await ask_anthropic(self.anthropic, ask, seen)
        except Exception as exc:  # what the client was told: a failure the test reports
            seen.error = f"{type(exc).__name__}: {exc}"
        seen.end = time.monotonic()
        return seen

    def rescued(self) -> float:
        value = self.gateway.proxy.metrics.registry.get_sample_value("skyfabric_rescued_streams_total")
        return value or 0.0


@contextlib.asynccontextmanager
async def vendor_fleet(tmp_path: Path, hedge: dict[str, Any] | None) -> AsyncIterator[Fleet]:
    east = BedrockStandIn("bedrock-east", region="us-east-1", delta_delay=DELTA_DELAY)
    west = BedrockStandIn("bedrock-west", region="us-west-2", delta_delay=DELTA_DELAY)
    vertex = VertexStandIn("vertex", publisher="anthropic", delta_delay=DELTA_DELAY)
    vendor = StandIn("anthropic", delta_delay=DELTA_DELAY)
    vendor.model = CLAUDE  # the same model as Bedrock's anthropic.claude-sonnet-4-5-… and Vertex's …@20250929
    standins: list[StandIn] = [east, west, vertex, vendor]
    proxies = {f"aws/{up.region}/pool/0": FaultProxy("127.0.0.1", 0, name=up.name) for up in (east, west)}
    listener = gateway = None
    try:
        for up in standins:
            await up.start()
        vertex.service_account_file(tmp_path)
        for p, up in zip(proxies.values(), (east, west), strict=True):
            p.upstream_port = up.port
            await p.start()
        vendors: Any = {
            "aws": {"us-east-1": [east], "us-west-2": [west]},
            "gcp": [vertex],
            "anthropic": [vendor],
        }
        data = fleet_data(
            vendors,
            models=[{"name": "m", **({"hedge": hedge} if hedge else {})}],
            **TUNING,
        )
        # Bedrock is reached through its fault proxies only (SigV4 signs the proxy's host, as sent).
        for region, p in zip(data["providers"][0]["regions"], proxies.values(), strict=True):
            region["pools"][0]["endpoints"] = [f"http://{p.url_authority}"]
        fleet = parse_fleet(data)
        gateway = Gateway(fleet, fleet_endpoints(fleet))
        await gateway.start()
        listener = make_listener(gateway, fleet.listener)
        root = f"http://127.0.0.1:{await listener.start('127.0.0.1', 0)}"
        drill = Fleet(
            [east, west],
            vertex,
            vendor,
            proxies,
            gateway,
            openai.AsyncOpenAI(base_url=root + "/v1", api_key="sk-test-key-0001", max_retries=0, timeout=30),
            anthropic.AsyncAnthropic(base_url=root, api_key="sk-test-key-0001", max_retries=0, timeout=30),
        )
        router = gateway.proxy
        after_ejection = router.after_ejection

        def record(state: Any, reason: str) -> None:
            drill.ejections.append((time.monotonic(), state.endpoint.id, reason))
            after_ejection(state, reason)

        router.after_ejection = record  # type: ignore[method-assign]
        opened = router.open

        async def open_call(state: Any, *args: Any, **kwargs: Any) -> Any:
            # When the gateway sends a model call, and to whom: the proxies time a call when their task reads
            # it, which in this one process may come after an ejection that followed the send.
            drill.calls.append((time.monotonic(), state.endpoint.id))
            return await opened(state, *args, **kwargs)

        router.open = open_call  # type: ignore[method-assign]
        try:
            yield drill
        finally:
            await drill.openai.close()
            await drill.anthropic.close()
    finally:
        if listener is not None:
            await listener.stop(grace=0.5)
        if gateway is not None:
            await gateway.close()
        for p in proxies.values():
            await p.stop()
        for up in standins:
            await up.stop()


@dataclass
class Run:
    """What the load saw; times on the monotonic clock."""

    seen: list[Seen]
    started: float
    blackholed: float
    ended: float
    #: (time since the start, seconds) of this process's own event-loop pauses over 40 ms.
    pauses: list[tuple[float, float]]


async def run_load(drill: Fleet, catalogue: list[Ask]) -> Run:
    """Closed-loop streaming clients on both SDKs; every Bedrock proxy blackholed after ``BASELINE_S``."""
    seen: list[Seen] = []
    pauses: list[tuple[float, float]] = []
    stop_at = time.monotonic() + BASELINE_S + OUTAGE_S

    async def client(index: int, sdk: str) -> None:
        asks = [a for a in catalogue if a.sdk == sdk]
        while time.monotonic() < stop_at:
            seen.append(await drill.ask(asks[index % len(asks)]))
            index += 1

    async def watch_loop(started: float) -> None:
        # The clients, the stand-ins and the proxies share the gateway's process: its pauses are theirs.
        while time.monotonic() < stop_at:
            t = time.monotonic()
            await asyncio.sleep(0.01)
            if (lag := time.monotonic() - t - 0.01) > 0.04:
                pauses.append((t - started, lag))

    # The test process also holds every stand-in's record of every request; a generation-2 collection of
    # that heap pauses everything for 120-150 ms at random (measured), which is the harness, not the
    # gateway. Frozen after setup, collections stay short; the loop's pauses are still measured.
    gc.collect()
    gc.freeze()
    try:
        started = time.monotonic()
        watcher = asyncio.create_task(watch_loop(started))
        load = [
            asyncio.create_task(client(i, s)) for s in ("openai", "anthropic") for i in range(CLIENTS_PER_SDK)
        ]
        await asyncio.sleep(BASELINE_S)
        blackholed = time.monotonic()
        for p in drill.proxies.values():
            await p.set_mode(FaultMode(blackhole=True))
        await asyncio.gather(*load)
        ended = time.monotonic()
        await watcher
    finally:
        gc.unfreeze()
    return Run(seen, started, blackholed, ended, pauses)


def ms(seconds: float) -> str:
    return f"{1000 * seconds:.0f}"


@pytest.mark.parametrize("hedging", [True, False], ids=["hedging", "no-hedging"])
async def test_every_bedrock_endpoint_blackholed_mid_run(aws: None, tmp_path: Path, hedging: bool) -> None:
    catalogue = [Ask(sdk, prompt) for sdk in ("openai", "anthropic") for prompt in PROMPTS]
    async with vendor_fleet(tmp_path, HEDGE if hedging else None) as drill:
        # -- reference answers: every request once, with no fault (this also warms every vendor up) --
        reference: dict[Ask, tuple[str, Any]] = {}
        for ask in catalogue:
            got = await drill.ask(ask)
            assert got.error is None and got.finish in FINISHED[ask.sdk], got
            reference[ask] = got.answer
        assert any(reference[a][1] for a in catalogue if a.tools), "no tool call in the catalogue"
        rescued_before = drill.rescued()

        run = await run_load(drill, catalogue)
        t0, cut = run.started, run.blackholed

        # -- what the clients saw: no error, and every answer the uninterrupted one --
        errors = [s for s in run.seen if s.error or s.finish not in FINISHED[s.ask.sdk]]
        wrong = [s for s in run.seen if s.answer != reference[s.ask]]
        # streams committed on Bedrock (x-skyfabric-backend names the first backend) still running at the cut
        on_bedrock = [
            s for s in run.seen if s.backend.startswith("aws/") and s.start < cut and (s.end or 0.0) > cut
        ]
        rescued = drill.rescued() - rescued_before

        # -- what Bedrock saw: no model call once the gateway had ejected it --
        detected: dict[str, float] = {}
        for t, eid, _ in drill.ejections:
            if eid.startswith("aws/") and t >= cut:
                detected.setdefault(eid, t)
        # Sent by the gateway after it had ejected the endpoint (the property); and, for the report, what the
        # proxies read after the ejection (a call sent just before it may be read just after, in-process).
        late = {
            eid: sum(1 for t, e in drill.calls if e == eid and t > detected.get(eid, cut))
            for eid in drill.proxies
        }
        read_late = {
            eid: sum(1 for e in p.events if e.inference and e.t > detected.get(eid, cut))
            for eid, p in drill.proxies.items()
        }
        held = Counter(
            e.action for p in drill.proxies.values() for e in p.events if e.inference and e.t >= cut
        )
        served_after = [s for s in run.seen if s.start >= max(detected.values(), default=cut)]

        # -- time to first token: baseline = first token before the cut; outage = every other stream --
        baseline = [s.ttft for s in run.seen if s.ttft is not None and s.start + s.ttft < cut]
        outage = [s.ttft for s in run.seen if s.ttft is not None and s.start + s.ttft >= cut]
        waited = [s.ttft for s in run.seen if s.ttft is not None and s.start < cut <= s.start + s.ttft]

        def phase(name: str, ttfts: list[float], a: float, b: float) -> str:
            p50, p99 = percentile(ttfts, 50), percentile(ttfts, 99)
            window = f"{a - t0:.1f}–{b - t0:.1f} s"
            return f"| {name} | {window} | {len(ttfts)} | {ms(p50)} / {ms(p99)} / {ms(max(ttfts))} |"

        report = [
            "",
            f"### vendor-outage drill ({'hedging p95, floor 20 ms' if hedging else 'no hedging'})",
            f"{2 * CLIENTS_PER_SDK} closed-loop streaming clients (openai + anthropic SDKs, text and tool "
            "calls), "
            f"{len(run.seen)} requests; every Bedrock endpoint blackholed at {cut - t0:.1f} s until the end",
            "",
            "| phase | window | streams | TTFT p50 / p99 / max (ms) |",
            "|---|---|---|---|",
            phase("baseline", baseline, t0, cut),
            phase("outage", outage, cut, run.ended),
            "",
            "- detection (blackhole → ejection): "
            + ", ".join(f"{eid} {ms(t - cut)} ms" for eid, t in sorted(detected.items())),
            f"- outage streams that had started before the cut, waiting for their first token: {len(waited)}"
            + (f" (TTFT max {ms(max(waited))} ms)" if waited else ""),
            f"- streams on Bedrock still open at the cut: {len(on_bedrock)}, all ended identical to the "
            f"uninterrupted answer; {rescued:.0f} of them continued on another vendor (the gateway's "
            "rescued-stream counter"
            + (
                "; the others had been relayed whole just before the cut)"
                if rescued < len(on_bedrock)
                else ")"
            ),
            f"- client-visible errors: {len(errors)}; answers differing from the uninterrupted one: "
            f"{len(wrong)}",
            f"- model calls sent to Bedrock after its ejection: {sum(late.values())} (read by its proxies "
            f"after the ejection, sent before it: {sum(read_late.values()) - sum(late.values())}); "
            "during the outage, "
            f"by what the proxies did: {dict(held) or 'none'}",
            "- drill process pauses over 40 ms: "
            + (", ".join(f"{ms(lag)} ms at {t:.1f} s" for t, lag in run.pauses) or "none"),
        ]
        print("\n".join(report))
        assert not errors, f"{len(errors)} client-visible errors, e.g. {errors[:3]}"
        assert not wrong, f"{len(wrong)} answers differ from the uninterrupted ones, e.g. {wrong[:2]}"
        assert on_bedrock, "no stream was in flight on Bedrock when it was blackholed"
        assert 1 <= rescued <= len(on_bedrock)
        assert sorted(detected) == sorted(drill.proxies), drill.ejections
        assert not any(late.values()), f"model calls sent to Bedrock after its ejection: {late}"
        assert not any(s.backend.startswith("aws/") for s in served_after)
        assert percentile(outage, 99) <= 1.5 * percentile(baseline, 99), report
        if hedging:
            assert max(outage) <= 1.5 * max(baseline), report
        else:
            # Without hedging a request sent into the hole before detection waits for it: the worst case
            # is bounded by the stall watchdog (stall + its tick), plus a normal first token elsewhere.
            assert max(outage) <= TUNING["health"]["stall"] + 0.2 + max(baseline), report
        assert not any(b.refusals for b in drill.bedrock) and drill.vertex.unauthenticated == 0
        await assert_released(drill.gateway.proxy)
