"""Replicas that share a host's cores: the embedded fleet's CPU replicas, stepped like the real batcher.

A planned fleet's replicas are accelerators of their own: one's load never slows another (that is
``fleetsim.Replica``). The embedded fleet is not: its replicas are processes on one machine, each a
one-thread batching core, so three of them on two cores each get 2/3 of a core while all three are busy
and a whole one when one of them is idle or lost. :class:`Host` is that machine — processor sharing:
while ``busy`` replicas (plus ``background`` other runnable threads: the gateway, the load client,
other jobs — measured during a live drill by ``sim/hostload.py``) step on ``cores`` cores, a step
takes ``max(1, (busy + background) / cores)`` times its CPU time.

:class:`SteppedReplica` is the embedded engine's continuous batcher (``engine/batcher.py``), step by step
instead of by formula: each step decodes one token for every running sequence and prefills what the
step allows (up to ``max_num_batched_tokens`` when nothing decodes; while sequences decode, about
``prefill_share`` of the decode pass's time — at least the work of ``MIN_PREFILL_TOKENS`` tokens — as the
batcher's chunked prefill does); a sequence's first token comes at the end of the step that finishes its
prompt, each later token at the end of a decode step. A step's CPU time comes from the
:class:`StepProfile` measured on the real replica, engine core and HTTP frontend together
(``bench/replica_steps.py --http --write`` → ``sim/embedded_steps.yaml``); its duration is that times the
host's sharing factor when it starts. Simplified, stated: the profile's fixed prefill cost (per request
over HTTP) is charged once per prefilling step, and a step's sharing factor is fixed when it starts.

It has the same surface as ``fleetsim.Replica`` (``submit``, ``abandon``, ``fail``, ``fail_all``,
``freeze``, ``running``, ``waiting``, ``up``), so the transport and the gateway cannot tell them apart.
A blackholed replica keeps computing (the real one does: only its network is cut) but nothing it makes
reaches the gateway; it frees its slots as its sequences finish or the gateway aborts them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from skyfabric.core.errors import ConfigError, RemoteProtocolError
from skyfabric.sim.streams import CHUNK_TOKENS

#: The embedded replica's measured profile (``bench/replica_steps.py --write``).
EMBEDDED_STEPS = Path(__file__).parent / "embedded_steps.yaml"

#: The embedded batcher's knobs (``engine/batcher.py``, ``engine/core_process.py``).
MAX_NUM_BATCHED_TOKENS = 512
PREFILL_SHARE = 0.75
MIN_PREFILL_TOKENS = 32


@dataclass(frozen=True, slots=True)
class StepProfile:
    """CPU seconds of one batching step on a core of its own: prefill p0 + p1·tokens, decode d0 + d1·batch."""

    prefill_fixed_s: float
    prefill_per_token_s: float
    decode_fixed_s: float
    decode_per_sequence_s: float
    slots: int = 16
    source: str = ""

    def decode_s(self, batch: int) -> float:
        return self.decode_fixed_s + self.decode_per_sequence_s * batch if batch else 0.0

    def prefill_s(self, tokens: int) -> float:
        return self.prefill_fixed_s + self.prefill_per_token_s * tokens if tokens else 0.0


def load_step_profile(path: Path = EMBEDDED_STEPS) -> StepProfile:
    """The step profile in ``path`` (default: the shipped measurement of the embedded engine)."""
    try:
        data = yaml.safe_load(path.read_text())
        return StepProfile(**{k: data[k] for k in data if k in StepProfile.__dataclass_fields__})
    except (OSError, yaml.YAMLError, TypeError) as exc:
        raise ConfigError(f"{path}: cannot read the step profile: {exc}") from None


@dataclass(slots=True)
class Host:
    """A machine whose ``cores`` its replicas share (processor sharing), with ``background`` cores busy."""

    name: str
    cores: float
    background: float = 0.0
    busy: int = 0  # replicas with a step under way

    def factor(self) -> float:
        """How much longer than its CPU time a step takes now."""
        return max(1.0, (self.busy + self.background) / self.cores)


@dataclass(slots=True)
class _Seq:
    req: Any  # fleetsim.SimRequest (first_token is set here)
    future: asyncio.Future[None]
    stream: Any  # streams.SimStream | None
    prefill_left: int
    tokens: int  # tokens to generate
    made: int = 0


class SteppedReplica:
    """One embedded replica on a :class:`Host`: the batcher's steps, timed by a :class:`StepProfile`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, host: Host, profile: StepProfile, slots: int) -> None:
        self.loop = loop
        self.host = host
        self.profile = profile
        self.slots = max(1, slots)
        self.running: list[_Seq] = []  # in a slot: prefilling (prefill_left > 0) or decoding
        self.waiting: list[_Seq] = []
        self.limbo: list[_Seq] = []  # finished while blackholed: the gateway may still abort them
        self.up = True
        self.frozen = False
        self.stepping = False
        self.steps = 0

    def submit(self, req: Any, stream: Any = None) -> asyncio.Future[None]:
        tokens = req.output_tokens if stream is None else stream.tokens
        seq = _Seq(req, self.loop.create_future(), stream, max(1, req.prompt_tokens), max(1, tokens))
        self.waiting.append(seq)
        if not self.stepping:
            self._begin()
        return seq.future

    # -- the step loop -----------------------------------------------------------------------------------

    def _begin(self) -> None:
        self.stepping = True
        self.host.busy += 1
        self.loop.call_soon(self._step)  # what arrives at the same instant joins the first step

    def _step(self) -> None:
        while self.waiting and len(self.running) < self.slots:
            self.running.append(self.waiting.pop(0))
        if not self.running:
            self.stepping = False
            self.host.busy -= 1
            return
        decoding = [s for s in self.running if s.prefill_left == 0]
        prefilling = [s for s in self.running if s.prefill_left > 0]
        decode = self.profile.decode_s(len(decoding))
        if decoding:
            per_token = max(self.profile.prefill_per_token_s, 1e-9)
            budget = max(MIN_PREFILL_TOKENS, int(PREFILL_SHARE * decode / per_token))
            budget = min(budget, MAX_NUM_BATCHED_TOKENS - len(decoding))
        else:
            budget = MAX_NUM_BATCHED_TOKENS
        done: list[_Seq] = []
        spent = 0
        for seq in prefilling:
            if spent >= budget:
                break
            take = min(seq.prefill_left, budget - spent)
            seq.prefill_left -= take
            spent += take
            if seq.prefill_left == 0:
                done.append(seq)
        cpu = decode + self.profile.prefill_s(spent)
        self.steps += 1
        self.loop.call_later(cpu * self.host.factor(), self._end, decoding, done)

    def _end(self, decoding: list[_Seq], prefilled: list[_Seq]) -> None:
        now = self.loop.time()
        for seq in prefilled:
            if seq in self.running:
                self._token(seq, now)
        for seq in decoding:
            if seq in self.running:
                self._token(seq, now)
        self._step()

    def _token(self, seq: _Seq, now: float) -> None:
        seq.made += 1
        if not self.frozen:
            if seq.made == 1:
                seq.req.first_token = now
            if seq.stream is not None and (seq.made == 1 or (seq.made - 1) % CHUNK_TOKENS == 0):
                seq.stream.emit(seq.made)
        if seq.made < seq.tokens:
            return
        self.running.remove(seq)
        if self.frozen:
            self.limbo.append(seq)  # written into a cut connection: the gateway never sees it
            return
        if seq.stream is not None:
            seq.stream.finish()
        if not seq.future.done():
            seq.future.set_result(None)

    # -- what the gateway and the fault do ---------------------------------------------------------------

    def _take(self, future: asyncio.Future[None]) -> _Seq | None:
        for seqs in (self.running, self.waiting, self.limbo):
            for seq in seqs:
                if seq.future is future:
                    seqs.remove(seq)
                    return seq
        return None

    def abandon(self, future: asyncio.Future[None]) -> None:
        """The caller gave up (a timeout): the engine aborts the sequence at its next step."""
        self._take(future)

    def fail(self, future: asyncio.Future[None], endpoint: str, why: str) -> None:
        """One connection is dropped (the gateway aborted it): its waiter gets a connection error."""
        seq = self._take(future)
        if seq is not None and not future.done():
            future.set_exception(RemoteProtocolError(why, endpoint=endpoint))

    def freeze(self) -> None:
        """A blackhole: the replica computes on, but nothing it makes reaches the gateway."""
        self.frozen = True

    def fail_all(self, endpoint: str) -> None:
        """Every connection is reset (a refused host, or a healed partition closing what it froze)."""
        for seq in [*self.running, *self.waiting, *self.limbo]:
            if seq.stream is not None:
                seq.stream.reset("connection reset by peer")
            if not seq.future.done():
                seq.future.set_exception(RemoteProtocolError("connection reset by peer", endpoint=endpoint))
        self.running.clear()
        self.waiting.clear()
        self.limbo.clear()
        self.frozen = False


@dataclass(frozen=True, slots=True)
class HostSpec:
    """Where a pool's replicas run: ``host: {name, cores, background}`` in the simulation's input.

    ``background_at``: the background measured over time (``sim/hostload.py``), ``(from t, value)`` steps
    that replace ``background`` as the simulated clock passes them.
    """

    name: str
    cores: float
    background: float = 0.0
    profile: StepProfile = field(default_factory=load_step_profile)
    background_at: tuple[tuple[float, float], ...] = ()
