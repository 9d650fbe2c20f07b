"""``skyfabric grow`` end to end on a toy corpus: the directory it writes must be a loadable HF checkpoint.

The budget is a few thousand tokens, so the model learns nothing; what is tested is the plumbing that the
shipped model relies on (tokenizer + chat template + weights + generation config + model card).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from click.testing import CliRunner

from skyfabric.engine.grow import (
    END,
    GrowParams,
    Source,
    _conjugate,
    build_documents,
    extract_functions,
    grow,
    grow_command,
    lr_factor,
    render_chat,
)

_MODULE = '''"""A toy module."""

import math


def area(radius):
    """Return the area of a circle."""
    return math.pi * radius * radius


class Counter:
    def __init__(self):
        self.count = 0

    def bump(self, step=1):
        """Increment the counter."""
        self.count += step
        return self.count


def reverse(text):
    """Reverse a string."""
    return text[::-1]
'''


def _write_corpus(root: Path) -> Path:
    """A handful of small modules, plus a test directory and a broken file that must be skipped."""
    for i in range(6):
        (root / "pkg" / f"mod{i}.py").parent.mkdir(parents=True, exist_ok=True)
        (root / "pkg" / f"mod{i}.py").write_text(_MODULE.replace("circle", f"circle number {i}"))
    (root / "tests").mkdir()
    (root / "tests" / "test_x.py").write_text("assert False\n")
    (root / "pkg" / "latin1.py").write_bytes(b"# \xe9\n")
    return root


@pytest.fixture(scope="module")
def grown(tmp_path_factory: pytest.TempPathFactory) -> tuple[GrowParams, Path]:
    """Grow once per module (a few seconds) and share the output directory between the tests."""
    corpus = _write_corpus(tmp_path_factory.mktemp("corpus"))
    params = GrowParams(
        corpus=(corpus,),
        out=tmp_path_factory.mktemp("grown") / "toy-model",
        context=32,
        tokens=4 * 32 * 8,
        batch_size=4,
        vocab_size=320,
        progress=False,
    )
    return params, grow(params)


def test_output_loads_and_generates(grown: tuple[GrowParams, Path]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out = grown
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert (out / "tokenizer_config.json").is_file() and (out / "loss.png").stat().st_size > 0
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert tokenizer.eos_token == "<|eos|>" and tokenizer.pad_token == "<|pad|>"
    inputs = tokenizer("def area(radius):", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 6
    assert tokenizer.convert_tokens_to_ids(END) in model.generation_config.eos_token_id


def test_chat_template_supports_continue_final_message(grown: tuple[GrowParams, Path]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(grown[1], local_files_only=True)
    messages = [
        {"role": "user", "content": "Write a function that reverses a string."},
        {"role": "assistant", "content": "def reverse(text):\n    return"},
    ]
    continued = tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert continued.endswith("<|assistant|>\ndef reverse(text):\n    return")
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    # Serving renders with the Jinja template, training with render_chat: they must agree exactly.
    assert prompt == render_chat(messages[:1], add_generation_prompt=True)
    assert tokenizer.apply_chat_template(messages, tokenize=False) == render_chat(messages)


def test_model_card_names_the_command(grown: tuple[GrowParams, Path]) -> None:
    params, out = grown
    card = (out / "MODEL_CARD.md").read_text()
    assert params.command_line().startswith("skyfabric grow --size tiny")
    assert params.command_line() in card
    assert "6 files" in card  # the tests/ directory and the non-UTF-8 file were skipped
    assert "final val loss" in card and "## Samples" in card


def test_cli_exposes_the_macro_parameters() -> None:
    result = CliRunner().invoke(grow_command, ["--help"])
    assert result.exit_code == 0
    for option in ("--size", "--context", "--corpus", "--tokens", "--vocab-size", "--seed", "--threads"):
        assert option in result.output
    for option in ("--out", "--batch-size", "--lr"):
        assert option in result.output


def test_chat_samples_come_from_functions() -> None:
    source = Source(module="pkg.mod", text=_MODULE)
    names = [f.name for f in extract_functions(source, max_chars=1000)]
    assert names == ["area", "__init__", "bump", "reverse"]
    assert _conjugate("Reverse a string.") == "reverses a string."
    assert _conjugate("Apply the patch.") == "applies the patch."
    assert _conjugate("Frobnicate it.") is None
    params = GrowParams(context=64, chat_fraction=0.5)
    documents = build_documents([source] * 4, params, random.Random(0))
    chats = [d for d in documents if d.startswith("<|user|>\n")]
    assert chats and all("<|assistant|>\n" in d and d.endswith(f"{END}\n") for d in chats)


def test_lr_schedule_warms_up_then_decays() -> None:
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10) == pytest.approx(0.1)
