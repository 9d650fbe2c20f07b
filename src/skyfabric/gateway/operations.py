"""The fleet file's ``operations`` section, as the parts a gateway plugs in, built and run in one place.

``Gateway.__init__`` builds :class:`Operations` and wires each part once: the key ring goes to
``pipeline.authenticate``, the keys filter to ``Gateway.filters``, the observers (the keys' settlement,
the ledger, the shared fleet state) to ``telemetry.install``, the admin API to ``/admin/``. Start, stop
and ``/readyz`` detail are here. Every part is off (None) unless the section turns it on, so a gateway
without ``operations`` pays nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from skyfabric.core.fleet import Fleet
from skyfabric.gateway.fleet_state import FleetStateObserver
from skyfabric.gateway.keys_filter import KeysFilter
from skyfabric.gateway.ledger_observer import LedgerObserver
from skyfabric.gateway.observe import Observer
from skyfabric.gateway.proxy import Proxy
from skyfabric.gateway.usage_observer import KeysAndLedger
from skyfabric.ops.admin import AdminApi
from skyfabric.ops.database import Database
from skyfabric.ops.keycache import KeyCache
from skyfabric.ops.keystore import KeyStore
from skyfabric.ops.ledger import Ledger, outbox_dir
from skyfabric.ops.limiter import Limiter
from skyfabric.ops.pricing import PriceBook

log = logging.getLogger("skyfabric.gateway.operations")


class Operations:
    """Managed keys and their limits, the usage ledger and the shared fleet state of one gateway."""

    def __init__(self, proxy: Proxy, fleet_path: str | Path | None = None) -> None:
        fleet: Fleet = proxy.fleet
        config = fleet.operations
        self.keyring: KeyCache | None = None
        self.limiter: Limiter | None = None
        self.keys_filter: KeysFilter | None = None
        self.admin: AdminApi | None = None
        self.ledger: LedgerObserver | None = None
        self.fleet_state: FleetStateObserver | None = None
        #: The admin credential (it also opens the dashboard).
        self.admin_secret: str | None = None
        self._tasks: list[asyncio.Task[None]] = []
        if config is None:
            return
        database = Database.of(config, fleet_path)
        prices = PriceBook(fleet)
        if config.keys:
            store = KeyStore(database)
            static = [(k.key, k.name) for k in fleet.api_keys]
            self.keyring = KeyCache(store, static, refresh=config.key_refresh)
            self.limiter = Limiter(config.limits, config.redis, prices)
            self.keys_filter = KeysFilter(self.limiter, prices)
            if config.admin_key_env is not None:
                self.admin_secret = os.environ.get(config.admin_key_env) or None
                if self.admin_secret is None:
                    log.warning(
                        "admin API off: the variable %s (operations.admin_key_env) is empty",
                        config.admin_key_env,
                    )
            self.admin = AdminApi(store, self.keyring, self.admin_secret)
        if config.ledger.enabled:
            base = Path(fleet_path).resolve().parent if fleet_path is not None else None
            ledger = Ledger(config.ledger, database, outbox_dir(config.ledger, database, base))
            self.ledger = LedgerObserver(ledger, prices, proxy.clock)
        if config.redis is not None and config.shared_state.enabled:
            self.fleet_state = FleetStateObserver(proxy, config.redis, config.shared_state)

    def observers(self) -> list[Observer]:
        """The observers to install beside telemetry's: the keys' settlement and the ledger as one when
        both are on (``usage_observer.py``: one call per hook point instead of a fan-out to two)."""
        keys, ledger = self.keys_filter, self.ledger
        if keys is not None and keys.limiter is not None and ledger is not None:
            return [o for o in (KeysAndLedger(keys, ledger), self.fleet_state) if o is not None]
        return [o for o in (keys, ledger, self.fleet_state) if o is not None]

    async def start(self) -> None:
        """Load the keys (serving starts with them), learn whether Redis answers, open the ledger's outbox
        (shipping what a previous run left), and start the loops."""
        loop = asyncio.get_running_loop()
        if self.keyring is not None:
            await self.keyring.reload()
            self._tasks.append(loop.create_task(self.keyring.run()))
        if self.limiter is not None:
            await self.limiter.beat()
            self._tasks.append(loop.create_task(self.limiter.run()))
        if self.ledger is not None:
            self.ledger.ledger.start()
        if self.fleet_state is not None:
            self._tasks.append(loop.create_task(self.fleet_state.bus.run()))

    async def close(self) -> None:
        """Stop the loops, settle with Redis, record open streams as interrupted and ship what can be."""
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self.limiter is not None:
            await self.limiter.close()
        if self.keyring is not None and self.keyring.store is not None:
            await asyncio.to_thread(self.keyring.store.close)
        if self.ledger is not None:
            self.ledger.interrupt_open()
            await asyncio.to_thread(self.ledger.ledger.close)

    def readiness(self) -> dict[str, Any]:
        """``/readyz``'s ``operations`` detail: what serves without its shared services, and what waits."""
        out: dict[str, Any] = {}
        if self.keyring is not None:
            out["keys"] = "ok" if self.keyring.fresh else "stale"
        if self.limiter is not None:
            out["limits"] = self.limiter.state
        if self.ledger is not None:
            out["ledger"] = self.ledger.ledger.status()
        if self.fleet_state is not None:
            out["shared_state"] = self.fleet_state.bus.status()
        return out
