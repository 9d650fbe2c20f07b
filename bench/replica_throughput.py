"""Benchmark ``skyfabric replica``: startup time, RSS, and generated tokens/s at several concurrencies.

Starts a replica subprocess exactly as the fleet supervisor does, streams ``/v1/completions`` requests with
``ignore_eos`` (so every stream produces exactly ``--tokens`` tokens), and prints a table.

    PYTHONPATH=src .venv/bin/python bench/replica_throughput.py [--model-dir DIR] [--concurrency 1,16]

Without ``--model-dir`` it uses the shipped model (``skyfabric.engine.DEFAULT_MODEL_DIR``), or, if that has
not been grown yet, the tiny random checkpoint of the engine tests (and says so).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MiB, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def metrics(base_url: str) -> dict[str, float]:
    with urllib.request.urlopen(base_url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            name = series.split("{", 1)[0]
            out[name] = out.get(name, 0.0) + float(value)
    return out


async def one_stream(
    session: aiohttp.ClientSession, url: str, prompt: str, tokens: int, model: str | None = None
) -> tuple[int, float]:
    """Stream one completion; return (completion tokens from usage, time to first text)."""
    body: dict[str, object] = {
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model is not None:
        body["model"] = model
    start = time.perf_counter()
    ttft = float("nan")
    completion = 0
    async with session.post(url, json=body) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = orjson.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text") and ttft != ttft:
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                completion = chunk["usage"]["completion_tokens"]
    return completion, ttft


async def run_level(base_url: str, concurrency: int, tokens: int) -> dict[str, float]:
    url = base_url + "/v1/completions"
    before = metrics(base_url)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        start = time.perf_counter()
        results = await asyncio.gather(
            *(
                one_stream(session, url, f"def function_{i}(values):\n    ", tokens)
                for i in range(concurrency)
            )
        )
        wall = time.perf_counter() - start
    after = metrics(base_url)
    generated = sum(r[0] for r in results)
    return {
        "concurrency": concurrency,
        "generated": generated,
        "wall_s": wall,
        "tok_s": generated / wall,
        "per_stream_tok_s": generated / wall / concurrency,
        "ttft_ms": statistics.median(r[1] for r in results) * 1000,
        "forward_passes": after["skyfabric:forward_passes_total"] - before["skyfabric:forward_passes_total"],
    }


def resolve_model_dir(arg: str | None) -> tuple[Path, str]:
    if arg:
        return Path(arg), "given"
    sys.path.insert(0, str(ROOT / "src"))
    from skyfabric.engine import DEFAULT_MODEL_DIR

    if (DEFAULT_MODEL_DIR / "config.json").is_file():
        return DEFAULT_MODEL_DIR, "shipped model"
    sys.path.insert(0, str(ROOT))
    from tests.engine.conftest import build_tiny_checkpoint

    out = Path(tempfile.mkdtemp(prefix="sf-bench-")) / "tiny-random-llama"
    build_tiny_checkpoint(out)
    return out, "TINY RANDOM test checkpoint (shipped model not grown yet)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--concurrency", default="1,16", help="comma-separated stream counts")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per stream (ignore_eos)")
    parser.add_argument("--threads", type=int, default=1, help="replica --threads")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="runs per level; the best is reported")
    args = parser.parse_args()

    model_dir, origin = resolve_model_dir(args.model_dir)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [
        sys.executable, "-m", "skyfabric.engine.replica", "--model-dir", str(model_dir), "--port", str(port),
        "--threads", str(args.threads), "--max-num-seqs", str(args.max_num_seqs), "--log-level", "warning",
    ]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"replica exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(base_url + "/health", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.05)
        ready_s = time.perf_counter() - started
        idle_rss, _ = rss_mib(proc.pid)
        with urllib.request.urlopen(base_url + "/v1/models") as resp:
            card = orjson.loads(resp.read())["data"][0]

        levels = [int(c) for c in args.concurrency.split(",")]
        asyncio.run(run_level(base_url, 1, 8))  # warm caches and allocator
        rows = []
        for level in levels:
            runs = [asyncio.run(run_level(base_url, level, args.tokens)) for _ in range(args.repeats)]
            rows.append(max(runs, key=lambda r: r["tok_s"]))
        rss, peak = rss_mib(proc.pid)

        stop_start = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        stop_s = time.perf_counter() - stop_start
    finally:
        if proc.poll() is None:
            proc.kill()

    print(f"\nmodel: {model_dir}  ({origin}); max_model_len={card.get('max_model_len')}")
    print(
        f"host: {os.cpu_count()} CPUs, replica --threads {args.threads}, --max-num-seqs {args.max_num_seqs}\n"
    )
    print("| measure | value |")
    print("|---|---|")
    print(f"| process start → /health 200 | {ready_s:.2f} s |")
    print(f"| RSS idle after startup | {idle_rss:.0f} MiB |")
    print(f"| RSS after load (peak) | {rss:.0f} MiB ({peak:.0f} MiB) |")
    print(f"| SIGTERM → exit (code {code}) | {stop_s:.2f} s |")
    print()
    header = ["streams", "tokens/stream", "generated", "wall s", "total tok/s", "per-stream tok/s"]
    header += ["TTFT p50 ms", "forward passes"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = [r["concurrency"], args.tokens, r["generated"], f"{r['wall_s']:.2f}", f"{r['tok_s']:.0f}"]
        cells += [f"{r['per_stream_tok_s']:.0f}", f"{r['ttft_ms']:.0f}", f"{r['forward_passes']:.0f}"]
        print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
