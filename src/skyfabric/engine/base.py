"""The engine plug-in interface: what the replica HTTP server needs from a model runtime.

The replica speaks OpenAI's wire format; an in-process engine only turns token ids into a stream of text
deltas. Keeping the contract this small (tokenize, generate, stats) keeps the HTTP layer out of model code.
The built-in engine is :mod:`skyfabric.engine.transformers_engine`; engines that are servers of their own
(vLLM, llama.cpp) plug in through :mod:`skyfabric.engine.external` instead: the replica execs them.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from skyfabric.engine.registry import ENGINES, resolve

#: Why a generation ended, in OpenAI's words ("abort" is vLLM's word for a cancelled request).
FinishReason = Literal["stop", "length", "abort"]


class EngineError(RuntimeError):
    """The engine failed a request for a reason that is not the client's fault (HTTP 500)."""


class EngineNotReady(EngineError):
    """The engine is loading, stopping or dead (HTTP 503, so a gateway retries elsewhere)."""


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One sequence to generate: a tokenized prompt plus sampling controls.

    ``temperature == 0`` means greedy; ``None`` sampling fields take the model's defaults (its generation
    config, else OpenAI's 1.0 / 1.0 / off). ``ignore_eos``/``min_tokens`` are vLLM's extras; drills use them
    to force exact output lengths. ``max_tokens`` is mandatory here: the HTTP layer resolves OpenAI's "unset"
    to the room left in the context window, so engines never have to guess.
    """

    prompt_ids: Sequence[int]
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    seed: int | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    request_id: str | None = None
    #: Guided decoding's vocabulary restriction (vLLM's ``allowed_token_ids``): only these ids may be
    #: sampled. ``None`` (every plain request) costs nothing per token.
    allowed_token_ids: Sequence[int] | None = None

    def sampling(self, defaults: Mapping[str, float | int]) -> tuple[float, float, int]:
        """(temperature, top_p, top_k): the request's, else the model's ``defaults``."""
        return (
            float(defaults["temperature"] if self.temperature is None else self.temperature),
            float(defaults["top_p"] if self.top_p is None else self.top_p),
            int(defaults["top_k"] if self.top_k is None else self.top_k),
        )


def sampling_defaults(generation_config: Any) -> dict[str, float | int]:
    """Like vLLM: what a request leaves out comes from the checkpoint's generation_config.json (or None)."""
    return {
        "temperature": float(getattr(generation_config, "temperature", None) or 1.0),
        "top_p": float(getattr(generation_config, "top_p", None) or 1.0),
        "top_k": int(getattr(generation_config, "top_k", None) or 0),
    }


def token_ids(*sources: Any) -> list[int]:
    """Sorted unique non-negative ids from config fields that hold one id, a list of ids, or None."""
    ids: set[int] = set()
    for source in sources:
        if source is None:
            continue
        if isinstance(source, int):
            ids.add(source)
        else:
            ids.update(int(i) for i in source if i is not None)
    return sorted(i for i in ids if i >= 0)


@dataclass(frozen=True, slots=True)
class GenerationDelta:
    """A piece of output: new text, the token ids it came from, and the finish reason on the last delta.

    Concatenating ``text`` over all deltas gives the decoded output (cut before a matched stop string);
    summing ``len(token_ids)`` gives the completion token count for usage.
    """

    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None


@dataclass(frozen=True, slots=True)
class EngineCapabilities:
    """What an engine can do, advertised by ``GET /v1/models`` so the gateway can route continuations."""

    continue_final_message: bool = False
    completions: bool = True
    chat: bool = True


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot of load and counters, rendered by ``GET /metrics`` under vLLM's metric names."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    forward_passes_total: int = 0
    #: Prompt tokens looked up in the prefix cache, and those found there (vLLM counts both in tokens).
    prefix_cache_queries_total: int = 0
    prefix_cache_hits_total: int = 0
    finished_total: Mapping[str, int] = field(default_factory=dict)


