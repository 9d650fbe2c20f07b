"""Continuous batching for the native engine: which sequences run in the next step, and what each produced.

Every call to :meth:`Batcher.step` is one iteration of the serving loop: drop aborted sequences, run one
decode pass for every running sequence, prefill what the step's prefill allowance covers, sample, and retire
the finished. A sequence joins the batch the step after it arrives and leaves the step it finishes, so short
and long requests never wait for each other.

**Chunked prefill.** A step prefills at most ``max_num_batched_tokens`` tokens (decode tokens count too, as in
vLLM). While sequences are decoding, the prefill is also held to about ``prefill_share`` times the time of
the decode pass (measured as it runs), so running streams keep about ``1 / (1 + prefill_share)`` of their
quiet pace: on a CPU, attention over a long prompt costs far more per token than the token budget says
(a chunk's cost grows with the context before it), so a token budget alone would stall them. A step always
prefills at least one token, so where a single token after a long context costs more than a decode pass (a
small model, whose KV per token is large next to its weights) the streams slow down by that token's cost.
Prompts that fit
the allowance whole are packed into one pass; the first that does not is prefilled in chunks in a slot of
its own (the top one), one chunk per step, riding in the decode pass when streams run (its rows share the
matmuls), and joins the batch when its last chunk is done.

**Prefix caching** (with a :class:`~skyfabric.engine.prefix_cache.PrefixCache`): on admission a prompt's
cached prefix blocks are copied into its slot and only the rest is computed; computed full prompt blocks are
copied into the pool. The slot layout stays, so decode still reads plain views (a paged gather per step
would read the whole context every step; the copy is paid once per admission).

The batcher knows nothing about processes or HTTP; :mod:`skyfabric.engine.core_process` drives it.
Running sequences occupy cache slots ``0..B-1`` in order; a finished one's slot is filled by moving the last
sequence into it, so the decode pass reads the cache through views, never a gather.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from skyfabric.engine.chunked_prefill import BLOCK
from skyfabric.engine.prefix_cache import PrefixCache, block_hashes
from skyfabric.engine.sampler import Row, SamplingParams, sample


class PrefillJob(Protocol):
    """A resumable prefill (:class:`~skyfabric.engine.chunked_prefill.ChunkedPrefill`): one unit per step."""

    position: int  # the cache is complete below this position in every layer
    chunks: int
    logits: torch.Tensor | None  # the last token's, once finished

    def step(self) -> None: ...


class Model(Protocol):
    """What the batcher needs from a model (:class:`~skyfabric.engine.llama.LlamaFamilyModel`, or a fake)."""

    num_slots: int
    max_len: int
    device: torch.device

    def prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor: ...

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, longest: int) -> torch.Tensor: ...

    def move_slot(self, src: int, dst: int, length: int) -> None: ...

    def prefill_chunk(self, tokens: list[int], slot: int, start: int) -> torch.Tensor: ...

    def start_prefill(self, tokens: list[int], slot: int, start: int, block: int) -> PrefillJob: ...

    def save_blocks(self, slot: int, token_blocks: list[int], pool_blocks: list[int]) -> None: ...

    def load_blocks(self, slot: int, blocks: list[int]) -> None: ...


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
    hashes: list[int] | None = None  # prefix-cache block hashes of the prompt (computed once)
    blocks: list[int] = field(default_factory=list)  # pool blocks held: the prompt's first len(blocks)
    slot: int = -1  # while prefilled in chunks
    job: PrefillJob | None = None  # while prefilled in chunks
    allowed: torch.Tensor | None = None  # guided decoding: the only ids it may sample


#: Whole prompts up to the work of this many tokens at context 0 are admitted past the work allowance.
MIN_PREFILL_TOKENS = 32

#: Prefill passes of fewer tokens only give the first estimate of a work unit's cost, then are not used: a
#: pass's fixed cost (a few dozen ops) dominates them.
MEASURE_TOKENS = 8

#: Seconds of chunked prefill per step while nothing decodes: bounds how long a new arrival waits to be
#: admitted behind a long prompt (the prompt itself loses only a step's fixed cost per slice).
IDLE_SLICE_S = 0.05

#: Query tokens per chunk of a chunked prefill (at most ``max_num_batched_tokens``): enough rows for
#: efficient matmuls; the time a step gives it is bounded by units of work, not by the chunk's size.
CHUNK_TOKENS = BLOCK

#: One step's result for one sequence: (request id, new token, finish reason or None).
Output = tuple[int, int, str | None]


class Batcher:
    """The scheduler and step loop over one model; single-threaded, driven by its owner."""

    def __init__(
        self,
        model: Model,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int = 512,
        prefill_share: float = 0.75,
        prefix_cache: PrefixCache | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """``prefill_share``: prefill time per step as a share of the decode pass's while streams decode
        (0 or less: the token budget alone). ``clock`` times the passes (a fake one in tests)."""
        self.model = model
        self.max_running = min(max_num_seqs, model.num_slots)
        self.max_num_batched_tokens = max(1, max_num_batched_tokens)
        self.prefill_share = prefill_share
        self.prefix_cache = prefix_cache
        self.clock = clock
        self.running: list[Sequence] = []
        self.waiting: deque[Sequence] = deque()
        self.partial: Sequence | None = None  # the prompt being prefilled in chunks, in the top slot
        self.aborted: set[int] = set()
        self.forward_passes = 0
        self.prefill_chunks = 0
        self._generator = torch.Generator()
        # Cost model, measured: seconds of a decode pass, and seconds per prefill work unit, where a token at
        # context ``c`` is ``c + linear_units`` units (attention grows with the context, the matmuls do not).
        self.linear_units = float(getattr(model, "linear_units", 1024.0))
        self._decode_s: float | None = None
        self._unit_s: float | None = None
        # A quiet decode step's whole period (the pass, sampling, and the owner's work between steps: sending
        # tokens, reading requests), measured only from steps without prefill: measured during a chunked
        # prefill it would include the decode passes the prefill slows (it evicts their weights from the
        # CPU caches), and the slice would grow with it. The previous step's start, if it only decoded.
        self._step_s: float | None = None
        self._last_step: float | None = None

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
        allowed_ids: Iterable[int] | None = None,
    ) -> None:
        """Queue a sequence; it ends at one of ``stop_ids``, at ``max_tokens``, or when its slot is full.

        ``min_tokens_ban`` (default: ``stop_ids``) are the ids impossible until ``params.min_tokens``;
        ``allowed_ids`` (guided decoding) the only ids it may ever sample.
        """
        if not prompt:
            raise ValueError("prompt is empty")
        if len(prompt) >= self.model.max_len:
            raise ValueError(f"a prompt of {len(prompt)} tokens leaves no room in {self.model.max_len}")
        stops = tuple(sorted(set(stop_ids)))
        banned = stops if min_tokens_ban is None else tuple(sorted(set(min_tokens_ban)))
        seq = Sequence(rid, list(prompt), max_tokens, params, stops, banned, stop_set=frozenset(stops))
        if allowed_ids is not None:
            seq.allowed = torch.tensor(sorted(set(allowed_ids)), dtype=torch.long)
        self.waiting.append(seq)

    def abort(self, rid: int) -> None:
        """Forget a sequence at the next step (it produces nothing more)."""
        self.aborted.add(rid)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self.partial)

    def kv_usage(self) -> float:
        """Share of the cache's token slots in use (vLLM's ``kv_cache_usage_perc``, 0..1)."""
        capacity = self.model.num_slots * self.model.max_len
        used = sum(seq.length + 1 for seq in self.running)
        if self.partial is not None:
            used += self.partial.length
        return used / capacity

    # ---------------------------------------------------------------------------------------------- step

    @torch.inference_mode()
    def step(self) -> list[Output]:
        """Run one iteration; return one output per sequence that produced a token."""
        began = self.clock()
        if self._last_step is not None:
            self._measure("_step_s", began - self._last_step)
        if self.aborted:
            self._drop_aborted()
        tokens_left = self.max_num_batched_tokens - len(self.running)
        work_left = self._work_allowance()
        admitted, tokens_left, work_left = self._admit(tokens_left, work_left)
        outputs: list[Output] = []
        decoding = bool(self.running)
        was_partial = self.partial is not None
        if decoding:
            outputs.extend(self._decode())
        prefill_began = self.clock()
        if admitted:
            outputs.extend(self._prefill(admitted))
            self.running.extend(admitted)
        if self.partial is not None:
            outputs.extend(self._advance_partial(self._slice(decoding, prefill_began)))
        self._last_step = (
            began if decoding and not admitted and self.partial is None and not was_partial else None
        )
        self._retire({rid for rid, _, reason in outputs if reason is not None})
        return outputs

    def _drop_aborted(self) -> None:
        aborted = self.aborted
        self.waiting = deque(seq for seq in self.waiting if seq.rid not in aborted)
        if self.partial is not None and self.partial.rid in aborted:
            self._release(self.partial)
            self.partial = None
        self._retire(aborted)
        self.aborted = set()

    # --------------------------------------------------------------------------------------- cost model

    def _cost(self, tokens: int, start: int) -> float:
        """Work units of prefilling ``tokens`` tokens after ``start`` cached ones."""
        return tokens * (start + tokens / 2 + self.linear_units)

    def _work_allowance(self) -> float:
        """Prefill work units this step may spend: unbounded when nothing decodes or nothing is measured."""
        if not self.running or self.prefill_share <= 0 or self._decode_s is None or self._unit_s is None:
            return float("inf")
        return self.prefill_share * self._decode_s / self._unit_s

    def _measure(self, attr: str, seconds: float, units: float = 1.0) -> None:
        sample_s = seconds / units
        old = getattr(self, attr)
        setattr(self, attr, sample_s if old is None else 0.8 * old + 0.2 * sample_s)

    # ---------------------------------------------------------------------------------------- admission

    def _admit(self, tokens_left: int, work_left: float) -> tuple[list[Sequence], int, float]:
        """Admit waiting prompts that fit the allowance whole; start chunking the first that does not."""
        admitted: list[Sequence] = []
        capacity = min(self.max_running, self.model.num_slots)
        work_allowed = work_left
        while self.waiting:
            busy = len(self.running) + len(admitted) + (self.partial is not None)
            if busy >= capacity:
                break
            seq = self.waiting[0]
            cached = self._match(seq)
            need = len(seq.prompt) - cached * self._block_size
            cost = self._cost(need, len(seq.prompt) - need)
            # A short prompt goes in whole even past the work allowance (up to the work of MIN_PREFILL_TOKENS
            # fresh tokens in all, about a decode pass of as many rows): chunking it would only add passes.
            spent = 0.0 if work_left == float("inf") else work_allowed - work_left
            if need <= tokens_left and cost <= max(work_left, self._cost(MIN_PREFILL_TOKENS, 0) - spent):
                self.waiting.popleft()
                self._take(seq, cached)
                admitted.append(seq)
                tokens_left -= need
                work_left -= cost
                continue
            if self.partial is None:
                self.waiting.popleft()
                self._take(seq, cached)
                self.partial = seq
            break
        return admitted, tokens_left, work_left

    @property
    def _block_size(self) -> int:
        return self.prefix_cache.block_size if self.prefix_cache is not None else 1

    def _match(self, seq: Sequence) -> int:
        """How many prompt blocks are cached (0 without a prefix cache)."""
        cache = self.prefix_cache
        if cache is None:
            return 0
        if seq.hashes is None:
            seq.hashes = block_hashes(seq.prompt, cache.block_size)
        return len(cache.match(seq.hashes))

    def _take(self, seq: Sequence, cached: int) -> None:
        """Hold the sequence's cached prefix blocks (copied into its slot when its prefill runs)."""
        cache = self.prefix_cache
        if cache is None:
            return
        assert seq.hashes is not None
        blocks = cache.match(seq.hashes)[:cached]
        cache.acquire(blocks)
        cache.record(len(seq.prompt), len(blocks) * cache.block_size)
        seq.blocks = blocks

    def _store(self, seq: Sequence, slot: int, computed: int) -> None:
        """Copy the prompt's newly computed full blocks (below ``computed`` tokens) into the pool."""
        cache = self.prefix_cache
        if cache is None or seq.hashes is None:
            return
        full = min(len(seq.hashes), computed // cache.block_size)
        token_blocks: list[int] = []
        pool_blocks: list[int] = []
        for j in range(len(seq.blocks), full):
            h = seq.hashes[j]
            block = cache.lookup(h)
            if block is not None:  # stored meanwhile by a sequence with the same prefix
                cache.acquire([block])
            else:
                block = cache.store(h)
                if block is None:  # every block is held: cache no further
                    break
                token_blocks.append(j)
                pool_blocks.append(block)
            seq.blocks.append(block)
        self.model.save_blocks(slot, token_blocks, pool_blocks)

    def _release(self, seq: Sequence) -> None:
        if self.prefix_cache is not None and seq.blocks:
            self.prefix_cache.release(seq.blocks)
            seq.blocks = []

    # ---------------------------------------------------------------------------------------------- passes

    def _decode(self) -> list[Output]:
        """One decode pass for the running batch."""
        running = list(self.running)
        device = self.model.device
        tokens = torch.tensor([seq.last_token for seq in running], dtype=torch.long, device=device)
        positions = torch.tensor([seq.length for seq in running], dtype=torch.long, device=device)
        longest = max(seq.length for seq in running) + 1
        started = self.clock()
        logits = self.model.decode(tokens, positions, longest)
        self._measure("_decode_s", self.clock() - started)
        self.forward_passes += 1
        for seq in running:
            seq.length += 1
        return self._sample(running, logits)

    def _prefill(self, admitted: list[Sequence]) -> list[Output]:
        """Whole prompts: those with no cached prefix packed into one pass, the others each from its hit."""
        base = len(self.running)
        slots = list(range(base, base + len(admitted)))
        fresh = [i for i, seq in enumerate(admitted) if not seq.blocks]
        rows: dict[int, torch.Tensor] = {}
        started = self.clock()
        work = 0.0
        if fresh:
            prompts = [admitted[i].prompt for i in fresh]
            logits = self.model.prefill(prompts, [slots[i] for i in fresh])
            self.forward_passes += 1
            rows.update({i: logits[k : k + 1] for k, i in enumerate(fresh)})
            work += sum(self._cost(len(p), 0) for p in prompts)
        for i, seq in enumerate(admitted):
            if seq.blocks:
                start = len(seq.blocks) * self._block_size
                self.model.load_blocks(slots[i], seq.blocks)
                rows[i] = self.model.prefill_chunk(seq.prompt[start:], slots[i], start)
                self.forward_passes += 1
                work += self._cost(len(seq.prompt) - start, start)
        fresh_tokens = sum(len(seq.prompt) - len(seq.blocks) * self._block_size for seq in admitted)
        if fresh_tokens >= MEASURE_TOKENS or self._unit_s is None:
            self._measure("_unit_s", self.clock() - started, max(work, 1.0))
        for seq, slot in zip(admitted, slots, strict=True):
            seq.length = len(seq.prompt)
            self._store(seq, slot, seq.length)
        return self._sample(admitted, torch.cat([rows[i] for i in range(len(admitted))]))

    def _slice(self, decoding: bool, prefill_began: float) -> float:
        """Seconds of chunked prefill this step may still run (at least one unit always runs).

        While streams decode: ``prefill_share`` of a quiet decode step's period (measured from step to step
        without prefill: the pass, sampling, and what the owner does between steps, which on a small model
        cost as much as the pass itself), less what whole prompts took this step since ``prefill_began``:
        the streams' time per token stays near ``1 + prefill_share`` times its quiet value (a little more:
        the decode passes run slower between prefill units). Otherwise a short slice, so arrivals are
        admitted within :data:`IDLE_SLICE_S`.
        """
        if not decoding:
            return IDLE_SLICE_S
        if self.prefill_share <= 0:
            return float("inf")
        period = self._step_s if self._step_s is not None else (self._decode_s or 0.0)
        return self.prefill_share * period - (self.clock() - prefill_began)

    def _advance_partial(self, seconds: float) -> list[Output]:
        """Run units of the partial prompt's prefill for ``seconds`` (in the top slot, set up at first)."""
        seq = self.partial
        assert seq is not None
        if seq.job is None:
            seq.slot = self.model.num_slots - 1
            seq.length = len(seq.blocks) * self._block_size
            self.model.load_blocks(seq.slot, seq.blocks)
            block = min(self.max_num_batched_tokens, CHUNK_TOKENS)
            seq.job = self.model.start_prefill(seq.prompt[seq.length :], seq.slot, seq.length, block)
        job = seq.job
        chunks = job.chunks
        began = last = self.clock()
        while True:
            job.step()
            now = self.clock()
            # Stop where the next unit (about as long as the last) would overrun the slice.
            if job.logits is not None or 2 * now - last - began > seconds:
                break
            last = now
        self.forward_passes += 1
        self.prefill_chunks += job.chunks - chunks
        if job.position > seq.length:
            seq.length = job.position
            self._store(seq, seq.slot, seq.length)
        if job.logits is None:
            return []
        self.partial = None
        dst, top = len(self.running), seq.slot
        if dst != top:
            self.model.move_slot(top, dst, seq.length)
        seq.slot, seq.job = -1, None
        self.running.append(seq)
        return self._sample([seq], job.logits)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[Output]:
        rows = [Row(seq.params, seq.generated, seq.banned_ids, seq.allowed) for seq in seqs]
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
            self._release(running[i])
            last = running.pop()
            if i < len(running):
                self.model.move_slot(len(running), i, last.length)
                running[i] = last
