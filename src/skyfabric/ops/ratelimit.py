"""A key's limits as a state machine: plain functions of the current time, and the in-process store.

Four limits, checked together and committed only when all pass (an admission refused by one charges none):

- **requests per minute** — GCRA (the generic cell rate algorithm): one number per key, the theoretical
  arrival time ``tat``. Each request moves it ``60 / rpm`` seconds on; a request is admitted while ``tat``
  stays within a minute of now. A full minute's worth may come at once, then one every ``60 / rpm``.
- **tokens per minute** — the same with a cost: a request reserves its prompt estimate plus its
  ``max_tokens`` at admission and is settled with the real usage when it ends (``tat`` moves back for
  what it did not use, on for what it used beyond). So a key overshoots by at most the one request whose
  usage ran past its reservation.
- **budget** — micro-USD spent in the current period (UTC day or month), reserved and settled the same way.
- **concurrency** — leases with an expiry; a lease is renewed while its request runs, so the slots of an
  instance that crashed come free by themselves.

:class:`LocalLimits` keeps this state in a dict (one instance, no Redis; or an instance whose Redis is
down). ``redislimits.py`` runs the same algorithm as Lua scripts in Redis, shared by every instance.
"""

from __future__ import annotations

import calendar
import math
import time
from dataclasses import dataclass, field

#: The window every per-minute limit is measured over (seconds).
WINDOW = 60.0
_EPS = 1e-6

#: Why an admission was refused (0: admitted).
OK, RPM, TPM, BUDGET, CONCURRENCY = 0, 1, 2, 3, 4


@dataclass(slots=True)
class Ask:
    """One admission: a key's limits (0 / -1: none) and what the request would take."""

    key: str
    rpm: int = 0
    tpm: int = 0
    #: Tokens reserved: the prompt's estimate plus the completion's cap.
    tokens: int = 0
    #: Micro-USD per period; -1: no budget.
    budget: int = -1
    #: Micro-USD reserved.
    cost: int = 0
    #: The budget period's id (``2026-12`` / ``2026-12-01``) and its end (wall clock).
    period: str = ""
    period_end: float = 0.0
    max_concurrent: int = 0
    lease: str = ""
    lease_ttl: float = 15.0


@dataclass(slots=True)
class Verdict:
    """What the limits said: the reason (``OK`` or which limit) and the figures the headers report."""

    reason: int
    #: Seconds until the refused request could be admitted (0 when admitted).
    retry_after: float = 0.0
    #: Seconds until the request and token allowances are whole again.
    requests_reset: float = 0.0
    tokens_reset: float = 0.0
    #: Micro-USD spent in the period, this request's reservation included when admitted.
    spent: int = 0

    @property
    def admitted(self) -> bool:
        return self.reason == OK


def remaining(limit: int, reset: float) -> int:
    """What is left of a per-minute ``limit`` whose allowance is whole again in ``reset`` seconds."""
    if limit <= 0:
        return 0
    return max(0, math.floor((WINDOW - reset) * limit / WINDOW + _EPS))


def gcra(tat: float, now: float, cost: float, limit: int) -> tuple[bool, float]:
    """``cost`` units of ``limit`` a minute: (admitted, the new ``tat``) or (refused, the wait)."""
    new = max(tat, now) + cost * WINDOW / limit
    if new - now > WINDOW + _EPS:
        return False, new - WINDOW - now
    return True, new


def period_of(wall: float, period: str) -> tuple[str, float]:
    """The budget period holding wall-clock time ``wall``: its id and when it ends (UTC)."""
    t = time.gmtime(wall)
    if period == "day":
        start = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0))
        return f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}", float(start + 86400)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return f"{t.tm_year:04d}-{t.tm_mon:02d}", float(calendar.timegm((year, month, 1, 0, 0, 0)))


@dataclass
class KeyState:
    """The in-process state of one key."""

    rpm_tat: float = 0.0
    tpm_tat: float = 0.0
    spent: dict[str, int] = field(default_factory=dict)
    leases: dict[str, float] = field(default_factory=dict)


def admit(state: KeyState, ask: Ask, now: float, wall: float) -> Verdict:
    """Admit ``ask`` against ``state`` at ``now`` (monotonic) — all limits or none are charged."""
    rpm_new = tpm_new = now
    if ask.rpm > 0:
        ok, rpm_new = gcra(state.rpm_tat, now, 1, ask.rpm)
        if not ok:
            return Verdict(RPM, rpm_new, max(0.0, state.rpm_tat - now), max(0.0, state.tpm_tat - now))
    if ask.tpm > 0:
        ok, tpm_new = gcra(state.tpm_tat, now, ask.tokens, ask.tpm)
        if not ok:
            return Verdict(TPM, tpm_new, max(0.0, state.rpm_tat - now), max(0.0, state.tpm_tat - now))
    spent = state.spent.get(ask.period, 0)
    if ask.budget >= 0 and spent + ask.cost > ask.budget:
        return Verdict(BUDGET, max(1.0, ask.period_end - wall), 0.0, 0.0, spent)
    if ask.max_concurrent > 0:
        if len(state.leases) >= ask.max_concurrent:  # only then can expired leases matter: sweep them
            for lease, expiry in list(state.leases.items()):
                if expiry <= now:
                    del state.leases[lease]
        if len(state.leases) >= ask.max_concurrent:
            return Verdict(CONCURRENCY, 1.0, max(0.0, state.rpm_tat - now), max(0.0, state.tpm_tat - now))
        state.leases[ask.lease] = now + ask.lease_ttl
    if ask.rpm > 0:
        state.rpm_tat = rpm_new
    if ask.tpm > 0:
        state.tpm_tat = tpm_new
    if ask.budget >= 0:
        if ask.period not in state.spent:
            state.spent = {ask.period: 0}  # a new period: the old ones are over
        state.spent[ask.period] = spent + ask.cost
    return Verdict(OK, 0.0, rpm_new - now, tpm_new - now, spent + ask.cost)


def settle(state: KeyState, ask: Ask, tokens: int, cost: int, now: float) -> None:
    """Replace ``ask``'s reservation by what the request really used, and free its concurrency slot."""
    if ask.tpm > 0 and tokens != ask.tokens:
        state.tpm_tat = max(now, state.tpm_tat + (tokens - ask.tokens) * WINDOW / ask.tpm)
    if ask.budget >= 0 and cost != ask.cost and ask.period in state.spent:
        state.spent[ask.period] = max(0, state.spent[ask.period] + cost - ask.cost)
    if ask.lease:
        state.leases.pop(ask.lease, None)


def renew(state: KeyState, lease: str, now: float, ttl: float) -> None:
    """Push a running request's slot's expiry on."""
    if lease in state.leases:
        state.leases[lease] = now + ttl


class LocalLimits:
    """Every key's state in this process: one instance alone, or an instance cut off from Redis."""

    def __init__(self) -> None:
        self.keys: dict[str, KeyState] = {}

    def admit(self, ask: Ask, now: float, wall: float) -> Verdict:
        state = self.keys.get(ask.key)
        if state is None:
            state = self.keys[ask.key] = KeyState()
        return admit(state, ask, now, wall)

    def settle(self, ask: Ask, tokens: int, cost: int, now: float) -> None:
        state = self.keys.get(ask.key)
        if state is not None:
            settle(state, ask, tokens, cost, now)

    def renew(self, ask: Ask, now: float) -> None:
        state = self.keys.get(ask.key)
        if state is not None:
            renew(state, ask.lease, now, ask.lease_ttl)
