"""OpenAI chat messages, tools and options lowered into the seam's canonical shapes (on first need only).

:class:`~skyfabric.protocols.frontends.openai.OpenAIFrontend` leaves this work pending
(:meth:`CanonicalRequest.lower`): a request that passes through to an OpenAI-compatible backend never
needs it. It runs when a backend of another protocol builds its own body.

Decisions where OpenAI and the seam differ:

* Leading ``system`` / ``developer`` messages become the top-level ``system`` text blocks; later ones stay
  in place as ``Message(role="system")``.
* Empty text is dropped (``""`` content, empty text parts): Anthropic refuses empty text blocks and they
  carry nothing.
* ``image_url`` parts become image blocks with a ``base64`` source for ``data:`` URLs, else a ``url``
  source (``detail`` has no counterpart and is dropped); ``input_audio`` and ``file`` parts are kept as they
  are, as blocks of their own type, for backends that take them.
* A tool call's ``arguments`` that are not a JSON object are kept as ``{"_raw": "<the text>"}``: the
  conversation goes on (the model sent it, the client echoes it), and the OpenAI backend turns that shape
  back into the very same text, so nothing is lost either way.
* ``reasoning_content`` (or ``reasoning``) on an assistant turn becomes a ``thinking`` block (no
  signature: OpenAI-compatible servers have none) ahead of its text.
* A tool message becomes ``Message(role="tool")`` holding one ``tool_result`` block whose content is text
  blocks.
* Tools of a type other than ``function`` have no canonical form and stay in ``extras["tools"]``.
"""

from __future__ import annotations

from typing import Any

import orjson

from skyfabric.protocols.canonical import Block, CanonicalRequest, Message, Thinking, Tool, ToolChoice

#: Request fields the canonical request has a slot for (the rest go to ``extras``).
KNOWN_FIELDS = frozenset(
    {
        "model",
        "messages",
        "prompt",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "n",
        "stop",
        "seed",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "reasoning_effort",
        "user",
        "logprobs",
        "top_logprobs",
    }
)

_SYSTEM_ROLES = ("system", "developer")


def _empty_schema() -> dict[str, Any]:
    return {"type": "object", "properties": {}}


def lower_chat(request: CanonicalRequest) -> None:
    """Fill ``system``, ``messages``, ``tools``, ``tool_choice``, ``thinking``, ``metadata``, ``extras``."""
    body = request.body
    messages = body.get("messages")
    if isinstance(messages, list):
        leading = True
        for message in messages:
            if not isinstance(message, dict):
                continue
            role = message.get("role")
            if leading and role in _SYSTEM_ROLES:
                request.system.extend(_text_blocks(message.get("content")))
                continue
            leading = False
            request.messages.append(_message(message))
    _lower_tools(request, body)
    effort = body.get("reasoning_effort")
    if isinstance(effort, str):
        request.thinking = Thinking(enabled=effort != "none", effort=effort)
    _lower_common(request, body)


def lower_completions(request: CanonicalRequest) -> None:
    """Fill ``metadata`` and ``extras`` (a completions request has no messages to lower)."""
    _lower_common(request, request.body)


def _lower_common(request: CanonicalRequest, body: dict[str, Any]) -> None:
    user = body.get("user")
    if isinstance(user, str):
        request.metadata["user_id"] = user
    for key, value in body.items():
        if key not in KNOWN_FIELDS:
            request.extras[key] = value


def _message(message: dict[str, Any]) -> Message:
    role = message.get("role")
    content = message.get("content")
    if role in _SYSTEM_ROLES:
        return Message("system", _text_blocks(content))
    if role == "assistant":
        return Message("assistant", _assistant_blocks(message))
    if role in ("tool", "function"):
        call_id = message.get("tool_call_id") or message.get("name") or ""
        result: Block = {"type": "tool_result", "tool_use_id": call_id, "content": _text_blocks(content)}
        return Message("tool", [result])
    return Message(str(role), _user_blocks(content))


def _text_blocks(content: Any) -> list[Block]:
    """Text content (a string, or parts of which only text counts) as text blocks."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[Block] = []
    if isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                text = part.get("text")
                if isinstance(text, str) and text:
                    blocks.append({"type": "text", "text": text})
    return blocks


def _user_blocks(content: Any) -> list[Block]:
    if not isinstance(content, list):
        return _text_blocks(content)
    blocks: list[Block] = []
    for part in content:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "text":
            blocks.extend(_text_blocks([part]))
        elif kind == "image_url":
            image = _image(part.get("image_url"))
            if image is not None:
                blocks.append(image)
        elif kind in ("input_audio", "file"):
            blocks.append(dict(part))
    return blocks


def _image(spec: Any) -> Block | None:
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str) or not url:
        return None
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        media_type = header[5:].split(";", 1)[0] or "image/png"
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _assistant_blocks(message: dict[str, Any]) -> list[Block]:
    blocks: list[Block] = []
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        blocks.append({"type": "thinking", "thinking": reasoning})
    blocks.extend(_text_blocks(message.get("content")))
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        for call in calls:
            if isinstance(call, dict):
                blocks.append(_tool_use(call.get("id"), call.get("function")))
    legacy = message.get("function_call")
    if isinstance(legacy, dict):
        blocks.append(_tool_use(None, legacy))
    return blocks


def _tool_use(call_id: Any, function: Any) -> Block:
    function = function if isinstance(function, dict) else {}
    return {
        "type": "tool_use",
        "id": call_id if isinstance(call_id, str) else "",
        "name": str(function.get("name") or ""),
        "input": parse_arguments(function.get("arguments")),
    }


def parse_arguments(arguments: Any) -> dict[str, Any]:
    """A tool call's arguments as an object; text that is not a JSON object is kept as ``{"_raw": text}``."""
    if isinstance(arguments, dict):
        return arguments
    if not isinstance(arguments, str):
        return {}
    if not arguments.strip():
        return {}
    try:
        parsed = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return {"_raw": arguments}
    return parsed if isinstance(parsed, dict) else {"_raw": arguments}


def _lower_tools(request: CanonicalRequest, body: dict[str, Any]) -> None:
    tools = body.get("tools")
    others: list[Any] = []
    if isinstance(tools, list):
        for tool in tools:
            function = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(function, dict) or tool.get("type", "function") != "function":
                others.append(tool)
                continue
            parameters = function.get("parameters")
            request.tools.append(
                Tool(
                    name=str(function.get("name") or ""),
                    description=function.get("description"),
                    parameters=parameters if isinstance(parameters, dict) else _empty_schema(),
                    extra={"strict": function["strict"]} if "strict" in function else {},
                )
            )
    if others:
        request.extras["tools"] = others
    choice = body.get("tool_choice")
    if choice == "none":
        request.tool_choice = ToolChoice("none")
    elif choice == "auto":
        request.tool_choice = ToolChoice("auto")
    elif choice == "required":
        request.tool_choice = ToolChoice("any")
    elif isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str):
            request.tool_choice = ToolChoice("tool", name=name)
    if body.get("parallel_tool_calls") is False:
        if request.tool_choice is None:
            request.tool_choice = ToolChoice("auto")
        request.tool_choice.disable_parallel = True
