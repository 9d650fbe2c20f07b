"""Scenario files: a workload, a timeline of faults, and the SLO the run must meet.

Times in a timeline may be seconds (``15``) or shares of the drill's duration (``"25%"``), so one scenario
file serves a 10-second CI run and a 10-minute rehearsal alike (``--duration``). Scenarios are found by
path, or by name in ``./drills/`` and then among the built-ins shipped with the package.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from skyfabric.core.errors import ConfigError
from skyfabric.drills.faultproxy import FaultMode

#: Seconds, or a string like ``"25%"`` (of the drill's duration).
Offset = float | Annotated[str, Field(pattern=r"^\s*\d+(\.\d+)?\s*%\s*$")]

FaultKind = Literal["blackhole", "refuse", "latency", "errors", "throttle", "cut"]
Scope = Literal["fleet", "provider", "region", "pool", "endpoint"]


def offset_seconds(value: float | str, duration: float) -> float:
    """Seconds from the start of the drill for an :data:`Offset`."""
    if isinstance(value, str):
        return float(value.strip().rstrip("%")) / 100.0 * duration
    return float(value)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class TokenRange(_Strict):
    """Uniform token counts between ``min`` and ``max`` (inclusive)."""

    min: int = Field(ge=1)
    max: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> TokenRange:
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) is below min ({self.min})")
        return self


class Workload(_Strict):
    """What clients send: arrivals, sizes, the streaming share, and how long a client waits."""

    kind: Literal["poisson", "bursty", "closed", "trace"] = "poisson"
    rate: float = Field(4.0, gt=0, description="poisson/bursty: mean requests per second")
    burst_factor: float = Field(4.0, ge=1, description="bursty: rate during a burst ÷ mean rate")
    burst_on: float = Field(2.0, gt=0, description="bursty: seconds of each burst")
    burst_off: float = Field(6.0, gt=0, description="bursty: seconds between bursts")
    users: int = Field(8, ge=1, le=1024, description="closed: concurrent users")
    think_time: float = Field(0.5, ge=0, description="closed: mean seconds between a user's requests")
    trace: str | None = Field(None, description="trace: CSV path (default: the shipped Azure trace slice)")
    trace_start: float = Field(0.0, ge=0, description="trace: seconds into the trace to start at")
    prompt_tokens: TokenRange = TokenRange(min=16, max=96)
    output_tokens: TokenRange = TokenRange(min=16, max=48)
    prompt_scale: float = Field(0.1, gt=0, description="trace: prompt tokens × this before clamping")
    output_scale: float = Field(0.25, gt=0, description="trace: output tokens × this before clamping")
    stream_fraction: float = Field(0.8, ge=0, le=1)
    request_timeout: float = Field(60.0, gt=0, description="seconds a client waits for a whole answer")
    max_in_flight: int = Field(256, ge=1, description="open loop: arrivals beyond this are dropped")


class Target(_Strict):
    """The failure domain a fault hits. Names left out are filled from ``--provider``/``--region``, or
    with the fleet's first provider / region / pool, down to the ``scope``; ``fleet`` is every endpoint
    (the gateway cut off from all its backends at once)."""

    scope: Scope = "provider"
    provider: str | None = None
    region: str | None = None
    pool: str | None = None
    index: int | None = Field(None, ge=0)


class Flap(_Strict):
    """Within the fault's window, alternate ``down`` seconds faulted and ``up`` seconds healthy."""

    down: Offset
    up: Offset


