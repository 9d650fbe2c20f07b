"""The numbers of a drill: phases, per-phase statistics, detection and recovery times, SLO checks.

Everything here is a pure function of the records (client side), the proxies' logs (network edge) and
the gateway's counters, so it is tested on synthetic data and a report can be recomputed from saved
files. Definitions (also in docs/drills.md):

* a request belongs to the phase in which it *started*;
* TTFT percentiles are over streamed requests that got a first token; latency percentiles over requests
  answered completely; tokens/s counts tokens of complete answers that *ended* in the phase;
* detection time: from a fault's start to the first moment after which its target receives no new
  request (at its proxy) for a quiet window (3 mean inter-arrival gaps of the target before the fault,
  1–5 s); ``None`` when traffic never stopped within the fault's (first) window;
* time to recover (traffic): from the fault's end to the first request that reaches the target again;
* time to recover (success): from the fault's end to the first moment after which every request
  started in the next 5 s is answered completely.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from skyfabric.drills.faultproxy import ProxyEvent
from skyfabric.drills.loadclient import RequestRecord
from skyfabric.drills.metrics import counter_delta
from skyfabric.drills.scenario import Slo
from skyfabric.drills.timeline import FaultSpan

#: Gateway counters reported per phase (``None`` = the gateway does not expose it).
GATEWAY_COUNTERS = ("rescued", "retries", "hedges", "attempts", "ejections")
RECOVERY_WINDOW = 5.0


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0–100) with linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def spread(values: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99 of ``values``."""
    return {f"p{q}": percentile(values, q) for q in (50, 95, 99)}


@dataclass(frozen=True, slots=True)
class Phase:
    """A stretch of the drill: before the first fault, during an incident, or after one."""

    name: str
    kind: str  # before | during | after
    start: float
    end: float
    spans: tuple[int, ...] = ()


def incidents(spans: Sequence[FaultSpan]) -> list[tuple[float, float, list[FaultSpan]]]:
    """Faults whose windows overlap merged into incidents (a brownout's latency and errors are one)."""
    out: list[tuple[float, float, list[FaultSpan]]] = []
    for span in sorted(spans, key=lambda s: s.start):
        if out and span.start < out[-1][1]:
            start, end, members = out[-1]
            out[-1] = (start, max(end, span.end), [*members, span])
        else:
            out.append((span.start, span.end, [span]))
    return out


def make_phases(spans: Sequence[FaultSpan], ended: float) -> list[Phase]:
    """before / during X / after X, ... covering [0, ended)."""
    phases: list[Phase] = []
    merged = incidents(spans)
    if not merged:
        return [Phase("whole run", "before", 0.0, ended)]
    if merged[0][0] > 0:
        phases.append(Phase("before", "before", 0.0, merged[0][0]))
    for i, (start, end, members) in enumerate(merged):
        label = " + ".join(s.label for s in members)
        groups = tuple(s.group for s in members)
        phases.append(Phase(f"during {label}", "during", start, end, groups))
        next_start = merged[i + 1][0] if i + 1 < len(merged) else ended
        if next_start > end:
            phases.append(Phase(f"after {label}", "after", end, max(next_start, end), groups))
    return phases


def _in(t: float, start: float, end: float) -> bool:
    return start <= t < end


def phase_stats(
    phase: Phase,
    records: Sequence[RequestRecord],
    events: dict[str, list[ProxyEvent]],
    samples: list[tuple[float, dict[str, float]]],
    *,
    last: bool = False,
) -> dict[str, Any]:
    """Requests, outcomes, latencies, throughput and gateway effort in one phase."""
    mine = [r for r in records if _in(r.start, phase.start, phase.end) or (last and r.start >= phase.end)]
    stats = outcome_stats(mine)
    length = max(1e-9, phase.end - phase.start)
    tokens = sum(
        r.completion_tokens
        for r in records
        if r.ok and r.end is not None and _in(r.end, phase.start, phase.end)
    )
    edge = sum(1 for evs in events.values() for e in evs if e.inference and _in(e.t, phase.start, phase.end))
    gateway = {
        name: counter_delta(samples, name, phase.start, math.inf if last else phase.end)
        for name in GATEWAY_COUNTERS
    }
    stats.update(
        {
            "name": phase.name,
            "kind": phase.kind,
            "start": phase.start,
            "end": phase.end,
            "tokens_per_s": tokens / length,
            "edge_requests": edge,
            "edge_per_request": edge / len(mine) if mine else None,
            "gateway": gateway,
        }
    )
    return stats


