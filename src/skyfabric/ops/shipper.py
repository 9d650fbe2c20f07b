"""The ledger's shipper: a process of its own that writes the outbox to the database (and fsyncs what waits).

Why a process and not a thread: the shipper's work — reading, parsing and inserting the records, and fsyncing
those that wait — is as much CPU per request as the gateway's own bookkeeping, and in a thread it held the
gateway's interpreter lock while doing it; worse, every ``write(2)`` of a record released the lock to it, so
the event loop waited for the shipper's batch to finish (a lock convoy). In a process of its own it costs the
gateway nothing but the copy into the outbox; the kernel may run it on another core.

Protocol (``ledger.py`` is the other end): the gateway starts ``python -m skyfabric.ops.shipper`` with a
pipe on each of its stdin and stdout. The first stdin line is the JSON :class:`Job`; ``stop`` later asks
for a last shipment and a clean exit; the end of stdin without ``stop`` means the gateway is gone
(killed): the shipper exits at once and the next run ships what is left. On stdout the shipper writes one
JSON object per line: ``{"status": {...}}`` when its figures change, ``{"log": [level, logger,
message]}`` for each log record (the gateway logs them as its own, so they reach its log format and
handlers). SIGINT and SIGTERM are ignored: a terminal's Ctrl-C or a ``kill`` of the process group reaches
the gateway, whose shutdown then says ``stop``. It runs at niceness :data:`NICE`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from skyfabric.ops.database import Database
from skyfabric.ops.outbox_reader import OutboxReader
from skyfabric.ops.record import lines_of, rows_of
from skyfabric.ops.store import Store, make_store

log = logging.getLogger("skyfabric.ops.ledger")

#: The shipper's niceness: background work, so that a request woken on a busy core runs before it (the
#: outbox absorbs a backlog; a shipper that falls behind catches up when the gateway is less busy). Tried at
#: 0: the shipper's own CPU per record fell (6.8–9.4 % of the gateway's per request against 9.5–15.4 %,
#: ``bench/operations_ab.py --mode ledger``), but on the overhead harness itself, everything on, two
#: interleaved rounds each, req/s (7,088 / 6,890 against 7,055 / 7,046) and CPU per request with the
#: shipper (137.6 / 141.9 against 137.0 / 140.2 µs) did not move, and p99 rose from 9.0 / 10.3 to 11.4 /
#: 12.2 ms: requests waited behind its slices. Kept at 10.
NICE = 10
#: Seconds between two reports of the shipper's figures when only the counts changed.
REPORT_INTERVAL = 0.25


@dataclass(slots=True)
class Job:
    """What a shipper is told at start: where the outbox and the database are, and its intervals."""

    first_segment: str
    instance: str
    leftovers: list[tuple[str, str]]  # (segment, its slot's instance tag), oldest first
    instances: list[str]  # this run's slot and the adopted ones: their open records are swept
    started: float  # wall clock of the gateway's start: open records older than this are the dead runs'
    database_url: str | None
    database_path: str | None
    table_prefix: str
    database_timeout: float
    batch_size: int
    ship_interval: float
    fsync_interval: float
    retry_interval: float

    def to_line(self) -> bytes:
        return orjson.dumps(asdict(self), option=orjson.OPT_APPEND_NEWLINE)

    @classmethod
    def of_line(cls, line: bytes) -> Job:
        data = orjson.loads(line)
        data["leftovers"] = [tuple(pair) for pair in data["leftovers"]]
        return cls(**data)


class Shipper:
    """Ships one outbox reader's records to a store, reporting through ``emit`` (see the module doc)."""

    def __init__(
        self, job: Job, reader: OutboxReader, store: Store, emit: Callable[[dict[str, Any]], None]
    ) -> None:
        self.job = job
        self.reader = reader
        self.store = store
        self.emit = emit
        self.reachable: bool | None = None  # None: not tried yet
        self.last_error: str | None = None
        self.shipped = 0
        self.dropped = 0  # outbox lines that were not records (torn by a machine crash)
        self._swept = False
        self._sent: dict[str, Any] = {}
        self._next_report = 0.0

    def status(self) -> dict[str, Any]:
        return {
            "reachable": self.reachable,
            "last_error": self.last_error,
            "shipped": self.shipped,
            "dropped": self.dropped,
            "confirmed": self.reader.confirmed,
        }

    def report(self, final: bool = False) -> None:
        """Send the status: at once when the database's state changed (or at the end), else when the
        figures changed, at most every :data:`REPORT_INTERVAL` (each report wakes a gateway thread)."""
        status = self.status()
        sent = self._sent
        if status == sent:
            return
        now = time.monotonic()
        urgent = (
            final
            or status["reachable"] != sent.get("reachable")
            or status["last_error"] != sent.get("last_error")
        )
        if urgent or now >= self._next_report:
            self._sent = status
            self._next_report = now + REPORT_INTERVAL
            self.emit({"status": status})

    async def run(self, stop: asyncio.Event) -> None:
        """Ship every ``ship_interval`` and sync every half ``fsync_interval`` (a *tick*) until ``stop``,
        then ship once more. The syncs keep a fixed schedule, one a tick whatever the shipments do: a
        record is seen by the first sync after its write and fsynced by the next one unless the database
        confirmed it first (``outbox_reader.py``), so its bound is two ticks only if no two syncs are
        further apart than one. A shipment that is due starts half a tick before a sync and is waited for
        until that sync at most (what it confirms by then needs no fsync); one that takes longer — a large
        batch, a slow or unreachable database, a backlog — goes on in the background while the syncs keep
        their time. (A review found the earlier loop, which waited for a shipment and then slept a whole
        tick, spacing two syncs 1.5 ticks apart whenever a shipment took over half a tick: 0.62 s from
        write to disk with a shipment a second, against the bound of 0.5.)"""
        job = self.job
        tick = min(job.fsync_interval / 2 or job.ship_interval, job.ship_interval)
        clock = time.monotonic
        next_ship = 0.0
        next_sync = clock() + tick
        shipping: asyncio.Task[bool] | None = None
        started = 0.0
        try:
            while not stop.is_set():
                await _sleep_until(next_sync - tick / 2, clock)  # not wait_for(stop.wait()): a task a tick
                if shipping is None and clock() >= next_ship - tick / 2:  # due by the coming sync
                    started = clock()
                    shipping = asyncio.ensure_future(self.ship())
                if shipping is not None:
                    await asyncio.wait({shipping}, timeout=max(0.0, next_sync - clock()))
                    if shipping.done():
                        ok = shipping.result()
                        shipping = None
                        # On time after a success; a failure waits retry_interval from its end.
                        next_ship = started + job.ship_interval if ok else clock() + job.retry_interval
                        self.report()
                await _sleep_until(next_sync, clock)
                self.reader.sync()
                next_sync += tick
                if next_sync <= clock():  # the loop was held up (a stalled machine): a tick from now
                    next_sync = clock() + tick
            if shipping is not None:
                await shipping
            # Stopping: one last try to leave the outbox empty (what fails waits there for the next run).
            if self.reachable is not False:  # a database known down is not waited on at shutdown
                await self.ship()
        finally:
            self.reader.close()  # fsyncs what the database does not have
            await self.store.close()
            self.report(final=True)

    async def ship(self) -> bool:
        """Ship the records there are now; False when the database failed (they stay in the outbox)."""
        try:
            await self.store.connect()
            while True:
                batch = self.reader.read(self.job.batch_size)
                if batch is None:
                    break
                values = lines_of(batch.lines)
                if values is not None:  # every line a current record: bound as parsed
                    if values:
                        await self.store.write_lines(values, batch.instance)
                    count = len(values)
                else:
                    rows, dropped = rows_of(batch.lines, batch.instance)
                    if dropped:
                        self.dropped += dropped
                        log.warning("ledger outbox: %d line(s) that are not records were dropped", dropped)
                    if rows:
                        await self.store.write(rows)
                    count = len(rows)
                self.reader.confirm(batch)
                self.shipped += count
                if batch.caught_up:
                    # Everything there was is shipped. Not another read: what the gateway wrote during
                    # this transaction is the next shipment's. (Reading until a read found nothing, a
                    # shipper under steady load never left this loop: it shipped what arrived during
                    # each commit, a few dozen records a transaction, each with its fsync and a read of
                    # the segment — 3-6x the CPU per record of a shipment a second.)
                    break
            if not self._swept and not self.reader.replaying:
                swept = await self.store.sweep(self.job.instances, self.job.started)
                self._swept = True
                if swept:
                    log.warning(
                        "ledger: %d stream(s) cut by the previous run's end marked interrupted", swept
                    )
        except Exception as exc:
            if self.reachable is not False:
                log.warning(
                    "ledger database (%s) unreachable, records wait in the outbox %s: %s",
                    self.store.kind,
                    self.reader.slot.parent,
                    exc,
                )
            self.reachable = False
            self.last_error = f"{type(exc).__name__}: {exc}"[:300]
            return False
        if self.reachable is False:
            log.warning("ledger database (%s) reachable again: the outbox is shipped", self.store.kind)
        self.reachable = True
        return True


