"""The built-in engine: any local Hugging Face decoder checkpoint, served with transformers' CB manager.

Why continuous batching (``transformers.generation.continuous_batching``) rather than ``model.generate``:
every request in flight shares each forward pass, so 16 concurrent streams cost roughly one stream's forward
passes. The manager runs its loop in a background thread; results come back through
``register_result_handler``, which hops onto our event loop with ``call_soon_threadsafe`` and lands in a
per-request :class:`asyncio.Queue`.

Configuration for CPU (the default target) and the reasons:

* ``num_blocks`` / ``page_size`` / ``max_batch_tokens`` are set explicitly. Left alone, the manager sizes the
  KV cache from *free system RAM* on CPU (60% of it, several GiB), and a replica must stay well under 1 GiB.
* Sampling is done by our own per-request logits processors (``_build_sampling_processors``), installed in
  place of the manager's list before its loop starts. The stock per-request processors cannot express
  ``temperature=0`` (greedy) next to sampled requests in one batch, nor ``min_tokens`` or a per-request
  ``seed``. The manager runs with ``do_sample=False`` (argmax); our last processor draws the token of each
  sampled row itself and makes that row one-hot, so the argmax is the draw and greedy rows cost nothing.
* Forward passes are counted by wrapping the manager's per-step method, so ``/metrics`` can prove batching.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any

from skyfabric.engine.base import (
    Engine,
    EngineCapabilities,
    EngineError,
    EngineNotReady,
    EngineStats,
    FinishReason,
    GenerationDelta,
    GenerationRequest,
    sampling_defaults,
    token_ids,
)
from skyfabric.engine.text import HFTokenizing, TextStream

log = logging.getLogger(__name__)

#: KV cache budget when none is given: small enough that the whole replica stays < 1 GiB RSS on CPU.
DEFAULT_CPU_KV_CACHE_MIB = 128
DEFAULT_GPU_KV_CACHE_MIB = 4096
DEFAULT_PAGE_SIZE = 32


# ------------------------------------------------------------------------------------------------------------
# Sampling: per-request logits processors for the continuous-batching manager
# ------------------------------------------------------------------------------------------------------------


def _build_sampling_processors(eos_token_ids: Sequence[int], allowed: dict[int, Any] | None = None) -> Any:
    """Build the manager's logits-processor list: guided-decoding vocabulary restriction, min_tokens EOS
    ban, temperature/greedy, top-k, top-p, seed.

    Imported lazily (torch). Each processor reads one int32 argument per request row, filled from the
    request's ``logit_processor_kwargs`` when the batch is prepared. ``allowed`` maps the key a guided
    request carries (``allowed_key``) to the tensor of ids it may sample; the engine fills it.
    """
    import torch
    from transformers.generation.continuous_batching.cb_logits_processors import (
        ContinuousBatchingLogitsProcessor,
        ContinuousBatchingLogitsProcessorList,
    )
    from transformers.generation.logits_process import LogitsProcessorList

    neg_inf = float("-inf")

    def float_arg(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32).view(dtype=torch.int32)

    def fill_float(int32_tensor: torch.Tensor, value: float) -> None:
        default = torch.full_like(int32_tensor, value, dtype=torch.float32)
        int32_tensor.copy_(default.view(dtype=torch.int32))

    masks: dict[int, Any] = {} if allowed is None else allowed

    class Allowed(ContinuousBatchingLogitsProcessor):
        """Guided decoding: a row with an ``allowed_key`` may only take the ids registered under it."""

        supported_kwargs: dict[str, type] = {"allowed_key": int}  # noqa: RUF012
        ignored_kwargs: tuple[str, ...] = ()

        def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
            int32_tensor.fill_(0)

        def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
            keys = [r.state.logit_processor_kwargs.get("allowed_key", 0) for r in requests_with_new_token]
            return torch.tensor(keys, dtype=torch.int32)

        def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
            keys = tensor_arg[: scores.size(0)]
            if not bool((keys > 0).any()):
                return scores
            for row in (keys > 0).nonzero().flatten().tolist():
                ids = masks.get(int(keys[row]))
                if ids is None:
                    continue
                ids = ids.to(scores.device)
                keep = scores[row, ids]
                scores[row] = neg_inf
                scores[row, ids] = keep
            return scores

    class EosBan(ContinuousBatchingLogitsProcessor):
        """vLLM's ``min_tokens``: EOS is impossible until the request has generated that many tokens."""

        supported_kwargs: dict[str, type] = {"min_tokens": int}  # noqa: RUF012
        ignored_kwargs: tuple[str, ...] = ()

        def __init__(self) -> None:
            self._eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long)

        def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
            int32_tensor.fill_(0)

        def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
            flags = [
                int(r.state.generated_len() < r.state.logit_processor_kwargs.get("min_tokens", 0))
                for r in requests_with_new_token
            ]
            return torch.tensor(flags, dtype=torch.int32)

        def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
            flags = tensor_arg[: scores.size(0)] > 0
            if self._eos.numel() == 0 or not bool(flags.any()):
                return scores
            eos = self._eos.to(scores.device)
            banned = scores[:, eos].masked_fill(flags.unsqueeze(-1), neg_inf)
            scores[:, eos] = banned
            return scores

    class Temperature(ContinuousBatchingLogitsProcessor):
        """Temperature scaling; ``temperature <= 0`` rows (greedy) are left as they are."""

        supported_kwargs: dict[str, type] = {"temperature": float}  # noqa: RUF012
        ignored_kwargs: tuple[str, ...] = ()

        def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
            fill_float(int32_tensor, 1.0)

        def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
            return float_arg(
                [r.state.logit_processor_kwargs.get("temperature", 1.0) for r in requests_with_new_token]
            )

        def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
            temps = tensor_arg[: scores.size(0)].view(dtype=torch.float32)
            scale = torch.where(temps > 0, temps, torch.ones_like(temps))
            if bool((scale != 1.0).any()):
                scores = scores / scale.unsqueeze(-1)
            return scores

    class TopK(ContinuousBatchingLogitsProcessor):
        """Keep the k best tokens per row; ``k <= 0`` disables it (vLLM's -1)."""

        supported_kwargs: dict[str, type] = {"top_k": int}  # noqa: RUF012
        ignored_kwargs: tuple[str, ...] = ()

        def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
            int32_tensor.fill_(0)

        def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
            ks = [r.state.logit_processor_kwargs.get("top_k", 0) for r in requests_with_new_token]
            return torch.tensor(ks, dtype=torch.int32)

        def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
            vocab = scores.size(-1)
            ks = tensor_arg[: scores.size(0)].to(torch.long)
            active = (ks > 0) & (ks < vocab)
            if not bool(active.any()):
                return scores
            ks = torch.where(active, ks, torch.full_like(ks, vocab))
            top = torch.topk(scores, int(ks.max()), dim=-1).values
            thresholds = top.gather(-1, (ks - 1).clamp(max=top.size(-1) - 1).unsqueeze(-1))
            return scores.masked_fill(scores < thresholds, neg_inf)

    class TopP(ContinuousBatchingLogitsProcessor):
        """Nucleus filtering; ``top_p >= 1`` rows are left alone (and skipped entirely when all are)."""

        supported_kwargs: dict[str, type] = {"top_p": float}  # noqa: RUF012
        ignored_kwargs: tuple[str, ...] = ()

        def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
            fill_float(int32_tensor, 1.0)

        def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
            return float_arg(
                [r.state.logit_processor_kwargs.get("top_p", 1.0) for r in requests_with_new_token]
            )

        def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
            top_p = tensor_arg[: scores.size(0)].view(dtype=torch.float32)
            if not bool((top_p < 1.0).any()):
                return scores
            sorted_logits, sorted_idx = torch.sort(scores, descending=False, dim=-1)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            remove = cumulative <= (1 - top_p).unsqueeze(-1)
            remove[..., -1:] = False
            remove = remove.scatter(-1, sorted_idx, remove)
            return scores.masked_fill(remove, neg_inf)

    class Sampler(ContinuousBatchingLogitsProcessor):
        """Draw the token of each sampled row here and make the row one-hot: the manager's argmax takes it.

        Greedy rows (``temperature <= 0``) are untouched and cost nothing. Draws use the exponential race
        (argmax of p / Exp(1), as vLLM does), much cheaper than ``torch.multinomial`` on CPU. A row with a
        ``seed`` draws from a generator seeded by (seed, position), so it gives the same output whatever else
        is in the batch. Argument per row: -2 greedy, -1 sampled, >= 0 seeded.
        """

        supported_kwargs: dict[str, type] = {"seed": int}  # noqa: RUF012
        ignored_kwargs: tuple[str, ...] = ()

        def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
            int32_tensor.fill_(-2)

        def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
            args = []
            for r in requests_with_new_token:
                kwargs = r.state.logit_processor_kwargs
                seed = kwargs.get("seed")
                if kwargs.get("temperature", 1.0) <= 0:
                    args.append(-2)
                elif seed is None:
                    args.append(-1)
                else:
                    mixed = (seed * 6364136223846793005 + r.state.generated_len() * 1442695040888963407) >> 17
                    args.append(mixed & 0x7FFFFFFF)
            return torch.tensor(args, dtype=torch.int32)

        def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
            args = tensor_arg[: scores.size(0)]
            rows = (args >= -1).nonzero().flatten()
            if rows.numel() == 0:
                return scores
            probs = torch.softmax(scores[rows], dim=-1)
            race = torch.empty_like(probs).exponential_()
            for i, row in enumerate(rows.tolist()):
                seed = int(args[row])
                if seed >= 0:
                    generator = torch.Generator(device=scores.device)
                    generator.manual_seed(seed)
                    race[i].exponential_(generator=generator)
            tokens = (probs / race).argmax(dim=-1)
            chosen = torch.full_like(probs, neg_inf).scatter_(-1, tokens.unsqueeze(-1), 0.0)
            scores[rows] = chosen
            return scores

    processors = [Allowed(), EosBan(), Temperature(), TopK(), TopP(), Sampler()]
    plist = ContinuousBatchingLogitsProcessorList(
        LogitsProcessorList(processors), per_request_processors=False
    )
    # The list only counts argument rows for processors it converted itself; ours bring their own.
    plist.tensors_required = len(processors)
    return plist


