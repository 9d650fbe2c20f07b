"""Fixtures for the operations tests: a private table prefix in the real PostgreSQL, cleaned up after."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

PG_URL = os.environ.get("SKYFABRIC_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("SKYFABRIC_TEST_REDIS", "redis://127.0.0.1:6379/0")


@pytest.fixture
def pg_prefix() -> Iterator[str]:
    """A table prefix of this test's own in the shared ``test`` database; its tables are dropped after."""
    import psycopg

    prefix = f"t{os.urandom(5).hex()}_"
    yield prefix
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {prefix}usage, {prefix}ledger_migrations")


def pg_rows(prefix: str, where: str = "TRUE") -> list[dict[str, object]]:
    """The ledger rows of a test's prefix, as dicts."""
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(PG_URL, row_factory=dict_row) as conn:
        try:
            return list(conn.execute(f"SELECT * FROM {prefix}usage WHERE {where}").fetchall())
        except psycopg.errors.UndefinedTable:
            return []  # the ledger has not connected (and migrated) yet
