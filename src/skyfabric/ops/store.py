"""Where ledger records end up: SQLite (default) or PostgreSQL, one row per request, with migrations.

Writes are idempotent by request id: ``INSERT … ON CONFLICT (request_id) DO UPDATE … WHERE`` the stored
row is a stream's open record and the new one is final. A replayed record therefore never adds a row and
never undoes a final one, whatever order the outbox and a restart deliver them in.

Both stores are used from the shipper process's event loop, which never waits on them: SQLite's calls run
in a thread (a database locked by another writer waits there); PostgreSQL's go through psycopg's async
connection so every call has a client-side timeout — a database behind a network that drops packets must
not freeze the shipper, whose ticks keep syncing the outbox meanwhile.

**SQLite through APSW, not the standard library's ``sqlite3``**, for the shipper's writes only (migrations,
reports and the keys use ``sqlite3``): the shipper's cost per record is the ledger's largest, and most of it
is the insert — binding 19 values and stepping the statement. APSW (a maintained, thin SQLite wrapper that
ships a current SQLite) did the same inserts for 25–35 % less CPU: 6.0–7.5 against 8.5–10.4 µs a record,
whole shipments through this module's code, 84,000 records each, interleaved. The two are separate copies
of SQLite, and a copy knows only its own connections' locks inside a process (SQLite's POSIX locks are
per process): across processes — the shipper against reports, the keys, other instances — each waits for
the other's write lock as usual, but within one process they would not. So :meth:`SQLiteStore._open`
closes the ``sqlite3`` connection that ran the migrations before it opens APSW's, and nothing else in the
shipper's process opens the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Sequence
from itertools import chain
from pathlib import Path
from typing import Any, Protocol

from skyfabric.ops.database import Database, Migration, migrate_postgres, migrate_sqlite
from skyfabric.ops.record import COLUMNS, LINE_FIELDS, OPEN, newest

Row = tuple[Any, ...]
_OUTCOME = LINE_FIELDS.index("outcome")

#: Schema migrations, in order: (version, what it does, statements). ``{t}`` is the table prefix.
#: Append only; never edit an applied one.
MIGRATIONS: list[Migration] = [
    (
        1,
        "the usage table",
        [
            "CREATE TABLE {t}usage ("
            " request_id TEXT PRIMARY KEY, ts DOUBLE PRECISION NOT NULL, model TEXT NOT NULL,"
            " protocol TEXT NOT NULL, kind TEXT NOT NULL, key_id TEXT, endpoints TEXT NOT NULL,"
            " provider TEXT, region TEXT, attempts INTEGER NOT NULL, continuations INTEGER NOT NULL,"
            " tokens_in BIGINT NOT NULL, tokens_out BIGINT NOT NULL, tokens_cached BIGINT NOT NULL,"
            " cost DOUBLE PRECISION NOT NULL, latency_ms DOUBLE PRECISION NOT NULL, ttft_ms DOUBLE PRECISION,"
            " status INTEGER NOT NULL, outcome TEXT NOT NULL, instance TEXT NOT NULL,"
            " final INTEGER NOT NULL)",
        ],
    ),
    (
        2,
        "indexes for reports by period and key, and for finding a dead instance's open streams",
        [
            "CREATE INDEX {t}usage_ts ON {t}usage (ts)",
            "CREATE INDEX {t}usage_key_ts ON {t}usage (key_id, ts)",
            "CREATE INDEX {t}usage_open ON {t}usage (instance) WHERE final = 0",
        ],
    ),
    (
        3,
        "no index by key: no query reads it (reports select a period, then group), and each cost every "
        "insert ~1 µs of the shipper's time",
        ["DROP INDEX IF EXISTS {t}usage_key_ts"],
    ),
]


def insert_sql(prefix: str, placeholder: str) -> str:
    """The idempotent insert (see the module docstring) of a row of :data:`record.COLUMNS`."""
    return _upsert(prefix, ", ".join([placeholder] * len(COLUMNS)))


@functools.lru_cache(maxsize=64)
def positional_insert_sql(prefix: str, instance: str, rows: int = 1) -> str:
    """The same insert of outbox lines' values as they are (:data:`record.LINE_FIELDS`, numbered
    parameters), ``instance`` inlined and ``final`` computed: the shipper binds the parsed lines themselves,
    building no row per record (SQLite). ``rows`` lines per statement, their values one after another.
    Built once per slot and size, not per shipment."""
    n = len(LINE_FIELDS)
    literal = "'" + instance.replace("'", "''") + "'"
    tuples = []
    for r in range(rows):
        values = ", ".join(f"?{r * n + i}" for i in range(1, n + 1))
        tuples.append(f"{values}, {literal}, ?{r * n + _OUTCOME + 1} <> '{OPEN}'")
    return _upsert(prefix, "), (".join(tuples))


def _upsert(prefix: str, values: str) -> str:
    names = ", ".join(COLUMNS)
    updates = ", ".join(f"{c} = excluded.{c}" for c in COLUMNS if c != "request_id")
    return (
        f"INSERT INTO {prefix}usage ({names}) VALUES ({values}) ON CONFLICT (request_id) DO UPDATE SET "
        f"{updates} WHERE {prefix}usage.final = 0 AND excluded.final = 1"
    )


def sweep_sql(prefix: str, placeholder: str, instances: int) -> str:
    """Open records of dead instances become ``interrupted`` (their gateway stopped mid-stream)."""
    marks = ", ".join([placeholder] * instances)
    return (
        f"UPDATE {prefix}usage SET outcome = 'interrupted', final = 1 "
        f"WHERE final = 0 AND instance IN ({marks}) AND ts < {placeholder}"
    )


class Store(Protocol):
    """A ledger database as the shipper sees it."""

    kind: str

    async def connect(self) -> None: ...
    async def write(self, rows: Sequence[Row]) -> None: ...
    async def write_lines(self, values: Sequence[Sequence[Any]], instance: str) -> None: ...
    async def sweep(self, instances: Sequence[str], before: float) -> int: ...
    async def close(self) -> None: ...


def make_store(database: Database) -> Store:
    """The ledger's store in the operations database."""
    if database.url is not None:
        return PostgresStore(database.url, database.prefix, timeout=database.timeout)
    assert database.path is not None
    return SQLiteStore(str(database.path), database.prefix)


