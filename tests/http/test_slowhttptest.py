"""The listener survives Debian's ``slowhttptest``: slowloris, slow body and slow read, 1,000 connections.

A gateway (default listener settings) in front of a fake upstream, each its own process. A well-behaved
client — a fresh connection per request, so accepting is measured too — asks for chat completions in a
loop: on a quiet gateway, while each attack holds 1,000 connections to another gateway process (the
control: what the attack costs the machine), and while it holds them to this gateway. Its p99 must stay
within 2× of the worse of the quiet and the control run, its worst request under a second, and the
gateway up.

The attacker runs at the lowest CPU priority: in real life it is on another machine, and here its own
select() loop over 1,000 sockets (a third of a core) would otherwise be measured as the listener's cost.
"""

from __future__ import annotations

import contextlib
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
QUIET = 4.0
MEASURE = 6.0
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


def established(port: int) -> int:
    """Established TCP connections to ``port`` on this machine (the attack really holds its sockets)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


def summary(latencies: list[float]) -> str:
    return f"p99 {p99(latencies) * 1e3:.1f} ms, max {max(latencies) * 1e3:.1f} ms (n={len(latencies)})"


ATTACKS = {
    "slowloris": ["-H", "-i", "5", "-x", "24", "-u", "{root}/v1/models"],
    "slow body": ["-B", "-i", "5", "-x", "10", "-s", "8192", "-u", "{root}/v1/chat/completions"],
    "slow read": ["-X", "-k", "3", "-n", "1", "-w", "10", "-y", "20", "-z", "32", "-u", "{root}/metrics"],
}


def attack_and_measure(name: str, target: int, port: int) -> tuple[list[float], int]:
    """The good client's latencies on ``port`` while ``name`` holds 1,000 connections to ``target``."""
    root = f"http://127.0.0.1:{target}"
    attack = subprocess.Popen(
        ["slowhttptest", "-c", str(CONNECTIONS), "-r", "1000", "-l", str(int(RAMP + MEASURE + 5)),
         "-p", "3", *[a.format(root=root) for a in ATTACKS[name]]],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=lambda: os.nice(19),
    )  # fmt: skip
    try:
        time.sleep(RAMP)
        assert attack.poll() is None, f"slowhttptest ({name}) ended early: {attack.returncode}"
        latencies = measure(port, MEASURE)
        held = established(target)  # (slowhttptest ramps up slower on a loaded machine)
    finally:
        attack.terminate()
        attack.wait(10)
    assert held >= 0.9 * CONNECTIONS, f"{name}: only {held} attacking connections were open"
    return latencies, held


def test_slowhttptest_attacks_do_not_hurt_a_well_behaved_client() -> None:
    assert shutil.which("slowhttptest"), "slowhttptest is missing: apt-get install -y slowhttptest"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 6 * CONNECTIONS + 512
    if soft < want:  # the attacker and the gateways (children) inherit it
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    upstream, upstream_port = spawn("upstream")
    gateway, port = spawn("gateway", str(upstream_port))
    decoy, decoy_port = spawn("gateway", str(upstream_port))
    try:
        measure(port, 1.0)  # warm up: connections to the upstream, first probes
        report, failures = [], []
        quiet = measure(port, QUIET)
        for name in ATTACKS:
            # The control: the same attack aimed at another gateway process on this machine. What it
            # does to the good client is the machine's contention (the attacker, the kernel), not the
            # listener's; on a shared machine that alone can double a p99. A pair that misses the bound
            # is measured once more (timing on a shared machine is noisy): a listener that suffers under
            # the attack misses it both times.
            for attempt in range(2):
                control, _ = attack_and_measure(name, decoy_port, port)
                attacked, held = attack_and_measure(name, port, port)
                assert gateway.poll() is None, f"the gateway died under {name}"
                baseline = max(p99(quiet), p99(control))
                line = (
                    f"{name} ({held} conns, try {attempt + 1}): quiet {summary(quiet)}; same attack on "
                    f"another process {summary(control)}; attacked {summary(attacked)}"
                )
                report.append(line)
                quiet = measure(port, QUIET)
                if p99(attacked) <= 2 * baseline and max(attacked) < 1.0:
                    break
            else:
                failures.append(line)
        print("\n".join(report))
        assert not failures, report
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    finally:
        for proc in (gateway, decoy, upstream):
            proc.terminate()
            proc.wait(10)
