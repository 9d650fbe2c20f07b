"""What the stream relay and the continuation self-test need from the router, as an interface.

:class:`~skyfabric.gateway.proxy.Proxy` is the router: it owns the clusters, the upstream client and the
policies. The relay (past the commit point) and the self-test (:mod:`skyfabric.gateway.selftest`) only use
a handful of its parts; naming them here keeps the imports one way — ``proxy → relay → router`` — with no
cycle, and lets each part be tested against anything that has these members.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from skyfabric.core.fleet import Fleet, Timeouts
from skyfabric.gateway.balancer import Cluster, EndpointState, OutlierPolicy
from skyfabric.gateway.context import RequestContext
from skyfabric.gateway.metrics import GatewayMetrics
from skyfabric.gateway.observe import Observer
from skyfabric.http.client import UpstreamResponse


async def hold(ready: Callable[[], bool], clock: Callable[[], float], deadline: float, wait: float) -> bool:
    """Wait (≤ ``wait`` seconds, never past ``deadline``) until ``ready()``; returns its last answer.

    A fleet-wide outage seen from the gateway is usually its own network blinking: a request, or a stream
    to be continued, with time left is better held for a few seconds than failed or sent into a blackhole.
    Polled every 50 ms, a bounded number of times even under a frozen test clock.
    """
    limit = min(deadline, clock() + wait)
    for _ in range(int(wait / 0.05)):
        if ready() or clock() >= limit:
            break
        await asyncio.sleep(0.05)
    return ready()


class Router(Protocol):
    """The router's members that the relay and the self-test use (``Proxy`` has them all)."""

    fleet: Fleet
    clock: Callable[[], float]
    clusters: dict[str, Cluster]
    states: dict[str, EndpointState]
    cooldowns: dict[str, float]
    outlier: OutlierPolicy
    timeouts: Timeouts
    max_continuations: int
    metrics: GatewayMetrics
    observer: Observer

    async def open(
        self,
        state: EndpointState,
        path: bytes,
        body: bytes,
        stream: bool,
        deadline: float,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> UpstreamResponse:
        """Send to an endpoint and wait for a 2xx status; raises :class:`UpstreamStatus` otherwise."""
        ...

    def stream_chain(self, ctx: RequestContext) -> list[str]:
        """Models a broken stream of ``ctx`` may move to (its chain, less those it cannot fit)."""
        ...

    def note_failure(
        self, ctx: RequestContext, state: EndpointState, exc: Exception, *, hard: bool = False
    ) -> None:
        """Count a failed attempt against its endpoint (and maybe eject it)."""
        ...
