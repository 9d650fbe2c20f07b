"""Workloads and traces: arrivals, sizes fitted to the context, trace parsing and time compression."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from skyfabric.core.errors import ConfigError
from skyfabric.drills.scenario import TokenRange, Workload
from skyfabric.drills.trace import AZURE_CONV_TRACE, compress, load_trace, parse_timestamp, parse_trace
from skyfabric.drills.workload import (
    CHARS_PER_TOKEN,
    Sizer,
    bursty_times,
    make_prompt,
    plan_workload,
    poisson_times,
)

TRACE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:48.2224670,4000,900
2023-11-16 18:15:56.6805900,12,3
"""


def test_poisson_rate_and_determinism() -> None:
    times = poisson_times(10.0, 100.0, random.Random(1))
    assert 900 < len(times) < 1100
    assert times == sorted(times) and times[-1] < 100
    assert times == poisson_times(10.0, 100.0, random.Random(1))


def test_bursty_keeps_the_mean_and_concentrates_arrivals() -> None:
    times = bursty_times(4.0, 200.0, random.Random(2), factor=3.0, on=2.0, off=6.0)
    assert 650 < len(times) < 950
    in_burst = sum(1 for t in times if t % 8.0 < 2.0)
    assert in_burst / len(times) > 0.6  # 2 s of every 8 carry ~75 % of the requests


def test_sizer_fits_the_context() -> None:
    sizer = Sizer(256, TokenRange(min=4, max=400), TokenRange(min=4, max=300))
    p, o = sizer.fit(1000, 500)
    assert o <= 256 and p + o <= 256 - 16
    assert sizer.clamped_prompts == 1 and sizer.clamped_outputs == 1
    assert sizer.fit(50, 20) == (50, 20)


def test_prompt_has_about_the_asked_size() -> None:
    text = make_prompt(100, random.Random(0))
    assert len(text) == round(100 * CHARS_PER_TOKEN)
    assert "def " in text or "class " in text or "import" in text


def test_timestamps_with_seven_fractional_digits() -> None:
    a = parse_timestamp("2023-11-16 18:15:46.6805900")
    b = parse_timestamp("2023-11-16 18:15:50.9951690")
    assert b - a == pytest.approx(4.314579, abs=1e-5)
    assert parse_timestamp("12.5") == 12.5
    with pytest.raises(ValueError):
        parse_timestamp("yesterday")


def test_trace_is_sorted_and_relative() -> None:
    rows = parse_trace(TRACE.splitlines())
    assert [r.t for r in rows] == pytest.approx([0.0, 1.541877, 4.314579, 10.0], abs=1e-5)
    assert rows[1].context_tokens == 4000


def test_trace_errors_name_the_line() -> None:
    with pytest.raises(ConfigError, match="expected columns"):
        parse_trace(["a,b,c", "1,2,3"])
    with pytest.raises(ConfigError, match=r"<trace>:3"):
        parse_trace(["TIMESTAMP,ContextTokens,GeneratedTokens", "1,2,3", "2,x,3"])


def test_compress_speeds_time_up() -> None:
    rows = parse_trace(TRACE.splitlines())
    assert [round(at, 3) for at, _ in compress(rows, speed=2.0, duration=5.0)] == [0.0, 0.771, 2.157]
    assert len(compress(rows, speed=1.0, start=1.0, duration=5.0)) == 2
    with pytest.raises(ValueError):
        compress(rows, speed=0, duration=1)


def test_trace_plan_scales_clamps_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text(TRACE)
    workload = Workload(
        kind="trace",
        trace=str(path),
        prompt_scale=0.1,
        output_scale=0.25,
        prompt_tokens=TokenRange(min=4, max=150),
        output_tokens=TokenRange(min=4, max=64),
    )
    plan = plan_workload(workload, duration=6.0, speed=2.0, seed=0, context_length=256)
    assert [round(p.at, 2) for p in plan.arrivals] == [0.0, 0.77, 2.16, 5.0]
    big = plan.arrivals[1]
    assert (big.prompt_tokens, big.output_tokens) == (150, 64)
    assert all(p.prompt_tokens + p.output_tokens <= 256 for p in plan.arrivals)
    assert any("clamped" in note for note in plan.notes)
    assert any("speed ×2" in note for note in plan.notes)


def test_open_loop_plan_is_reproducible() -> None:
    workload = Workload(rate=5.0, stream_fraction=0.5)
    a = plan_workload(workload, duration=10, speed=1.0, seed=3, context_length=None)
    b = plan_workload(workload, duration=10, speed=1.0, seed=3, context_length=None)
    assert a.arrivals == b.arrivals
    assert 0 < sum(p.stream for p in a.arrivals) < len(a.arrivals)
    fast = plan_workload(workload, duration=10, speed=2.0, seed=3, context_length=None)
    assert len(fast.arrivals) > 1.5 * len(a.arrivals)


@pytest.mark.skipif(not AZURE_CONV_TRACE.exists(), reason="the shared Azure trace is not on this machine")
def test_the_azure_trace_parses() -> None:
    rows = load_trace(AZURE_CONV_TRACE)
    assert len(rows) == 19366
    assert rows[0].t == 0.0 and 3400 < rows[-1].t < 3600
