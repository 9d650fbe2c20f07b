"""The overhead harness itself, operations off and on, alternating: issue 13's req/s bar as it is judged.

Runs ``../shared/bench/overhead.py`` (wrk and the mock upstream on one core, the gateway pinned to the
other; the peers skipped) once per mode per round, with ``keys_limits.py``'s fleet files (port 9300, a
fresh ``ops.db`` and the bench key's Redis state cleared each run), the modes' order alternating from one
round to the next so that the machine's drift hits both alike. Prints each round's req/s and CPU µs per
request (the gateway's process tree: the ledger's shipper included), then the ratios on ÷ off: the median
and the pooled req/s, how many rounds fell under 80 %, a bootstrap 95 % interval of the median, and the CPU
ratio (off ÷ on) — the steadier figure when the mock and wrk's core, not the gateway, is what limits
"off".

    .venv/bin/python bench/harness_ab.py [--rounds 8] [--modes off,all] [--src DIR]

``--src`` points the gateway at another tree's sources (``git worktree add /tmp/base HEAD~1``: a
before/after comparison in one run). Needs Redis at 127.0.0.1:6379 and the peers' setup (the mock's
Python): ``bash ../shared/bench/setup-peers.sh``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from keys_limits import fleets
from procs import HERE, SHARED

PORT = 9300


def run(mode: str, src: Path, seconds: int) -> tuple[float, float]:
    """One harness run of ``mode``'s fleet: (req/s, CPU µs per request of the gateway's process tree)."""
    tmp = Path(tempfile.mkdtemp(prefix="harness-ab-"))
    paths = fleets(tmp)
    for path in paths.values():
        fleet = yaml.safe_load(path.read_text())
        fleet["listener"]["port"] = PORT
        path.write_text(yaml.safe_dump(fleet))
    python = HERE.parent / ".venv" / "bin" / "python"
    target = f"env PYTHONPATH={src} {python} -m skyfabric.cli serve --config {paths[mode]} --port {PORT}"
    out = subprocess.run(
        [str(python), str(SHARED / "overhead.py"), "--seconds", str(seconds), "--conns", "32",
         "--skip", "litellm,nginx,vllm-router", "--target-cmd", target],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    row = next(line for line in out.splitlines() if line.startswith("target")).split()
    return float(row[1]), float(row[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--modes", default="off,all", help="two of keys_limits.py's fleets: off, keys, all")
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--src", type=Path, default=HERE.parent / "src")
    a = ap.parse_args()
    base, on = a.modes.split(",")
    runs: dict[str, list[tuple[float, float]]] = {base: [], on: []}
    for r in range(a.rounds):
        for mode in (base, on) if r % 2 == 0 else (on, base):
            runs[mode].append(run(mode, a.src, a.seconds))
        (rps0, cpu0), (rps1, cpu1) = runs[base][-1], runs[on][-1]
        print(
            f"round {r}: {base} {rps0:.0f} req/s {cpu0:.1f} µs  {on} {rps1:.0f} req/s {cpu1:.1f} µs  "
            f"req/s {rps1 / rps0 * 100:.1f} %  CPU {cpu0 / cpu1 * 100:.1f} %",
            flush=True,
        )
    ratios = [y[0] / x[0] for x, y in zip(runs[base], runs[on], strict=True)]
    cpu = [x[1] / y[1] for x, y in zip(runs[base], runs[on], strict=True)]
    boot = sorted(statistics.median(random.choices(ratios, k=len(ratios))) for _ in range(2000))
    pooled = sum(y[0] for y in runs[on]) / sum(x[0] for x in runs[base])
    print(
        f"req/s {on} ÷ {base}: median {statistics.median(ratios) * 100:.1f} %, pooled {pooled * 100:.1f} %, "
        f"{sum(r < 0.8 for r in ratios)} of {len(ratios)} rounds under 80 %, bootstrap 95 % interval of the "
        f"median {boot[50] * 100:.1f}–{boot[1949] * 100:.1f} %"
    )
    print(
        f"CPU per request {base} ÷ {on}: median {statistics.median(cpu) * 100:.1f} % "
        f"({statistics.median(x[1] for x in runs[base]):.1f} against "
        f"{statistics.median(y[1] for y in runs[on]):.1f} µs)"
    )


if __name__ == "__main__":
    sys.exit(main())
