"""The listener survives Debian's ``slowhttptest``: slowloris, slow body and slow read, 1,000 connections.

A gateway (default listener settings) in front of a fake upstream, each its own process. A well-behaved
client — a fresh connection per request, so accepting is measured too — asks for chat completions in a
loop, first on a quiet gateway and then while each attack holds its 1,000 connections. Its p99 must stay
within 2× of the quiet run, its worst request bounded, and the gateway up.

The attacker runs at the lowest CPU priority: in real life it is on another machine, and here its own
select() loop over 1,000 sockets (a third of a core) would otherwise be measured as the listener's cost.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
CONNECTIONS = 1000
#: How long each phase is measured; each attack gets a few seconds before to open its connections.
MEASURE = 10.0
RAMP = 3.0

pytestmark = pytest.mark.slow


def spawn(*args: str) -> tuple[subprocess.Popen[str], int]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.http.slow_gateway", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def measure(port: int, seconds: float) -> list[float]:
    """Latencies of sequential chat completions, each on a fresh connection."""
    latencies: list[float] = []
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with httpx.Client(limits=httpx.Limits(max_keepalive_connections=0), timeout=10) as client:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.perf_counter()
            response = client.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body)
            latencies.append(time.perf_counter() - started)
            assert response.status_code == 200, response.text
            time.sleep(0.005)
    return latencies


def p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


ATTACKS = {
    "slowloris": ["-H", "-i", "5", "-x", "24", "-u", "{root}/v1/models"],
    "slow body": ["-B", "-i", "5", "-x", "10", "-s", "8192", "-u", "{root}/v1/chat/completions"],
    "slow read": ["-X", "-k", "3", "-n", "1", "-w", "10", "-y", "20", "-z", "32", "-u", "{root}/metrics"],
}


def test_slowhttptest_attacks_do_not_hurt_a_well_behaved_client() -> None:
    assert shutil.which("slowhttptest"), "slowhttptest is missing: apt-get install -y slowhttptest"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * CONNECTIONS + 512
    if soft < want:  # the attacker and the gateway (children) inherit it
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    upstream, upstream_port = spawn("upstream")
    gateway, port = spawn("gateway", str(upstream_port))
    root = f"http://127.0.0.1:{port}"
    try:
        measure(port, 1.0)  # warm up: connections to the upstream, first probes
        quiet = measure(port, MEASURE)
        report = [f"quiet: n={len(quiet)} p99={p99(quiet) * 1e3:.1f} ms max={max(quiet) * 1e3:.1f} ms"]
        results = {}
        for name, args in ATTACKS.items():
            attack = subprocess.Popen(
                ["slowhttptest", "-c", str(CONNECTIONS), "-r", "1000", "-l", str(int(RAMP + MEASURE + 5)),
                 "-p", "3", *[a.format(root=root) for a in args]],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=lambda: os.nice(19),
            )  # fmt: skip
            try:
                time.sleep(RAMP)
                assert attack.poll() is None, f"slowhttptest ({name}) ended early: {attack.returncode}"
                latencies = measure(port, MEASURE)
            finally:
                attack.terminate()
                attack.wait(10)
            results[name] = latencies
            report.append(
                f"{name}: n={len(latencies)} p99={p99(latencies) * 1e3:.1f} ms max={max(latencies) * 1e3:.1f} ms"
            )
            assert gateway.poll() is None, f"the gateway died under {name}"
        print("\n".join(report))
        for name, latencies in results.items():
            assert p99(latencies) <= 2 * p99(quiet), report
            assert max(latencies) < 1.0, report
        assert httpx.get(f"{root}/healthz").status_code == 200
    finally:
        for proc in (gateway, upstream):
            proc.terminate()
            proc.wait(10)
