"""A local stand-in for Anthropic's Messages API: its wire protocol byte for byte, and failures on cue.

Serves ``POST /v1/messages`` (JSON or SSE), ``POST /v1/messages/count_tokens`` and ``GET /v1/models[/id]``
on a loopback port, written at the socket level (like :mod:`tests.support.wire_upstream`) so a test controls
every byte: resets, hangs, half bodies, writes split inside a UTF-8 character.

**What it checks** (:mod:`tests.support.anthropic_rules`): ``x-api-key`` (401), ``anthropic-version`` (400),
the body field by field — an unknown top-level field is ``<field>: Extra inputs are not permitted`` (an OpenAI
field leaking through a gateway), a final assistant turn ending in whitespace, a prefill with thinking on,
thinking signatures, tool_use/tool_result pairing, the model (404), the context window ("prompt is too long:
N tokens > M maximum"), bodies over 32 MB (413). Every request is recorded (:class:`Received`).

**What it answers** (:mod:`tests.support.anthropic_answer`): a deterministic answer per conversation, so a
prefill is continued with exactly the rest of the uninterrupted answer; thinking blocks signed with an HMAC
(:func:`~tests.support.anthropic_answer.verify_thinking`); a ``tool_use`` when ``tool_choice`` is ``any`` or
``tool``, or ``auto`` and the last user text says "tool" or "call" (not after a ``tool_result``); the real
API's redacted-thinking trigger string gives a ``redacted_thinking`` block. Usage counts the stand-in's
tokens; a ``cache_control`` prefix is written to the cache once, then read.

**Habits of the real API it copies:** compact JSON with raw UTF-8; ``event:`` and ``data:`` lines; one
``ping`` after the first ``content_block_start``; several tokens per text/thinking delta, sizes cycling
through ``chunking``; ``input_json_delta`` opening with an empty ``partial_json`` and then uneven pieces,
one of them ending inside an ``\\"`` escape; ``signature_delta`` closing a thinking block; ``message_start``
usage with ``output_tokens: 1``, ``message_delta`` usage cumulative; ``request-id``,
``anthropic-organization-id``, rate-limit headers; ``text/event-stream; charset=utf-8`` with
``cache-control: no-cache`` over chunked transfer encoding. With ``split_utf8`` (default), an event holding a
multi-byte character is written in two TCP writes that split that character.

**Faults** — per request with the header ``x-standin-fault`` (``cut_after=3``, ``status=429;retry_after=2``,
``cut_in=tool_json``, ``hang``), else the next of :meth:`StandIn.set_fault`'s script, else its default.
Before any answer: ``{"status": 529|429|500|...}`` (``retry_after``), ``"close"`` (FIN, no answer),
``"reset"`` (RST, no answer), ``"hang"`` (no answer, connection held), ``{"delay": s}``. In a stream, after
``k`` content deltas: ``{"cut_after": k}`` (RST, no ``message_stop``), ``{"hang_after": k}`` (silence, held
open), ``{"error_after": k}`` (in-band ``event: error`` ``overloaded_error``, then the stream ends); or in
the middle of a block: ``{"cut_in" | "hang_in" | "error_in": "text" | "thinking" | "tool_json"}`` (half its
deltas sent; for thinking, before the signature). A non-streaming request with a stream fault gets half its
JSON body, then the cut or the silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import json
import re
import socket
import struct
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from tests.support.anthropic_answer import (
    DEFAULT_SECRET,
    Answer,
    Block,
    answer_length,
    continue_prefill,
    digest,
    group_tokens,
    limit,
    prose,
    sign_thinking,
    split_json,
    tool_input,
)
from tests.support.anthropic_rules import ApiError, Conversation, check_headers, invalid, parse

Fault = str | dict[str, Any]

DEFAULT_MODELS: tuple[str, ...] = ("claude-sonnet-4-5-20250929", "claude-haiku-4-5-20251001")
DEFAULT_CHUNKING: tuple[int, ...] = (3, 1, 5, 2, 4)
#: The documented test string that makes the API answer with a redacted_thinking block.
REDACTED_TRIGGER = "ANTHROPIC_MAGIC_STRING_TRIGGER_REDACTED_THINKING_46C9A13E193C177646C7398A98432ECCCE4C1253"
STREAM_FAULTS = ("cut", "hang", "error")
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
ERROR_MESSAGES = {
    403: "Your API key does not have permission to use the specified resource.",
    413: "Request exceeds the maximum allowed number of bytes.",
    429: "This request would exceed the rate limit for your organization. Please try again later.",
    500: "Internal server error",
    504: "Request timeout",
    529: "Overloaded",
}
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found"}
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def _b58(data: bytes, n: int) -> str:
    value = int.from_bytes(data, "big")
    out = []
    for _ in range(n):
        value, rem = divmod(value, 58)
        out.append(_B58[rem])
    return "".join(out)


def _json(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def sse(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + _json(data) + b"\n\n"


def parse_fault(header: str) -> Fault:
    """``"hang"`` → ``"hang"``; ``"status=429;retry_after=2"`` → ``{"status": 429, "retry_after": 2}``."""
    header = header.strip()
    if header.startswith("{"):
        value: Fault = json.loads(header)
        return value
    if "=" not in header:
        return header
    out: dict[str, Any] = {}
    for part in header.split(";"):
        key, _, raw = part.partition("=")
        raw = raw.strip()
        out[key.strip()] = int(raw) if raw.lstrip("-").isdigit() else float(raw) if _is_float(raw) else raw
    return out


def _is_float(raw: str) -> bool:
    try:
        float(raw)
    except ValueError:
        return False
    return True


@dataclass
class Received:
    """One request as the stand-in saw it, and what it did with it."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    raw: bytes
    body: Any
    at: float
    request_id: str = ""
    status: int = 0
    fault: Fault | None = None
    #: Content deltas written (text, thinking, signature and input_json deltas).
    deltas_sent: int = 0
    #: The answer was written to its end (``message_stop`` for a stream).
    completed: bool = False
    #: The client closed or reset the connection before the answer was complete.
    client_gone: bool = False
    #: The text (text blocks only) actually written to the client.
    sent_text: str = ""
    answer: Answer | None = None

    @property
    def inference(self) -> bool:
        return self.method == "POST" and self.path == "/v1/messages"


