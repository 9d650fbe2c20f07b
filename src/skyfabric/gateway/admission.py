"""Admission control: when the fleet left standing cannot carry the load, queue by deadline, shed by priority.

Capacity is what the available endpoints of a model say they serve well (pool ``capacity.concurrency``),
so it drops by itself when a provider is ejected. A request is admitted against what it can *reach*: its
chain — the model, its ``fallbacks``, the ``larger_context`` models — and its slot is charged to the model
the router will use, the first of the chain with an endpoint in rotation. A model whose only pool is
ejected therefore sends its requests to a healthy fallback instead of queueing them into a 429; a healthy
but busy model still queues (fallbacks are for models that cannot answer, not a spill-over for load).

Below capacity, admission is two integer operations. Above it, requests wait in a priority queue (one
per chain) for a slot, never past their deadline nor ``queue_timeout``; when the queue is full, the least
important waiter is shed with 429 and a ``Retry-After`` computed from how fast slots have been freeing
up — an honest estimate, not a constant.

With ``serve --workers N`` each process admits its share of the capacity (:meth:`Admission.set_share`),
so N processes together admit what the fleet carries, not N times that.
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

#: A request's chain: the models it may be served by, in the router's order.
Chain = tuple[str, ...]


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


def worker_share(capacity: int, worker: int, workers: int) -> int:
    """Worker ``worker``'s part of ``capacity`` when ``workers`` processes share a port.

    The parts add up to ``capacity`` (the remainder goes to the first workers), except that a worker
    never gets 0 of a capacity that is not 0: with fewer slots than workers each admits one, so a
    connection the kernel hands to any worker can still be served.
    """
    if workers <= 1 or capacity <= 0:
        return capacity
    part = capacity // workers + (1 if worker < capacity % workers else 0)
    return max(1, part)


@dataclass(order=True)
class _Waiter:
    sort_key: tuple[int, int]
    #: Set to the model the slot is charged to when the waiter is admitted.
    future: asyncio.Future[str] = field(compare=False)
    priority: int = field(compare=False)


@dataclass
class _ModelGate:
    inflight: int = 0
    #: Seconds a slot stays taken, as an exponentially weighted average (for Retry-After).
    service_time: float = 1.0


def _handed(waiter: _Waiter) -> bool:
    """Whether a dispatcher gave this waiter a slot (its future holds a result, not an error)."""
    future = waiter.future
    return future.done() and not future.cancelled() and future.exception() is None


class Admission:
    """Per-model slots and per-chain queues; ``capacity(model)`` is read on every admission."""

    def __init__(
        self,
        capacity: Callable[[str], int],
        *,
        queue_timeout: float,
        queue_limit: int,
        clock: Callable[[], float],
    ) -> None:
        self.fleet_capacity = capacity
        self.queue_timeout = queue_timeout
        self.queue_limit = queue_limit
        self.clock = clock
        self.gates: dict[str, _ModelGate] = {}
        self.queues: dict[Chain, list[_Waiter]] = {}
        self._queued = 0  # waiters over all queues: the hot path skips dispatching when 0
        self._seq = itertools.count()
        self.shed = 0
        self.worker, self.workers = 0, 1

    def set_share(self, worker: int, workers: int) -> None:
        """This process is worker ``worker`` of ``workers`` sharing the port: admit only its share."""
        self.worker, self.workers = worker, max(1, workers)

    def capacity(self, model: str) -> int:
        """Slots of ``model`` this process may fill."""
        total = self.fleet_capacity(model)
        if self.workers > 1:
            return worker_share(total, self.worker, self.workers)
        return total

    def _gate(self, model: str) -> _ModelGate:
        gate = self.gates.get(model)
        if gate is None:
            gate = self.gates[model] = _ModelGate()
        return gate

    def _target(self, chain: Chain) -> tuple[str, int] | None:
        """The model of ``chain`` a request would be served by now (first with capacity), and its capacity."""
        for model in chain:
            capacity = self.capacity(model)
            if capacity > 0:
                return model, capacity
        return None

    def retry_after(self, chain: Chain, position: int) -> float:
        """How long until ``position`` waiters ahead would have drained, at the observed service time."""
        target = self._target(chain)
        model, capacity = target if target is not None else (chain[0], 1)
        gate = self._gate(model)
        return max(1.0, math.ceil(gate.service_time * (position + 1) / max(1, capacity)))

    async def acquire(self, chain: Chain | str, priority: int, deadline: float) -> str:
        """Take a slot for a request that may be served by ``chain``; returns the model it is charged to.

        Waits (by priority) when there is none; raises :class:`Overloaded`. Pass the returned model to
        :meth:`release`.
        """
        if isinstance(chain, str):
            chain = (chain,)
        if self._queued:
            self._dispatch()  # capacity may have come back since the last release
        queue = self.queues.get(chain)
        if not queue:
            target = self._target(chain)
            if target is not None:
                gate = self._gate(target[0])
                if gate.inflight < target[1]:
                    gate.inflight += 1
                    return target[0]
        if queue is None:
            queue = self.queues[chain] = []
        name = chain[0]
        if len(queue) >= self.queue_limit:
            lowest = max(queue) if queue else None  # lowest priority, latest arrival
            if lowest is None or lowest.priority >= priority:
                self.shed += 1
                raise Overloaded(
                    f"{name} is over capacity; {len(queue)} requests of equal or higher priority wait",
                    retry_after=self.retry_after(chain, len(queue)),
                )
            queue.remove(lowest)
            heapq.heapify(queue)
            self._queued -= 1
            self.shed += 1
            lowest.future.set_exception(
                Overloaded(
                    f"{name} is over capacity: shed for a higher-priority request",
                    retry_after=self.retry_after(chain, len(queue)),
                )
            )
        waiter = _Waiter((-priority, next(self._seq)), asyncio.get_running_loop().create_future(), priority)
        heapq.heappush(queue, waiter)
        self._queued += 1
        wait = min(self.queue_timeout, deadline - self.clock())
        try:
            async with asyncio.timeout(max(0.0, wait)):
                return await waiter.future
        except TimeoutError:
            if _handed(waiter):
                return waiter.future.result()  # the slot was handed over just as the wait ran out: keep it
            self.shed += 1
            raise Overloaded(
                f"{name} stayed over capacity for {wait:.1f}s",
                retry_after=self.retry_after(chain, len(queue)),
            ) from None
        except asyncio.CancelledError:
            # The client went away. A slot handed over in the same turn is nobody's now: give it back.
            if _handed(waiter):
                model = waiter.future.result()
                self.release(model, self.gates[model].service_time)  # held for the average: it stays
            raise
        finally:
            if waiter in queue:
                queue.remove(waiter)
                heapq.heapify(queue)
                self._queued -= 1

    def release(self, model: str, held_for: float) -> None:
        """Give a slot of ``model`` back, and hand free slots to the most important waiters."""
        gate = self.gates[model]
        gate.service_time += 0.05 * (held_for - gate.service_time)
        gate.inflight -= 1
        if self._queued:
            self._dispatch()

    def _dispatch(self) -> None:
        """Admit waiters while the models they reach have free slots, most important first.

        Two chains may target the same model (``m`` falling back to ``f``, and ``f`` itself): the best
        head of any queue that can be admitted goes first.
        """
        while self._queued:
            best: tuple[list[_Waiter], _ModelGate, str] | None = None
            for chain, queue in self.queues.items():
                if not queue:
                    continue
                target = self._target(chain)
                if target is None:
                    continue
                gate = self._gate(target[0])
                if gate.inflight >= target[1]:
                    continue
                if best is None or queue[0] < best[0][0]:
                    best = (queue, gate, target[0])
            if best is None:
                return
            queue, gate, model = best
            waiter = heapq.heappop(queue)
            self._queued -= 1
            if not waiter.future.done():
                gate.inflight += 1  # the slot is the waiter's from now on
                waiter.future.set_result(model)

    def dispatch_all(self) -> None:
        """Admit what the current capacity allows (the health loop calls this each tick).

        Without it a queue could wait on a release that never comes: when every endpoint was ejected at
        once, nothing is in flight, and capacity returns through a probe rather than a finished request.
        """
        if self._queued:
            self._dispatch()

    def waiting(self, model: str | None = None) -> int:
        """Requests waiting for a slot: those whose chain starts at ``model``, or all of them."""
        if model is None:
            return self._queued
        return sum(len(q) for chain, q in self.queues.items() if chain[0] == model)

    def in_use(self) -> int:
        """Slots taken in this process, over every model (0 when nothing is in flight)."""
        return sum(gate.inflight for gate in self.gates.values())
