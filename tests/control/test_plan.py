"""The planner: exact optimality (against brute force), the survival property, and honest infeasibility."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skyfabric.cli import cli
from skyfabric.control.plan import (
    Offer,
    Requirements,
    load_offers,
    load_profiles,
    peak_from_trace,
    plan,
    to_fleet,
)
from skyfabric.core.endpoints import fleet_endpoints
from skyfabric.core.errors import PlanInfeasible
from skyfabric.core.fleet import load_fleet

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "three-clouds.offers.yaml"


def feasible(offers: list[Offer], counts: tuple[int, ...], req: Requirements) -> bool:
    cap = [o.throughput * x for o, x in zip(offers, counts, strict=True)]
    total = sum(cap)
    if total < req.demand - 1e-9:
        return False
    for p in {o.provider for o in offers}:
        inside = sum(c for c, o in zip(cap, offers, strict=True) if o.provider == p)
        if total - inside < req.survive_provider * req.demand - 1e-9:
            return False
        if req.max_provider_share is not None and inside > req.max_provider_share * total + 1e-9:
            return False
    if req.survive_region is not None:
        for pr in {(o.provider, o.region) for o in offers}:
            inside = sum(c for c, o in zip(cap, offers, strict=True) if (o.provider, o.region) == pr)
            if total - inside < req.survive_region * req.demand - 1e-9:
                return False
    return True


def brute_force(offers: list[Offer], req: Requirements) -> float | None:
    best = None
    for counts in itertools.product(*(range((o.quota or 0) + 1) for o in offers)):
        if feasible(offers, counts, req):
            c = sum(o.price_per_hour * x for o, x in zip(offers, counts, strict=True))
            best = c if best is None else min(best, c)
    return best


offer_st = st.builds(
    Offer,
    provider=st.sampled_from(["aws", "gcp", "azure"]),
    region=st.sampled_from(["r1", "r2"]),
    accelerator=st.just("nvidia-h100"),
    engine=st.just("vllm"),
    price_per_hour=st.integers(1, 100).map(float),
    throughput=st.integers(1, 40).map(float),
    quota=st.integers(0, 4),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    offers=st.lists(offer_st, min_size=2, max_size=5),
    demand=st.integers(1, 120).map(float),
    survive=st.sampled_from([0.5, 0.8, 1.0]),
    region=st.sampled_from([None, 0.5]),
    share=st.sampled_from([None, 0.6, 0.8]),
)
def test_plan_is_optimal_against_brute_force(
    offers: list[Offer], demand: float, survive: float, region: float | None, share: float | None
) -> None:
    req = Requirements(demand, survive_provider=survive, survive_region=region, max_provider_share=share)
    expected = brute_force(offers, req)
    if expected is None:
        with pytest.raises(PlanInfeasible):
            plan(offers, req)
        return
    result = plan(offers, req)
    assert math.isclose(result.cost_per_hour, expected, abs_tol=1e-6)
    assert feasible(offers, tuple(result.replicas), req)
    assert all(0 <= x <= (o.quota or 0) for o, x in zip(offers, result.replicas, strict=True))


@settings(max_examples=60, deadline=None)
@given(
    prices=st.lists(st.integers(1, 50), min_size=6, max_size=6),
    thr=st.lists(st.integers(5, 60), min_size=6, max_size=6),
    demand=st.integers(10, 500),
)
def test_any_provider_lost_capacity_still_covers_demand(
    prices: list[int], thr: list[int], demand: int
) -> None:
    """The survival property, without quotas: remove any provider from the answer, the peak is still met."""
    offers = [
        Offer(p, r, "nvidia-h100", "vllm", float(c), float(t))
        for (p, r), c, t in zip(
            [("aws", "a"), ("aws", "b"), ("gcp", "a"), ("gcp", "b"), ("azure", "a"), ("azure", "b")],
            prices,
            thr,
            strict=True,
        )
    ]
    result = plan(offers, Requirements(float(demand)))
    for provider in ("aws", "gcp", "azure"):
        assert result.capacity(without_provider=provider) >= demand
    # and it is not wasteful: a single provider can never be the answer when survival is asked for
    assert len({o.provider for o, x in zip(result.offers, result.replicas, strict=True) if x}) >= 2


def test_infeasible_names_the_loss_that_cannot_be_covered_and_by_how_much() -> None:
    offers = [
        Offer("aws", "us-east-1", "nvidia-h100", "vllm", 10.0, 40.0, quota=5),
        Offer("gcp", "us-central1", "tpu-v6e", "vllm-tpu", 8.0, 10.0, quota=2),
    ]
    with pytest.raises(PlanInfeasible) as info:
        plan(offers, Requirements(50.0))
    message = str(info.value)
    assert (
        "losing provider aws leaves at most 20.0 req/s, 30.0 req/s short of 100% of the peak (50.0)"
        in message
    )
    assert "losing provider gcp" not in message  # aws alone carries 200 req/s


def test_infeasible_spread_rule_says_how_many_providers_are_needed() -> None:
    offers = [
        Offer("aws", "r", "nvidia-h100", "vllm", 1.0, 10.0),
        Offer("gcp", "r", "nvidia-h100", "vllm", 1.0, 10.0),
    ]
    with pytest.raises(PlanInfeasible, match="need at least 3 providers"):
        plan(offers, Requirements(10.0, survive_provider=0.5, max_provider_share=0.4))


def test_infeasible_region_loss() -> None:
    offers = [
        Offer("aws", "east", "nvidia-h100", "vllm", 1.0, 10.0, quota=10),
        Offer("aws", "west", "nvidia-h100", "vllm", 1.0, 10.0, quota=1),
        Offer("gcp", "central", "nvidia-h100", "vllm", 1.0, 10.0, quota=10),
    ]
    with pytest.raises(PlanInfeasible) as info:
        plan(offers, Requirements(200.0, survive_provider=0.1, survive_region=1.0))
    message = str(info.value)
    assert "losing region gcp/central leaves at most 110.0 req/s, 90.0 req/s short" in message
    assert "losing region aws/east leaves at most 110.0 req/s, 90.0 req/s short" in message
    assert "aws/west" not in message


def test_cost_of_resilience_is_against_the_cheapest_single_provider_fleet() -> None:
    offers = [
        Offer("aws", "r", "nvidia-h100", "vllm", 10.0, 10.0),
        Offer("gcp", "r", "nvidia-h100", "vllm", 12.0, 10.0),
        Offer("azure", "r", "nvidia-h100", "vllm", 30.0, 10.0),
    ]
    result = plan(offers, Requirements(20.0))
    assert result.replicas == [2, 2, 0]  # each of aws, gcp alone carries the peak
    assert result.single_provider == ("aws", 20.0)
    assert result.cost_per_hour == 44.0


def test_plan_fleet_file_loads_with_the_fleet_loader(tmp_path: Path) -> None:
    profiles = load_profiles()
    offers, req, meta = load_offers(EXAMPLE, profiles)
    result = plan(offers, req)
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(to_fleet(result, meta["model"], "http://{service}.example:8000/v1")))
    fleet = load_fleet(path)
    endpoints = fleet_endpoints(fleet)
    assert len(endpoints) == sum(1 for x in result.replicas if x)
    concurrency = {e.id.rsplit("/", 1)[0]: e.concurrency for e in endpoints}
    for offer, count in zip(result.offers, result.replicas, strict=True):
        if count:
            assert concurrency[f"{offer.provider}/{offer.region}/{offer.pool}"] == offer.concurrency * count


def test_profiles_cover_the_accelerators_with_sources_and_measured_figures_override(tmp_path: Path) -> None:
    table = load_profiles()
    for name in [
        "nvidia-h100",
        "nvidia-h200",
        "nvidia-b200",
        "nvidia-a100",
        "nvidia-l4",
        "tpu-v5e",
        "tpu-v6e",
        "trainium1",
        "trainium2",
        "inferentia2",
    ]:
        entry = table[name]
        assert entry.source and entry.date and entry.kind in ("measured", "estimate"), name
        if entry.kind == "estimate":
            assert "ESTIMATE" in entry.source, name
    measured = tmp_path / "measured.yaml"
    measured.write_text("accelerators:\n  nvidia-h100: {requests_per_second: 50, tokens_per_second: 14000}\n")
    table = load_profiles(measured)
    assert table["nvidia-h100"].requests_per_second == 50
    assert table["nvidia-h100"].kind == "measured"
    assert table["nvidia-h100"].concurrency == 256  # kept from the shipped entry


def test_peak_from_trace(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    rows += [f"2023-11-16 18:00:{s:02d}.0000000,100,10" for s in range(0, 60, 2)]  # 30 in minute 0
    rows += [f"2023-11-16 18:01:{s:02d}.0000000,100,20" for s in range(60)]  # 60 in minute 1
    trace.write_text("\n".join(rows) + "\n")
    assert peak_from_trace(trace, "requests", 60) == 1.0
    assert peak_from_trace(trace, "tokens", 60) == 20.0


def test_cli_plan_prints_table_and_writes_files(tmp_path: Path) -> None:
    runner = CliRunner()
    fleet = tmp_path / "fleet.yaml"
    out = runner.invoke(
        cli, ["plan", str(EXAMPLE), "--fleet-out", str(fleet), "--plan-out", str(tmp_path / "p.yaml")]
    )
    assert out.exit_code == 0, out.output
    assert "capacity with one provider lost" in out.output
    assert "cheapest single-provider fleet" in out.output
    load_fleet(fleet)
    bad = runner.invoke(cli, ["plan", str(EXAMPLE), "--peak", "100000"])
    assert bad.exit_code != 0
    assert "short of" in bad.output


def test_cli_plan_refuses_to_write_a_fleet_file_the_loader_would_refuse(tmp_path: Path) -> None:
    offers = tmp_path / "offers.yaml"
    offers.write_text(
        'model: "bad name!"\ndemand: {peak: 10}\noffers:\n'
        "  - {provider: aws, region: r, accelerator: nvidia-h100, price_per_hour: 1}\n"
        "  - {provider: gcp, region: r, accelerator: nvidia-h100, price_per_hour: 1}\n"
    )
    out = CliRunner().invoke(cli, ["plan", str(offers), "--fleet-out", str(tmp_path / "fleet.yaml")])
    assert out.exit_code != 0
    assert "would not load" in out.output and "models[0].name" in out.output
    assert not (tmp_path / "fleet.yaml").exists()
