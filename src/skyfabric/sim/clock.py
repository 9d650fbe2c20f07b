"""An asyncio event loop on a virtual clock: it never sleeps, it jumps to the next timer.

The gateway's router, admission control, retry budget and health loop are asyncio code whose only notion of
time is ``loop.time()`` (and the clock passed to the proxy). Running them on this loop makes a simulated
hour take as long as its events take to process, not an hour, while the code under test is exactly the
code that runs in production.

How: ``BaseEventLoop._run_once`` asks the selector to wait until the next timer is due; our selector
moves the clock forward by that timeout instead of blocking, and reports no I/O (there is none: the
simulated transport resolves futures with timers).
"""

from __future__ import annotations

import asyncio
import selectors
from typing import Any


class _VirtualSelector(selectors.BaseSelector):
    def __init__(self, loop: VirtualClockLoop) -> None:
        self._loop = loop
        self._map: dict[int, selectors.SelectorKey] = {}

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._map[fd] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        return self._map.pop(fd)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise RuntimeError("simulation stalled: no timer scheduled and nothing ready")
        if timeout > 0:
            self._loop.now += timeout
        return []

    def get_map(self) -> Any:
        return self._map

    def close(self) -> None:
        self._map.clear()


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """``time()`` is virtual and advances only when every ready callback has run."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        super().__init__(selector=_VirtualSelector(self))

    def time(self) -> float:
        return self.now
