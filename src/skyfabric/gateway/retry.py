"""Retry budget and backoff: how much extra load failures may cost.

Envoy's rule: retries in flight may be at most a share (20 %) of requests in flight, with a floor so a
quiet gateway can still retry. Under a provider outage every request fails once; without a budget the
survivors would see up to ``max_attempts`` times the load just when capacity is lowest.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(slots=True)
class RetryBudget:
    """Counts requests and retries in flight; ``allow`` says whether one more retry may start."""

    percent: float = 20.0
    min_concurrent: int = 10
    active_requests: int = 0
    active_retries: int = 0
    refused: int = 0

    def allow(self) -> bool:
        limit = max(self.min_concurrent, self.active_requests * self.percent / 100.0)
        if self.active_retries < limit:
            return True
        self.refused += 1
        return False


def backoff(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff before retry number ``attempt`` (1-based)."""
    upper = min(cap, base * (2 ** (attempt - 1)))
    return (rng or random).uniform(0, upper)
