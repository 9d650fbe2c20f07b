"""What else a host ran while a drill ran on it: the measured ``background`` of the simulator's host model.

The embedded fleet's replicas share the machine with the gateway, the load generator, the fault proxies,
the replicas' own HTTP frontends — and whatever else runs there (on a shared build box: other people's
jobs). :class:`HostLoadSampler` measures it without guessing: every ``interval`` it reads the kernel's
count of runnable threads (``procs_running`` in ``/proc/stat``) and subtracts the drill's replicas' threads
that are running at that instant (their ``/proc/<pid>/task/*/stat`` state; the step profile already holds
what a replica's core and frontend cost) and itself. What is left is the
number of other threads competing for the cores — the ``background`` of
:class:`~skyfabric.sim.host.Host`, whose sharing factor is ``(busy replicas + background) / cores``.

The replicas' processes are found by their command line (``core_process``, ``skyfabric.cli replica``)
among the descendants of the process that runs the drill, so another drill on the same machine counts
as background, as it should. Linux only (``/proc``).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

#: A replica's processes: its engine core and its HTTP frontend (``skyfabric replica``), whose CPU per
#: prefill and per decode step the step profile holds (``bench/replica_steps.py --http``).
REPLICA_MARKERS = (b"skyfabric.engine.core_process", b"skyfabric.cli\x00replica")


def _procs_running() -> int:
    with open("/proc/stat", "rb") as handle:
        for line in handle:
            if line.startswith(b"procs_running"):
                return int(line.split()[1])
    return 0


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return 0
    return int(stat[stat.rindex(b")") + 2 :].split()[1])


def _running(pid: int) -> int:
    """Threads of ``pid`` that are runnable now."""
    count = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for task in tasks:
        try:
            stat = Path(f"/proc/{pid}/task/{task}/stat").read_bytes()
        except OSError:
            continue
        count += stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] == b"R"
    return count


def descendant_replicas(root: int) -> list[int]:
    """Pids of replica processes (cores and frontends) below ``root`` in the process tree."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if not any(marker in cmdline for marker in REPLICA_MARKERS):
            continue
        up, hops = pid, 0
        while up > 1 and hops < 16:
            up, hops = _parent(up), hops + 1
            if up == root:
                found.append(pid)
                break
    return found


class HostLoadSampler:
    """A thread sampling the host's other runnable threads while process ``root`` (a drill) runs."""

    def __init__(self, root: int, interval: float = 0.05, rescan: float = 2.0) -> None:
        self.root = root
        self.interval = interval
        self.rescan = rescan
        #: (wall-clock time, other runnable threads, the drill's replica threads running)
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="host-load", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        cores: list[int] = []
        scanned = 0.0
        while not self._stop.wait(self.interval):
            now = time.time()
            if now - scanned > self.rescan:
                cores, scanned = descendant_replicas(self.root), now
            ours = sum(_running(pid) for pid in cores)
            others = _procs_running() - ours - 1  # less this sampler, which is running
            self.samples.append((now, max(0, others), ours))

    def background(self, start: float, end: float) -> float:
        """Mean other runnable threads between two wall-clock times (0 without samples)."""
        window = [others for t, others, _ in self.samples if start <= t < end]
        return sum(window) / len(window) if window else 0.0

    def series(self, t0: float, until: float, step: float) -> list[tuple[float, float]]:
        """``(t, mean background over [t, t + step))`` from ``t0`` (the drill's time 0) to ``until``."""
        out = []
        t = 0.0
        while t < until:
            out.append((t, self.background(t0 + t, t0 + t + step)))
            t += step
        return out