# ------------------------------------------------------------------------------------------------------------
# Loading helpers
# ------------------------------------------------------------------------------------------------------------


def _install_cpu_memory_probe_without_psutil() -> None:
    """Give the manager a CPU memory probe when psutil is missing (it is not a project dependency).

    Without psutil the manager reads total RAM as 0 and, on hosts without NUMA info, refuses to build any
    cache. We size the cache ourselves, so all it needs is a sane, non-zero number.
    """
    from transformers.generation.continuous_batching import cache as cb_cache
    from transformers.utils import is_psutil_available

    if is_psutil_available():
        return
    import torch

    original = cb_cache.get_device_and_memory_breakdown

    def probe() -> tuple[Any, int, int, int]:
        device, total, reserved, allocated = original()
        if device.type != "cpu" or total:
            return device, total, reserved, allocated
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return torch.device("cpu"), total, rss, rss

    cb_cache.get_device_and_memory_breakdown = probe
    # The manager logs an ERROR about psutil on every sizing; we handled it.
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.CRITICAL)


def _text_config_value(config: Any, *names: str) -> Any:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in names:
        value = getattr(text, name, None)
        if value is not None:
            return value
    return None


# ------------------------------------------------------------------------------------------------------------
# The engine
# ------------------------------------------------------------------------------------------------------------


