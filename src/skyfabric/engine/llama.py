"""The native engine's model: one forward pass for the Llama family (Llama, Qwen2, Mistral), in plain torch.

Why not call the transformers modules: at the sizes a CPU replica serves, a decode step is dominated by the
number of small ops, not by arithmetic. Here q/k/v and gate/up are fused into one matmul each, RoPE is one
table lookup per step, and the KV cache is a fixed tensor per layer written in place, so a step is a few dozen
ops where the transformers modules need several hundred. Weights still come from transformers (it reads any
checkpoint layout and tied embeddings), then are repacked once.

The KV cache holds ``num_slots`` sequences of up to ``max_len`` tokens each. Running sequences occupy slots
``0..B-1`` (the scheduler keeps them compact), so the decode step reads the cache through plain views; the
decode's padding rows write to the last position of their slots, which no sequence uses. A long prompt is
prefilled in chunks into a slot of its own, unit by unit between decode passes
(:meth:`LlamaFamilyModel.start_prefill`, :mod:`skyfabric.engine.chunked_prefill`). Beside the slots, an
optional block pool (``prefix_blocks`` blocks of ``block_size`` tokens) keeps prompt prefixes for reuse:
blocks are copied out of a slot once computed and into a new sequence's slot on a hit
(:mod:`skyfabric.engine.prefix_cache` decides which).
"""

from __future__ import annotations

import math
import mmap
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from skyfabric.engine.architectures import unsupported_reason
from skyfabric.engine.base import EngineError
from skyfabric.engine.chunked_prefill import BLOCK, ChunkedPrefill
from skyfabric.engine.shapes import bucket


class UnsupportedModel(EngineError):
    """The checkpoint is not one the native forward pass can run (use ``--engine transformers``)."""


@dataclass(frozen=True, slots=True)
class _Layer:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # [(H + 2*KV) * D, hidden]
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None  # Llama with attention_bias has one; Qwen2 has q/k/v biases only
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor


class LlamaFamilyModel:
    """Weights, RoPE table and slot KV cache of one checkpoint, with ``prefill`` and ``decode`` steps."""

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        num_slots: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
        config: Any = None,
        prefix_blocks: int = 0,
        block_size: int = 16,
    ) -> None:
        """``config``: the checkpoint's HF config when the caller has already read it (else read here).

        ``prefix_blocks``: size of the prefix-cache block pool (0: none), blocks of ``block_size`` tokens.
        """
        from transformers import AutoModelForCausalLM
        from transformers.activations import ACT2FN

        extra = {} if config is None else {"config": config}
        hf: Any = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=dtype, **extra)
        config = hf.config
        reason = unsupported_reason(config)
        if reason is not None:
            raise UnsupportedModel(f"the native engine cannot run this checkpoint: {reason}")
        self.config = config
        self.dtype = dtype
        self.device = device
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(config.num_key_value_heads or self.num_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.num_heads)
        self.intermediate = int(config.intermediate_size)
        self.eps = float(config.rms_norm_eps)
        self.act = ACT2FN[config.hidden_act]
        self.scale = self.head_dim**-0.5
        window = getattr(config, "sliding_window", None) if config.model_type == "mistral" else None
        self.window = int(window) if window and int(window) < max_len else None
        self.num_slots = num_slots
        self.max_len = max_len

        def take(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(device=device, dtype=dtype).contiguous()

        # Weights packed once for oneDNN on CPU: F.linear repacks them on every call, which made a bf16 decode
        # step ~a third slower and a float32 one at 16 sequences ~a fifth slower. Elsewhere, F.linear.
        self._packed = device.type == "cpu" and dtype in (torch.bfloat16, torch.float32) and _can_pack(dtype)

        def weight(t: torch.Tensor) -> torch.Tensor:
            w = take(t)
            return torch.ops.mkldnn._reorder_linear_weight(w, num_slots) if self._packed else w

        inner = hf.model
        self.embed = take(inner.embed_tokens.weight)
        self.norm = take(inner.norm.weight)
        self.lm_head = weight(hf.lm_head.weight)
        self.layers: list[_Layer] = []
        for block in inner.layers:
            attn, mlp = block.self_attn, block.mlp
            bias = None
            if attn.q_proj.bias is not None:
                bias = take(torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
            self.layers.append(
                _Layer(
                    input_norm=take(block.input_layernorm.weight),
                    qkv=weight(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])),
                    qkv_bias=bias,
                    o=weight(attn.o_proj.weight),
                    o_bias=None if attn.o_proj.bias is None else take(attn.o_proj.bias),
                    post_norm=take(block.post_attention_layernorm.weight),
                    gate_up=weight(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])),
                    down=weight(mlp.down_proj.weight),
                )
            )
        # RoPE through the checkpoint's own rotary module (every rope_type it knows), tabled once.
        positions = torch.arange(max_len).unsqueeze(0)
        probe = torch.zeros(1, dtype=torch.float32)
        cos, sin = inner.rotary_emb(probe, positions)
        self.cos = cos[0].to(device=device, dtype=dtype).contiguous()  # [max_len, D]
        self.sin = sin[0].to(device=device, dtype=dtype).contiguous()
        del hf, inner
        # A prefill token's matmul work in units of one context position of attention (the batcher's cost
        # model): per layer q/k/v/o and MLP weights against 2 * heads * head_dim multiply-adds per position.
        layer0 = self.layers[0]
        per_layer = sum(w.numel() for w in (layer0.qkv, layer0.o, layer0.gate_up, layer0.down))
        self.linear_units = per_layer / (2 * self.num_heads * self.head_dim)

        self.cache_dtype = cache_dtype(dtype, device)
        shape = (num_slots, self.num_kv_heads, max_len, self.head_dim)
        self.k_cache = [lazy_zeros(shape, self.cache_dtype, device) for _ in self.layers]
        self.v_cache = [lazy_zeros(shape, self.cache_dtype, device) for _ in self.layers]
        self._positions = torch.arange(max_len, device=device)
        self.block_size = block_size
        self.prefix_blocks = prefix_blocks
        pool = (prefix_blocks, self.num_kv_heads, block_size, self.head_dim)
        self.k_pool = [lazy_zeros(pool, self.cache_dtype, device) for _ in self.layers]
        self.v_pool = [lazy_zeros(pool, self.cache_dtype, device) for _ in self.layers]

    # ---------------------------------------------------------------------------------------------- pieces

    def _linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        if self._packed:
            return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return F.linear(x, w, b)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _mlp(self, layer: _Layer, h: torch.Tensor) -> torch.Tensor:
        x = F.rms_norm(h, (h.shape[-1],), layer.post_norm, self.eps)
        gate_up = self._linear(x, layer.gate_up)
        return self._linear(
            self.act(gate_up[..., : self.intermediate]) * gate_up[..., self.intermediate :], layer.down
        )

    def _qkv(
        self, layer: _Layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = h.shape[0]
        x = F.rms_norm(h, (h.shape[-1],), layer.input_norm, self.eps)
        qkv = self._linear(x, layer.qkv, layer.qkv_bias)
        heads = self.num_heads + self.num_kv_heads
        qk = self._rope(qkv[:, : heads * self.head_dim].view(n, heads, self.head_dim), cos, sin)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        v = qkv[:, heads * self.head_dim :].view(n, self.num_kv_heads, self.head_dim)
        return q, k, v

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self._linear(F.rms_norm(h, (h.shape[-1],), self.norm, self.eps), self.lm_head).float()

    # ----------------------------------------------------------------------------------------------- steps

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        """Run whole prompts (packed into one pass), fill their slots' cache; logits of each last token.

        The matmuls see all prompts' tokens at once (padded to a :func:`bucket`); attention runs per prompt
        (each sees only itself).
        """
        lengths = [len(p) for p in prompts]
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        total = starts[-1]
        padded = bucket(total)
        flat = [t for p in prompts for t in p] + [0] * (padded - total)
        tokens = torch.tensor(flat, dtype=torch.long, device=self.device)
        pos = torch.cat([self._positions[:n] for n in lengths] + [self._positions.new_zeros(padded - total)])
        window_mask = {n: self._prefill_mask(n) for n in set(lengths)} if self.window is not None else {}
        cos, sin = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)
        groups = self.num_heads // self.num_kv_heads
        h = self.embed[tokens]
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, h, cos, sin)
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # heads first
            outs = []
            for slot, n, a, b in zip(slots, lengths, starts, starts[1:], strict=False):
                self.k_cache[i][slot, :, :n] = k[:, a:b].to(self.cache_dtype)
                self.v_cache[i][slot, :, :n] = v[:, a:b].to(self.cache_dtype)
                mask = window_mask.get(n)
                keys, values = k[:, a:b], v[:, a:b]
                if mask is None and groups > 1:
                    # Expanded heads, no mask, 4-D: SDPA's flash kernel. Otherwise (3-D, enable_gqa) it fell
                    # back to its math kernel on CPU, which holds every score (6.4 GB a layer at 20k tokens).
                    keys, values = keys.repeat_interleave(groups, 0), values.repeat_interleave(groups, 0)
                outs.append(
                    F.scaled_dot_product_attention(  # 4-D: the CPU flash kernel takes no other shape
                        q[None, :, a:b],
                        keys[None],
                        values[None],
                        attn_mask=mask,
                        is_causal=mask is None,
                        scale=self.scale,
                        enable_gqa=mask is not None,
                    )[0]
                )
            if padded > total:
                outs.append(q.new_zeros(q.shape[0], padded - total, q.shape[2]))
            out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
            h = h + self._linear(out.transpose(0, 1).reshape(padded, -1), layer.o, layer.o_bias)
            h = h + self._mlp(layer, h)
        last = torch.tensor(starts[1:], device=self.device) - 1
        return self._logits(h[last])

    def _prefill_mask(self, n: int) -> torch.Tensor:
        span = self._positions[:n]
        assert self.window is not None
        return (span[None, :] <= span[:, None]) & (span[None, :] > span[:, None] - self.window)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, longest: int) -> torch.Tensor:
        """One token for each of the sequences in slots ``0..B-1``; ``longest`` = max(positions) + 1.

        ``tokens`` and ``positions`` are [B] long tensors (the position is where the token is written). The
        batch is padded to a :func:`bucket` with rows that write the last position of the slots above (no
        sequence ever holds it: one ends when its next token would go there; a prompt being prefilled in
        chunks may sit in one of those slots) and whose logits are dropped.
        """
        real = tokens.shape[0]
        batch = min(bucket(real), self.num_slots)
        if batch > real:
            tokens = torch.cat((tokens, tokens.new_zeros(batch - real)))
            positions = torch.cat((positions, positions.new_full((batch - real,), self.max_len - 1)))
        rows = torch.arange(batch, device=self.device)
        span = self._positions[:longest]
        allowed = span[None, :] <= positions[:, None]
        if self.window is not None:
            allowed &= span[None, :] > positions[:, None] - self.window
        bias = torch.zeros(allowed.shape, dtype=torch.float32, device=self.device)
        bias.masked_fill_(~allowed, float("-inf"))
        bias = bias[:, None, None, :]  # [B, 1, 1, T] over [B, KV, G, T]
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        groups = self.num_heads // self.num_kv_heads
        h = self.embed[tokens]
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, h, cos, sin)
            k_cache, v_cache = self.k_cache[i], self.v_cache[i]
            k_cache[rows, :, positions] = k.to(self.cache_dtype)
            v_cache[rows, :, positions] = v.to(self.cache_dtype)
            # One query per sequence: two batched matmuls beat SDPA's CPU kernels here by several times.
            qd = q.reshape(batch, self.num_kv_heads, groups, self.head_dim).to(self.cache_dtype)
            scores = torch.matmul(qd, k_cache[:batch, :, :longest].transpose(-1, -2)).float()
            probs = torch.softmax(scores.mul_(self.scale).add_(bias), dim=-1).to(self.cache_dtype)
            out = torch.matmul(probs, v_cache[:batch, :, :longest]).to(self.dtype).reshape(batch, -1)
            h = h + self._linear(out, layer.o, layer.o_bias)
            h = h + self._mlp(layer, h)
        return self._logits(h[:real])

    def start_prefill(self, tokens: list[int], slot: int, start: int, block: int = BLOCK) -> ChunkedPrefill:
        """A resumable prefill of ``tokens`` at positions ``start..`` of ``slot`` (whose cache holds
        ``0..start-1``), ``block`` query tokens a chunk: the scheduler runs its units between decode passes
        (:mod:`skyfabric.engine.chunked_prefill`)."""
        return ChunkedPrefill(self, tokens, slot, start, block=block)

    def prefill_chunk(self, tokens: list[int], slot: int, start: int) -> torch.Tensor:
        """Run ``tokens`` at positions ``start..`` of ``slot`` at once; the last token's logits ([1, vocab]).

        Each query attends to the slot's cache up to itself, so a prompt run in any split of chunks sees
        exactly the keys it would see in one pass.
        """
        return ChunkedPrefill(self, tokens, slot, start).run()

    def save_blocks(self, slot: int, token_blocks: list[int], pool_blocks: list[int]) -> None:
        """Copy the slot's token blocks ``token_blocks`` (block ``j``: positions ``j*bs..``) to the pool."""
        if not pool_blocks:
            return
        bs = self.block_size
        span = (max(token_blocks) + 1) * bs
        src = torch.tensor(token_blocks, dtype=torch.long, device=self.device)
        dst = torch.tensor(pool_blocks, dtype=torch.long, device=self.device)
        for cache, pool in zip(self.k_cache + self.v_cache, self.k_pool + self.v_pool, strict=True):
            part = cache[slot, :, :span].unflatten(1, (span // bs, bs)).index_select(1, src)  # [KV, n, bs, D]
            pool.index_copy_(0, dst, part.transpose(0, 1))

    def load_blocks(self, slot: int, blocks: list[int]) -> None:
        """Copy the pool's ``blocks`` into the slot's first ``len(blocks)`` token blocks (a prefix hit)."""
        if not blocks:
            return
        length = len(blocks) * self.block_size
        index = torch.tensor(blocks, dtype=torch.long, device=self.device)
        for cache, pool in zip(self.k_cache + self.v_cache, self.k_pool + self.v_pool, strict=True):
            cache[slot, :, :length] = pool.index_select(0, index).transpose(0, 1).flatten(1, 2)

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy a sequence's cache to another slot (the scheduler compacts running sequences)."""
        for k_cache, v_cache in zip(self.k_cache, self.v_cache, strict=True):
            k_cache[dst, :, :length] = k_cache[src, :, :length]
            v_cache[dst, :, :length] = v_cache[src, :, :length]


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros that take memory only where written: on CPU, an anonymous mapping (the kernel's zero pages).

    ``torch.zeros`` writes every page, so a replica's KV cache was resident in full from the start; slots
    sized for a 32k context would cost their whole budget before the first long prompt. Mapped lazily, the
    resident size follows the longest sequences each slot has held, never more than the budget.
    """
    count = math.prod(shape)
    if device.type != "cpu" or count == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    buffer = mmap.mmap(-1, count * dtype.itemsize)  # the tensor keeps the mapping alive
    return torch.frombuffer(buffer, dtype=dtype, count=count).view(shape)


def _can_pack(dtype: torch.dtype) -> bool:
    """Whether this torch build and CPU run oneDNN's packed linear in ``dtype`` (bf16 needs AVX512-BF16)."""
    try:
        w = torch.zeros(8, 8, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        torch.ops.mkldnn._linear_pointwise(torch.zeros(1, 8, dtype=dtype), packed, None, "none", [], "")
    except (RuntimeError, AttributeError):
        return False
    return True


def cache_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The KV cache's dtype: float32 on CPU whatever the weights, else the compute dtype.

    On CPU, bf16 batched matmuls go through oneDNN, which keeps kernels for every shape it meets; attention's
    shapes change with every token of context, and a bf16 cache grew a replica by ~1 GiB in a few hundred
    steps. In float32 they go to MKL, which keeps nothing, and cost the same at these sizes.
    """
    return torch.float32 if device.type == "cpu" else dtype
