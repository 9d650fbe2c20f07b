"""Operations on vs off: req/s at saturation, p50 at one connection, CPU/request.

"off" is ``bench/fleet.yaml`` (a static key); "keys" adds an ``operations`` section: the key ``sk-bench``
is a managed key (SQLite) with all four limits set (rpm, tpm, concurrency, budget, none reached), enforced
through Redis at 127.0.0.1:6379 — admitted from the key's grant in process, settlements batched; "all" adds
the usage ledger (the outbox shipped to the same SQLite file by the gateway's child process, which inherits
its CPU pin: the "+ children" column counts it; the last column is the ledger's backlog in KiB at the
end). The bar (issue 13, part 6): with everything on, >= 80 % of "off"'s req/s and <= +0.3 ms p50 at one
connection.

    .venv/bin/python bench/keys_limits.py [--seconds 8] [--modes off,keys,all] [--rounds 2] [--conns 32,1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import procs
import yaml
from layers import cpu_seconds, cpu_total
from procs import HERE, start, start_mock, stop, wrk

if not (procs.SHARED / "post.lua").exists():  # run from a worktree: the harness is the main tree's neighbour
    procs.SHARED = Path("/work/shared/bench")

sys.path.insert(0, str(HERE.parent / "src"))

from skyfabric.ops.database import Database
from skyfabric.ops.keys import KeyRecord, digest, hint
from skyfabric.ops.keystore import KeyStore


def wait_limits_ok(within: float = 10.0) -> None:
    """Measure the shared limits, not a fallback: the first Redis call of a gateway starting on a busy
    machine may pass ``redis_timeout`` (degraded), and the next heartbeat brings it back."""
    deadline = time.monotonic() + within
    while True:
        ready = json.loads(urllib.request.urlopen("http://127.0.0.1:9302/readyz").read())
        limits = ready.get("operations", {}).get("limits", "ok")
        if limits == "ok":
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"limits are {limits}, not ok: is Redis up?")
        time.sleep(0.2)


def ledger_backlog() -> float:
    """KiB of ledger records not yet in the database at the end of a run (0 without a ledger): a shipper
    that fell behind would show here, its work deferred past the measured window rather than saved."""
    ready = json.loads(urllib.request.urlopen("http://127.0.0.1:9302/readyz").read())
    ledger = ready.get("operations", {}).get("ledger")
    return ledger["pending_bytes"] / 1024 if ledger else 0.0


def fleets(tmp: Path) -> dict[str, Path]:
    base = yaml.safe_load((HERE / "fleet.yaml").read_text())
    base["listener"]["port"] = 9302
    off = tmp / "off.yaml"
    off.write_text(yaml.safe_dump(base))
    on = dict(base)
    on.pop("api_keys")
    on["models"] = [{"name": "tiny", "price_per_mtok_in": 0.1, "price_per_mtok_out": 0.2}]
    on["operations"] = {"database": "ops.db", "redis": "redis://127.0.0.1:6379/0"}
    path = tmp / "keys.yaml"
    path.write_text(yaml.safe_dump(on))
    on["operations"] = {**on["operations"], "ledger": {"enabled": True}}
    everything = tmp / "all.yaml"
    everything.write_text(yaml.safe_dump(on))
    # The key's shared state from an earlier run (a budget spent today, grants a killed gateway held) would
    # make Redis refuse grants and measure direct admission instead: each run starts from none.
    import redis

    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    stale = list(client.scan_iter("skyfabric:{key_bench}:*"))
    if stale:
        client.delete(*stale)
    client.close()
    store = KeyStore(Database.at("ops.db", tmp))
    big = 10**9
    store.insert(
        KeyRecord(
            id="key_bench",
            name="bench",
            hash=digest("sk-bench"),
            hint=hint("sk-bench"),
            created=time.time(),
            rpm=big,
            tpm=big,
            max_concurrent=100_000,
            budget=1e9,
            budget_period="day",
        )
    )
    store.close()
    return {"off": off, "keys": path, "all": everything}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--modes", default="off,keys,all")
    ap.add_argument("--conns", default="32,1")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every mode")
    a = ap.parse_args()
    modes = a.modes.split(",")
    conn_counts = [int(c) for c in a.conns.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = fleets(Path(tmp))
        mock = start_mock()
        try:
            for conns in conn_counts:
                for mode in modes * a.rounds:  # interleaved: drift on a shared machine hits all alike
                    cmd = [sys.executable, "-m", "skyfabric.cli", "serve", "--config", str(paths[mode])]
                    proc = start(cmd, 0, 9302, {"PYTHONPATH": str(HERE.parent / "src")})
                    try:
                        wait_limits_ok()
                        wrk(9302, 2, conns)
                        before, before_all = cpu_seconds(proc.pid), cpu_total(proc.pid)
                        result = wrk(9302, a.seconds, conns)
                        per_request = (cpu_seconds(proc.pid) - before) / result["requests"] * 1e6
                        total = (cpu_total(proc.pid) - before_all) / result["requests"] * 1e6
                        backlog = ledger_backlog()
                        rows.append((conns, mode, result["rps"], result["p50"], per_request, total, backlog))
                    finally:
                        stop(proc)
                        time.sleep(0.5)
        finally:
            stop(mock)
    print(
        f"{'conns':>5} {'mode':4} {'req/s':>9} {'p50 ms':>8} {'CPU µs/req: gateway':>20} {'+ children':>10}"
    )
    for conns, mode, rps, p50, per_request, total, backlog in rows:
        print(f"{conns:5d} {mode:4} {rps:9.0f} {p50:8.3f} {per_request:20.1f} {total:10.1f} {backlog:11.1f}")
    for conns in conn_counts:
        pick = [r for r in rows if r[0] == conns]
        off = [r for r in pick if r[1] == "off"]
        for mode in modes:
            if mode == "off" or not off:
                continue
            on = [r for r in pick if r[1] == mode]
            rps = sum(r[2] for r in on) / sum(r[2] for r in off)
            p50 = sum(r[3] for r in on) / len(on) - sum(r[3] for r in off) / len(off)
            print(
                f"conns {conns}: {mode} median CPU µs/req gateway"
                f" {statistics.median(r[4] for r in on):.1f}"
                f" (off {statistics.median(r[4] for r in off):.1f}),"
                f" with children {statistics.median(r[5] for r in on):.1f}"
            )
            cpu = sum(r[4] for r in off) / sum(r[4] for r in on)
            cpu_all = sum(r[5] for r in off) / sum(r[5] for r in on)
            print(
                f"conns {conns}: {mode}/off req/s {rps:.0%}, p50 {mode} - off {p50 * 1000:+.0f} µs;"
                f" CPU/req off/{mode} {cpu:.0%} (gateway), {cpu_all:.0%} (with children)"
            )


if __name__ == "__main__":
    main()
