"""Processes for the slowhttptest drill: ``python -m tests.http.slow_gateway upstream|gateway PORT``.

``upstream`` runs the fake upstream and prints its port; ``gateway UPSTREAM_PORT`` runs the gateway (the
listener as ``skyfabric serve`` builds it, every setting at its default) in front of it and prints its
port. Separate processes, so the attack on the gateway is not measured through the upstream's CPU.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop

from skyfabric.core.endpoints import fleet_endpoints
from skyfabric.core.fleet import parse_fleet
from skyfabric.gateway.app import Gateway
from skyfabric.gateway.serve import make_listener
from tests.conftest import fleet_data
from tests.support.fake_upstream import FakeUpstream


async def upstream() -> None:
    up = await FakeUpstream("a", tokens=8).start()
    print(up.port, flush=True)
    await asyncio.Event().wait()


async def gateway(upstream_port: int) -> None:
    up = FakeUpstream("a")
    up.port = upstream_port
    fleet = parse_fleet(fleet_data({"aws": [up]}))
    service = Gateway(fleet, fleet_endpoints(fleet))
    await service.start()
    listener = make_listener(service, fleet.listener)
    print(await listener.start("127.0.0.1", 0), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.install()
    if sys.argv[1] == "upstream":
        asyncio.run(upstream())
    else:
        asyncio.run(gateway(int(sys.argv[2])))
