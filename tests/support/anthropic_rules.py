"""What Anthropic's Messages API refuses, with its statuses and wording, for the stand-in.

Why so strict: the gateway's Anthropic backend adapter is only proven if a backend refuses what the real one
refuses — an OpenAI field leaking into the body (``n: Extra inputs are not permitted``), a prefill ending in
whitespace, a thinking block whose signature was mangled, a ``tool_result`` whose id matches no ``tool_use``.
Wording follows errors the real API returns (quoted in public bug reports); where the stand-in had to invent
one, the message starts with what the field is, in the API's ``path: problem`` style.

:func:`parse` turns a body into a :class:`Conversation` or raises :class:`ApiError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tests.support.anthropic_answer import DEFAULT_SECRET, count_tokens, digest, verify_thinking

#: Top-level fields of ``POST /v1/messages`` (anthropic SDK 2.15's MessageCreateParams, less the ones the SDK
#: sends as headers, plus the sampling knobs the public reference has always listed).
MESSAGE_FIELDS = frozenset(
    {
        "model", "messages", "max_tokens", "system", "stop_sequences", "stream", "metadata", "tools",
        "tool_choice", "thinking", "temperature", "top_p", "top_k", "service_tier", "container",
        "output_config", "cache_control", "inference_geo", "speed", "diagnostics",
    }
)  # fmt: skip
#: Fields accepted only with an ``anthropic-beta`` header (the beta Messages API).
BETA_FIELDS = frozenset(
    {
        "context_management", "mcp_servers", "compaction", "billing_policy", "fallbacks",
        "fallback_credit_token", "thread",
    }
)  # fmt: skip
#: Top-level fields of ``POST /v1/messages/count_tokens`` (no max_tokens, stream, stop_sequences, metadata).
COUNT_FIELDS = frozenset(
    {
        "model",
        "messages",
        "system",
        "tools",
        "tool_choice",
        "thinking",
        "output_config",
        "cache_control",
        "speed",
    }
)

#: Keys each content block may carry (others are refused: ``messages.1.content.0.text.x: Extra inputs ...``).
BLOCK_KEYS: dict[str, frozenset[str]] = {
    "text": frozenset({"type", "text", "cache_control", "citations"}),
    "image": frozenset({"type", "source", "cache_control", "transformations"}),
    "document": frozenset({"type", "source", "cache_control", "citations", "context", "title"}),
    "tool_use": frozenset({"type", "id", "name", "input", "cache_control", "caller", "toolset_name"}),
    "tool_result": frozenset({"type", "tool_use_id", "content", "is_error", "cache_control", "toolset_name"}),
    "thinking": frozenset({"type", "thinking", "signature"}),
    "redacted_thinking": frozenset({"type", "data"}),
    "search_result": frozenset({"type", "source", "title", "content", "cache_control", "citations"}),
}
#: Block types accepted without a key check (server tools' blocks and the like).
OTHER_BLOCKS = frozenset(
    {
        "server_tool_use", "web_search_tool_result", "web_fetch_tool_result", "code_execution_tool_result",
        "bash_code_execution_tool_result", "text_editor_code_execution_tool_result", "mcp_tool_use",
        "mcp_tool_result", "container_upload", "tool_reference", "compaction",
    }
)  # fmt: skip
TOOL_KEYS = frozenset(
    {
        "name", "description", "input_schema", "cache_control", "type", "strict", "input_examples",
        "defer_loading", "allowed_callers", "eager_input_streaming",
    }
)  # fmt: skip
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
#: API versions the stand-in knows (2026-10-21 is what anthropic SDK 2.15 sends).
VERSIONS = frozenset({"2023-01-01", "2023-06-01", "2026-10-21"})

THINKING_PREFILL = (
    "Expected `thinking` or `redacted_thinking`, but found `text`. When `thinking` is enabled, a final "
    "`assistant` message must start with a thinking block (preceeding the lastmost set of `tool_use` and "
    "`tool_result` blocks). We recommend you include thinking blocks from previous turns. To avoid this "
    "requirement, disable `thinking`. Please consult our documentation at "
    "https://docs.claude.com/en/docs/build-with-claude/extended-thinking"
)


class ApiError(Exception):
    """An error the API answers with: HTTP ``status``, Anthropic's error ``type`` and its message."""

    def __init__(self, status: int, kind: str, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.retry_after = retry_after


def invalid(message: str) -> ApiError:
    return ApiError(400, "invalid_request_error", message)


@dataclass
class Conversation:
    """A request the API accepted, normalized to what the model sees."""

    model: str
    max_tokens: int
    system: str
    #: Turns as (role, blocks) with consecutive same-role turns merged, as the API does; without a final
    #: assistant turn (that is ``prefill``).
    turns: list[tuple[str, list[dict[str, Any]]]]
    prefill: str | None
    tools: list[dict[str, Any]]
    tool_choice: dict[str, Any]
    thinking: dict[str, Any] | None
    stop_sequences: list[str]
    stream: bool
    #: Token counts of the prompt: uncached, and (when ``cache_control`` marks a prefix) the cached prefix.
    prompt_tokens: int = 0
    cache_prefix: tuple[str, int] | None = None

    @property
    def last_user(self) -> list[dict[str, Any]]:
        return self.turns[-1][1] if self.turns and self.turns[-1][0] == "user" else []

    @property
    def last_user_text(self) -> str:
        return " ".join(b.get("text", "") for b in self.last_user if b.get("type") == "text")

    def seed_parts(self) -> list[Any]:
        """What the answer depends on: what a model sees, less cache markers and the prefill."""
        tools = [
            {k: t.get(k) for k in ("name", "description", "input_schema")} for t in self.tools
        ]  # fmt: skip
        turns = [[role, [_strip(b) for b in blocks]] for role, blocks in self.turns]
        return [self.model, self.system, turns, tools, self.thinking]


def _strip(block: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in block.items() if k != "cache_control"}


def check_headers(headers: dict[str, str], api_key: str) -> None:
    """Authentication (``x-api-key``, or ``Authorization: Bearer`` as SDK 2.x sends it), then the version."""
    key = headers.get("x-api-key")
    bearer = headers.get("authorization", "")
    if key is None and bearer.lower().startswith("bearer "):
        key = bearer[7:].strip()
    if key is None:
        raise ApiError(401, "authentication_error", "x-api-key header is required")
    if key != api_key:
        raise ApiError(401, "authentication_error", "invalid x-api-key")
    version = headers.get("anthropic-version")
    if version is None:
        raise invalid("anthropic-version: header is required")
    if version not in VERSIONS:
        raise invalid(f"anthropic-version: invalid version {version!r}")


def parse(
    body: Any,
    *,
    headers: dict[str, str],
    models: dict[str, int],
    count_only: bool = False,
    max_output: int = 64000,
    secret: bytes = DEFAULT_SECRET,
) -> Conversation:
    """Validate a request body like the API; ``models`` maps each known model to its context window."""
    if not isinstance(body, dict):
        raise invalid("There was an error parsing the body of your request: expected a JSON object")
    allowed = COUNT_FIELDS if count_only else MESSAGE_FIELDS
    if headers.get("anthropic-beta"):
        allowed = allowed | BETA_FIELDS
    for name in body:
        if name not in allowed:
            raise invalid(f"{name}: Extra inputs are not permitted")
    for name in ("model", "messages") if count_only else ("model", "messages", "max_tokens"):
        if name not in body:
            raise invalid(f"{name}: Field required")
    model = body["model"]
    if not isinstance(model, str):
        raise invalid("model: Input should be a valid string")
    max_tokens = body.get("max_tokens", 0)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
        raise invalid("max_tokens: Input should be a valid integer")
    if max_tokens < 0:
        raise invalid("max_tokens: Input should be greater than or equal to 0")
    system = _system(body.get("system"))
    tools = _tools(body.get("tools"))
    tool_choice = _tool_choice(body.get("tool_choice"), tools)
    thinking = _thinking(body.get("thinking"), max_tokens, tool_choice, count_only)
    stops = body.get("stop_sequences", [])
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("stop_sequences: Input should be a valid list of strings")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("stream: Input should be a valid boolean")
    turns, prefill = _messages(body["messages"], thinking, secret)
    if model not in models:
        raise ApiError(404, "not_found_error", f"model: {model}")
    if not count_only and max_tokens > max_output:
        raise invalid(
            f"max_tokens: {max_tokens} > {max_output}, which is the maximum allowed number of output tokens "
            f"for {model}"
        )
    convo = Conversation(
        model, max_tokens, system, turns, prefill, tools, tool_choice, thinking, stops, stream
    )
    _count(convo, body)
    window = models[model]
    total = convo.prompt_tokens + (convo.cache_prefix[1] if convo.cache_prefix else 0)
    if total > window:
        raise invalid(f"prompt is too long: {total} tokens > {window} maximum")
    if not count_only and total + max_tokens > window:
        raise invalid(
            f"input length and `max_tokens` exceed context limit: {total} + {max_tokens} > {window}, "
            "decrease input length or `max_tokens` and try again"
        )
    return convo


def _system(system: Any) -> str:
    if system is None:
        return ""
    if isinstance(system, str):
        return system
    if not isinstance(system, list):
        raise invalid("system: Input should be a valid string or a list of text blocks")
    out = []
    for i, block in enumerate(system):
        if (
            not isinstance(block, dict)
            or block.get("type") != "text"
            or not isinstance(block.get("text"), str)
        ):
            raise invalid(f"system.{i}: Input should be a text block")
        _keys(block, BLOCK_KEYS["text"], f"system.{i}")
        out.append(block["text"])
    return "\n".join(out)


def _keys(obj: dict[str, Any], allowed: frozenset[str], where: str) -> None:
    for key in obj:
        if key not in allowed:
            raise invalid(f"{where}.{key}: Extra inputs are not permitted")


def _tools(tools: Any) -> list[dict[str, Any]]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise invalid("tools: Input should be a valid list")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise invalid(f"tools.{i}: Input should be a valid dictionary")
        kind = tool.get("type")
        if kind not in (None, "custom"):
            if isinstance(kind, str) and re.match(r"^[a-z_]+_\d{8}$", kind):
                continue  # a server tool (web_search_20250305, bash_20250124, ...)
            raise invalid(
                f"tools.{i}: Input tag '{kind}' found using 'type' does not match any of the expected tags"
            )
        _keys(tool, TOOL_KEYS, f"tools.{i}.custom")
        if "name" not in tool:
            raise invalid(f"tools.{i}.custom.name: Field required")
        if not isinstance(tool["name"], str) or not _TOOL_NAME.match(tool["name"]):
            raise invalid(f"tools.{i}.custom.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'")
        schema = tool.get("input_schema")
        if schema is None:
            raise invalid(f"tools.{i}.custom.input_schema: Field required")
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise invalid(f"tools.{i}.custom.input_schema.type: Input should be 'object'")
    names = [t["name"] for t in tools if "name" in t]
    if len(set(names)) != len(names):
        raise invalid("tools: Tool names must be unique.")
    return tools


def _tool_choice(choice: Any, tools: list[dict[str, Any]]) -> dict[str, Any]:
    if choice is None:
        return {"type": "auto"}
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
        raise invalid("tool_choice: Input tag found using 'type' does not match any of the expected tags")
    if choice["type"] == "tool":
        name = choice.get("name")
        if not isinstance(name, str):
            raise invalid("tool_choice.tool.name: Field required")
        if name not in [t.get("name") for t in tools]:
            raise invalid(f"tool_choice.name: Tool '{name}' not found in tools")
    if choice["type"] in ("any", "tool") and not tools:
        raise invalid("tool_choice: tool_choice may only be specified while providing tools.")
    return choice


def _thinking(
    thinking: Any, max_tokens: int, choice: dict[str, Any], count_only: bool
) -> dict[str, Any] | None:
    if thinking is None:
        return None
    if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "disabled", "adaptive"):
        raise invalid("thinking: Input tag found using 'type' does not match any of the expected tags")
    if thinking["type"] == "disabled":
        return None
    if thinking["type"] == "enabled":
        budget = thinking.get("budget_tokens")
        if not isinstance(budget, int) or isinstance(budget, bool):
            raise invalid("thinking.enabled.budget_tokens: Field required")
        if budget < 1024:
            raise invalid("thinking.enabled.budget_tokens: Input should be greater than or equal to 1024")
        if not count_only and max_tokens <= budget:
            raise invalid("`max_tokens` must be greater than `thinking.budget_tokens`")
    if choice["type"] in ("any", "tool"):
        raise invalid("Thinking may not be enabled when tool_choice forces tool use.")
    return {k: thinking[k] for k in ("type", "budget_tokens") if k in thinking}


