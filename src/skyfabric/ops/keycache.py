"""Each instance's copy of the keys: looked up per request in memory, reloaded from the database.

The request path never waits on the database. The copy is reloaded every ``operations.key_refresh``
seconds (2 by default), so a key created, rotated or revoked on any instance takes effect everywhere within
that; the instance that made the change applies it at once. While the database is unreachable the instance
keeps serving with the keys it last knew, and says so (``stale``) in ``/readyz`` and, once per change, in
its log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from skyfabric.core.errors import AuthenticationError
from skyfabric.ops.keys import KeyRecord, digest, static_record
from skyfabric.ops.keystore import KeyStore

log = logging.getLogger("skyfabric.ops")


class KeyCache:
    """Digest → key, for every managed key and every key of the fleet file's ``api_keys``."""

    def __init__(
        self,
        store: KeyStore | None,
        static: list[tuple[str, str]],
        *,
        refresh: float = 2.0,
        wall: Callable[[], float] = time.time,
    ) -> None:
        """``static``: (secret, name) of the fleet file's keys; they need no database."""
        self.store = store
        self.refresh = refresh
        self.wall = wall
        self._static = {r.hash: r for r in (static_record(s, n) for s, n in static)}
        self._by_hash: dict[str, KeyRecord] = dict(self._static)
        #: Presented secret → its digest: a hash per distinct key, not per request.
        self._digests: dict[bytes, str] = {}
        #: False while the last reload failed: serving with the keys last known.
        self.fresh = True
        self.loaded = store is None

    @property
    def required(self) -> bool:
        """Whether requests must carry a key: managed keys are on, or the fleet file lists some."""
        return self.store is not None or bool(self._static)

    def lookup(self, secret: bytes | None) -> KeyRecord:
        """The key a request presented; raises :class:`AuthenticationError` (never echoing the secret)."""
        if secret is None:
            raise AuthenticationError("no API key: send `Authorization: Bearer <key>` or `x-api-key`")
        matched = self._digests.get(secret)
        if matched is None:
            if len(self._digests) >= 4096:  # bounded: a flood of wrong keys cannot grow it
                self._digests.clear()
            matched = self._digests[secret] = digest(secret)
        record = self._by_hash.get(matched)
        if record is None:
            raise AuthenticationError("the API key is not valid", code="invalid_api_key")
        why = record.refusal(self.wall(), matched)
        if why is not None:
            raise AuthenticationError(why, code="invalid_api_key")
        return record

    def put(self, record: KeyRecord) -> None:
        """Apply a change made by this instance now, without waiting for the next reload."""
        for h, r in list(self._by_hash.items()):
            if r.id == record.id:
                del self._by_hash[h]
        self._index(self._by_hash, record)

    @staticmethod
    def _index(into: dict[str, KeyRecord], record: KeyRecord) -> None:
        into[record.hash] = record
        if record.prev_hash is not None:
            into[record.prev_hash] = record

    def replace(self, records: list[KeyRecord]) -> None:
        """The whole set, as read from the database (the fleet file's keys stay)."""
        table = dict(self._static)
        for record in records:
            self._index(table, record)
        self._by_hash = table  # one assignment: a lookup sees the old table or the new one

    async def reload(self) -> None:
        """Read every key from the database; on failure keep the last known ones (logged once)."""
        if self.store is None:
            return
        try:
            records = await asyncio.to_thread(self.store.all)
        except Exception as exc:  # any driver error: the database is out of reach for now
            if self.fresh:
                log.warning(
                    "keys: stale — the key database %s is unreachable (%s); serving with the %d keys known",
                    self.store.database.shown,
                    type(exc).__name__,
                    len({r.id for r in self._by_hash.values()}),
                )
            self.fresh = False
            return
        self.replace(records)
        if not self.fresh:
            log.warning("keys: ok — the key database %s is reachable again", self.store.database.shown)
        self.fresh = True
        self.loaded = True

    async def run(self) -> None:
        """Reload every ``refresh`` seconds until cancelled."""
        while True:
            await asyncio.sleep(self.refresh)
            await self.reload()
