"""Canonical requests as Bedrock Converse bodies (``/converse``, ``/converse-stream``).

Converse is one JSON shape for every Bedrock model: ``messages`` of content blocks (``text``, ``image``,
``document``, ``toolUse``, ``toolResult``, ``reasoningContent``, ``cachePoint``), ``system`` blocks,
``inferenceConfig`` (``maxTokens``, ``temperature``, ``topP``, ``stopSequences``), ``toolConfig`` and
``additionalModelRequestFields`` for what a model takes beyond those (Claude: ``top_k``, ``thinking``,
``anthropic_beta``). Every client's request is translated; each rule says why where it is applied.

**A final assistant message is continued** for Claude models: Bedrock hands Claude the conversation as
Anthropic's Messages, so a trailing assistant turn is a prefill, with the Messages API's rules (Claude 4.6
and later refuse it: "This model does not support assistant message prefill"; a trailing whitespace is
refused). Other model families are not relied on to continue one: their prompt templates differ, and the
adapter replays there (see :meth:`~skyfabric.protocols.backends.bedrock.BedrockBackend.capabilities`).
"""

from __future__ import annotations

import base64
from typing import Any

from skyfabric.core.errors import InvalidRequest
from skyfabric.protocols.canonical import Block, CanonicalRequest, Message, Thinking

#: Image media types Converse takes, as its ``format`` words.
_IMAGE_FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/gif": "gif", "image/webp": "webp"}
#: Document media types Converse takes, as its ``format`` words.
_DOCUMENT_FORMATS = {
    "application/pdf": "pdf",
    "text/plain": "txt",
    "text/csv": "csv",
    "text/html": "html",
    "text/markdown": "md",
}
_EFFORT_BUDGETS = {"minimal": 1024, "low": 1024, "medium": 4096, "high": 16384, "xhigh": 32768, "max": 32768}
_CACHE_POINT = {"cachePoint": {"type": "default"}}


def is_anthropic(model: str) -> bool:
    """Whether a Bedrock model id names a Claude model (``anthropic.claude-...``, ``us.anthropic...``)."""
    lowered = model.lower()
    return "anthropic." in lowered or "claude" in lowered


def converse_body(
    request: CanonicalRequest, model: str, max_tokens: int, prefill: str | None = None
) -> dict[str, Any]:
    """The Converse body for ``request`` sent to ``model`` (the foundation model id: it says the family).

    ``prefill``: text to put in a final assistant turn (a continuation), whitespace already trimmed.
    """
    claude = is_anthropic(model)
    body: dict[str, Any] = {"messages": _messages(request.messages, prefill)}
    system = _system(request.system)
    if system:
        body["system"] = system
    additional: dict[str, Any] = {}
    thinking = _thinking(request.thinking, max_tokens) if claude else None
    config: dict[str, Any] = {"maxTokens": max_tokens}
    # Claude refuses sampling parameters with thinking on; other protocols' ranges are wider (OpenAI's
    # temperature goes to 2): clamped to what every Bedrock model takes.
    sampling = thinking is None or thinking.get("type") == "disabled"
    if request.temperature is not None and sampling:
        config["temperature"] = min(max(request.temperature, 0.0), 1.0)
    if request.top_p is not None and sampling:
        config["topP"] = request.top_p
    if request.stop:
        config["stopSequences"] = request.stop
    body["inferenceConfig"] = config
    if request.top_k is not None and sampling and claude:
        additional["top_k"] = request.top_k
    if thinking is not None:
        additional["thinking"] = thinking
    if request.betas and claude:
        additional["anthropic_beta"] = request.betas
    tools = _tool_config(request)
    if tools is not None:
        body["toolConfig"] = tools
    if additional:
        body["additionalModelRequestFields"] = additional
    return body


def _thinking(thinking: Thinking | None, max_tokens: int) -> dict[str, Any] | None:
    """Claude's ``thinking`` (through ``additionalModelRequestFields``): a budget below ``maxTokens``."""
    if thinking is None:
        return None
    if not thinking.enabled:
        return {"type": "disabled"}
    budget = thinking.budget_tokens
    if budget is None:
        budget = _EFFORT_BUDGETS.get(thinking.effort or "medium", 4096)
    budget = min(budget, max_tokens - 1)
    return {"type": "enabled", "budget_tokens": budget} if budget >= 1024 else None


def thinking_budget(thinking: Thinking | None) -> int:
    """The thinking budget asked for (0 without thinking): ``maxTokens`` must leave the answer room."""
    if thinking is None or not thinking.enabled:
        return 0
    if thinking.budget_tokens is not None:
        return thinking.budget_tokens
    return _EFFORT_BUDGETS.get(thinking.effort or "medium", 4096)


def _tool_config(request: CanonicalRequest) -> dict[str, Any] | None:
    """``toolConfig``; Converse has no ``none`` choice: then the tools are offered with no choice forced
    (they must be declared whenever the conversation holds toolUse or toolResult blocks)."""
    if not request.tools:
        return None
    tools: list[dict[str, Any]] = []
    for tool in request.tools:
        spec: dict[str, Any] = {"name": tool.name}
        if tool.description:
            spec["description"] = tool.description
        spec["inputSchema"] = {"json": tool.parameters}
        tools.append({"toolSpec": spec})
        if isinstance(tool.extra.get("cache_control"), dict):
            tools.append(dict(_CACHE_POINT))
    config: dict[str, Any] = {"tools": tools}
    choice = request.tool_choice
    if choice is not None and choice.type in ("auto", "any"):
        config["toolChoice"] = {choice.type: {}}
    elif choice is not None and choice.type == "tool" and choice.name:
        config["toolChoice"] = {"tool": {"name": choice.name}}
    return config


