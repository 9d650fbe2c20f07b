"""The limits' state machine, with a fake clock: GCRA for requests, reservations for tokens and budget."""

from __future__ import annotations

import calendar

from skyfabric.ops.limiter import duration, limit_headers
from skyfabric.ops.ratelimit import (
    BUDGET,
    CONCURRENCY,
    OK,
    RPM,
    TPM,
    Ask,
    KeyState,
    admit,
    period_of,
    remaining,
    settle,
)

WALL = calendar.timegm((2026, 12, 31, 23, 0, 0))


def test_a_full_minute_of_requests_at_once_then_one_per_interval() -> None:
    state, ask = KeyState(), Ask("k", rpm=60)
    admitted = sum(admit(state, ask, 100.0, WALL).admitted for _ in range(100))
    assert admitted == 60
    refused = admit(state, ask, 100.0, WALL)
    assert refused.reason == RPM and abs(refused.retry_after - 1.0) < 1e-6
    assert not admit(state, ask, 100.99, WALL).admitted
    assert admit(state, ask, 101.0, WALL).admitted  # one more each second
    assert not admit(state, ask, 101.0, WALL).admitted
    # A minute later the allowance is whole again: 60 more, not 120.
    assert sum(admit(state, ask, 200.0, WALL).admitted for _ in range(100)) == 60


def test_tokens_are_reserved_then_settled_by_the_real_usage() -> None:
    state = KeyState()
    big = Ask("k", tpm=1000, tokens=600)
    first = admit(state, big, 0.0, WALL)
    assert first.admitted and remaining(1000, first.tokens_reset) == 400
    assert admit(state, big, 0.0, WALL).reason == TPM  # 600 more do not fit in the 400 left
    settle(state, big, 100, 0, 0.0)  # it used 100 of its 600
    second = admit(state, big, 0.0, WALL)
    assert second.admitted and remaining(1000, second.tokens_reset) == 300
    # Used more than reserved: the key goes into debt, and waits it out.
    settle(state, big, 1600, 0, 0.0)
    refused = admit(state, Ask("k", tpm=1000, tokens=1), 0.0, WALL)
    assert refused.reason == TPM and refused.retry_after > 0


def test_a_refused_admission_charges_no_limit() -> None:
    state = KeyState()
    assert admit(state, Ask("k", rpm=10, tpm=100, tokens=100), 0.0, WALL).admitted
    before = (state.rpm_tat, state.tpm_tat)
    assert admit(state, Ask("k", rpm=10, tpm=100, tokens=100), 0.0, WALL).reason == TPM
    assert (state.rpm_tat, state.tpm_tat) == before


def test_budget_stops_at_its_limit_and_a_new_period_starts_from_zero() -> None:
    period, end = period_of(WALL, "day")
    assert period == "2026-12-31" and end == calendar.timegm((2027, 1, 1, 0, 0, 0))
    assert period_of(WALL, "month") == ("2026-12", float(calendar.timegm((2027, 1, 1, 0, 0, 0))))
    state = KeyState()
    ask = Ask("k", budget=1000, cost=300, period=period, period_end=end)
    assert [admit(state, ask, 0.0, WALL).reason for _ in range(4)] == [OK, OK, OK, BUDGET]
    for _ in range(3):
        settle(state, ask, 0, 100, 0.0)  # each really cost 100
    assert state.spent[period] == 300
    refused = Ask("k", budget=1000, cost=800, period=period, period_end=end)
    verdict = admit(state, refused, 0.0, WALL)
    assert verdict.reason == BUDGET and verdict.retry_after == end - WALL
    tomorrow, _ = period_of(end + 1, "day")
    assert admit(state, Ask("k", budget=1000, cost=800, period=tomorrow), 0.0, end + 1).admitted


def test_concurrency_slots_are_freed_by_settling_or_by_their_lease_running_out() -> None:
    state = KeyState()
    asks = [Ask("k", max_concurrent=2, lease=f"l{i}", lease_ttl=15) for i in range(3)]
    assert [admit(state, a, 0.0, WALL).reason for a in asks] == [OK, OK, CONCURRENCY]
    settle(state, asks[0], 0, 0, 1.0)
    assert admit(state, asks[2], 1.0, WALL).admitted
    # An instance that crashed never settles: its slots come free when the lease expires.
    fresh = Ask("k", max_concurrent=2, lease="l9", lease_ttl=15)
    assert not admit(state, fresh, 14.9, WALL).admitted  # l1 (taken at 0) and l2 (at 1) still held
    assert admit(state, fresh, 15.01, WALL).admitted  # l1's lease ran out


def test_headers_in_openai_and_anthropic_form() -> None:
    state, ask = KeyState(), Ask("k", rpm=60, tpm=1000, tokens=100)
    verdict = admit(state, ask, 0.0, WALL)
    openai = dict(limit_headers(ask, verdict, False, WALL))
    assert openai[b"x-ratelimit-limit-requests"] == b"60"
    assert openai[b"x-ratelimit-remaining-requests"] == b"59"
    assert openai[b"x-ratelimit-reset-requests"] == b"1s"
    assert openai[b"x-ratelimit-remaining-tokens"] == b"900"
    assert openai[b"x-ratelimit-reset-tokens"] == b"6s"
    anthropic = dict(limit_headers(ask, verdict, True, WALL))
    assert anthropic[b"anthropic-ratelimit-requests-limit"] == b"60"
    assert anthropic[b"anthropic-ratelimit-tokens-remaining"] == b"900"
    assert anthropic[b"anthropic-ratelimit-requests-reset"] == b"2026-12-31T23:00:01Z"
    assert [duration(x) for x in (0.02, 1.5, 360.0)] == ["20ms", "1.5s", "6m0s"]
