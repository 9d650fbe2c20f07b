"""Coding-agent prompts: a model extended past its training window, tools in the chat template, a replica
that answers a long system prompt with tools (the shipped model), and `skyfabric up` sized for them."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import openai
import pytest
import torch
import yaml
from click.testing import CliRunner

from skyfabric.engine import DEFAULT_MODEL_DIR
from skyfabric.engine.batcher import Batcher
from skyfabric.engine.grow import extend_context, grow_command
from skyfabric.engine.llama import LlamaFamilyModel
from skyfabric.engine.sampler import SamplingParams

from .conftest import Reference, start_replica

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a file of the repository.",
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string"}},
                "required": ["path"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "run_tests",
            "description": "Run the test suite and return its output.",
            "parameters": {"type": "object", "properties": {}},
        },
    },
]


def test_extended_checkpoint_runs_alike_in_transformers_and_the_native_engine(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """Past the training window (1,024 here) both engines read the RoPE scaling the same way."""
    model_dir = tmp_path / "extended"
    shutil.copytree(tiny_checkpoint, model_dir)
    rope = extend_context(model_dir, 4096)
    assert rope["rope_type"] == "llama3" and rope["factor"] == 4.0
    assert rope["original_max_position_embeddings"] == 1024
    config = json.loads((model_dir / "config.json").read_text())
    assert config["max_position_embeddings"] == 4096
    assert json.loads((model_dir / "tokenizer_config.json").read_text())["model_max_length"] == 4096
    reference = Reference(model_dir)
    gen = torch.Generator().manual_seed(5)
    prompt = [int(t) for t in torch.randint(10, 500, (1500,), generator=gen)]
    torch.set_num_threads(1)
    model = LlamaFamilyModel(
        model_dir, num_slots=2, max_len=2048, dtype=torch.float32, device=torch.device("cpu")
    )
    batcher = Batcher(model, max_num_seqs=2, max_num_batched_tokens=512)
    batcher.add(1, prompt, max_tokens=6, params=SamplingParams(temperature=0.0))
    produced: list[int] = []
    while batcher.has_work:
        produced += [token for _, token, _ in batcher.step()]
    assert produced == reference.greedy(prompt, 6)
    # Extending again keeps the original window (the factor is from it, not from the last extension).
    assert extend_context(model_dir, 8192)["factor"] == 8.0


def test_grow_no_train_extends_in_place(tiny_checkpoint: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    shutil.copytree(tiny_checkpoint, model_dir)
    result = CliRunner().invoke(
        grow_command, ["--no-train", "--extend-context", "2048", "--out", str(model_dir)]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((model_dir / "config.json").read_text())["rope_parameters"]["factor"] == 2.0
    result = CliRunner().invoke(grow_command, ["--no-train", "--out", str(model_dir)])
    assert result.exit_code != 0 and "--extend-context" in result.output


def test_shipped_model_takes_32k_and_renders_tools() -> None:
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(DEFAULT_MODEL_DIR)
    assert config.max_position_embeddings >= 32768
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    messages = [
        {"role": "system", "content": "You are a coding agent."},
        {"role": "user", "content": [{"type": "text", "text": "Fix the bug."}]},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "read_file", "arguments": '{"path": "a.py"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "x = 1"},
    ]
    text = tok.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|system|>\n# Tools\n{")
    assert '"name": "read_file"' in text and '"name": "run_tests"' in text
    assert "<|user|>\nFix the bug.<|end|>" in text
    assert '<tool_call>{"name": "read_file", "arguments": "{\\"path\\": \\"a.py\\"}"}</tool_call>' in text
    assert text.endswith("<|tool|>\nx = 1<|end|>\n<|assistant|>\n")


def test_replica_answers_a_coding_client_request(tmp_path: Path) -> None:
    """The shipped model behind a replica sized as `skyfabric up` sizes it: a system prompt of ~3k tokens
    (about ten times the training window) with tools gets an answer, and the tools reach the prompt."""
    from skyfabric.control.supervisor import REPLICA_ENV

    rep = start_replica(
        DEFAULT_MODEL_DIR, tmp_path / "replica.log", "--engine", "native", "--max-num-seqs", "4",
        "--max-model-len", REPLICA_ENV["SKYFABRIC_MAX_MODEL_LEN"], "--kv-cache-mib", "768", timeout=120,
    )  # fmt: skip
    try:
        client = openai.OpenAI(base_url=rep.base_url + "/v1", api_key="x", max_retries=0, timeout=300)
        source = (Path(json.__file__).parent / "decoder.py").read_text()
        system = "You are a coding agent working in this repository.\n\n" + source
        messages = [{"role": "system", "content": system}, {"role": "user", "content": "Fix the decoder."}]
        with_tools = client.chat.completions.create(
            model="tiny",
            messages=messages,
            tools=TOOLS,
            max_tokens=8,
            temperature=0,  # type: ignore[arg-type]
        )
        assert with_tools.choices[0].finish_reason in ("stop", "length")
        assert with_tools.usage is not None and with_tools.usage.prompt_tokens > 2000
        without = client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=1,
            temperature=0,  # type: ignore[arg-type]
        )
        assert without.usage is not None and with_tools.usage.prompt_tokens > without.usage.prompt_tokens + 40
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(
                model="tiny",
                messages=messages,
                tools="read_file",
                max_tokens=1,  # type: ignore[arg-type]
            )
    finally:
        rep.proc.terminate()
        try:
            rep.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            rep.proc.kill()


def test_embedded_fleet_declares_the_long_context() -> None:
    """`skyfabric up`: the gateway's context length for the model and its replicas' --max-model-len agree."""
    from skyfabric.control.supervisor import REPLICA_ENV

    fleet = yaml.safe_load(
        (Path(__file__).resolve().parents[2] / "src/skyfabric/control/fleets/embedded.yaml").read_text()
    )
    (model,) = fleet["models"]
    assert model["context_length"] == int(REPLICA_ENV["SKYFABRIC_MAX_MODEL_LEN"]) >= 32768
