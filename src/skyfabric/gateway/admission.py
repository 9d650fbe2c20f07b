"""Admission control: when the fleet left standing cannot carry the load, queue by deadline, shed by priority.

Capacity is what the available endpoints of a model say they serve well (pool ``capacity.concurrency``),
so it drops by itself when a provider is ejected. Below it, admission is two integer operations. Above
it, requests wait in a priority queue for a slot, never past their deadline nor ``queue_timeout``; when
the queue is full, the least important waiter is shed with 429 and a ``Retry-After`` computed from how
fast slots have been freeing up — an honest estimate, not a constant.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from skyfabric.core.errors import InvalidRequest, Overloaded

PRIORITY_NAMES = {b"low": 1, b"normal": 5, b"high": 9, b"critical": 10}


def parse_priority(value: bytes | None) -> int:
    """``x-skyfabric-priority``: a name (low, normal, high, critical) or an integer 0–10; default normal."""
    if value is None:
        return 5
    named = PRIORITY_NAMES.get(value.strip().lower())
    if named is not None:
        return named
    try:
        number = int(value)
    except ValueError:
        raise InvalidRequest("x-skyfabric-priority must be low, normal, high, critical or 0-10") from None
    if not 0 <= number <= 10:
        raise InvalidRequest("x-skyfabric-priority must be between 0 and 10")
    return number


@dataclass(order=True)
class _Waiter:
    sort_key: tuple[int, int]
    future: asyncio.Future[None] = field(compare=False)
    priority: int = field(compare=False)


@dataclass
class _ModelGate:
    inflight: int = 0
    queue: list[_Waiter] = field(default_factory=list)
    #: Seconds a slot stays taken, as an exponentially weighted average (for Retry-After).
    service_time: float = 1.0


def _handed(waiter: _Waiter) -> bool:
    """Whether a dispatcher gave this waiter a slot (its future holds a result, not an error)."""
    future = waiter.future
    return future.done() and not future.cancelled() and future.exception() is None


class Admission:
    """Per-model gates; ``capacity(model)`` is read on every admission and may change at any time."""

    def __init__(
        self,
        capacity: Callable[[str], int],
        *,
        queue_timeout: float,
        queue_limit: int,
        clock: Callable[[], float],
    ) -> None:
        self.capacity = capacity
        self.queue_timeout = queue_timeout
        self.queue_limit = queue_limit
        self.clock = clock
        self.gates: dict[str, _ModelGate] = {}
        self._seq = itertools.count()
        self.shed = 0

    def retry_after(self, gate: _ModelGate, position: int, capacity: int) -> float:
        """How long until ``position`` waiters ahead would have drained, at the observed service time."""
        return max(1.0, math.ceil(gate.service_time * (position + 1) / max(1, capacity)))

    async def acquire(self, model: str, priority: int, deadline: float) -> None:
        """Take a slot, waiting (by priority) when there is none; raises :class:`Overloaded`."""
        gate = self.gates.get(model)
        if gate is None:
            gate = self.gates[model] = _ModelGate()
        capacity = self.capacity(model)
        if gate.queue:
            self._dispatch(gate, capacity)  # capacity may have come back since the last release
        if gate.inflight < capacity and not gate.queue:
            gate.inflight += 1
            return
        if len(gate.queue) >= self.queue_limit:
            lowest = max(gate.queue) if gate.queue else None  # lowest priority, latest arrival
            if lowest is None or lowest.priority >= priority:
                self.shed += 1
                raise Overloaded(
                    f"{model} is over capacity; {len(gate.queue)} requests of equal or higher priority wait",
                    retry_after=self.retry_after(gate, len(gate.queue), capacity),
                )
            gate.queue.remove(lowest)
            heapq.heapify(gate.queue)
            self.shed += 1
            lowest.future.set_exception(
                Overloaded(
                    f"{model} is over capacity: shed for a higher-priority request",
                    retry_after=self.retry_after(gate, len(gate.queue), capacity),
                )
            )
        waiter = _Waiter((-priority, next(self._seq)), asyncio.get_running_loop().create_future(), priority)
        heapq.heappush(gate.queue, waiter)
        wait = min(self.queue_timeout, deadline - self.clock())
        try:
            async with asyncio.timeout(max(0.0, wait)):
                await waiter.future
        except TimeoutError:
            if _handed(waiter):
                return  # the slot was handed over just as the wait ran out: keep it
            self.shed += 1
            raise Overloaded(
                f"{model} stayed over capacity for {wait:.1f}s",
                retry_after=self.retry_after(gate, len(gate.queue), capacity),
            ) from None
        except asyncio.CancelledError:
            if _handed(waiter):
                # The client went away just as the slot was handed to it: give the slot back, or it is
                # lost for good (nobody would ever release it).
                self.release(model, gate.service_time)  # (held for the average: the average stays)
            raise
        finally:
            if waiter in gate.queue:
                gate.queue.remove(waiter)
                heapq.heapify(gate.queue)
        # a dispatcher handed us a slot: inflight already counts us

    def release(self, model: str, held_for: float) -> None:
        """Give a slot back, and hand free slots to the most important waiters."""
        gate = self.gates[model]
        gate.service_time += 0.05 * (held_for - gate.service_time)
        gate.inflight -= 1
        if gate.queue:
            self._dispatch(gate, self.capacity(model))

    def _dispatch(self, gate: _ModelGate, capacity: int) -> None:
        """Admit waiters, most important first, while there are free slots."""
        while gate.queue and gate.inflight < capacity:
            waiter = heapq.heappop(gate.queue)
            if not waiter.future.done():
                gate.inflight += 1  # the slot is the waiter's from now on
                waiter.future.set_result(None)

    def dispatch_all(self) -> None:
        """Admit what the current capacity allows in every model (the health loop calls this each tick).

        Without it a queue could wait on a release that never comes: when every endpoint was ejected at
        once, nothing is in flight, and capacity returns through a probe rather than a finished request.
        """
        for model, gate in self.gates.items():
            if gate.queue:
                self._dispatch(gate, self.capacity(model))

    def waiting(self, model: str) -> int:
        gate = self.gates.get(model)
        return len(gate.queue) if gate else 0
