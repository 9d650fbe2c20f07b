"""One client request as the router sees it: parsed once, with its deadline and what was tried."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from skyfabric.core.endpoints import Endpoint

#: Engines that put the running ``usage`` in every chunk when asked (``continuous_usage_stats``): at a
#: break mid-stream, the relay then knows exactly how many tokens the client has been sent.
CONTINUOUS_USAGE_ENGINES: frozenset[str] = frozenset({"local", "vllm", "vllm-tpu", "vllm-neuron", "sglang"})


@dataclass(slots=True)
class RequestContext:
    """A validated inference request and the bookkeeping of its attempts."""

    kind: str  # "chat" or "completions"
    body: dict[str, Any]
    raw: bytes
    model: str  # canonical fleet model name
    stream: bool
    deadline: float
    attempts: int = 0
    tried: set[str] = field(default_factory=set)
    failed_providers: set[str] = field(default_factory=set)
    rescued: int = 0
    priority: int = 5
    #: Tokens the request is known to need at least (its prompt's size bound, or a context just
    #: exceeded): models whose known ``context_length`` is smaller are not tried.
    needs_tokens: int = 0
    #: Called once when the request is over (stream finished or abandoned): frees its admission slot.
    on_done: Callable[[], None] | None = None
    #: Endpoint id → when it broke this stream (or failed to take it over): it gets the stream back only
    #: once it has answered a probe since (``EndpointState.probed_ok``).
    broke: dict[str, float] = field(default_factory=dict)
    #: Endpoints that cannot continue this request (refused the prefix with a 4xx, or restarted the
    #: answer): never asked again for it, and not counted against their health.
    refused: set[str] = field(default_factory=set)
    #: Telemetry reports tokens: ask backends that can for the final usage (see ``stream_options_for``).
    wants_usage: bool = False
    #: Telemetry's per-request scratch (see ``gateway/observe.py``); None unless an observer is on.
    observed: dict[str, Any] | None = None
    #: The client's W3C ``traceparent`` (kept only while tracing is on).
    traceparent: bytes | None = None

    def finish(self) -> None:
        """Run ``on_done`` once."""
        callback, self.on_done = self.on_done, None
        if callback is not None:
            callback()

    @property
    def path(self) -> bytes:
        return b"/chat/completions" if self.kind == "chat" else b"/completions"

    def token_limit(self) -> int | None:
        """The client's cap on completion tokens, if it set one."""
        for key in ("max_tokens", "max_completion_tokens"):
            limit = self.body.get(key)
            if isinstance(limit, int) and not isinstance(limit, bool):
                return limit
        return None

    def client_usage(self) -> tuple[bool, bool]:
        """What usage the client asked to stream: (final usage chunk, usage in every chunk)."""
        options = self.body.get("stream_options")
        if not isinstance(options, dict):
            return False, False
        return bool(options.get("include_usage")), bool(options.get("continuous_usage_stats"))

    def counts_tokens(self) -> bool:
        """Whether a break mid-stream needs the exact count of tokens sent: a limit, or usage to report."""
        return (
            self.token_limit() is not None
            or isinstance(self.body.get("min_tokens"), int)
            or self.client_usage()[0]
        )

    def stream_options_for(self, endpoint: Endpoint) -> dict[str, Any] | None:
        """The ``stream_options`` to send upstream, or None when the client's own will do.

        When a break would need the count of tokens sent (see :meth:`counts_tokens`), engines that can put
        the running usage in every chunk are asked to: the relay counts tokens by the backend's usage,
        never by chunks, and strips from the client's stream what the client did not ask for. Other
        backends get the client's options untouched (some reject options they do not know).
        """
        if endpoint.engine not in CONTINUOUS_USAGE_ENGINES:
            return None
        options = self.body.get("stream_options")
        client = options if isinstance(options, dict) else {}
        if not self.counts_tokens():
            # Telemetry only needs the total: the final usage chunk, no usage in every chunk.
            if not self.wants_usage or client.get("include_usage"):
                return None
            return {**client, "include_usage": True}
        if client.get("include_usage") and client.get("continuous_usage_stats"):
            return None
        return {**client, "include_usage": True, "continuous_usage_stats": True}

    def body_for(self, endpoint: Endpoint, requested: str) -> bytes:
        """The body to send to ``endpoint``; re-encoded only when the backend's model name differs.

        A stream also asks for usage (see :meth:`stream_options_for`); when that is the only change and the
        client sent no ``stream_options``, the key is spliced in front of the client's bytes (a later
        duplicate key would win, so this is only done when there is none).
        """
        options = self.stream_options_for(endpoint) if self.stream else None
        if endpoint.upstream_model == requested:
            if options is None:
                return self.raw
            if "stream_options" not in self.body:
                start = self.raw.index(b"{") + 1
                return b'{"stream_options":' + orjson.dumps(options) + b"," + self.raw[start:]
        body = {**self.body, "model": endpoint.upstream_model}
        if options is not None:
            body["stream_options"] = options
        return orjson.dumps(body)

    def uncontinuable(self) -> str | None:
        """Why a break in this request's stream cannot be continued exactly, judged from the request.

        Several choices, log-probabilities, an echoed prompt, tools and token-id prompts are not tracked by
        the relay (yet): a stream of such a request that breaks ends with an in-band error.
        """
        body = self.body
        n = body.get("n")
        if isinstance(n, int) and n > 1:
            return "several choices (n > 1)"
        if body.get("best_of") not in (None, 1):
            return "best_of"
        if body.get("logprobs") or body.get("top_logprobs"):
            return "logprobs"
        if body.get("echo"):
            return "echo"
        if body.get("tools") or body.get("tool_choice") or body.get("functions"):
            return "tools"
        if self.kind == "completions" and not isinstance(body.get("prompt"), str):
            return "a prompt that is not a single string"
        return None

    def continuation_body(self, endpoint: Endpoint, prefix: str, tokens_sent: int | None) -> bytes | None:
        """A request that continues the answer from ``prefix`` on ``endpoint``; None if nothing is left.

        Chat: the prefix becomes a final assistant message continued in place (vLLM's
        ``continue_final_message``). Completions: the prefix is appended to the prompt. ``tokens_sent`` is
        the exact count of completion tokens already sent (from the backends' usage); it may be None only
        when the request has no token limit.
        """
        body = dict(self.body)
        body["model"] = endpoint.upstream_model
        for key in ("max_tokens", "max_completion_tokens"):
            limit = body.get(key)
            if isinstance(limit, int):
                if tokens_sent is None:
                    raise ValueError("a token limit needs the exact count of tokens sent")
                if limit - tokens_sent <= 0:
                    return None
                body[key] = limit - tokens_sent
        if isinstance(body.get("min_tokens"), int) and tokens_sent is not None:
            body["min_tokens"] = max(0, body["min_tokens"] - tokens_sent)
        if self.kind == "chat":
            if prefix:
                body["messages"] = [*body["messages"], {"role": "assistant", "content": prefix}]
                body["continue_final_message"] = True
                body["add_generation_prompt"] = False
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                return None
            body["prompt"] = prompt + prefix
        options = self.stream_options_for(endpoint)
        if options is not None:
            body["stream_options"] = options
        return orjson.dumps(body)
