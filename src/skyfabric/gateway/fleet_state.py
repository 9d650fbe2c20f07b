"""Ejections shared between gateway instances: this instance's are published, the others' applied.

The channel is ``ops/shared_state.py``'s (Redis pub/sub); this is the glue to the router: an observer of
``ejected`` that publishes, and the function that ejects an endpoint another instance found bad — for
the same remaining time, without telling the observers (no echo).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from skyfabric.core.fleet import SharedStateConfig
from skyfabric.gateway.observe import Observer
from skyfabric.ops.shared_state import Ejection, FleetBus

if TYPE_CHECKING:
    from skyfabric.gateway.balancer import EndpointState
    from skyfabric.gateway.proxy import Proxy

log = logging.getLogger("skyfabric.gateway.fleet_state")


class FleetStateObserver(Observer):
    """Publishes the ejections this instance makes; applies those other instances make."""

    def __init__(self, proxy: Proxy, redis_url: str, config: SharedStateConfig) -> None:
        self.proxy = proxy
        self.bus = FleetBus(redis_url, config, self.apply, self.snapshot)
        #: Endpoint id → until when this instance's own evidence ejected it (for the reconnection snapshot).
        self.local: dict[str, float] = {}

    def ejected(self, state: EndpointState, reason: str) -> None:
        now = self.proxy.clock()
        self.local[state.endpoint.id] = state.ejected_until
        remaining = state.ejected_until - now
        if remaining > 0:
            self.bus.publish(Ejection(state.endpoint.id, remaining, reason))

    def apply(self, ejection: Ejection) -> None:
        """Eject an endpoint another instance found bad, without telling the observers (no echo)."""
        state = self.proxy.states.get(ejection.endpoint)
        if state is None or state.draining:
            return
        now = self.proxy.clock()
        until = now + ejection.remaining
        if state.ejected_until >= until - 0.01:
            return  # already out at least as long
        state.ejected_until = until
        state.consecutive_failures = 0
        state.needs_probe = self.proxy.outlier.probes
        self.proxy.metrics.ejections.labels(state.endpoint.id).inc()
        log.warning("ejected %s for %.1fs: %s", state.endpoint.id, ejection.remaining, ejection.reason)

    def snapshot(self) -> list[Ejection]:
        """This instance's ejections still running: published again when it (re)connects."""
        now = self.proxy.clock()
        self.local = {k: v for k, v in self.local.items() if v > now}
        return [Ejection(k, v - now, "still ejected") for k, v in self.local.items()]
