"""Every counter a request takes must be back to zero once it has ended, however it ended.

A request takes: an admission slot (``Admission.gates[model].inflight``), a place in the retry budget
(``RetryBudget.active_requests`` / ``active_retries``), and, per attempt, ``EndpointState.outstanding``,
``.streaming`` once its stream is committed, and its upstream connection in ``EndpointState.inflight``.
"""

from __future__ import annotations

import asyncio
import time

from skyfabric.gateway.proxy import Proxy


def held(proxy: Proxy) -> list[str]:
    """What is still held, one line per counter that is not zero (empty when everything is released)."""
    out: list[str] = []
    for key, state in proxy.states.items():
        if state.outstanding:
            out.append(f"{key}: outstanding={state.outstanding}")
        if state.streaming:
            out.append(f"{key}: streaming={state.streaming}")
        if state.inflight:
            out.append(f"{key}: {len(state.inflight)} upstream connection(s) still tracked in flight")
    for model, gate in proxy.admission.gates.items():
        if gate.inflight:
            out.append(f"admission {model}: {gate.inflight} slot(s) taken")
        if gate.queue:
            out.append(f"admission {model}: {len(gate.queue)} waiter(s) queued")
    if proxy.budget.active_requests:
        out.append(f"retry budget: active_requests={proxy.budget.active_requests}")
    if proxy.budget.active_retries:
        out.append(f"retry budget: active_retries={proxy.budget.active_retries}")
    return out


async def assert_released(proxy: Proxy, within: float = 1.0) -> None:
    """Assert that every counter returns to zero within ``within`` seconds.

    Releases run when the relay's generator or the client's connection closes — a moment after the client
    has seen the end — so this polls; it fails with the list of what is still held.
    """
    deadline = time.monotonic() + within
    while True:
        left = held(proxy)
        if not left or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.01)
    assert not left, "still held after the request ended: " + "; ".join(left)
