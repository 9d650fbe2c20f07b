"""Choosing the next token of every running sequence from one batch of logits.

Greedy rows (``temperature <= 0``) take the argmax; when every row is greedy, that is all a step does. Sampled
rows get temperature, top-k and top-p, then a draw by the exponential race (argmax of p / Exp(1), as vLLM
does: far cheaper than ``torch.multinomial`` on CPU). A row with a ``seed`` draws from a generator seeded by
(seed, position), so its output does not depend on what else shares the batch. ``min_tokens`` makes a
sequence's stop tokens impossible until it has generated that many.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

_NEG_INF = float("-inf")


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """One sequence's sampling controls, already resolved against the model's defaults."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    min_tokens: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass(frozen=True, slots=True)
class Row:
    """What the sampler needs to know about one row of the batch."""

    params: SamplingParams
    generated: int  # tokens this sequence has produced so far
    banned_ids: tuple[int, ...]  # impossible while generated < min_tokens
    #: Guided decoding: the only ids this row may take (None: any). Rows without it cost nothing extra.
    allowed: torch.Tensor | None = None


def sample(logits: torch.Tensor, rows: Sequence[Row], generator: torch.Generator | None = None) -> list[int]:
    """Next token id for each row of ``logits`` ([B, vocab], float32; modified in place).

    Greedy batches stay on the logits' device; anything else is drawn on the CPU, where the generators are.
    """
    vocab = logits.size(-1)
    banned = [
        (i, [t for t in row.banned_ids if 0 <= t < vocab])
        for i, row in enumerate(rows)
        if row.generated < row.params.min_tokens and row.banned_ids
    ]
    sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
    guided = [i for i, row in enumerate(rows) if row.allowed is not None]
    if sampled or banned or guided:
        logits = logits.cpu()
    for i, ids in banned:
        if ids:
            logits[i, ids] = _NEG_INF
    for i in guided:
        allowed = rows[i].allowed
        assert allowed is not None
        keep = logits[i, allowed]
        logits[i].fill_(_NEG_INF)
        logits[i, allowed] = keep
    if not sampled:
        return [int(t) for t in logits.argmax(dim=-1).tolist()]
    tokens = logits.argmax(dim=-1)
    index = torch.tensor(sampled, dtype=torch.long)
    chosen = _draw(logits[index], [rows[i] for i in sampled], generator)
    tokens[index] = chosen
    return [int(t) for t in tokens.tolist()]


def _draw(logits: torch.Tensor, rows: Sequence[Row], generator: torch.Generator | None) -> torch.Tensor:
    temperature = torch.tensor([r.params.temperature for r in rows], dtype=logits.dtype)
    logits = logits / temperature.unsqueeze(-1)
    vocab = logits.size(-1)
    ks = [r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in rows]
    if min(ks) < vocab:
        top = torch.topk(logits, max(ks), dim=-1).values
        kth = top.gather(-1, torch.tensor(ks, dtype=torch.long).sub(1).unsqueeze(-1))
        logits = logits.masked_fill(logits < kth, _NEG_INF)
    top_p = torch.tensor([r.params.top_p for r in rows], dtype=logits.dtype)
    if bool((top_p < 1.0).any()):
        sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p).unsqueeze(-1)
        remove[..., -1:] = False
        remove = remove.scatter(-1, sorted_idx, remove)
        logits = logits.masked_fill(remove, _NEG_INF)
    probs = torch.softmax(logits, dim=-1)
    race = torch.empty_like(probs)
    for i, row in enumerate(rows):
        if row.params.seed is None:
            race[i].exponential_(generator=generator)
        else:
            seeded = torch.Generator()
            seeded.manual_seed(_mix(row.params.seed, row.generated))
            race[i].exponential_(generator=seeded)
    return (probs / race).argmax(dim=-1)


def _mix(seed: int, position: int) -> int:
    """A per-(seed, position) generator seed: the same request gives the same text in any batch."""
    return ((seed * 6364136223846793005 + position * 1442695040888963407) >> 17) & 0x7FFFFFFFFFFF
