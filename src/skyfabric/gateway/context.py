"""One client request as the router sees it: parsed once, with its deadline and what was tried."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from skyfabric.core.endpoints import Endpoint


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
    #: Called once when the request is over (stream finished or abandoned): frees its admission slot.
    on_done: Callable[[], None] | None = None
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

    def body_for(self, endpoint: Endpoint, requested: str) -> bytes:
        """The body to send to ``endpoint``; re-encoded only when the backend's model name differs."""
        if endpoint.upstream_model == requested:
            return self.raw
        return orjson.dumps({**self.body, "model": endpoint.upstream_model})

    def continuation_body(self, endpoint: Endpoint, prefix: str, tokens_sent: int) -> bytes | None:
        """A request that continues the answer from ``prefix`` on ``endpoint``; None if nothing is left.

        Chat: the prefix becomes a final assistant message continued in place (vLLM's
        ``continue_final_message``). Completions: the prefix is appended to the prompt.
        """
        body = dict(self.body)
        body["model"] = endpoint.upstream_model
        for key in ("max_tokens", "max_completion_tokens"):
            limit = body.get(key)
            if isinstance(limit, int):
                if limit - tokens_sent <= 0:
                    return None
                body[key] = limit - tokens_sent
        if isinstance(body.get("min_tokens"), int):
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
        return orjson.dumps(body)