#: Outbox lines per SQLite insert statement (a multi-row ``VALUES``). APSW looks a statement up in its cache
#: by its text at each execution, and that lookup of this ~1 KB upsert was the shipper's largest single
#: cost under load (9 % of its CPU, ``perf``): 20 lines a statement pay it once, and inserting cost 2.1–2.3
#: against 3.2–4.0 µs a record (100,000 records in 5,000-record transactions, three interleaved runs).
#: Rows of one request id in one statement are upserted in order, as by separate statements.
LINES_PER_INSERT = 20


class SQLiteStore:
    """The default ledger: one SQLite file (WAL, so reports read while gateways write)."""

    kind = "sqlite"

    def __init__(self, path: str, prefix: str) -> None:
        self.path = path
        self.prefix = prefix
        self._db: Any = None  # an ``apsw.Connection`` (see the module docstring)
        self._insert = insert_sql(prefix, "?")

    async def connect(self) -> None:
        if self._db is None:
            self._db = await asyncio.to_thread(self._open)

    def _open(self) -> Any:
        db = Database(None, Path(self.path), self.prefix).sqlite()
        try:
            migrate_sqlite(db, self.prefix, "ledger", MIGRATIONS)
        finally:
            db.close()
        import apsw

        writer = apsw.Connection(self.path)
        try:
            # As ``Database.sqlite`` opens it: WAL, each commit synced, a lock waited on for 10 s.
            writer.execute("PRAGMA journal_mode=WAL")
            writer.execute("PRAGMA synchronous=FULL")
            writer.set_busy_timeout(10_000)
        except BaseException:
            writer.close()
            raise
        return writer

    # Every call in a thread: a database locked by another writer waits up to its busy timeout there, not
    # on the shipper's event loop, whose ticks keep syncing the outbox meanwhile (``shipper.py``).

    async def write(self, rows: Sequence[Row]) -> None:
        """The rows in one transaction. Several rows of one request id (its open record and its final
        one, or a replay) need no sorting out: the upsert keeps the first final one, whatever the order."""
        await asyncio.to_thread(self._write, (self._insert, rows))

    async def write_lines(self, values: Sequence[Sequence[Any]], instance: str) -> None:
        """Parsed outbox lines (each exactly :data:`record.LINE_FIELDS`) of one slot, in one transaction:
        :data:`LINES_PER_INSERT` to a statement, the rest one by one."""
        await asyncio.to_thread(self._write_lines, values, instance)

    def _write_lines(self, values: Sequence[Sequence[Any]], instance: str) -> None:
        k = LINES_PER_INSERT
        whole = len(values) - len(values) % k
        several = [list(chain.from_iterable(values[i : i + k])) for i in range(0, whole, k)]
        single = positional_insert_sql(self.prefix, instance)
        self._write((positional_insert_sql(self.prefix, instance, k), several), (single, values[whole:]))

    def _write(self, *parts: tuple[str, Sequence[Sequence[Any]]]) -> None:
        """Each part's rows through its statement, all in one transaction."""
        assert self._db is not None
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for sql, rows in parts:
                if rows:
                    db.executemany(sql, rows)
            db.execute("COMMIT")
        except BaseException:
            # A failed statement or COMMIT (a busy or full disk) leaves the transaction open: rolled back,
            # so the next shipment starts clean (the records are still in the outbox), and the first error
            # is the one raised.
            if not db.get_autocommit():
                with contextlib.suppress(Exception):
                    db.execute("ROLLBACK")
            raise

    async def sweep(self, instances: Sequence[str], before: float) -> int:
        assert self._db is not None
        db = self._db
        sql = sweep_sql(self.prefix, "?", len(instances))

        def sweep() -> int:
            db.execute(sql, [*instances, before])
            return int(db.changes())

        return await asyncio.to_thread(sweep)

    async def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