def outcome_stats(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """Counts and percentiles for a set of requests."""
    ok = [r for r in records if r.ok]
    errors = Counter(r.error for r in records if r.error is not None)
    ttft = [r.ttft for r in records if r.stream and r.ttft is not None]
    latency = [r.latency for r in ok if r.latency is not None]
    providers = Counter(r.provider or "none" for r in records if r.ok)
    return {
        "requests": len(records),
        "ok": len(ok),
        "success_rate": 100.0 * len(ok) / len(records) if records else None,
        "errors": dict(errors.most_common()),
        "error_count": sum(errors.values()),
        "truncated": sum(1 for r in records if r.truncated),
        "interrupted": errors.get("stream_interrupted", 0),
        "streams": sum(1 for r in records if r.stream),
        "ttft": spread(ttft),
        "latency": spread(latency),
        "served_by": dict(sorted(providers.items())),
    }


def arrivals(events: dict[str, list[ProxyEvent]], endpoints: Iterable[str]) -> list[float]:
    """Times inference requests reached any of ``endpoints`` at the network edge, sorted."""
    return sorted(e.t for eid in endpoints for e in events.get(eid, []) if e.inference)


def quiet_window(times: list[float], before_end: float) -> float:
    """How long the target must see no request for the gateway to be said to have stopped sending."""
    seen = [t for t in times if t < before_end]
    if before_end <= 0 or len(seen) < 2:
        return 1.0
    gap = before_end / len(seen)
    return min(5.0, max(1.0, 3.0 * gap))


def detection_time(times: list[float], start: float, end: float, quiet: float) -> float | None:
    """Seconds from ``start`` until a gap of ``quiet`` s without arrivals begins, within [start, end)."""
    inside = [t for t in times if start <= t < end]
    for candidate in [start, *inside]:
        following = [t for t in inside if t > candidate]
        until = following[0] if following else end
        if until - candidate >= quiet or (not following and end - candidate >= min(quiet, end - start)):
            return candidate - start
    return None


def recovery_traffic(times: list[float], end: float) -> float | None:
    """Seconds from ``end`` until the target receives a request again."""
    after = [t for t in times if t >= end]
    return after[0] - end if after else None


def recovery_success(records: Sequence[RequestRecord], end: float, horizon: float) -> float | None:
    """Seconds from ``end`` until every request started in the following window is answered completely."""
    after = sorted((r for r in records if r.start >= end), key=lambda r: r.start)
    if not after:
        return None
    failed = [r.start for r in after if not r.ok]
    for candidate in [end, *(t + 1e-6 for t in failed)]:
        window_end = min(candidate + RECOVERY_WINDOW, horizon)
        if not any(candidate <= t < window_end for t in failed):
            return candidate - end
    return None


def fault_stats(
    span: FaultSpan,
    records: Sequence[RequestRecord],
    events: dict[str, list[ProxyEvent]],
    first_fault: float,
    horizon: float,
) -> dict[str, Any]:
    """Detection and recovery of one fault, and what its target saw."""
    times = arrivals(events, span.endpoints)
    quiet = quiet_window(times, first_fault)
    first_end = span.windows[0][1] if span.windows else span.end
    during = [e for eid in span.endpoints for e in events.get(eid, []) if span.start <= e.t < span.end]
    actions = Counter(e.action for e in during if e.inference)
    probes = Counter(e.action for e in during if not e.inference)
    served = sum(
        1 for r in records if r.ok and r.backend in span.endpoints and span.start <= r.start < span.end
    )
    return {
        "label": span.label,
        "kind": span.kind,
        "target": span.target,
        "endpoints": list(span.endpoints),
        "start": span.start,
        "end": span.end,
        "windows": [list(w) for w in span.windows],
        "note": span.note,
        "quiet_s": quiet,
        "detection_s": detection_time(times, span.start, first_end, quiet),
        "recovery_traffic_s": recovery_traffic(times, span.end),
        "recovery_success_s": recovery_success(records, span.end, horizon),
        "edge_actions": dict(actions.most_common()),
        "probe_actions": dict(probes.most_common()),
        "served_during": served,
        "sees_refused": span.mode.refuse,
    }


def check_slo(
    slo: Slo,
    totals: dict[str, Any],
    phases: list[dict[str, Any]],
    faults: list[dict[str, Any]],
    records: Sequence[RequestRecord],
) -> dict[str, Any]:
    """Each threshold of the scenario's SLO against the measured value; missing data fails the check."""
    checks: list[dict[str, Any]] = []

    def add(name: str, op: str, threshold: float, value: float | None, unit: str) -> None:
        ok = value is not None and (value >= threshold if op == ">=" else value <= threshold)
        checks.append(
            {"name": name, "op": op, "threshold": threshold, "value": value, "unit": unit, "ok": ok}
        )

    during = [p for p in phases if p["kind"] == "during"]
    after = [p for p in phases if p["kind"] == "after"]
    if slo.success_rate is not None:
        add("success rate", ">=", slo.success_rate, totals["success_rate"], "%")
    if slo.truncated is not None:
        add("truncated answers", "<=", slo.truncated, totals["truncated"], "")
    if slo.ttft_p95_during is not None:
        add("p95 TTFT during faults", "<=", slo.ttft_p95_during, _ttft_p95(records, during), "s")
    if slo.ttft_p95_after is not None:
        add("p95 TTFT after faults", "<=", slo.ttft_p95_after, _ttft_p95(records, after), "s")
    if slo.latency_p99 is not None:
        add("p99 latency", "<=", slo.latency_p99, totals["latency"]["p99"], "s")
    if slo.detection is not None:
        values = [f["detection_s"] for f in faults]
        add("detection time", "<=", slo.detection, None if None in values or not values else max(values), "s")
    if slo.recovery is not None:
        values = [f["recovery_traffic_s"] for f in faults]
        add("time to recover", "<=", slo.recovery, None if None in values or not values else max(values), "s")
    return {"passed": all(c["ok"] for c in checks), "checks": checks}


def _ttft_p95(records: Sequence[RequestRecord], phases: list[dict[str, Any]]) -> float | None:
    values = [
        r.ttft
        for r in records
        if r.stream and r.ttft is not None and any(_in(r.start, p["start"], p["end"]) for p in phases)
    ]
    return percentile(values, 95)
