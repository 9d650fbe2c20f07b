"""The drill report: one JSON document for machines, Markdown for people, both from the same numbers.

The Markdown is rendered from the JSON document alone, so a report can be re-rendered (or diffed between
two runs) from ``report.json`` without re-running anything.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from skyfabric.drills.analysis import (
    check_slo,
    fault_stats,
    make_phases,
    outcome_stats,
    percentile,
    phase_stats,
)
from skyfabric.drills.runner import DrillRun, PassResult


def pass_report(result: PassResult, run: DrillRun) -> dict[str, Any]:
    """Phases, faults, totals and SLO checks of one pass."""
    records = result.records
    samples = result.metrics.samples
    phases = make_phases(result.spans, result.ended)
    phase_dicts = [
        phase_stats(p, records, result.proxy_events, samples, last=i == len(phases) - 1)
        for i, p in enumerate(phases)
    ]
    first_fault = min((s.start for s in result.spans), default=result.duration)
    faults = [fault_stats(s, records, result.proxy_events, first_fault, result.ended) for s in result.spans]
    totals = outcome_stats(records)
    totals["tokens_per_s"] = sum(r.completion_tokens for r in records if r.ok) / max(1e-9, result.ended)
    totals["gateway"] = {
        name: (
            sum(v for v in (p["gateway"][name] for p in phase_dicts) if v is not None)
            if result.metrics.available
            else None
        )
        for name in ("rescued", "retries", "hedges", "attempts", "ejections")
    }
    edge = sum(1 for evs in result.proxy_events.values() for e in evs if e.inference)
    totals["edge_requests"] = edge
    totals["edge_per_request"] = edge / len(records) if records else None
    totals["dropped"] = result.dropped
    lags = [lag for _, lag in result.loop_lag]
    worst = max(result.loop_lag, key=lambda item: item[1], default=(0.0, 0.0))
    return {
        "label": result.label,
        "drill_loop_lag": {"max": worst[1], "at": worst[0], "p99": percentile(lags, 99)},
        "drill_stalls": [[round(t, 3), round(lag, 3)] for t, lag in result.stalls()],
        "load_average": list(result.load),
        "fleet_file": str(result.fleet_file) if result.fleet_file else None,
        "duration": result.duration,
        "ended": result.ended,
        "gateway_metrics": result.metrics.available,
        "totals": totals,
        "phases": phase_dicts,
        "faults": faults,
        "switches": [{"t": t, "endpoint": e, "mode": m} for t, e, m in result.switches],
        "slo": check_slo(run.options.scenario.slo, totals, phase_dicts, faults, records),
    }


def build_report(run: DrillRun, files: dict[str, str]) -> dict[str, Any]:
    """The whole report document."""
    options = run.options
    scenario = options.scenario
    workload = scenario.workload
    main = pass_report(run.main, run)
    sizes = [(r.prompt_tokens, r.usage_prompt_tokens) for r in run.main.records if r.usage_prompt_tokens]
    notes = list(run.plan.notes)
    if sizes:
        asked = sum(a for a, _ in sizes) / len(sizes)
        got = sum(b for _, b in sizes if b is not None) / len(sizes)
        notes.append(f"prompts: {asked:.0f} tokens asked on average, {got:.0f} counted by the backends")
    notes.extend(f["note"] for f in main["faults"] if f["note"])
    return {
        "scenario": {
            "name": scenario.name,
            "description": scenario.description,
            "duration": options.seconds,
            "speed": options.speed,
            "seed": options.seed,
            "workload": workload.model_dump(mode="json"),
            "slo": scenario.slo.model_dump(mode="json"),
        },
        "fleet": str(options.fleet_path),
        "model": run.model,
        "endpoints": run.endpoints,
        "provider": options.provider,
        "region": options.region,
        "notes": notes,
        "result": main,
        "baseline": pass_report(run.baseline, run) if run.baseline is not None else None,
        "passed": main["slo"]["passed"],
        "files": files,
    }


def write_json(report: dict[str, Any], path: Path) -> None:
    """``report.json``."""
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


# -- Markdown ---------------------------------------------------------------------------------------------


def _s(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _n(value: float | None) -> str:
    return "n/a" if value is None else f"{value:g}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} %"


def _trio(values: dict[str, float | None]) -> str:
    return " / ".join(_s(values[k]) for k in ("p50", "p95", "p99"))


def _errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{k} ×{v}" for k, v in errors.items()) or "—"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _check_value(check: dict[str, Any]) -> str:
    value = check["value"]
    if value is None:
        return "n/a"
    if check["unit"] == "%":
        return _pct(value)
    if check["unit"] == "s":
        return f"{value:.2f} s"
    return f"{value:g}"


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: verdict, SLO, faults, phases, baseline comparison, notes."""
    sc = report["scenario"]
    res = report["result"]
    verdict = "PASSED" if report["passed"] else "MISSED"
    lines = [f"# Drill `{sc['name']}`: SLO {verdict}", ""]
    if sc["description"]:
        lines += [sc["description"].strip(), ""]
    wl = sc["workload"]
    lines += [
        f"- fleet: `{report['fleet']}` (model `{report['model']}`, {len(report['endpoints'])} endpoints, "
        "each behind a fault proxy; real gateway, unmodified)",
        f"- workload: {wl['kind']}, {sc['duration']:g} s at speed ×{sc['speed']:g}, "
        f"{wl['stream_fraction']:.0%} streamed, seed {sc['seed']}; {res['totals']['requests']} requests"
        + (
            f", {res['totals']['dropped']} dropped by the client's in-flight cap"
            if res["totals"]["dropped"]
            else ""
        ),
        "- gateway counters (`/metrics`): "
        + ("read" if res["gateway_metrics"] else "not exposed, shown as n/a"),
        _health(res),
        "",
        "## SLO",
        "",
    ]
    lines += _table(
        ["check", "threshold", "measured", "result"],
        [
            [
                c["name"],
                f"{c['op']} {c['threshold']:g}{' ' + c['unit'] if c['unit'] else ''}",
                _check_value(c),
                "pass" if c["ok"] else "**MISSED**",
            ]
            for c in res["slo"]["checks"]
        ],
    )
    lines += ["", "## Faults", ""]
    if res["faults"]:
        lines += _table(
            [
                "fault",
                "what",
                "window (s)",
                "detection",
                "traffic back",
                "success back",
                "requests at the target",
                "probes at the target",
            ],
            [
                [
                    f["label"],
                    f["kind"],
                    f"{f['start']:.1f}–{f['end']:.1f}",
                    _detection(f),
                    _secs(f["recovery_traffic_s"], "never"),
                    _secs(f["recovery_success_s"], "never"),
                    _errors(f["edge_actions"]),
                    _errors(f["probe_actions"]),
                ]
                for f in res["faults"]
            ],
        )
    else:
        lines.append("No faults in this scenario (a control run).")
    lines += ["", "## Phases", ""]
    lines += _phase_table(res["phases"])
    lines += ["", "Client-visible errors by phase:", ""]
    for p in res["phases"]:
        lines.append(f"- {p['name']}: {_errors(p['errors'])}")
    lines += ["", "Answers by provider (from `x-skyfabric-backend`):", ""]
    for p in res["phases"]:
        served = ", ".join(f"{k} {v}" for k, v in p["served_by"].items()) or "—"
        lines.append(f"- {p['name']}: {served}")
    base = report.get("baseline")
    if base is not None:
        lines += [
            "",
            "## What skyfabric saved",
            "",
            "Baseline: the same requests at the same times through the same faults, with failover off "
            "(`retry.max_attempts: 1` and `continuation: false` on every pool).",
            "",
        ]
        lines += _comparison(res, base)
    lines += ["", "## Notes", ""]
    lines += [f"- {n}" for n in report["notes"]]
    lines += [
        "- TTFT: streamed requests only (time to the first content token); latency: complete answers only.",
        "- truncated = a stream that ended without a finish reason or with fewer tokens than forced, with no "
        "error event: the client could not tell. Interrupted = an in-band error event: the client was told.",
        "- detection: from the fault's start until its target stops receiving new requests at its proxy "
        "(a quiet gap); refused connections never reach the proxy, so a `refuse` fault reads 0.",
    ]
    if report["files"]:
        lines += ["", "Files: " + ", ".join(f"`{v}`" for v in report["files"].values())]
    return "\n".join(lines) + "\n"