class TransformersEngine(HFTokenizing, Engine):
    """Serve a local HF checkpoint (Llama, Qwen2, Mistral: any ``AutoModelForCausalLM``) with CB.

    ``max_num_seqs`` caps sequences admitted to the batch (the rest wait in our queue and show as *waiting*).
    ``kv_cache_mib`` bounds the paged KV cache; ``max_model_len`` is capped by what that cache can hold.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        max_num_seqs: int = 32,
        threads: int = 1,
        device: str | None = None,
        dtype: str = "auto",
        max_model_len: int | None = None,
        kv_cache_mib: int | None = None,
        max_batch_tokens: int | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        seed: int | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.max_num_seqs = max_num_seqs
        self.threads = threads
        self._device_name = device
        self._dtype_name = dtype
        self._requested_max_model_len = max_model_len
        self._kv_cache_mib = kv_cache_mib
        self._max_batch_tokens = max_batch_tokens
        self._page_size = page_size
        self._seed = seed
        self.capabilities = EngineCapabilities(continue_final_message=True, completions=True, chat=True)

        self._tokenizer: Any = None
        self._model: Any = None
        self._manager: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots: asyncio.Semaphore | None = None
        self._eos: list[int] = []
        #: Guided requests' allowed ids by key (read by the Allowed processor in the manager's thread).
        self._allowed: dict[int, Any] = {}
        self._allowed_keys = itertools.count(1)
        self._max_model_len = 0
        self._num_cache_blocks = 1
        self._default_sampling: dict[str, float | int] = {}
        self._ready = False
        self._stopping = False
        self._janitor: asyncio.Task[None] | None = None
        self._failed_status: Any = None
        self._lifecycle_lock = threading.Lock()
        self._bytes_per_token = 0
        self._device = "?"
        self._dtype = "?"
        self.load_seconds = 0.0

        # Counters (event-loop thread only, except forward passes which the generation thread bumps).
        self._waiting = 0
        self._admitted = 0
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._forward_passes = 0
        self._finished: dict[str, int] = {"stop": 0, "length": 0, "abort": 0}

    # ---------------------------------------------------------------------------------------------- lifecycle

    @property
    def ready(self) -> bool:
        manager = self._manager
        return (
            self._ready
            and not self._stopping
            and manager is not None
            and manager.is_running()
            and manager.background_thread_status.fatal_error is None
        )

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def vocab_size(self) -> int:
        model = self._model
        return int(model.get_input_embeddings().weight.shape[0]) if model is not None else 0

    @property
    def tokenizer(self) -> Any:
        """The HF tokenizer (tests compare deltas against its ``decode``)."""
        return self._tokenizer

    async def start(self) -> None:
        """Load weights and start the batching thread off the event loop, then warm up with a tiny request."""
        self._loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(self.max_num_seqs)
        started = time.monotonic()
        await asyncio.to_thread(self._load_and_start)
        self._ready = True
        # One real request through the whole path: proves the loop works before /health says so.
        warm = GenerationRequest(prompt_ids=self.tokenize("Hello") or [0], max_tokens=2, ignore_eos=True)
        async with contextlib.aclosing(self.generate(warm)) as stream:
            async for _ in stream:
                pass
        self._reset_counters()
        self._janitor = asyncio.create_task(self._drain_stray_outputs())
        self.load_seconds = time.monotonic() - started
        log.info("engine ready in %.1fs: %s", self.load_seconds, self.describe())

    def _load_and_start(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
        from transformers.generation.continuous_batching import RequestStatus

        torch.set_num_threads(max(1, self.threads))
        with contextlib.suppress(RuntimeError):  # only settable once per process
            torch.set_num_interop_threads(1)
        _install_cpu_memory_probe_without_psutil()

        device = self._device_name or ("cuda" if torch.cuda.is_available() else "cpu")
        on_cpu = device == "cpu"
        if self._dtype_name == "auto":
            dtype = torch.float32 if on_cpu else torch.bfloat16
        else:
            dtype = getattr(torch, self._dtype_name)

        if not (self.model_dir / "config.json").is_file():
            raise EngineError(f"no HF checkpoint in {self.model_dir} (config.json missing)")
        tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        model: Any = AutoModelForCausalLM.from_pretrained(
            self.model_dir, local_files_only=True, dtype=dtype, attn_implementation="sdpa"
        )
        model = model.to(torch.device(device)).eval()

        gen_defaults = getattr(model, "generation_config", None)
        self._eos = token_ids(
            tokenizer.eos_token_id,
            getattr(gen_defaults, "eos_token_id", None),
            getattr(model.config, "eos_token_id", None),
        )
        self._default_sampling = sampling_defaults(gen_defaults)

        # KV cache geometry, from a byte budget.
        num_layers = int(_text_config_value(model.config, "num_hidden_layers"))
        num_heads = int(_text_config_value(model.config, "num_attention_heads"))
        kv_heads = int(_text_config_value(model.config, "num_key_value_heads") or num_heads)
        hidden = int(_text_config_value(model.config, "hidden_size"))
        head_dim = int(_text_config_value(model.config, "head_dim") or hidden // num_heads)
        bytes_per_token = 2 * num_layers * kv_heads * head_dim * dtype.itemsize
        budget_mib = self._kv_cache_mib or (DEFAULT_CPU_KV_CACHE_MIB if on_cpu else DEFAULT_GPU_KV_CACHE_MIB)
        page = self._page_size
        num_blocks = max(2, (budget_mib * 1024 * 1024) // (bytes_per_token * page))
        positions = _text_config_value(model.config, "max_position_embeddings", "n_positions", "max_seq_len")
        model_len_limits = [int(positions)] if positions else []
        if self._requested_max_model_len:
            model_len_limits.append(self._requested_max_model_len)
        if model_len_limits:
            # Never more cache than max_num_seqs full-length sequences: beyond the waste, the SDPA path
            # allocates a [max_batch_tokens, cache_tokens] attention mask, so an oversized cache costs RAM
            # twice.
            num_blocks = min(num_blocks, math.ceil(self.max_num_seqs * min(model_len_limits) / page))
        self._num_cache_blocks = num_blocks
        self._max_model_len = min([num_blocks * page, *model_len_limits])
        max_batch_tokens = self._max_batch_tokens or (256 if on_cpu else 2048)
        max_batch_tokens = max(max_batch_tokens, self.max_num_seqs)

        generation_config = GenerationConfig(
            do_sample=False,  # the manager takes the argmax; our Sampler processor makes sampled rows one-hot
            max_new_tokens=self._max_model_len,
            eos_token_id=self._eos or -1,
            pad_token_id=tokenizer.pad_token_id,
        )
        cb_config = ContinuousBatchingConfig(
            page_size=page,
            num_blocks=num_blocks,
            max_batch_tokens=max_batch_tokens,
            max_requests_per_batch=self.max_num_seqs,
            allow_block_sharing=True,
            use_async_batching=False if on_cpu else None,
            use_cuda_graph=False if on_cpu else None,
            seed=self._seed,
            scheduler_type="fifo",
        )
        manager: Any = model.init_continuous_batching(
            generation_config=generation_config, continuous_batching_config=cb_config
        )
        manager.logit_processor = _build_sampling_processors(self._eos, self._allowed)

        step = manager._generation_step

        def counted_step() -> None:
            step()
            self._forward_passes += 1

        manager._generation_step = counted_step
        self._tokenizer, self._model = tokenizer, model
        self._failed_status = RequestStatus.FAILED
        self._bytes_per_token = bytes_per_token
        self._device = device
        self._dtype = str(dtype).removeprefix("torch.")
        self._max_batch_tokens = max_batch_tokens
        # A SIGTERM may arrive while we load: never leave a (non-daemon) loop thread behind a stopped engine.
        with self._lifecycle_lock:
            if self._stopping:
                raise EngineNotReady("engine stopped while loading")
            with torch.inference_mode():
                manager.start()  # the loop thread inherits inference mode from here
            self._manager = manager

    def describe(self) -> str:
        """One line of the resolved configuration, for logs and the bench."""
        kv_bytes = self._num_cache_blocks * self._page_size * self._bytes_per_token
        return (
            f"model={self.model_dir} device={self._device} dtype={self._dtype} "
            f"max_num_seqs={self.max_num_seqs} max_model_len={self._max_model_len} "
            f"page_size={self._page_size} kv_blocks={self._num_cache_blocks} "
            f"kv_cache_mib={kv_bytes / 2**20:.1f} "
            f"max_batch_tokens={self._max_batch_tokens} threads={self.threads}"
        )

    async def stop(self) -> None:
        """Hard-stop the batching thread: pending requests fail (their clients get 503), the thread exits."""
        with self._lifecycle_lock:
            self._stopping = True
            self._ready = False
            manager = self._manager
        if self._janitor is not None:
            self._janitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._janitor
        if manager is not None and manager.is_running():
            await asyncio.to_thread(manager.stop, block=True, timeout=30, hard_stop=True)

    def _reset_counters(self) -> None:
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._forward_passes = 0
        self._finished = {"stop": 0, "length": 0, "abort": 0}

    async def _drain_stray_outputs(self) -> None:
        """Drop outputs that reached the manager's shared queue (a request cancelled mid-step): a leak."""
        while True:
            await asyncio.sleep(10)
            manager = self._manager
            if manager is None:
                continue
            stray = manager.output_router.output_queue
            with contextlib.suppress(Exception):
                while not stray.empty():
                    stray.get_nowait()

    # -------------------------------------------------------------------------------------------- tokenizing

    # -------------------------------------------------------------------------------------------- generating

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationDelta, None]:
        """Admit the request (``max_num_seqs`` run at once), stream its text, cancel it if abandoned."""
        if not self.ready or self._slots is None or self._loop is None:
            raise EngineNotReady("engine is not ready")
        prompt = list(request.prompt_ids)
        if not prompt:
            raise ValueError("prompt is empty")
        if len(prompt) + request.max_tokens > self._max_model_len:
            raise ValueError(
                f"{len(prompt)} prompt + {request.max_tokens} completion tokens exceed max_model_len "
                f"{self._max_model_len}"
            )

        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        manager = self._manager
        request_id = request.request_id or f"sf-{uuid.uuid4().hex}"
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cb_finished = False
        allowed_key = 0
        admitted = False
        completed = False
        try:
            if not self.ready:  # stopped while we queued for a slot
                cb_finished = True
                raise EngineNotReady("engine is not ready")
            manager.register_result_handler(request_id, queue.put_nowait)
            stop_ids = token_ids(request.stop_token_ids)
            eos = sorted(set(stop_ids) | (set() if request.ignore_eos else set(self._eos)))
            temperature, top_p, top_k = request.sampling(self._default_sampling)
            kwargs: dict[str, Any] = {
                "temperature": temperature,
                "top_p": top_p,
                "top_k": top_k,
                "min_tokens": int(request.min_tokens),
            }
            if request.seed is not None:
                kwargs["seed"] = int(request.seed)
            if request.allowed_token_ids is not None:
                import torch

                allowed_key = next(self._allowed_keys)
                self._allowed[allowed_key] = torch.tensor(
                    sorted(set(request.allowed_token_ids)), dtype=torch.long
                )
                kwargs["allowed_key"] = allowed_key
            added = manager.add_request(
                prompt,
                request_id=request_id,
                max_new_tokens=request.max_tokens,
                streaming=True,
                eos_token_id=eos if eos else -1,
                **kwargs,
            )
            if added is None:
                cb_finished = True
                raise EngineNotReady("engine is stopping")
            admitted = True
            self._admitted += 1
            self._prompt_tokens += len(prompt)

            text_stream = TextStream(self._tokenizer, request.stop)
            seen = 0
            pending_ids: list[int] = []
            eos_set = set(eos)
            while True:
                output = await queue.get()
                if output.error is not None or output.status == self._failed_status:
                    cb_finished = True
                    if self._stopping:
                        raise EngineNotReady("engine stopped")
                    raise EngineError(f"generation failed: {output.error}")
                tokens = output.generated_tokens
                new_ids = list(tokens[seen:])
                seen = len(tokens)
                self._generation_tokens += len(new_ids)
                pending_ids.extend(new_ids)
                finished = output.is_finished()
                if finished:
                    cb_finished = True
                text, hit_stop = text_stream.feed(new_ids, last=finished)
                if hit_stop or finished:
                    reason: FinishReason = (
                        "stop" if hit_stop or (tokens and tokens[-1] in eos_set) else "length"
                    )
                    completed = True
                    self._finished[reason] += 1
                    yield GenerationDelta(text, tuple(pending_ids), reason)
                    return
                if text:
                    yield GenerationDelta(text, tuple(pending_ids))
                    pending_ids = []
        finally:
            if allowed_key:
                self._allowed.pop(allowed_key, None)
            if admitted:
                self._admitted -= 1
                if not completed:
                    self._finished["abort"] += 1
            if not cb_finished:
                self._forget(request_id)
            self._slots.release()

    def _forget(self, request_id: str) -> None:
        """Cancel a request in the manager and mute its handler (the step in flight may still deliver)."""
        manager = self._manager
        if manager is None:
            return
        manager.cancel_request(request_id)
        router = manager.output_router
        lock: threading.Lock = router._lock
        loop = self._loop
        with lock:
            if request_id in router.result_handlers and loop is not None:
                router.result_handlers[request_id] = (lambda _output: None, loop)

        def drop() -> None:
            with lock:
                router.result_handlers.pop(request_id, None)

        if loop is not None:
            loop.call_later(30, drop)

    # -------------------------------------------------------------------------------------------------- stats

    def stats(self) -> EngineStats:
        manager = self._manager
        batch = getattr(manager, "batch_processor", None) if manager is not None else None
        cb_waiting = 0
        kv_usage = 0.0
        if manager is not None:
            cb_waiting += manager.input_queue.qsize()
        if batch is not None:
            scheduler = batch.scheduler
            cb_waiting += len(scheduler.waiting_requests)
            active = list(scheduler.active_requests.values())
            page = self._page_size
            used = sum(math.ceil(state.current_len() / page) for state in active)
            kv_usage = min(1.0, used / max(1, self._num_cache_blocks))
        cb_waiting = min(cb_waiting, self._admitted)
        return EngineStats(
            running=max(0, self._admitted - cb_waiting),
            waiting=self._waiting + cb_waiting,
            kv_cache_usage=kv_usage,
            prompt_tokens_total=self._prompt_tokens,
            generation_tokens_total=self._generation_tokens,
            forward_passes_total=self._forward_passes,
            finished_total=dict(self._finished),
        )
