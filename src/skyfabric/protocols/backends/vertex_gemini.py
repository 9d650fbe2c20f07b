"""Gemini's ``generateContent`` request body, built from a canonical request.

Every client's request is translated (no client speaks Gemini's protocol to skyfabric). The rules, and why:

- Turns: ``user`` → ``user``, ``assistant`` → ``model``; ``tool`` turns (and ``tool_result`` blocks) become
  ``functionResponse`` parts of a user turn; consecutive turns of one role merge (Gemini wants alternation).
  A mid-conversation ``system`` turn becomes a ``<system-reminder>`` text in a user turn, as for Anthropic.
- Blocks: text → ``text``; a base64 image or document → ``inlineData``; an image by URL → ``fileData``;
  ``tool_use`` → ``functionCall`` with the arguments as an object; ``tool_result`` → ``functionResponse``
  named by the call it answers (Gemini matches results by function name, the canonical block by id).
  Thinking blocks are not sent back: another vendor's thinking means nothing to Gemini, and Gemini's own
  thought text is a summary it does not take back as input.
- ``system`` → ``systemInstruction``; tools → one ``tools[].functionDeclarations`` with the JSON Schema as
  ``parametersJsonSchema`` (taken whole, so no schema keyword is silently dropped); ``tool_choice`` →
  ``toolConfig.functionCallingConfig`` (``auto``→AUTO, ``none``→NONE, ``any``→ANY, a named tool → ANY with
  ``allowedFunctionNames``).
- ``generationConfig``: ``maxOutputTokens``, ``temperature``, ``topP``, ``topK``, ``stopSequences``, ``seed``;
  thinking → ``thinkingConfig`` (a budget, or an effort's budget as for Anthropic, ``includeThoughts`` so
  the thought summary streams as reasoning; disabled → budget 0).
"""

from __future__ import annotations

from typing import Any

from skyfabric.protocols.canonical import Block, CanonicalRequest, Message

#: Thinking budgets an ``effort`` level stands for (the Anthropic adapter's table).
EFFORT_BUDGETS = {"minimal": 1024, "low": 1024, "medium": 4096, "high": 16384, "xhigh": 32768, "max": 32768}
_ROLES = {"user": "user", "assistant": "model", "tool": "user", "system": "user"}
_MODES = {"auto": "AUTO", "none": "NONE", "any": "ANY", "tool": "ANY"}


def gemini_body(request: CanonicalRequest) -> dict[str, Any]:
    """The ``generateContent`` / ``streamGenerateContent`` body for ``request``."""
    body: dict[str, Any] = {"contents": contents(request.messages)}
    system = "\n\n".join(str(b.get("text") or "") for b in request.system if b.get("type") == "text")
    if system:
        body["systemInstruction"] = {"parts": [{"text": system}]}
    if request.tools:
        declarations = []
        for tool in request.tools:
            declaration: dict[str, Any] = {"name": tool.name}
            if tool.description:
                declaration["description"] = tool.description
            declaration["parametersJsonSchema"] = tool.parameters
            declarations.append(declaration)
        body["tools"] = [{"functionDeclarations": declarations}]
        choice = request.tool_choice
        if choice is not None:
            config: dict[str, Any] = {"mode": _MODES[choice.type]}
            if choice.type == "tool" and choice.name:
                config["allowedFunctionNames"] = [choice.name]
            body["toolConfig"] = {"functionCallingConfig": config}
    generation = generation_config(request)
    if generation:
        body["generationConfig"] = generation
    return body


def generation_config(request: CanonicalRequest) -> dict[str, Any]:
    """``generationConfig``: limits, sampling, stop sequences, seed and thinking."""
    config: dict[str, Any] = {}
    if request.max_tokens is not None:
        config["maxOutputTokens"] = request.max_tokens
    if request.temperature is not None:
        config["temperature"] = request.temperature
    if request.top_p is not None:
        config["topP"] = request.top_p
    if request.top_k is not None:
        config["topK"] = request.top_k
    if request.stop:
        config["stopSequences"] = list(request.stop)
    if request.seed is not None:
        config["seed"] = request.seed
    thinking = request.thinking
    if thinking is not None:
        if not thinking.enabled:
            config["thinkingConfig"] = {"thinkingBudget": 0}
        else:
            budget = thinking.budget_tokens
            if budget is None:
                budget = EFFORT_BUDGETS.get(thinking.effort or "", -1)  # -1: Gemini's dynamic budget
            config["thinkingConfig"] = {"thinkingBudget": budget, "includeThoughts": True}
    return config