def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise invalid(f"{where}.content: Input should be a valid string or a list of content blocks")
    for j, block in enumerate(content):
        here = f"{where}.content.{j}"
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise invalid(f"{here}: Input should be a valid dictionary with a `type`")
        kind = block["type"]
        if kind in BLOCK_KEYS:
            _keys(block, BLOCK_KEYS[kind], f"{here}.{kind}")
        elif kind not in OTHER_BLOCKS:
            raise invalid(
                f"{here}: Input tag '{kind}' found using 'type' does not match any of the expected tags"
            )
        if kind == "text":
            if not isinstance(block.get("text"), str):
                raise invalid(f"{here}.text.text: Field required")
            if not block["text"]:
                raise invalid("messages: text content blocks must be non-empty")
        if kind == "tool_use":
            for key in ("id", "name", "input"):
                if key not in block:
                    raise invalid(f"{here}.tool_use.{key}: Field required")
            if not isinstance(block["input"], dict):
                raise invalid(f"{here}.tool_use.input: Input should be a valid dictionary")
        if kind == "tool_result" and not isinstance(block.get("tool_use_id"), str):
            raise invalid(f"{here}.tool_result.tool_use_id: Field required")
        if kind == "thinking" and not (
            isinstance(block.get("thinking"), str) and isinstance(block.get("signature"), str)
        ):
            raise invalid(f"{here}.thinking.signature: Field required")
    return content


