"""The OpenAI-compatible wire protocol: vLLM (GPU, TPU, Neuron), SGLang, TGI, llama.cpp, OpenAI itself, and
skyfabric's own replicas (``local``).

An OpenAI client's request is forwarded as the client sent it — the very bytes, unless the backend's model
name differs or the stream must ask for usage (then ``stream_options`` is spliced in front of the client's
bytes, or the body re-encoded). Nothing is lowered on that path. A client of another protocol gets its
canonical request translated (:mod:`skyfabric.protocols.backends.openai_body`).

Continuation (:meth:`OpenAIBackend.continuation`) prefills the answer sent so far as a final assistant
message that the engine continues in place (vLLM's and SGLang's ``continue_final_message``): its ``content``
is the text, its ``reasoning_content`` the reasoning, and a tool call cut mid-arguments is its last
``tool_calls`` entry with the arguments so far. Which of these an engine continues is
:meth:`OpenAIBackend.capabilities`' ``continues``: text for the vLLM family and SGLang (or any engine whose
pool declares ``continuation: true``), all three for skyfabric's replica; nothing for a pool that declares
``continuation: false``. The text is sent verbatim: trimming what a chat template would trim is the
relay's choice (it knows what the client already has).
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from skyfabric.core.endpoints import Endpoint
from skyfabric.core.retry_after import retry_after
from skyfabric.protocols.backends.openai_body import chat_body
from skyfabric.protocols.backends.openai_decode import OpenAIDecoder, decode_response
from skyfabric.protocols.base import Capabilities, Headers, Outcome, UpstreamCall
from skyfabric.protocols.canonical import CanonicalRequest, Event
from skyfabric.protocols.progress import Progress

#: Engines that put the running usage in every chunk when asked (``continuous_usage_stats``): at a break
#: mid-stream the relay then knows exactly how many tokens the client has been sent.
CONTINUOUS_USAGE_ENGINES: frozenset[str] = frozenset({"local", "vllm", "vllm-tpu", "vllm-neuron", "sglang"})

_CHAT = b"/chat/completions"
_COMPLETIONS = b"/completions"
_JSON = [(b"content-type", b"application/json"), (b"accept", b"application/json")]
_SSE = [(b"content-type", b"application/json"), (b"accept", b"text/event-stream")]

#: ``stream_options`` asked of an engine when the client sent none (never mutated: shared), and the bytes
#: that splice each in front of a client's body.
_FINAL_USAGE: dict[str, Any] = {"include_usage": True}
_RUNNING_USAGE: dict[str, Any] = {"include_usage": True, "continuous_usage_stats": True}
_SPLICES = {
    id(options): b'{"stream_options":' + orjson.dumps(options) + b","
    for options in (_FINAL_USAGE, _RUNNING_USAGE)
}

#: How a 4xx says that the prompt does not fit the model: OpenAI, vLLM, SGLang, llama.cpp, TGI.
_CONTEXT_WORDINGS = (
    b"context_length_exceeded",
    b"maximum context length",
    b"model's context length",
    b"exceed_context_size",
    b"exceeds the available context size",
    b"`inputs` tokens + `max_new_tokens` must be <=",
)

#: The order parts take in one OpenAI assistant message: reasoning, then text, then tool calls.
_RANK = {"reasoning": 0, "text": 1, "tool": 2}


def is_context_length(body: bytes) -> bool:
    """Whether an error body says the prompt does not fit the model (the wordings of the engines)."""
    text = body[:2000].lower()
    return any(wording in text for wording in _CONTEXT_WORDINGS)


class OpenAIBackend:
    """An OpenAI-compatible engine kind (``engine``: the fleet file's name for it)."""

    family = "openai"

    def __init__(self, engine: str) -> None:
        self.engine = engine
        continues = frozenset({"text", "reasoning", "tool"}) if engine == "local" else frozenset({"text"})
        self._continuing = self._capabilities(continues)
        self._not_continuing = self._capabilities(frozenset())

    def _capabilities(self, continues: frozenset[str]) -> Capabilities:
        engine = self.engine
        return Capabilities(
            continues=continues,
            tools=True,
            thinking=engine != "tgi",  # TGI has no reasoning parser
            n=True,
            logprobs=engine != "local",  # skyfabric's replica refuses logprobs
            images=engine != "local",  # the replica is text only; the others take image parts
            continuous_usage=engine in CONTINUOUS_USAGE_ENGINES,
            betas=False,
            # skyfabric's own replicas keep a prefilled turn's trailing whitespace; templates trim it
            verbatim_prefix=engine == "local",
        )

    def capabilities(self, endpoint: Endpoint) -> Capabilities:
        """What the engine does; ``continues`` is empty where the pool says it cannot continue."""
        return self._continuing if endpoint.can_continue else self._not_continuing

    # -- requests -----------------------------------------------------------------------------------------

    def build(self, request: CanonicalRequest, endpoint: Endpoint, *, usage: bool = False) -> UpstreamCall:
        """The upstream call; an OpenAI client's bytes pass as they came when nothing needs changing."""
        if request.protocol.startswith("openai."):
            path = _COMPLETIONS if request.protocol == "openai.completions" else _CHAT
            body = self._client_body(request, endpoint, usage)
        else:
            path = _CHAT
            translated = chat_body(request, endpoint.upstream_model, self.engine)
            if request.stream:
                translated["stream_options"] = self._usage_options(request, endpoint, usage)
            body = orjson.dumps(translated)
        return UpstreamCall(path, self._headers(endpoint, request.stream), body)

    def _client_body(self, request: CanonicalRequest, endpoint: Endpoint, usage: bool) -> bytes:
        """An OpenAI client's body for ``endpoint``: re-encoded only when the model name differs.

        A stream may also ask for usage (see :meth:`_stream_options`); when that is the only change and the
        client sent no ``stream_options``, the key is spliced in front of the client's bytes (a later
        duplicate key would win, so this is only done when there is none).
        """
        options = self._stream_options(request, endpoint, usage) if request.stream else None
        if endpoint.upstream_model == request.model:
            if options is None:
                return request.raw
            if "stream_options" not in request.body:
                start = request.raw.index(b"{") + 1
                head = _SPLICES.get(id(options)) or b'{"stream_options":' + orjson.dumps(options) + b","
                return head + request.raw[start:]
        body = {**request.body, "model": endpoint.upstream_model}
        if options is not None:
            body["stream_options"] = options
        return orjson.dumps(body)

    def _stream_options(
        self, request: CanonicalRequest, endpoint: Endpoint, usage: bool
    ) -> dict[str, Any] | None:
        """The ``stream_options`` to send for an OpenAI client, or None when the client's own will do.

        When a break would need the count of tokens sent (a token limit, ``min_tokens``, or usage the
        client wants), engines that can put the running usage in every chunk are asked to: the relay
        counts tokens by the backend's usage, never by chunks, and the encoder strips what the client did
        not ask for. ``usage`` (telemetry counts tokens) asks only for the final usage chunk. Other engines
        get the client's options untouched (some refuse options they do not know).
        """
        if endpoint.engine not in CONTINUOUS_USAGE_ENGINES:
            return None
        options = request.body.get("stream_options")
        if not isinstance(options, dict) or not options:  # the common case: shared, pre-encoded answers
            if not _counts_tokens(request):
                return _FINAL_USAGE if usage else None
            return _RUNNING_USAGE
        if not _counts_tokens(request):
            if not usage or options.get("include_usage"):
                return None
            return {**options, "include_usage": True}
        if options.get("include_usage") and options.get("continuous_usage_stats"):
            return None
        return {**options, "include_usage": True, "continuous_usage_stats": True}

    def _usage_options(self, request: CanonicalRequest, endpoint: Endpoint, usage: bool) -> dict[str, Any]:
        """``stream_options`` for a translated stream: always the final usage (the client's protocol
        reports it), and the running usage where the engine gives it and tokens must be counted."""
        if endpoint.engine in CONTINUOUS_USAGE_ENGINES and (usage or _counts_tokens(request)):
            return {"include_usage": True, "continuous_usage_stats": True}
        return {"include_usage": True}

    def auth(self, endpoint: Endpoint) -> Headers:
        """``Authorization: Bearer`` when the pool names a key."""
        if endpoint.api_key:
            return [(b"authorization", b"Bearer " + endpoint.api_key.encode())]
        return []

    def _headers(self, endpoint: Endpoint, stream: bool) -> Headers:
        headers = _SSE if stream else _JSON
        if endpoint.api_key:
            return [*headers, (b"authorization", b"Bearer " + endpoint.api_key.encode())]
        return headers  # shared: callers add to a copy, as the proxy always has

    def continuation(
        self, request: CanonicalRequest, endpoint: Endpoint, progress: Progress, tokens_sent: int | None
    ) -> UpstreamCall | None:
        """A request that goes on from ``progress`` on ``endpoint``; None when this engine cannot continue
        the parts sent natively, or when no tokens are left to the client's limit.

        Chat: the parts become a final assistant message continued in place (``continue_final_message``,
        no generation prompt). Completions: the text is appended to the prompt. ``tokens_sent`` is the exact
        count of completion tokens already sent (from the backends' usage); it may be None only when the
        request has no token limit. With nothing sent yet, the request is simply sent again.
        """
        openai_client = request.protocol.startswith("openai.")
        if openai_client:
            body = dict(request.body)
            body["model"] = endpoint.upstream_model
        else:
            body = chat_body(request, endpoint.upstream_model, self.engine)
        for key in ("max_tokens", "max_completion_tokens"):
            limit = body.get(key)
            if isinstance(limit, int) and not isinstance(limit, bool):
                if tokens_sent is None:
                    raise ValueError("a token limit needs the exact count of tokens sent")
                if limit - tokens_sent <= 0:
                    return None
                body[key] = limit - tokens_sent
        if isinstance(body.get("min_tokens"), int) and tokens_sent is not None:
            body["min_tokens"] = max(0, body["min_tokens"] - tokens_sent)
        parts = progress.parts
        if parts:
            continues = self.capabilities(endpoint).continues
            if any(part.kind not in continues for part in parts):
                return None
            if request.protocol == "openai.completions":
                prompt = body.get("prompt")
                if not isinstance(prompt, str):
                    return None
                body["prompt"] = prompt + progress.text
            else:
                message = _prefill(progress)
                if message is None:
                    return None
                body["messages"] = [*body["messages"], message]
                body["continue_final_message"] = True
                body["add_generation_prompt"] = False
        elif request.protocol == "openai.completions" and not isinstance(body.get("prompt"), str):
            return None
        if request.stream:
            if openai_client:
                options = self._stream_options(request, endpoint, True)
                if options is not None:
                    body["stream_options"] = options
            else:
                body["stream_options"] = self._usage_options(request, endpoint, True)
        path = _COMPLETIONS if request.protocol == "openai.completions" else _CHAT
        return UpstreamCall(path, self._headers(endpoint, request.stream), orjson.dumps(body))

    # -- answers ------------------------------------------------------------------------------------------

    def decoder(self) -> OpenAIDecoder:
        """A fresh decoder for one streamed response."""
        return OpenAIDecoder()

    def decode_response(self, body: bytes) -> list[Event]:
        """A whole response as events."""
        return decode_response(body)

    def classify(self, status: int, headers: Headers, body: bytes) -> Outcome:
        """429 throttled; 503 overloaded; other 5xx retryable; a 4xx saying the prompt is too long
        context_length; 401/403 retryable (it is our credential for that endpoint, not the client's);
        other 4xx the client's."""
        if status < 400:
            return Outcome("ok")
        if status == 429:
            return Outcome("throttled", retry_after(headers, time.time()))
        if status == 503:
            return Outcome("overloaded", retry_after(headers, time.time()))
        if status >= 500:
            return Outcome("retryable")
        if status in (401, 403):
            return Outcome("retryable")
        if status in (400, 413, 422) and is_context_length(body):
            return Outcome("context_length")
        return Outcome("client")


def _counts_tokens(request: CanonicalRequest) -> bool:
    """Whether a break mid-stream needs the exact count of tokens sent: a limit, or usage to report."""
    return (
        request.max_tokens is not None
        or isinstance(request.body.get("min_tokens"), int)
        or request.include_usage
    )


def _prefill(progress: Progress) -> dict[str, Any] | None:
    """The answer so far as one assistant message; None when its parts' order does not fit one."""
    rank = 0
    texts: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    for part in progress.parts:
        now = _RANK.get(part.kind)
        if now is None or now < rank:
            return None
        rank = now
        if part.kind == "text":
            texts.append(part.text)
        elif part.kind == "reasoning":
            reasoning.append(part.text)
        else:
            function = {"name": part.name or "", "arguments": part.text}
            calls.append({"id": part.id or "", "type": "function", "function": function})
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    return message
