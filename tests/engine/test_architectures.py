"""The built-in engine serves real architectures beyond Llama: tiny random Qwen2 and Mistral checkpoints.

Each checkpoint is written here the way its family ships (Qwen2: ChatML template, no BOS, q/k/v biases;
Mistral: ``[INST]`` template with BOS, sliding-window config), served by a replica subprocess, and its greedy
output through the OpenAI API must equal plain transformers' argmax decoding of the same prompt.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from .conftest import _CORPUS_LINES, Reference, ReplicaProcess, start_replica

pytestmark = pytest.mark.timeout(120)

QWEN2_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST] "
    "{{ message['content'] }} [/INST]{% elif message['role'] == 'assistant' %}{{ message['content'] }}"
    "{{ eos_token }}{% else %}{{ message['content'] }}\n{% endif %}{% endfor %}"
)


def build_checkpoint(out_dir: Path, arch: str) -> Path:
    """Write a tiny random ``arch`` ("qwen2" or "mistral") checkpoint with a byte-level BPE tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import (
        MistralConfig,
        MistralForCausalLM,
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    qwen = arch == "qwen2"
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] if qwen else ["<unk>", "<s>", "</s>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([line * 4 for line in _CORPUS_LINES] * 4, trainer=trainer)
    if qwen:
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
        )
        fast.chat_template = QWEN2_TEMPLATE
    else:
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos_id)])
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
        )
        fast.chat_template = MISTRAL_TEMPLATE
    fast.save_pretrained(out_dir)

    torch.manual_seed(1)
    common = dict(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=qwen,  # Qwen2's small models tie embeddings; Mistral's don't
    )
    if qwen:
        model: torch.nn.Module = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False))
    else:
        config = MistralConfig(**common, bos_token_id=fast.bos_token_id, sliding_window=256)
        model = MistralForCausalLM(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": fast.eos_token_id}))
    return out_dir


@pytest.fixture(scope="module", params=["qwen2", "mistral"])
def arch_replica(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, ReplicaProcess, Reference]]:
    arch: str = request.param
    ckpt = build_checkpoint(tmp_path_factory.mktemp(arch) / f"tiny-{arch}", arch)
    rep = start_replica(ckpt, ckpt.parent / "replica.log", "--max-num-seqs", "4")
    try:
        yield arch, rep, Reference(ckpt)
    finally:
        rep.proc.terminate()
        try:
            rep.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            rep.proc.kill()
            rep.proc.wait()


def test_the_replica_serves_the_architecture_on_the_native_engine(
    arch_replica: tuple[str, ReplicaProcess, Reference],
) -> None:
    """``--engine auto`` must pick the native engine for Qwen2 and Mistral (not fall back to transformers)."""
    arch, rep, reference = arch_replica
    assert reference.model.config.model_type == arch  # the fixture built what the test is about
    log = rep.log_path.read_text()
    assert f"--engine auto: native for {reference.model.name_or_path}" in log, log


def test_chat_and_completions_match_reference_greedy(
    arch_replica: tuple[str, ReplicaProcess, Reference],
) -> None:
    arch, rep, reference = arch_replica
    client = openai.OpenAI(base_url=rep.base_url + "/v1", api_key="unused", max_retries=0, timeout=30)
    messages = [{"role": "user", "content": "def fib(n):"}]
    chat = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    prompt_ids = reference.chat_ids(messages)
    if arch == "qwen2":  # ChatML, no BOS
        assert prompt_ids[0] == reference.tokenizer.convert_tokens_to_ids("<|im_start|>")
    else:
        assert prompt_ids[0] == reference.tokenizer.bos_token_id  # [INST] template opens with BOS
    assert chat.usage is not None
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (len(prompt_ids), 10)
    content = chat.choices[0].message.content
    assert content and content == reference.decode(reference.greedy(prompt_ids, 10))

    prompt = "for i in range(10):"
    stream = client.completions.create(
        model="tiny",
        prompt=prompt,
        max_tokens=12,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert text and text == reference.decode(reference.greedy(reference.prompt_ids(prompt), 12))
