"""``skyfabric grow``: train the embedded code model from scratch, on a laptop-class CPU, in minutes.

The project ships its own small model instead of downloading one because the engine must work offline, in
CI and on hosts with no GPU, and because a model we grow ourselves has a known provenance (its corpus is
the CPython standard library of the machine that grew it, see MODEL_CARD.md). The model is tiny: it is a
plumbing model that proves the serving path (tokenizer, chat template, continuous batching, streaming)
end to end, not a useful assistant.

Pipeline: collect ``*.py`` files -> train a byte-level BPE -> build a token stream of whole files plus
chat-wrapped functions -> train a Llama-shaped causal LM with AdamW -> save weights, tokenizer, model card
and loss curve in a directory that ``transformers.AutoModelForCausalLM.from_pretrained`` loads offline.
"""

from __future__ import annotations

import ast
import datetime as dt
import json
import math
import os
import platform
import random
import shlex
import sysconfig
import textwrap
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from skyfabric.engine import DEFAULT_MODEL_DIR

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

BOS, EOS, PAD, END = "<|bos|>", "<|eos|>", "<|pad|>", "<|end|>"
ROLES = ("user", "assistant", "system")
#: Special tokens get the first ids, in this order, so the ids are stable across corpora and vocab sizes.
SPECIAL_TOKENS = (BOS, EOS, PAD, "<|user|>", "<|assistant|>", "<|system|>", END)

#: ``<|role|>\n{content}<|end|>\n`` per message. The content is emitted verbatim (no trim filter) so that
#: HF's ``continue_final_message=True`` can find the final message and cut the text right after it. Tool
#: definitions (``tools=``) come first, one JSON object a line in a system block, as coding clients send
#: them; content given as a list of parts renders its text parts; an assistant's tool calls follow its content
#: as ``<tool_call>{json}</tool_call>`` lines. Without tools and with string content it renders exactly what
#: :func:`render_chat` does (the training format).
CHAT_TEMPLATE = (
    "{% if tools %}{{ '<|system|>\n# Tools\n' }}{% for tool in tools %}"
    "{{ (tool.function if tool.function is defined else tool) | tojson }}{{ '\n' }}"
    "{% endfor %}{{ '<|end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['tool_calls'] is defined and message['tool_calls'] %}"
    "{% for call in message['tool_calls'] %}"
    "{{ '\n<tool_call>' }}{{ (call.function if call.function is defined else call) | tojson }}"
    "{{ '</tool_call>' }}{% endfor %}{% endif %}"
    "{{ '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

#: Directory names skipped when walking a corpus: vendored packages, test suites (huge, repetitive, full
#: of deliberately broken code), codec tables and generated data that are not representative Python.
EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "encodings", "pydoc_data", "__pycache__"}
)
#: Files above this size are generated data (Unicode tables, pydoc topics) rather than code.
MAX_FILE_BYTES = 300_000

#: Docstring verbs that read well after "Write a function that ..." once conjugated ("Return" -> "returns").
_VERB_WORDS = """
add apply build calculate call check close compare compute construct convert copy count create decode delete
determine emit encode escape extract filter find format generate get handle initialize insert join load make
match merge normalize open parse print process quote raise read register remove render replace reset resolve
return reverse run save search send set sort split start stop strip test translate try unquote update validate
wrap write yield
"""
_VERBS = frozenset(_VERB_WORDS.split())


