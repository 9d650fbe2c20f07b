"""What open dashboards cost the gateway: its CPU per second, idle and under load, with 0 and N open.

Starts the shared mock upstream and ``skyfabric serve`` (each pinned, like ``layers.py``), then measures
the gateway process's CPU time (``/proc/PID/stat``) over the same window with no dashboard and with
``--dashboards`` event streams open (``curl -N`` on ``/dashboard/events``, pinned to the load core).

    .venv/bin/python bench/dashboard_cost.py [--seconds 10] [--dashboards 10] [--conns 32]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from layers import cpu_seconds
from procs import HERE, start, stop, wrk

MOCK_PORT, GATEWAY_PORT = 9140, 9341


def fleet_file(directory: Path) -> Path:
    text = (
        (HERE / "fleet.yaml").read_text().replace("9100", str(MOCK_PORT)).replace("9300", str(GATEWAY_PORT))
    )
    path = directory / "fleet.yaml"
    path.write_text(text)
    return path


def dashboards(n: int) -> list[subprocess.Popen[bytes]]:
    url = f"http://127.0.0.1:{GATEWAY_PORT}/dashboard/events"
    return [
        subprocess.Popen(
            ["taskset", "-c", "1", "curl", "-sN", "-H", "authorization: Bearer sk-bench", url],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(n)
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--dashboards", type=int, default=10)
    ap.add_argument("--conns", type=int, default=32)
    a = ap.parse_args()
    from procs import MOCK_PY, SHARED

    mock = start([MOCK_PY, str(SHARED / "mock_upstream.py"), str(MOCK_PORT)], 1, MOCK_PORT)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = str(fleet_file(Path(tmp)))
            gw = start([sys.executable, "-m", "skyfabric.cli", "serve", "--config", config], 0, GATEWAY_PORT)
            try:
                wrk(GATEWAY_PORT, 2, a.conns)  # warm-up
                for open_ in (0, a.dashboards):
                    viewers = dashboards(open_)
                    time.sleep(1.5)
                    try:
                        before = cpu_seconds(gw.pid)
                        time.sleep(a.seconds)
                        idle = (cpu_seconds(gw.pid) - before) / a.seconds
                        before = cpu_seconds(gw.pid)
                        result = wrk(GATEWAY_PORT, a.seconds, a.conns)
                        busy = cpu_seconds(gw.pid) - before
                        rows.append(
                            (open_, idle, busy / a.seconds, busy / result["requests"] * 1e6, result["rps"])
                        )
                    finally:
                        for v in viewers:
                            v.terminate()
                            v.wait()
            finally:
                stop(gw)
    finally:
        stop(mock)
    print(f"{'dashboards':>10} {'idle CPU ms/s':>14} {'load CPU ms/s':>14} {'CPU µs/req':>11} {'req/s':>8}")
    for open_, idle, busy, per_request, rps in rows:
        print(f"{open_:>10} {idle * 1000:14.2f} {busy * 1000:14.1f} {per_request:11.1f} {rps:8.0f}")


if __name__ == "__main__":
    main()