def contents(messages: list[Message]) -> list[dict[str, Any]]:
    """The turns as Gemini ``contents`` (see the module's rules)."""
    names = _call_names(messages)
    out: list[dict[str, Any]] = []
    for message in messages:
        role = _ROLES.get(message.role, "user")
        if message.role == "system":
            text = "\n".join(str(b.get("text") or "") for b in message.content if b.get("type") == "text")
            parts: list[dict[str, Any]] = [{"text": f"<system-reminder>\n{text}\n</system-reminder>"}]
        else:
            parts = [p for block in message.content for p in _parts(block, names)]
        if not parts:
            continue
        if out and out[-1]["role"] == role:
            previous: list[dict[str, Any]] = out[-1]["parts"]
            if role == "user" and any("functionResponse" in p for p in parts):
                # Results answer the model turn before: they lead the merged user turn.
                responses = [p for p in previous if "functionResponse" in p]
                others = [p for p in previous if "functionResponse" not in p]
                new_responses = [p for p in parts if "functionResponse" in p]
                new_others = [p for p in parts if "functionResponse" not in p]
                out[-1]["parts"] = responses + new_responses + others + new_others
            else:
                out[-1]["parts"] = previous + parts
        else:
            out.append({"role": role, "parts": parts})
    return out


def _call_names(messages: list[Message]) -> dict[str, str]:
    """Tool call id → function name, from the assistant turns (a result names only the call's id)."""
    names: dict[str, str] = {}
    for message in messages:
        for block in message.content:
            if block.get("type") == "tool_use" and block.get("id"):
                names[str(block["id"])] = str(block.get("name") or "")
    return names


def _parts(block: Block, names: dict[str, str]) -> list[dict[str, Any]]:
    kind = block.get("type")
    if kind == "text":
        text = block.get("text")
        return [{"text": text}] if isinstance(text, str) and text else []
    if kind in ("image", "document"):
        return _media(block)
    if kind == "tool_use":
        given = block.get("input")
        return [
            {
                "functionCall": {
                    "name": str(block.get("name") or ""),
                    "args": given if isinstance(given, dict) else {},
                }
            }
        ]
    if kind == "tool_result":
        call = str(block.get("tool_use_id") or "")
        result = _result_text(block.get("content"))
        key = "error" if block.get("is_error") else "content"
        return [{"functionResponse": {"name": names.get(call, call), "response": {key: result}}}]
    return []  # thinking, redacted thinking, server tools' blocks: nothing Gemini takes


def _media(block: Block) -> list[dict[str, Any]]:
    source = block.get("source")
    if not isinstance(source, dict):
        return []
    default_type = "application/pdf" if block.get("type") == "document" else "image/jpeg"
    if source.get("type") == "base64":
        return [
            {
                "inlineData": {
                    "mimeType": str(source.get("media_type") or default_type),
                    "data": str(source.get("data") or ""),
                }
            }
        ]
    if source.get("type") == "url":
        url = str(source.get("url") or "")
        return [{"fileData": {"mimeType": _mime_of(url, default_type), "fileUri": url}}]
    if source.get("type") == "text":
        return [{"text": str(source.get("data") or "")}]
    return []


def _mime_of(url: str, default: str) -> str:
    path = url.split("?", 1)[0].lower()
    for suffix, mime in (
        (".png", "image/png"),
        (".jpg", "image/jpeg"),
        (".jpeg", "image/jpeg"),
        (".webp", "image/webp"),
        (".gif", "image/gif"),
        (".pdf", "application/pdf"),
    ):
        if path.endswith(suffix):
            return mime
    return default


def _result_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(b.get("text") or "") for b in content if isinstance(b, dict) and b.get("type") == "text"
        )
    return ""
