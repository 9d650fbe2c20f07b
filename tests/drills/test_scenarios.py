"""Scenario files: the built-ins load, names resolve, targets land on the right endpoints, flaps expand."""

from __future__ import annotations

from pathlib import Path

import pytest

from skyfabric.core.endpoints import Endpoint, fleet_endpoints
from skyfabric.core.errors import ConfigError
from skyfabric.core.fleet import parse_fleet
from skyfabric.drills.faultproxy import PASS, FaultMode
from skyfabric.drills.scenario import (
    Scenario,
    Target,
    builtin_scenarios,
    find_scenario,
    load_scenario,
    offset_seconds,
)
from skyfabric.drills.timeline import build_timeline, change_points, modes_at, resolve_target
from tests.drills.conftest import stub_fleet_data

REQUIRED = {"provider-outage", "provider-down", "brownout", "throttle", "flap", "cut-streams", "region-loss"}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def endpoints() -> list[Endpoint]:
    return fleet_endpoints(parse_fleet(stub_fleet_data([9001, 9002, 9003, 9004])))


def test_every_builtin_loads_and_has_an_slo() -> None:
    names = set(builtin_scenarios())
    assert names >= REQUIRED
    for name in names:
        scenario = load_scenario(name)
        assert scenario.name == name
        assert scenario.slo.truncated == 0
        assert scenario.slo.success_rate is not None


def test_repo_root_drills_dir_holds_the_builtins() -> None:
    assert {p.stem for p in (REPO / "drills").glob("*.yaml")} == set(builtin_scenarios())


def test_find_by_name_path_and_unknown(tmp_path: Path) -> None:
    assert find_scenario("flap").name == "flap.yaml"
    own = tmp_path / "mine.yaml"
    own.write_text("name: mine\nfaults: []\n")
    assert find_scenario(str(own)) == own
    assert load_scenario(str(own)).faults == []
    with pytest.raises(ConfigError, match="provider-outage"):
        find_scenario("no-such-drill")


def test_invalid_scenario_names_file_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nfaults:\n  - {kind: meteor, at: 1, for: 2}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: faults\.0\.kind"):
        load_scenario(str(bad))


def test_offsets_are_seconds_or_shares_of_the_duration() -> None:
    assert offset_seconds("25%", 60) == 15
    assert offset_seconds(7.5, 60) == 7.5


def test_target_defaults_and_overrides(endpoints: list[Endpoint]) -> None:
    name, hit, _ = resolve_target(Target(), endpoints)
    assert name == "aws" and {e.region for e in hit} == {"us-east-1", "us-west-2"}
    name, hit, _ = resolve_target(Target(), endpoints, provider="gcp")
    assert name == "gcp" and [e.id for e in hit] == ["gcp/us-central1/p/0"]
    name, hit, _ = resolve_target(Target(scope="region"), endpoints, provider="aws")
    assert name == "aws/us-east-1" and len(hit) == 1
    name, hit, _ = resolve_target(Target(scope="region"), endpoints, region="us-west-2")
    assert name == "aws/us-west-2" and [e.id for e in hit] == ["aws/us-west-2/p/0"]
    name, hit, note = resolve_target(Target(scope="region"), endpoints, provider="azure")
    assert name == "azure/eastus" and "every endpoint of provider azure" in note
    name, hit, _ = resolve_target(Target(scope="endpoint"), endpoints, provider="gcp")
    assert name == "gcp/us-central1/p/0"
    name, hit, _ = resolve_target(Target(scope="fleet"), endpoints, provider="gcp")
    assert name == "every provider" and hit == endpoints
    with pytest.raises(ConfigError, match="providers: aws, gcp, azure"):
        resolve_target(Target(), endpoints, provider="oracle")
    with pytest.raises(ConfigError, match="no region 'eu-west-1'"):
        resolve_target(Target(), endpoints, provider="aws", region="eu-west-1")


def test_timeline_places_flaps_and_combines_overlaps(endpoints: list[Endpoint]) -> None:
    scenario = Scenario.model_validate(
        {
            "name": "t",
            "faults": [
                {"kind": "refuse", "at": "10%", "for": "50%", "flap": {"down": 2, "up": 3}},
                {"kind": "latency", "factor": 4, "at": 0, "for": 8, "target": {"provider": "gcp"}},
                {"kind": "errors", "rate": 0.3, "at": 4, "for": 4, "target": {"provider": "gcp"}},
            ],
        }
    )
    spans = build_timeline(scenario, endpoints, duration=20)
    flap = spans[0]
    assert flap.windows == ((2.0, 4.0), (7.0, 9.0))
    assert flap.active(3.0) and not flap.active(5.0)
    ids = [e.id for e in endpoints]
    modes = modes_at(spans, 5.0, ids)
    assert modes["gcp/us-central1/p/0"] == FaultMode(latency_factor=4).combine(FaultMode(error_rate=0.3))
    assert modes["aws/us-east-1/p/0"] == PASS
    assert modes_at(spans, 2.5, ids)["aws/us-west-2/p/0"].refuse
    assert change_points(spans)[:3] == [0.0, 2.0, 4.0]


def test_timeline_rejects_a_fault_after_the_end(endpoints: list[Endpoint]) -> None:
    scenario = Scenario.model_validate({"name": "t", "faults": [{"kind": "blackhole", "at": 30, "for": 5}]})
    with pytest.raises(ConfigError, match="after the drill ends"):
        build_timeline(scenario, endpoints, duration=20)


def test_fault_kinds_map_to_proxy_modes() -> None:
    scenario = load_scenario("brownout")
    modes = [f.mode() for f in scenario.faults]
    assert modes[0].latency_factor == 10 and modes[1].error_rate == 0.2
    throttle = load_scenario("throttle").faults
    assert throttle[0].mode().retry_after == 2 and throttle[1].mode().retry_after is None
    assert load_scenario("cut-streams").faults[0].mode().cut_after_events == 5