def _system(system: list[Block]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for block in system:
        text = block.get("text")
        if block.get("type") == "text" and isinstance(text, str) and text:
            out.append({"text": text})
            if isinstance(block.get("cache_control"), dict):
                out.append(dict(_CACHE_POINT))
    return out


def _messages(messages: list[Message], prefill: str | None) -> list[dict[str, Any]]:
    """Converse turns: strictly alternating ``user`` / ``assistant``, no empty text blocks.

    - ``tool`` turns are the user's side (their ``toolResult`` blocks); a mid-conversation ``system`` turn
      becomes a ``<system-reminder>`` text in a user turn (Converse has no such turn);
    - consecutive turns of one role merge, tool results first (Converse requires alternation, and the
      results of one assistant turn in the next user turn);
    - a final assistant turn loses its trailing whitespace (Claude refuses it), and ``prefill`` is
      appended to it (or becomes it).
    """
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message.role
        if role == "system":
            text = "\n".join(b.get("text", "") for b in message.content if b.get("type") == "text")
            role, blocks = "user", [{"text": f"<system-reminder>\n{text}\n</system-reminder>"}]
        else:
            if role not in ("user", "assistant"):
                role = "user"
            blocks = [c for b in message.content for c in _block(b)]
        if not blocks:
            continue
        if out and out[-1]["role"] == role:
            merged = out[-1]["content"] + blocks
            if role == "user":
                merged.sort(key=lambda b: 0 if "toolResult" in b else 1)  # stable: results lead
            out[-1]["content"] = merged
        else:
            out.append({"role": role, "content": blocks})
    if out and out[-1]["role"] == "assistant":
        content = out[-1]["content"]
        if content and "text" in content[-1]:
            content[-1] = {"text": content[-1]["text"].rstrip()}
            if not content[-1]["text"]:
                content.pop()
        if not content:
            out.pop()
    if prefill:
        if out and out[-1]["role"] == "assistant":
            content = out[-1]["content"]
            if content and "text" in content[-1]:
                content[-1] = {"text": content[-1]["text"] + prefill}
            else:
                content.append({"text": prefill})
        else:
            out.append({"role": "assistant", "content": [{"text": prefill}]})
    return out


def _block(block: Block) -> list[dict[str, Any]]:
    """One canonical block as Converse blocks (a ``cache_control`` mark becomes a ``cachePoint`` after it)."""
    kind = block.get("type")
    out: list[dict[str, Any]] = []
    if kind == "text":
        if block.get("text"):
            out.append({"text": block["text"]})
    elif kind == "image":
        out.append({"image": _image(block)})
    elif kind == "document":
        out.append({"document": _document(block)})
    elif kind == "tool_use":
        given = block.get("input")
        out.append(
            {
                "toolUse": {
                    "toolUseId": str(block.get("id") or ""),
                    "name": str(block.get("name") or ""),
                    "input": given if isinstance(given, dict) else {},
                }
            }
        )
    elif kind == "tool_result":
        result: dict[str, Any] = {
            "toolUseId": str(block.get("tool_use_id") or ""),
            "content": _result_content(block.get("content")),
        }
        if block.get("is_error"):
            result["status"] = "error"
        out.append({"toolResult": result})
    elif kind == "thinking":
        # Only a signed thinking block may go back to Claude; an unsigned one (another vendor's) is dropped.
        if block.get("signature"):
            text = {"text": str(block.get("thinking") or ""), "signature": str(block["signature"])}
            out.append({"reasoningContent": {"reasoningText": text}})
    elif kind == "redacted_thinking":
        out.append({"reasoningContent": {"redactedContent": str(block.get("data") or "")}})
    if out and isinstance(block.get("cache_control"), dict):
        out.append(dict(_CACHE_POINT))
    return out


def _result_content(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"text": content}] if content else []
    out: list[dict[str, Any]] = []
    for part in content if isinstance(content, list) else []:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text" and part.get("text"):
            out.append({"text": part["text"]})
        elif part.get("type") == "image":
            out.append({"image": _image(part)})
        elif part.get("type") == "document":
            out.append({"document": _document(part)})
    return out


def _image(block: Block) -> dict[str, Any]:
    source = block.get("source")
    if not isinstance(source, dict) or source.get("type") != "base64":
        # Converse takes image bytes (or an S3 object), not a URL the service would have to fetch.
        raise InvalidRequest("Bedrock takes images as base64 data, not URLs", param="messages")
    media = str(source.get("media_type") or "")
    if media not in _IMAGE_FORMATS:
        raise InvalidRequest(f"Bedrock does not take images of type {media!r}", param="messages")
    return {"format": _IMAGE_FORMATS[media], "source": {"bytes": str(source.get("data") or "")}}


def _document(block: Block) -> dict[str, Any]:
    source = block.get("source")
    name = str(block.get("title") or "document")
    if isinstance(source, dict) and source.get("type") == "text":
        data = base64.b64encode(str(source.get("data") or "").encode()).decode()
        return {"format": "txt", "name": name, "source": {"bytes": data}}
    media = str(source.get("media_type") or "") if isinstance(source, dict) else ""
    if not isinstance(source, dict) or source.get("type") != "base64" or media not in _DOCUMENT_FORMATS:
        raise InvalidRequest("Bedrock takes documents as base64 PDF or text data", param="messages")
    return {
        "format": _DOCUMENT_FORMATS[media],
        "name": name,
        "source": {"bytes": str(source.get("data") or "")},
    }
