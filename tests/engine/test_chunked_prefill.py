"""The tiled, resumable prefill (``engine/chunked_prefill.py``) against the one-pass prefill.

Small blocks and key tiles that do not divide the prompt, so every kind of unit runs: a chunk's own
causal tile, several past tiles merged by log-sum-exp, ragged last tiles, padding rows; and a sliding
window (Mistral's) that cuts tiles in the middle.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from skyfabric.engine.chunked_prefill import ChunkedPrefill
from skyfabric.engine.llama import LlamaFamilyModel

from .test_architectures import build_checkpoint


def load(model_dir: Path) -> LlamaFamilyModel:
    torch.set_num_threads(1)
    return LlamaFamilyModel(
        model_dir, num_slots=3, max_len=400, dtype=torch.float32, device=torch.device("cpu")
    )


@pytest.fixture(scope="module")
def windowed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_dir = build_checkpoint(tmp_path_factory.mktemp("mistral") / "tiny-mistral-w", "mistral")
    config = json.loads((model_dir / "config.json").read_text())
    config["sliding_window"] = 24
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir


@pytest.mark.parametrize("arch", ["llama", "mistral-window"])
def test_units_give_the_one_pass_logits_and_cache(arch: str, tiny_checkpoint: Path, windowed: Path) -> None:
    model = load(tiny_checkpoint if arch == "llama" else windowed)
    assert (model.window is not None) is (arch != "llama")
    assert model.num_heads > model.num_kv_heads  # grouped-query: the folded tiles are exercised
    vocab = model.embed.shape[0]
    prompt = [int(t) for t in torch.randint(3, vocab, (301,), generator=torch.Generator().manual_seed(3))]
    whole = model.prefill([prompt], [0])
    job = ChunkedPrefill(model, prompt, 1, 0, block=48, key_tile=40)
    positions = []
    units = 0
    while job.logits is None:
        job.step()
        units += 1
        positions.append(job.position)
    assert job.chunks == -(-301 // 48) and units > 2 * job.chunks * len(model.layers)
    assert positions == sorted(positions) and positions[-1] == 301
    torch.testing.assert_close(job.logits, whole, rtol=1e-4, atol=1e-4)
    for k_cache, v_cache in zip(model.k_cache, model.v_cache, strict=True):
        torch.testing.assert_close(k_cache[1, :, :301], k_cache[0, :, :301], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v_cache[1, :, :301], v_cache[0, :, :301], rtol=1e-5, atol=1e-5)
    # Resuming after a cached head (a prefix hit): the rest alone gives the same last logits.
    rest = ChunkedPrefill(model, prompt[160:], 2, 160, block=48, key_tile=40)
    for k_cache, v_cache in zip(model.k_cache, model.v_cache, strict=True):
        k_cache[2, :, :160] = k_cache[0, :, :160]
        v_cache[2, :, :160] = v_cache[0, :, :160]
    torch.testing.assert_close(rest.run(), whole, rtol=1e-4, atol=1e-4)
