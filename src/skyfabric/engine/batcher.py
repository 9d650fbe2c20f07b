"""Continuous batching for the native engine: which sequences run in the next step, and what each produced.

Every call to :meth:`Batcher.step` is one iteration of the serving loop: drop aborted sequences, admit
waiting ones into free cache slots (their prompts run together in one prefill pass), run one decode pass for
every sequence already running, sample, and retire the finished. A sequence joins the batch the step after
it arrives and leaves the step it finishes, so short and long requests never wait for each other.

The batcher knows nothing about processes or HTTP; :mod:`skyfabric.engine.core_process` drives it.
Running sequences occupy cache slots ``0..B-1`` in order; a finished one's slot is filled by moving the last
sequence into it, so the decode pass reads the cache through views, never a gather.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from skyfabric.engine.sampler import Row, SamplingParams, sample


class Model(Protocol):
    """What the batcher needs from a model (:class:`~skyfabric.engine.llama.LlamaFamilyModel`, or a fake)."""

    num_slots: int
    max_len: int
    device: torch.device

    def prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor: ...

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, longest: int) -> torch.Tensor: ...

    def move_slot(self, src: int, dst: int, length: int) -> None: ...


@dataclass(slots=True)
class Sequence:
    """One request inside the batcher."""

    rid: int
    prompt: list[int]
    max_tokens: int
    params: SamplingParams
    stop_ids: tuple[int, ...]
    banned_ids: tuple[int, ...]  # impossible while generated < min_tokens
    generated: int = 0
    length: int = 0  # tokens in the cache
    last_token: int = -1  # sampled, not yet in the cache
    stop_set: frozenset[int] = field(default_factory=frozenset)


#: One step's result for one sequence: (request id, new token, finish reason or None).
Output = tuple[int, int, str | None]


class Batcher:
    """The scheduler and step loop over one model; single-threaded, driven by its owner."""

    def __init__(self, model: Model, *, max_num_seqs: int, max_prefill_tokens: int = 2048) -> None:
        self.model = model
        self.max_running = min(max_num_seqs, model.num_slots)
        self.max_prefill_tokens = max_prefill_tokens
        self.running: list[Sequence] = []
        self.waiting: deque[Sequence] = deque()
        self.aborted: set[int] = set()
        self.forward_passes = 0
        self._generator = torch.Generator()

    def seed(self, seed: int) -> None:
        """Make unseeded sampling reproducible (``--seed``)."""
        self._generator.manual_seed(seed)

    # ------------------------------------------------------------------------------------------- requests

    def add(
        self,
        rid: int,
        prompt: list[int],
        *,
        max_tokens: int,
        params: SamplingParams,
        stop_ids: Iterable[int] = (),
        min_tokens_ban: Iterable[int] | None = None,
    ) -> None:
        """Queue a sequence; it ends at one of ``stop_ids``, at ``max_tokens``, or when its slot is full.

        ``min_tokens_ban`` (default: ``stop_ids``) are the ids impossible until ``params.min_tokens``.
        """
        if not prompt:
            raise ValueError("prompt is empty")
        if len(prompt) >= self.model.max_len:
            raise ValueError(f"a prompt of {len(prompt)} tokens leaves no room in {self.model.max_len}")
        stops = tuple(sorted(set(stop_ids)))
        banned = stops if min_tokens_ban is None else tuple(sorted(set(min_tokens_ban)))
        self.waiting.append(
            Sequence(rid, list(prompt), max_tokens, params, stops, banned, stop_set=frozenset(stops))
        )

    def abort(self, rid: int) -> None:
        """Forget a sequence at the next step (it produces nothing more)."""
        self.aborted.add(rid)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def kv_usage(self) -> float:
        """Share of the cache's token slots in use (vLLM's ``kv_cache_usage_perc``, 0..1)."""
        capacity = self.model.num_slots * self.model.max_len
        return sum(seq.length + 1 for seq in self.running) / capacity

    # ---------------------------------------------------------------------------------------------- step

    @torch.inference_mode()
    def step(self) -> list[Output]:
        """Run one iteration; return one output per sequence that produced a token."""
        if self.aborted:
            self._drop_aborted()
        admitted = self._admit()
        outputs: list[Output] = []
        if self.running:
            outputs.extend(self._decode())
        if admitted:
            outputs.extend(self._prefill(admitted))
            self.running.extend(admitted)
        self._retire({rid for rid, _, reason in outputs if reason is not None})
        return outputs

    def _drop_aborted(self) -> None:
        self.waiting = deque(seq for seq in self.waiting if seq.rid not in self.aborted)
        self._retire(self.aborted)
        self.aborted.clear()

    def _admit(self) -> list[Sequence]:
        admitted: list[Sequence] = []
        budget = self.max_prefill_tokens
        while self.waiting and len(self.running) + len(admitted) < self.max_running:
            size = len(self.waiting[0].prompt)
            if admitted and size > budget:
                break
            admitted.append(self.waiting.popleft())
            budget -= size
        return admitted

    def _decode(self) -> list[Output]:
        running = self.running
        device = self.model.device
        tokens = torch.tensor([seq.last_token for seq in running], dtype=torch.long, device=device)
        positions = torch.tensor([seq.length for seq in running], dtype=torch.long, device=device)
        logits = self.model.decode(tokens, positions, max(seq.length for seq in running) + 1)
        self.forward_passes += 1
        for seq in running:
            seq.length += 1
        return self._sample(running, logits)

    def _prefill(self, admitted: list[Sequence]) -> list[Output]:
        base = len(self.running)
        logits = self.model.prefill([seq.prompt for seq in admitted], list(range(base, base + len(admitted))))
        self.forward_passes += 1
        for seq in admitted:
            seq.length = len(seq.prompt)
        return self._sample(admitted, logits)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[Output]:
        rows = [Row(seq.params, seq.generated, seq.banned_ids) for seq in seqs]
        tokens = sample(logits, rows, self._generator)
        outputs: list[Output] = []
        max_len = self.model.max_len
        for seq, token in zip(seqs, tokens, strict=True):
            seq.generated += 1
            seq.last_token = token
            reason: str | None = None
            if token in seq.stop_set:
                reason = "stop"
            elif seq.generated >= seq.max_tokens or seq.length + 1 >= max_len:
                reason = "length"
            outputs.append((seq.rid, token, reason))
        return outputs

    def _retire(self, rids: set[int]) -> None:
        """Remove sequences from the batch, keeping the rest compact in slots 0..B-1."""
        if not rids:
            return
        running = self.running
        i = 0
        while i < len(running):
            if running[i].rid not in rids:
                i += 1
                continue
            last = running.pop()
            if i < len(running):
                self.model.move_slot(len(running), i, last.length)
                running[i] = last
