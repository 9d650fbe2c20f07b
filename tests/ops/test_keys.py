"""Keys stored hashed in SQLite and PostgreSQL; the cache: rotation overlap, revocation, expiry."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from skyfabric.core.errors import AuthenticationError
from skyfabric.ops.database import Database, redact
from skyfabric.ops.keycache import KeyCache
from skyfabric.ops.keys import PREFIX, KeyRecord, digest, hint, new_key_id, new_secret
from skyfabric.ops.keystore import KeyStore

POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KeyStore]:
    if request.param == "sqlite":
        made = KeyStore(Database.at("keys.db", tmp_path))
        yield made
        made.close()
        return
    prefix = f"t{os.urandom(5).hex()}_"
    made = KeyStore(Database.at(POSTGRES, prefix=prefix))
    yield made
    with made._cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS {made.table}, {prefix}keys_migrations")
    made.close()


def record(secret: str, **fields: object) -> KeyRecord:
    return KeyRecord(
        id=new_key_id(), name="team-a", hash=digest(secret), hint=hint(secret), created=1.0, **fields
    )  # type: ignore[arg-type]


def test_a_key_round_trips_through_the_store_without_its_secret(store: KeyStore) -> None:
    secret = new_secret()
    assert secret.startswith(PREFIX) and len(secret) > 40
    made = record(secret, models=("gpt-*", "m"), rpm=60, tpm=1000, budget=5.0, budget_period="day")
    store.insert(made)
    assert store.get(made.id) == made
    assert store.all() == [made]
    with store._cursor() as cur:
        cur.execute(f"SELECT * FROM {store.table}")
        assert secret not in repr(cur.fetchall())
    revoked = KeyRecord(**_fields(made, revoked=5.0))  # type: ignore[arg-type]
    store.update(revoked)
    assert store.get(made.id) == revoked and store.get("key_nope") is None


def _fields(made: KeyRecord, **changes: object) -> dict[str, object]:
    from dataclasses import asdict

    return {**asdict(made), **changes}


def test_the_cache_honours_rotation_overlap_revocation_and_expiry(store: KeyStore) -> None:
    now = [1000.0]
    cache = KeyCache(store, [("static-secret-1", "ci")], wall=lambda: now[0])
    old = new_secret()
    key = record(old, expires=5000.0)
    store.insert(key)
    cache.replace(store.all())
    assert cache.lookup(old.encode()).id == key.id
    assert cache.lookup(b"static-secret-1").id == "static:ci"
    new = new_secret()
    rotated = key.rotated(new, now[0], overlap=60.0)
    store.update(rotated)
    cache.replace(store.all())
    assert cache.lookup(new.encode()).id == key.id and cache.lookup(old.encode()).id == key.id
    now[0] = 1061.0
    with pytest.raises(AuthenticationError, match="rotated"):
        cache.lookup(old.encode())
    assert cache.lookup(new.encode()).id == key.id
    now[0] = 5000.0
    with pytest.raises(AuthenticationError, match="expired"):
        cache.lookup(new.encode())
    store.update(KeyRecord(**_fields(rotated, revoked=1.0, expires=None)))  # type: ignore[arg-type]
    cache.replace(store.all())
    with pytest.raises(AuthenticationError, match="revoked") as refused:
        cache.lookup(new.encode())
    assert new not in str(refused.value)
    with pytest.raises(AuthenticationError, match="not valid"):
        cache.lookup(b"sk-sf-guess")


async def test_an_unreachable_database_keeps_the_last_known_keys(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="skyfabric.ops")
    store = KeyStore(Database.at("keys.db", tmp_path))
    secret = new_secret()
    store.insert(record(secret))
    cache = KeyCache(store, [])
    await cache.reload()
    assert cache.fresh and cache.lookup(secret.encode())
    store.close()
    store.database = Database.at("gone/keys.db", tmp_path)  # the database is out of reach
    await cache.reload()
    await cache.reload()
    assert not cache.fresh and cache.lookup(secret.encode())
    assert sum("keys: stale" in r.getMessage() for r in caplog.records) == 1
    store.database = Database.at("keys.db", tmp_path)
    await cache.reload()
    assert cache.fresh and sum("keys: ok" in r.getMessage() for r in caplog.records) == 1


def test_urls_are_redacted_for_logs() -> None:
    assert redact("postgresql://app:s3cret@db:5432/x") == "postgresql://app:***@db:5432/x"
    assert redact("redis://:pw@r:6379/0") == "redis://:***@r:6379/0"
    assert redact("redis://127.0.0.1:6379") == "redis://127.0.0.1:6379"
