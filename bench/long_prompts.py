"""Benchmark the native engine on coding-agent-sized prompts: chunked prefill and prefix caching.

Two measurements, each side by side against the engine with the feature off, on one replica each (the
shipped model, float32, ``--max-model-len 32768``):

* **Chunked prefill**: ``--streams`` streams decode; after ``--quiet`` seconds a ``--long``-token prompt
  arrives. Time per output token of the running streams (gaps between their SSE chunks) while it is
  prefilled, against their quiet gaps before it; and the long prompt's time to first token.
* **Prefix caching**: a ``--long``-token system prompt, then the same system prompt with another question
  (a coding agent's next turn): the second request's time to first token with and without the cache, and
  the replica's ``vllm:prefix_cache_hits_total`` / ``queries_total``.

    PYTHONPATH=src .venv/bin/python bench/long_prompts.py [--long 20000] [--streams 4] [--only chunked]

A 20,000-token prefill of the shipped model takes about a minute and a half of one loaded CPU here; use
``--long 4000`` for a quick look.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from replica_throughput import ROOT, free_port, metrics, resolve_model_dir


def start_replica(model_dir: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    argv = [
        sys.executable, "-m", "skyfabric.cli", "replica", "--model-dir", str(model_dir), "--port", str(port),
        "--served-model-name", "bench", "--dtype", "float32", "--max-model-len", "32768",
        "--kv-cache-mib", "1536", "--max-num-seqs", "16", *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc, base
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("replica did not start")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def long_text(model_dir: Path, tokens: int, salt: str = "") -> str:
    """About ``tokens`` tokens of real Python (the standard library), as a coding agent's context would be."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    import sysconfig

    parts: list[str] = [salt]
    count = 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(errors="replace")
        n = len(tok(text)["input_ids"])
        if count + n > tokens:
            ids = tok(text)["input_ids"][: tokens - count]
            parts.append(tok.decode(ids))
            break
        parts.append(text)
        count += n
    return "".join(parts)


