"""Anthropic's Messages API as a client protocol: ``POST /v1/messages`` and ``/v1/messages/count_tokens``.

Parsing validates what Anthropic itself validates about a request's *shape* (required fields, types,
roles) and nothing more: a gateway that refused a request the real endpoint accepts would break the coding
agents that send the newest fields. So unknown fields (``context_management``, ``output_config``,
``container``, ``mcp_servers``, ...) are kept in ``extras``, unknown content block types are kept as they
came, and where the seam's slot is lossier than Anthropic's field (server tools among ``tools``, a
``thinking`` with ``display``) the client's original is kept in ``extras`` under the same key, so an
Anthropic backend sends exactly what the client sent. Error messages follow Anthropic's ``field: reason``.

Streaming encoding lives in :mod:`skyfabric.protocols.frontends.anthropic_encoder`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NoReturn

import orjson

from skyfabric.core.errors import InvalidRequest, MalformedEvent
from skyfabric.protocols import anthropic_wire as wire
from skyfabric.protocols.base import Frontend, Headers
from skyfabric.protocols.canonical import (
    Block,
    CanonicalRequest,
    Event,
    Finish,
    Message,
    ReasoningDelta,
    ReasoningSignature,
    RedactedReasoning,
    Start,
    TextDelta,
    Thinking,
    Tool,
    ToolCallDelta,
    ToolChoice,
    Usage,
)
from skyfabric.protocols.frontends.anthropic_encoder import AnthropicEncoder, message_id, tool_id

PROTOCOL = "anthropic.messages"

#: Body fields the seam has a slot for; every other field is kept in ``extras``.
_SLOTTED = frozenset(
    {
        "model",
        "max_tokens",
        "messages",
        "system",
        "stop_sequences",
        "temperature",
        "top_p",
        "top_k",
        "tools",
        "tool_choice",
        "thinking",
        "metadata",
        "stream",
    }
)
_ROLES = frozenset({"user", "assistant", "system"})
_TOOL_CHOICES = frozenset({"auto", "any", "tool", "none"})
#: Fields of a custom tool the canonical :class:`Tool` has a slot for (the rest go to ``Tool.extra``).
_TOOL_FIELDS = frozenset({"name", "description", "input_schema"})


class AnthropicFrontend:
    """The Messages API's client side: parse, encode a stream, answer whole, answer errors."""

    family = "anthropic"
    heartbeat = b'event: ping\ndata: {"type": "ping"}\n\n'

    def parse(self, path: bytes, body: bytes, headers: Headers) -> CanonicalRequest:
        """A ``/v1/messages`` request (``?beta=true`` allowed); ``.../count_tokens`` goes to its parser."""
        route = path.split(b"?", 1)[0].rstrip(b"/")
        if route.endswith(b"/count_tokens"):
            return self.parse_count_tokens(body, headers)
        return _parse(body, headers, count_tokens=False)

    def parse_count_tokens(self, body: bytes, headers: Headers) -> CanonicalRequest:
        """A ``/v1/messages/count_tokens`` request: a Messages body without ``max_tokens`` (ignored)."""
        return _parse(body, headers, count_tokens=True)

    def encoder(self, request: CanonicalRequest) -> AnthropicEncoder:
        """A fresh stream encoder for an answer to ``request``."""
        return AnthropicEncoder(request)

    def response(self, request: CanonicalRequest, events: Iterable[Event]) -> bytes:
        """A whole Message body from an answer's events (choice 0; Anthropic has no ``n``)."""
        return orjson.dumps(message_object(request, events))

    def error(
        self,
        status: int,
        message: str,
        *,
        error_type: str | None = None,
        code: str | None = None,
        param: str | None = None,
    ) -> bytes:
        """Anthropic's error body; its ``type`` follows the status as Anthropic's own table does."""
        return orjson.dumps(wire.error_json(message, wire.error_type(error_type, status)))

    def count_tokens_body(self, input_tokens: int) -> bytes:
        """The answer to ``/v1/messages/count_tokens``."""
        return orjson.dumps({"input_tokens": input_tokens})

    def models_body(self, models: Iterable[str], *, created_at: str = "1970-01-01T00:00:00Z") -> bytes:
        """``GET /v1/models`` in Anthropic's shape (one page holding every model)."""
        return models_body(models, created_at=created_at)


