"""Where managed keys live: one table in the operations database (``ops/database.py``), shared by every
instance.

Blocking calls (sqlite3, psycopg 3), made from a worker thread by the callers: the request path never
touches the database — each instance serves from its in-memory copy (``keycache.py``). The table comes
from numbered migrations (append only).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from skyfabric.ops.database import Database, Migration, migrate_postgres_sync, migrate_sqlite
from skyfabric.ops.keys import KeyRecord

#: Column → SQL type (the same text means the same in SQLite and PostgreSQL).
COLUMNS: dict[str, str] = {
    "id": "TEXT PRIMARY KEY",
    "name": "TEXT NOT NULL",
    "hash": "TEXT NOT NULL UNIQUE",
    "hint": "TEXT NOT NULL",
    "created": "DOUBLE PRECISION NOT NULL",
    "team": "TEXT",
    "expires": "DOUBLE PRECISION",
    "revoked": "DOUBLE PRECISION",
    "models": "TEXT NOT NULL DEFAULT '[]'",
    "rpm": "BIGINT",
    "tpm": "BIGINT",
    "max_concurrent": "BIGINT",
    "budget": "DOUBLE PRECISION",
    "budget_period": "TEXT NOT NULL DEFAULT 'month'",
    "failure_policy": "TEXT",
    "prev_hash": "TEXT",
    "prev_until": "DOUBLE PRECISION",
    "updated": "DOUBLE PRECISION NOT NULL DEFAULT 0",
}
_NAMES = list(COLUMNS)

#: The keys' schema, in order (see ``ops/database.py``). Append only.
_TABLE = "CREATE TABLE {t}api_keys (" + ", ".join(f"{n} {k}" for n, k in COLUMNS.items()) + ")"
MIGRATIONS: list[Migration] = [(1, "the api keys table", [_TABLE])]


def _row(values: Sequence[Any]) -> KeyRecord:
    data = dict(zip(_NAMES, values, strict=True))
    data["models"] = tuple(json.loads(data["models"] or "[]"))
    return KeyRecord(**data)


def _values(record: KeyRecord) -> list[Any]:
    out: list[Any] = []
    for name in _NAMES:
        value = getattr(record, name)
        out.append(json.dumps(list(value)) if name == "models" else value)
    return out


class KeyStore:
    """The keys table in the operations database; every method blocks (call it from a thread)."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self.table = f"{database.prefix}api_keys"
        self._lock = threading.Lock()
        self._conn: Any = None
        self._ready = False

    # -- connection ---------------------------------------------------------------------------------------

    def _connect(self) -> Any:
        if self.database.postgres:
            return self.database.postgres_sync()
        return self.database.sqlite()

    @contextmanager
    def _cursor(self) -> Iterator[Any]:
        """A cursor on the shared connection; a broken connection is dropped and reopened next time."""
        with self._lock:
            if self._conn is None:
                self._conn = self._connect()
            try:
                if not self._ready:
                    migrate = migrate_postgres_sync if self.database.postgres else migrate_sqlite
                    migrate(self._conn, self.database.prefix, "keys", MIGRATIONS)
                    self._ready = True
                cur = self._conn.cursor()
                try:
                    yield cur
                finally:
                    cur.close()
            except Exception:
                conn, self._conn = self._conn, None
                try:
                    conn.close()
                except Exception:  # closing a broken connection may fail too; it is dropped
                    pass
                raise

    def _sql(self, text: str) -> str:
        return text.replace("?", "%s") if self.database.postgres else text

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- operations ----------------------------------------------------------------------------------------

    def all(self) -> list[KeyRecord]:
        """Every key, revoked and expired ones included (the cache needs to learn of revocations)."""
        with self._cursor() as cur:
            cur.execute(f"SELECT {', '.join(_NAMES)} FROM {self.table} ORDER BY created, id")
            return [_row(r) for r in cur.fetchall()]

    def get(self, key_id: str) -> KeyRecord | None:
        with self._cursor() as cur:
            cur.execute(self._sql(f"SELECT {', '.join(_NAMES)} FROM {self.table} WHERE id = ?"), (key_id,))
            row = cur.fetchone()
            return _row(row) if row is not None else None

    def insert(self, record: KeyRecord) -> None:
        marks = ", ".join("?" for _ in _NAMES)
        with self._cursor() as cur:
            cur.execute(
                self._sql(f"INSERT INTO {self.table} ({', '.join(_NAMES)}) VALUES ({marks})"), _values(record)
            )

    def update(self, record: KeyRecord) -> None:
        sets = ", ".join(f"{n} = ?" for n in _NAMES[1:])
        with self._cursor() as cur:
            cur.execute(
                self._sql(f"UPDATE {self.table} SET {sets} WHERE id = ?"), [*_values(record)[1:], record.id]
            )
