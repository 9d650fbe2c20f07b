"""The one request model and event stream that every client protocol and every wire protocol maps to.

A client's request is parsed once by its protocol's frontend into a :class:`CanonicalRequest`; a backend
adapter builds its own wire request from that; the adapter decodes the backend's answer into canonical
:data:`Event` objects; the client's frontend encodes those events in the client's protocol. When the
client's protocol is the backend's and nothing needs rewriting, bytes pass through untouched and the
events are decoded beside the copy only to track progress (see ``gateway/relay.py``).

Content blocks use Anthropic's vocabulary (``text``, ``image``, ``document``, ``tool_use``,
``tool_result``, ``thinking``, ``redacted_thinking``) as plain dicts: it is a superset of OpenAI's message
parts, and dicts keep fields a protocol adds (``cache_control``, ``citations``) for backends that take
them. Each frontend converts its client's shapes into these blocks and each backend converts them back.

Reasons a choice ends are canonical too (:data:`FINISH_REASONS`); each side maps them to its protocol's
words (OpenAI ``stop`` / ``length`` / ``tool_calls`` / ``content_filter``; Anthropic ``end_turn`` /
``stop_sequence`` / ``max_tokens`` / ``tool_use`` / ``refusal`` / ``pause_turn``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

Block = dict[str, Any]
"""A content block: ``{"type": "text", "text": ...}``, ``{"type": "tool_use", "id", "name", "input"}``, ..."""

#: Why a choice ended, in the seam's words.
FinishReason = Literal["end", "stop_sequence", "length", "tool_calls", "content_filter", "refusal", "pause"]
FINISH_REASONS: tuple[str, ...] = (
    "end",
    "stop_sequence",
    "length",
    "tool_calls",
    "content_filter",
    "refusal",
    "pause",
)


@dataclass(slots=True)
class Message:
    """One turn: ``role`` is ``user``, ``assistant``, ``system`` (mid-conversation) or ``tool``."""

    role: str
    content: list[Block]


@dataclass(slots=True)
class Tool:
    """A function the model may call; ``extra`` keeps protocol fields such as ``cache_control``."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class ToolChoice:
    """``auto``, ``none``, ``any`` (must call one) or ``tool`` (must call ``name``)."""

    type: Literal["auto", "none", "any", "tool"] = "auto"
    name: str | None = None
    disable_parallel: bool = False


@dataclass(slots=True)
class Thinking:
    """Extended thinking / reasoning asked for: ``budget_tokens`` or an ``effort`` level, or adaptive."""

    enabled: bool = True
    budget_tokens: int | None = None
    effort: str | None = None  # OpenAI's reasoning_effort; Anthropic's adaptive → None


@dataclass(slots=True)
class CanonicalRequest:
    """A client's inference request, independent of the protocol it came in."""

    #: The client's protocol: ``openai.chat``, ``openai.completions`` or ``anthropic.messages``.
    protocol: str
    model: str
    messages: list[Message] = field(default_factory=list)
    #: Top-level system prompt as text blocks (Anthropic's ``system``; OpenAI's leading system messages).
    system: list[Block] = field(default_factory=list)
    #: ``/v1/completions``' prompt (then ``messages`` is empty).
    prompt: str | list[Any] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    n: int = 1
    tools: list[Tool] = field(default_factory=list)
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    stream: bool = False
    #: The client asked for usage in the stream (OpenAI ``stream_options.include_usage``; Anthropic: always).
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int | None = None
    #: Anthropic's ``metadata`` / OpenAI's ``user``.
    metadata: dict[str, Any] = field(default_factory=dict)
    #: Client-protocol fields the seam has no slot for, forwarded only to backends of the same protocol.
    extras: dict[str, Any] = field(default_factory=dict)
    #: Anthropic's ``anthropic-beta`` flags (comma-split) and ``anthropic-version``, for adapters to pass on.
    betas: list[str] = field(default_factory=list)
    version: str | None = None
    #: The client's body as parsed, and as sent (the pass-through path forwards these bytes).
    body: dict[str, Any] = field(default_factory=dict)
    raw: bytes = b""
    #: Fills ``messages``, ``system``, ``tools`` (and the like) from ``body`` on first need. A frontend
    #: may leave that work undone: the pass-through path never needs it, and it costs microseconds a
    #: request. Backends that build their own body call :meth:`lower` first.
    pending: Callable[[CanonicalRequest], None] | None = field(default=None, repr=False)

    def lower(self) -> CanonicalRequest:
        """Complete the fields a frontend left to be filled lazily; returns ``self``."""
        fill, self.pending = self.pending, None
        if fill is not None:
            fill(self)
        return self


# -- events -----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Start:
    """The answer begins: its id, the model that answers, when (OpenAI's ``created``; None if not told)."""

    id: str
    model: str
    created: int | None = None


@dataclass(slots=True)
class TextDelta:
    text: str
    choice: int = 0


@dataclass(slots=True)
class ReasoningDelta:
    """Thinking text (Anthropic ``thinking_delta``; OpenAI-compatible ``reasoning_content``)."""

    text: str
    choice: int = 0


@dataclass(slots=True)
class ReasoningSignature:
    """The signature that closes a thinking block (Anthropic ``signature_delta``)."""

    signature: str
    choice: int = 0


@dataclass(slots=True)
class RedactedReasoning:
    """An encrypted thinking block (Anthropic ``redacted_thinking``), kept opaque."""

    data: str
    choice: int = 0


@dataclass(slots=True)
class ToolCallDelta:
    """Part of tool call ``index`` of a choice: ``id`` and ``name`` on its first delta, then arguments.

    ``arguments`` is a piece of the JSON text of the call's arguments; the pieces concatenated are the
    whole JSON object (OpenAI's ``function.arguments``, Anthropic's ``input_json_delta.partial_json``).
    """

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None
    choice: int = 0


@dataclass(slots=True)
class Logprobs:
    """Log-probabilities of a chunk, opaque (OpenAI's shape)."""

    content: Any
    choice: int = 0


@dataclass(slots=True)
class Finish:
    """A choice ended; ``native`` is the backend's own word for it (kept for pass-through)."""

    reason: str
    choice: int = 0
    stop_sequence: str | None = None
    native: str | None = None


@dataclass(slots=True)
class Usage:
    """Token counts of the backend's part so far (cumulative, as the backend reported them)."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_input_tokens: int = 0
    cache_creation_input_tokens: int = 0


@dataclass(slots=True)
class StreamError:
    """The backend reported an error in-band (after its status line said 200)."""

    message: str
    type: str = "api_error"


@dataclass(slots=True)
class PartStart:
    """A block of the answer begins before any of its content (Anthropic's ``content_block_start`` of an
    empty text or thinking block). Lets a client's block numbering be known exactly across a continuation."""

    kind: str  # "text" or "reasoning"
    choice: int = 0


@dataclass(slots=True)
class PartEnd:
    """The current block of the answer is complete (Anthropic's ``content_block_stop``)."""

    choice: int = 0


@dataclass(slots=True)
class End:
    """The backend ended its stream cleanly (``data: [DONE]``, ``message_stop``)."""


Event = (
    Start
    | TextDelta
    | ReasoningDelta
    | ReasoningSignature
    | RedactedReasoning
    | ToolCallDelta
    | Logprobs
    | Finish
    | Usage
    | StreamError
    | PartStart
    | PartEnd
    | End
)
