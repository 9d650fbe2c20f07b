"""The native engine's core: the batching loop in a process of its own, fed over a socket by the replica.

Why a process: the replica's event loop (HTTP, SSE, tokenizing, detokenizing) and the forward passes both
need a CPU. In one Python process they take turns under the GIL; split, the loop never waits for a step and
the step never waits for the loop, which is how vLLM's engine core and API server are arranged too.

Protocol (pickled tuples over a ``multiprocessing.connection.Connection`` on an inherited socket):

* replica → core: ``("add", rid, prompt_ids, max_tokens, (temperature, top_p, top_k, seed, min_tokens),
  stop_ids, min_tokens_ban, allowed_ids or None)``, ``("abort", rid)``, ``("stop",)``.
* core → replica: ``("ready", info)`` once loaded, or ``("error", message)``; then one ``("out", outputs,
  (running, waiting, kv_usage, forward_passes, prefix_queries, prefix_hits))`` per step, ``outputs``
  being ``(rid, token, finish)`` tuples; ``("fatal", message)`` before dying of an exception.

Run as ``python -m skyfabric.engine.core_process FD CONFIG_JSON``; it dies with its parent.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Mapping
from multiprocessing.connection import Connection
from typing import Any

from skyfabric.core.lifetime import die_with_parent

#: Default KV-cache budget (MiB) when the replica gives none.
DEFAULT_KV_CACHE_MIB = {"cpu": 128, "other": 4096}

#: Share of the KV budget set aside for the prefix-cache block pool (plus whatever the slots leave over).
PREFIX_CACHE_SHARE = 0.25

#: Tokens per prefix-cache block (vLLM's default block size).
BLOCK_SIZE = 16

#: Prefill time per step while streams decode, as a share of the decode pass's time: running streams keep
#: ~1/1.75 of their quiet pace (measured TPOT p99 1.6-2.0x theirs during a 4k-token prefill at 1.0: too
#: close to the 2x target on a loaded CPU), and a long prompt's prefill gets ~43 % of the core meanwhile.
PREFILL_SHARE = 0.75


def plan_cache(
    *,
    model_len: int,
    bytes_per_token: int,
    max_num_seqs: int,
    kv_cache_mib: int,
    requested_len: int | None,
) -> tuple[int, int]:
    """(slots, max_len) for a slot cache within ``kv_cache_mib``.

    Each slot holds one sequence of up to ``max_len`` tokens. When the budget holds ``max_num_seqs`` full
    sequences, that is the plan. Otherwise a requested ``--max-model-len`` is kept and fewer sequences run at
    once (:func:`load` refuses a budget that cannot hold even one); with none, the context is shortened first
    (down to 4,096 tokens) so that concurrency survives.
    """
    model_len = min(model_len, requested_len) if requested_len else model_len
    budget = max(1, kv_cache_mib * 2**20 // bytes_per_token)
    if budget >= max_num_seqs * model_len:
        return max_num_seqs, model_len
    if requested_len:
        max_len = min(model_len, budget)
    else:
        max_len = min(model_len, max(budget // max_num_seqs, min(4096, budget)))
    return max(1, min(max_num_seqs, budget // max_len)), max_len


def resolve_dtype(name: str, checkpoint_dtype: str | None, device: str) -> Any:
    """``auto``: the checkpoint's bfloat16 where the device computes it natively, else float32 on CPU.

    Like vLLM's ``auto``, which keeps the checkpoint's dtype. On CPU bf16 needs AVX512-BF16 or AMX to pay.
    Every dtype's rounding depends a little on the batch shape, and bf16 keeps 8 mantissa bits to float32's
    24: where two tokens are nearly tied, a greedy answer flips with what else is in the batch, and a stream
    continued elsewhere after a failover no longer reads like the uninterrupted answer. Far likelier in bf16,
    which is why ``skyfabric up`` runs its replicas in float32.
    """
    import torch

    if name != "auto":
        return getattr(torch, name)
    if device != "cpu":
        return torch.float16 if checkpoint_dtype == "float16" else torch.bfloat16
    if checkpoint_dtype == "bfloat16" and _cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def load(config: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Build the model and the batcher from the replica's options; return them with the ``ready`` info."""
    import torch
    from transformers import AutoConfig, GenerationConfig

    from skyfabric.engine.base import sampling_defaults, token_ids
    from skyfabric.engine.batcher import Batcher
    from skyfabric.engine.llama import LlamaFamilyModel, cache_dtype
    from skyfabric.engine.prefix_cache import PrefixCache

    threads = int(config.get("threads") or 1)
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    model_dir = config["model_dir"]
    device_name = config.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device_name)
    hf_config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    checkpoint_dtype = str(getattr(text, "dtype", None) or getattr(text, "torch_dtype", None) or "")
    dtype = resolve_dtype(
        config.get("dtype", "auto"), checkpoint_dtype.removeprefix("torch.") or None, device.type
    )

    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    bytes_per_token = (
        2 * int(text.num_hidden_layers) * kv_heads * head_dim * cache_dtype(dtype, device).itemsize
    )
    max_num_seqs = int(config.get("max_num_seqs") or 32)
    kv_mib = int(
        config.get("kv_cache_mib") or DEFAULT_KV_CACHE_MIB["cpu" if device.type == "cpu" else "other"]
    )
    model_len = int(getattr(text, "max_position_embeddings", None) or 2048)
    requested = config.get("max_model_len")
    prefix_caching = bool(config.get("enable_prefix_caching", True))
    slot_mib = max(1, int(kv_mib * (1 - PREFIX_CACHE_SHARE))) if prefix_caching else kv_mib
    slots, max_len = plan_cache(
        model_len=model_len,
        bytes_per_token=bytes_per_token,
        max_num_seqs=max_num_seqs,
        kv_cache_mib=slot_mib,
        requested_len=requested,
    )
    # The pool gets the rest of the budget: the slots come first.
    left = kv_mib * 2**20 - slots * max_len * bytes_per_token
    prefix_blocks = max(0, left // (BLOCK_SIZE * bytes_per_token)) if prefix_caching else 0
    if requested and max_len < min(int(requested), model_len):
        raise ValueError(
            f"--max-model-len {requested} needs {requested * bytes_per_token / 2**20:.0f} MiB of KV cache "
            f"for one sequence; --kv-cache-mib is {kv_mib}"
        )
    model = LlamaFamilyModel(
        model_dir,
        num_slots=slots,
        max_len=max_len,
        dtype=dtype,
        device=device,
        config=hf_config,
        prefix_blocks=prefix_blocks,
        block_size=BLOCK_SIZE,
    )
    chunked = bool(config.get("enable_chunked_prefill", True))
    batcher = Batcher(
        model,
        max_num_seqs=max_num_seqs,
        # Unchunked (vLLM's --no-enable-chunked-prefill): any prompt in one pass, however long.
        max_num_batched_tokens=int(config.get("max_num_batched_tokens") or 512) if chunked else max_len,
        prefill_share=PREFILL_SHARE if chunked else 0.0,
        prefix_cache=PrefixCache(prefix_blocks, BLOCK_SIZE) if prefix_blocks else None,
    )
    if config.get("seed") is not None:
        batcher.seed(int(config["seed"]))
        torch.manual_seed(int(config["seed"]))

    try:
        generation = GenerationConfig.from_pretrained(model_dir, local_files_only=True)
    except OSError:
        generation = None
    info = {
        "vocab_size": int(model.embed.shape[0]),
        "max_model_len": max_len,
        "slots": slots,
        "prefix_cache_tokens": prefix_blocks * BLOCK_SIZE,
        "eos_token_ids": token_ids(
            getattr(generation, "eos_token_id", None), getattr(text, "eos_token_id", None)
        ),
        "sampling_defaults": sampling_defaults(generation),
        "describe": (
            f"model={model_dir} engine=native arch={text.model_type} device={device} "
            f"dtype={str(dtype).removeprefix('torch.')} packed_weights={model._packed} "
            f"max_num_seqs={batcher.max_running} max_model_len={max_len} "
            f"kv_cache_mib={slots * max_len * bytes_per_token / 2**20:.1f} "
            f"prefix_cache_blocks={prefix_blocks}x{BLOCK_SIZE} "
            f"max_num_batched_tokens={batcher.max_num_batched_tokens} threads={threads}"
        ),
    }
    return batcher, info


def serve(conn: Connection, batcher: Any) -> None:
    """Step while there is work, block on the socket while there is none; return on ``stop`` or EOF."""
    from skyfabric.engine.sampler import SamplingParams

    def handle(message: tuple[Any, ...]) -> bool:
        kind = message[0]
        if kind == "add":
            _, rid, prompt, max_tokens, sampling, stop_ids, ban, allowed = message
            temperature, top_p, top_k, seed, min_tokens = sampling
            params = SamplingParams(temperature, top_p, top_k, seed, min_tokens)
            try:
                batcher.add(
                    rid,
                    prompt,
                    max_tokens=max_tokens,
                    params=params,
                    stop_ids=stop_ids,
                    min_tokens_ban=ban,
                    allowed_ids=allowed,
                )
            except ValueError as exc:
                conn.send(("out", [(rid, -1, f"error: {exc}")], stats()))
        elif kind == "abort":
            batcher.abort(message[1])
        elif kind == "stop":
            return False
        return True

    def stats() -> tuple[int, int, float, int, int, int]:
        cache = batcher.prefix_cache
        return (
            len(batcher.running) + (batcher.partial is not None),
            len(batcher.waiting),
            batcher.kv_usage(),
            batcher.forward_passes,
            cache.queries if cache is not None else 0,
            cache.hits if cache is not None else 0,
        )

    while True:
        try:
            if not batcher.has_work:
                if not handle(conn.recv()):
                    return
                continue
            while conn.poll():
                if not handle(conn.recv()):
                    return
        except EOFError:
            return
        outputs = batcher.step()
        if outputs or not batcher.has_work:
            conn.send(("out", outputs, stats()))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    fd, config = int(args[0]), json.loads(args[1])
    die_with_parent()
    if config.get("core_cpus"):
        os.sched_setaffinity(0, set(config["core_cpus"]))
    conn = Connection(fd)
    try:
        batcher, info = load(config)
    except Exception as exc:  # reported to the replica, which fails its start with this message
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return 1
    conn.send(("ready", info))
    try:
        serve(conn, batcher)
    except Exception:
        message = traceback.format_exc()
        sys.stderr.write(message)
        try:
            conn.send(("fatal", message))
        except OSError:
            pass
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
