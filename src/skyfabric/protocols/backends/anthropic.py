"""Anthropic's Messages API as a wire protocol: build requests, continue answers, classify failures.

An Anthropic client's request goes out as the client wrote it: its canonical fields rebuilt, then its
``extras`` (fields the seam has no slot for, and the originals of lossy ones) laid over them. Any other
client's request is *translated* to what every Anthropic model accepts; each rule says why where it is
applied (:func:`_translated_messages`, :func:`_build_body`).

Decoding lives in :mod:`skyfabric.protocols.backends.anthropic_decoder`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson

from skyfabric.core.endpoints import Endpoint
from skyfabric.core.retry_after import delta_seconds, header_value
from skyfabric.protocols.backends.anthropic_decoder import AnthropicDecoder, decode_message
from skyfabric.protocols.base import Backend, Capabilities, Headers, Outcome, UpstreamCall
from skyfabric.protocols.canonical import Block, CanonicalRequest, Event, Message, Thinking
from skyfabric.protocols.progress import Progress

PROTOCOL = "anthropic.messages"
DEFAULT_VERSION = "2023-06-01"

#: What an Anthropic 400 says when the prompt (with ``max_tokens``) does not fit the model's window.
CONTEXT_LENGTH_WORDS: tuple[str, ...] = (
    "prompt is too long",  # "prompt is too long: 209353 tokens > 199999 maximum"
    # "input length and `max_tokens` exceed context limit: 178959 + 64000 > 200000, decrease ..."
    "exceed context limit",
    "exceeds the context window",
    "context window exceeded",
    "input is too long",  # Anthropic models on Bedrock: "Input is too long for requested model."
)
#: What an Anthropic 400 says when the *model* refuses a prefilled assistant turn (Claude 4.6 and later):
#: only a continuation request of ours ends that way, never a client's request through :meth:`build`.
PREFILL_WORDS: tuple[str, ...] = (
    "does not support assistant message prefill",
    "prefilling assistant messages is no longer supported",
    "final assistant content cannot end with trailing whitespace",
)
_RESET_HEADERS = (b"requests", b"tokens", b"input-tokens", b"output-tokens")
#: Claude model names with a version: ``claude-opus-4-6``, ``claude-sonnet-4-20250514``, ``...-5``.
_CLAUDE_VERSION = re.compile(r"claude-(?:opus|sonnet|haiku)-(\d+)(?:-(\d{1,2}))?(?=$|[-@:.])")


class AnthropicBackend:
    """Anthropic's Messages API (``engine: anthropic``)."""

    family = "anthropic"

    def __init__(
        self,
        engine: str = "anthropic",
        *,
        default_max_tokens: int = 4096,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        #: ``max_tokens`` for a client (OpenAI's) that gave none: Anthropic requires one.
        self.default_max_tokens = default_max_tokens
        self._clock = clock

    def capabilities(self, endpoint: Endpoint) -> Capabilities:
        """Continues a prefilled text part natively; thinking and tool parts are replayed by the gateway.

        A prefill cannot hold a thinking block, and a ``tool_use`` in the final assistant turn is a whole
        call, not a part of one. Claude 4.6 and later take no prefill at all, so for those nothing is
        continued natively (:func:`prefill_supported`).
        """
        return Capabilities(
            continues=frozenset({"text"}) if prefill_supported(endpoint.upstream_model) else frozenset(),
            tools=True,
            thinking=True,
            n=False,
            logprobs=False,
            images=True,
            betas=True,
        )

    def auth(self, endpoint: Endpoint) -> Headers:
        """``x-api-key`` and the API version every request (a probe too) must carry."""
        headers: Headers = [(b"anthropic-version", DEFAULT_VERSION.encode())]
        if endpoint.api_key:
            headers.append((b"x-api-key", endpoint.api_key.encode()))
        return headers

    def build(self, request: CanonicalRequest, endpoint: Endpoint, *, usage: bool = False) -> UpstreamCall:
        """The Messages request for ``request`` on ``endpoint`` (usage: Anthropic always reports it)."""
        body = _build_body(request, endpoint, self._max_tokens(request))
        return UpstreamCall(path=b"/messages", headers=_headers(request, endpoint), body=orjson.dumps(body))

    def build_count_tokens(self, request: CanonicalRequest, endpoint: Endpoint) -> UpstreamCall:
        """The ``/messages/count_tokens`` request: the fields it takes, no ``max_tokens`` or sampling."""
        full = _build_body(request, endpoint, None)
        body = {k: v for k, v in full.items() if k in _COUNT_TOKENS_FIELDS}
        if request.protocol == PROTOCOL:
            body.update(request.extras)
        headers = [(k, b"application/json" if k == b"accept" else v) for k, v in _headers(request, endpoint)]
        return UpstreamCall(path=b"/messages/count_tokens", headers=headers, body=orjson.dumps(body))

    def continuation(
        self, request: CanonicalRequest, endpoint: Endpoint, progress: Progress, tokens_sent: int | None
    ) -> UpstreamCall | None:
        """The request again with the text sent so far as a final assistant turn, or None (replay).

        Only an answer that is all text is continued: a prefill is refused with thinking enabled, and with a
        forced ``tool_choice`` the answer is a tool call. Anthropic refuses a final assistant turn that ends
        in whitespace (400), so the prefill is sent with its trailing whitespace stripped; the model then
        writes that whitespace again and the gateway drops it from the continuation's start.
        """
        part = progress.open_part
        if part is None or any(p.kind != "text" for p in progress.parts):
            return None
        if not prefill_supported(endpoint.upstream_model) or _thinking_on(request):
            return None
        if request.tool_choice is not None and request.tool_choice.type in ("any", "tool"):
            return None
        prefix = progress.text.rstrip()
        if not prefix:
            return None  # nothing to prefill: a replay checks the whitespace exactly
        max_tokens = self._max_tokens(request)
        if tokens_sent is not None:
            max_tokens -= tokens_sent
            if max_tokens <= 0:
                return None
        body = _build_body(request, endpoint, max_tokens)
        messages: list[dict[str, Any]] = body["messages"]
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant":
            # The client prefilled the answer itself: ours goes on from its prefill.
            content = last["content"]
            if isinstance(content, str):
                content = [{"type": "text", "text": content}] if content else []
            if content and content[-1].get("type") == "text":
                content = [*content[:-1], {**content[-1], "text": content[-1]["text"] + prefix}]
            else:
                content = [*content, {"type": "text", "text": prefix}]
            messages[-1] = {**last, "content": content}
        else:
            messages.append({"role": "assistant", "content": prefix})
        return UpstreamCall(path=b"/messages", headers=_headers(request, endpoint), body=orjson.dumps(body))

    def decoder(self) -> AnthropicDecoder:
        """A fresh decoder for one streamed answer."""
        return AnthropicDecoder()

    def decode_response(self, body: bytes) -> list[Event]:
        """A whole Message as events."""
        return decode_message(body)

    def classify(self, status: int, headers: Headers, body: bytes) -> Outcome:
        """What an Anthropic error status means for the gateway.

        - 429: our key for this endpoint is rate limited (``retry-after`` seconds, else the latest
          ``anthropic-ratelimit-*-reset`` of an exhausted limit): throttled, not ill.
        - 529, 503, or any ``overloaded_error``: Anthropic is saturated for everyone; try elsewhere.
        - 500, 502, 504 and other 5xx: may succeed elsewhere.
        - 401, 402, 403: the credential (or billing) of *this endpoint* is wrong, not the client's request;
          another endpoint may hold a good one. 404 likewise: the pool's ``upstream_model`` is unknown there.
        - 400 saying the prompt does not fit: context length (a larger model may take it).
        - 400 refusing a prefill: only our continuation sends one, so it is not the client's fault.
        - other 4xx: the client's request is wrong; every Anthropic endpoint would refuse it.
        """
        kind, message = _error_of(body)
        if status == 429:
            return Outcome("throttled", retry_after=self._retry_after(headers))
        if status in (503, 529) or kind == "overloaded_error":
            return Outcome("overloaded", retry_after=delta_seconds(header_value(headers, b"retry-after")))
        if status >= 500:
            return Outcome("retryable")
        if status in (401, 402, 403, 404, 408, 409):
            return Outcome("retryable")
        lowered = message.lower()
        if any(words in lowered for words in CONTEXT_LENGTH_WORDS):
            return Outcome("context_length")
        if any(words in lowered for words in PREFILL_WORDS):
            return Outcome("retryable")
        return Outcome("client")

    # -- helpers ------------------------------------------------------------------------------------------

    def _max_tokens(self, request: CanonicalRequest) -> int:
        if request.max_tokens is not None:
            return request.max_tokens
        thinking = request.thinking
        if thinking is None or not thinking.enabled:
            return self.default_max_tokens
        # Thinking counts toward max_tokens: the default leaves the answer its own room beside the budget.
        return self.default_max_tokens + _budget(thinking)

    def _retry_after(self, headers: Headers) -> float | None:
        seconds = delta_seconds(header_value(headers, b"retry-after"))
        if seconds is not None:
            return seconds
        now = self._clock()
        exhausted: list[float] = []
        resets: list[float] = []
        for name in _RESET_HEADERS:
            reset = _timestamp(header_value(headers, b"anthropic-ratelimit-" + name + b"-reset"))
            if reset is None:
                continue
            resets.append(reset)
            if header_value(headers, b"anthropic-ratelimit-" + name + b"-remaining") == b"0":
                exhausted.append(reset)
        chosen = max(exhausted) if exhausted else (min(resets) if resets else None)
        return None if chosen is None else max(0.0, chosen - now)


_COUNT_TOKENS_FIELDS = frozenset({"model", "messages", "system", "tools", "tool_choice", "thinking"})


def prefill_supported(model: str) -> bool:
    """Whether ``model`` continues a prefilled assistant turn: Claude 4.6 and later refuse one (400)."""
    match = _CLAUDE_VERSION.search(model)
    if match is None:
        return True
    major, minor = int(match.group(1)), int(match.group(2) or 0)
    return (major, minor) < (4, 6)


def _thinking_on(request: CanonicalRequest) -> bool:
    extra = request.extras.get("thinking") if request.protocol == PROTOCOL else None
    if isinstance(extra, dict):
        return extra.get("type") != "disabled"
    return request.thinking is not None and request.thinking.enabled


def _headers(request: CanonicalRequest, endpoint: Endpoint) -> Headers:
    headers: Headers = [
        (b"content-type", b"application/json"),
        (b"accept", b"text/event-stream" if request.stream else b"application/json"),
    ]
    if endpoint.api_key:
        headers.append((b"x-api-key", endpoint.api_key.encode()))
    headers.append((b"anthropic-version", (request.version or DEFAULT_VERSION).encode()))
    if request.betas:
        headers.append((b"anthropic-beta", ",".join(request.betas).encode()))
    return headers


def _build_body(request: CanonicalRequest, endpoint: Endpoint, max_tokens: int | None) -> dict[str, Any]:
    """The Messages body; an Anthropic client's extras laid over it, any other client's request translated.

    Translation (a client of another protocol, which cannot know Anthropic's rules):
    - ``temperature`` is clamped to Anthropic's 0..1 (OpenAI's goes to 2);
    - with thinking on, ``temperature``, ``top_p`` and ``top_k`` are dropped (Anthropic refuses them then);
    - ``metadata`` keeps only ``user_id`` (Anthropic refuses other keys);
    - a thinking ``budget_tokens`` is kept below ``max_tokens`` (Anthropic requires it), and an ``effort``
      with no budget becomes one (low 1024, medium 4096, high 16384); below 1024, thinking is dropped;
    - ``tool_choice`` without tools is dropped; tool fields of another protocol (``Tool.extra``) are not sent;
    - seed, ``n``, logprobs have no Anthropic field and are not sent (refusing ``n > 1`` is the frontend's).
    """
    native = request.protocol == PROTOCOL
    body: dict[str, Any] = {"model": endpoint.upstream_model}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    body["messages"] = (
        _native_messages(request.messages) if native else _translated_messages(request.messages)
    )
    if request.system:
        body["system"] = request.system
    if request.stop:
        body["stop_sequences"] = request.stop
    thinking = _thinking(request, max_tokens, native)
    sampling_allowed = native or thinking is None or thinking.get("type") == "disabled"
    if request.temperature is not None and sampling_allowed:
        body["temperature"] = request.temperature if native else min(max(request.temperature, 0.0), 1.0)
    if request.top_p is not None and sampling_allowed:
        body["top_p"] = request.top_p
    if request.top_k is not None and sampling_allowed:
        body["top_k"] = request.top_k
    if request.tools:
        body["tools"] = [
            _tool(t.name, t.description, t.parameters, t.extra if native else {}) for t in request.tools
        ]
    choice = request.tool_choice
    if choice is not None and (native or request.tools):
        tool_choice: dict[str, Any] = {"type": choice.type}
        if choice.type == "tool":
            tool_choice["name"] = choice.name
        if choice.disable_parallel and choice.type != "none":
            tool_choice["disable_parallel_tool_use"] = True
        body["tool_choice"] = tool_choice
    if thinking is not None:
        body["thinking"] = thinking
    if native:
        if request.metadata:
            body["metadata"] = request.metadata
    else:
        user = request.metadata.get("user_id") or request.metadata.get("user")
        if isinstance(user, str) and user:
            body["metadata"] = {"user_id": user}
    if request.stream:
        body["stream"] = True
    if native:
        body.update(request.extras)
        body["model"] = endpoint.upstream_model
    return body


_EFFORT_BUDGETS = {"minimal": 1024, "low": 1024, "medium": 4096, "high": 16384, "xhigh": 32768, "max": 32768}


def _thinking(request: CanonicalRequest, max_tokens: int | None, native: bool) -> dict[str, Any] | None:
    thinking = request.thinking
    if thinking is None:
        return None
    if not thinking.enabled:
        return {"type": "disabled"}
    budget = thinking.budget_tokens
    if native:
        return {"type": "enabled", "budget_tokens": budget} if budget is not None else {"type": "adaptive"}
    budget = _budget(thinking)
    if max_tokens is not None:
        budget = min(budget, max_tokens - 1)
    return {"type": "enabled", "budget_tokens": budget} if budget >= 1024 else None


def _budget(thinking: Thinking) -> int:
    """The thinking budget asked for, or the one an ``effort`` level stands for."""
    if thinking.budget_tokens is not None:
        return thinking.budget_tokens
    return _EFFORT_BUDGETS.get(thinking.effort or "medium", 4096)


def _tool(
    name: str, description: str | None, parameters: dict[str, Any], extra: dict[str, Any]
) -> dict[str, Any]:
    tool: dict[str, Any] = {"name": name}
    if description is not None:
        tool["description"] = description
    tool["input_schema"] = parameters
    tool.update(extra)
    return tool


def _native_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """An Anthropic client's turns as it sent them (``system`` turns included: Claude 4.8+ takes them)."""
    return [{"role": m.role, "content": m.content if m.content else ""} for m in messages]


def _translated_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Another protocol's turns as turns every Anthropic model accepts.

    - A ``system`` turn mid-conversation becomes a ``<system-reminder>`` text in a user turn: only Claude
      4.8 and later take system turns, and only in some places, while the model reads the folded text the
      same way (coding agents already send reminders so).
    - ``tool`` turns become user turns of ``tool_result`` blocks; consecutive ones merge into one turn, as
      Anthropic wants all results of one assistant turn in the next user turn, results first.
    - Consecutive turns of one role merge (older API versions require alternation; merging loses nothing).
    - Empty text blocks are dropped (Anthropic refuses them), thinking blocks without a signature too (only
      Anthropic's own signed thinking may be sent back), and then empty turns.
    - A final assistant turn (a prefill) loses its trailing whitespace, which Anthropic refuses.
    """
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message.role
        blocks = [b for b in message.content if _keep(b)]
        if role == "system":
            text = "\n".join(b["text"] for b in blocks if b.get("type") == "text")
            role, blocks = (
                "user",
                [{"type": "text", "text": f"<system-reminder>\n{text}\n</system-reminder>"}],
            )
        elif role not in ("user", "assistant"):
            role = "user"  # ``tool`` turns (and any role Anthropic lacks) are the user's side
        if not blocks:
            continue
        if out and out[-1]["role"] == role:
            previous: list[Block] = out[-1]["content"]
            results = [b for b in blocks if b.get("type") == "tool_result"]
            if results and role == "user":
                # Results answer the assistant turn before: they lead the merged user turn.
                first = [b for b in previous if b.get("type") == "tool_result"]
                rest = [b for b in previous if b.get("type") != "tool_result"]
                others = [b for b in blocks if b.get("type") != "tool_result"]
                out[-1]["content"] = first + results + rest + others
            else:
                out[-1]["content"] = previous + blocks
        else:
            out.append({"role": role, "content": list(blocks)})
    if out and out[-1]["role"] == "assistant":
        content = out[-1]["content"]
        if content and content[-1].get("type") == "text":
            stripped = content[-1]["text"].rstrip()
            content[-1] = {**content[-1], "text": stripped}
            if not stripped:
                content.pop()
        if not content:
            out.pop()
    return out


def _keep(block: Block) -> bool:
    kind = block.get("type")
    if kind == "text":
        return bool(block.get("text"))
    if kind == "thinking":
        return bool(block.get("signature"))
    return True


def _error_of(body: bytes) -> tuple[str, str]:
    """The ``error.type`` and ``error.message`` of an Anthropic error body (the raw text if not JSON)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "", body[:2000].decode("utf-8", "replace")
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return str(error.get("type") or ""), str(error.get("message") or "")
    return "", body[:2000].decode("utf-8", "replace")


def _timestamp(value: bytes | None) -> float | None:
    """An RFC 3339 time (``2025-01-01T00:00:30Z``) as epoch seconds."""
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value.decode().replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


if TYPE_CHECKING:  # mypy checks that the class keeps the seam's interface
    _BACKEND: Backend = AnthropicBackend()