def _health(res: dict[str, Any]) -> str:
    """How trustworthy the timings are: the drill's own loop lag and the machine's load."""
    lag = res.get("drill_loop_lag") or {"max": 0.0, "at": 0.0}
    load = res.get("load_average") or [0.0, 0.0]
    text = (
        f"- measurement: drill event loop late by at most {lag['max'] * 1000:.0f} ms; load average "
        f"{load[0]:.2f} → {load[1]:.2f}"
    )
    if lag["max"] > 0.25:
        text += (
            f" — **warning**: the drill itself stalled at {lag['at']:.1f} s; latencies around then include "
            "the drill's own delay (its proxies sit on the data path)"
        )
    return text


def _secs(value: float | None, none: str = "n/a") -> str:
    return none if value is None else f"{value:.2f} s"


def _detection(fault: dict[str, Any]) -> str:
    value = fault["detection_s"]
    if value is None:
        return "not detected (traffic continued)"
    text = f"{value:.2f} s"
    return text + " (refused: not visible)" if fault["sees_refused"] and value == 0 else text


def _phase_table(phases: list[dict[str, Any]]) -> list[str]:
    return _table(
        [
            "phase",
            "window (s)",
            "requests",
            "ok",
            "errors",
            "truncated",
            "interrupted",
            "TTFT p50/p95/p99 (s)",
            "latency p50/p95/p99 (s)",
            "tokens/s",
            "rescued",
            "retries",
            "hedges",
            "edge req/request",
        ],
        [
            [
                p["name"],
                f"{p['start']:.1f}–{p['end']:.1f}",
                str(p["requests"]),
                f"{p['ok']} ({_pct(p['success_rate'])})",
                str(p["error_count"]),
                str(p["truncated"]),
                str(p["interrupted"]),
                _trio(p["ttft"]),
                _trio(p["latency"]),
                f"{p['tokens_per_s']:.1f}",
                _n(p["gateway"]["rescued"]),
                _n(p["gateway"]["retries"]),
                _n(p["gateway"]["hedges"]),
                _s(p["edge_per_request"]),
            ]
            for p in phases
        ],
    )


