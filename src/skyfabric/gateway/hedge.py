"""Hedged requests: a second copy to another failure domain when the first token is late.

Happy-eyeballs shape (trio's and RFC 8305's): start one attempt; if it has not committed (first token)
within the threshold, start another on a different provider; the first to commit wins and the others are
cancelled — their connections closed, which makes vLLM abort the generation, so the loser is not billed.
An attempt that fails outright does not end the race while another is still running.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

from skyfabric.core.errors import NotSent, UpstreamError

T = TypeVar("T")


class TtftWindow:
    """Recent times to first token of one model; its p95 is the adaptive hedging threshold."""

    def __init__(self, size: int = 256) -> None:
        self.samples: deque[float] = deque(maxlen=size)
        self._p95: float | None = None
        self._since = 0

    def add(self, seconds: float) -> None:
        self.samples.append(seconds)
        self._since += 1
        if self._since >= 16:
            self._p95 = None

    def p95(self) -> float | None:
        """None until there are enough samples to say anything."""
        if len(self.samples) < 20:
            return None
        if self._p95 is None:
            ordered = sorted(self.samples)
            self._p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
            self._since = 0
        return self._p95


async def race(
    first: Callable[[], Awaitable[T]],
    hedge: Callable[[int], Callable[[], Awaitable[T]] | None],
    after: float,
    max_hedges: int,
    on_error: Callable[[UpstreamError], None] | None = None,
    discard: Callable[[T], None] | None = None,
) -> T:
    """Run ``first``; each ``after`` seconds without a result, start ``hedge(n)`` (None: no one to ask).

    Returns the first result; cancels and awaits every other attempt before returning. Raises the last
    :class:`UpstreamError` when all attempts failed (a :class:`NotSent` only if none failed otherwise in
    the same instant); ``on_error`` hears of every other failure, so that each is accounted for once;
    ``discard`` gets every other result that arrived anyway (two attempts committing in the same instant),
    so it can release what it holds.
    """
    loop = asyncio.get_running_loop()
    running: set[asyncio.Task[T]] = {loop.create_task(_call(first))}
    hedges = 0
    last_error: BaseException | None = None
    try:
        while running:
            timeout = after if hedges < max_hedges else None
            done, _ = await asyncio.wait(running, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                start = hedge(hedges + 1)
                hedges += 1
                if start is not None:
                    running.add(loop.create_task(_call(start)))
                continue
            winner: asyncio.Task[T] | None = None
            errors: list[UpstreamError] = []
            for task in done:
                running.discard(task)
                error = task.exception()
                if error is None:
                    if winner is None:
                        winner = task
                    elif discard is not None:
                        discard(task.result())
                elif not isinstance(error, UpstreamError):
                    raise error
                else:
                    errors.append(error)
            # A stale pick (nothing sent) is the one raised only when nothing else failed: a real failure
            # must reach the caller, raised or through ``on_error``.
            errors.sort(key=lambda e: not isinstance(e, NotSent))
            for i, error in enumerate(errors):
                raised = winner is None and not running and i == len(errors) - 1
                if not raised and on_error is not None:
                    on_error(error)  # another answers, still races, or fails with it: account for it now
                last_error = error
            if winner is not None:
                return winner.result()
        assert last_error is not None
        raise last_error
    finally:
        for task in running:
            task.cancel()
            # An attempt that finished before its cancel landed holds a result (an open stream, counters)
            # that needs releasing — whenever it ends, even if this await is itself cancelled below.
            task.add_done_callback(functools.partial(_release, discard))
        if running:
            # Waiting does not raise the attempts' own cancellations; a cancellation of this task (the
            # client went away) still propagates, and the callbacks above release what ends later.
            await asyncio.wait(running)


def _release(discard: Callable[[T], None] | None, task: asyncio.Task[T]) -> None:
    if task.cancelled() or task.exception() is not None:
        return
    if discard is not None:
        discard(task.result())


async def _call(factory: Callable[[], Awaitable[T]]) -> T:
    return await factory()
