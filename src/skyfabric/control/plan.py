"""The fleet planner: the cheapest replica counts that carry the peak even after losing any one provider.

A mixed-integer linear programme, solved exactly by HiGHS (``highspy``). One integer variable per offer
(a provider/region/accelerator/engine at a price, with a quota and a throughput per replica)::

    minimise    Σ price_i · x_i
    subject to  Σ thr_i · x_i                        ≥ demand                 (everything up)
                Σ_{i ∉ provider p} thr_i · x_i       ≥ survive · demand       (for every provider p)
                Σ_{i ∉ region r} thr_i · x_i         ≥ survive_region · demand (every region, optional)
                Σ_{i ∈ provider p} thr_i · x_i       ≤ spread · Σ thr_i · x_i  (no provider above spread)
                0 ≤ x_i ≤ quota_i,  x_i integer

Why a MILP and not a heuristic: the loss constraints couple every provider with every other, and replicas
are lumpy (one node carries 30–200 requests/s); greedy fill gets within a node of the optimum on easy
cases and is wrong by several nodes when quotas bind. HiGHS proves optimality (gap 0) in milliseconds for
fleets of this size. When no plan exists, :func:`diagnose` says which constraint cannot be met and by how
much, from the quotas alone.
"""

from __future__ import annotations

import csv
import math
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import yaml

from skyfabric.core.errors import ConfigError, PlanInfeasible

PROFILES = Path(__file__).parent / "profiles.yaml"

#: The engine an accelerator kind is served with unless an offer says otherwise.
DEFAULT_ENGINE = {
    "tpu-v5e": "vllm-tpu",
    "tpu-v5p": "vllm-tpu",
    "tpu-v6e": "vllm-tpu",
    "trainium1": "vllm-neuron",
    "trainium2": "vllm-neuron",
    "inferentia2": "vllm-neuron",
}

Unit = Literal["requests", "tokens"]


@dataclass(frozen=True, slots=True)
class Profile:
    """What one replica of an accelerator kind carries (see profiles.yaml for sources)."""

    accelerator: str
    requests_per_second: float
    tokens_per_second: float
    concurrency: int
    ttft_seconds: float
    kind: str = "measured"
    source: str = ""
    date: str = ""

    def throughput(self, unit: Unit) -> float:
        return self.requests_per_second if unit == "requests" else self.tokens_per_second


@dataclass(frozen=True, slots=True)
class Offer:
    """Replicas one can buy: where, on what, served by which engine, at what price, up to how many."""

    provider: str
    region: str
    accelerator: str
    engine: str
    price_per_hour: float
    throughput: float
    quota: int | None = None
    concurrency: int = 256
    name: str = ""

    @property
    def pool(self) -> str:
        return self.name or self.accelerator


@dataclass(frozen=True, slots=True)
class Requirements:
    """What the plan must satisfy."""

    demand: float
    unit: Unit = "requests"
    survive_provider: float = 1.0
    survive_region: float | None = None
    max_provider_share: float | None = None


@dataclass(slots=True)
class Plan:
    """An optimal plan: replicas per offer and what it costs and carries."""

    offers: list[Offer]
    replicas: list[int]
    requirements: Requirements
    cost_per_hour: float
    single_provider: tuple[str, float] | None = None
    #: The cheapest fleet that meets the peak with everything up (no loss constraints).
    unconstrained_cost: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def capacity(self, *, without_provider: str | None = None, without_region: str | None = None) -> float:
        total = 0.0
        for offer, count in zip(self.offers, self.replicas, strict=True):
            if offer.provider == without_provider:
                continue
            if without_region is not None and f"{offer.provider}/{offer.region}" == without_region:
                continue
            total += offer.throughput * count
        return total

    def providers(self) -> list[str]:
        return sorted({o.provider for o in self.offers})

    def regions(self) -> list[str]:
        return sorted({f"{o.provider}/{o.region}" for o in self.offers})


# ---------------------------------------------------------------------------------------------- profiles