class Engine(abc.ABC):
    """A model runtime behind one replica. One instance serves one model.

    Lifecycle: construct (cheap) → ``await start()`` (loads weights; the replica answers /health 503 until it
    returns) → ``generate`` many times concurrently → ``await stop()``. ``generate`` must batch concurrent
    requests together (that is the point of a replica) and must stop work for a request as soon as its
    iterator is closed: that is how a client disconnect frees the slot.
    """

    capabilities: EngineCapabilities

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model and begin accepting requests."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop the engine's workers; in-flight requests end with :class:`EngineNotReady`."""

    @property
    @abc.abstractmethod
    def ready(self) -> bool:
        """True once started and healthy (drives ``GET /health``)."""

    @property
    @abc.abstractmethod
    def max_model_len(self) -> int:
        """Most tokens (prompt + completion) one sequence may hold."""

    @property
    def vocab_size(self) -> int:
        """Token ids run 0..vocab_size-1; the HTTP layer refuses others (0: unknown, nothing checked)."""
        return 0

    @property
    def prefix_cache_tokens(self) -> int:
        """Tokens of prompt prefixes the engine keeps for reuse (0: no prefix cache, or not known). Replicas
        report it to the gateway, which then routes prefixes back to where they are cached."""
        return 0

    @property
    def max_token_chars(self) -> int:
        """Most characters one token of this engine's tokenizer can stand for (0: unknown).

        With it the replica refuses a prompt that is certainly longer than ``max_model_len`` without
        tokenizing it: a prompt of ``c`` non-space characters has at least ``c / max_token_chars`` tokens.
        """
        return 0

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The ids that end a sequence unless ``ignore_eos`` (guided decoding lets the model pick them)."""
        return ()

    def tokenize_fragment(self, text: str) -> list[int]:
        """Token ids of text that follows a rendered prompt: no special tokens added (no BOS)."""
        raise NotImplementedError(f"{type(self).__name__} cannot tokenize fragments")

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` as the engine's deltas spell it (special tokens skipped)."""
        raise NotImplementedError(f"{type(self).__name__} cannot decode")

    def token_texts(self) -> Sequence[str]:
        """Each vocabulary id's text, decoded alone (guided decoding builds its token masks from it)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its vocabulary")

    @abc.abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of a raw completion prompt, with the special tokens the model expects (e.g. BOS)."""

    @abc.abstractmethod
    def tokenize_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool,
        continue_final_message: bool,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        """Render ``messages`` (and the request's ``tools`` definitions) with the chat template, tokenize.

        Raises :class:`ValueError` when the messages cannot be rendered (the replica answers 400).
        """

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationDelta, None]:
        """Stream deltas for one sequence; the last one has a finish reason. Close the iterator to cancel."""

    @abc.abstractmethod
    def stats(self) -> EngineStats:
        """Current load and counters (cheap; called on every /metrics scrape)."""


EngineFactory = Callable[..., Engine]

#: Engines registered at run time by plug-ins; the built-in ones are listed in ``registry.ENGINES``.
_REGISTRY: dict[str, EngineFactory] = {}


def register_engine(name: str, factory: EngineFactory) -> None:
    """Make an engine selectable with ``skyfabric replica --engine NAME`` (for engines not built in)."""
    _REGISTRY[name] = factory


def engine_names() -> list[str]:
    """Names accepted by ``--engine`` (built-in and registered; nothing is imported to list them)."""
    return sorted(set(ENGINES) | set(_REGISTRY))


def create_engine(name: str, **kwargs: Any) -> Engine:
    """Instantiate an engine by name; ``kwargs`` are the replica's engine options (model_dir, …).

    A built-in engine's module is imported only here, when it is chosen: the transformers one pulls torch,
    which the CLI should not pay for.
    """
    factory = _REGISTRY.get(name)
    if factory is None:
        if name not in ENGINES:
            raise ValueError(f"unknown engine {name!r}; available: {', '.join(engine_names())}")
        factory = resolve(ENGINES[name])
    return factory(**kwargs)
