"""The usage ledger: records go to the outbox on the hot path and to the database from a shipper process.

Hot path (:meth:`Ledger.write`, :meth:`Ledger.record`): encode the record as one positional JSON line and copy
it into the outbox — a few µs, no lock, no wait on the database, nothing else in this process. Shipper
(``shipper.py``, a child process): every ``ship_interval`` read what is new, write it to the database in
transactions of up to ``batch_size``, and delete what the database confirmed; fsync the outbox only for
records not shipped within half ``fsync_interval`` (``outbox_reader.py``). When the database fails, the
records wait in the outbox (on disk, not in memory) and the shipper retries every ``retry_interval``; the
instance reports it in ``/readyz`` and logs it once per outage (the shipper's log records and figures come
back over a pipe and are logged and reported here as this process's). After a restart the outbox's leftovers
are shipped first, then the open records of the run that died (streams it was relaying) are marked
``interrupted``.

If the shipper dies, the gateway keeps serving and keeps writing the outbox (``/readyz`` says
``shipper: exited``); the next start ships it. If the gateway dies, the shipper sees its stdin close and
exits at once, leaving the outbox to the gateway's next run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson

import skyfabric
from skyfabric.core.fleet import LedgerConfig
from skyfabric.ops.database import Database
from skyfabric.ops.outbox import Outbox
from skyfabric.ops.record import UsageRecord, line_of
from skyfabric.ops.shipper import Job

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
    """One process's ledger writer: its outbox slot, and the shipper process that ships it."""

    def __init__(self, config: LedgerConfig, database: Database, outbox: Path) -> None:
        self.config = config
        self.database = database
        self.outbox = Outbox(str(outbox), fsync_interval=config.fsync_interval)
        # The shipper's figures, as it last reported them.
        self.reachable: bool | None = None  # None: not tried yet
        self.last_error: str | None = None
        self.shipped = 0
        self.dropped = 0
        self._confirmed = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._listener: threading.Thread | None = None
        #: One encoded line into the outbox (``write`` for a caller on the hot path that has the line).
        self.append = self.outbox.append

    # -- lifecycle --------------------------------------------------------------------------------------

    def start(self) -> None:
        """Open the outbox (finding what a previous run left) and start the shipper process."""
        self.outbox.open()
        box = self.outbox
        assert box.first_segment is not None
        database = self.database
        config = self.config
        job = Job(
            first_segment=str(box.first_segment),
            instance=box.instance,
            leftovers=[(str(path), tag) for path, tag in box.leftovers],
            instances=list(box.instances),
            started=time.time(),
            database_url=database.url,
            database_path=str(database.path) if database.path is not None else None,
            table_prefix=database.prefix,
            database_timeout=database.timeout,
            batch_size=config.batch_size,
            ship_interval=config.ship_interval,
            fsync_interval=config.fsync_interval,
            retry_interval=config.retry_interval,
        )
        # The shipper runs this very skyfabric, wherever it was imported from.
        source = str(Path(skyfabric.__file__).resolve().parent.parent)
        path = os.environ.get("PYTHONPATH")
        env = {**os.environ, "PYTHONPATH": source if not path else f"{source}{os.pathsep}{path}"}
        self._process = process = subprocess.Popen(
            [sys.executable, "-m", "skyfabric.ops.shipper"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        assert process.stdin is not None
        process.stdin.write(job.to_line())
        process.stdin.flush()
        self._listener = threading.Thread(
            target=self._listen, name="skyfabric-ledger-pipe", daemon=True, args=(process,)
        )
        self._listener.start()

    def close(self, timeout: float = 5.0) -> None:
        """Have the shipper ship what it can within ``timeout`` and exit; fsync and close the outbox."""
        process, self._process = self._process, None
        if process is not None:
            assert process.stdin is not None
            with contextlib.suppress(OSError):
                process.stdin.write(b"stop\n")
                process.stdin.close()
            try:
                process.wait(timeout + self.database.timeout + 2.0)
            except subprocess.TimeoutExpired:
                log.warning("ledger shipper did not stop in time: killed (the outbox keeps its records)")
                process.kill()
                process.wait()
        if self._listener is not None:
            self._listener.join(2.0)
            self._listener = None
        self.outbox.close()

    def _listen(self, process: subprocess.Popen[bytes]) -> None:
        """The shipper's reports (a thread that sleeps in ``read`` between them: a few a second at most)."""
        assert process.stdout is not None
        for line in process.stdout:
            try:
                message = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            status = message.get("status")
            if status is not None:
                self.reachable = status["reachable"]
                self.last_error = status["last_error"]
                self.shipped = status["shipped"]
                self.dropped = status["dropped"]
                self._confirmed = status["confirmed"]
                continue
            record = message.get("log")
            if record is not None:
                level, name, text = record
                logging.getLogger(name).log(level, "%s", text)
        process.stdout.close()
        if self._process is process:  # not stopped by close(): it died
            log.warning(
                "ledger shipper exited (status %s): records wait in the outbox %s for the next start",
                process.wait(),
                self.outbox.directory,
            )

    # -- the hot path -----------------------------------------------------------------------------------

    def write(self, values: tuple[Any, ...]) -> None:
        """Append one record, given as the values of ``record.LINE_FIELDS`` in order (on return it
        survives a SIGKILL of this process); never waits on the database."""
        self.append(line_of(values))

    def record(self, record: UsageRecord) -> None:
        """:meth:`write` for a record object."""
        self.append(record.to_line())

    # -- status -----------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """For ``/readyz``: the database, whether it is reachable, and what waits in the outbox."""
        box = self.outbox
        process = self._process
        return {
            "database": "postgresql" if self.database.url is not None else "sqlite",
            "reachable": self.reachable,
            "shipper": "running" if process is not None and process.poll() is None else "exited",
            "pending_bytes": max(0, box.leftover_bytes + box.written - self._confirmed),
            "appended": box.appended,
            "shipped": self.shipped,
            "outbox": str(box.directory),
            "last_error": self.last_error if not self.reachable else None,
        }
