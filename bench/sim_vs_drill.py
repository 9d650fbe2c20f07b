"""Does the simulator agree with a real drill? A drill on the embedded fleet, run now, against the simulation.

    PYTHONPATH=src python bench/sim_vs_drill.py --live 60            # run a 60-s drill, then compare
    PYTHONPATH=src python bench/sim_vs_drill.py --report DIR/report.json   # compare with a drill's report

``--live SECONDS`` runs ``skyfabric drill trace-outage --provider aws --speed 1.5 --duration SECONDS``: the
Azure conversation trace shipped with skyfabric replayed at ×1.5 through the real gateway in front of the
embedded fleet (three local CPU replicas, 16 sequences each), 80 % of requests streamed, aws blackholed
from 40 % to 60 % of the run. Then the simulator runs the same fleet (one replica per provider, the
embedded fleet's timeouts and retry knobs), the same workload (the same trace slice and its per-minute
rate at ×1.5, its sizes scaled and clamped as the drill did, the same 80 % streamed — through the
gateway's relay, TTFT at the client), and the same loss window (blackhole).

The replicas are modelled as what they are (``sim/host.py``): three embedded-engine batchers on ONE host
of ``--host-cores`` cores (default: this machine's), sharing them — a step takes its CPU time times
``(busy replicas + background) / cores`` — with the CPU time per prefill and per decode step measured on
the real replica (``bench/replica_steps.py --http``, shipped as ``sim/embedded_steps.yaml``), and the
host's other load (``background``: runnable threads that are not the drill's replicas — the gateway, the
load client, the fault proxies, other people's jobs) sampled during the live drill
(``sim/hostload.py``, written to ``host-load.json``). Nothing is fitted to the drill's timings, so every
phase is compared (``--independent``: the old model — independent accelerators whose TTFT at idle and
time per token are calibrated on the before phase, which is then not compared). Tolerances, fixed
before the first run:

    success rate   |sim − drill| ≤ 0.5 percentage points
    TTFT p50       |sim − drill| ≤ max(50 ms, 30 %)         (streams, at the client)
    latency p50    |sim − drill| ≤ 30 %
    retries        both ≤ max(3, 3 % of the phase's requests)   (no retry storm in either)

Exit status 0 when they agree. What differs in kind, stated: the host model knows the replicas' cost
and the host's load, not the latency the gateway, the fault proxy and the client add per hop on a
contended CPU, nor how the hypervisor's other tenants change the CPU time of a step (docs/planning.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

import skyfabric.drills
from skyfabric.control import EMBEDDED_FLEET
from skyfabric.control.plan import Offer, Plan, Requirements
from skyfabric.sim.fleetsim import Loss, Result, Workload, _pct, simulate, trace_workload
from skyfabric.sim.host import HostSpec, load_step_profile
from skyfabric.sim.hostload import HostLoadSampler

#: Seconds per step of the measured background fed to the simulation.
LOAD_STEP = 5.0
TRACE = Path(skyfabric.drills.__file__).parent / "data" / "azure_conv_slice.csv"
SPEED = 1.5


def run_drill(duration: float, out: Path, speed: float = SPEED) -> dict[str, Any]:
    """A real drill, now: the gateway, the embedded fleet and the fault proxies, as `skyfabric drill`.

    While it runs, the host's other load is sampled (``sim/hostload.py``) and written beside the report
    (``host-load.json``: the background, per ``LOAD_STEP`` seconds of the drill's clock).
    """
    cmd = [sys.executable, "-m", "skyfabric.cli", "drill", "trace-outage", "--provider", "aws"]
    cmd += ["--duration", str(duration), "--speed", str(speed), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = HostLoadSampler(proc.pid)
    sampler.start()
    try:
        stdout, stderr = proc.communicate(timeout=duration * 4 + 600)
    finally:
        sampler.stop()
    report = out / "report.json"
    if not report.exists():
        raise SystemExit(f"the drill did not run (exit {proc.returncode}):\n{stdout}\n{stderr}")
    data: dict[str, Any] = json.loads(report.read_text())
    # the drill's clock starts when its load does; its request log is written as the run ends
    t0 = (out / "requests.jsonl").stat().st_mtime - data["result"]["ended"]
    series = sampler.series(t0, data["result"]["ended"], LOAD_STEP)
    (out / "host-load.json").write_text(json.dumps({"step": LOAD_STEP, "background": series}))
    return data


def host_load(directory: Path) -> list[tuple[float, float]] | None:
    """The host's measured background during a drill (``host-load.json``), if it was measured."""
    path = directory / "host-load.json"
    if not path.exists():
        return None
    return [(float(t), float(b)) for t, b in json.loads(path.read_text())["background"]]


def _prefilled(row: dict[str, Any]) -> int:
    return int(row.get("usage_prompt_tokens") or row["prompt_tokens"])


def drill_arrivals(log: Path) -> list[tuple[float, int, int, bool]]:
    """The drill's own requests (``requests.jsonl``): when each was sent, its sizes, whether streamed."""
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("pass", "skyfabric") == "skyfabric"]
    # the prompt the engine prefilled (chat template included) where the replica reported it
    return sorted(
        (
            r["start"],
            r.get("usage_prompt_tokens") or r["prompt_tokens"],
            r["output_tokens"],
            r["stream"] is True,
        )
        for r in rows
    )


