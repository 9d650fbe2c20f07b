"""What the gateway knows of a drill running against it: the phases a drill runner announces.

A drill (``skyfabric drill …``, ``drills/``) injects faults *outside* the gateway — in fault proxies in
front of the endpoints — so the gateway cannot tell a rehearsal from a real outage, and should not have
to. The runner tells it, the way a deploy tool posts an annotation to a monitoring system: it POSTs each
phase to ``/dashboard/drill`` (``drill start`` with the planned faults, ``fault on`` / ``fault off`` as it
switches them, ``drill end``), with the admin credential. The dashboard then draws the drill's timeline —
when each fault was on, on which target — over the charts of what the gateway saw (requests/s, errors,
TTFT) and its own ejections and recoveries, live.

The gateway stamps each event with its own clock when it arrives, so the timeline lines up with the
charts whatever the runner's clock says. Events carry the runner's ``drill`` id and a ``seq``: with
several workers each POST lands on one of them, and the dashboard rebuilds the drill from the union of
every worker's events (``gateway/instance.py``), in ``seq`` order, without duplicates.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from skyfabric.core.errors import InvalidRequest

#: Events kept (a drill has a few per fault; this holds the last drills whole).
KEPT = 500
KINDS = ("start", "fault_on", "fault_off", "end")
_TEXT = 200


def _text(data: dict[str, Any], name: str, *, required: bool = False) -> str | None:
    value = data.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value or len(value) > _TEXT:
        raise InvalidRequest(f"drill event: {name!r} must be a string of 1 to {_TEXT} characters")
    return value


def parse_event(body: bytes, received: float) -> dict[str, Any]:
    """A drill event from a runner's POST body, checked and stamped with the gateway's time.

    Fields: ``drill`` (the run's id), ``seq`` (its order within the run), ``event`` (one of
    :data:`KINDS`); ``scenario`` and ``duration`` (planned seconds) on ``start``; ``fault`` (its label),
    ``target`` and ``mode`` on ``fault_on``/``fault_off``; an optional ``text``.
    """
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"drill event: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InvalidRequest("drill event: expected a JSON object")
    kind = data.get("event")
    if kind not in KINDS:
        raise InvalidRequest(f"drill event: 'event' must be one of {', '.join(KINDS)}")
    seq = data.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise InvalidRequest("drill event: 'seq' must be a non-negative integer")
    event: dict[str, Any] = {"drill": _text(data, "drill", required=True), "seq": seq, "event": kind}
    event["t"] = round(received, 3)
    for name in ("scenario", "fault", "target", "mode", "text"):
        value = _text(data, name, required=name == "fault" and kind in ("fault_on", "fault_off"))
        if value is not None:
            event[name] = value
    duration = data.get("duration")
    if duration is not None:
        if not isinstance(duration, int | float) or isinstance(duration, bool) or not 0 < duration < 86400:
            raise InvalidRequest("drill event: 'duration' must be seconds (0 to 86400)")
        event["duration"] = float(duration)
    return event


class DrillLog:
    """The drill events this worker received, newest last (bounded)."""

    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self.wall = wall
        self.events: deque[dict[str, Any]] = deque(maxlen=KEPT)

    def record(self, body: bytes) -> dict[str, Any]:
        """Keep the event in ``body`` (raises :class:`InvalidRequest` when it is not one)."""
        event = parse_event(body, self.wall())
        self.events.append(event)
        return event


def timeline(events: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """The latest drill as the dashboard draws it, from every event any worker received.

    ``{"id", "scenario", "started", "ended", "duration", "faults": [{"fault", "target", "mode",
    "windows": [[on, off or None], …]}]}`` — times are the gateway's wall clock; a window still open has
    ``None`` as its end. None when no drill was announced.
    """
    unique = {(e["drill"], e["seq"]): e for e in events}
    if not unique:
        return None
    # The latest drill is the one whose first event arrived last.
    first: dict[str, float] = {}
    for e in unique.values():
        first[e["drill"]] = min(first.get(e["drill"], e["t"]), e["t"])
    drill = max(first, key=lambda d: first[d])
    mine = sorted((e for e in unique.values() if e["drill"] == drill), key=lambda e: e["seq"])
    out: dict[str, Any] = {
        "id": drill,
        "scenario": None,
        "started": first[drill],
        "ended": None,
        "duration": None,
        "faults": [],
    }
    faults: dict[str, dict[str, Any]] = {}
    for e in mine:
        kind = e["event"]
        if kind == "start":
            out["started"] = e["t"]
            out["scenario"] = e.get("scenario")
            out["duration"] = e.get("duration")
        elif kind == "end":
            out["ended"] = e["t"]
        else:
            fault = faults.get(e["fault"])
            if fault is None:
                fault = faults[e["fault"]] = {
                    "fault": e["fault"],
                    "target": e.get("target"),
                    "mode": e.get("mode"),
                    "windows": [],
                }
            windows = fault["windows"]
            if kind == "fault_on":
                if not windows or windows[-1][1] is not None:
                    windows.append([e["t"], None])
            elif windows and windows[-1][1] is None:
                windows[-1][1] = e["t"]
    if out["ended"] is not None:  # the runner clears every fault before it ends; close what it did not
        for fault in faults.values():
            for window in fault["windows"]:
                if window[1] is None:
                    window[1] = out["ended"]
    out["faults"] = list(faults.values())
    return out
