"""Chunked prefill and prefix caching in the native engine, against plain transformers as ground truth.

In process (the batcher over the real forward pass) for outputs and cache bookkeeping; one replica
subprocess for the ``/metrics`` counters and the options that reach the core.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import openai
import pytest
import torch

from skyfabric.engine.batcher import Batcher
from skyfabric.engine.chunked_prefill import ChunkedPrefill
from skyfabric.engine.core_process import load as load_core
from skyfabric.engine.llama import LlamaFamilyModel
from skyfabric.engine.prefix_cache import PrefixCache, block_hashes
from skyfabric.engine.sampler import SamplingParams
from skyfabric.gateway.affinity import parse_report

from .conftest import Reference, read_metrics, start_replica

GREEDY = SamplingParams(temperature=0.0)


def load(model_dir: Path, *, slots: int = 4, max_len: int = 512, prefix_blocks: int = 0) -> LlamaFamilyModel:
    torch.set_num_threads(1)
    return LlamaFamilyModel(
        model_dir,
        num_slots=slots,
        max_len=max_len,
        dtype=torch.float32,
        device=torch.device("cpu"),
        prefix_blocks=prefix_blocks,
        block_size=16,
    )


def run(batcher: Batcher, arrivals: dict[int, list[tuple[int, list[int], int]]]) -> dict[int, list[int]]:
    """Step until idle; ``arrivals[step]`` lists (rid, prompt, max_tokens) added before that step."""
    produced: dict[int, list[int]] = {}
    step = 0
    while batcher.has_work or any(s >= step for s in arrivals):
        for rid, prompt, max_tokens in arrivals.get(step, []):
            batcher.add(rid, prompt, max_tokens=max_tokens, params=GREEDY, stop_ids=())
            produced[rid] = []
        for rid, token, _ in batcher.step():
            produced[rid].append(token)
        step += 1
    return produced


@pytest.fixture(scope="module")
def ref(tiny_checkpoint: Path) -> Reference:
    return Reference(tiny_checkpoint)


def long_prompt(ref: Reference, n: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [int(t) for t in torch.randint(10, ref.tokenizer.vocab_size - 1, (n,), generator=gen)]


# ------------------------------------------------------------------------------------------ chunked prefill


def test_chunked_prefill_equals_unchunked_and_transformers(tiny_checkpoint: Path, ref: Reference) -> None:
    """A 300-token prompt arrives while two streams decode: 48 tokens a step, it answers as in one pass."""
    short = [ref.prompt_ids("def add(a, b):"), ref.prompt_ids("class Stack:")]
    long = long_prompt(ref, 300)
    arrivals = {0: [(1, short[0], 30), (2, short[1], 30)], 2: [(3, long, 8)], 3: [(4, short[0], 5)]}
    chunked = Batcher(load(tiny_checkpoint), max_num_seqs=4, max_num_batched_tokens=48)
    whole = Batcher(load(tiny_checkpoint), max_num_seqs=4, max_num_batched_tokens=4096, prefill_share=0)
    got = run(chunked, arrivals)
    assert chunked.prefill_chunks >= 300 // 48
    assert got == run(whole, arrivals)
    assert whole.prefill_chunks == 0  # there the whole prompt went in one pass
    assert got[3] == ref.greedy(long, 8)
    assert got[1] == ref.greedy(short[0], 30) and got[4] == ref.greedy(short[0], 5)
    assert not chunked.running and chunked.partial is None and chunked.kv_usage() == 0


def test_running_streams_get_a_step_in_every_chunk(tiny_checkpoint: Path, ref: Reference) -> None:
    """Every step while the long prompt is prefilled still gives each running stream its token."""
    batcher = Batcher(load(tiny_checkpoint), max_num_seqs=4, max_num_batched_tokens=32)
    batcher.add(1, ref.prompt_ids("for i in"), max_tokens=450, params=GREEDY)
    batcher.step()
    batcher.add(2, long_prompt(ref, 400), max_tokens=2, params=GREEDY)
    steps_with_partial = 0
    while batcher.partial is not None or batcher.waiting:
        outputs = batcher.step()
        steps_with_partial += 1
        assert any(rid == 1 for rid, _, _ in outputs)  # stream 1 never skips a step
    # Chunks of 32 tokens (several may share a step: a step runs units for ~0.75 of a decode step).
    assert batcher.prefill_chunks == -(-400 // 32) and 2 <= steps_with_partial <= 400
    batcher.abort(1)
    batcher.step()
    assert not batcher.has_work and batcher.kv_usage() == 0


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TimedJob:
    """A real chunked prefill whose units each take ``unit`` seconds of fake time."""

    def __init__(self, job: ChunkedPrefill, clock: FakeClock, unit: float) -> None:
        self.job, self.clock, self.unit = job, clock, unit
        self.units = 0

    @property
    def position(self) -> int:
        return self.job.position

    @property
    def chunks(self) -> int:
        return self.job.chunks

    @property
    def logits(self) -> torch.Tensor | None:
        return self.job.logits

    def step(self) -> None:
        self.clock.now += self.unit
        self.units += 1
        self.job.step()


class TimedModel:
    """The real model, with passes that take fake time: decode 10 ms, a prefill unit 1 ms, whole prompts
    by attention and matmul work."""

    def __init__(self, model: LlamaFamilyModel, clock: FakeClock) -> None:
        self.model, self.clock = model, clock
        self.num_slots, self.max_len, self.device = model.num_slots, model.max_len, model.device
        self.linear_units = model.linear_units
        self.jobs: list[TimedJob] = []

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, longest: int) -> torch.Tensor:
        self.clock.now += 0.010
        return self.model.decode(tokens, positions, longest)

    def prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        self.clock.now += sum(2e-7 * len(p) * (len(p) / 2 + self.linear_units) + 1e-3 for p in prompts)
        return self.model.prefill(prompts, slots)

    def start_prefill(self, tokens: list[int], slot: int, start: int, block: int) -> TimedJob:
        self.jobs.append(TimedJob(self.model.start_prefill(tokens, slot, start, block), self.clock, 0.001))
        return self.jobs[-1]

    def prefill_chunk(self, tokens: list[int], slot: int, start: int) -> torch.Tensor:
        return self.model.prefill_chunk(tokens, slot, start)

    def move_slot(self, src: int, dst: int, length: int) -> None:
        self.model.move_slot(src, dst, length)

    def save_blocks(self, slot: int, token_blocks: list[int], pool_blocks: list[int]) -> None:
        self.model.save_blocks(slot, token_blocks, pool_blocks)

    def load_blocks(self, slot: int, blocks: list[int]) -> None:
        self.model.load_blocks(slot, blocks)


def test_prefill_time_per_step_follows_the_decode_time(tiny_checkpoint: Path, ref: Reference) -> None:
    """With a stream decoding, a step runs prefill units for ~0.75 of a decode pass, then decodes again."""
    clock = FakeClock()
    model = TimedModel(load(tiny_checkpoint), clock)
    batcher = Batcher(model, max_num_seqs=4, max_num_batched_tokens=512, clock=clock)  # type: ignore[arg-type]
    batcher.add(1, ref.prompt_ids("def fib(n):"), max_tokens=400, params=GREEDY)
    batcher.step()
    batcher.step()
    batcher.add(2, long_prompt(ref, 480), max_tokens=2, params=GREEDY)
    step_times: list[float] = []
    while batcher.partial is not None or batcher.waiting:
        before = clock.now
        outputs = batcher.step()
        step_times.append(clock.now - before)
        assert any(rid == 1 for rid, _, _ in outputs)
    # Each step: the decode pass (10 ms), then prefill units (1 ms each) while the next fits in 0.75 of it.
    assert all(0.010 + 0.0065 <= t <= 0.010 + 0.0075 for t in step_times[:-1]), step_times
    (job,) = model.jobs
    assert job.chunks == -(-480 // 128) and len(step_times) == -(-job.units // 7)
    # A lone prompt is not held back: the same prompt alone goes in one 480-token pass.
    alone = Batcher(model, max_num_seqs=4, max_num_batched_tokens=512, clock=clock)  # type: ignore[arg-type]
    alone.add(3, long_prompt(ref, 480), max_tokens=1, params=GREEDY)
    alone.step()
    assert alone.prefill_chunks == 0 and not alone.has_work and len(model.jobs) == 1


# ------------------------------------------------------------------------------------------ prefix caching


def test_block_hashes_chain_the_prefix() -> None:
    a = block_hashes(list(range(50)), 16)
    assert len(a) == 3  # full blocks of the first 49 tokens
    b = block_hashes([*range(16), 99, *range(17, 50)], 16)
    assert a[0] == b[0] and a[1] != b[1] and a[2] != b[2]  # one token changed: every later block differs
    assert block_hashes(list(range(48)), 16) == a[:2]  # the last token is never cached


def test_pool_refcounts_and_lru_eviction() -> None:
    cache = PrefixCache(3, 16)
    held = [cache.store(h) for h in (1, 2, 3)]
    assert None not in held and cache.store(4) is None  # everything held: nothing to evict
    cache.release([held[0]])
    cache.release([held[1], held[2]])  # tail (3) released before its head (2)
    assert cache.held == 0 and cache.cached == 3
    assert cache.match([1, 2, 9]) == held[:2] and cache.held == 0  # matching acquires nothing
    assert cache.store(5) == held[0]  # released first: evicted first
    assert cache.store(6) == held[2]  # then the tail of the second sequence
    assert cache.lookup(2) == held[1] and cache.lookup(1) is None and cache.evictions == 2


def test_prefix_cache_gives_identical_output_and_frees_blocks(tiny_checkpoint: Path, ref: Reference) -> None:
    system = long_prompt(ref, 200, seed=1)
    turns = [system + ref.prompt_ids(q) for q in ("def add(a, b):", "class Stack:", "for i in")]
    arrivals = {0: [(1, turns[0], 10)], 15: [(2, turns[1], 10), (3, turns[2], 10)], 30: [(4, turns[0], 10)]}
    cache = PrefixCache(64, 16)
    cached = Batcher(load(tiny_checkpoint, prefix_blocks=64), max_num_seqs=4, prefix_cache=cache)
    got = run(cached, arrivals)
    plain = run(Batcher(load(tiny_checkpoint), max_num_seqs=4), arrivals)
    assert got == plain
    for rid, prompt in ((1, turns[0]), (2, turns[1]), (3, turns[2])):
        assert got[rid] == ref.greedy(prompt, 10)
    # Turns 2-4 found the 12 full blocks of the shared system prompt; turn 4 found its whole prompt's blocks.
    assert cache.queries == sum(len(t) for t in turns) + len(turns[0])
    assert cache.hits == 2 * 12 * 16 + (len(turns[0]) - 1) // 16 * 16
    assert cache.held == 0 and cache.cached == cache.num_blocks - len(cache._free)
    assert not cached.running and cached.partial is None


def test_prefix_hit_with_a_chunked_rest(tiny_checkpoint: Path, ref: Reference) -> None:
    """A hit on a long prompt's head, the rest over a step's budget: chunks start after the hit."""
    head = long_prompt(ref, 160, seed=2)
    first, second = head + long_prompt(ref, 40, seed=3), head + long_prompt(ref, 140, seed=4)
    cache = PrefixCache(64, 16)
    batcher = Batcher(
        load(tiny_checkpoint, prefix_blocks=64), max_num_seqs=4, max_num_batched_tokens=64, prefix_cache=cache
    )
    got = run(batcher, {0: [(1, first, 6)], 20: [(2, second, 6)]})
    assert got[2] == ref.greedy(second, 6) and got[1] == ref.greedy(first, 6)
    assert cache.hits == 160 and batcher.prefill_chunks >= 3 + 2


def test_eviction_under_pressure_stays_within_the_pool(tiny_checkpoint: Path, ref: Reference) -> None:
    """Eight different 100-token prompts through a 10-block pool: old prefixes evicted, same answers."""
    cache = PrefixCache(10, 16)
    batcher = Batcher(load(tiny_checkpoint, prefix_blocks=10), max_num_seqs=2, prefix_cache=cache)
    prompts = [long_prompt(ref, 100, seed=10 + i) for i in range(8)]
    got = run(batcher, {40 * i: [(i, p, 3)] for i, p in enumerate(prompts)})  # one after another
    for i, p in enumerate(prompts):
        assert got[i] == ref.greedy(p, 3)
    assert cache.evictions > 0 and cache.cached <= 10 and cache.held == 0
    # The last prompt is still cached whole; the first was evicted.
    assert len(cache.match(block_hashes(prompts[-1], 16))) == 6
    assert cache.match(block_hashes(prompts[0], 16)) == []


def test_core_memory_is_bounded_by_the_budget(tiny_checkpoint: Path) -> None:
    batcher, _ = load_core(
        {"model_dir": str(tiny_checkpoint), "kv_cache_mib": 2, "max_num_seqs": 8, "dtype": "float32"}
    )
    model = batcher.model
    tensors = model.k_cache + model.v_cache + model.k_pool + model.v_pool
    total = sum(t.numel() * t.element_size() for t in tensors)
    assert total <= 2 * 2**20, total
    assert batcher.prefix_cache is not None and batcher.prefix_cache.num_blocks == model.prefix_blocks > 0
    off, _ = load_core(
        {
            "model_dir": str(tiny_checkpoint),
            "kv_cache_mib": 2,
            "max_num_seqs": 8,
            "dtype": "float32",
            "enable_prefix_caching": False,
        }
    )
    assert off.prefix_cache is None and off.model.prefix_blocks == 0


def test_replica_reports_prefix_cache_hits_in_vllm_names(
    tiny_checkpoint: Path, tmp_path: Path, ref: Reference
) -> None:
    rep = start_replica(
        tiny_checkpoint, tmp_path / "replica.log", "--engine", "native", "--max-num-batched-tokens", "64"
    )
    try:
        client = openai.OpenAI(base_url=rep.base_url + "/v1", api_key="x", max_retries=0)
        system = "You are a helpful coding assistant. " * 20
        answers = []
        reports = []
        for question, stream in (("def add(a, b):", False), ("def add(a, b):", True)):
            raw = client.chat.completions.with_raw_response.create(
                model="tiny",
                messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
                max_tokens=8,
                temperature=0,
                stream=stream,
            )
            reports.append(raw.headers.get("x-skyfabric-prefix-cache"))
            parsed = raw.parse()
            if stream:
                answers.append("".join(c.choices[0].delta.content or "" for c in parsed if c.choices))
            else:
                answers.append(parsed.choices[0].message.content)
        assert answers[0] == answers[1]
        metrics = read_metrics(rep.base_url)
        prompt = len(
            ref.chat_ids(
                [{"role": "system", "content": system}, {"role": "user", "content": "def add(a, b):"}]
            )
        )
        assert metrics["vllm:prefix_cache_queries_total"] == 2 * prompt
        assert metrics["vllm:prefix_cache_hits_total"] == (prompt - 1) // 16 * 16
        # Both answers, whole and streamed, report the cache to the gateway (gateway/affinity.py), from
        # one process (one epoch) whose prefix cache holds a positive number of tokens.
        parsed_reports = [parse_report(r.encode()) if r else None for r in reports]
        assert all(p is not None and p[0] > 0 and p[1] == prompt for p in parsed_reports), reports
        assert len({p[2] for p in parsed_reports if p is not None}) == 1
    finally:
        rep.proc.terminate()
        try:
            rep.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            rep.proc.kill()
