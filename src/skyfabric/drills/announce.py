"""Tells the gateway under drill what the drill is doing, so its dashboard can draw the drill's timeline.

The faults are injected outside the gateway (fault proxies), so only the runner knows that a provider went
dark *on purpose*, and when it is due back. Like a deploy tool annotating a monitoring system, the runner
POSTs each phase to the gateway's ``/dashboard/drill`` (see ``gateway/drill_log.py``): ``start`` with the
scenario and planned length, ``fault_on``/``fault_off`` as it switches a fault, ``end``. It authenticates
with the fleet's admin credential (``operations.admin_key_env``) when the fleet has one, else with the
client key the workload uses (a fleet without an admin credential lets its keys open the dashboard).

Announcing is best effort and off the drill's critical path: a gateway without a dashboard, or one that
refuses, costs the drill one warning, never its result.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import aiohttp

from skyfabric.core.fleet import Fleet

log = logging.getLogger("skyfabric.drills")


def drill_credential(fleet: Fleet) -> str | None:
    """The credential a runner announces with: the admin one when the fleet has it, else a client key."""
    operations = fleet.operations
    if operations is not None and operations.admin_key_env:
        secret = os.environ.get(operations.admin_key_env)
        if secret:
            return secret
    return fleet.api_keys[0].key if fleet.api_keys else None


class DrillAnnouncer:
    """Posts one drill run's phases, numbered, to a gateway at ``base`` (``http://host:port``)."""

    def __init__(self, base: str, credential: str | None, drill: str, *, timeout: float = 2.0) -> None:
        self.url = base.rstrip("/") + "/dashboard/drill"
        self.headers = {"authorization": f"Bearer {credential}"} if credential else {}
        self.drill = drill
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.seq = 0
        self.sent = 0
        self._session: aiohttp.ClientSession | None = None
        self._warned = False

    async def send(self, event: str, **fields: Any) -> bool:
        """Announce one phase; False (and one warning per run) when the gateway did not take it."""
        self.seq += 1
        body = {"drill": self.drill, "seq": self.seq, "event": event, **fields}
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        try:
            async with self._session.post(self.url, json=body, headers=self.headers) as resp:
                await resp.read()
                ok = resp.status == 202
                reason = f"HTTP {resp.status}"
        except (TimeoutError, aiohttp.ClientError) as exc:
            ok, reason = False, str(exc) or type(exc).__name__
        if ok:
            self.sent += 1
        elif not self._warned:
            self._warned = True
            log.warning(
                "the gateway's dashboard did not take the drill's phases (%s): no live timeline", reason
            )
        return ok

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def drill_id(scenario: str, label: str) -> str:
    """A run's id: the scenario, the pass (``skyfabric`` or ``baseline``) and when it started."""
    return f"{scenario}-{label}-{time.strftime('%H%M%S')}"