@dataclass(frozen=True)
class ModelShape:
    """Llama hyper-parameters of one ``--size``, with the peak learning rate that suits that width."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    lr: float


#: ``tiny`` is ~5 M parameters: it trains on one CPU core in ~20 minutes and weighs ~20 MB in float32.
SIZES: dict[str, ModelShape] = {
    "tiny": ModelShape(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=688, lr=2e-3),
    "small": ModelShape(hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1376, lr=1e-3),
    "base": ModelShape(hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2048, lr=6e-4),
}

#: Storage dtypes: bfloat16 halves the directory and runs faster on CPUs with AVX512-BF16/AMX; float32
#: is the portable choice. bfloat16 is kept only if it costs (almost) nothing in validation loss.
STORAGE_DTYPES = ("bfloat16", "float32")
BF16_TOLERANCE = 0.02

#: What we verified about serving this architecture with transformers' continuous batching on CPU.
CB_NOTE = (
    "Continuous batching (`model.generate_batch` / `model.init_continuous_batching`) runs on CPU with "
    '`attn_implementation="sdpa"` (the default) and with `"paged|eager"` (what `"eager"` is switched to). '
    "Flash attention is CUDA-only."
)


@dataclass
class GrowParams:
    """Everything that determines a grown model; the CLI options map one to one onto the first fields."""

    size: str = "tiny"
    context: int = 256
    corpus: tuple[Path, ...] = ()  # empty: the CPython standard library of the running interpreter
    tokens: int = 6_000_000
    vocab_size: int = 4096
    seed: int = 0
    threads: int = 1
    out: Path = DEFAULT_MODEL_DIR
    batch_size: int = 16
    lr: float | None = None  # None: the size's default (SIZES[size].lr)
    dtype: str = "bfloat16"  # storage dtype of the weights; training is always float32
    chat_fraction: float = 0.3
    val_fraction: float = 0.02
    warmup_fraction: float = 0.05
    progress: bool = True

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {sorted(SIZES)}, not {self.size!r}")
        if self.context < 8 or self.tokens < 1 or self.batch_size < 1 or self.threads < 1:
            raise ValueError("context >= 8, tokens >= 1, batch_size >= 1 and threads >= 1 are required")
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError("vocab_size must leave room for the 256 bytes and the special tokens")
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {STORAGE_DTYPES}, not {self.dtype!r}")
        if not 0.0 <= self.chat_fraction < 1.0 or not 0.0 < self.val_fraction < 0.5:
            raise ValueError("chat_fraction must be in [0, 1) and val_fraction in (0, 0.5)")
        self.corpus = tuple(Path(p) for p in self.corpus)
        self.out = Path(self.out)

    @property
    def peak_lr(self) -> float:
        """``--lr`` if given: narrower models tolerate (and need, in a short run) a higher peak rate."""
        return self.lr if self.lr is not None else SIZES[self.size].lr

    def command_line(self) -> str:
        """The ``skyfabric grow`` command for these parameters, every option explicit to reproduce them."""
        args = ["skyfabric", "grow", "--size", self.size, "--context", str(self.context)]
        args += ["--tokens", str(self.tokens), "--vocab-size", str(self.vocab_size)]
        args += ["--seed", str(self.seed), "--threads", str(self.threads)]
        args += ["--batch-size", str(self.batch_size), "--lr", repr(self.peak_lr), "--dtype", self.dtype]
        for path in self.corpus:
            args += ["--corpus", str(path)]
        if self.out.resolve() != DEFAULT_MODEL_DIR.resolve():
            args += ["--out", str(self.out)]
        return shlex.join(args)


@dataclass(frozen=True)
class Source:
    """One corpus file: ``module`` is its dotted path, used in chat prompts and the model card."""

    module: str
    text: str


@dataclass(frozen=True)
class Function:
    """A function (or method) lifted out of a source file to become the answer of a chat sample."""

    name: str
    doc_line: str
    code: str
    module: str


@dataclass
class TrainLog:
    """Loss history, kept for the progress bar, the plot and the model card."""

    steps: list[int] = field(default_factory=list)
    train: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val: list[float] = field(default_factory=list)
    tokens_per_step: int = 0


# --------------------------------------------------------------------------------------------- corpus


def default_corpus() -> tuple[Path, ...]:
    """The standard library is always there, is permissively licensed and is idiomatic Python."""
    return (Path(sysconfig.get_paths()["stdlib"]),)


def _is_excluded(relative: Path) -> bool:
    in_excluded_dir = any(part in EXCLUDED_DIRS for part in relative.parts[:-1])
    return in_excluded_dir or relative.name.startswith("_sysconfigdata")  # a dump of build variables


def _module_name(relative: Path) -> str:
    parts = list(relative.with_suffix("").parts)
    if len(parts) > 1 and parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _read_source(path: Path) -> str | None:
    """Text of a file worth training on, or None (binary, non-UTF-8, empty or generated-data sized)."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return None
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return text if text.strip() else None