def _messages(
    messages: Any, thinking: dict[str, Any] | None, secret: bytes
) -> tuple[list[tuple[str, list[dict[str, Any]]]], str | None]:
    if not isinstance(messages, list):
        raise invalid("messages: Input should be a valid list")
    if not messages:
        raise invalid("messages: at least one message is required")
    turns: list[tuple[str, list[dict[str, Any]]]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid(f"messages.{i}: Input should be a valid dictionary")
        _keys(message, frozenset({"role", "content"}), f"messages.{i}")
        role = message.get("role")
        if role not in (
            "user",
            "assistant",
            "system",
        ):  # system turns mid-conversation: SDK 2.15's MessageParam
            raise invalid(f"messages.{i}.role: Input should be 'user', 'assistant' or 'system'")
        if "content" not in message:
            raise invalid(f"messages.{i}.content: Field required")
        blocks = _blocks(message["content"], f"messages.{i}")
        if role == "system" and any(b["type"] != "text" for b in blocks):
            raise invalid(f"messages.{i}.content: a system message holds text blocks only")
        if not blocks and i != len(messages) - 1:
            raise invalid(
                f"messages.{i}: all messages must have non-empty content except for the optional final "
                "assistant message"
            )
        for j, block in enumerate(blocks):
            if block["type"] == "thinking" and not verify_thinking(
                block["thinking"], block["signature"], secret
            ):
                raise invalid(f"messages.{i}.content.{j}: Invalid `signature` in `thinking` block")
        if turns and turns[-1][0] == role:
            turns[-1] = (role, turns[-1][1] + blocks)  # consecutive turns are combined into one
        else:
            turns.append((role, list(blocks)))
    if next((role for role, _ in turns if role != "system"), "user") != "user":
        raise invalid('messages: first message must use the "user" role')
    _tool_pairs(turns)
    prefill = None
    if turns[-1][0] == "assistant":
        final = turns.pop()[1]
        where = f"messages.{len(messages) - 1}"
        if thinking is not None and final:
            if final[0]["type"] not in ("thinking", "redacted_thinking"):
                raise invalid(f"{where}.content.0.type: {THINKING_PREFILL}")
            raise invalid(
                f"{where}: prefilling an assistant turn is not supported while `thinking` is enabled"
            )
        if thinking is None and any(b["type"] in ("thinking", "redacted_thinking") for b in final):
            raise invalid(
                f"{where}.content.0: When thinking is disabled, an `assistant` message in the final position "
                "cannot contain `thinking`. To use thinking blocks, enable `thinking` in your request."
            )
        prefill = "".join(b["text"] for b in final if b["type"] == "text")
        if prefill != prefill.rstrip():
            raise invalid("messages: final assistant content cannot end with trailing whitespace")
    return turns, prefill


def _tool_pairs(turns: list[tuple[str, list[dict[str, Any]]]]) -> None:
    """Every tool_use is answered by a tool_result in the next turn, and every tool_result answers one."""
    for n, (role, blocks) in enumerate(turns):
        if role == "assistant":
            ids = [b["id"] for b in blocks if b["type"] == "tool_use"]
            if ids and n + 1 < len(turns):
                answered = {b["tool_use_id"] for b in turns[n + 1][1] if b["type"] == "tool_result"}
                missing = [x for x in ids if x not in answered]
                if missing:
                    raise invalid(
                        f"messages.{n}: `tool_use` ids were found without `tool_result` blocks immediately "
                        f"after: {', '.join(missing)}. Each `tool_use` block must have a corresponding "
                        "`tool_result` block in the next message."
                    )
        else:
            results = [b["tool_use_id"] for b in blocks if b["type"] == "tool_result"]
            asked = {b["id"] for b in turns[n - 1][1] if b["type"] == "tool_use"} if n else set()
            stray = [x for x in results if x not in asked]
            if stray:
                raise invalid(
                    f"messages.{n}.content.0: unexpected `tool_use_id` found in `tool_result` blocks: "
                    f"{', '.join(stray)}. Each `tool_result` block must have a corresponding `tool_use` "
                    "block in the previous message."
                )


def _text_of(block: dict[str, Any]) -> str:
    """The text a block puts before the model (what its tokens are counted from)."""
    kind = block.get("type")
    if kind == "text":
        return str(block.get("text", ""))
    if kind == "thinking":
        return str(block.get("thinking", ""))
    if kind == "tool_use":
        return f"{block.get('name')} {block.get('input')}"
    if kind == "tool_result":
        content = block.get("content", "")
        if isinstance(content, list):
            return " ".join(_text_of(b) for b in content if isinstance(b, dict))
        return str(content)
    return f"[{kind}]"


def _count(convo: Conversation, body: dict[str, Any]) -> None:
    """Prompt tokens, split into a cached prefix (up to the last ``cache_control`` marker) and the rest.

    The prompt is read in the API's cache order — tools, system, messages — one piece per tool and block.
    """
    pieces: list[tuple[str, bool]] = []
    for tool in convo.tools:
        pieces.append(
            (
                f"{tool.get('name')} {tool.get('description', '')} {tool.get('input_schema')}",
                bool(tool.get("cache_control")),
            )
        )
    system = body.get("system")
    if isinstance(system, list):
        pieces.extend((b["text"], bool(b.get("cache_control"))) for b in system)
    elif system:
        pieces.append((system, False))
    for message in body["messages"]:
        content = message["content"]
        pieces.append((message["role"], False))
        if isinstance(content, str):
            pieces.append((content, False))
        else:
            pieces.extend((_text_of(b), bool(b.get("cache_control"))) for b in content)
    if body.get("cache_control"):  # top-level: the last cacheable block is marked
        pieces[-1] = (pieces[-1][0], True)
    marks = [i for i, (_, marked) in enumerate(pieces) if marked]
    cut = marks[-1] + 1 if marks else 0
    total = [count_tokens(text) + 1 for text, _ in pieces]  # +1: each piece's separator in the template
    if cut:
        convo.cache_prefix = (digest([t for t, _ in pieces[:cut]]).hex(), sum(total[:cut]))
    convo.prompt_tokens = sum(total[cut:])
