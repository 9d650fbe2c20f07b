"""Fixtures for the embedded engine: a tiny random Llama checkpoint built from scratch in a temp dir.

Building the checkpoint here (rather than shipping one) also exercises the "load any local HF checkpoint
directory" path of the engine: config.json + model.safetensors + tokenizer.json + tokenizer_config.json with a
chat template, exactly what ``skyfabric grow`` writes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

#: Renders content verbatim after the role header, which is what ``continue_final_message`` needs.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_CORPUS_LINES = [
    "def add(a, b):\n    return a + b\n",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
    "    def push(self, x):\n        self.items.append(x)\n",
    "for i in range(10):\n    print(i * i)\n",
    "The quick brown fox jumps over the lazy dog. ",
    "Continuous batching lets many requests share one forward pass. ",
    "Café, naïve, résumé, jalapeño, Zürich, São Paulo. ",
    "日本語のテキストと中文文本 mixed with English words. ",
    "Emoji: 🚀 🐍 ✨ 👍🏽 and symbols → ≤ ≥ ∑ π. ",
    "import os\nimport sys\nprint(os.getcwd(), sys.argv)\n",
    "SELECT name, count(*) FROM users GROUP BY name;\n",
    'fn main() { println!("hello, world"); }\n',
]


def build_tiny_checkpoint(out_dir: Path, *, max_position_embeddings: int = 1024, seed: int = 0) -> Path:
    """Write a tiny random Llama + byte-level BPE tokenizer checkpoint to ``out_dir`` and return it.

    The weights are random but deterministic (seeded) and scaled up a little so greedy decoding has clear
    margins between the top logits: that keeps greedy output stable across batch shapes.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [line * 4 for line in _CORPUS_LINES] * 8  # a few KB of text
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|end|>",
        unk_token="<unk>",
        pad_token="</s>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        initializer_range=0.2,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    # Only whole words (" foo") and EOS can win the argmax: greedy text then re-tokenizes to the same ids,
    # as a trained model's output mostly does, which the continuation tests rely on. Other rows get logit 0.
    allowed = torch.zeros(config.vocab_size, dtype=torch.bool)
    for token_id in range(config.vocab_size):
        text = fast.decode([token_id])
        allowed[token_id] = len(text) > 1 and text[0] == " " and text[1:].isalpha()
    allowed[fast.eos_token_id] = True
    with torch.no_grad():
        model.lm_head.weight[~allowed] = 0.0
        model.lm_head.weight[fast.eos_token_id] *= 1.6  # EOS often enough that ignore_eos/min_tokens matter
    model.save_pretrained(out_dir, safe_serialization=True)
    # The generation config carries EOS like a trained checkpoint would.
    (out_dir / "generation_config.json").write_text(
        json.dumps({"bos_token_id": fast.bos_token_id, "eos_token_id": fast.eos_token_id})
    )
    return out_dir


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama checkpoint directory (session-scoped: building it takes a second)."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama")


def free_port() -> int:
    """Ask the kernel for a free loopback port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ReplicaProcess:
    """A replica running in a child process, as the fleet supervisor runs it."""

    proc: subprocess.Popen[bytes]
    base_url: str
    model: str
    log_path: Path


def start_replica(model_dir: Path, log_path: Path, *extra: str, timeout: float = 60.0) -> ReplicaProcess:
    """Start ``python -m skyfabric.engine.replica`` on a free port and wait for /health to answer 200."""
    import urllib.request

    port = free_port()
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = dict(os.environ)
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable, "-m", "skyfabric.engine.replica",
        "--model-dir", str(model_dir), "--port", str(port), "--served-model-name", "tiny",
        *extra,
    ]  # fmt: skip
    log = log_path.open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"replica exited early:\n{log_path.read_text(errors='replace')}")
        try:
            with urllib.request.urlopen(base_url + "/health", timeout=1) as resp:
                if resp.status == 200:
                    return ReplicaProcess(proc, base_url, "tiny", log_path)
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"replica not healthy in {timeout}s:\n{log_path.read_text(errors='replace')}")


@pytest.fixture(scope="module", params=["native", "transformers"])
def replica(
    request: pytest.FixtureRequest, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ReplicaProcess]:
    """One replica subprocess per built-in engine, shared by a test module (startup is the slow part)."""
    log_path = tmp_path_factory.mktemp("replica") / "replica.log"
    rep = start_replica(tiny_checkpoint, log_path, "--max-num-seqs", "32", "--engine", request.param)
    try:
        yield rep
    finally:
        rep.proc.terminate()
        try:
            rep.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            rep.proc.kill()
            rep.proc.wait()


class Reference:
    """The checkpoint loaded with plain transformers: its tokenizer, and greedy decoding without batching."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._torch = torch
        torch.set_num_threads(1)  # the replica subprocess needs the other core; oversubscribed OpenMP crawls
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, local_files_only=True, dtype=torch.float32
        )
        self.model.eval()

    def chat_ids(self, messages: list[dict[str, str]], *, continue_final_message: bool = False) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=not continue_final_message,
            continue_final_message=continue_final_message,
        )
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def greedy(self, prompt_ids: list[int], n: int) -> list[int]:
        """Argmax ``n`` times, never stopping at EOS (what ``ignore_eos`` + temperature 0 must reproduce)."""
        torch = self._torch
        ids = list(prompt_ids)
        with torch.no_grad():
            for _ in range(n):
                logits = self.model(torch.tensor([ids])).logits[0, -1]
                ids.append(int(logits.argmax()))
        return ids[len(prompt_ids) :]

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))


@pytest.fixture(scope="session")
def reference(tiny_checkpoint: Path) -> Reference:
    """Ground truth for greedy outputs and token counts."""
    return Reference(tiny_checkpoint)


def read_metrics(base_url: str) -> dict[str, float]:
    """Scrape /metrics into {"name": value summed over labels, "name{labels}": value}."""
    import urllib.request

    with urllib.request.urlopen(base_url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, value = line.rsplit(" ", 1)
        name = series.split("{", 1)[0]
        values[series] = float(value)
        values[name] = values.get(name, 0.0) + float(value)
    return values