def models_body(models: Iterable[str], *, created_at: str = "1970-01-01T00:00:00Z") -> bytes:
    """``GET /v1/models`` in Anthropic's shape: ``data`` of ``{type, id, display_name, created_at}``.

    The fleet does not know when a model was released, so ``created_at`` is one RFC 3339 time for all.
    """
    data = [{"type": "model", "id": m, "display_name": m, "created_at": created_at} for m in models]
    return orjson.dumps(
        {
            "data": data,
            "has_more": False,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }
    )


# -- parsing ----------------------------------------------------------------------------------------------


def _parse(body: bytes, headers: Headers, *, count_tokens: bool) -> CanonicalRequest:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidRequest(
            "There was an error parsing the body of your request: it is not valid JSON"
        ) from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object")
    model = data.get("model")
    if model is None:
        _fail("model: Field required", "model")
    if not isinstance(model, str) or not model:
        _fail("model: Input should be a non-empty string", "model")
    max_tokens: int | None = None
    if not count_tokens:
        raw_max = data.get("max_tokens")
        if raw_max is None:
            _fail("max_tokens: Field required", "max_tokens")
        if not _is_int(raw_max):
            _fail("max_tokens: Input should be a valid integer", "max_tokens")
        if raw_max < 1:
            _fail("max_tokens: Input should be greater than or equal to 1", "max_tokens")
        max_tokens = raw_max
    request = CanonicalRequest(
        protocol=PROTOCOL,
        model=model,
        messages=_messages(data.get("messages")),
        system=_system(data.get("system")),
        max_tokens=max_tokens,
        temperature=_number(data, "temperature"),
        top_p=_number(data, "top_p"),
        top_k=_integer(data, "top_k"),
        stop=_stop_sequences(data.get("stop_sequences")),
        stream=False if count_tokens else _stream(data.get("stream")),
        include_usage=True,  # Anthropic's stream always carries usage
        metadata=_metadata(data.get("metadata")),
        body=data,
        raw=body,
    )
    extras = {k: v for k, v in data.items() if k not in _SLOTTED}
    if count_tokens:
        extras.pop("max_tokens", None)
    request.tools, server_tools = _tools(data.get("tools"))
    if server_tools:
        # The seam's Tool is a function; Anthropic's server tools (web_search, bash, mcp_toolset, ...) and
        # their order (a cache_control breakpoint caches every tool before it) survive only as the original.
        extras["tools"] = data["tools"]
    request.tool_choice = _tool_choice(data.get("tool_choice"))
    request.thinking, keep_thinking = _thinking(data.get("thinking"))
    if keep_thinking:
        extras["thinking"] = data["thinking"]
    request.extras = extras
    request.version, request.betas = _versions(headers)
    return request


def _fail(message: str, param: str | None = None) -> NoReturn:
    raise InvalidRequest(message, param=param)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(data: dict[str, Any], name: str) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(f"{name}: Input should be a valid number", name)
    return float(value)


def _integer(data: dict[str, Any], name: str) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if not _is_int(value):
        _fail(f"{name}: Input should be a valid integer", name)
    return int(value)


def _stream(value: Any) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        _fail("stream: Input should be a valid boolean", "stream")
    return value


