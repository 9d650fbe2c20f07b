"""The gateway's own counters (Prometheus ``/metrics``), sampled during a drill.

Retries, hedges and rescued streams happen inside the gateway and leave no trace a client can see, so
the report reads them from the gateway. They are optional: a gateway without ``/metrics`` (or without a
given counter) yields ``None``, which the report prints as "n/a" rather than a misleading 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

#: The gateway counters a drill reads, by the short name the report uses.
COUNTERS = {
    "requests": "skyfabric_requests_total",
    "attempts": "skyfabric_attempts_total",
    "retries": "skyfabric_retries_total",
    "rescued": "skyfabric_rescued_streams_total",
    "hedges": "skyfabric_hedges_total",
    "ejections": "skyfabric_ejections_total",
}

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_prometheus(text: str) -> dict[str, float]:
    """Sum of every sample of each metric name, labels collapsed (the report needs totals only)."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE ") and line.rstrip().endswith(" counter"):
            # A labelled counter with no samples yet is declared but empty: it is 0, not absent.
            name = line.split()[2]
            totals.setdefault(name if name.endswith("_total") else name + "_total", 0.0)
            continue
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        try:
            value = float(match.group(3))
        except ValueError:
            continue
        totals[match.group(1)] = totals.get(match.group(1), 0.0) + value
    return totals


@dataclass(slots=True)
class MetricsSampler:
    """Scrapes ``url`` every ``interval`` seconds; keeps (time, totals) samples."""

    url: str
    interval: float = 1.0
    clock: Callable[[], float] = time.monotonic
    t0: float = 0.0
    samples: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    available: bool = False

    async def scrape(self, session: aiohttp.ClientSession) -> None:
        """Take one sample (nothing is stored when the gateway has no ``/metrics``)."""
        try:
            async with session.get(self.url, timeout=aiohttp.ClientTimeout(total=2.0)) as resp:
                if resp.status != 200:
                    return
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError):
            return
        totals = parse_prometheus(text)
        if any(name in totals for name in COUNTERS.values()):
            self.available = True
        self.samples.append((self.clock() - self.t0, totals))

    async def run(self, stop: asyncio.Event) -> None:
        """Sample until ``stop`` is set, and once more after it."""
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                await self.scrape(session)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.interval)
            await self.scrape(session)


def counter_delta(
    samples: list[tuple[float, dict[str, float]]], name: str, start: float, end: float
) -> float | None:
    """How much a counter grew between ``start`` and ``end`` (nearest samples); None when never seen."""
    metric = COUNTERS.get(name, name)
    seen = [(t, values[metric]) for t, values in samples if metric in values]
    if not seen:
        return None
    before = [v for t, v in seen if t <= start]
    after = [v for t, v in seen if t <= end]
    first = before[-1] if before else seen[0][1]
    last = after[-1] if after else first
    return max(0.0, last - first)
