"""An upstream behind the drills' fault proxy, in the shape ``make_gateway`` takes an upstream.

Faults made on the wire (a blackhole whose kernel still accepts, frozen streams) are what a provider outage
looks like from the gateway; :class:`~skyfabric.drills.faultproxy.FaultProxy` makes them.
"""

from __future__ import annotations

from typing import Any

from skyfabric.drills.faultproxy import FaultMode, FaultProxy


class Proxied:
    """``upstream`` reached through a fault proxy; already started (``make_gateway`` leaves it alone)."""

    def __init__(self, upstream: Any, proxy: FaultProxy) -> None:
        self.upstream = upstream
        self.proxy = proxy
        self.can_continue: bool = upstream.can_continue

    @classmethod
    async def start(cls, upstream: Any) -> Proxied:
        await upstream.start()
        proxy = FaultProxy("127.0.0.1", upstream.port, name=getattr(upstream, "name", ""))
        await proxy.start()
        return cls(upstream, proxy)

    @property
    def port(self) -> int:
        return self.proxy.port

    @property
    def url(self) -> str:
        return f"http://{self.proxy.url_authority}/v1"

    async def fault(self, mode: FaultMode) -> None:
        await self.proxy.set_mode(mode)

    async def stop(self) -> None:
        await self.proxy.stop()
        await self.upstream.stop()
