"""The native engine's parts, in process: forward pass, continuous batching, cache planning, engine choice.

Ground truth is plain transformers: greedy decoding of each prompt alone, in float32, must equal what the
native batcher produces for the same prompt while other sequences join and leave the batch around it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from skyfabric.engine.architectures import native_unsupported_reason, pick_engine
from skyfabric.engine.batcher import Batcher
from skyfabric.engine.core_process import plan_cache
from skyfabric.engine.llama import LlamaFamilyModel, UnsupportedModel, bucket
from skyfabric.engine.sampler import SamplingParams

from .conftest import Reference
from .test_architectures import build_checkpoint

GREEDY = SamplingParams(temperature=0.0)


def load(model_dir: Path, *, slots: int = 8, max_len: int = 128) -> LlamaFamilyModel:
    torch.set_num_threads(1)
    return LlamaFamilyModel(
        model_dir, num_slots=slots, max_len=max_len, dtype=torch.float32, device=torch.device("cpu")
    )


def run_to_end(
    batcher: Batcher, arrivals: dict[int, list[tuple[int, list[int], int]]]
) -> dict[int, list[int]]:
    """Step until idle; ``arrivals[step]`` lists (rid, prompt, max_tokens) added before that step."""
    produced: dict[int, list[int]] = {}
    step = 0
    while batcher.has_work or any(s >= step for s in arrivals):
        for rid, prompt, max_tokens in arrivals.get(step, []):
            batcher.add(rid, prompt, max_tokens=max_tokens, params=GREEDY)
            produced[rid] = []
        for rid, token, _reason in batcher.step():
            produced[rid].append(token)
        step += 1
    return produced


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("qwen2") / "tiny-qwen2", "qwen2")


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("mistral") / "tiny-mistral", "mistral")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_batched_greedy_equals_transformers_alone(
    arch: str, tiny_checkpoint: Path, qwen2_dir: Path, mistral_dir: Path
) -> None:
    """Sequences arrive at different steps and finish at different lengths (slots get compacted)."""
    model_dir = {"llama": tiny_checkpoint, "qwen2": qwen2_dir, "mistral": mistral_dir}[arch]
    reference = Reference(model_dir)
    prompts = [
        reference.prompt_ids(text) for text in ("def add(a, b):", "class Stack:", "for i in", "SELECT")
    ]
    batcher = Batcher(load(model_dir), max_num_seqs=8)
    arrivals = {
        0: [(1, prompts[0], 12), (2, prompts[1], 5)],
        2: [(3, prompts[2], 9)],
        3: [(4, prompts[3], 14), (5, prompts[0], 3)],
    }
    produced = run_to_end(batcher, arrivals)
    for entries in arrivals.values():
        for rid, prompt, max_tokens in entries:
            assert produced[rid] == reference.greedy(prompt, max_tokens), f"{arch} request {rid}"
    # Shared forward passes: 43 tokens came out of far fewer passes.
    assert batcher.forward_passes < 20
    assert not batcher.running and batcher.kv_usage() == 0


def test_sliding_window_matches_transformers(tmp_path: Path) -> None:
    """Mistral with a window of 8 tokens: a 30-token answer must attend exactly as transformers does."""
    model_dir = build_checkpoint(tmp_path / "tiny-mistral", "mistral")
    config = json.loads((model_dir / "config.json").read_text())
    config["sliding_window"] = 8
    (model_dir / "config.json").write_text(json.dumps(config))
    reference = Reference(model_dir)
    prompt = reference.prompt_ids("def fib(n): return n")
    model = load(model_dir)
    assert model.window == 8
    produced = run_to_end(Batcher(model, max_num_seqs=2), {0: [(1, prompt, 30)]})
    assert produced[1] == reference.greedy(prompt, 30)


def test_admission_stop_tokens_min_tokens_abort_and_load(tiny_checkpoint: Path) -> None:
    model = load(tiny_checkpoint, slots=8, max_len=64)
    batcher = Batcher(model, max_num_seqs=2)
    batcher.add(1, [5, 6, 7], max_tokens=50, params=GREEDY)
    batcher.add(2, [5, 6, 8], max_tokens=50, params=GREEDY)
    batcher.add(3, [5, 6, 9], max_tokens=50, params=GREEDY)
    batcher.step()
    assert (len(batcher.running), len(batcher.waiting)) == (2, 1)  # max_num_seqs caps the batch
    assert 0 < batcher.kv_usage() < 1
    batcher.abort(1)
    outputs = batcher.step()
    assert 1 not in {rid for rid, _, _ in outputs}
    assert sorted(rid for rid, _, _ in outputs) == [2, 3]  # 3 took the freed slot
    batcher.abort(2)
    batcher.abort(3)
    batcher.step()
    assert not batcher.has_work

    # Every token is a stop token: the first one ends the sequence ...
    everything = range(model.embed.shape[0])
    batcher.add(4, [5, 6], max_tokens=10, params=GREEDY, stop_ids=everything)
    assert [reason for _, _, reason in batcher.step()] == ["stop"]
    # ... unless min_tokens bans them: with every token but 3 a stop token, the first three must be 3.
    all_but_3 = [t for t in everything if t != 3]
    params = SamplingParams(temperature=0.0, min_tokens=3)
    batcher.add(5, [5, 6], max_tokens=10, params=params, stop_ids=all_but_3)
    produced = []
    while batcher.has_work:
        produced += batcher.step()
    assert [(token, reason) for _, token, reason in produced[:3]] == [(3, None)] * 3
    assert produced[-1][2] in ("stop", "length") and len(produced) <= 10
    # The slot's end ends a sequence too: "length" at max_len.
    batcher.add(6, list(range(3, 60)), max_tokens=100, params=GREEDY)
    produced = []
    while batcher.has_work:
        produced += batcher.step()
    assert len(produced) == 64 - 57 and produced[-1][2] == "length"


def test_seeded_sampling_is_independent_of_the_batch(tiny_checkpoint: Path) -> None:
    seeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, seed=7)

    def run(extra: int) -> list[int]:
        batcher = Batcher(load(tiny_checkpoint), max_num_seqs=8)
        batcher.add(1, [5, 6, 7], max_tokens=12, params=seeded)
        for i in range(extra):
            batcher.add(10 + i, [9, 8, 7, i + 3], max_tokens=12, params=SamplingParams(temperature=1.0))
        out: list[int] = []
        while batcher.has_work:
            out += [token for rid, token, _ in batcher.step() if rid == 1]
        return out

    alone, crowded = run(0), run(5)
    assert alone == crowded and len(alone) == 12


def test_buckets_bound_the_shapes() -> None:
    assert [bucket(n) for n in (1, 2, 3, 5, 16, 17, 33, 500, 513, 1100)] == [
        1, 2, 4, 8, 16, 24, 48, 512, 1024, 1536,
    ]  # fmt: skip
    assert len({bucket(n) for n in range(1, 4097)}) <= 24


def test_plan_cache_keeps_concurrency_within_budget() -> None:
    mib = 2**20
    # Everything fits: max_num_seqs slots of the whole context.
    assert plan_cache(
        model_len=256, bytes_per_token=2048, max_num_seqs=32, kv_cache_mib=128, requested_len=None
    ) == (32, 256)
    # A long-context model in a small budget: the context shrinks (to 4,096) before concurrency does.
    slots, max_len = plan_cache(
        model_len=32768, bytes_per_token=mib // 64, max_num_seqs=32, kv_cache_mib=128, requested_len=None
    )
    assert (slots, max_len) == (2, 4096) and slots * max_len * (mib // 64) <= 128 * mib
    # An explicit --max-model-len is kept; fewer sequences run at once.
    assert plan_cache(
        model_len=32768, bytes_per_token=mib // 64, max_num_seqs=32, kv_cache_mib=128, requested_len=8192
    ) == (1, 8192)


def test_engine_choice_follows_the_checkpoint(tmp_path: Path, tiny_checkpoint: Path, qwen2_dir: Path) -> None:
    assert pick_engine(tiny_checkpoint) == "native" and pick_engine(qwen2_dir) == "native"
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert pick_engine(gpt2) == "transformers"
    assert "gpt2" in str(native_unsupported_reason(gpt2))
    sliding: dict[str, Any] = {"model_type": "qwen2", "use_sliding_window": True}
    (gpt2 / "config.json").write_text(json.dumps(sliding))
    assert pick_engine(gpt2) == "transformers"
    assert pick_engine(tmp_path / "missing") == "transformers"


def test_native_refuses_other_architectures(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModel, match="gpt2"):
        load(tmp_path)


def test_llama_with_attention_bias_matches_transformers(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """Llama's ``attention_bias`` puts a bias on o_proj too (Qwen2's are on q/k/v only)."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir = tmp_path / "biased"
    shutil.copytree(tiny_checkpoint, model_dir)
    config = LlamaConfig.from_pretrained(model_dir)
    config.attention_bias = True
    torch.manual_seed(3)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.bias.normal_(0, 0.5)
    model.save_pretrained(model_dir, safe_serialization=True)
    reference = Reference(model_dir)
    prompt = reference.prompt_ids("class Stack:")
    produced = run_to_end(Batcher(load(model_dir), max_num_seqs=2), {0: [(1, prompt, 12)]})
    assert produced[1] == reference.greedy(prompt, 12)


async def test_stop_ends_requests_in_flight_with_not_ready(tiny_checkpoint: Path) -> None:
    """At shutdown, what is still running gets 503 (retry elsewhere), not 500."""
    import contextlib

    from skyfabric.engine.base import EngineNotReady, GenerationRequest
    from skyfabric.engine.native_engine import NativeEngine

    engine = NativeEngine(tiny_checkpoint, max_num_seqs=2)
    await engine.start()
    try:
        assert engine.ready and engine.vocab_size == len(engine.tokenizer)
        request = GenerationRequest(prompt_ids=[5, 6, 7], max_tokens=900, ignore_eos=True)
        async with contextlib.aclosing(engine.generate(request)) as stream:
            await anext(stream)
            await engine.stop()
            with pytest.raises(EngineNotReady):
                async for _ in stream:
                    pass
        assert not engine.ready and engine.fatal is None
    finally:
        await engine.stop()
