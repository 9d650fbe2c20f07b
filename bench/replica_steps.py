"""Calibrate the simulator's embedded-replica step profile: time the embedded engine's own batching steps.

    PYTHONPATH=src python bench/replica_steps.py            # print the fitted profile
    PYTHONPATH=src python bench/replica_steps.py --write    # and write it to sim/embedded_steps.yaml

It builds the replica's core exactly as ``skyfabric replica`` does for the embedded fleet
(``core_process.load`` with the replica's defaults and the embedded fleet's ``REPLICA_ENV``: the shipped
model, float32, one torch thread, 32k context) in this process, and times :meth:`Batcher.step`:

* prefill: one prompt of P tokens (P = 16 … 150, the trace-outage drill's clamp) admitted into an idle
  batcher — one step that prefills it and samples its first token;
* decode: B sequences (B = 1 … 16) decoding together, a prompt of ~64 tokens each — the mean of many steps.

Each is timed in **CPU time of this process** (one thread), not wall time: on a shared machine the CPU
time of a step is what it costs on a core of its own, and the simulator's host model adds the sharing
(``sim/host.py``). Wall time is printed beside it. Then least squares: prefill = p0 + p1·P,
decode = d0 + d1·B. Runs in well under a minute.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import date
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parents[1] / "src" / "skyfabric" / "sim" / "embedded_steps.yaml"


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"write the profile to {OUT}")
    parser.add_argument("--steps", type=int, default=40, help="decode steps timed per batch size")
    args = parser.parse_args(argv)
    from skyfabric.control.supervisor import REPLICA_ENV

    for key, value in REPLICA_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from skyfabric.engine import DEFAULT_MODEL_DIR
    from skyfabric.engine.core_process import load
    from skyfabric.engine.sampler import SamplingParams

    config = {
        "model_dir": str(DEFAULT_MODEL_DIR),
        "threads": 1,
        "dtype": os.environ["SKYFABRIC_DTYPE"],
        "max_model_len": int(os.environ["SKYFABRIC_MAX_MODEL_LEN"]),
        "kv_cache_mib": int(os.environ["SKYFABRIC_KV_CACHE_MIB"]),
        "max_num_seqs": 32,
    }
    batcher, info = load(config)
    params = SamplingParams(temperature=1.0)
    rid = iter(range(1, 10**9))

    def prompt(n: int, salt: int) -> list[int]:  # distinct prompts: no prefix-cache hits
        return [(salt * 7919 + i * 31) % 1000 + 10 for i in range(n)]

    def drain() -> None:
        for seq in list(batcher.running):
            batcher.abort(seq.rid)
        while batcher.has_work:
            batcher.step()

    # warm-up: first passes allocate and pack
    batcher.add(next(rid), prompt(64, 0), max_tokens=8, params=params)
    while batcher.has_work:
        batcher.step()

    sizes = [16, 32, 64, 100, 150]
    pre_cpu: list[float] = []
    pre_wall: list[float] = []
    for i, n in enumerate(sizes * 3):
        batcher.add(next(rid), prompt(n, 100 + i), max_tokens=2, params=params)
        c, w = time.process_time(), time.perf_counter()
        batcher.step()
        pre_cpu.append(time.process_time() - c)
        pre_wall.append(time.perf_counter() - w)
        drain()
    batches = [1, 2, 4, 8, 12, 16]
    dec_cpu: list[float] = []
    dec_wall: list[float] = []
    for b in batches:
        for j in range(b):
            batcher.add(next(rid), prompt(64, 1000 * b + j), max_tokens=10_000, params=params)
        while batcher.waiting or batcher.partial is not None or len(batcher.running) < b:
            batcher.step()
        c, w = time.process_time(), time.perf_counter()
        for _ in range(args.steps):
            batcher.step()
        dec_cpu.append((time.process_time() - c) / args.steps)
        dec_wall.append((time.perf_counter() - w) / args.steps)
        drain()
    p0, p1 = _fit([float(n) for n in sizes * 3], pre_cpu)
    d0, d1 = _fit([float(b) for b in batches], dec_cpu)
    print(f"engine: {info['describe']}")
    print("prefill  tokens  CPU ms  wall ms")
    for n, c, w in zip(sizes * 3, pre_cpu, pre_wall, strict=True):
        print(f"         {n:>6} {c * 1000:>7.2f} {w * 1000:>8.2f}")
    print("decode   batch   CPU ms/step  wall ms/step")
    for b, c, w in zip(batches, dec_cpu, dec_wall, strict=True):
        print(f"         {b:>5} {c * 1000:>12.2f} {w * 1000:>12.2f}")
    print(
        f"fit: prefill = {p0 * 1000:.2f} ms + {p1 * 1000:.3f} ms/token; decode = {d0 * 1000:.2f} ms + "
        f"{d1 * 1000:.3f} ms/sequence (CPU time, one thread)"
    )
    profile = {
        "prefill_fixed_s": round(p0, 6),
        "prefill_per_token_s": round(p1, 7),
        "decode_fixed_s": round(d0, 6),
        "decode_per_sequence_s": round(d1, 7),
        "slots": int(info["slots"]),
        "source": (
            f"bench/replica_steps.py, {date.today().isoformat()}: CPU time of Batcher.step on "
            f"{os.cpu_count()} logical CPUs, {info['describe']}"
        ),
    }
    if args.write:
        header = (
            "# The embedded replica's batching-step profile, measured by bench/replica_steps.py (CPU\n"
            "# time of one step on a core of its own; the simulator's host model adds the sharing).\n"
            "# Redo: PYTHONPATH=src python bench/replica_steps.py --write\n"
        )
        OUT.write_text(header + yaml.safe_dump(profile, sort_keys=False, width=200))
        print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
