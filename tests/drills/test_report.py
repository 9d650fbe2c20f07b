"""The report from synthetic drill data: phases, detection and recovery, SLO verdicts, Markdown, plot."""

from __future__ import annotations

from pathlib import Path

import pytest

from skyfabric.core.fleet import parse_fleet
from skyfabric.drills.analysis import (
    detection_time,
    make_phases,
    percentile,
    quiet_window,
    recovery_success,
    recovery_traffic,
)
from skyfabric.drills.faultproxy import FaultMode, ProxyEvent
from skyfabric.drills.loadclient import RequestRecord
from skyfabric.drills.metrics import MetricsSampler, counter_delta, parse_prometheus
from skyfabric.drills.plot import plot_timeline
from skyfabric.drills.report import build_report, render_markdown, write_json
from skyfabric.drills.runner import DrillOptions, DrillRun, PassResult
from skyfabric.drills.scenario import Scenario
from skyfabric.drills.timeline import FaultSpan
from skyfabric.drills.workload import Plan
from tests.drills.conftest import stub_fleet_data

AWS = "aws/us-east-1/p/0"
GCP = "gcp/us-central1/p/0"
SPAN = FaultSpan(
    0, "blackhole aws", "blackhole", "aws", 10.0, 20.0, FaultMode(blackhole=True), (AWS,), ((10.0, 20.0),)
)


def record(
    i: int, start: float, backend: str, *, error: str | None = None, ttft: float = 0.1
) -> RequestRecord:
    r = RequestRecord(i, start, True, 50, 20, end=start + 1.0, ttft=ttft, status=200, backend=backend)
    r.completion_tokens, r.finish_reason, r.error = 20, "length", error
    return r


def synthetic() -> tuple[list[RequestRecord], dict[str, list[ProxyEvent]]]:
    records: list[RequestRecord] = []
    aws: list[ProxyEvent] = []
    gcp: list[ProxyEvent] = []
    for i in range(60):
        t = i * 0.5
        to_aws = i % 2 == 0 and not 10.6 <= t < 22.0
        if to_aws:
            aws.append(ProxyEvent(t, "hold" if 10 <= t < 20 else "forward"))
        else:
            gcp.append(ProxyEvent(t, "forward"))
        if 10 <= t < 10.6:
            records.append(record(i, t, GCP, ttft=2.0))  # retried after the hole
        else:
            records.append(record(i, t, AWS if to_aws else GCP))
    records[25].error = "http_502"  # t = 12.5, during the fault
    records[41].truncated = True  # t = 20.5, after it
    return records, {AWS: aws, GCP: gcp}


def test_percentiles_interpolate() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile(list(range(101)), 95) == 95


def test_phases_cover_the_run_and_merge_overlaps() -> None:
    other = FaultSpan(
        1, "5xx aws", "20% 5xx", "aws", 15.0, 25.0, FaultMode(error_rate=0.2), (AWS,), ((15.0, 25.0),)
    )
    phases = make_phases([SPAN, other], ended=40.0)
    assert [(p.name, p.start, p.end) for p in phases] == [
        ("before", 0.0, 10.0),
        ("during blackhole aws + 5xx aws", 10.0, 25.0),
        ("after blackhole aws + 5xx aws", 25.0, 40.0),
    ]
    assert [p.name for p in make_phases([], 5.0)] == ["whole run"]


def test_detection_and_recovery() -> None:
    records, events = synthetic()
    times = sorted(e.t for e in events[AWS])
    quiet = quiet_window(times, 10.0)
    assert quiet == pytest.approx(3.0)  # 10 arrivals in 10 s: 3 mean gaps
    assert detection_time(times, 10.0, 20.0, quiet) == pytest.approx(0.0)  # 10.0 was the last one
    assert detection_time([10.2, 10.4, 18.0], 10.0, 20.0, 1.0) == pytest.approx(0.4)
    assert detection_time([10.5 + 0.5 * i for i in range(19)], 10.0, 20.0, 1.0) is None
    assert recovery_traffic(times, 20.0) == pytest.approx(2.0)
    assert recovery_success(records, 20.0, 30.0) == pytest.approx(0.5, abs=0.01)  # the truncated one at 20.5