def simulate_drill(
    report: dict[str, Any],
    log: Path | None = None,
    host_cores: float | None = None,
    background: float | list[tuple[float, float]] = 0.0,
) -> tuple[Result, dict[str, float]]:
    """The simulation of the drill in ``report``.

    ``host_cores``: the three replicas are the embedded engine's stepped batcher on one host of that
    many cores (``sim/host.py``), timed by the measured step profile — nothing is fitted to the drill;
    ``background``: the host's other runnable threads, a constant or measured ``(from t, value)`` steps.
    ``None``: independent accelerators, the closed-form model's two figures calibrated on its before phase.

    With the drill's request log the simulator replays the very same requests (times, sizes, streamed
    or not); without it, the trace's per-minute rate as a Poisson process and its sizes.
    """
    scen = report["scenario"]
    work = scen["workload"]
    speed = scen["speed"]
    duration = scen["duration"]
    phases = {p["kind"]: p for p in report["result"]["phases"]}
    fault = report["result"]["faults"][0]
    start, end = fault["start"], fault["end"]

    base = trace_workload(TRACE, None)

    def clamp(v: float, bounds: dict[str, int]) -> int:
        return max(bounds["min"], min(bounds["max"], round(v)))

    sizes = [
        (
            clamp(p * work["prompt_scale"], work["prompt_tokens"]),
            clamp(o * work["output_scale"], work["output_tokens"]),
        )
        for p, o in base.sizes
    ]
    workload = Workload(base.rate * speed, sizes, base.shape, 60.0 / speed)
    if log is not None and log.exists():
        arrivals = drill_arrivals(log)
        sizes = [(p, o) for _, p, o, _ in arrivals]
        workload = Workload(len(arrivals) / duration, sizes, arrivals=arrivals)
    outs = sorted(o for _, o in sizes)
    out_p50 = outs[len(outs) // 2]

    # calibration on the drill's before phase: TTFT at idle, and time per token (light load ≈ factor 0.52)
    before = phases["before"]
    light = 0.52
    ttft0 = before["ttft"]["p50"] / light
    tpot_full = max(1e-4, (before["latency"]["p50"] - before["ttft"]["p50"]) / (out_p50 * light))
    slots = 16
    rps = slots / (ttft0 + workload.mean_output * tpot_full)

    fleet = yaml.safe_load(EMBEDDED_FLEET.read_text())
    offers = [
        Offer("aws", "us-east-1", "trainium2", "local", 1.34, rps, concurrency=slots, name="trn2"),
        Offer("gcp", "us-central1", "tpu-v6e", "local", 1.38, rps, concurrency=slots, name="v6e"),
        Offer("azure", "eastus", "nvidia-h100", "local", 2.49, rps, concurrency=slots, name="h100"),
    ]
    plan = Plan(offers, [1, 1, 1], Requirements(workload.rate), 0.0)
    hosts = None
    calib = {"ttft0": ttft0, "tpot_full": tpot_full, "rps": rps, "rate": workload.rate}
    if host_cores is not None:
        series = tuple(background) if isinstance(background, list) else ()
        constant = background if isinstance(background, float | int) else 0.0
        spec = HostSpec("embedded", host_cores, float(constant), background_at=series)
        hosts = {o.pool: spec for o in offers}
        calib = {"cores": host_cores, "rate": workload.rate}
        for phase in ("before", "during", "after"):
            lo, hi = phases[phase]["start"], phases[phase]["end"]
            window = [b for t, b in series if lo <= t < hi]
            calib[f"background_{phase}"] = sum(window) / len(window) if window else float(constant)
    overrides = {"timeouts": fleet["timeouts"], "retry": fleet["retry"]}
    result = simulate(
        plan,
        "skyfabric-code",
        workload,
        duration,
        Loss(report["provider"], start, end - start, "blackhole"),
        ttft0=ttft0,
        stream_share=float(work.get("stream_fraction", 0.0)),
        seed=0,
        fleet_overrides=overrides,
        hosts=hosts,
    )
    return result, calib


def compare(report: dict[str, Any], result: Result, skip_before: bool = False) -> tuple[list[str], list[str]]:
    """(table lines, failures) of the simulation against the drill, phase by phase.

    ``skip_before``: the before phase was the calibration (the independent-accelerator model).
    """
    phases = {p["kind"]: p for p in report["result"]["phases"]}
    lines = [
        f"{'phase':<8} {'':>6} {'requests':>9} {'success %':>9} {'TTFT p50':>9} {'lat p50':>9} {'retries':>8}"
    ]
    failures = []
    for sim_phase, kind in zip(result.phases, ["before", "during", "after"], strict=True):
        drill = phases[kind]
        d_retries = drill["gateway"]["retries"]
        s_success = 100.0 * sim_phase.ok / max(1, sim_phase.requests)
        s_ttft = _pct(sim_phase.stream_ttft or sim_phase.ttft, 0.5)
        s_lat = _pct(sim_phase.latency, 0.5)
        lines.append(
            f"{kind:<8} {'drill':>6} {drill['requests']:>9} {drill['success_rate']:>9.2f} "
            f"{drill['ttft']['p50']:>9.3f} {drill['latency']['p50']:>9.3f} {d_retries:>8.0f}"
        )
        lines.append(
            f"{'':<8} {'sim':>6} {sim_phase.requests:>9} {s_success:>9.2f} {s_ttft:>9.3f} {s_lat:>9.3f} "
            f"{sim_phase.retries:>8}"
        )
        if kind == "before" and skip_before:
            continue  # calibration phase
        if abs(s_success - drill["success_rate"]) > 0.5:
            failures.append(f"{kind}: success rate {s_success:.2f} vs {drill['success_rate']:.2f}")
        if abs(s_ttft - drill["ttft"]["p50"]) > max(0.05, 0.3 * drill["ttft"]["p50"]):
            failures.append(f"{kind}: TTFT p50 {s_ttft:.3f} vs {drill['ttft']['p50']:.3f}")
        if abs(s_lat - drill["latency"]["p50"]) > 0.3 * drill["latency"]["p50"]:
            failures.append(f"{kind}: latency p50 {s_lat:.3f} vs {drill['latency']['p50']:.3f}")
        if sim_phase.retries > max(3, 0.03 * sim_phase.requests) or d_retries > max(
            3, 0.03 * drill["requests"]
        ):
            failures.append(f"{kind}: retries {sim_phase.retries} (sim) / {d_retries:.0f} (drill): a storm")
    return lines, failures


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--live", type=float, metavar="SECONDS", help="run a drill of this length now")
    source.add_argument("--report", type=Path, help="a drill's report.json")
    parser.add_argument(
        "--out", type=Path, default=None, help="where the live drill writes (default: a temp dir)"
    )
    parser.add_argument("--speed", type=float, default=SPEED, help="the live drill's time compression")
    parser.add_argument(
        "--host-cores",
        type=float,
        default=float(os.cpu_count() or 1),
        help="cores of the host the embedded replicas share (default: this machine's)",
    )
    parser.add_argument(
        "--background",
        type=float,
        default=None,
        help="other runnable threads on that host (default: as measured during the drill, host-load.json; "
        "else 0)",
    )
    parser.add_argument(
        "--independent",
        action="store_true",
        help="the old model: independent accelerators, calibrated on the drill's before phase",
    )
    parser.add_argument("--summary", type=Path, default=None, help="write the figures compared here (JSON)")
    args = parser.parse_args(argv)
    logging.getLogger("skyfabric.gateway").setLevel(logging.ERROR)
    if args.live is not None:
        out = args.out or Path(tempfile.mkdtemp(prefix="sim-vs-drill-"))
        report = run_drill(args.live, out, args.speed)
        log: Path | None = out / "requests.jsonl"
        print(
            f"drill: {args.live:.0f}s of trace-outage at ×{args.speed} on the embedded fleet, report in {out}"
        )
    else:
        report = json.loads(args.report.read_text())
        log = args.report.parent / "requests.jsonl"
    cores = None if args.independent else args.host_cores
    measured = host_load(out if args.live is not None else args.report.parent)
    background: float | list[tuple[float, float]] = (
        args.background if args.background is not None else (measured or 0.0)
    )
    result, calib = simulate_drill(report, log, cores, background)
    if log is not None and log.exists():
        print(f"replaying the drill's own {sum(p.requests for p in result.phases)} requests")
    if cores is None:
        print(
            f"independent accelerators, calibrated on the drill's before phase: ttft0 "
            f"{calib['ttft0'] * 1000:.1f} ms, tpot_full {calib['tpot_full'] * 1000:.2f} ms, "
            f"{calib['rps']:.1f} req/s per replica at saturation; workload {calib['rate']:.2f} req/s mean"
        )
    else:
        steps = load_step_profile()
        told = "given" if args.background is not None else "measured" if measured else "none measured"
        print(
            f"three embedded replicas sharing a host of {cores:g} cores; other runnable threads ({told}) "
            f"before/during/after {calib['background_before']:.2f}/{calib['background_during']:.2f}/"
            f"{calib['background_after']:.2f}; "
            f"measured steps: prefill {steps.prefill_fixed_s * 1000:.2f} ms + "
            f"{steps.prefill_per_token_s * 1000:.3f} ms/token, decode {steps.decode_fixed_s * 1000:.2f} ms + "
            f"{steps.decode_per_sequence_s * 1000:.3f} ms/sequence; workload {calib['rate']:.2f} req/s mean"
        )
    lines, failures = compare(report, result, skip_before=cores is None)
    print("\n".join(["", *lines, ""]))
    streams = sum(p.streams for p in result.phases)
    continued = sum(p.continued for p in result.phases)
    broken = sum(p.broken for p in result.phases)
    print(f"simulated streams: {streams}, continued mid-answer: {continued}, broken: {broken}")
    print("AGREES within the stated tolerances" if not failures else "DISAGREES: " + "; ".join(failures))
    if args.summary is not None:
        drill = {p["kind"]: p for p in report["result"]["phases"]}
        summary = {
            "failures": failures,
            "phases": [
                {
                    "phase": kind,
                    "drill": {
                        "requests": drill[kind]["requests"],
                        "success_rate": drill[kind]["success_rate"],
                        "retries": drill[kind]["gateway"]["retries"],
                        "ttft_p50": drill[kind]["ttft"]["p50"],
                        "latency_p50": drill[kind]["latency"]["p50"],
                    },
                    "sim": {
                        "requests": p.requests,
                        "success_rate": 100.0 * p.ok / max(1, p.requests),
                        "retries": p.retries,
                        "streams": p.streams,
                        "broken": p.broken,
                        "ttft_p50": _pct(p.stream_ttft or p.ttft, 0.5),
                        "latency_p50": _pct(p.latency, 0.5),
                    },
                }
                for p, kind in zip(result.phases, ["before", "during", "after"], strict=True)
            ],
        }
        args.summary.write_text(json.dumps(summary, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
