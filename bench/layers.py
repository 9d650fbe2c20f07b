"""Side by side, one run: the transport floor, the gateway, and the gateway minus one feature at a time.

.venv/bin/python bench/layers.py [--seconds 8] [--conns 32]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "bench"
PY = os.environ.get("MOCK_PY", "/tmp/peers/litellm-venv/bin/python")


def wait_port(port: int) -> None:
    import socket

    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"port {port} never opened")


def wrk(port: int, seconds: int, conns: int) -> tuple[float, float]:
    out = subprocess.run(
        [
            "taskset",
            "-c",
            "1",
            "wrk",
            "-t1",
            f"-c{conns}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(SHARED / "post.lua"),
            f"http://127.0.0.1:{port}/v1/chat/completions",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"^\s*50%\s+([\d.]+)(\w+)", out, re.M)
    assert p50 is not None
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p50.group(2)]
    return rps, float(p50.group(1)) * scale


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--conns", type=int, default=32)
    a = ap.parse_args()
    mock = subprocess.Popen(
        ["taskset", "-c", "1", PY, str(SHARED / "mock_upstream.py"), "9100"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_port(9100)
    rows = []
    try:
        for mode in ("bare", "gateway", "no-metrics", "no-health"):
            proc = subprocess.Popen(
                ["taskset", "-c", "0", sys.executable, str(HERE / "variants.py"), mode],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            try:
                wait_port(9301)
                wrk(9301, 2, a.conns)
                rows.append((mode, *wrk(9301, a.seconds, a.conns)))
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()
                time.sleep(0.5)
    finally:
        os.killpg(mock.pid, signal.SIGTERM)
    gateway = dict((m, r) for m, r, _ in rows)["gateway"]
    print(f"{'variant':12} {'req/s':>9} {'p50 ms':>8} {'vs gateway':>11}")
    for mode, rps, p50 in rows:
        print(f"{mode:12} {rps:9.0f} {p50:8.2f} {rps / gateway:10.0%}")


if __name__ == "__main__":
    main()