def test_prometheus_text_and_counter_deltas() -> None:
    text = (
        "# HELP skyfabric_retries_total retries\n# TYPE skyfabric_retries counter\n"
        "skyfabric_retries_total 4.0\n# TYPE skyfabric_ejections counter\n"
        'skyfabric_attempts_total{endpoint="a",outcome="ok"} 3\n'
        'skyfabric_attempts_total{endpoint="b",outcome="ok"} 2\n'
    )
    totals = parse_prometheus(text)
    assert totals == {
        "skyfabric_retries_total": 4.0,
        "skyfabric_ejections_total": 0.0,
        "skyfabric_attempts_total": 5.0,
    }
    samples = [(0.1, {"skyfabric_retries_total": 1.0}), (5.0, {"skyfabric_retries_total": 4.0})]
    assert counter_delta(samples, "retries", 0.0, 6.0) == 3.0
    assert counter_delta(samples, "rescued", 0.0, 6.0) is None


def drill_run(tmp_path: Path, *, with_metrics: bool) -> DrillRun:
    records, events = synthetic()
    scenario = Scenario.model_validate(
        {
            "name": "synthetic",
            "description": "A made-up outage.",
            "duration": 30,
            "faults": [{"kind": "blackhole", "at": 10, "for": 10}],
            "slo": {"success_rate": 95, "truncated": 0, "ttft_p95_during": 5, "detection": 2},
        }
    )
    fleet = parse_fleet(stub_fleet_data([1, 2, 3, 4]))
    options = DrillOptions(scenario, fleet, tmp_path / "fleet.yaml", tmp_path)
    metrics = MetricsSampler("http://unused")
    if with_metrics:
        metrics.available = True
        metrics.samples = [(0.0, {"skyfabric_retries_total": 0.0}), (15.0, {"skyfabric_retries_total": 3.0})]
    result = PassResult("skyfabric", records, [SPAN], events, metrics, 30.0, 30.5)
    plan = Plan(notes=["Poisson arrivals at 2/s"])
    return DrillRun(options, plan, [SPAN], [AWS, GCP], result, model="stub-model")


def test_report_json_markdown_and_slo(tmp_path: Path) -> None:
    run = drill_run(tmp_path, with_metrics=True)
    report = build_report(run, {"json": "report.json"})
    res = report["result"]
    assert res["totals"]["requests"] == 60 and res["totals"]["truncated"] == 1
    checks = {c["name"]: c for c in res["slo"]["checks"]}
    assert checks["success rate"]["ok"]  # 58/60 = 96.7 %
    assert not checks["truncated answers"]["ok"]
    assert checks["p95 TTFT during faults"]["value"] == pytest.approx(2.0)
    assert checks["detection time"]["ok"]
    assert report["passed"] is False
    during = next(p for p in res["phases"] if p["kind"] == "during")
    assert during["errors"] == {"http_502": 1}
    assert during["gateway"]["retries"] == 3.0 and during["gateway"]["hedges"] is None
    assert res["faults"][0]["edge_actions"] == {"hold": 1}
    write_json(report, tmp_path / "report.json")
    text = render_markdown(report)
    assert text.startswith("# Drill `synthetic`: SLO MISSED")
    assert "| truncated answers | <= 0 | 1 | **MISSED** |" in text
    assert "| during blackhole aws | 10.0–20.0 | 20 |" in text
    assert "http_502 ×1" in text


def test_report_without_gateway_metrics_says_na(tmp_path: Path) -> None:
    report = build_report(drill_run(tmp_path, with_metrics=False), {})
    assert report["result"]["totals"]["gateway"]["rescued"] is None
    assert "not exposed, shown as n/a" in render_markdown(report)
    assert "| n/a | n/a | n/a |" in render_markdown(report)


def test_plot_writes_a_png(tmp_path: Path) -> None:
    records, events = synthetic()
    path = plot_timeline(
        records, [SPAN], events, tmp_path / "t.png", title="synthetic", ended=30.0, stalls=[(12.0, 0.4)]
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