class StandIn:
    """One stand-in endpoint; ``url`` is its base (``http://127.0.0.1:PORT/v1``) once started."""

    def __init__(
        self,
        name: str = "anthropic",
        *,
        api_key: str = "sk-ant-standin-key",
        models: Sequence[str] | dict[str, int] = DEFAULT_MODELS,
        context_window: int = 200_000,
        max_output_tokens: int = 64_000,
        answer_tokens: int | None = None,
        chunking: Sequence[int] = DEFAULT_CHUNKING,
        delta_delay: float = 0.0,
        split_utf8: bool = True,
        max_request_bytes: int = 32 * 2**20,
        secret: bytes = DEFAULT_SECRET,
        default: Fault = "ok",
    ) -> None:
        if not chunking or any(size < 1 for size in chunking):
            raise ValueError("chunking needs positive chunk sizes")
        self.name = name
        #: The fleet file's engine kind for this endpoint (tests/conftest.py reads it).
        self.engine = "anthropic"
        #: The fleet model it serves in tests (its own model name is the pool's ``upstream_model``).
        self.fleet_model = "m"
        self.api_key = api_key
        self.models = dict(models) if isinstance(models, dict) else dict.fromkeys(models, context_window)
        self.model = next(iter(self.models))
        self.max_output_tokens = max_output_tokens
        #: Tokens in a full answer (None: 41 to 79, by conversation).
        self.answer_tokens = answer_tokens
        self.chunking = tuple(chunking)
        #: Seconds between two content deltas (a model decoding).
        self.delta_delay = delta_delay
        self.split_utf8 = split_utf8
        self.max_request_bytes = max_request_bytes
        self.secret = secret
        self.default: Fault = default
        self.script: deque[Fault] = deque()
        #: What the gateway's fleet file may declare: the Messages API continues an assistant prefill.
        self.can_continue = True
        self.organization_id = str(uuid.UUID(bytes=hashlib.md5(name.encode()).digest()))
        self.requests: list[Received] = []
        #: Connections open now, and requests being answered now (both return to zero when idle).
        self.open_connections = 0
        self.active_requests = 0
        self.cache: set[str] = set()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = asyncio.Event()

    # -- the fixture API ----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def messages(self) -> list[Received]:
        """The ``POST /v1/messages`` requests only."""
        return [r for r in self.requests if r.inference]

    def set_fault(self, fault: Fault | None, *, times: int | None = None) -> StandIn:
        """``fault`` for the next ``times`` messages requests, or (``times=None``) for every one from now.

        ``set_fault(None)`` clears the script and the default.
        """
        if fault is None:
            self.script.clear()
            self.default = "ok"
        elif times is None:
            self.default = fault
        else:
            self.script.extend([fault] * times)
        return self

    def then(self, *faults: Fault) -> StandIn:
        """Queue one fault per coming messages request (``"ok"`` for a normal answer)."""
        self.script.extend(faults)
        return self

    def held(self) -> list[str]:
        """What is still in flight (empty when idle)."""
        out = []
        if self.active_requests:
            out.append(f"{self.name}: {self.active_requests} request(s) being answered")
        if self.open_connections:
            out.append(f"{self.name}: {self.open_connections} connection(s) open")
        return out

    async def wait_idle(self, within: float = 1.0, *, connections: bool = True) -> None:
        """Assert that no request (and, with ``connections``, no connection) is left within ``within`` s."""
        deadline = time.monotonic() + within
        while True:
            left = [h for h in self.held() if connections or "request" in h]
            if not left or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.01)
        assert not left, "still held: " + "; ".join(left)

    async def start(self) -> StandIn:
        self._stopping = asyncio.Event()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, limit=2**20)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1.0)

    async def __aenter__(self) -> StandIn:
        return self if self._server is not None else await self.start()

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # -- the deterministic answer -------------------------------------------------------------------------

    def seed(self, convo: Conversation) -> bytes:
        return digest(*convo.seed_parts())

    def full_text(self, convo: Conversation) -> str:
        """The whole answer text for a conversation without a prefill (what a prefill continues)."""
        seed = self.seed(convo)
        return prose(seed, answer_length(seed, self.answer_tokens))

    def answer(self, convo: Conversation, ident: bytes) -> Answer:
        """The blocks a conversation gets, after ``max_tokens`` and ``stop_sequences``."""
        seed = self.seed(convo)
        blocks: list[Block] = []
        if convo.thinking is not None:
            if REDACTED_TRIGGER in convo.last_user_text:
                data = sign_thinking("redacted:" + seed.hex(), self.secret) * 4
                blocks.append(Block("redacted_thinking", data))
            else:
                blocks.append(Block("thinking", prose(seed, 31, salt="thinking", code=False)))
        choice = convo.tool_choice["type"]
        answered = any(b.get("type") == "tool_result" for b in convo.last_user)
        asked = choice == "auto" and re.search(r"\b(tool|call)\b", convo.last_user_text, re.IGNORECASE)
        custom = [t for t in convo.tools if t.get("type") in (None, "custom")]
        tool = None
        if custom and not answered and (choice in ("any", "tool") or asked):
            named = [t for t in custom if t["name"] == convo.tool_choice.get("name")]
            tool = named[0] if named else custom[seed[1] % len(custom)]
        if tool is None:
            text = self.full_text(convo)
        else:
            text = prose(seed, 9, salt="lead") if choice == "auto" else ""
        if convo.prefill is not None:
            text = continue_prefill(text, convo.prefill, seed)
        if text:
            blocks.append(Block("text", text))
        if tool is not None:
            value = tool_input(tool["input_schema"], seed)
            blocks.append(
                Block(
                    "tool_use",
                    json.dumps(value, ensure_ascii=False),
                    tool_id="toolu_01" + _b58(hashlib.sha256(ident + seed).digest(), 22),
                    tool_name=tool["name"],
                )
            )
        result = limit(blocks, convo.max_tokens, convo.stop_sequences, "tool_use" if tool else "end_turn")
        for block in result.blocks:
            if block.kind in ("text", "thinking"):
                block.pieces = group_tokens(block.text, self.chunking)
            elif block.kind == "tool_use":
                block.pieces = split_json(block.text, seed)
            if block.kind == "thinking":
                block.signature = sign_thinking(block.text, self.secret)
        return result

    def usage(self, convo: Conversation, *, commit: bool) -> dict[str, int]:
        """Input usage; a ``cache_control`` prefix is created the first time, read after (``commit``)."""
        created = read = 0
        if convo.cache_prefix is not None:
            key, tokens = convo.cache_prefix
            if key in self.cache:
                read = tokens
            else:
                created = tokens
                if commit:
                    self.cache.add(key)
        return {
            "input_tokens": convo.prompt_tokens,
            "cache_creation_input_tokens": created,
            "cache_read_input_tokens": read,
        }

    # -- serving ------------------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        self.open_connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                seen = await self._read(reader, writer)
                if seen is None:
                    return
                self.active_requests += 1
                try:
                    keep = await self._handle(seen, reader, writer)
                except (ConnectionError, asyncio.IncompleteReadError):
                    seen.client_gone = not seen.completed
                    keep = False
                finally:
                    self.active_requests -= 1
                if not keep:
                    return
        finally:
            self.open_connections -= 1
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.transport.abort()

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Received | None:
        """One request off the connection (None: the client closed it, or it was refused and closed)."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            return None
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, _ = lines[0].split(" ", 2)
        except ValueError:
            return None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                key, value = line.split(":", 1)
                headers[key.strip().lower()] = value.strip()
        path, _, query = target.partition("?")
        seen = Received(method, path, query, headers, b"", None, time.monotonic())
        seen.request_id = "req_011C" + _b58(digest(self.name, len(self.requests), time.time_ns()), 20)
        self.requests.append(seen)
        try:
            if headers.get("transfer-encoding", "").lower() == "chunked":
                raw = await self._read_chunked(reader)
            else:
                length = int(headers.get("content-length", "0") or 0)
                if length > self.max_request_bytes:
                    raise ApiError(413, "request_too_large", ERROR_MESSAGES[413])
                raw = await reader.readexactly(length) if length else b""
        except ApiError as exc:
            await self._error(writer, seen, exc, close=True)
            return None
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            return None
        seen.raw = raw
        try:
            seen.body = json.loads(raw) if raw else None
        except ValueError:
            seen.body = None
        return seen

    async def _read_chunked(self, reader: asyncio.StreamReader) -> bytes:
        out = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return bytes(out)
            out += await reader.readexactly(size)
            await reader.readexactly(2)
            if len(out) > self.max_request_bytes:
                raise ApiError(413, "request_too_large", ERROR_MESSAGES[413])

    def _headers(self, seen: Received, content_type: str) -> dict[str, str]:
        now = time.time()
        reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 1))
        return {
            "date": email.utils.formatdate(now, usegmt=True),
            "content-type": content_type,
            "connection": "keep-alive",
            "anthropic-ratelimit-requests-limit": "4000",
            "anthropic-ratelimit-requests-remaining": "3999",
            "anthropic-ratelimit-requests-reset": reset,
            "anthropic-ratelimit-input-tokens-limit": "2000000",
            "anthropic-ratelimit-input-tokens-remaining": "2000000",
            "anthropic-ratelimit-input-tokens-reset": reset,
            "anthropic-ratelimit-output-tokens-limit": "400000",
            "anthropic-ratelimit-output-tokens-remaining": "400000",
            "anthropic-ratelimit-output-tokens-reset": reset,
            "request-id": seen.request_id,
            "anthropic-organization-id": self.organization_id,
            "x-robots-tag": "none",
            "server": "cloudflare",
        }

    @staticmethod
    def _head(status: int, headers: dict[str, str]) -> bytes:
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _json_response(
        self,
        writer: asyncio.StreamWriter,
        seen: Received,
        status: int,
        data: Any,
        extra: dict[str, str] | None = None,
    ) -> None:
        body = _json(data)
        headers = self._headers(seen, "application/json")
        headers["content-length"] = str(len(body))
        headers.update(extra or {})
        seen.status = status
        writer.write(self._head(status, headers) + body)
        await writer.drain()

    async def _error(
        self, writer: asyncio.StreamWriter, seen: Received, exc: ApiError, *, close: bool = False
    ) -> None:
        data = {
            "type": "error",
            "error": {"type": exc.kind, "message": exc.message},
            "request_id": seen.request_id,
        }
        extra = {"retry-after": str(exc.retry_after)} if exc.retry_after is not None else {}
        if close:
            extra["connection"] = "close"
        await self._json_response(writer, seen, exc.status, data, extra)
        seen.completed = True

    def _fault(self, seen: Received) -> Fault:
        header = seen.headers.get("x-standin-fault")
        if header:
            return parse_fault(header)
        return self.script.popleft() if self.script else self.default

    async def _handle(
        self, seen: Received, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one request; False when the connection must close."""
        try:
            check_headers(seen.headers, self.api_key)
            if seen.method == "GET" and seen.path.startswith("/v1/models"):
                await self._models(writer, seen)
                return True
            if seen.method != "POST" or seen.path not in ("/v1/messages", "/v1/messages/count_tokens"):
                raise ApiError(404, "not_found_error", "Not Found")
            if seen.raw and seen.body is None:
                raise invalid("There was an error parsing the body of your request: invalid JSON")
            if seen.path == "/v1/messages/count_tokens":
                convo = parse(
                    seen.body, headers=seen.headers, models=self.models, count_only=True, secret=self.secret
                )
                usage = self.usage(convo, commit=False)
                await self._json_response(writer, seen, 200, {"input_tokens": sum(usage.values())})
                seen.completed = True
                return True
            fault = seen.fault = self._fault(seen)
            f = fault if isinstance(fault, dict) else {fault: True}
            if f.get("close"):
                return False
            if f.get("reset"):
                _reset(writer)
                return False
            if f.get("hang"):
                await self._hold(reader)
                return False
            if "delay" in f:
                await asyncio.sleep(float(f["delay"]))
            if "status" in f:
                status = int(f["status"])
                retry = f.get("retry_after", 1 if status == 429 else None)
                message = str(f.get("message", ERROR_MESSAGES.get(status, "Error")))
                raise ApiError(status, ERROR_TYPES.get(status, "api_error"), message, retry_after=retry)
            if f.get("prompt_too_long"):
                raise invalid("prompt is too long: 200001 tokens > 200000 maximum")
            convo = parse(
                seen.body,
                headers=seen.headers,
                models=self.models,
                max_output=self.max_output_tokens,
                secret=self.secret,
            )
        except ApiError as exc:
            await self._error(writer, seen, exc)
            return True
        ident = seen.request_id.encode()
        answer = seen.answer = self.answer(convo, ident)
        usage = self.usage(convo, commit=True)
        message_id = "msg_01" + _b58(hashlib.sha256(ident).digest(), 22)
        try:
            where = _stream_fault(f)
        except ValueError as exc:
            await self._error(writer, seen, ApiError(500, "api_error", f"stand-in: {exc}"))
            return True
        if convo.stream:
            return await self._stream(seen, reader, writer, convo, answer, usage, message_id, where)
        return await self._whole(seen, reader, writer, convo, answer, usage, message_id, where)

    async def _models(self, writer: asyncio.StreamWriter, seen: Received) -> None:
        def info(model: str) -> dict[str, Any]:
            return {
                "type": "model",
                "id": model,
                "display_name": " ".join(p.capitalize() for p in model.split("-")[:-1]) or model,
                "created_at": "2025-09-29T00:00:00Z",
            }

        wanted = seen.path.removeprefix("/v1/models").strip("/")
        if wanted:
            if wanted not in self.models:
                raise ApiError(404, "not_found_error", f"model: {wanted}")
            await self._json_response(writer, seen, 200, info(wanted))
        else:
            data = [info(m) for m in self.models]
            page = {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}
            await self._json_response(writer, seen, 200, page)
        seen.completed = True

    # -- answers --------------------------------------------------------------------------------------------

    def _message(
        self, convo: Conversation, answer: Answer | None, usage: dict[str, int], message_id: str
    ) -> dict[str, Any]:
        created = usage["cache_creation_input_tokens"]
        return {
            "model": convo.model,
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "content": [b.content() for b in answer.blocks] if answer else [],
            "stop_reason": answer.stop_reason if answer else None,
            "stop_sequence": answer.stop_sequence if answer else None,
            "usage": {
                **usage,
                "cache_creation": {"ephemeral_5m_input_tokens": created, "ephemeral_1h_input_tokens": 0},
                "output_tokens": answer.output_tokens if answer else 1,
                "service_tier": "standard",
            },
        }

    async def _whole(
        self,
        seen: Received,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        convo: Conversation,
        answer: Answer,
        usage: dict[str, int],
        message_id: str,
        where: tuple[str, str, Any] | None,
    ) -> bool:
        body = _json(self._message(convo, answer, usage, message_id))
        headers = self._headers(seen, "application/json")
        headers["content-length"] = str(len(body))
        seen.status = 200
        if where is not None:
            kind = where[0]
            if kind == "error":
                await self._error(writer, seen, ApiError(529, "overloaded_error", "Overloaded"))
                return True
            writer.write(self._head(200, headers) + body[: len(body) // 2])
            await writer.drain()
            if kind == "cut":
                _reset(writer)
            else:
                await self._hold(reader)
            return False
        writer.write(self._head(200, headers) + body)
        await writer.drain()
        seen.sent_text = "".join(b.text for b in answer.blocks if b.kind == "text")
        seen.completed = True
        return True

    def _events(
        self, convo: Conversation, answer: Answer, usage: dict[str, int], message_id: str
    ) -> list[tuple[bytes, Block | None, int]]:
        """The stream as (frame, the block a content delta belongs to, which delta of it) in order."""
        out: list[tuple[bytes, Block | None, int]] = [
            (
                sse(
                    "message_start",
                    {"type": "message_start", "message": self._message(convo, None, usage, message_id)},
                ),
                None,
                0,
            )
        ]
        for index, block in enumerate(answer.blocks):
            start: dict[str, Any]
            if block.kind == "text":
                start = {"type": "text", "text": ""}
            elif block.kind == "thinking":
                start = {"type": "thinking", "thinking": "", "signature": ""}
            elif block.kind == "redacted_thinking":
                start = {"type": "redacted_thinking", "data": block.text}
            else:
                start = {"type": "tool_use", "id": block.tool_id, "name": block.tool_name, "input": {}}
            out.append(
                (
                    sse(
                        "content_block_start",
                        {"type": "content_block_start", "index": index, "content_block": start},
                    ),
                    None,
                    0,
                )
            )
            if index == 0:
                out.append((sse("ping", {"type": "ping"}), None, 0))
            deltas: list[dict[str, Any]] = []
            if block.kind == "text":
                deltas = [{"type": "text_delta", "text": p} for p in block.pieces]
            elif block.kind == "thinking":
                deltas = [{"type": "thinking_delta", "thinking": p} for p in block.pieces]
                deltas.append({"type": "signature_delta", "signature": block.signature})
            elif block.kind == "tool_use":
                deltas = [{"type": "input_json_delta", "partial_json": p} for p in ["", *block.pieces]]
            for n, delta in enumerate(deltas):
                frame = {"type": "content_block_delta", "index": index, "delta": delta}
                out.append((sse("content_block_delta", frame), block, n))
            out.append((sse("content_block_stop", {"type": "content_block_stop", "index": index}), None, 0))
        if not answer.blocks:
            out.append((sse("ping", {"type": "ping"}), None, 0))
        delta = {"stop_reason": answer.stop_reason, "stop_sequence": answer.stop_sequence}
        final_usage = {**usage, "output_tokens": answer.output_tokens}
        out.append(
            (sse("message_delta", {"type": "message_delta", "delta": delta, "usage": final_usage}), None, 0)
        )
        out.append((sse("message_stop", {"type": "message_stop"}), None, 0))
        return out

    async def _stream(
        self,
        seen: Received,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        convo: Conversation,
        answer: Answer,
        usage: dict[str, int],
        message_id: str,
        where: tuple[str, str, Any] | None,
    ) -> bool:
        events = self._events(convo, answer, usage, message_id)
        stop_at = _fault_index(events, where)
        if where is not None and stop_at is None:
            await self._error(
                writer, seen, ApiError(500, "api_error", f"stand-in: no {where[2]} block to fault in")
            )
            return True
        headers = self._headers(seen, "text/event-stream; charset=utf-8")
        headers["cache-control"] = "no-cache"
        headers["transfer-encoding"] = "chunked"
        seen.status = 200
        writer.write(self._head(200, headers))
        async with self._watching(reader, seen) as watch:
            for i, (frame, block, n) in enumerate(events):
                if watch.done():
                    seen.client_gone = True
                    return False
                if i == stop_at and where is not None:
                    return await self._stream_fault(seen, writer, where[0], watch)
                if block is not None and self.delta_delay:
                    await asyncio.sleep(self.delta_delay)
                await self._write(writer, frame)
                if block is not None:
                    seen.deltas_sent += 1
                    if block.kind == "text":
                        seen.sent_text += block.pieces[n]
            return await self._end_chunked(writer, seen, watch)
        return False  # the client went away mid-answer

    async def _stream_fault(
        self, seen: Received, writer: asyncio.StreamWriter, kind: str, watch: asyncio.Future[bytes]
    ) -> bool:
        if kind == "cut":
            await writer.drain()
            _reset(writer)
            return False
        if kind == "hang":
            await writer.drain()
            await self._hold_until(watch)
            seen.client_gone = watch.done()
            return False
        error = {
            "type": "error",
            "error": {"type": "overloaded_error", "message": "Overloaded"},
            "request_id": seen.request_id,
        }
        await self._write(writer, sse("error", error))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return not watch.done()

    async def _write(self, writer: asyncio.StreamWriter, frame: bytes) -> None:
        """One SSE frame as an HTTP chunk; with ``split_utf8``, in two writes that split a UTF-8 character."""
        at = next((i for i, b in enumerate(frame) if b >= 0xC0), -1) if self.split_utf8 else -1
        if at < 0:
            writer.write(_chunk(frame))
            await writer.drain()
            return
        writer.write(_chunk(frame[: at + 1]))
        await writer.drain()
        await asyncio.sleep(0.001)
        writer.write(_chunk(frame[at + 1 :]))
        await writer.drain()

    @contextlib.asynccontextmanager
    async def _watching(
        self, reader: asyncio.StreamReader, seen: Received
    ) -> AsyncIterator[asyncio.Future[bytes]]:
        """Watch the client's side while a stream is written (a read that ends: it went away). A write
        that fails marks the client gone; the caller then says the connection must close."""
        watch = asyncio.ensure_future(reader.read(1))
        try:
            yield watch
        except ConnectionError:
            seen.client_gone = True
        finally:
            if not watch.done():
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch

    async def _end_chunked(
        self, writer: asyncio.StreamWriter, seen: Received, watch: asyncio.Future[bytes]
    ) -> bool:
        """The chunked body's end: the answer is complete; keep the connection if the client is there."""
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        seen.completed = True
        return not watch.done()

    async def _hold(self, reader: asyncio.StreamReader) -> None:
        """Say nothing until the client goes away or the stand-in stops."""
        watch = asyncio.ensure_future(reader.read(1))
        try:
            await self._hold_until(watch)
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await watch

    async def _hold_until(self, watch: asyncio.Future[bytes]) -> None:
        stopping: asyncio.Future[Any] = asyncio.ensure_future(self._stopping.wait())
        waits: set[asyncio.Future[Any]] = {watch, stopping}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Drop the connection with a TCP RST (SO_LINGER 0), as a crashed or cut-off server does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _stream_fault(f: dict[str, Any]) -> tuple[str, str, Any] | None:
    """(cut|hang|error, "after"|"in", k or block kind) from a fault, or None."""
    for kind in STREAM_FAULTS:
        if f"{kind}_after" in f:
            return kind, "after", int(f[f"{kind}_after"])
        if f"{kind}_in" in f:
            target = f[f"{kind}_in"]
            if target not in ("text", "thinking", "tool_json"):
                raise ValueError(f"{kind}_in must be text, thinking or tool_json, not {target!r}")
            return kind, "in", target
    return None


def _fault_index(
    events: list[tuple[bytes, Block | None, int]], where: tuple[str, str, Any] | None
) -> int | None:
    """The index of the event before which the fault comes."""
    if where is None:
        return None
    _, how, arg = where
    deltas = [i for i, (_, block, _) in enumerate(events) if block is not None]
    if how == "after":
        if arg < len(deltas):
            return deltas[arg]
        return deltas[-1] + 1 if deltas else 2
    kind = "tool_use" if arg == "tool_json" else arg
    mine = [
        i
        for i, (_, block, n) in enumerate(events)
        if block is not None
        and block.kind == kind
        and n < len(block.pieces) + (1 if kind == "tool_use" else 0)
    ]
    if kind == "tool_use":
        mine = mine[1:]  # past the empty opening partial_json: inside the JSON itself
    if len(mine) < 2:
        return None
    return mine[len(mine) // 2]


async def start_standin(**options: Any) -> StandIn:
    """A started stand-in (``await s.stop()``, or use it as ``async with``)."""
    return await StandIn(**options).start()