def _metadata(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        _fail("metadata: Input should be a valid dictionary", "metadata")
    return value


def _stop_sequences(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        _fail("stop_sequences: Input should be a valid list of strings", "stop_sequences")
    return list(value)


def _messages(value: Any) -> list[Message]:
    if value is None:
        _fail("messages: Field required", "messages")
    if not isinstance(value, list):
        _fail("messages: Input should be a valid list", "messages")
    if not value:
        _fail("messages: at least one message is required", "messages")
    out: list[Message] = []
    for i, item in enumerate(value):
        where = f"messages.{i}"
        if not isinstance(item, dict):
            _fail(f"{where}: Input should be a valid dictionary", "messages")
        role = item.get("role")
        if role not in _ROLES:
            # ``system`` is tolerated mid-conversation (coding agents send reminders that way; newer
            # models take it); Anthropic's own message names the two roles every model takes.
            _fail(f"{where}.role: Input should be 'user' or 'assistant'", "messages")
        if "content" not in item:
            _fail(f"{where}.content: Field required", "messages")
        out.append(Message(role=role, content=_content(item["content"], f"{where}.content")))
    return out


def _content(value: Any, where: str) -> list[Block]:
    """Content as blocks: a string is one text block (an empty string is no block, as Anthropic reads it)."""
    if isinstance(value, str):
        return [{"type": "text", "text": value}] if value else []
    if not isinstance(value, list):
        _fail(f"{where}: Input should be a valid string or a list of content blocks", "messages")
    for j, block in enumerate(value):
        _check_block(block, f"{where}.{j}")
    return value


def _check_block(block: Any, where: str) -> None:
    """The fields Anthropic requires of the block types the seam reads; other types pass untouched."""
    if not isinstance(block, dict):
        _fail(f"{where}: Input should be a valid dictionary", "messages")
    kind = block.get("type")
    if not isinstance(kind, str):
        _fail(f"{where}.type: Field required", "messages")
    required: tuple[tuple[str, type], ...]
    if kind == "text":
        required = (("text", str),)
    elif kind in ("image", "document"):
        required = (("source", dict),)
    elif kind == "tool_use":
        required = (("id", str), ("name", str), ("input", dict))
    elif kind == "tool_result":
        required = (("tool_use_id", str),)
    elif kind == "thinking":
        required = (("thinking", str),)
    elif kind == "redacted_thinking":
        required = (("data", str),)
    else:
        return
    for name, expected in required:
        if name not in block:
            _fail(f"{where}.{kind}.{name}: Field required", "messages")
        if not isinstance(block[name], expected):
            what = "string" if expected is str else "dictionary"
            _fail(f"{where}.{kind}.{name}: Input should be a valid {what}", "messages")


def _system(value: Any) -> list[Block]:
    if value is None:
        return []
    if isinstance(value, str):
        return [{"type": "text", "text": value}] if value else []
    if not isinstance(value, list):
        _fail("system: Input should be a valid string or a list of text blocks", "system")
    for j, block in enumerate(value):
        _check_block(block, f"system.{j}")
    return value


def _tools(value: Any) -> tuple[list[Tool], bool]:
    """Custom tools as canonical tools; whether any server tool (a ``type`` other than custom) came too."""
    if value is None:
        return [], False
    if not isinstance(value, list):
        _fail("tools: Input should be a valid list", "tools")
    tools: list[Tool] = []
    server = False
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            _fail(f"tools.{i}: Input should be a valid dictionary", "tools")
        kind = item.get("type")
        if kind is not None and kind != "custom":
            server = True
            continue
        name = item.get("name")
        if not isinstance(name, str) or not name:
            _fail(f"tools.{i}.custom.name: Field required", "tools")
        schema = item.get("input_schema")
        if not isinstance(schema, dict):
            _fail(f"tools.{i}.custom.input_schema: Field required", "tools")
        description = item.get("description")
        if description is not None and not isinstance(description, str):
            _fail(f"tools.{i}.custom.description: Input should be a valid string", "tools")
        extra = {k: v for k, v in item.items() if k not in _TOOL_FIELDS}
        tools.append(Tool(name=name, description=description, parameters=schema, extra=extra))
    return tools, server


def _tool_choice(value: Any) -> ToolChoice | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        _fail("tool_choice: Input should be a valid dictionary", "tool_choice")
    kind = value.get("type")
    if kind not in _TOOL_CHOICES:
        _fail("tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'", "tool_choice")
    name = value.get("name")
    if kind == "tool" and (not isinstance(name, str) or not name):
        _fail("tool_choice.tool.name: Field required", "tool_choice")
    disable = value.get("disable_parallel_tool_use", False)
    if not isinstance(disable, bool):
        _fail("tool_choice.disable_parallel_tool_use: Input should be a valid boolean", "tool_choice")
    return ToolChoice(type=kind, name=name if kind == "tool" else None, disable_parallel=disable)


def _thinking(value: Any) -> tuple[Thinking | None, bool]:
    """The canonical thinking request, and whether the original must be kept (the seam cannot say it all)."""
    if value is None:
        return None, False
    if not isinstance(value, dict):
        _fail("thinking: Input should be a valid dictionary", "thinking")
    kind = value.get("type")
    if kind == "enabled":
        budget = value.get("budget_tokens")
        if budget is None:
            _fail("thinking.enabled.budget_tokens: Field required", "thinking")
        if not _is_int(budget):
            _fail("thinking.enabled.budget_tokens: Input should be a valid integer", "thinking")
        return Thinking(enabled=True, budget_tokens=budget), set(value) != {"type", "budget_tokens"}
    if kind == "adaptive":
        return Thinking(enabled=True), set(value) != {"type"}
    if kind == "disabled":
        return Thinking(enabled=False), set(value) != {"type"}
    if not isinstance(kind, str):
        _fail("thinking.type: Field required", "thinking")
    # A type newer than this code: thinking of some kind; the original goes to Anthropic as it came.
    return Thinking(enabled=True), True


def _versions(headers: Headers) -> tuple[str | None, list[str]]:
    version: str | None = None
    betas: list[str] = []
    for name, value in headers:
        key = name.lower()
        if key == b"anthropic-version":
            version = value.decode("latin-1").strip() or None
        elif key == b"anthropic-beta":
            for flag in value.decode("latin-1").split(","):
                flag = flag.strip()
                if flag and flag not in betas:
                    betas.append(flag)
    return version, betas


# -- whole answers ----------------------------------------------------------------------------------------


def message_object(request: CanonicalRequest, events: Iterable[Event]) -> dict[str, Any]:
    """The Message object for an answer's events: content blocks, stop reason, usage."""
    ident: str | None = None
    model = request.model
    content: list[Block] = []
    tool_args: dict[int, list[str]] = {}  # position in content → argument pieces
    open_tool: tuple[int, int] | None = None  # (canonical tool index, position in content)
    finish: Finish | None = None
    usage: Usage | None = None
    for event in events:
        if getattr(event, "choice", 0) != 0:
            continue
        if isinstance(event, Start):
            if ident is None:
                ident, model = event.id, event.model or request.model
        elif isinstance(event, TextDelta):
            if not event.text:
                continue
            if content and content[-1]["type"] == "text":
                content[-1]["text"] += event.text
            else:
                content.append({"type": "text", "text": event.text})
            open_tool = None
        elif isinstance(event, ReasoningDelta):
            if not event.text:
                continue
            last = content[-1] if content else None
            if last is not None and last["type"] == "thinking" and not last["signature"]:
                last["thinking"] += event.text
            else:
                content.append({"type": "thinking", "thinking": event.text, "signature": ""})
            open_tool = None
        elif isinstance(event, ReasoningSignature):
            last = content[-1] if content else None
            if last is None or last["type"] != "thinking" or last["signature"]:
                last = {"type": "thinking", "thinking": "", "signature": ""}
                content.append(last)
            last["signature"] = event.signature
            open_tool = None
        elif isinstance(event, RedactedReasoning):
            content.append({"type": "redacted_thinking", "data": event.data})
            open_tool = None
        elif isinstance(event, ToolCallDelta):
            if open_tool is None or open_tool[0] != event.index:
                content.append({"type": "tool_use", "id": "", "name": "", "input": {}})
                open_tool = (event.index, len(content) - 1)
                tool_args[open_tool[1]] = []
            block = content[open_tool[1]]
            block["id"] = block["id"] or event.id or ""
            block["name"] = block["name"] or event.name or ""
            tool_args[open_tool[1]].append(event.arguments)
        elif isinstance(event, Finish):
            finish = event
        elif isinstance(event, Usage):
            usage = event
    for position, pieces in tool_args.items():
        block = content[position]
        block["id"] = tool_id(block["id"] or None)
        block["input"] = _tool_input("".join(pieces))
    return {
        "id": message_id(ident),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": wire.stop_reason(finish.reason, finish.native) if finish else "end_turn",
        "stop_sequence": finish.stop_sequence if finish else None,
        "usage": wire.anthropic_usage(usage),
    }


def _tool_input(arguments: str) -> dict[str, Any]:
    """A tool call's ``input`` from its JSON text; a backend whose arguments are not an object is broken."""
    if not arguments.strip():
        return {}
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        raise MalformedEvent(f"tool call arguments are not JSON: {arguments[:200]!r}") from None
    if not isinstance(value, dict):
        raise MalformedEvent(f"tool call arguments are not a JSON object: {arguments[:200]!r}")
    return value


if TYPE_CHECKING:  # mypy checks that the class keeps the seam's interface
    _FRONTEND: Frontend = AnthropicFrontend()
