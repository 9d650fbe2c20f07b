"""The ledger's local outbox: an append-only log a record reaches before the client gets its answer.

Why a file first: the database may be across a network that is down, and a gateway may be killed at any
moment. A record written to the outbox with ``write(2)`` is in the kernel's page cache, so a SIGKILL of
the gateway loses nothing; ``fsync`` (batched by the shipper every ``fsync_interval``, a few ms) bounds what
a crash of the whole machine may lose. The shipper reads the log behind the writer and deletes segments
once the database has confirmed every record in them; at start, what is left is replayed (the database
ignores records it already has, by request id).

Layout: ``<dir>/slot-<n>/<seq>.jsonl``. Each gateway process holds one slot with an exclusive ``flock``
(released by the kernel when the process dies), so worker processes and restarts never share a file; a
slot found unlocked at start belongs to a process that is gone, and its records are shipped by whoever
locks it. Threads: :meth:`Outbox.append` runs on the event loop; every other method on the shipper's
thread. Only the shipper closes a file, so the writer never races a close.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from skyfabric.core.errors import ConfigError

log = logging.getLogger("skyfabric.ops.outbox")

#: A segment is closed and a new one begun past this size; the shipper deletes a segment once shipped.
SEGMENT_BYTES = 256 * 1024
_READ_BYTES = 1024 * 1024
_SUFFIX = ".jsonl"


@dataclass(slots=True)
class Batch:
    """Whole lines read from one segment, and where the next read starts once they are confirmed."""

    lines: list[bytes]
    segment: Path
    end: int
    exhausted: bool  # the segment is closed and fully read: delete it once confirmed


class Outbox:
    """One process's slot of the outbox directory (see the module docstring)."""

    def __init__(
        self, directory: str | Path, *, fsync_interval: float = 0.005, segment_bytes: int = SEGMENT_BYTES
    ) -> None:
        self.directory = Path(directory)
        self.fsync_interval = fsync_interval
        self.segment_bytes = segment_bytes
        self.slot: Path | None = None
        #: Instance tags of this slot and of the slots adopted at start (their open records are swept).
        self.instances: list[str] = []
        self._locks: list[int] = []
        #: Segments to ship, oldest first; the writer's current segment is always the last one.
        self._queue: collections.deque[Path] = collections.deque()
        #: Segments that were there at start: once they are shipped, the start's replay is complete.
        self._old: set[Path] = set()
        self._offset = 0
        self._fd = -1
        self._seq = 0
        self._size = 0
        #: Bytes and lines written by this process, and bytes fsynced (the shipper compares them).
        self.written = 0
        self.appended = 0
        self._synced = 0
        self._retired: collections.deque[int] = collections.deque()
        #: A segment file was created since the last sync: its directory entry needs an fsync too.
        self._new_entry = False

    # -- start ------------------------------------------------------------------------------------------

    def open(self) -> None:
        """Lock a slot, queue what earlier processes left behind, and begin a new segment."""
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
            old = sorted(path.glob("*" + _SUFFIX))
            if self.slot is None:
                self.slot = path
            elif not old:
                os.close(self._locks.pop())
                continue
            self._queue.extend(old)
            self._old.update(old)
            self.instances.append(f"{host}:{path.resolve()}")
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
        existing = [int(p.stem) for p in self.slot.glob("*" + _SUFFIX) if p.stem.isdigit()]
        self._seq = max(existing, default=0)
        self._begin_segment()
        if self._old:
            log.info("ledger outbox: %d segment(s) left by an earlier run are being shipped", len(self._old))

    @property
    def instance(self) -> str:
        """The tag this process's records carry (host and slot): it finds its own open records again."""
        return self.instances[0]

    def _begin_segment(self) -> None:
        assert self.slot is not None
        self._seq += 1
        path = self.slot / f"{self._seq:012d}{_SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        old, self._fd, self._size = self._fd, fd, 0
        self._queue.append(path)  # after the old segment's last write: the reader may now finish it
        self._new_entry = True
        if old >= 0:
            self._retired.append(old)

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
            self._synced = self.written
        if self._size >= self.segment_bytes:
            self._begin_segment()

    # -- the shipper (its own thread) -------------------------------------------------------------------

    def sync(self) -> None:
        """fsync what was written since the last call; close segments the writer has left."""
        while self._retired:
            fd = self._retired.popleft()
            with contextlib.suppress(OSError):
                os.fsync(fd)
            os.close(fd)
        if self._new_entry and self.slot is not None:
            self._new_entry = False
            _fsync_dir(self.slot)
        written = self.written
        if written != self._synced:
            fd = self._fd
            try:
                os.fsync(fd)
            except OSError:  # the writer rotated and the shipper closed it meanwhile: synced above
                pass
            self._synced = written

    @property
    def replaying(self) -> bool:
        """Whether segments left by an earlier run are still waiting to be shipped."""
        return bool(self._old)

    def read(self, limit: int) -> Batch | None:
        """Up to ``limit`` whole lines after the confirmed position, from one segment; None when none."""
        while self._queue:
            segment = self._queue[0]
            closed = len(self._queue) > 1  # decided before reading: nothing is written to it after this
            try:
                with open(segment, "rb") as f:
                    f.seek(self._offset)
                    data = f.read(_READ_BYTES)
            except FileNotFoundError:
                data = b""
            cut = data.rfind(b"\n") + 1
            lines = data[:cut].splitlines()
            if len(lines) > limit:
                lines = lines[:limit]
                cut = sum(len(line) + 1 for line in lines)
            end = self._offset + cut
            if not lines:
                if not closed:
                    return None
                if data[cut:]:
                    log.warning(
                        "ledger outbox: %s ends with a torn record (%d bytes), dropped", segment, len(data)
                    )
                self.confirm(Batch([], segment, end, True))
                continue
            exhausted = closed and len(data) == cut and len(data) < _READ_BYTES
            return Batch(lines, segment, end, exhausted)
        return None

    def confirm(self, batch: Batch) -> None:
        """The database has every record of ``batch``: move past it (and delete a finished segment)."""
        if not self._queue or self._queue[0] != batch.segment:
            return
        self._offset = batch.end
        if batch.exhausted:
            self._queue.popleft()
            self._offset = 0
            with contextlib.suppress(FileNotFoundError):
                batch.segment.unlink()
            self._old.discard(batch.segment)

    def pending_bytes(self) -> int:
        """Bytes in the outbox not yet confirmed by the database."""
        total = -self._offset
        for segment in list(self._queue):
            with contextlib.suppress(FileNotFoundError):
                total += segment.stat().st_size
        return max(0, total)

    def close(self) -> None:
        """fsync and close the current segment and release the slots (the shipper's thread, at the end)."""
        self.sync()
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _try_lock(slot: Path) -> int | None:
    """An exclusive lock on a slot, or None when another process holds it."""
    fd = os.open(slot / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
