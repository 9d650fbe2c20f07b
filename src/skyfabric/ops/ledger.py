"""The usage ledger: records go to the outbox on the hot path and to the database from a shipper thread.

Hot path (:meth:`Ledger.record`): serialize the record and ``write(2)`` it to the outbox — a few µs, no
lock, no wait on the database. Shipper (one thread, its own event loop): every ``fsync_interval`` fsync
the outbox; every ``ship_interval`` read what is new, write it to the database in batches of up to
``batch_size``, and confirm it in the outbox. When the database fails, the records wait in the outbox (on
disk, not in memory) and the shipper retries every ``retry_interval``; the instance reports it in
``/readyz`` and logs it once per outage. After a restart the outbox's leftovers are shipped first, then
the open records of the run that died (streams it was relaying) are marked ``interrupted``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any

from skyfabric.core.fleet import LedgerConfig
from skyfabric.ops.database import Database
from skyfabric.ops.outbox import Outbox
from skyfabric.ops.record import UsageRecord, newest, row_of
from skyfabric.ops.store import Store, make_store

log = logging.getLogger("skyfabric.ops.ledger")


def outbox_dir(config: LedgerConfig, database: Database, base: Path | None = None) -> Path:
    """Where the outbox lives: ``ledger.outbox`` (relative to ``base``, the fleet file's directory), else
    beside the SQLite file, else ``skyfabric-ledger.outbox`` in ``base``."""
    if config.outbox is not None:
        path = Path(config.outbox)
        return base / path if base is not None and not path.is_absolute() else path
    if database.path is not None:
        return Path(f"{database.path}.outbox")
    return (base or Path.cwd()) / "skyfabric-ledger.outbox"


class Ledger:
    """One process's ledger writer: its outbox slot, and the thread that ships it."""

    def __init__(
        self, config: LedgerConfig, database: Database, outbox: Path, store: Store | None = None
    ) -> None:
        self.config = config
        self.store = store if store is not None else make_store(database)
        self.outbox = Outbox(str(outbox), fsync_interval=config.fsync_interval)
        self.reachable: bool | None = None  # None: not tried yet
        self.last_error: str | None = None
        self.shipped = 0
        self.dropped = 0  # outbox lines that were not records (torn by a machine crash)
        self._swept = False
        self._started = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------------------

    def start(self) -> None:
        """Open the outbox (replaying what a previous run left) and start the shipper thread."""
        self.outbox.open()
        self._started = time.time()
        self._thread = threading.Thread(target=self._thread_main, name="skyfabric-ledger", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Ship what can be shipped within ``timeout``, fsync the outbox and stop the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout + 2.0)
            self._thread = None

    # -- the hot path -----------------------------------------------------------------------------------

    def record(self, record: UsageRecord) -> None:
        """Append one record to the outbox (on return it survives a SIGKILL); never waits on the database."""
        record.instance = self.outbox.instance
        self.outbox.append(record.to_line())

    # -- status -----------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """For ``/readyz``: the database, whether it is reachable, and what waits in the outbox."""
        return {
            "database": self.store.kind,
            "reachable": self.reachable,
            "pending_bytes": self.outbox.pending_bytes(),
            "appended": self.outbox.appended,
            "shipped": self.shipped,
            "outbox": str(self.outbox.directory),
            "last_error": self.last_error if not self.reachable else None,
        }

    # -- the shipper ------------------------------------------------------------------------------------

    def _thread_main(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        config = self.config
        tick = min(config.fsync_interval or config.ship_interval, config.ship_interval)
        next_ship = 0.0
        try:
            while not self._stop.is_set():
                self.outbox.sync()
                now = time.monotonic()
                if now >= next_ship:
                    ok = await self._ship()
                    next_ship = now + (config.ship_interval if ok else config.retry_interval)
                await asyncio.sleep(tick)
            # Stopping: one last try to leave the outbox empty (what fails waits there for the next run).
            if self.reachable is not False:  # a database known down is not waited on at shutdown
                await self._ship()
        finally:
            self.outbox.close()
            await self.store.close()

    async def _ship(self) -> bool:
        """Ship everything new; False when the database failed (the records stay in the outbox)."""
        try:
            await self.store.connect()
            while True:
                batch = self.outbox.read(self.config.batch_size)
                if batch is None:
                    break
                rows = []
                for line in batch.lines:
                    try:
                        rows.append(row_of(line))
                    except ValueError:
                        self.dropped += 1
                        log.warning("ledger outbox: a line that is not a record was dropped: %.80r", line)
                if rows:
                    await self.store.write(newest(rows))
                self.outbox.confirm(batch)
                self.shipped += len(rows)
            if not self._swept and not self.outbox.replaying:
                swept = await self.store.sweep(self.outbox.instances, self._started)
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
                    self.outbox.directory,
                    exc,
                )
            self.reachable = False
            self.last_error = f"{type(exc).__name__}: {exc}"[:300]
            return False
        if self.reachable is False:
            log.warning("ledger database (%s) reachable again: the outbox is shipped", self.store.kind)
        self.reachable = True
        return True
