"""What the in-process A/B benches share (``observability_ab.py``, ``operations_ab.py``): one gateway that
alternates two modes under one wrk run, measured between two signals, counting its answers and the
garbage collector's share."""

from __future__ import annotations

import asyncio
import gc
import signal
import time
from typing import Any


def count_answers(proxy: Any) -> list[int]:
    """Wrap ``proxy.forward``: the list's one item counts the requests answered (refused ones included)."""
    answered = [0]
    forward = proxy.forward

    async def counted(ctx):  # type: ignore[no-untyped-def]
        try:
            return await forward(ctx)
        finally:
            answered[0] += 1

    proxy.forward = counted
    return answered


def window() -> tuple[asyncio.Event, asyncio.Event]:
    """Events set by SIGUSR1 (the load is steady: measure) and SIGUSR2 (stop measuring)."""
    loop = asyncio.get_running_loop()
    begin, end = asyncio.Event(), asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, begin.set)
    loop.add_signal_handler(signal.SIGUSR2, end.set)
    return begin, end


class Collector:
    """The garbage collector's CPU seconds and collections (by generation) since it was made."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.runs = [0, 0, 0]
        self._started = 0.0
        gc.callbacks.append(self._on)

    def _on(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.process_time()
        else:
            self.seconds += time.process_time() - self._started
            self.runs[info["generation"]] += 1

    def close(self) -> None:
        gc.callbacks.remove(self._on)