async def stream(
    session: aiohttp.ClientSession,
    base: str,
    messages: list[dict[str, str]],
    max_tokens: int,
    arrivals: list[float] | None = None,
) -> float:
    """One streamed chat completion; appends each text chunk's arrival time; returns time to first token."""
    body = {
        "model": "bench", "messages": messages, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, "stream": True,
    }  # fmt: skip
    arrivals = [] if arrivals is None else arrivals
    start = time.perf_counter()
    first = float("nan")
    async with session.post(base + "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = orjson.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                arrivals.append(time.perf_counter())
                if first != first:
                    first = arrivals[-1] - start
    return first


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def chunked_run(base: str, long_prompt: str, streams: int, quiet: float) -> dict[str, float]:
    """Streams decode; quiet gaps for ``quiet`` seconds, then gaps while the long prompt is prefilled."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        arrivals: list[list[float]] = [[] for _ in range(streams)]
        runners = [
            asyncio.create_task(
                stream(
                    session, base, [{"role": "user", "content": f"def helper_{i}(x):"}], 30_000, arrivals[i]
                )
            )
            for i in range(streams)
        ]
        await asyncio.sleep(quiet)
        sent = time.perf_counter()
        messages = [{"role": "system", "content": long_prompt}, {"role": "user", "content": "hi"}]
        ttft = await stream(session, base, messages, 1)
        done = sent + ttft
        for task in runners:
            task.cancel()
        await asyncio.gather(*runners, return_exceptions=True)
        await asyncio.sleep(1.0)
        # The same prompt with nothing decoding: the prefill's own cost (the cache is off: recomputed).
        alone = await stream(session, base, messages, 1)
    quiet_gaps: list[float] = []
    busy_gaps: list[float] = []
    for times in arrivals:
        for a, b in itertools.pairwise(times):
            if b < sent and a > sent - quiet / 2:  # the second half of the quiet period: all streams running
                quiet_gaps.append(b - a)
            elif a >= sent and b <= done:
                busy_gaps.append(b - a)
    return {
        "long_ttft_s": ttft,
        "alone_ttft_s": alone,
        "quiet_p50_ms": statistics.median(quiet_gaps) * 1e3,
        "quiet_p99_ms": pct(quiet_gaps, 0.99) * 1e3,
        "busy_p50_ms": statistics.median(busy_gaps) * 1e3 if busy_gaps else float("nan"),
        "busy_p99_ms": pct(busy_gaps, 0.99) * 1e3,
        "busy_max_ms": max(busy_gaps) * 1e3 if busy_gaps else float("nan"),
        "busy_tokens": len(busy_gaps),
    }


async def prefix_run(base: str, system: str) -> dict[str, float]:
    """A first turn, then a second with the same system prompt: both times to first token, cache counters."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        first = await stream(
            session, base, [{"role": "system", "content": system}, {"role": "user", "content": "a"}], 1
        )
        second = await stream(
            session, base, [{"role": "system", "content": system}, {"role": "user", "content": "b"}], 1
        )
    m = metrics(base)
    return {
        "first_ttft_s": first,
        "second_ttft_s": second,
        "hits": m.get("vllm:prefix_cache_hits_total", 0.0),
        "queries": m.get("vllm:prefix_cache_queries_total", 0.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--long", type=int, default=20_000, help="tokens of the long prompt")
    parser.add_argument("--streams", type=int, default=4, help="running streams during the long prefill")
    parser.add_argument("--quiet", type=float, default=8.0, help="seconds of quiet decoding measured first")
    parser.add_argument("--only", choices=["chunked", "prefix"], default=None)
    args = parser.parse_args()
    model_dir, what = resolve_model_dir(args.model_dir)
    print(f"model: {model_dir} ({what}); long prompt {args.long} tokens; {args.streams} streams")
    text = long_text(model_dir, args.long)
    if args.only in (None, "chunked"):
        print(
            "\n| prefill | long TTFT s (alone) | quiet TPOT p50 / p99 ms | during TPOT p50 / p99 / max ms "
            "| p99 ratio |"
        )
        print("|---|---|---|---|---|")
        runs: dict[str, dict[str, float]] = {}
        for label, extra in (("chunked", ()), ("unchunked", ("--no-enable-chunked-prefill",))):
            proc, base = start_replica(model_dir, "--no-enable-prefix-caching", *extra)
            try:
                r = runs[label] = asyncio.run(chunked_run(base, text, args.streams, args.quiet))
            finally:
                stop(proc)
            print(
                f"| {label} | {r['long_ttft_s']:.1f} ({r['alone_ttft_s']:.1f}) | "
                f"{r['quiet_p50_ms']:.1f} / {r['quiet_p99_ms']:.1f} | "
                f"{r['busy_p50_ms']:.1f} / {r['busy_p99_ms']:.1f} / {r['busy_max_ms']:.0f} "
                f"({r['busy_tokens']} tokens) | {r['busy_p99_ms'] / r['quiet_p99_ms']:.2f} |",
                flush=True,
            )
        c, u = runs["chunked"], runs["unchunked"]
        print(
            f"\nlong prompt TTFT chunked / unchunked: {c['long_ttft_s'] / u['long_ttft_s']:.2f} with streams "
            f"decoding, {c['alone_ttft_s'] / u['alone_ttft_s']:.2f} alone"
        )
    if args.only in (None, "prefix"):
        print("\n| prefix cache | 1st turn TTFT s | 2nd turn TTFT s | hits / queries (tokens) |")
        print("|---|---|---|---|")
        results = {}
        for label, extra in (("on", ()), ("off", ("--no-enable-prefix-caching",))):
            proc, base = start_replica(model_dir, *extra)
            try:
                r = results[label] = asyncio.run(prefix_run(base, text))
            finally:
                stop(proc)
            print(
                f"| {label} | {r['first_ttft_s']:.2f} | {r['second_ttft_s']:.3f} | "
                f"{r['hits']:.0f} / {r['queries']:.0f} |",
                flush=True,
            )
        speedup = results["off"]["second_ttft_s"] / results["on"]["second_ttft_s"]
        print(f"\nsecond-turn TTFT speedup with the cache: {speedup:.1f}x")


if __name__ == "__main__":
    main()