def collect_sources(roots: Sequence[Path]) -> list[Source]:
    """All usable ``*.py`` files under ``roots``, sorted so the corpus (and the model) is deterministic."""
    sources: list[Source] = []
    for root in roots:
        files = (
            [(root, Path(root.name))]
            if root.is_file()
            else [(path, path.relative_to(root)) for path in sorted(root.rglob("*.py"))]
        )
        for path, relative in files:
            if _is_excluded(relative):
                continue
            text = _read_source(path)
            if text is not None:
                sources.append(Source(module=_module_name(relative), text=text))
    if not sources:
        raise click.UsageError(f"no usable *.py files under {', '.join(map(str, roots))}")
    return sources


# ------------------------------------------------------------------------------------------ chat data


def render_chat(messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """Python twin of :data:`CHAT_TEMPLATE`, so training data and serving use the exact same format."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}{END}\n" for m in messages)
    return text + ("<|assistant|>\n" if add_generation_prompt else "")


def _function_nodes(tree: ast.Module) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Top-level functions and methods of top-level classes: self-contained enough to be an answer."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node
        elif isinstance(node, ast.ClassDef):
            yield from (n for n in node.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))


def extract_functions(source: Source, max_chars: int) -> list[Function]:
    """Functions of ``source`` short enough to fit a training window, dedented, with their docstring line."""
    try:
        tree = ast.parse(source.text)
    except (SyntaxError, ValueError):
        return []
    lines = source.text.splitlines(keepends=True)
    found = []
    for node in _function_nodes(tree):
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        code = textwrap.dedent("".join(lines[start - 1 : node.end_lineno])).rstrip() + "\n"
        if len(code) <= max_chars and code.count("\n") >= 2:
            doc = (ast.get_docstring(node) or "").strip().split("\n")[0].strip()
            found.append(Function(name=node.name, doc_line=doc, code=code, module=source.module))
    return found


def _conjugate(doc_line: str) -> str | None:
    """Turn "Return the x." into "returns the x." to follow "Write a function that"; None if not a verb."""
    first, _, rest = doc_line.partition(" ")
    verb = first.lower()
    if verb not in _VERBS or not rest:
        return None
    if verb.endswith(("s", "sh", "ch", "x", "o")):
        verb += "es"
    elif verb.endswith("y") and verb[-2] not in "aeiou":
        verb = verb[:-1] + "ies"
    else:
        verb += "s"
    return f"{verb} {rest}"


def chat_prompt(function: Function, rng: random.Random) -> str:
    """A user request the function answers; varied so the model does not key on one phrasing."""
    choices = [f"Write Python code from {function.module}:", f"Write the `{function.name}` function."]
    if function.doc_line:
        choices += [function.doc_line, f"Write a Python function `{function.name}`. {function.doc_line}"]
        if (conjugated := _conjugate(function.doc_line)) is not None:
            choices += [f"Write a function that {conjugated}"] * 2
    return rng.choice(choices)


def build_documents(sources: Sequence[Source], params: GrowParams, rng: random.Random) -> list[str]:
    """Whole files plus chat samples (~``chat_fraction`` of the characters), shuffled together.

    Chat samples are extra copies of functions, not holes cut out of the files: the files stay valid
    Python and the model still sees every function in its module context.
    """
    documents = [source.text for source in sources]
    if params.chat_fraction <= 0:
        return documents
    max_chars = params.context * 4  # ~3-4 characters per token with a small code BPE
    candidates = [f for source in sources for f in extract_functions(source, max_chars)]
    rng.shuffle(candidates)
    budget = params.chat_fraction / (1 - params.chat_fraction) * sum(len(d) for d in documents)
    used = 0
    for function in candidates:
        if used >= budget:
            break
        messages = [{"role": "user", "content": chat_prompt(function, rng)}]
        messages.append({"role": "assistant", "content": function.code})
        documents.append(render_chat(messages))
        used += len(documents[-1])
    rng.shuffle(documents)
    return documents


# ------------------------------------------------------------------------------------------ tokenizer


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE: any input round-trips (no unknown token) and whitespace runs become single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, out: Path, context: int) -> None:
    """``tokenizer.json`` + a ``tokenizer_config.json`` that carries the chat template, for AutoTokenizer."""
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in (BOS, EOS, PAD)],
        "model_max_length": context,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def special_id(tokenizer: Tokenizer, token: str) -> int:
    """Id of a special token; they are always in the vocabulary because the trainer adds them first."""
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise KeyError(f"{token} is not in the vocabulary")
    return token_id


def encode_stream(tokenizer: Tokenizer, documents: Sequence[str]) -> torch.Tensor:
    """One long id stream with ``<|eos|>`` after every document, ready to be cut into training windows."""
    import torch

    eos = special_id(tokenizer, EOS)
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(list(documents), add_special_tokens=False):
        ids.extend(encoding.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def split_windows(stream: torch.Tensor, params: GrowParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the stream into ``context``-long windows; the tail (whole shuffled files) is the validation set."""
    n_windows = stream.numel() // params.context
    if n_windows < 2:
        raise click.UsageError(f"corpus too small: {stream.numel()} tokens for --context {params.context}")
    windows = stream[: n_windows * params.context].view(n_windows, params.context)
    n_val = min(max(1, round(n_windows * params.val_fraction)), n_windows // 2)
    return windows[:-n_val], windows[-n_val:]


# -------------------------------------------------------------------------------------------- model


def build_model(params: GrowParams, tokenizer: Tokenizer) -> LlamaForCausalLM:
    """A Llama with GQA: the architecture every serving stack (and transformers' CB) supports best."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = SIZES[params.size]
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=params.context,
        bos_token_id=special_id(tokenizer, BOS),
        eos_token_id=special_id(tokenizer, EOS),
        pad_token_id=special_id(tokenizer, PAD),
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def _optimizer(model: torch.nn.Module, params: GrowParams) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (decaying norms and biases just hurts small models)."""
    import torch

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=params.peak_lr, betas=(0.9, 0.95), eps=1e-8)


def lr_factor(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup then cosine decay to ``floor`` x peak: the usual recipe, robust at tiny batch sizes."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def batch_indices(n_windows: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[Any]:
    """Epochs of seeded permutations, so every window is seen once before any is seen twice."""
    import torch

    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        while order.numel() < batch_size:
            order = torch.cat([order, torch.randperm(n_windows, generator=generator)])
        yield order[:batch_size]
        order = order[batch_size:]


def evaluate(model: LlamaForCausalLM, windows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss over (at most 32 of) the validation windows: always the same ones, and cheap."""
    import torch

    model.eval()
    losses = []
    with torch.no_grad():
        for batch in windows[:32].split(batch_size):
            losses.append(model(input_ids=batch, labels=batch).loss.item())
    model.train()
    return sum(losses) / len(losses)


def train(
    model: LlamaForCausalLM, train_w: torch.Tensor, val_w: torch.Tensor, params: GrowParams
) -> TrainLog:
    """The causal-LM loop: AdamW, warmup + cosine, clipping at 1.0, periodic validation."""
    import torch
    from tqdm.auto import tqdm

    tokens_per_step = params.batch_size * params.context
    steps = max(1, params.tokens // tokens_per_step)
    warmup = max(1, round(steps * params.warmup_fraction))
    eval_every = max(1, steps // 20)
    optimizer = _optimizer(model, params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, warmup))
    generator = torch.Generator().manual_seed(params.seed)
    log = TrainLog(tokens_per_step=tokens_per_step)
    bar = tqdm(
        total=steps * tokens_per_step,
        unit="tok",
        unit_scale=True,
        disable=not params.progress,
        mininterval=2.0,
        desc=f"grow {params.size}",
    )
    model.train()
    started = time.perf_counter()
    for step, idx in enumerate(batch_indices(train_w.shape[0], params.batch_size, steps, generator)):
        batch = train_w[idx]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        log.steps.append(step + 1)
        log.train.append(loss.item())
        smooth = sum(log.train[-20:]) / len(log.train[-20:])
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            log.val_steps.append(step + 1)
            log.val.append(evaluate(model, val_w, params.batch_size))
            bar.write(f"step {step + 1}/{steps}  train {smooth:.3f}  val {log.val[-1]:.3f}")
        rate = (step + 1) * tokens_per_step / (time.perf_counter() - started)
        bar.set_postfix(loss=f"{smooth:.3f}", tok_s=f"{rate:.0f}", refresh=False)
        bar.update(tokens_per_step)
    bar.close()
    return log


# ------------------------------------------------------------------------------------------- output


def generation_defaults(tokenizer: Tokenizer) -> dict[str, Any]:
    """Stop on ``<|end|>`` (end of a chat turn) as well as ``<|eos|>``; mild sampling, as greedy loops."""
    return {
        "bos_token_id": special_id(tokenizer, BOS),
        "eos_token_id": [special_id(tokenizer, END), special_id(tokenizer, EOS)],
        "pad_token_id": special_id(tokenizer, PAD),
        "do_sample": True,
        "temperature": 0.7,
        "top_k": 40,
        "max_new_tokens": 128,
    }


def choose_dtype(model: LlamaForCausalLM, val_w: torch.Tensor, params: GrowParams, fp32_val: float) -> float:
    """Cast to the storage dtype unless bfloat16 measurably hurts; return the stored model's val loss.

    The check is part of the run (not a manual step) so the shipped dtype follows from the command line.
    """
    if params.dtype == "float32":
        return fp32_val
    model.bfloat16()
    bf16_val = evaluate(model, val_w, params.batch_size)
    if bf16_val > fp32_val + BF16_TOLERANCE:
        model.float()
        return fp32_val
    return bf16_val


def save_model(model: LlamaForCausalLM, tokenizer: Tokenizer, out: Path) -> None:
    """Safetensors weights (transformers 5 always writes them; no ``safe_serialization`` flag any more)."""
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(**generation_defaults(tokenizer))
    model.save_pretrained(out)
    (out / "model.safetensors").chmod(0o644)  # written 0600; it is package data, readable by all


def generate_samples(out: Path, seed: int) -> dict[str, str]:
    """Reload what was saved (proving it loads) and complete one code prompt and one chat request."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    chat = [{"role": "user", "content": "Write a function that reverses a string."}]
    chat_text = str(tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    prompts = {"def fibonacci(n):": "def fibonacci(n):", "chat: " + chat[0]["content"]: chat_text}
    samples = {}
    for title, prompt in prompts.items():
        torch.manual_seed(seed)
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=128)
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        completion = str(tokenizer.decode(new_tokens, skip_special_tokens=True))
        samples[title] = (prompt if title.startswith("def") else "") + completion
    return samples


def plot_loss(log: TrainLog, path: Path) -> None:
    """Train (raw and smoothed) and validation loss against tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [s * log.tokens_per_step for s in log.steps]
    smooth, acc = [], log.train[0]
    for value in log.train:
        acc = 0.95 * acc + 0.05 * value
        smooth.append(acc)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(x, log.train, alpha=0.25, color="tab:blue", linewidth=0.8)
    ax.plot(x, smooth, color="tab:blue", label="train (EMA)")
    ax.plot([s * log.tokens_per_step for s in log.val_steps], log.val, "o-", color="tab:orange", label="val")
    ax.set(xlabel="tokens seen", ylabel="cross-entropy (nats/token)", title="skyfabric grow")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@dataclass(frozen=True)
class CardFacts:
    """What the model card reports, gathered while growing."""

    params: GrowParams
    corpus: tuple[Path, ...]
    n_files: int
    n_bytes: int
    n_chat: int
    n_tokens: int
    n_parameters: int
    stored_dtype: str
    stored_val: float
    log: TrainLog
    wall_s: float
    samples: dict[str, str]


def write_model_card(facts: CardFacts, path: Path) -> None:
    """Provenance first: what it was trained on, how, and with which command, so anyone can regrow it."""
    p, log = facts.params, facts.log
    shape = SIZES[p.size]
    seen = len(log.steps) * log.tokens_per_step
    tail = log.train[-min(50, len(log.train)) :]
    samples = "\n\n".join(f"**{t}**\n\n```python\n{text.rstrip()}\n```" for t, text in facts.samples.items())
    card = f"""# {p.out.name}

A {facts.n_parameters / 1e6:.2f} M-parameter Llama-architecture causal language model for Python code,
grown from scratch by `skyfabric grow`. It exists to exercise skyfabric's embedded engine (tokenizer, chat
template, continuous batching, streaming) offline; it writes Python-looking text, not correct programs.

## Command

```
{p.command_line()}
```

Grown on {dt.date.today().isoformat()} in {facts.wall_s / 60:.1f} min wall time
({p.threads} CPU thread(s), {platform.processor() or platform.machine()}, torch {_version("torch")},
transformers {_version("transformers")}, tokenizers {_version("tokenizers")}).

## Corpus

- Source: {", ".join(f"`{c}`" for c in facts.corpus)} (`*.py`; skipped directories:
  {", ".join(sorted(EXCLUDED_DIRS))}; files over {MAX_FILE_BYTES // 1000} kB skipped)
- Python {platform.python_version()} standard library when no `--corpus` is given
- {facts.n_files} files, {facts.n_bytes / 1e6:.2f} MB of source
- plus {facts.n_chat} chat samples (`<|user|>` request from a docstring or module path, `<|assistant|>` the
  function's code), ~{p.chat_fraction:.0%} of the characters
- {facts.n_tokens:,} tokens after BPE; {p.val_fraction:.0%} of the windows held out for validation

## Model

| | |
|---|---|
| architecture | LlamaForCausalLM, {shape.layers} layers, hidden {shape.hidden}, {shape.heads} heads, \
{shape.kv_heads} KV heads (GQA), MLP {shape.intermediate} |
| parameters | {facts.n_parameters:,} |
| vocabulary | {p.vocab_size} byte-level BPE, special tokens {", ".join(f"`{t}`" for t in SPECIAL_TOKENS)} |
| context | {p.context} tokens |
| weights | {facts.stored_dtype} safetensors (`--dtype {p.dtype}`) |

## Training

| | |
|---|---|
| tokens seen | {seen:,} ({len(log.steps)} steps x {p.batch_size} x {p.context}) |
| optimizer | AdamW (0.9, 0.95), weight decay 0.1, peak lr {p.peak_lr}, \
warmup {p.warmup_fraction:.0%} + cosine |
| final train loss | {sum(tail) / len(tail):.3f} (mean of the last {len(tail)} steps) |
| final val loss | {log.val[-1]:.3f} (float32), {facts.stored_val:.3f} as stored ({facts.stored_dtype}) |
| seed | {p.seed} |

![loss](loss.png)

## Chat format

`<|role|>\\n{{content}}<|end|>\\n` per message; `add_generation_prompt` appends `<|assistant|>\\n`.
Generation stops on `<|end|>` or `<|eos|>` (see generation_config.json). The template supports
`continue_final_message=True`.

## Serving

{CB_NOTE}

## Samples

Sampled with the shipped generation config (temperature 0.7, top-k 40), seed {p.seed}, 128 new tokens.

{samples}
"""
    path.write_text(card, encoding="utf-8")


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


# --------------------------------------------------------------------------------------------- entry


def grow(params: GrowParams) -> Path:
    """Grow a model as described by ``params`` and return the directory it was saved to."""
    started = time.perf_counter()
    # tokenizers parallelises with rayon: cap it like torch so `--threads` is the whole CPU footprint.
    os.environ.setdefault("RAYON_RS_NUM_CPUS", str(params.threads))
    import torch

    torch.set_num_threads(params.threads)
    torch.manual_seed(params.seed)
    rng = random.Random(params.seed)

    corpus = params.corpus or default_corpus()
    sources = collect_sources(corpus)
    documents = build_documents(sources, params, rng)
    tokenizer = train_tokenizer(documents, params.vocab_size)
    stream = encode_stream(tokenizer, documents)
    train_w, val_w = split_windows(stream, params)

    model = build_model(params, tokenizer)
    log = train(model, train_w, val_w, params)

    out = params.out
    out.mkdir(parents=True, exist_ok=True)
    stored_val = choose_dtype(model, val_w, params, log.val[-1])
    save_model(model, tokenizer, out)
    save_tokenizer(tokenizer, out, params.context)
    plot_loss(log, out / "loss.png")
    samples = generate_samples(out, params.seed)
    facts = CardFacts(
        params=params,
        corpus=corpus,
        n_files=len(sources),
        n_bytes=sum(len(s.text.encode()) for s in sources),
        n_chat=len(documents) - len(sources),
        n_tokens=stream.numel(),
        n_parameters=sum(p.numel() for p in model.parameters()),
        stored_dtype=str(model.dtype).removeprefix("torch."),
        stored_val=stored_val,
        log=log,
        wall_s=time.perf_counter() - started,
        samples=samples,
    )
    write_model_card(facts, out / "MODEL_CARD.md")
    return out


# ----------------------------------------------------------------------------------------- long context

LONG_CONTEXT_SECTION = "## Long context"


def extend_context(model_dir: Path, context: int) -> dict[str, Any]:
    """Let a checkpoint take ``context`` tokens: Llama-3 RoPE scaling from its training window, no retraining.

    Llama 3.1's scheme (``rope_type: llama3``, which transformers, vLLM and the native engine all read):
    RoPE dimensions whose wavelength fits in a quarter of the training window keep their frequency (local
    order is unchanged), those longer than the window are slowed by ``context / window`` so that positions up
    to ``context`` stay within the angles seen in training, with a smooth ramp between. Also writes the
    tokenizer's ``model_max_length`` and the current chat template, and the card's long-context section.
    Returns the new ``rope_parameters``.
    """
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    rope = dict(config.get("rope_parameters") or {})
    window = int(rope.get("original_max_position_embeddings") or config["max_position_embeddings"])
    if context < window:
        raise click.UsageError(f"--extend-context {context} is below the training window {window}")
    rope = {
        "rope_type": "llama3",
        "rope_theta": float(rope.get("rope_theta", 10000.0)),
        "factor": context / window,
        "original_max_position_embeddings": window,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
    }
    config["rope_parameters"] = rope
    config["max_position_embeddings"] = context
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    tok_path = model_dir / "tokenizer_config.json"
    tok = json.loads(tok_path.read_text())
    tok["model_max_length"] = context
    tok["chat_template"] = CHAT_TEMPLATE
    tok_path.write_text(json.dumps(tok, indent=2) + "\n")
    card = model_dir / "MODEL_CARD.md"
    if card.exists():
        text = card.read_text()
        if LONG_CONTEXT_SECTION in text:
            head, _, rest = text.partition(LONG_CONTEXT_SECTION)
            tail = rest.split("\n## ", 1)
            text = head + (("## " + tail[1]) if len(tail) > 1 else "")
        section = (
            f"{LONG_CONTEXT_SECTION}\n\n"
            f"Trained on {window}-token windows; extended to {context:,} tokens without retraining by "
            f"`skyfabric grow --no-train --extend-context {context}`: RoPE scaling `llama3` (factor "
            f"{context / window:g}, low/high frequency factors 1/4, original window {window}) in "
            "config.json, read alike by transformers, vLLM and the native engine. Beyond "
            f"{window} tokens the model has seen no training text: it answers a long prompt (a coding "
            "client's system prompt and tools), mostly with nonsense. The chat template renders `tools` "
            "as a `# Tools` system block (one JSON definition a line), list-of-parts content, and "
            "assistant tool calls.\n\n"
        )
        marker = "## Chat format"
        text = text.replace(marker, section + marker) if marker in text else text + "\n" + section
        card.write_text(text)
    return rope


@click.command("grow")
@click.option(
    "--size",
    type=click.Choice(sorted(SIZES)),
    default="tiny",
    show_default=True,
    help="Model shape (tiny is ~5 M parameters).",
)
@click.option(
    "--context",
    type=click.IntRange(min=8),
    default=256,
    show_default=True,
    help="Maximum sequence length (training window).",
)
@click.option(
    "--corpus",
    type=click.Path(exists=True, path_type=Path),
    multiple=True,
    help="File or directory of *.py files (repeatable). Default: the Python standard library.",
)
@click.option(
    "--tokens",
    type=click.IntRange(min=1),
    default=6_000_000,
    show_default=True,
    help="Token budget to train on.",
)
@click.option(
    "--vocab-size", type=click.IntRange(min=512), default=4096, show_default=True, help="BPE vocabulary size."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for data order and init.")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="CPU threads for torch and the tokenizer.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_MODEL_DIR,
    help="Output directory. Default: the model shipped with skyfabric.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Windows per optimizer step.",
)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Peak learning rate. Default: per size (tiny 2e-3).",
)
@click.option(
    "--dtype",
    type=click.Choice(STORAGE_DTYPES),
    default="bfloat16",
    show_default=True,
    help="Storage dtype of the weights (bfloat16 falls back to float32 if it raises val loss).",
)
@click.option(
    "--extend-context",
    "extend_to",
    type=click.IntRange(min=8),
    default=None,
    help="Then let the model take this many tokens by RoPE scaling (llama3) from its training window.",
)
@click.option(
    "--no-train",
    is_flag=True,
    help="Do not train: only apply --extend-context to the checkpoint already in --out.",
)
def grow_command(
    size: str,
    context: int,
    corpus: tuple[Path, ...],
    tokens: int,
    vocab_size: int,
    seed: int,
    threads: int,
    out: Path,
    batch_size: int,
    lr: float | None,
    dtype: str,
    extend_to: int | None,
    no_train: bool,
) -> None:
    """Train skyfabric's embedded code model from scratch on CPU and save it for the local engine."""
    if no_train:
        if extend_to is None:
            raise click.UsageError("--no-train needs --extend-context")
        click.echo(f"rope_parameters: {extend_context(out, extend_to)}")
        return
    params = GrowParams(
        size=size,
        context=context,
        corpus=corpus,
        tokens=tokens,
        vocab_size=vocab_size,
        seed=seed,
        threads=threads,
        out=out,
        batch_size=batch_size,
        lr=lr,
        dtype=dtype,
    )
    click.echo(f"$ {params.command_line()}", err=True)
    path = grow(params)
    if extend_to is not None:
        extend_context(path, extend_to)
    click.echo(f"grown: {path}")


if __name__ == "__main__":
    grow_command()
