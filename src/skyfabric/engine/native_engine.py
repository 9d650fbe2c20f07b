"""The native engine: Llama-family checkpoints run by our own forward pass, batched in a core process.

The replica process keeps what is about text and HTTP (tokenizer, chat template, detokenizing, stop strings);
the core process (:mod:`skyfabric.engine.core_process`) keeps the weights, the KV cache and the batching
loop. Requests cross as token ids; every step sends back one token per running sequence. Where this engine
cannot run a checkpoint (another architecture), ``--engine transformers`` can.

If the core dies, every request in flight ends with :class:`EngineNotReady` (HTTP 503, so a gateway retries
elsewhere), ``/health`` turns 503, and the replica stops itself so its supervisor starts a fresh one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import queue as queue_module
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from multiprocessing.connection import Connection
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
    token_ids,
)
from skyfabric.engine.text import HFTokenizing, TextStream

log = logging.getLogger(__name__)

#: What a request's queue receives: (token, finish) from a step, or an exception to raise.
_Item = tuple[int, str | None] | BaseException


class NativeEngine(HFTokenizing, Engine):
    """Serve a local Llama, Qwen2 or Mistral checkpoint with the native core (see the module docstring)."""

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
        seed: int | None = None,
        core_cpus: Sequence[int] | None = None,
        max_num_batched_tokens: int | None = None,
        enable_chunked_prefill: bool = True,
        enable_prefix_caching: bool = True,
        on_core_exit: Callable[[], None] | None = None,
        **_ignored: Any,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.capabilities = EngineCapabilities(continue_final_message=True, completions=True, chat=True)
        self._options: dict[str, Any] = {
            "model_dir": str(self.model_dir),
            "max_num_seqs": max_num_seqs,
            "threads": threads,
            "device": device,
            "dtype": dtype,
            "max_model_len": max_model_len,
            "kv_cache_mib": kv_cache_mib,
            "seed": seed,
            "core_cpus": sorted(core_cpus) if core_cpus else None,
            "max_num_batched_tokens": max_num_batched_tokens,
            "enable_chunked_prefill": enable_chunked_prefill,
            "enable_prefix_caching": enable_prefix_caching,
        }
        self._on_core_exit = on_core_exit or _stop_this_process
        self._tokenizer: Any = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready_future: asyncio.Future[dict[str, Any]] | None = None
        # Sends go through a thread: a blocking send (the core reads only between steps, and one prefill can
        # take seconds) must never stall the event loop. One thread keeps add/abort in order.
        self._outbox: queue_module.SimpleQueue[tuple[Any, ...] | None] = queue_module.SimpleQueue()
        self._sender: threading.Thread | None = None
        self._vocab_size = 0
        self._queues: dict[int, asyncio.Queue[_Item]] = {}
        self._ids = itertools.count(1)
        self._info: dict[str, Any] = {}
        self._eos: list[int] = []
        self._ready = False
        self._stopping = False
        self.load_seconds = 0.0
        #: Why the core died under a ready engine (the replica then exits non-zero), else None.
        self.fatal: str | None = None
        # Load: the core's last report, plus our own counters.
        self._core_running = 0
        self._kv_usage = 0.0
        self._forward_passes = 0
        self._forward_base = 0
        self._prefix_queries = self._prefix_hits = 0
        self._prefix_base = (0, 0)
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._finished: dict[str, int] = {"stop": 0, "length": 0, "abort": 0}

    # ---------------------------------------------------------------------------------------------- lifecycle

    @property
    def ready(self) -> bool:
        return self._ready and not self._stopping

    @property
    def max_model_len(self) -> int:
        return int(self._info.get("max_model_len", 0))

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def prefix_cache_tokens(self) -> int:
        return int(self._info.get("prefix_cache_tokens", 0))

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def describe(self) -> str:
        return str(self._info.get("describe", "not loaded"))

    async def start(self) -> None:
        """Start the core process, load the tokenizer meanwhile, wait for the core's ``ready``, warm up."""
        started = time.monotonic()
        loop = self._loop = asyncio.get_running_loop()
        self._spawn_core()
        assert self._conn is not None
        self._ready_future = loop.create_future()
        loop.add_reader(self._conn.fileno(), self._on_readable)
        self._sender = threading.Thread(
            target=self._send_loop, args=(self._conn,), name="core-sender", daemon=True
        )
        self._sender.start()
        try:
            self._tokenizer = await asyncio.to_thread(self._load_tokenizer)
            self._info = await self._ready_future
        except BaseException:
            await self.stop()
            raise
        # The tokenizer's EOS too: chat checkpoints often name their end-of-turn token only there.
        self._eos = token_ids(self._info["eos_token_ids"], self._tokenizer.eos_token_id)
        self._vocab_size = int(self._info["vocab_size"])
        self._ready = True
        warm = GenerationRequest(prompt_ids=self.tokenize("Hello") or [0], max_tokens=2, ignore_eos=True)
        async with contextlib.aclosing(self.generate(warm)) as stream:
            async for _ in stream:
                pass
        self._prompt_tokens = self._generation_tokens = 0
        self._forward_base = self._forward_passes
        self._prefix_base = (self._prefix_queries, self._prefix_hits)
        self._finished = {"stop": 0, "length": 0, "abort": 0}
        self.load_seconds = time.monotonic() - started
        log.info("engine ready in %.1fs: %s", self.load_seconds, self.describe())

    def _spawn_core(self) -> None:
        """Start ``core_process`` with one end of a socket pair; keep the other as our connection."""
        parent_sock, child_sock = socket.socketpair()
        # Room for a burst of requests while the core is in a step: sends from the event loop must not block.
        for sock in (parent_sock, child_sock):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(self._options["threads"]))
        argv = [
            sys.executable,
            "-m",
            "skyfabric.engine.core_process",
            str(child_sock.fileno()),
            json.dumps(self._options),
        ]
        with child_sock:
            self._proc = subprocess.Popen(argv, pass_fds=(child_sock.fileno(),), env=env)
        self._conn = Connection(parent_sock.detach())
        core_cpus: set[int] = set(self._options["core_cpus"] or ())
        rest = os.sched_getaffinity(0) - core_cpus
        if core_cpus and rest:  # the core binds itself; HTTP and detokenizing keep off its CPUs
            os.sched_setaffinity(0, rest)

    def _load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)

    async def stop(self) -> None:
        """Ask the core to stop (kill it if it does not), and fail whatever is still in flight."""
        self._stopping = True
        self._ready = False
        proc = self._proc
        if self._conn is not None:
            self._outbox.put(("stop",))
        if proc is not None:
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        self._close_conn()
        self._fail_all(EngineNotReady("engine stopped"))

    def _send_loop(self, conn: Connection) -> None:
        """The sender thread: forward queued messages to the core until told to stop or the core is gone."""
        while (message := self._outbox.get()) is not None:
            try:
                conn.send(message)
            except (OSError, ValueError):
                return  # the core is gone; the reader sees EOF and fails what is in flight
            if message[0] == "stop":
                return

    def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        self._outbox.put(None)  # ends the sender thread if it is still waiting
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(conn.fileno())
        conn.close()

    def _fail_all(self, exc: BaseException) -> None:
        for queue in self._queues.values():
            queue.put_nowait(exc)
        if self._ready_future is not None and not self._ready_future.done():
            self._ready_future.set_exception(exc)

    # ------------------------------------------------------------------------------------------ core → us

    def _on_readable(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            while conn.poll():
                self._dispatch(conn.recv())
        except (EOFError, OSError):
            self._core_gone("the engine core exited")

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "out":
            _, outputs, (running, _waiting, kv_usage, passes, queries, hits) = message
            self._core_running, self._kv_usage, self._forward_passes = running, kv_usage, passes
            self._prefix_queries, self._prefix_hits = queries, hits
            queues = self._queues
            for rid, token, finish in outputs:
                queue = queues.get(rid)
                if queue is not None:
                    queue.put_nowait((token, finish))
        elif kind == "ready":
            if self._ready_future is not None and not self._ready_future.done():
                self._ready_future.set_result(message[1])
        elif kind == "error":
            self._core_gone(f"the engine core failed to load: {message[1]}")
        elif kind == "fatal":
            self._core_gone(f"the engine core failed: {message[1].strip().splitlines()[-1]}")

    def _core_gone(self, why: str) -> None:
        if self._conn is None:  # already handled (a fatal message, then EOF)
            return
        self._close_conn()
        was_ready = self._ready
        self._ready = False
        # A load failure is the engine's error (500); anything later means "not here, try elsewhere" (503).
        loading = not was_ready and not self._stopping
        self._fail_all(EngineError(why) if loading else EngineNotReady(why))
        if was_ready and not self._stopping:
            self.fatal = why
            log.error("%s; stopping the replica so that it is restarted", why)
            self._on_core_exit()

    # -------------------------------------------------------------------------------------------- tokenizing

    # -------------------------------------------------------------------------------------------- generating

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationDelta, None]:
        """Send the request to the core, turn its tokens into text deltas; closing early aborts it."""
        conn = self._conn
        if not self.ready or conn is None:
            raise EngineNotReady("engine is not ready")
        prompt = list(request.prompt_ids)
        if not prompt:
            raise ValueError("prompt is empty")
        vocab = self._vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if len(prompt) + request.max_tokens > self.max_model_len:
            raise ValueError(
                f"{len(prompt)} prompt + {request.max_tokens} completion tokens exceed max_model_len "
                f"{self.max_model_len}"
            )
        params = (
            *request.sampling(self._info["sampling_defaults"]),
            None if request.seed is None else int(request.seed),
            int(request.min_tokens),
        )
        stop_ids = {t for t in request.stop_token_ids if 0 <= t < vocab}
        # min_tokens bans EOS even with ignore_eos (as the transformers engine does): an EOS generated under
        # ignore_eos is invisible in the text, so a continuation from that text would not see it.
        banned = sorted(stop_ids | set(self._eos))
        if not request.ignore_eos:
            stop_ids.update(self._eos)
        rid = next(self._ids)
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._queues[rid] = queue
        allowed = None
        if request.allowed_token_ids is not None:
            allowed = sorted({t for t in request.allowed_token_ids if 0 <= t < vocab})
        self._outbox.put(("add", rid, prompt, request.max_tokens, params, sorted(stop_ids), banned, allowed))
        self._prompt_tokens += len(prompt)
        core_done = False  # the core has forgotten the request (finished or failed): no abort to send
        completed = False
        try:
            text_stream = TextStream(self._tokenizer, request.stop)
            pending: list[int] = []  # ids of the text not yet yielded
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    core_done = True
                    raise item
                token, finish = item
                if finish is not None and finish.startswith("error"):
                    core_done = True
                    raise EngineError(finish)
                # One token per delta, as vLLM streams: a gateway continuing this stream elsewhere counts the
                # tokens it has sent by the chunks it has seen.
                self._generation_tokens += 1
                pending.append(token)
                core_done = finish is not None
                text, hit_stop = text_stream.feed((token,), last=core_done)
                if hit_stop or core_done:
                    reason: FinishReason = "stop" if hit_stop or finish == "stop" else "length"
                    self._finished[reason] += 1
                    completed = True
                    yield GenerationDelta(text, tuple(pending), reason)
                    return
                if text:
                    yield GenerationDelta(text, tuple(pending))
                    pending = []
        finally:
            del self._queues[rid]
            if not completed:
                self._finished["abort"] += 1
            if not core_done and self._conn is not None:
                self._outbox.put(("abort", rid))

    # -------------------------------------------------------------------------------------------------- stats

    def stats(self) -> EngineStats:
        in_flight = len(self._queues)
        running = min(self._core_running, in_flight)
        return EngineStats(
            running=running,
            waiting=in_flight - running,
            kv_cache_usage=self._kv_usage if in_flight else 0.0,
            prompt_tokens_total=self._prompt_tokens,
            generation_tokens_total=self._generation_tokens,
            forward_passes_total=self._forward_passes - self._forward_base,
            prefix_cache_queries_total=self._prefix_queries - self._prefix_base[0],
            prefix_cache_hits_total=self._prefix_hits - self._prefix_base[1],
            finished_total=dict(self._finished),
        )


def keep_torch_out_of_this_process() -> bool:
    """Block ``import torch`` in a replica whose engine is native: its frontend never runs a tensor op.

    transformers' tokenizer classes import torch when it is installed, which costs a replica ~230 MiB of
    RSS for nothing; they work without it (transformers' "tokenizers only" mode), so a ``None`` entry in
    ``sys.modules`` makes the import fail fast and transformers carry on without it. Does nothing (and
    returns False) where torch is already loaded.
    """
    if "torch" in sys.modules:
        return False
    sys.modules["torch"] = None  # type: ignore[assignment]
    return True


def _stop_this_process() -> None:
    """The replica's SIGTERM path: drain, stop, exit; its supervisor restarts it."""
    os.kill(os.getpid(), signal.SIGTERM)