def _comparison(res: dict[str, Any], base: dict[str, Any]) -> list[str]:
    def during(report: dict[str, Any], key: str) -> float | None:
        values = [
            p["ttft"][key] for p in report["phases"] if p["kind"] == "during" and p["ttft"][key] is not None
        ]
        return max(values) if values else None

    rows = [
        ["success rate", _pct(res["totals"]["success_rate"]), _pct(base["totals"]["success_rate"])],
        ["client-visible errors", str(res["totals"]["error_count"]), str(base["totals"]["error_count"])],
        ["truncated", str(res["totals"]["truncated"]), str(base["totals"]["truncated"])],
        ["interrupted streams", str(res["totals"]["interrupted"]), str(base["totals"]["interrupted"])],
        ["worst p95 TTFT during a fault (s)", _s(during(res, "p95")), _s(during(base, "p95"))],
        ["p99 latency (s)", _s(res["totals"]["latency"]["p99"]), _s(base["totals"]["latency"]["p99"])],
        [
            "upstream requests per client request",
            _s(res["totals"]["edge_per_request"]),
            _s(base["totals"]["edge_per_request"]),
        ],
        [
            "SLO",
            "passed" if res["slo"]["passed"] else "missed",
            "passed" if base["slo"]["passed"] else "missed",
        ],
    ]
    return _table(["", "skyfabric", "baseline"], rows)
