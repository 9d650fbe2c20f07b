"""Drill events: what a runner may post to ``/dashboard/drill``, and the timeline the dashboard draws."""

from __future__ import annotations

from pathlib import Path

import httpx
import orjson
import pytest

from skyfabric.core.errors import InvalidRequest
from skyfabric.gateway.drill_log import parse_event, timeline
from tests.conftest import MakeGateway
from tests.support.fake_upstream import FakeUpstream

KEY = "sk-test-key-0001"


def event(seq: int, kind: str, t: float, drill: str = "d1", **extra: object) -> dict[str, object]:
    return parse_event(orjson.dumps({"drill": drill, "seq": seq, "event": kind, **extra}), t)


def test_the_timeline_is_rebuilt_from_events_in_any_order_and_duplicates() -> None:
    on = {"fault": "refuse aws", "target": "aws", "mode": "refuse"}
    events = [
        event(3, "fault_off", 30.0, **on),
        event(1, "start", 10.0, scenario="flap", duration=60),
        event(2, "fault_on", 20.0, **on),
        event(2, "fault_on", 20.0, **on),  # the same event seen by two workers' merge
        event(4, "fault_on", 35.0, **on),
        event(5, "end", 40.0),
    ]
    drill = timeline(events)
    assert drill is not None
    assert (drill["scenario"], drill["started"], drill["ended"], drill["duration"]) == (
        "flap",
        10.0,
        40.0,
        60.0,
    )
    # Flapping: two windows; the one still open when the drill ended is closed at its end.
    assert drill["faults"] == [
        {"fault": "refuse aws", "target": "aws", "mode": "refuse", "windows": [[20.0, 30.0], [35.0, 40.0]]}
    ]
    later = timeline([*events, event(1, "start", 50.0, drill="d2", scenario="steady")])
    assert later is not None and later["id"] == "d2" and later["faults"] == [] and later["ended"] is None
    assert timeline([]) is None


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"drill": "d", "seq": 1, "event": "explode"}',
        b'{"drill": "d", "seq": -1, "event": "start"}',
        b'{"drill": "d", "seq": true, "event": "start"}',
        b'{"seq": 1, "event": "start"}',
        b'{"drill": "d", "seq": 1, "event": "fault_on"}',
        b'{"drill": "d", "seq": 1, "event": "start", "duration": "long"}',
        b'{"drill": "' + b"x" * 201 + b'", "seq": 1, "event": "start"}',
    ],
)
def test_malformed_events_are_refused(body: bytes) -> None:
    with pytest.raises(InvalidRequest):
        parse_event(body, 0.0)


async def test_announcing_needs_the_admin_credential_when_there_is_one(
    make_gateway: MakeGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SF_DRILL_ADMIN", "sk-admin-secret-0001")
    gw = await make_gateway(
        {"aws": [FakeUpstream("a")]},
        api_keys=[{"key": KEY}],
        operations={"database": str(tmp_path / "ops.db"), "admin_key_env": "SF_DRILL_ADMIN"},
    )
    start = {"drill": "d1", "seq": 1, "event": "start", "scenario": "provider-down", "duration": 30}
    async with httpx.AsyncClient(base_url=gw.root) as http:
        assert (await http.post("/dashboard/drill", json=start)).status_code == 401
        client_key = {"authorization": f"Bearer {KEY}"}  # opens the dashboard, may not write on it
        assert (await http.post("/dashboard/drill", json=start, headers=client_key)).status_code == 401
        admin = {"authorization": "Bearer sk-admin-secret-0001"}
        assert (await http.get("/dashboard/drill", headers=admin)).status_code == 405
        bad = await http.post("/dashboard/drill", content=b'{"event": "start"}', headers=admin)
        assert bad.status_code == 400 and "drill" in bad.json()["error"]
        taken = await http.post("/dashboard/drill", json=start, headers=admin)
        assert taken.status_code == 202 and taken.json()["event"] == "start"
        state = (await http.get("/dashboard/state", headers=client_key)).json()
    assert state["drill"]["id"] == "d1" and state["drill"]["scenario"] == "provider-down"
