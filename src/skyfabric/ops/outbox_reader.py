"""The shipper's side of the outbox: follow the writer's segments, fsync them, read whole lines, delete.

It runs in the shipper process (``shipper.py``), never in the gateway's: the writer (``outbox.py``) only
copies records into its mapped segment, and everything that costs — fsync, reading, deleting — happens
here, under another interpreter lock. The reader finds the writer's next segment by its number
(``seq + 1``): the writer creates it after cutting the one before to its records, so once it exists the
one before is finished and may be read to its end and, once the database confirmed all of it, deleted.

Where the records end: at the first NUL byte (a segment is allocated zero-filled and no record holds a
NUL); every byte before it is final, so the whole lines before it are whole records — even while the
writer is copying the next one in. A segment its writer was killed in keeps its zero tail (and perhaps
the start of a record): both are dropped once it is known finished. fsync goes through the reader's own
descriptor (an fsync flushes a file's pages, through a mapping or not, whoever wrote them); the reader
fsyncs only when it sees records past the point it last synced.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from skyfabric.ops.outbox import SUFFIX, Outbox

log = logging.getLogger("skyfabric.ops.outbox")

_READ_BYTES = 1024 * 1024
#: What ``sync`` reads at a time to find where the records end (a tick's worth at ~20,000 records/s).
_PEEK_BYTES = 8192


@dataclass(slots=True)
class Batch:
    """Whole lines read from one segment, and where the next read starts once they are confirmed."""

    lines: list[bytes]
    segment: Path
    instance: str  # the tag of the slot the segment belongs to (its records' ``instance``)
    end: int
    exhausted: bool  # the segment is finished and fully read: delete it once confirmed


class OutboxReader:
    """Reads one writer's slot (from ``first``, its first segment) after what earlier runs left."""

    def __init__(self, first: Path, instance: str, leftovers: list[tuple[Path, str]]) -> None:
        self.slot = first.parent
        self.instance = instance
        #: Segments to ship, oldest first, with their slot's tag; the writer's current one is the last.
        self._queue: collections.deque[tuple[Path, str]] = collections.deque(leftovers)
        self._queue.append((first, instance))
        #: Segments that were there at start: once they are shipped, the start's replay is complete.
        self._old = {path for path, _ in leftovers}
        self._seq = int(first.stem)
        self._pattern = f"{self.slot}/%012d{SUFFIX}"  # the path of segment n (checked every tick)
        self._offset = 0
        #: Bytes confirmed (or dropped as torn) so far, leftovers included.
        self.confirmed = 0
        self._fd = -1  # the writer's current segment, for fsync
        self._synced = 0  # where its records ended at the last fsync
        self._dir_dirty = True  # the current segment's directory entry is not fsynced yet
        self._open_current(first)

    @classmethod
    def of(cls, outbox: Outbox) -> OutboxReader:
        """The reader of an opened writer (in the same process: tests and tools)."""
        assert outbox.first_segment is not None
        return cls(outbox.first_segment, outbox.instance, list(outbox.leftovers))

    def _open_current(self, path: Path) -> None:
        old, self._synced = self._fd, 0
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            self._fd = -1
        if old >= 0:
            with contextlib.suppress(OSError):
                os.fsync(old)  # the writer has finished it: its last records
            os.close(old)

    def _follow(self) -> None:
        """Queue the segments the writer began since the last look (their existence ends the one before)."""
        while True:
            name = self._pattern % (self._seq + 1)
            if not os.path.exists(name):
                return
            self._seq += 1
            path = Path(name)
            self._queue.append((path, self.instance))
            self._open_current(path)
            self._dir_dirty = True

    def sync(self) -> None:
        """fsync what the writer appended since the last call (and new segments' directory entries)."""
        self._follow()
        if self._dir_dirty:
            self._dir_dirty = False
            _fsync_dir(self.slot)
        fd = self._fd
        if fd < 0:
            return
        end = self._synced
        while True:  # where the records end now: the first NUL at or after the last end
            chunk = os.pread(fd, _PEEK_BYTES, end)
            zero = chunk.find(b"\0")
            end += len(chunk) if zero < 0 else zero
            if zero >= 0 or len(chunk) < _PEEK_BYTES:
                break
        if end != self._synced:
            os.fdatasync(fd)  # the blocks exist and the size is unchanged: no metadata to sync (outbox.py)
            self._synced = end

    @property
    def replaying(self) -> bool:
        """Whether segments left by an earlier run are still waiting to be shipped."""
        return bool(self._old)

    def read(self, limit: int) -> Batch | None:
        """Up to ``limit`` whole lines after the confirmed position, from one segment; None when none."""
        self._follow()
        while self._queue:
            segment, instance = self._queue[0]
            closed = len(self._queue) > 1  # decided before reading: nothing is written to it after this
            try:
                with open(segment, "rb") as f:
                    f.seek(self._offset)
                    raw = f.read(_READ_BYTES)
            except FileNotFoundError:
                raw = b""
            zero = raw.find(b"\0")
            data = raw if zero < 0 else raw[:zero]  # the records end at the first NUL
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
                        "ledger outbox: %s ends with a torn record (%d bytes), dropped",
                        segment,
                        len(data) - cut,
                    )
                self.confirmed += len(raw) - cut  # the torn record and the zero tail
                self.confirm(Batch([], segment, instance, end, True))
                continue
            exhausted = closed and len(raw) == cut and len(raw) < _READ_BYTES
            return Batch(lines, segment, instance, end, exhausted)
        return None

    def confirm(self, batch: Batch) -> None:
        """The database has every record of ``batch``: move past it (and delete a finished segment)."""
        if not self._queue or self._queue[0][0] != batch.segment:
            return
        self.confirmed += batch.end - self._offset
        self._offset = batch.end
        if batch.exhausted:
            self._queue.popleft()
            self._offset = 0
            with contextlib.suppress(FileNotFoundError):
                batch.segment.unlink()
            self._old.discard(batch.segment)

    def close(self) -> None:
        """fsync and close the reader's descriptor."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
