"""Workloads and traces: arrivals, sizes fitted to the context, trace parsing and time compression."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from skyfabric.core.errors import ConfigError
from skyfabric.drills.scenario import TokenRange, Workload
from skyfabric.drills.trace import compress, default_trace, load_trace, parse_timestamp, parse_trace
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


def test_the_default_trace_ships_with_the_package_and_loads() -> None:
    import skyfabric.drills

    path = default_trace()
    assert path.parent == Path(skyfabric.drills.__file__).parent / "data"
    rows = load_trace(path)
    assert len(rows) == 4424  # the Azure conversation trace's first 15 minutes
    assert rows[0].t == 0.0 and 890 < rows[-1].t < 900
    assert path.stat().st_size < 300_000
    notice = (path.parent / "NOTICE.md").read_text()
    assert "CC BY 4.0" in notice and "Splitwise" in notice and "AzurePublicDataset" in notice


def test_a_trace_scenario_replays_the_shipped_trace_by_default() -> None:
    from skyfabric.drills.scenario import load_scenario

    workload = load_scenario("trace-outage").workload
    assert workload.kind == "trace" and workload.trace is None
    plan = plan_workload(workload, duration=600, speed=1.5, seed=0, context_length=256)
    assert len(plan.arrivals) == 4424  # the whole slice in 10 minutes, as docs/drills.md shows
    assert any(str(default_trace()) in note for note in plan.notes)
    assert not any("the trace ends" in note for note in plan.notes)
    longer = plan_workload(workload, duration=600, speed=2.0, seed=0, context_length=256)
    assert len(longer.arrivals) == 4424
    assert any("the trace ends" in note and "--trace PATH" in note for note in longer.notes)


def test_drill_trace_option_points_at_another_trace(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from skyfabric.drills.cli import drill_command, with_trace
    from skyfabric.drills.scenario import load_scenario

    own = tmp_path / "mine.csv"
    own.write_text(TRACE)
    spec = with_trace(load_scenario("trace-outage"), own)
    assert spec.workload.trace == str(own)
    plan = plan_workload(spec.workload, duration=20, speed=1.0, seed=0, context_length=256)
    assert len(plan.arrivals) == 4 and any(str(own) in note for note in plan.notes)
    runner = CliRunner()
    missing = runner.invoke(drill_command, ["trace-outage", "--trace", str(tmp_path / "nope.csv")])
    assert missing.exit_code == 2 and "nope.csv: cannot read trace" in missing.output
    wrong = runner.invoke(drill_command, ["steady", "--trace", str(own)])
    assert wrong.exit_code == 2 and "scenario 'steady' has a poisson workload" in wrong.output


@pytest.mark.slow
def test_the_default_trace_resolves_inside_an_installed_wheel(tmp_path: Path) -> None:
    """Built and installed like a user's copy (no source tree on the path): the default trace is there."""
    import shutil
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    project = tmp_path / "project"
    shutil.copytree(repo / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(repo / "pyproject.toml", project)
    shutil.copy(repo / "README.md", project)
    build = "import setuptools.build_meta as b, sys; print(b.build_wheel(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", build, str(tmp_path)], cwd=project, check=True, capture_output=True)
    (wheel,) = tmp_path.glob("skyfabric-*.whl")
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--target",
            str(site),
            wheel,
        ],
        check=True,
        capture_output=True,
    )
    probe = (
        "from skyfabric.drills.trace import default_trace, load_trace\n"
        "path = default_trace()\n"
        "print(path)\n"
        "print(len(load_trace(path)))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site)}  # the wheel's copy, not the source tree
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, cwd=tmp_path, check=True, capture_output=True, text=True
    )
    path, count = out.stdout.split()
    assert Path(path).is_relative_to(site) and count == "4424"
