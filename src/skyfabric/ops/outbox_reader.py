"""The shipper's side of the outbox: follow the writer's segments, fsync them, read whole lines, delete.

It runs in the shipper process (``shipper.py``), never in the gateway's: the writer (``outbox.py``) only
copies records into its mapped segment, and everything that costs — fsync, reading, deleting — happens
here, under another interpreter lock. The reader finds the writer's next segment by its number
(``seq + 1``): the writer creates it after cutting the one before to its records, so once it exists the
one before is finished and may be read to its end and, once the database confirmed all of it, deleted.

Where the records end: at the first NUL byte (a segment is allocated zero-filled and no record holds a
NUL); every byte before it is final, so the whole lines before it are whole records — even while the
writer is copying the next one in. A segment its writer was killed in keeps its zero tail (and perhaps
the start of a record): both are dropped once it is known finished.

**What is synced.** A record must be on disk within ``fsync_interval`` of its write — in the database or
in the outbox. The shipper calls :meth:`sync` every half interval, after shipping when a shipment is due:
records the database confirmed are durable there (its commits are synced), and only records that waited a
whole tick without being shipped — the database is down, or shipping every ``ship_interval`` is slower —
are fsynced here, through the reader's own descriptor (an fsync flushes a file's pages, through a mapping
or not, whoever wrote them). With the database up and shipments at least as frequent as syncs, the outbox
is never fsynced: its pages stay in the page cache until the segment is deleted, and are never written.
That is most of the ledger's cost saved: each fsync of a few dozen records was ~0.5 ms of CPU (writeback,
a virtio notification per request on a VM), and the next store into each page it cleaned faulted in the
gateway.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from skyfabric.ops.outbox import SUFFIX, Outbox, sync_file

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
    #: Every whole record there was when it was read: the writer's current segment, read to where its
    #: records ended. A shipment stops after such a batch (see ``Shipper.ship``).
    caught_up: bool = False


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
        self._current = first
        self._offset = 0
        #: Bytes confirmed (or dropped as torn) so far, leftovers included.
        self.confirmed = 0
        self._fd = -1  # the writer's current segment, for fsync
        self._durable = 0  # where its records are durable up to (fsynced here, or confirmed by the database)
        self._seen = 0  # where they ended at the last sync (what has waited a tick since)
        #: Finished segments not known durable yet: (descriptor, path, ticks waited: 0 or 1): fsynced at the
        #: sync where they have waited a tick, unless the database confirmed all of them first.
        self._finished: list[tuple[int, Path, int]] = []
        self._dir_dirty = True  # the slot's directory lists segments not fsynced yet
        self._open_current(first)
        # What a dead process left may never have been synced (it died within a tick of writing): synced
        # once now, before anything else, so that a machine crash while it is shipped loses none of it.
        for path, _ in leftovers:
            try:
                sync_file(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                self._sync_failed(exc)
        for directory in {path.parent for path, _ in leftovers}:  # their names too
            with contextlib.suppress(OSError):
                _fsync_dir(directory)

    @classmethod
    def of(cls, outbox: Outbox) -> OutboxReader:
        """The reader of an opened writer (in the same process: tests and tools)."""
        assert outbox.first_segment is not None
        return cls(outbox.first_segment, outbox.instance, list(outbox.leftovers))

    def _open_current(self, path: Path) -> None:
        old, old_path = self._fd, self._current
        if old >= 0:
            if self._durable < self._end_of(old, self._durable):  # not all durable: see the next sync
                # Records seen at the last sync and not shipped since have waited a tick already: synced
                # at the next one (which may be the sync that noticed the new segment) unless shipped.
                self._finished.append((old, old_path, 1 if self._seen > self._durable else 0))
            else:
                os.close(old)
        self._durable = self._seen = 0
        self._current = path
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            self._fd = -1

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
        """fsync what has waited a whole tick (since the last call) without the database confirming it."""
        self._follow()
        finished, self._finished = self._finished, []
        for fd, path, seen in finished:
            if not path.exists() or self._confirmed_all(path):  # shipped (and deleted): nothing to sync
                os.close(fd)
            elif seen == 0:
                self._finished.append((fd, path, 1))  # finished since the last tick: one more to be shipped
            elif self._fsync(fd):
                os.close(fd)
            else:
                self._finished.append((fd, path, 1))  # the sync failed: tried again next tick
        fd = self._fd
        if fd < 0:
            return
        end = self._end_of(fd, self._seen)
        if self._seen > self._durable and self._fsync(fd):  # seen a tick ago, neither shipped nor synced
            self._durable = end
        self._seen = end

    def sync_all(self) -> None:
        """fsync everything the database has not confirmed, now (the gateway is gone: no tick follows)."""
        for fd, path, _ in self._finished:
            if path.exists() and not self._confirmed_all(path):
                self._fsync(fd)
        if self._fd >= 0 and self._durable < self._end_of(self._fd, self._durable):
            self._fsync(self._fd)

    def _fsync(self, fd: int) -> bool:
        """fsync one segment (and the directory first, when it lists a segment not synced yet); False, and
        an error logged, when the disk refused: its records are not counted durable, and shipping them is
        their only way to the disk left (a failed fsync may have dropped the pages' dirty state)."""
        try:
            if self._dir_dirty:  # the segment's name first: its data is no use after a crash without it
                _fsync_dir(self.slot)
                self._dir_dirty = False
            os.fdatasync(fd)  # the blocks exist and the size is unchanged: no metadata to sync (outbox.py)
        except OSError as exc:
            self._sync_failed(exc)
            return False
        return True

    def _sync_failed(self, exc: OSError) -> None:
        log.error("ledger outbox %s: fsync failed (%s): records not yet shipped may be lost", self.slot, exc)

    def _confirmed_all(self, path: Path) -> bool:
        """Whether the database has every record of the finished segment ``path`` (it is not queued)."""
        return all(queued != path for queued, _ in self._queue)

    @staticmethod
    def _end_of(fd: int, start: int = 0) -> int:
        """Where the records of the segment open as ``fd`` end now: its first NUL at or after ``start``."""
        end = start
        while True:
            chunk = os.pread(fd, _PEEK_BYTES, end)
            zero = chunk.find(b"\0")
            end += len(chunk) if zero < 0 else zero
            if zero >= 0 or len(chunk) < _PEEK_BYTES:
                return end

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
            caught_up = not closed and (zero >= 0 or len(raw) < _READ_BYTES)
            if len(lines) > limit:
                lines = lines[:limit]
                cut = sum(len(line) + 1 for line in lines)
                caught_up = False
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
            return Batch(lines, segment, instance, end, exhausted, caught_up)
        return None

    def confirm(self, batch: Batch) -> None:
        """The database has every record of ``batch``: move past it (and delete a finished segment)."""
        if not self._queue or self._queue[0][0] != batch.segment:
            return
        self.confirmed += batch.end - self._offset
        self._offset = batch.end
        if batch.segment == self._current:  # in the database now: no fsync needed for these
            self._durable = max(self._durable, batch.end)
        if batch.exhausted:
            self._queue.popleft()
            self._offset = 0
            with contextlib.suppress(FileNotFoundError):
                batch.segment.unlink()
            self._old.discard(batch.segment)

    def close(self) -> None:
        """fsync what the database does not have yet, and close the reader's descriptors."""
        self.sync_all()
        for fd, _, _ in self._finished:
            os.close(fd)
        self._finished.clear()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
