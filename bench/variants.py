"""What each layer costs: the same request served by stripped-down variants of the gateway.

    .venv/bin/python bench/variants.py MODE --port 9301

Modes (each a real HTTP server on the project's transport):

- ``bare``: listener → upstream pool → listener. No JSON parsing, no routing, no metrics: the floor the
  transport (httptools + uvloop + keep-alive pool) sets.
- ``gateway``: the real gateway (``skyfabric serve``) with every feature on.
- ``no-metrics``: the real gateway with Prometheus counters replaced by no-ops.
- ``no-health``: the real gateway without the background health loop (probes, load signals, watchdog).

``bench/layers.py`` runs wrk against each, pinned like ``overhead.py``, and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import uvloop

from skyfabric.core.endpoints import fleet_endpoints
from skyfabric.core.fleet import load_fleet
from skyfabric.gateway.app import Gateway
from skyfabric.http.client import HTTPClient
from skyfabric.http.messages import Request, Response
from skyfabric.http.server import Listener

HERE = Path(__file__).resolve().parent


class _Null:
    """Stands in for every Prometheus metric."""

    def __getattr__(self, name: str) -> _Null:
        return self

    def __call__(self, *args: object, **kwargs: object) -> _Null:
        return self


async def serve(mode: str, port: int) -> None:
    if mode == "bare":
        client = HTTPClient()
        origin = ("http", "127.0.0.1", 9100)

        async def bare(request: Request) -> Response:
            resp = await client.request(
                origin,
                b"POST",
                request.path,
                [(b"content-type", b"application/json")],
                request.body,
                connect_timeout=2,
                first_byte_timeout=30,
            )
            return Response(resp.status, await resp.read(30))

        listener = Listener(bare)
    else:
        fleet = load_fleet(HERE / "fleet.yaml")
        gateway = Gateway(fleet, fleet_endpoints(fleet))
        if mode == "no-metrics":
            metrics = gateway.proxy.metrics
            for name in ("request", "attempt", "observe"):
                setattr(metrics, name, _Null())
        if mode != "no-health":
            await gateway.start()
        listener = Listener(gateway)
    await listener.start("127.0.0.1", port)
    await asyncio.Event().wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["bare", "gateway", "no-metrics", "no-health"])
    ap.add_argument("--port", type=int, default=9301)
    a = ap.parse_args()
    uvloop.install()
    asyncio.run(serve(a.mode, a.port))


if __name__ == "__main__":
    main()