class PostgresStore:
    """The ledger in PostgreSQL (psycopg 3, async, every call under ``timeout`` seconds)."""

    kind = "postgresql"

    def __init__(self, url: str, prefix: str, *, timeout: float = 5.0) -> None:
        self.url = url
        self.prefix = prefix
        self.timeout = timeout
        self._conn: Any = None
        self._insert = insert_sql(prefix, "%s")
        #: Calls given up on (see :meth:`_within`), kept referenced until they end by themselves.
        self._abandoned: set[asyncio.Future[Any]] = set()

    async def _within(self, work: Any) -> Any:
        """Run ``work`` for at most ``timeout`` seconds. A call past it is abandoned, not awaited: psycopg
        answers a cancellation by asking the server to cancel the query, over the same dead network, for
        up to 10 s; the connection is given up and a fresh one made at the next try."""
        task = asyncio.ensure_future(work)
        done, _ = await asyncio.wait({task}, timeout=self.timeout)
        if not done:
            self._conn = None
            task.cancel()
            self._abandoned.add(task)
            task.add_done_callback(self._abandoned.discard)
            task.add_done_callback(_consume)
            raise TimeoutError(f"the database did not answer within {self.timeout:g}s")
        try:
            return task.result()
        except BaseException:
            await self._drop()
            raise

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            closing = asyncio.ensure_future(conn.close())
            # Closing sends a goodbye over a socket that may be dead: never wait on it long.
            done, _ = await asyncio.wait({closing}, timeout=0.5)
            if not done:
                self._abandoned.add(closing)
                closing.add_done_callback(self._abandoned.discard)
            closing.add_done_callback(_consume)

    async def connect(self) -> None:
        if self._conn is not None:
            return
        import psycopg

        async def connect() -> Any:
            conn = await psycopg.AsyncConnection.connect(
                self.url, connect_timeout=max(1, int(self.timeout)), autocommit=False
            )
            try:
                await migrate_postgres(conn, self.prefix, "ledger", MIGRATIONS)
            except BaseException:
                await conn.close()
                raise
            return conn

        self._conn = await self._within(connect())

    async def write(self, rows: Sequence[Row]) -> None:
        conn = self._conn
        assert conn is not None
        rows = newest(list(rows))  # one row per request id in one pipelined batch

        async def write() -> None:
            async with conn.cursor() as cur:
                await cur.executemany(self._insert, rows)
            await conn.commit()

        await self._within(write())

    async def write_lines(self, values: Sequence[Sequence[Any]], instance: str) -> None:
        """Parsed outbox lines of one slot: as rows (psycopg binds tuples in one pipelined batch)."""
        await self.write([(*v, instance, int(v[_OUTCOME] != OPEN)) for v in values])

    async def sweep(self, instances: Sequence[str], before: float) -> int:
        conn = self._conn
        assert conn is not None

        async def sweep() -> int:
            cur = await conn.execute(sweep_sql(self.prefix, "%s", len(instances)), [*instances, before])
            count = int(cur.rowcount)
            await conn.commit()
            return count

        result: int = await self._within(sweep())
        return result

    async def close(self) -> None:
        await self._drop()


def _consume(future: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned call's outcome, so that asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()
