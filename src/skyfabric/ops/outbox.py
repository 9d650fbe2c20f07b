"""The ledger's local outbox: an append-only log a record reaches before the client gets its answer.

Why a file first: the database may be across a network that is down, and a gateway may be killed at any
moment. A record written to the outbox with ``write(2)`` is in the kernel's page cache, so a SIGKILL of
the gateway loses nothing; ``fsync`` (batched by the shipper every ``fsync_interval``, a few ms) bounds what
a crash of the whole machine may lose. The shipper (``outbox_reader.py``, in a process of its own) reads
the log behind the writer and deletes segments once the database has confirmed every record in them; at
start, what is left is replayed (the database ignores records it already has, by request id).

Layout: ``<dir>/slot-<n>/<seq>.jsonl``, ``seq`` counting up by one per segment. Each gateway process
holds one slot with an exclusive ``flock`` (released by the kernel when the process dies), so worker
processes and restarts never share a file; a slot found unlocked at start belongs to a process that is
gone, and its records are shipped by whoever locks it. This module is the writer's side, on the event
loop: it only ever appends, and begins a new segment (``seq + 1``) after the last write to the old one —
which is how the reader knows a segment is finished.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
from pathlib import Path

from skyfabric.core.errors import ConfigError

log = logging.getLogger("skyfabric.ops.outbox")

#: A segment is closed and a new one begun past this size; the shipper deletes a segment once shipped.
SEGMENT_BYTES = 256 * 1024
SUFFIX = ".jsonl"


class Outbox:
    """One process's slot of the outbox directory, as its writer (see the module docstring)."""

    def __init__(
        self, directory: str | Path, *, fsync_interval: float = 0.005, segment_bytes: int = SEGMENT_BYTES
    ) -> None:
        self.directory = Path(directory)
        self.fsync_interval = fsync_interval
        self.segment_bytes = segment_bytes
        self.slot: Path | None = None
        #: Instance tags of this slot and of the slots adopted at start (their open records are swept).
        self.instances: list[str] = []
        #: What earlier processes left, oldest first: (segment, the instance tag of its slot).
        self.leftovers: list[tuple[Path, str]] = []
        #: Their bytes when found (what the reader will confirm or drop before this run's records).
        self.leftover_bytes = 0
        #: The first segment this process writes (the reader follows ``seq + 1`` from there).
        self.first_segment: Path | None = None
        self._locks: list[int] = []
        self._fd = -1
        self._seq = 0
        self._size = 0
        #: Bytes and lines written by this process.
        self.written = 0
        self.appended = 0

    # -- start ------------------------------------------------------------------------------------------

    def open(self) -> None:
        """Lock a slot, list what earlier processes left behind, and begin a new segment."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"ledger outbox {self.directory}: cannot create it: {exc.strerror}") from None
        host = socket.gethostname()
        slots = sorted(self.directory.glob("slot-*"), key=_slot_number)
        taken = {_slot_number(p) for p in slots}
        for path in slots:
            fd = _try_lock(path)
            if fd is None:
                continue  # a live process owns it
            self._locks.append(fd)
            old = sorted(path.glob("*" + SUFFIX))
            if self.slot is None:
                self.slot = path
            elif not old:
                os.close(self._locks.pop())
                continue
            tag = f"{host}:{path.resolve()}"
            self.leftovers.extend((segment, tag) for segment in old)
            self.instances.append(tag)
        if self.slot is None:
            number = max(taken, default=-1) + 1
            while True:
                path = self.directory / f"slot-{number}"
                path.mkdir(exist_ok=True)
                fd = _try_lock(path)
                if fd is not None:
                    break
                number += 1  # another process created and took it meanwhile
            self._locks.append(fd)
            self.slot = path
            self.instances.insert(0, f"{host}:{path.resolve()}")
        else:
            # Our own slot's instance tag first (records carry it), adopted slots after.
            own = f"{host}:{self.slot.resolve()}"
            self.instances.remove(own)
            self.instances.insert(0, own)
        for segment, _ in self.leftovers:
            with contextlib.suppress(FileNotFoundError):
                self.leftover_bytes += segment.stat().st_size
        existing = [int(p.stem) for p in self.slot.glob("*" + SUFFIX) if p.stem.isdigit()]
        self._seq = max(existing, default=0)
        self._begin_segment()
        self.first_segment = self.segment_path(self._seq)
        if self.leftovers:
            log.info(
                "ledger outbox: %d segment(s) left by an earlier run are being shipped", len(self.leftovers)
            )

    @property
    def instance(self) -> str:
        """The tag of this process's records (host and slot): it finds its own open records again."""
        return self.instances[0]

    def segment_path(self, seq: int) -> Path:
        """The path of this slot's segment number ``seq``."""
        assert self.slot is not None
        return self.slot / f"{seq:012d}{SUFFIX}"

    def _begin_segment(self) -> None:
        self._seq += 1
        fd = os.open(self.segment_path(self._seq), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        # Created after the old segment's last write: from now on the reader may finish the old one. Its
        # data is in the page cache; the reader fsyncs it through a descriptor of its own.
        old, self._fd, self._size = self._fd, fd, 0
        if old >= 0:
            os.close(old)

    # -- the writer (event loop) ------------------------------------------------------------------------

    def append(self, line: bytes) -> None:
        """Write one newline-terminated record. On return it survives a SIGKILL of this process."""
        written = os.write(self._fd, line)
        if written != len(line):  # a full disk: finish the line or fail loudly, never leave half a record
            os.write(self._fd, line[written:])
        self._size += len(line)
        self.written += len(line)
        self.appended += 1
        if self.fsync_interval == 0:
            os.fsync(self._fd)
        if self._size >= self.segment_bytes:
            self._begin_segment()

    def close(self) -> None:
        """fsync and close the current segment and release the slots (after the reader has stopped)."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
        for fd in self._locks:
            os.close(fd)
        self._locks.clear()


def _slot_number(path: Path) -> int:
    tail = path.name.removeprefix("slot-")
    return int(tail) if tail.isdigit() else 1 << 30


def _try_lock(slot: Path) -> int | None:
    """An exclusive lock on a slot, or None when another process holds it."""
    fd = os.open(slot / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
