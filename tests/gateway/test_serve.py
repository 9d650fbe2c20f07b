"""``skyfabric serve --workers N``: processes share one port, and none outlives its parent."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text().lower()


def test_workers_share_the_port_and_die_with_their_parent(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(
        "models: [{name: m}]\n"
        "providers: [{name: p, regions: [{name: r, pools: [{name: x, accelerator: cpu, engine: vllm,"
        " model: m, endpoints: ['http://127.0.0.1:9/v1']}]}]}]\n"
        "health: {probe_interval: 0}\n"
    )
    port = free_port()
    parent = subprocess.Popen(
        [sys.executable, "-m", "skyfabric.cli", "serve", "--config", str(fleet), "--port", str(port),
         "--workers", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        children = [int(p) for p in subprocess.run(["pgrep", "-P", str(parent.pid)], capture_output=True,
                                                     text=True).stdout.split()]  # fmt: skip
        assert len(children) == 2
        for _ in range(40):  # fresh connections, each accepted by whichever worker the kernel picks
            assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        os.kill(parent.pid, signal.SIGKILL)  # no chance to clean up: the kernel must end the workers
        parent.wait(5)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(pid) for pid in children)
    finally:
        if parent.poll() is None:
            parent.kill()


def test_settling_the_heap_leaves_start_ups_objects_out_of_every_collection() -> None:
    """``settle_heap`` (called once the gateway serves): start-up's survivors are frozen, so a full
    collection no longer walks them; its garbage was collected first, not frozen for ever."""
    import gc
    import weakref

    from skyfabric.gateway.serve import GC_YOUNG_THRESHOLD, settle_heap

    class Cycle:
        pass

    garbage = Cycle()
    garbage.me = garbage  # type: ignore[attr-defined]
    gone = weakref.ref(garbage)
    kept = [Cycle() for _ in range(1000)]
    del garbage
    thresholds = gc.get_threshold()
    try:
        settle_heap()
        assert gc.get_freeze_count() >= len(kept)
        assert gone() is None  # collected, not frozen
        assert not any(o is kept for o in gc.get_objects())  # frozen objects are not tracked any more
        assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD  # requests in flight are not walked every ~30
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