def load_profiles(extra: Path | None = None) -> dict[str, Profile]:
    """The shipped profile table, with measured figures from ``extra`` (same shape) taking precedence."""
    table: dict[str, Profile] = {}
    for path in [PROFILES, *([extra] if extra else [])]:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read profiles: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("accelerators"), dict):
            raise ConfigError(f"{path}: expected a mapping with `accelerators`")
        for name, entry in data["accelerators"].items():
            base = table.get(name)
            merged: dict[str, Any] = (
                {
                    "requests_per_second": base.requests_per_second,
                    "tokens_per_second": base.tokens_per_second,
                    "concurrency": base.concurrency,
                    "ttft_seconds": base.ttft_seconds,
                }
                if base
                else {"concurrency": 256, "ttft_seconds": 1.0}
            )
            merged.update({k: v for k, v in entry.items() if k in _PROFILE_FIELDS})
            unknown = set(entry) - _PROFILE_FIELDS
            if unknown:
                raise ConfigError(f"{path}: accelerators.{name}: unknown fields {sorted(unknown)}")
            if "requests_per_second" not in merged or "tokens_per_second" not in merged:
                raise ConfigError(
                    f"{path}: accelerators.{name}: needs requests_per_second and tokens_per_second"
                )
            if extra is not None and Path(path) == extra and "kind" not in entry:
                merged["kind"] = "measured"
            table[name] = Profile(accelerator=name, **merged)
    return table


_PROFILE_FIELDS = {
    "requests_per_second",
    "tokens_per_second",
    "concurrency",
    "ttft_seconds",
    "kind",
    "source",
    "date",
}


# ---------------------------------------------------------------------------------------------- inputs


