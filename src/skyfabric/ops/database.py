"""The operations database, shared by the key store and the usage ledger: where it is, how to open it,
and how its schema moves forward.

One database per fleet (``operations.database`` / ``database_env``): a SQLite file (default, relative to
the fleet file) or PostgreSQL. Each part that keeps tables there (``keys``, ``ledger``) owns a list of
numbered migrations, applied in order, once, by whichever instance opens the database first — serialized
across instances by SQLite's write lock or a PostgreSQL advisory lock — and recorded in
``<prefix><part>_migrations``. Migrations are append only; an applied one is never edited.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skyfabric.core.errors import ConfigError
from skyfabric.core.fleet import Operations

#: (version, what it does, statements); ``{t}`` in a statement is the table prefix.
Migration = tuple[int, str, list[str]]


def redact(url: str) -> str:
    """A database or Redis URL fit for a log line: the password replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else url


@dataclass(frozen=True, slots=True)
class Database:
    """Where the operations tables live: a PostgreSQL ``url``, or a SQLite ``path``."""

    url: str | None
    path: Path | None
    prefix: str = "skyfabric_"
    timeout: float = 5.0

    @property
    def postgres(self) -> bool:
        return self.url is not None

    @property
    def kind(self) -> str:
        return "postgresql" if self.url is not None else "sqlite"

    @property
    def shown(self) -> str:
        """For logs and ``/readyz``: the URL without its password, or the file."""
        return redact(self.url) if self.url is not None else str(self.path)

    @classmethod
    def at(
        cls, url: str, base: Path | None = None, *, prefix: str = "skyfabric_", timeout: float = 5.0
    ) -> Database:
        """``url``: a SQLite path (relative to ``base``), ``sqlite:///path`` or ``postgresql://…``."""
        if url.startswith(("postgresql://", "postgres://")):
            return cls(url, None, prefix, timeout)
        if url.startswith("sqlite://") and not url.startswith("sqlite:///"):
            raise ConfigError("a SQLite URL is sqlite:///relative.db or sqlite:////absolute.db")
        path = Path(url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url)
        if not path.is_absolute() and base is not None:
            path = base / path
        return cls(None, path, prefix, timeout)

    @classmethod
    def of(cls, config: Operations, fleet_path: str | Path | None = None) -> Database:
        """The fleet's database (its SQLite path relative to the fleet file's directory)."""
        base = Path(fleet_path).resolve().parent if fleet_path is not None else None
        return cls.at(
            config.database_url(), base, prefix=config.table_prefix, timeout=config.database_timeout
        )

    def sqlite(self, *, read_only: bool = False) -> sqlite3.Connection:
        """A SQLite connection in autocommit mode and WAL (readers never block the writers), each commit
        synced."""
        assert self.path is not None
        if read_only:
            return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=self.timeout)
        db = sqlite3.connect(str(self.path), timeout=10.0, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # FULL, not WAL's usual NORMAL: with NORMAL a commit is not synced, and a power loss may roll
            # back the last ones — after the ledger's shipper deleted their records from the outbox, and
            # after a key was created or revoked. FULL syncs the log at each commit: the shipper commits a
            # batch every ship_interval, the keys rarely.
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=10000")
        except BaseException:
            db.close()
            raise
        return db

    def postgres_sync(self, *, autocommit: bool = True) -> Any:
        """A blocking psycopg connection (for threads and commands; the shipper uses the async one)."""
        import psycopg

        assert self.url is not None
        return psycopg.connect(self.url, autocommit=autocommit, connect_timeout=max(1, int(self.timeout)))


_CREATE = (
    "CREATE TABLE IF NOT EXISTS {table} "
    "(version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
)


def pending(applied: set[int], migrations: list[Migration]) -> list[Migration]:
    """The migrations not applied yet, in order."""
    return [m for m in migrations if m[0] not in applied]


def migrate_sqlite(db: sqlite3.Connection, prefix: str, part: str, migrations: list[Migration]) -> list[int]:
    """Apply ``part``'s missing migrations in one write transaction; returns the versions applied."""
    table = f"{prefix}{part}_migrations"
    db.execute("BEGIN IMMEDIATE")  # one migrator at a time: other processes wait on the lock
    try:
        db.execute(_CREATE.format(table=table))
        applied = {row[0] for row in db.execute(f"SELECT version FROM {table}")}
        done = []
        for version, description, statements in pending(applied, migrations):
            for statement in statements:
                db.execute(statement.format(t=prefix))
            db.execute(f"INSERT INTO {table} VALUES (?, ?, ?)", (version, description, time.time()))
            done.append(version)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return done


def migrate_postgres_sync(conn: Any, prefix: str, part: str, migrations: list[Migration]) -> list[int]:
    """:func:`migrate_sqlite` for PostgreSQL (blocking), serialized across instances by an advisory lock."""
    table = f"{prefix}{part}_migrations"
    done = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [table])
        conn.execute(_CREATE.format(table=table))
        applied = {row[0] for row in conn.execute(f"SELECT version FROM {table}").fetchall()}
        for version, description, statements in pending(applied, migrations):
            for statement in statements:
                conn.execute(statement.format(t=prefix))
            conn.execute(f"INSERT INTO {table} VALUES (%s, %s, %s)", [version, description, time.time()])
            done.append(version)
    return done


async def migrate_postgres(conn: Any, prefix: str, part: str, migrations: list[Migration]) -> list[int]:
    """:func:`migrate_postgres_sync` over an async connection (the ledger's shipper)."""
    table = f"{prefix}{part}_migrations"
    done = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [table])
        await conn.execute(_CREATE.format(table=table))
        cur = await conn.execute(f"SELECT version FROM {table}")
        applied = {row[0] for row in await cur.fetchall()}
        for version, description, statements in pending(applied, migrations):
            for statement in statements:
                await conn.execute(statement.format(t=prefix))
            row = [version, description, time.time()]
            await conn.execute(f"INSERT INTO {table} VALUES (%s, %s, %s)", row)
            done.append(version)
    await conn.commit()
    return done