async def _sleep_until(when: float, clock: Callable[[], float]) -> None:
    delay = when - clock()
    if delay > 0:
        await asyncio.sleep(delay)


class _PipeHandler(logging.Handler):
    """Log records to the gateway, as ``{"log": [level, logger, message]}`` lines."""

    def __init__(self, emit: Callable[[dict[str, Any]], None]) -> None:
        super().__init__()
        self._emit = emit

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._emit({"log": [record.levelno, record.name, record.getMessage()]})
        except Exception:  # the gateway is gone: nobody to tell
            pass


async def _main() -> None:
    # Each shipment allocates a few thousand short-lived rows: at the default threshold the collector ran
    # every few hundred of them, re-walking the rows still in hand (~3 % of the shipper's time).
    gc.set_threshold(50_000, 20, 20)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if NICE:
        with contextlib.suppress(OSError):
            os.nice(NICE)
    out = sys.stdout.buffer

    def emit(message: dict[str, Any]) -> None:
        out.write(orjson.dumps(message, option=orjson.OPT_APPEND_NEWLINE))
        out.flush()

    root = logging.getLogger()
    root.handlers[:] = [_PipeHandler(emit)]
    root.setLevel(logging.INFO)
    fd = sys.stdin.fileno()
    buffered = b""
    while b"\n" not in buffered:  # os.read, not a buffered readline: "stop" must not hide in a buffer
        chunk = os.read(fd, 65536)
        if not chunk:
            return
        buffered += chunk
    first, rest = buffered.split(b"\n", 1)
    job = Job.of_line(first)
    database = Database(
        job.database_url,
        Path(job.database_path) if job.database_path is not None else None,
        job.table_prefix,
        job.database_timeout,
    )
    reader = OutboxReader(Path(job.first_segment), job.instance, [(Path(p), tag) for p, tag in job.leftovers])
    shipper = Shipper(job, reader, make_store(database), emit)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    gone = False

    def readable() -> None:
        nonlocal gone
        line = os.read(fd, 4096)
        if not line:  # the gateway died without saying stop: leave the outbox to its next run
            gone = True
            loop.remove_reader(fd)
            stop.set()
        elif b"stop" in line:
            loop.remove_reader(fd)
            stop.set()

    if b"stop" in rest:
        stop.set()
    else:
        loop.add_reader(fd, readable)
    task = asyncio.ensure_future(shipper.run(stop))
    await stop.wait()
    if gone:
        # No last shipment, no waiting on a database call in flight; but what the database does not have
        # is synced first (no tick follows, and the next run may be far off).
        with contextlib.suppress(Exception):
            reader.sync_all()
        os._exit(0)
    await task


if __name__ == "__main__":
    asyncio.run(_main())
