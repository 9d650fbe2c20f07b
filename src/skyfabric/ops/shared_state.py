"""Fleet state shared between gateway instances: an ejection learnt by one is applied by all within ~ms.

Each instance publishes, on one Redis pub/sub channel, every ejection its own traffic or probes found
(a provider's outage arrives as the ejections of its endpoints, its failing domain included) with the
time the endpoint stays out; the others eject that endpoint for the same remaining time. So an outage
costs the fleet one set of failed requests, not one per instance.

No echo storms: an ejection applied from the channel is never published again (the gateway applies it
without its observers), and an instance ignores its own messages (each carries the sender's id). Messages
are versioned (``v``); a receiver drops versions it does not know. Times travel as durations, never as
clock readings: instances' clocks differ. Pub/sub keeps nothing for a subscriber that was away, so an
instance that (re)connects publishes its own ejections still running.

Redis down: every instance works alone (it still ejects on its own evidence), says so in ``/readyz`` and
logs it once; it reconnects every ``reconnect_interval``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from skyfabric.core.fleet import SharedStateConfig

log = logging.getLogger("skyfabric.ops.shared_state")

VERSION = 1
#: No message (a ping's answer included) for this long: the connection is dead, reconnect.
SILENCE = 5.0
PING_EVERY = 1.0
QUEUE_LIMIT = 1024


@dataclass(frozen=True, slots=True)
class Ejection:
    """An endpoint (by its fleet id) out of rotation for ``remaining`` more seconds, and why."""

    endpoint: str
    remaining: float
    reason: str


def encode(ejection: Ejection, sender: str, seq: int) -> bytes:
    """The wire form of one ejection."""
    return orjson.dumps(
        {
            "v": VERSION,
            "kind": "ejection",
            "from": sender,
            "seq": seq,
            "endpoint": ejection.endpoint,
            "remaining": round(ejection.remaining, 3),
            "reason": ejection.reason[:200],
        }
    )


def decode(data: bytes | str, me: str) -> Ejection | None:
    """The ejection a message carries, or None: our own echo, another version, or not ours at all."""
    try:
        msg = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(msg, dict) or msg.get("v") != VERSION or msg.get("kind") != "ejection":
        return None
    if msg.get("from") == me:
        return None
    endpoint, remaining = msg.get("endpoint"), msg.get("remaining")
    if not isinstance(endpoint, str) or not isinstance(remaining, int | float) or isinstance(remaining, bool):
        return None
    if not 0 < remaining <= 24 * 3600:
        return None
    reason = msg.get("reason")
    return Ejection(
        endpoint, float(remaining), f"{reason if isinstance(reason, str) else '?'} (from {msg.get('from')})"
    )


class FleetBus:
    """This instance's end of the shared channel."""

    def __init__(
        self,
        redis_url: str,
        config: SharedStateConfig,
        apply: Callable[[Ejection], None],
        snapshot: Callable[[], list[Ejection]] = list,
        *,
        instance: str | None = None,
    ) -> None:
        self.redis_url = redis_url
        self.config = config
        self.apply = apply
        self.snapshot = snapshot
        self.instance = instance or f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        self.connected = False
        self.last_error: str | None = None
        self.published = 0
        self.applied = 0
        self._seq = itertools.count(1)
        self._outgoing: asyncio.Queue[bytes] = asyncio.Queue(QUEUE_LIMIT)
        self._warned = False

    def publish(self, ejection: Ejection) -> None:
        """Queue an ejection learnt here (never blocks; while Redis is away only the latest are kept)."""
        if not self.connected:
            return  # nobody would hear it; the snapshot at reconnection carries what still runs
        message = encode(ejection, self.instance, next(self._seq))
        if self._outgoing.full():
            self._outgoing.get_nowait()
        self._outgoing.put_nowait(message)

    def status(self) -> dict[str, Any]:
        """For ``/readyz``: shared or alone, and the counts."""
        return {
            "redis": "connected" if self.connected else "unreachable: this instance works alone",
            "instance": self.instance,
            "published": self.published,
            "applied": self.applied,
            "last_error": None if self.connected else self.last_error,
        }

    async def run(self) -> None:
        """Connect, share, and reconnect for ever (cancel to stop)."""
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
            if self.connected or not self._warned:
                log.warning(
                    "shared fleet state: Redis unreachable (%s), this instance works alone", self.last_error
                )
                self._warned = True
            self.connected = False
            await asyncio.sleep(self.config.reconnect_interval)

    async def _session(self) -> None:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(
            self.redis_url, socket_connect_timeout=1.0, socket_timeout=SILENCE, retry_on_timeout=False
        )
        pubsub = client.pubsub()
        try:
            await asyncio.wait_for(pubsub.subscribe(self.config.channel), SILENCE)
            while not self._outgoing.empty():  # stale: what still runs is in the snapshot
                self._outgoing.get_nowait()
            self.connected = True
            if self._warned:
                log.warning("shared fleet state: Redis reachable again, sharing ejections")
                self._warned = False
            else:
                log.info(
                    "shared fleet state: sharing ejections on %s as %s", self.config.channel, self.instance
                )
            for ejection in self.snapshot():
                self.publish(ejection)
            async with asyncio.TaskGroup() as group:
                group.create_task(self._send(client))
                group.create_task(self._receive(pubsub))
        finally:
            self.connected = False
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pubsub.aclose(), 1.0)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), 1.0)

    async def _send(self, client: Any) -> None:
        while True:
            message = await self._outgoing.get()
            await asyncio.wait_for(client.publish(self.config.channel, message), SILENCE)
            self.published += 1

    async def _receive(self, pubsub: Any) -> None:
        heard = time.monotonic()
        pinged = 0.0
        while True:
            now = time.monotonic()
            if now - heard > SILENCE:
                raise ConnectionError(f"no word from Redis for {SILENCE:.0f}s")
            if now - pinged >= PING_EVERY:
                await asyncio.wait_for(pubsub.ping(), SILENCE)
                pinged = now
            message = await pubsub.get_message(ignore_subscribe_messages=False, timeout=PING_EVERY)
            if message is None:
                continue
            heard = time.monotonic()
            if message.get("type") != "message":
                continue  # subscribe confirmations and pongs: signs of life only
            ejection = decode(message["data"], self.instance)
            if ejection is not None:
                self.applied += 1
                self.apply(ejection)
