"""The continuation self-test: does a backend continue an answer from a prefix, or restart it?

A pool's ``continuation`` (or its engine kind) only *claims* that its backends go on from a final assistant
message. A backend that accepts the prefill and answers from the start anyway would make a client receive
the same text twice after a failover. So the claim is checked, per pool when the gateway starts and per
endpoint when it is readmitted after an ejection:

1. ask a short question greedily (``temperature: 0``, a few tokens) and keep the answer;
2. ask again with the first half of that answer (cut after a word, no trailing whitespace) as the final
   assistant message to continue;
3. it *continues* when prefix + continuation reads as the first answer (whitespace ignored, so a chat
   template that trims the prefix, or an engine that re-spaces, passes); it *restarts* when the
   continuation repeats the prefix (:func:`skyfabric.gateway.relay.restart_verdict`) or the backend refuses
   the prefill with a 4xx. Anything else (no answer, an error, a different answer) is inconclusive and
   leaves the pool's claim as it was.

The result replaces ``EndpointState.continues`` and is logged. Only claims are checked: a pool that says it
cannot continue is never sent a prefill. ``health.selftest: false`` turns the test off (it costs a few
tokens per pool at start and per readmission).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from skyfabric.core.errors import MalformedEvent, UpstreamError, UpstreamStatus
from skyfabric.gateway.balancer import EndpointState
from skyfabric.gateway.relay import normalized, restart_verdict
from skyfabric.gateway.router import Router
from skyfabric.protocols.base import UpstreamCall
from skyfabric.protocols.canonical import CanonicalRequest, Message, TextDelta
from skyfabric.protocols.progress import Part, Progress

log = logging.getLogger("skyfabric.gateway.selftest")

QUESTION = "Count from 1 to 30, separated by spaces."
#: Tokens of the first answer and of the continuation: enough to compare, cheap on any backend.
ANSWER_TOKENS = 8
CONTINUATION_TOKENS = 4


def _squeezed(text: str) -> str:
    return "".join(text.split())


def split_answer(answer: str) -> str | None:
    """The prefix to continue: the answer's first half, cut after a word; None if too short to test."""
    words = answer.split()
    if len(words) < 2:
        return None
    keep = len(words) // 2
    end, seen = 0, 0
    for i, ch in enumerate(answer):
        if not ch.isspace() and (i == 0 or answer[i - 1].isspace()):
            seen += 1
            if seen > keep:
                break
        end = i + 1
    return answer[:end].rstrip()


def judge(answer: str, prefix: str, continuation: str) -> bool | None:
    """True: ``continuation`` goes on from ``prefix``; False: it restarted; None: cannot tell."""
    joined, full = _squeezed(prefix + continuation), _squeezed(answer)
    if joined and (full.startswith(joined) or joined.startswith(full)):
        return True
    if restart_verdict(normalized(prefix), normalized(continuation), final=True):
        return False
    return None


async def _ask(router: Router, state: EndpointState, call: UpstreamCall, timeout: float) -> str:
    """The text of a short non-streamed answer."""
    deadline = router.clock() + timeout
    resp = await router.open(state, call, False, deadline)
    data = await resp.read(max(0.001, deadline - router.clock()))
    try:
        events = router.backend(state.endpoint).decode_response(data)
    except MalformedEvent:
        return ""
    return "".join(e.text for e in events if isinstance(e, TextDelta) and e.choice == 0)


async def continuation_selftest(router: Router, state: EndpointState) -> bool | None:
    """Whether ``state``'s backend continues a prefix (True), restarts or refuses it (False), or None."""
    timeout = min(router.timeouts.response, 10.0)
    backend = router.backend(state.endpoint)
    question = CanonicalRequest(
        protocol="skyfabric.selftest",
        model=state.endpoint.upstream_model,
        messages=[Message("user", [{"type": "text", "text": QUESTION}])],
        temperature=0,
        max_tokens=ANSWER_TOKENS,
    )
    try:
        answer = await _ask(router, state, backend.build(question, state.endpoint), timeout)
    except UpstreamError as exc:
        log.info("continuation self-test of %s: no answer (%s)", state.endpoint.id, exc)
        return None
    prefix = split_answer(answer)
    if prefix is None:
        return None
    progress = Progress(parts=[Part("text", prefix)])
    call = backend.continuation(
        replace(question, max_tokens=CONTINUATION_TOKENS), state.endpoint, progress, 0
    )
    if call is None:
        return None
    try:
        continuation = await _ask(router, state, call, timeout)
    except UpstreamStatus as exc:
        if router.classify(state, exc) == "client":
            return False  # refuses a prefill
        return None
    except UpstreamError:
        return None
    return judge(answer, prefix, continuation)


def apply(states: Iterable[EndpointState], result: bool | None, tested: EndpointState) -> None:
    """Set what the test found on ``states`` (the pool's endpoints) and say so in the log."""
    claim = tested.endpoint.can_continue
    for state in states:
        state.continues = claim if result is None else result
    pool = "/".join(tested.endpoint.id.split("/")[:3])
    if result is None:
        log.warning("continuation self-test of %s inconclusive: keeping continuation=%s", pool, claim)
    elif result:
        log.info("continuation self-test of %s: continues from a prefix", pool)
    else:
        log.warning("continuation self-test of %s failed (restarts or refuses a prefix): not used", pool)


class SelfTests:
    """The self-tests of one gateway process: at start (per pool) and after each readmission."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.tasks: set[asyncio.Task[None]] = set()

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def start(self) -> None:
        """Test one endpoint of every pool that claims it can continue, in the background."""
        pools: dict[str, list[EndpointState]] = {}
        for state in self.router.states.values():
            if state.endpoint.can_continue:
                pools.setdefault("/".join(state.endpoint.id.split("/")[:3]), []).append(state)
        for states in pools.values():
            self._spawn(self._test(states[0], states))

    def after_readmission(self, state: EndpointState) -> None:
        """An endpoint is back after an ejection: test it again before it continues any stream."""
        if state.endpoint.can_continue:
            state.continues = False  # until the test says otherwise
            self._spawn(self._test(state, [state]))

    async def _test(self, tested: EndpointState, states: list[EndpointState]) -> None:
        result = await continuation_selftest(self.router, tested)
        apply(states, result, tested)

    async def wait(self) -> None:
        """Until every test begun so far has finished (for tests and orderly shutdown)."""
        while self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)

    async def close(self) -> None:
        """Cancel the tests still running."""
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
