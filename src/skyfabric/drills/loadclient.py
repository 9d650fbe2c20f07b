"""The drill's client: the official OpenAI SDK, one record per request, nothing retried.

Why the SDK rather than raw HTTP: the drill must see what an application sees — the SDK's own parsing of
streams (an in-band error event raises), its error classes, its timeouts. ``max_retries=0`` because a
retrying client would hide exactly the failures a drill is looking for.

What counts as what (the report's vocabulary):

* **ok** — HTTP 200 and the answer finished with a ``finish_reason`` and all the forced tokens;
* **error** — the client was told it failed: an HTTP error status, a connection error, a timeout, or an
  in-band error event mid-stream (``stream_interrupted``);
* **truncated** — the client was *not* told: a stream that ended without a finish reason, or with fewer
  tokens than forced. This is the worst outcome (an answer that looks complete and is not); it must be 0.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import openai

from skyfabric.drills.workload import make_prompt


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request; times are seconds since the drill's start."""

    id: int
    start: float
    stream: bool
    prompt_tokens: int
    output_tokens: int
    end: float | None = None
    ttft: float | None = None
    status: int = 0
    error: str | None = None
    message: str | None = None
    completion_tokens: int = 0
    usage_prompt_tokens: int | None = None
    finish_reason: str | None = None
    truncated: bool = False
    backend: str | None = None

    @property
    def ok(self) -> bool:
        """Answered completely."""
        return self.error is None and not self.truncated and self.end is not None

    @property
    def provider(self) -> str | None:
        """The provider part of ``x-skyfabric-backend`` (``provider/region/pool/index``)."""
        return self.backend.split("/", 1)[0] if self.backend else None

    @property
    def latency(self) -> float | None:
        """Seconds from sending to the end of the answer."""
        return None if self.end is None else self.end - self.start

    def to_json(self) -> dict[str, Any]:
        """A flat dict for ``requests.jsonl``."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RequestRecord:
        """Read back a line of ``requests.jsonl``."""
        return cls(**data)


class LoadClient:
    """Sends drill requests to the gateway and records each one."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str,
        model: str,
        timeout: float,
        seed: int,
        clock: Callable[[], float] = time.monotonic,
        t0: float = 0.0,
    ) -> None:
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout)
        self.model = model
        self.timeout = timeout
        self.clock = clock
        self.t0 = t0
        self.rng = random.Random(seed)

    async def close(self) -> None:
        """Close the SDK's connection pool."""
        await self.client.close()

    def new(self, rid: int, prompt_tokens: int, output_tokens: int, stream: bool) -> RequestRecord:
        """A record for a request about to be sent (kept by the caller even if the send is cancelled)."""
        return RequestRecord(rid, self.clock() - self.t0, stream, prompt_tokens, output_tokens)

    async def send(self, record: RequestRecord) -> RequestRecord:
        """Send one chat request with a forced output length; fills ``record``, never raises for a failure."""
        record.start = self.clock() - self.t0
        output_tokens = record.output_tokens
        messages = [{"role": "user", "content": make_prompt(record.prompt_tokens, self.rng)}]
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": output_tokens,
            "temperature": 0.0,
            "extra_body": {"min_tokens": output_tokens, "ignore_eos": True},
        }
        try:
            async with asyncio.timeout(self.timeout):
                if record.stream:
                    await self._stream(record, kwargs)
                else:
                    await self._whole(record, kwargs)
        except TimeoutError:
            record.error, record.message = "timeout", f"no complete answer in {self.timeout:g}s"
        except openai.APIStatusError as exc:
            record.status = exc.status_code
            record.error, record.message = f"http_{exc.status_code}", _short(exc.message)
            record.backend = record.backend or exc.response.headers.get("x-skyfabric-backend")
        except openai.APITimeoutError:
            record.error, record.message = "timeout", "the SDK timed out"
        except openai.APIConnectionError as exc:
            record.error, record.message = "connection", _short(str(exc.__cause__ or exc))
        except openai.APIError as exc:
            # Raised by the SDK for an in-band error event: the stream said it could not be finished.
            code = exc.body.get("code") if isinstance(exc.body, dict) else None
            record.error, record.message = "stream_interrupted", _short(f"{code or ''} {exc.message}".strip())
        except Exception as exc:  # a drill must record, not crash, whatever the client library raises
            record.error, record.message = f"client_{type(exc).__name__}", _short(str(exc))
        record.end = self.clock() - self.t0
        if record.error is None and (
            record.finish_reason is None or record.completion_tokens < record.output_tokens
        ):
            record.truncated = True
        return record

    async def _stream(self, record: RequestRecord, kwargs: dict[str, Any]) -> None:
        kwargs = {**kwargs, "stream": True, "stream_options": {"include_usage": True}}
        create = self.client.chat.completions.with_streaming_response.create
        async with create(**kwargs) as response:
            record.status = response.status_code
            record.backend = response.headers.get("x-skyfabric-backend")
            chunks = 0
            usage_tokens: int | None = None
            stream = await response.parse()
            async for chunk in stream:
                if chunk.usage is not None:
                    usage_tokens = chunk.usage.completion_tokens
                    record.usage_prompt_tokens = chunk.usage.prompt_tokens
                for choice in chunk.choices:
                    if choice.delta is not None and choice.delta.content:
                        if record.ttft is None:
                            record.ttft = self.clock() - self.t0 - record.start
                        chunks += 1
                    if choice.finish_reason is not None:
                        record.finish_reason = choice.finish_reason
            record.completion_tokens = usage_tokens if usage_tokens is not None else chunks

    async def _whole(self, record: RequestRecord, kwargs: dict[str, Any]) -> None:
        raw = await self.client.chat.completions.with_raw_response.create(**kwargs)
        record.status = raw.status_code
        record.backend = raw.headers.get("x-skyfabric-backend")
        completion = raw.parse()
        record.ttft = self.clock() - self.t0 - record.start
        if completion.choices:
            record.finish_reason = completion.choices[0].finish_reason
        if completion.usage is not None:
            record.completion_tokens = completion.usage.completion_tokens
            record.usage_prompt_tokens = completion.usage.prompt_tokens


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
