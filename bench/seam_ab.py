"""The protocol seam's cost, side by side in one run: before it, after it, and on the translated path.

Variants, each started fresh, pinned to CPU 0 and driven by wrk on CPU 1 against the shared mock upstream:

* ``before`` — the gateway at a commit from before the seam (``--before``, default efce209), OpenAI client;
* ``pass-through`` — this tree, OpenAI client → OpenAI-compatible backend (bytes pass through);
* ``translated`` — this tree, an Anthropic client (``POST /v1/messages``) → the same OpenAI backend: parsed,
  lowered, rebuilt, and the answer re-encoded;
* the same three streamed (16 tokens per answer): the relay decodes every chunk.

Pairs alternate the variants so drift on a noisy 2-core machine hits all of them; medians are reported with
the CPU time the gateway process spent per request (``/proc``), the robust figure here.

    .venv/bin/python bench/seam_ab.py [--pairs 5] [--seconds 6] [--conns 32] [--before efce209]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from procs import HERE, SHARED, start, start_mock, stop

ROOT = HERE.parent
PY = str(ROOT / ".venv" / "bin" / "python")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SERVE = "import sys; from skyfabric.cli import main; sys.argv[0] = 'skyfabric'; main()"


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for path in [Path(f"/proc/{pid}/stat"), *Path(f"/proc/{pid}/task").glob("*/stat")][:1]:
        fields = path.read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def wrk(script: Path, path: str, seconds: int, conns: int) -> tuple[float, int]:
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "-s", str(script),
         f"http://127.0.0.1:9300{path}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if bad:
        raise SystemExit(f"{bad.group(1)} failed responses on {path}:\n{out}")
    return rps, total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=6)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--before", default="efce209")
    args = ap.parse_args()
    old = Path(f"/tmp/skyfabric-before-{args.before}")
    if not old.exists():
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.before], check=True
        )
    variants = {
        "before": (old / "src", SHARED / "post.lua", "/v1/chat/completions"),
        "pass-through": (ROOT / "src", SHARED / "post.lua", "/v1/chat/completions"),
        "translated": (ROOT / "src", HERE / "messages.lua", "/v1/messages"),
        "before, stream": (old / "src", HERE / "stream.lua", "/v1/chat/completions"),
        "pass, stream": (ROOT / "src", HERE / "stream.lua", "/v1/chat/completions"),
        "transl, stream": (ROOT / "src", HERE / "messages_stream.lua", "/v1/messages"),
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    mock = start_mock({"MOCK_TOKENS": "16"})
    try:
        for _ in range(args.pairs):
            for name, (src, script, path) in variants.items():
                cmd = [PY, "-c", SERVE, "serve", "--config", str(HERE / "fleet.yaml"), "--port", "9300"]
                gw = start(cmd, 0, 9300, {"PYTHONPATH": str(src)})
                try:
                    wrk(script, path, 1, args.conns)  # warm up
                    before = cpu_seconds(gw.pid)
                    rps, total = wrk(script, path, args.seconds, args.conns)
                    used = cpu_seconds(gw.pid) - before
                finally:
                    stop(gw)
                results[name].append((rps, used / total * 1e6))
                time.sleep(0.5)
    finally:
        stop(mock)
    print(f"{args.conns} connections, {args.pairs} pairs of {args.seconds}s (medians)")
    print(f"{'variant':14} {'req/s':>9} {'vs before':>10} {'CPU µs/req':>11} {'vs before':>10}")
    for name, rows in results.items():
        base = "before, stream" if "stream" in name else "before"
        base_rps = statistics.median(r for r, _ in results[base])
        base_cpu = statistics.median(c for _, c in results[base])
        rps = statistics.median(r for r, _ in rows)
        cpu = statistics.median(c for _, c in rows)
        print(f"{name:14} {rps:9.0f} {rps / base_rps:10.1%} {cpu:11.1f} {cpu / base_cpu:10.1%}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
