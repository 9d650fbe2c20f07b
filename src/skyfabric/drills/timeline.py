"""A scenario's faults placed on a fleet: which endpoints each one hits, and when.

Targets name failure domains (a provider, a region, a pool, one endpoint); they are resolved here against
the fleet's endpoints, with ``--provider``/``--region`` filling in or narrowing them, so one scenario file
works on any fleet. Errors list what the fleet does have, because a drill that faults nothing would
"pass" for the wrong reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from skyfabric.core.endpoints import Endpoint
from skyfabric.core.errors import ConfigError
from skyfabric.drills.faultproxy import PASS, FaultMode
from skyfabric.drills.scenario import Scenario, Target, offset_seconds


@dataclass(frozen=True, slots=True)
class FaultSpan:
    """One fault of the timeline on the fleet: its whole window, and the sub-windows it is on (flaps)."""

    group: int
    label: str
    kind: str
    target: str
    start: float
    end: float
    mode: FaultMode
    endpoints: tuple[str, ...]
    windows: tuple[tuple[float, float], ...]
    note: str = ""

    def active(self, t: float) -> bool:
        """Whether the fault is on at ``t``."""
        return any(a <= t < b for a, b in self.windows)


def resolve_target(
    target: Target, endpoints: list[Endpoint], *, provider: str | None = None, region: str | None = None
) -> tuple[str, list[Endpoint], str]:
    """The target's name (``aws/us-east-1``), its endpoints, and a note when it is a whole provider."""
    providers = list(dict.fromkeys(e.provider for e in endpoints))
    if target.scope == "fleet":
        return "every provider", list(endpoints), ""
    want_provider = provider or target.provider
    want_region = region or target.region
    if want_provider is None and want_region is not None:
        having = list(dict.fromkeys(e.provider for e in endpoints if e.region == want_region))
        if len(having) != 1:
            regions = sorted({f"{e.provider}/{e.region}" for e in endpoints})
            raise ConfigError(
                f"region {want_region!r} is in {len(having)} providers of the fleet; name one with "
                f"--provider (regions: {', '.join(regions)})"
            )
        want_provider = having[0]
    if want_provider is None:
        want_provider = providers[0]
    if want_provider not in providers:
        raise ConfigError(f"no provider {want_provider!r} in the fleet (providers: {', '.join(providers)})")
    chosen = [e for e in endpoints if e.provider == want_provider]
    scope = target.scope
    if want_region is None and scope in ("region", "pool", "endpoint"):
        want_region = chosen[0].region
    if want_region is not None:
        regions = list(dict.fromkeys(e.region for e in chosen))
        if want_region not in regions:
            raise ConfigError(
                f"provider {want_provider!r} has no region {want_region!r} (regions: {', '.join(regions)})"
            )
        chosen = [e for e in chosen if e.region == want_region]
    pool = target.pool or (chosen[0].pool if scope in ("pool", "endpoint") else None)
    if pool is not None:
        if pool not in {e.pool for e in chosen}:
            raise ConfigError(f"no pool {pool!r} in {want_provider}/{want_region}")
        chosen = [e for e in chosen if e.pool == pool]
    index = target.index if target.index is not None else (0 if scope == "endpoint" else None)
    if index is not None:
        chosen = [e for e in chosen if e.index == index]
        if not chosen:
            raise ConfigError(f"no endpoint #{index} in {want_provider}/{want_region}/{pool}")
    name = "/".join(x for x in (want_provider, want_region, pool, None if index is None else str(index)) if x)
    note = ""
    whole = [e for e in endpoints if e.provider == want_provider]
    if want_region is not None and len(chosen) == len(whole) and scope != "provider":
        note = f"{name} is every endpoint of provider {want_provider} in this fleet"
    return name, chosen, note


def build_timeline(
    scenario: Scenario,
    endpoints: list[Endpoint],
    *,
    duration: float,
    provider: str | None = None,
    region: str | None = None,
) -> list[FaultSpan]:
    """Every fault of the scenario, placed in time (seconds from the drill's start) and on endpoints."""
    spans: list[FaultSpan] = []
    seen: dict[str, int] = {}
    for group, fault in enumerate(scenario.faults):
        name, hit, note = resolve_target(fault.target, endpoints, provider=provider, region=region)
        start = offset_seconds(fault.at, duration)
        end = min(duration, start + offset_seconds(fault.duration, duration))
        if end <= start:
            raise ConfigError(
                f"fault #{group + 1} ({fault.label()}) starts at {start:g}s, after the drill ends"
            )
        windows: list[tuple[float, float]] = []
        if fault.flap is None:
            windows.append((start, end))
        else:
            down = offset_seconds(fault.flap.down, duration)
            up = offset_seconds(fault.flap.up, duration)
            if down <= 0 or up <= 0:
                raise ConfigError(f"fault #{group + 1} ({fault.label()}): flap down and up must be positive")
            t = start
            while t < end:
                windows.append((t, min(end, t + down)))
                t += down + up
        label = f"{fault.label()} {name}"
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            label += f" #{seen[label]}"
        spans.append(
            FaultSpan(
                group=group,
                label=label,
                kind=fault.mode().describe() + (" (flapping)" if fault.flap else ""),
                target=name,
                start=start,
                end=end,
                mode=fault.mode(),
                endpoints=tuple(e.id for e in hit),
                windows=tuple(windows),
                note=note,
            )
        )
    return spans


def modes_at(spans: list[FaultSpan], t: float, endpoint_ids: list[str]) -> dict[str, FaultMode]:
    """Each endpoint's proxy mode at ``t``: the combination of every fault on at that moment."""
    modes = {eid: PASS for eid in endpoint_ids}
    for span in spans:
        if span.active(t):
            for eid in span.endpoints:
                modes[eid] = modes[eid].combine(span.mode)
    return modes


def change_points(spans: list[FaultSpan]) -> list[float]:
    """Times at which some proxy's mode may change, in order."""
    return sorted({t for span in spans for window in span.windows for t in window})
