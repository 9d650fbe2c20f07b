"""The ledger's local outbox: an append-only log a record reaches before the client gets its answer.

Why a file first: the database may be across a network that is down, and a gateway may be killed at any
moment. A record copied into the outbox is in the kernel's page cache — the segment is a shared memory
mapping of the file — so a SIGKILL of the gateway loses nothing. What a crash of the whole machine may
lose is bounded by ``fsync_interval`` (500 ms by default): within it each record is in the database (whose
commits are synced) or fsynced here by the shipper (``outbox_reader.py``). The shipper
(``outbox_reader.py``, in a process of its own) reads the log behind the writer and deletes segments once
the database has confirmed every record in them; at start, what is left is replayed (the database ignores
records it already has, by request id).

Why a mapping and not ``write(2)``: appending is then a memory copy (~0.3 µs) instead of a system call
(2–7 µs under load, and one that waits while the shipper's fsync holds the file). A segment is written
in full with zeros when begun: a full disk fails there, at the start of a segment, never as a fault in
the middle of a copy; the reader knows where the records end — at the first NUL byte, which no record
contains (every byte it reads before that one is final: the file is written once, left to right); and
the blocks are real, not merely reserved. That last part is for speed: ``posix_fallocate`` reserves
*unwritten* extents, and every first write to a page of them after a sync converted an extent under the
file system's journal — ~6× the page faults (1,460 against 238 for 28,500 records in a standalone test
on ext4) and ~25 % more work per sync. With written blocks and a size that never changes while
appending, the shipper syncs with ``fdatasync``. A finished segment is truncated to its records before
the next is begun.

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
import mmap
import os
import socket
from pathlib import Path

from skyfabric.core.errors import ConfigError

log = logging.getLogger("skyfabric.ops.outbox")

#: A segment is closed and a new one begun past this size; the shipper deletes a segment once shipped.
#: 1 MiB: ~5,000 records, so that a shipment every 250 ms at several thousand requests a second reads one
#: segment and commits once (each commit is a synced write of the database's log).
SEGMENT_BYTES = 1024 * 1024
#: A new segment's zeros are written this many bytes at a time. The page cache keeps a file's pages in
#: folios as large as the writes that made them, and a write through the mapping to a page of a folio made
#: clean (by the shipper's sync, or never dirtied through the mapping) faults once per 4 KiB page into the
#: file system, which works through the whole folio each time: with one 1 MiB write, 37 faults per 1,000
#: 150-byte records, each over a 1 MiB folio; with 16 KiB writes, 11 per 1,000 (a fault maps the whole small
#: folio) and less system time (0.04–0.17 against 0.23–0.42 µs a record, a standalone loop syncing every
#: 1,750 records, as the shipper does under load; ext4). 64 writes a segment instead of one.
ZERO_CHUNK = 16 * 1024
_ZEROS = bytes(ZERO_CHUNK)
SUFFIX = ".jsonl"


class Outbox:
    """One process's slot of the outbox directory, as its writer (see the module docstring)."""

    def __init__(
        self, directory: str | Path, *, fsync_interval: float = 0.5, segment_bytes: int = SEGMENT_BYTES
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
        self._map: mmap.mmap | None = None
        self._seq = 0
        self._size = 0  # bytes of records in the current segment
        self._capacity = 0  # the current segment's allocated length
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

    def _begin_segment(self, need: int = 0) -> None:
        self._finish_segment()
        self._seq += 1
        capacity = max(self.segment_bytes, need)
        fd = os.open(self.segment_path(self._seq), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            written = 0
            while written < capacity:  # ENOSPC here, at a segment's start, not as a fault mid-copy
                chunk = _ZEROS if capacity - written >= ZERO_CHUNK else _ZEROS[: capacity - written]
                written += os.pwrite(fd, chunk, written)
            self._map = mmap.mmap(fd, capacity)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._size, self._capacity = fd, 0, capacity

    def _finish_segment(self) -> None:
        """Unmap the current segment and cut it to its records (before the next one exists)."""
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd >= 0:
            os.ftruncate(self._fd, self._size)
            os.close(self._fd)
            self._fd = -1

    # -- the writer (event loop) ------------------------------------------------------------------------

    def append(self, line: bytes) -> None:
        """Copy one newline-terminated record in. On return it survives a SIGKILL of this process."""
        n = len(line)
        start = self._size
        if start + n > self._capacity:
            self._begin_segment(n)
            start = 0
        self._map[start : start + n] = line  # type: ignore[index]
        self._size = start + n
        self.written += n
        self.appended += 1
        if self.fsync_interval == 0:
            os.fsync(self._fd)  # writes the mapping's dirty pages too

    def close(self) -> None:
        """Cut the current segment to its records, fsync it and release the slots (after the reader). The
        slot's other segments still there (the shipper did not ship them: it was stopped or killed) are
        synced too: the next run ships them, and a crash meanwhile must not lose them."""
        if self._fd >= 0:
            fd = os.dup(self._fd)
            try:
                self._finish_segment()
                with contextlib.suppress(OSError):
                    os.fsync(fd)
            finally:
                os.close(fd)
        if self.slot is not None:
            current = self.segment_path(self._seq)
            for path in self.slot.glob("*" + SUFFIX):
                if path != current:
                    with contextlib.suppress(OSError):
                        sync_file(path)
        for fd in self._locks:
            os.close(fd)
        self._locks.clear()


def sync_file(path: Path) -> None:
    """``fdatasync`` a file by its path (``OSError`` when it is gone or the disk refuses)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


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
