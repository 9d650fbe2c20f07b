"""Does the simulator agree with a real drill? The embedded fleet, the committed `trace-outage` drill.

    PYTHONPATH=src python bench/sim_vs_drill.py [docs/drills/results/trace-outage-aws/report.json]

The drill (run by `skyfabric drill trace-outage --provider aws`, committed under docs/drills/results/)
replayed the Azure conversation trace at ×1.5 for 600 s through the real gateway in front of the embedded
fleet (three local CPU replicas, 16 sequences each), with aws blackholed from 240 s to 360 s.

The simulator gets the same fleet (one replica per provider, the embedded fleet's timeouts and retry
knobs), the same workload (the trace's first 15 minutes at ×1.5: its per-minute rate over 40-s periods,
its sizes scaled and clamped as the drill did), and the same loss window (`--mode blackhole`). The
replica model has two free figures, calibrated on the drill's BEFORE phase only: TTFT at idle and time
per token. The comparison is on the DURING and AFTER phases, with tolerances fixed before the run:

    success rate   |sim − drill| ≤ 0.5 percentage points
    TTFT p50       |sim − drill| ≤ max(50 ms, 30 %)
    latency p50    |sim − drill| ≤ 30 %
    retries        both ≤ 2 % of the phase's requests

Differences in kind, stated: the drill streams 80 % of requests and its TTFT is measured on streams at
the client; the simulator sends non-streaming requests and measures TTFT at the replica. The drill's
blackhole freezes what is in flight (the stall watchdog rescues streams); the simulator resets it.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import yaml

from skyfabric.control import EMBEDDED_FLEET
from skyfabric.control.plan import Offer, Plan, Requirements
from skyfabric.sim.fleetsim import Loss, Workload, _pct, simulate, trace_workload

TRACE = Path("/work/shared/data/AzureLLMInferenceTrace_conv.csv")


def main(report_path: str) -> int:
    logging.getLogger("skyfabric.gateway").setLevel(logging.ERROR)
    report = json.loads(Path(report_path).read_text())
    scen = report["scenario"]
    work = scen["workload"]
    speed = scen["speed"]
    duration = scen["duration"]
    phases = {p["kind"]: p for p in report["result"]["phases"]}
    fault = report["result"]["faults"][0]
    start, end = fault["start"], fault["end"]

    base = trace_workload(TRACE, None)
    clamp = lambda v, lo, hi: max(lo, min(hi, v))  # noqa: E731
    sizes = [
        (
            clamp(
                round(p * work["prompt_scale"]), work["prompt_tokens"]["min"], work["prompt_tokens"]["max"]
            ),
            clamp(
                round(o * work["output_scale"]), work["output_tokens"]["min"], work["output_tokens"]["max"]
            ),
        )
        for p, o in base.sizes
    ]
    workload = Workload(base.rate * speed, sizes, base.shape, 60.0 / speed)
    outs = sorted(o for _, o in sizes)
    out_p50 = outs[len(outs) // 2]

    # calibration on the drill's before phase: TTFT at idle, and time per token (light load ≈ factor 0.52)
    before = phases["before"]
    light = 0.52
    ttft0 = before["ttft"]["p50"] / light
    tpot_full = (before["latency"]["p50"] - before["ttft"]["p50"]) / (out_p50 * light)
    slots = 16
    rps = slots / (ttft0 + workload.mean_output * tpot_full)

    fleet = yaml.safe_load(EMBEDDED_FLEET.read_text())
    offers = [
        Offer("aws", "us-east-1", "trainium2", "local", 1.34, rps, concurrency=slots, name="trn2"),
        Offer("gcp", "us-central1", "tpu-v6e", "local", 1.38, rps, concurrency=slots, name="v6e"),
        Offer("azure", "eastus", "nvidia-h100", "local", 2.49, rps, concurrency=slots, name="h100"),
    ]
    plan = Plan(offers, [1, 1, 1], Requirements(workload.rate), 0.0)
    overrides = {"timeouts": fleet["timeouts"], "retry": fleet["retry"]}
    result = simulate(
        plan,
        "skyfabric-code",
        workload,
        duration,
        Loss(report["provider"], start, end - start, "blackhole"),
        ttft0=ttft0,
        seed=0,
        fleet_overrides=overrides,
    )
    print(
        f"calibrated on the drill's before phase: ttft0 {ttft0 * 1000:.1f} ms, "
        f"tpot_full {tpot_full * 1000:.2f} ms,"
    )
    print(
        f"  {rps:.1f} req/s per replica at saturation; "
        f"workload {workload.rate:.2f} req/s mean, {len(sizes)} sizes"
    )
    print()
    print(
        f"{'phase':<8} {'':>6} {'requests':>9} {'success %':>9} {'TTFT p50':>9} {'lat p50':>9} {'retries':>8}"
    )
    failures = []
    for sim_phase, kind in zip(result.phases, ["before", "during", "after"], strict=True):
        drill = phases[kind]
        d_retries = drill["gateway"]["retries"]
        s_success = 100.0 * sim_phase.ok / max(1, sim_phase.requests)
        s_ttft, s_lat = _pct(sim_phase.ttft, 0.5), _pct(sim_phase.latency, 0.5)
        print(
            f"{kind:<8} {'drill':>6} {drill['requests']:>9} {drill['success_rate']:>9.2f} "
            f"{drill['ttft']['p50']:>9.3f} {drill['latency']['p50']:>9.3f} {d_retries:>8.0f}"
        )
        print(
            f"{'':<8} {'sim':>6} {sim_phase.requests:>9} {s_success:>9.2f} {s_ttft:>9.3f} {s_lat:>9.3f} "
            f"{sim_phase.retries:>8}"
        )
        if kind == "before":
            continue  # calibration phase
        if abs(s_success - drill["success_rate"]) > 0.5:
            failures.append(f"{kind}: success rate {s_success:.2f} vs {drill['success_rate']:.2f}")
        if abs(s_ttft - drill["ttft"]["p50"]) > max(0.05, 0.3 * drill["ttft"]["p50"]):
            failures.append(f"{kind}: TTFT p50 {s_ttft:.3f} vs {drill['ttft']['p50']:.3f}")
        if abs(s_lat - drill["latency"]["p50"]) > 0.3 * drill["latency"]["p50"]:
            failures.append(f"{kind}: latency p50 {s_lat:.3f} vs {drill['latency']['p50']:.3f}")
        if sim_phase.retries > 0.02 * sim_phase.requests or d_retries > 0.02 * drill["requests"]:
            failures.append(f"{kind}: retries {sim_phase.retries} (sim) / {d_retries:.0f} (drill) above 2 %")
    print()
    print("AGREES within the stated tolerances" if not failures else "DISAGREES: " + "; ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "docs/drills/results/trace-outage-aws/report.json"))
