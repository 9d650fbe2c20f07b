"""Fleet files: the shipped ones load; mistakes are named by file, field and expectation."""

from __future__ import annotations

from pathlib import Path

import pytest

from skyfabric.core.endpoints import fleet_endpoints
from skyfabric.core.errors import ConfigError
from skyfabric.core.fleet import load_fleet, parse_fleet

ROOT = Path(__file__).resolve().parents[2]


def minimal(**pool: object) -> dict[str, object]:
    base = {
        "name": "p",
        "accelerator": "nvidia-h100",
        "engine": "vllm",
        "model": "m",
        "endpoints": ["http://10.0.0.1:8000/v1/"],
    }
    return {
        "models": [{"name": "m"}],
        "providers": [{"name": "aws", "regions": [{"name": "r", "pools": [{**base, **pool}]}]}],
    }


def test_shipped_fleets_load() -> None:
    embedded = load_fleet(ROOT / "examples" / "embedded.yaml")
    assert [p.name for p in embedded.providers] == ["aws", "gcp", "azure"]
    accelerators = {pool.accelerator for p in embedded.providers for r in p.regions for pool in r.pools}
    assert accelerators == {"trainium2", "tpu-v6e", "nvidia-h100"}
    multi = load_fleet(ROOT / "examples" / "multicloud.yaml")
    engines = {pool.engine for p in multi.providers for r in p.regions for pool in r.pools}
    assert {"vllm", "vllm-tpu", "vllm-neuron", "openai"} <= engines
    assert len(fleet_endpoints(multi)) == 10


def test_endpoints_carry_their_failure_domains() -> None:
    endpoint = fleet_endpoints(parse_fleet(minimal()))[0]
    assert endpoint.id == "aws/r/p/0"
    assert endpoint.domains == ("aws", "aws/r", "aws/r/p")
    assert endpoint.url == "http://10.0.0.1:8000/v1"  # trailing slash dropped
    assert endpoint.origin == ("http", "10.0.0.1", 8000) and endpoint.base_path == "/v1"
    assert endpoint.can_continue  # vllm continues a final assistant message


@pytest.mark.parametrize(
    ("pool", "needle"),
    [
        ({"accelerator": "h100"}, "providers[0].regions[0].pools[0].accelerator: Input should be"),
        ({"engine": "magic"}, "providers[0].regions[0].pools[0].engine"),
        ({"endpoints": []}, "needs at least one URL in `endpoints`"),
        ({"endpoints": ["10.0.0.1:8000"]}, "must be an http:// or https:// base URL"),
        ({"model": "other"}, "serves 'other', which is not under `models` (there are: m)"),
        ({"replicas": -1}, "replicas: Input should be greater than or equal to 0 (got -1)"),
        ({"colour": "red"}, "colour: Extra inputs are not permitted"),
    ],
)
def test_mistakes_are_named(pool: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_fleet(minimal(**pool), "fleet.yaml")
    assert str(info.value).startswith("fleet.yaml: ")
    assert needle in str(info.value)


def test_unreadable_and_non_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read fleet file"):
        load_fleet(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML"):
        load_fleet(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_fleet(scalar)


def test_duplicate_names_and_dangling_fallbacks() -> None:
    data = minimal()
    data["models"] = [{"name": "m", "aliases": ["x"]}, {"name": "x"}]
    with pytest.raises(ConfigError, match="'x' is used twice"):
        parse_fleet(data)
    data["models"] = [{"name": "m", "fallbacks": ["ghost"]}]
    with pytest.raises(ConfigError, match="falls back to 'ghost'"):
        parse_fleet(data)


def test_local_pool_needs_up_to_get_endpoints() -> None:
    fleet = parse_fleet(minimal(engine="local", endpoints=[], replicas=2))
    with pytest.raises(ConfigError, match="skyfabric up"):
        fleet_endpoints(fleet)


def test_telemetry_is_opt_in_and_the_embedded_fleet_opts_in() -> None:
    from importlib.resources import files

    embedded = load_fleet(files("skyfabric") / "control" / "fleets" / "embedded.yaml")
    bare = parse_fleet(embedded.model_dump(exclude={"observability"}))
    assert not bare.observability.dashboard and not bare.observability.metrics
    assert not bare.observability.tracing.enabled
    assert embedded.observability.dashboard and embedded.observability.metrics
