"""Calibrate the simulator's embedded-replica step profile: time the embedded engine's own batching steps.

    PYTHONPATH=src python bench/replica_steps.py            # print the fitted profile
    PYTHONPATH=src python bench/replica_steps.py --write    # and write it to sim/embedded_steps.yaml

It builds the replica's core exactly as ``skyfabric replica`` does for the embedded fleet
(``core_process.load`` with the replica's defaults and the embedded fleet's ``REPLICA_ENV``: the shipped
model, float32, one torch thread, 32k context) in this process, and times :meth:`Batcher.step`:

* prefill: one prompt of P tokens (P = 16 … 150, the trace-outage drill's clamp) admitted into an idle
  batcher — one step that prefills it and samples its first token;
* decode: B sequences (B = 1 … 16) decoding together, a prompt of ~64 tokens each — the mean of many steps.

``--http`` measures the whole replica instead — ``skyfabric replica`` started as the embedded fleet starts
it, driven over HTTP with the drills' own requests (greedy, ``ignore_eos``, streamed): the CPU time of
its processes (the engine core and the HTTP frontend, which detokenizes and writes the SSE stream) per
prefill and per decode step. That is what a replica costs its host in a drill, and what the simulator
uses (``--http --write``); the in-process figures are the batcher alone.

Each is timed in **CPU time** (one thread per process), not wall time: on a shared machine the CPU
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


def _tree_cpu(root: int) -> float:
    """CPU seconds (user + system) of ``root`` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue
            fields = stat[stat.rindex(b")") + 2 :].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
    total, todo = 0.0, [root]
    tick = os.sysconf("SC_CLK_TCK")
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            stat = Path(f"/proc/{pid}/stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def measure_http(steps: int) -> tuple[list[float], list[float], list[float], list[float], str]:
    """(prompt sizes, CPU per prefill, batch sizes, CPU per decode step, describe) of a live replica."""
    import asyncio
    import random
    import subprocess
    import urllib.request

    import aiohttp

    from skyfabric.control.supervisor import REPLICA_ENV
    from skyfabric.drills.harness import free_port
    from skyfabric.drills.workload import make_prompt

    port = free_port()
    env = {**os.environ, **REPLICA_ENV}
    argv = [sys.executable, "-m", "skyfabric.cli", "replica", "--port", str(port)]
    argv += ["--served-model-name", "skyfabric-code"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    rng = random.Random(0)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("the replica did not start")
            time.sleep(0.5)

        async def one(session: aiohttp.ClientSession, prompt_tokens: int, out: int) -> int:
            body = {
                "model": "skyfabric-code",
                "messages": [{"role": "user", "content": make_prompt(prompt_tokens, rng)}],
                "max_tokens": out,
                "min_tokens": out,
                "ignore_eos": True,
                "temperature": 0.0,
                "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            }
            prompt = 0
            async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
                async for line in resp.content:
                    if b'"prompt_tokens":' in line:
                        prompt = int(line.split(b'"prompt_tokens":')[1].split(b",")[0])
            return prompt

        async def run() -> tuple[list[float], list[float], list[float], list[tuple[float, int]]]:
            async with aiohttp.ClientSession() as session:
                for _ in range(3):
                    await one(session, 64, 16)  # warm-up
                sizes: list[float] = []
                pre: list[float] = []
                for n in [16, 32, 64, 100, 150] * 2:
                    c = _tree_cpu(proc.pid)  # /proc counts in clock ticks: eight requests per figure
                    got = [await one(session, n, 1) for _ in range(8)]
                    sizes.append(sum(got) / len(got))
                    pre.append((_tree_cpu(proc.pid) - c) / len(got))
                batches: list[float] = []
                dec: list[tuple[float, int]] = []
                for b in [1, 2, 4, 8, 16]:
                    for _ in range(2):
                        c = _tree_cpu(proc.pid)
                        prompts = await asyncio.gather(*(one(session, 40, steps + 1) for _ in range(b)))
                        batches.append(float(b))
                        dec.append((_tree_cpu(proc.pid) - c, sum(prompts)))
                return sizes, pre, batches, dec

        sizes, pre, batches, dec_raw = asyncio.run(run())
        p0, p1 = _fit(sizes, pre)
        # a decode run's CPU, less its prompts' prefill (the fit above), per decode step
        dec = [
            (cpu - b * p0 - p1 * tokens) / steps for (cpu, tokens), b in zip(dec_raw, batches, strict=True)
        ]
        return sizes, pre, batches, dec, f"skyfabric replica (HTTP, streamed, greedy) {REPLICA_ENV}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"write the profile to {OUT}")
    parser.add_argument("--steps", type=int, default=40, help="decode steps timed per batch size")
    parser.add_argument("--http", action="store_true", help="the whole replica process, over HTTP")
    args = parser.parse_args(argv)
    if args.http:
        sizes, pre, batches, dec, what = measure_http(max(args.steps, 128))
        return report(sizes, pre, batches, dec, what, write=args.write, slots=16)
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
    params = SamplingParams(temperature=0.0)  # greedy, as the drills' load client asks (loadclient.py)
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

    prompt_sizes = [16, 32, 64, 100, 150]
    pre_cpu: list[float] = []
    for i, n in enumerate(prompt_sizes * 3):
        batcher.add(next(rid), prompt(n, 100 + i), max_tokens=2, params=params)
        c = time.process_time()
        batcher.step()
        pre_cpu.append(time.process_time() - c)
        drain()
    batch_sizes = [1, 2, 4, 8, 12, 16]
    dec_cpu: list[float] = []
    for size in batch_sizes:
        for j in range(size):
            batcher.add(next(rid), prompt(64, 1000 * size + j), max_tokens=10_000, params=params)
        while batcher.waiting or batcher.partial is not None or len(batcher.running) < size:
            batcher.step()
        c = time.process_time()
        for _ in range(args.steps):
            batcher.step()
        dec_cpu.append((time.process_time() - c) / args.steps)
        drain()
    return report(
        [float(n) for n in prompt_sizes * 3],
        pre_cpu,
        [float(b) for b in batch_sizes],
        dec_cpu,
        f"Batcher.step in process: {info['describe']}",
        write=args.write,
        slots=int(info["slots"]),
    )


def report(
    sizes: list[float],
    pre: list[float],
    batches: list[float],
    dec: list[float],
    what: str,
    *,
    write: bool,
    slots: int,
) -> int:
    """Print the measurements and the fit; with ``write``, the profile the simulator reads."""
    p0, p1 = _fit(sizes, pre)
    d0, d1 = _fit(batches, dec)
    print(what)
    print("prefill  tokens  CPU ms")
    for n, c in zip(sizes, pre, strict=True):
        print(f"         {n:>6.0f} {c * 1000:>7.2f}")
    print("decode   batch   CPU ms/step")
    for b, c in zip(batches, dec, strict=True):
        print(f"         {b:>5.0f} {c * 1000:>12.2f}")
    print(
        f"fit: prefill = {p0 * 1000:.2f} ms + {p1 * 1000:.3f} ms/token; decode = {d0 * 1000:.2f} ms + "
        f"{d1 * 1000:.3f} ms/sequence (CPU time)"
    )
    profile = {
        "prefill_fixed_s": round(max(p0, 0.0), 6),
        "prefill_per_token_s": round(p1, 7),
        "decode_fixed_s": round(d0, 6),
        "decode_per_sequence_s": round(max(d1, 0.0), 7),
        "slots": slots,
        "source": f"bench/replica_steps.py, {date.today().isoformat()}, {os.cpu_count()} CPUs: {what}",
    }
    if write:
        header = (
            "# The embedded replica's step profile, measured by bench/replica_steps.py: CPU seconds a\n"
            "# replica spends per prefill and per decode step (on a core of its own; the simulator's host\n"
            "# model adds the sharing). Redo: PYTHONPATH=src python bench/replica_steps.py --http --write\n"
        )
        OUT.write_text(header + yaml.safe_dump(profile, sort_keys=False, width=200))
        print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