class Fault(_Strict):
    """One entry of the timeline."""

    name: str | None = None
    kind: FaultKind
    at: Offset
    duration: Offset = Field(alias="for")
    target: Target = Target()
    flap: Flap | None = None
    factor: float = Field(10.0, ge=1, description="latency: answers arrive this many times later")
    add: float = Field(0.0, ge=0, description="latency: plus this many seconds")
    rate: float | None = Field(
        None, ge=0, le=1, description="errors/throttle/cut: share of requests hit (default 0.2/1/1)"
    )
    statuses: list[int] = Field(default_factory=lambda: [500, 503])
    retry_after: float | None = Field(None, ge=0, description="throttle: Retry-After seconds (none: omitted)")
    after_events: int | None = Field(None, ge=0, description="cut: SSE events relayed before the cut")
    after_bytes: int | None = Field(None, ge=0, description="cut: body bytes relayed before the cut")

    @field_validator("statuses")
    @classmethod
    def _statuses(cls, value: list[int]) -> list[int]:
        if not value or any(not 400 <= s <= 599 for s in value):
            raise ValueError("statuses must be a non-empty list of HTTP error codes (400-599)")
        return value

    def mode(self) -> FaultMode:
        """The proxy mode this fault sets while it is on."""
        if self.kind == "blackhole":
            return FaultMode(blackhole=True)
        if self.kind == "refuse":
            return FaultMode(refuse=True)
        if self.kind == "latency":
            return FaultMode(latency_factor=self.factor, latency_add=self.add)
        if self.kind == "errors":
            rate = 0.2 if self.rate is None else self.rate
            return FaultMode(error_rate=rate, error_statuses=tuple(self.statuses))
        rate = 1.0 if self.rate is None else self.rate
        if self.kind == "throttle":
            return FaultMode(throttle_rate=rate, retry_after=self.retry_after)
        events = self.after_events if self.after_events is not None or self.after_bytes is not None else 5
        return FaultMode(cut_rate=rate, cut_after_events=events, cut_after_bytes=self.after_bytes)

    def label(self) -> str:
        """The name used for the fault's phases in the report."""
        return self.name or self.kind


class Slo(_Strict):
    """Thresholds the run must meet; a threshold left out is not checked."""

    success_rate: float | None = Field(99.5, ge=0, le=100, description="% of requests answered completely")
    truncated: int | None = Field(0, ge=0, description="most silently truncated answers allowed")
    ttft_p95_during: float | None = Field(None, gt=0, description="s: p95 TTFT of streams started in a fault")
    ttft_p95_after: float | None = Field(None, gt=0, description="s: p95 TTFT of streams after faults")
    latency_p99: float | None = Field(None, gt=0, description="s: p99 total latency, whole run")
    detection: float | None = Field(None, gt=0, description="s: longest detection time of any fault")
    recovery: float | None = Field(None, gt=0, description="s: longest time to recover after any fault")


class Scenario(_Strict):
    """A whole scenario file."""

    name: str
    description: str = ""
    duration: float = Field(60.0, gt=0, description="seconds of workload (--duration overrides)")
    model: str | None = Field(None, description="model clients ask for (default: the fleet's first)")
    warmup: int = Field(1, ge=0, description="requests sent to each endpoint before the drill starts")
    drain: float = Field(30.0, ge=0, description="seconds to wait for answers in flight after the workload")
    workload: Workload = Workload()
    faults: list[Fault] = Field(default_factory=list)
    slo: Slo = Slo()


def scenario_dir() -> Path:
    """Where the built-in scenarios live (package data; ``drills/`` at the repo root links here)."""
    return Path(str(resources.files("skyfabric.drills") / "scenarios"))


def builtin_scenarios() -> list[str]:
    """Names of the scenarios shipped with skyfabric."""
    return sorted(p.stem for p in scenario_dir().glob("*.yaml"))


def find_scenario(name: str) -> Path:
    """A scenario file by path, or by name in ``./drills/`` and then among the built-ins."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if path.is_file():
            return path
        raise ConfigError(f"{name}: no such scenario file")
    for folder in (Path.cwd() / "drills", scenario_dir()):
        for suffix in (".yaml", ".yml"):
            candidate = folder / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    raise ConfigError(f"no scenario named {name!r}; built-in ones: {', '.join(builtin_scenarios())}")


def load_scenario(name: str) -> Scenario:
    """Find, read and validate a scenario; errors name the file and the field."""
    path = find_scenario(name)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read scenario: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with `name`, `workload`, `faults` and `slo`")
    data.setdefault("name", path.stem)
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"{path}: {where}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None