def peak_from_trace(path: Path, unit: Unit, window: float = 60.0) -> float:
    """The peak rate over ``window``-second bins of an Azure-style trace (TIMESTAMP, ContextTokens,
    GeneratedTokens): requests/s, or generated tokens/s."""
    bins: dict[int, float] = {}
    t0: datetime | None = None
    try:
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                stamp = datetime.fromisoformat(row["TIMESTAMP"].strip()[:26])
                t0 = t0 or stamp
                key = int((stamp - t0).total_seconds() // window)
                bins[key] = bins.get(key, 0.0) + (
                    1.0 if unit == "requests" else float(row["GeneratedTokens"])
                )
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read trace: {exc}") from None
    if not bins:
        raise ConfigError(f"{path}: the trace has no requests")
    return max(bins.values()) / window


def load_offers(path: Path, profiles: dict[str, Profile]) -> tuple[list[Offer], Requirements, dict[str, Any]]:
    """Read an offers file: ``offers`` (list), ``demand``, and optionally ``survive`` and ``spread``."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read offers: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("offers"), list) or not data["offers"]:
        raise ConfigError(f"{path}: expected a mapping with a non-empty `offers` list")
    known = {"model", "demand", "survive", "spread", "offers"}
    if set(data) - known:
        raise ConfigError(f"{path}: unknown top-level keys {sorted(set(data) - known)}")
    demand = data.get("demand") or {}
    unit: Unit = demand.get("unit", "requests")
    if unit not in ("requests", "tokens"):
        raise ConfigError(f"{path}: demand.unit must be requests or tokens (got {unit!r})")
    if "trace" in demand:
        trace = Path(demand["trace"])
        if not trace.is_absolute():
            trace = Path(path).parent / trace
        peak = peak_from_trace(trace, unit, float(demand.get("window", 60.0))) * float(
            demand.get("scale", 1.0)
        )
    elif "peak" in demand:
        peak = float(demand["peak"])
    else:
        raise ConfigError(f"{path}: demand needs `peak` (per second) or `trace`")
    survive = data.get("survive") or {}
    spread = data.get("spread") or {}
    req = Requirements(
        demand=peak,
        unit=unit,
        survive_provider=float(survive.get("provider", 1.0)),
        survive_region=None if survive.get("region") is None else float(survive["region"]),
        max_provider_share=None
        if spread.get("max_provider_share") is None
        else float(spread["max_provider_share"]),
    )
    offers = []
    for index, raw in enumerate(data["offers"]):
        where = f"{path}: offers[{index}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping")
        allowed = {
            "provider",
            "region",
            "accelerator",
            "engine",
            "price_per_hour",
            "quota",
            "throughput",
            "name",
        }
        if set(raw) - allowed:
            raise ConfigError(f"{where}: unknown fields {sorted(set(raw) - allowed)}")
        for key in ("provider", "region", "accelerator", "price_per_hour"):
            if key not in raw:
                raise ConfigError(f"{where}: missing `{key}`")
        accel = str(raw["accelerator"])
        profile = profiles.get(accel)
        if "throughput" in raw:
            throughput = float(raw["throughput"])
        elif profile is not None:
            throughput = profile.throughput(unit)
        else:
            raise ConfigError(f"{where}: no profile for accelerator {accel!r}; give `throughput`")
        quota = raw.get("quota")
        offers.append(
            Offer(
                provider=str(raw["provider"]),
                region=str(raw["region"]),
                accelerator=accel,
                engine=str(raw.get("engine", DEFAULT_ENGINE.get(accel, "vllm"))),
                price_per_hour=float(raw["price_per_hour"]),
                throughput=throughput,
                quota=None if quota is None else int(quota),
                concurrency=profile.concurrency if profile else 256,
                name=str(raw.get("name", "")),
            )
        )
    validate(offers, req)
    return offers, req, {"model": data.get("model", "model")}


def validate(offers: list[Offer], req: Requirements) -> None:
    """Reject inputs the optimiser cannot make sense of, with the reason."""
    if req.demand <= 0:
        raise ConfigError(f"demand must be positive (got {req.demand})")
    if not 0 <= req.survive_provider <= 1:
        raise ConfigError("survive.provider is a fraction of the peak between 0 and 1")
    if req.survive_region is not None and not 0 <= req.survive_region <= 1:
        raise ConfigError("survive.region is a fraction of the peak between 0 and 1")
    if req.max_provider_share is not None and not 0 < req.max_provider_share <= 1:
        raise ConfigError("spread.max_provider_share is a fraction between 0 (exclusive) and 1")
    for offer in offers:
        if offer.throughput <= 0 or offer.price_per_hour < 0 or (offer.quota is not None and offer.quota < 0):
            raise ConfigError(
                f"offer {offer.provider}/{offer.region}/{offer.accelerator}: throughput must be > 0, "
                "price and quota ≥ 0"
            )


# ---------------------------------------------------------------------------------------------- solving


def _upper(offer: Offer, req: Requirements) -> int:
    """A finite bound for an offer without a quota.

    Without a spread rule no optimum carries more than the peak plus one replica on one offer. With one,
    a provider's capacity may have to grow with the total, so the bound is widened by 1/share, and doubled
    for margin: a bound is needed (MILP variables must be bounded for a quick proof) but must never bind.
    """
    share = req.max_provider_share or 1.0
    need = 2 * math.ceil(req.demand / (offer.throughput * share)) + 2
    return need if offer.quota is None else min(offer.quota, need)


def _highs() -> Any:
    """A silent HiGHS instance (its constructor prints a banner on stdout, which is our table's place)."""
    import highspy

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            h = highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    h.setOptionValue("output_flag", False)
    return h


def _milp(
    offers: list[Offer], req: Requirements, *, survive: bool, time_limit: float = 60.0
) -> list[int] | None:
    """Solve the MILP; None when infeasible."""
    import highspy
    import numpy as np

    n = len(offers)
    thr = np.array([o.throughput for o in offers], dtype=float)
    rows: list[tuple[np.ndarray, float, float]] = [(thr, req.demand, math.inf)]
    providers = sorted({o.provider for o in offers})
    regions = sorted({(o.provider, o.region) for o in offers})
    if survive:
        for p in providers:
            mask = np.array([o.provider != p for o in offers], dtype=float)
            rows.append((thr * mask, req.survive_provider * req.demand, math.inf))
        if req.survive_region is not None:
            for pr in regions:
                mask = np.array([(o.provider, o.region) != pr for o in offers], dtype=float)
                rows.append((thr * mask, req.survive_region * req.demand, math.inf))
        if req.max_provider_share is not None:
            share = req.max_provider_share
            for p in providers:
                inside = np.array([o.provider == p for o in offers], dtype=float)
                # Σ_in thr x − share · Σ thr x ≤ 0
                rows.append((thr * inside - share * thr, -math.inf, 0.0))
    h = _highs()
    h.setOptionValue("mip_rel_gap", 0.0)
    h.setOptionValue("mip_abs_gap", 1e-9)
    h.setOptionValue("time_limit", float(time_limit))
    h.setOptionValue("threads", 1)
    lp = highspy.HighsLp()
    lp.num_col_ = n
    lp.num_row_ = len(rows)
    lp.col_cost_ = np.array([o.price_per_hour for o in offers], dtype=np.float64)
    lp.col_lower_ = np.zeros(n)
    lp.col_upper_ = np.array([float(_upper(o, req)) for o in offers])
    lp.row_lower_ = np.array([r[1] for r in rows])
    lp.row_upper_ = np.array([r[2] for r in rows])
    dense = np.vstack([r[0] for r in rows])
    lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
    starts: list[int] = [0]
    index: list[int] = []
    value: list[float] = []
    for row in dense:
        nz = np.nonzero(row)[0]
        index.extend(int(j) for j in nz)
        value.extend(float(row[j]) for j in nz)
        starts.append(len(index))
    lp.a_matrix_.start_ = np.array(starts, dtype=np.int32)
    lp.a_matrix_.index_ = np.array(index, dtype=np.int32)
    lp.a_matrix_.value_ = np.array(value, dtype=float)
    lp.a_matrix_.num_col_ = n
    lp.a_matrix_.num_row_ = len(rows)
    lp.integrality_ = [highspy.HighsVarType.kInteger] * n
    h.passModel(lp)
    h.run()
    status = h.getModelStatus()
    if status == highspy.HighsModelStatus.kInfeasible:
        return None
    if status != highspy.HighsModelStatus.kOptimal:
        raise PlanInfeasible(f"the solver stopped without a proven optimum: {h.modelStatusToString(status)}")
    return [round(v) for v in h.getSolution().col_value]


def cost(offers: Iterable[Offer], replicas: Iterable[int]) -> float:
    return sum(o.price_per_hour * x for o, x in zip(offers, replicas, strict=True))


def plan(offers: list[Offer], req: Requirements, *, time_limit: float = 60.0) -> Plan:
    """The cheapest plan meeting every requirement; raises :class:`PlanInfeasible` with the reasons."""
    validate(offers, req)
    offers = unique_pools(offers)
    replicas = _milp(offers, req, survive=True, time_limit=time_limit)
    if replicas is None:
        raise PlanInfeasible("no plan meets every requirement:\n  " + "\n  ".join(diagnose(offers, req)))
    result = Plan(offers, replicas, req, cost(offers, replicas))
    best: tuple[str, float] | None = None
    for provider in sorted({o.provider for o in offers}):
        mine = [o for o in offers if o.provider == provider]
        counts = _milp(mine, req, survive=False, time_limit=time_limit)
        if counts is not None and (best is None or cost(mine, counts) < best[1]):
            best = (provider, cost(mine, counts))
    result.single_provider = best
    anywhere = _milp(offers, req, survive=False, time_limit=time_limit)
    result.unconstrained_cost = None if anywhere is None else cost(offers, anywhere)
    return result


def diagnose(offers: list[Offer], req: Requirements) -> list[str]:
    """Why no plan exists: each requirement checked alone against the quotas, with the shortfall."""
    unit = "req/s" if req.unit == "requests" else "tok/s"
    reasons: list[str] = []

    def most(keep: Iterable[Offer]) -> float:
        total = 0.0
        for o in keep:
            if o.quota is None:
                return math.inf
            total += o.throughput * o.quota
        return total

    top = most(offers)
    if top < req.demand:
        reasons.append(
            f"with everything up the quotas allow at most {top:.1f} {unit}, "
            f"{req.demand - top:.1f} {unit} short of the peak {req.demand:.1f}"
        )
    need = req.survive_provider * req.demand
    for p in sorted({o.provider for o in offers}):
        left = most(o for o in offers if o.provider != p)
        if left < need:
            reasons.append(
                f"losing provider {p} leaves at most {left:.1f} {unit}, {need - left:.1f} {unit} short of "
                f"{req.survive_provider:.0%} of the peak ({need:.1f})"
            )
    if req.survive_region is not None:
        need_r = req.survive_region * req.demand
        for p, r in sorted({(o.provider, o.region) for o in offers}):
            left = most(o for o in offers if (o.provider, o.region) != (p, r))
            if left < need_r:
                reasons.append(
                    f"losing region {p}/{r} leaves at most {left:.1f} {unit}, "
                    f"{need_r - left:.1f} {unit} short "
                    f"of {req.survive_region:.0%} of the peak ({need_r:.1f})"
                )
    if req.max_provider_share is not None:
        providers = sorted({o.provider for o in offers})
        if len(providers) * req.max_provider_share < 1 - 1e-9:
            reasons.append(
                f"{len(providers)} providers at most {req.max_provider_share:.0%} each cannot make 100 % "
                f"of the capacity (need at least {math.ceil(1 / req.max_provider_share)} providers)"
            )
    if not reasons:
        reasons.append(
            "each requirement can be met alone, but not all together within the quotas "
            "(relax the spread rule, the survival fraction, or raise quotas)"
        )
    return reasons


# ---------------------------------------------------------------------------------------------- output


def unique_pools(offers: list[Offer]) -> list[Offer]:
    """Name each offer's pool uniquely within its provider/region (accelerator, then -2, -3, …)."""
    seen: dict[tuple[str, str, str], int] = {}
    out = []
    for offer in offers:
        key = (offer.provider, offer.region, offer.pool)
        seen[key] = seen.get(key, 0) + 1
        out.append(offer if seen[key] == 1 else replace(offer, name=f"{offer.pool}-{seen[key]}"))
    return out


#: The port of every pool's service (vLLM's), and its name in the Kubernetes Service launch-spec writes:
#: the EndpointSlices carry it by that name, which is what a planned ``kubernetes`` discovery asks for.
SERVICE_PORT = 8000
SERVICE_PORT_NAME = "http"


@dataclass(frozen=True, slots=True)
class DiscoveryPlan:
    """How the fleet file's pools learn their replicas (``skyfabric plan --discovery``).

    ``skypilot``: the READY replicas of the SkyServe service that launch-spec's SkyPilot YAML starts
    (``sky serve up … -n <service>``); ``kubernetes``: the ready pods behind the Service that launch-spec's
    manifests create, in ``namespace``, through ``kubeconfig`` (``context`` may name ``{provider}`` and
    ``{region}``: one cluster per provider) or in-cluster when no kubeconfig is given. Either way the
    gateway balances per replica instead of per service, and follows scaling without a restart.
    """

    kind: Literal["skypilot", "kubernetes"]
    namespace: str = "skyfabric"
    kubeconfig: str | None = None
    context: str | None = None
    interval: float = 5.0

    def block(self, offer: Offer) -> dict[str, Any]:
        """The pool's ``discovery`` mapping."""
        out: dict[str, Any] = {"kind": self.kind, "service": service_name(offer), "interval": self.interval}
        if self.kind == "kubernetes":
            out.update(namespace=self.namespace, port=SERVICE_PORT_NAME)
            if self.kubeconfig:
                out["kubeconfig"] = self.kubeconfig
                if self.context:
                    out["context"] = self.context.format(provider=offer.provider, region=offer.region)
        return out


def service_name(offer: Offer) -> str:
    """A DNS-safe name for the pool's service: sf-<provider>-<region>-<pool>."""
    raw = f"sf-{offer.provider}-{offer.region}-{offer.pool}".lower()
    return "".join(c if c.isalnum() or c == "-" else "-" for c in raw)[:63].rstrip("-")


def render_table(result: Plan) -> str:
    """The plan as text: replicas per offer, cost, capacity with each provider (and region) lost."""
    req = result.requirements
    unit = "req/s" if req.unit == "requests" else "tok/s"
    lines = [
        f"peak demand: {req.demand:,.1f} {unit}; "
        f"must keep {req.survive_provider:.0%} after losing any provider"
        + (f", {req.survive_region:.0%} after losing any region" if req.survive_region is not None else "")
        + (f"; no provider above {req.max_provider_share:.0%} of capacity" if req.max_provider_share else ""),
        "",
        f"{'provider':<10} {'region':<16} {'accelerator':<12} {'engine':<12} {'replicas':>8} {'quota':>6} "
        f"{'$/h':>10} {'capacity':>10}",
    ]
    for offer, count in zip(result.offers, result.replicas, strict=True):
        quota = "-" if offer.quota is None else str(offer.quota)
        lines.append(
            f"{offer.provider:<10} {offer.region:<16} {offer.accelerator:<12} {offer.engine:<12} {count:>8} "
            f"{quota:>6} {offer.price_per_hour * count:>10,.2f} {offer.throughput * count:>10,.1f}"
        )
    total = result.capacity()
    lines += [
        f"{'total':<58} {sum(result.replicas):>8} {'':>6} {result.cost_per_hour:>10,.2f} {total:>10,.1f}",
        "",
        "capacity with one provider lost:",
    ]
    for p in result.providers():
        left = result.capacity(without_provider=p)
        share = result.capacity() - left
        lines.append(
            f"  without {p:<10} {left:>10,.1f} {unit} = {left / req.demand:>6.1%} of peak "
            f"({p} carries {share / total if total else 0:.0%} of capacity)"
        )
    if req.survive_region is not None:
        lines.append("capacity with one region lost:")
        for r in result.regions():
            left = result.capacity(without_region=r)
            lines.append(f"  without {r:<24} {left:>10,.1f} {unit} = {left / req.demand:>6.1%} of peak")
    lines.append("")
    if result.single_provider is not None:
        name, single = result.single_provider
        extra = result.cost_per_hour - single
        lines.append(
            f"cheapest single-provider fleet: {name} at ${single:,.2f}/h; "
            f"this plan costs ${extra:,.2f}/h more "
            f"({extra / single:+.1%}) to survive the loss of any provider"
        )
    else:
        lines.append("no single provider can carry the peak alone")
    if result.unconstrained_cost is not None:
        lines.append(
            f"cheapest fleet with no loss constraint (any providers): ${result.unconstrained_cost:,.2f}/h"
        )
    return "\n".join(lines)


def retry_budget_percent(result: Plan) -> float:
    """The retry budget the fleet needs: more than the largest provider's share of the capacity.

    When a provider goes, every request in flight on it must be retried at once — a share of all active
    requests equal to that provider's share of the load. A budget below it (Envoy's default 20 %) turns
    the loss the plan was built to survive into 5xx for the requests that did not fit in the budget;
    ``skyfabric simulate`` shows exactly this. Five points of margin, never below the default 20.
    """
    total = result.capacity()
    if total <= 0:
        return 20.0
    largest = max(total - result.capacity(without_provider=p) for p in result.providers()) / total
    return float(min(100, max(20, math.ceil(100 * largest) + 5)))


def to_fleet(
    result: Plan, model: str, endpoint_template: str, discovery: DiscoveryPlan | None = None
) -> dict[str, Any]:
    """The fleet file (a mapping; dump as YAML) that serves the plan.

    Without ``discovery`` each pool is one URL, its service's (a SkyServe or Kubernetes Service load
    balancer in front of its replicas, as made by ``skyfabric launch-spec``), so ``capacity.concurrency``
    is the pool's whole concurrency: replicas × the profile's per-replica concurrency. With it, the pool
    has no static URL and learns one endpoint per replica from the service launch-spec names the same
    way; capacity and price are then per replica.
    """
    providers: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for offer, count in zip(result.offers, result.replicas, strict=True):
        if count == 0:
            continue
        url = endpoint_template.format(
            service=service_name(offer), provider=offer.provider, region=offer.region, pool=offer.pool
        )
        per = 1 if discovery is not None else count  # replicas behind one endpoint
        pool: dict[str, Any] = {
            "name": offer.pool,
            "accelerator": offer.accelerator,
            "engine": offer.engine,
            "model": model,
            "endpoints": [url] if discovery is None else [],
            "price_per_hour": round(offer.price_per_hour * per, 4),
            "capacity": {"concurrency": offer.concurrency * per},
        }
        if discovery is not None:
            pool["discovery"] = discovery.block(offer)
        providers.setdefault(offer.provider, {}).setdefault(offer.region, []).append(pool)
    return {
        "version": 1,
        "models": [{"name": model}],
        "providers": [
            {"name": p, "regions": [{"name": r, "pools": pools} for r, pools in regions.items()]}
            for p, regions in providers.items()
        ],
        "retry": {"max_attempts": 3, "budget_percent": retry_budget_percent(result)},
    }


def with_throughput(offers: list[Offer], values: list[float]) -> list[Offer]:
    """Copies of ``offers`` with other throughputs (tests, what-ifs)."""
    return [replace(o, throughput=v) for o, v in zip(offers, values, strict=True)]


def save_plan(result: Plan, model: str, path: Path) -> None:
    """Write the plan (the pools with replicas > 0, and the requirements) for launch-spec and simulate."""
    req = result.requirements
    data = {
        "model": model,
        "requirements": {
            "demand": req.demand,
            "unit": req.unit,
            "survive_provider": req.survive_provider,
            "survive_region": req.survive_region,
            "max_provider_share": req.max_provider_share,
        },
        "cost_per_hour": round(result.cost_per_hour, 4),
        "pools": [
            {
                "provider": o.provider,
                "region": o.region,
                "name": o.pool,
                "accelerator": o.accelerator,
                "engine": o.engine,
                "price_per_hour": o.price_per_hour,
                "throughput": o.throughput,
                "concurrency": o.concurrency,
                "replicas": count,
            }
            for o, count in zip(result.offers, result.replicas, strict=True)
            if count > 0
        ],
    }
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


def load_plan(path: Path) -> tuple[str, Plan]:
    """Read a plan written by :func:`save_plan`: (model, plan)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
        req = Requirements(**data["requirements"])
        offers, counts = [], []
        for raw in data["pools"]:
            raw = dict(raw)
            counts.append(int(raw.pop("replicas")))
            offers.append(Offer(**raw))
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a plan written by `skyfabric plan --plan-out`: {exc}") from None
    return str(data["model"]), Plan(offers, counts, req, cost(offers, counts))
