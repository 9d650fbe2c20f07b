"""A canonical request (from a client of another protocol) as an OpenAI chat completions body.

Only used when the client did not speak OpenAI: an OpenAI client's own body is forwarded as it came.
Decisions where the seam and OpenAI differ:

* ``system`` text blocks become one leading system message (a string for one block, text parts for more:
  the blocks' boundaries are kept); a system turn mid-conversation stays a system message in place.
* ``tool_result`` blocks become ``tool`` messages, ahead of the rest of their user turn (Anthropic puts
  them first in the turn that answers the calls); their content is flattened to text.
* ``thinking`` and ``redacted_thinking`` blocks of earlier turns are dropped: OpenAI's API refuses them,
  and the chat templates of open reasoning models drop past reasoning anyway.
* A ``tool_use`` input of the shape ``{"_raw": text}`` (arguments that were not a JSON object, see
  ``frontends/openai_lower.py``) is sent back as that very text.
* Images become ``image_url`` parts (a ``data:`` URL for base64); a ``document`` becomes a text part when
  it is text, a ``file`` part for base64 data (OpenAI's PDFs), and is dropped otherwise; ``input_audio``
  and ``file`` blocks pass as they are; other block kinds have no OpenAI form and are dropped.
* Thinking asked for: OpenAI itself takes ``reasoning_effort`` (from ``effort``, or from the budget:
  ≤ 2,048 tokens ``low``, ≤ 8,192 ``medium``, else ``high``); vLLM, SGLang and llama.cpp take
  ``chat_template_kwargs.enable_thinking`` (the switch of Qwen3-style templates); other engines get nothing.
* ``top_k`` is sent only to engines that take it (vLLM family, SGLang, llama.cpp, skyfabric's replica);
  OpenAI's API uses ``max_completion_tokens``, the others ``max_tokens``.
* Fields of the client's protocol the seam has no slot for (``extras``), its betas and its version are
  dropped: an OpenAI-compatible server does not know them and some refuse unknown fields.
"""

from __future__ import annotations

from typing import Any

import orjson

from skyfabric.protocols.canonical import Block, CanonicalRequest, Message

#: Engines that take vLLM's sampling extras (``top_k``).
TOP_K_ENGINES = frozenset({"local", "vllm", "vllm-tpu", "vllm-neuron", "sglang", "llama-cpp"})
#: Engines whose chat templates take ``chat_template_kwargs`` (``enable_thinking``).
#: (skyfabric's own replica too: it thinks for its own budget, bounded by ``max_tokens``.)
TEMPLATE_KWARGS_ENGINES = frozenset({"local", "vllm", "vllm-tpu", "vllm-neuron", "sglang", "llama-cpp"})


def chat_body(request: CanonicalRequest, model: str, engine: str) -> dict[str, Any]:
    """The chat completions body for ``request`` on an ``engine`` endpoint serving ``model``."""
    request.lower()
    messages: list[dict[str, Any]] = []
    if request.system:
        messages.append({"role": "system", "content": _text_content(request.system)})
    for message in request.messages:
        messages.extend(_messages(message))
    body: dict[str, Any] = {"model": model, "messages": messages}
    if request.max_tokens is not None:
        body["max_completion_tokens" if engine == "openai" else "max_tokens"] = request.max_tokens
    for key, value in (
        ("temperature", request.temperature),
        ("top_p", request.top_p),
        ("seed", request.seed),
    ):
        if value is not None:
            body[key] = value
    if request.top_k is not None and engine in TOP_K_ENGINES:
        body["top_k"] = request.top_k
    if request.stop:
        body["stop"] = list(request.stop)
    if request.n > 1:
        body["n"] = request.n
    if request.logprobs:
        body["logprobs"] = True
        if request.top_logprobs is not None:
            body["top_logprobs"] = request.top_logprobs
    if request.tools:
        body["tools"] = [
            _tool(tool.name, tool.description, tool.parameters, tool.extra) for tool in request.tools
        ]
        choice = request.tool_choice
        if choice is not None:
            body["tool_choice"] = _tool_choice(choice.type, choice.name)
            if choice.disable_parallel:
                body["parallel_tool_calls"] = False
    thinking = request.thinking
    if thinking is not None:
        if engine == "openai":
            if thinking.enabled:
                body["reasoning_effort"] = thinking.effort or _effort(thinking.budget_tokens)
        elif engine in TEMPLATE_KWARGS_ENGINES:
            body["chat_template_kwargs"] = {"enable_thinking": thinking.enabled}
    user = request.metadata.get("user_id")
    if isinstance(user, str):
        body["user"] = user
    body["stream"] = request.stream
    return body


def _effort(budget: int | None) -> str:
    if budget is None:
        return "medium"
    return "low" if budget <= 2048 else "medium" if budget <= 8192 else "high"


def _tool(
    name: str, description: str | None, parameters: dict[str, Any], extra: dict[str, Any]
) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name, "parameters": parameters}
    if description:
        function["description"] = description
    if isinstance(extra.get("strict"), bool):
        function["strict"] = extra["strict"]
    return {"type": "function", "function": function}


def _tool_choice(kind: str, name: str | None) -> Any:
    if kind == "tool" and name:
        return {"type": "function", "function": {"name": name}}
    return {"none": "none", "any": "required"}.get(kind, "auto")


def _messages(message: Message) -> list[dict[str, Any]]:
    """One canonical turn as OpenAI messages (a user turn with tool results becomes several)."""
    role = message.role
    if role == "assistant":
        return [_assistant(message.content)]
    if role == "system":
        return [{"role": "system", "content": _text_content(message.content)}]
    out: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for block in message.content:
        kind = block.get("type")
        if kind == "tool_result":
            out.append(
                {
                    "role": "tool",
                    "tool_call_id": str(block.get("tool_use_id") or ""),
                    "content": _result_text(block.get("content")),
                }
            )
            continue
        part = _part(block)
        if part is not None:
            parts.append(part)
    if parts or (role != "tool" and not out):  # an empty user turn still holds its place
        content: Any = parts
        if not parts:
            content = ""
        elif len(parts) == 1 and parts[0]["type"] == "text":
            content = parts[0]["text"]
        out.append({"role": "user", "content": content})
    return out


def _assistant(blocks: list[Block]) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in blocks:
        kind = block.get("type")
        if kind == "text":
            texts.append(str(block.get("text") or ""))
        elif kind == "tool_use":
            calls.append(
                {
                    "id": str(block.get("id") or ""),
                    "type": "function",
                    "function": {
                        "name": str(block.get("name") or ""),
                        "arguments": arguments_text(block.get("input")),
                    },
                }
            )
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        message["tool_calls"] = calls
    return message


def arguments_text(value: Any) -> str:
    """A tool_use input as OpenAI's arguments text (``{"_raw": text}`` is that text again)."""
    if isinstance(value, dict):
        raw = value.get("_raw")
        if len(value) == 1 and isinstance(raw, str):
            return raw
        return orjson.dumps(value).decode()
    return "{}" if value is None else orjson.dumps(value).decode()


def _text_content(blocks: list[Block]) -> Any:
    texts = [str(b.get("text") or "") for b in blocks if b.get("type") == "text"]
    if len(texts) == 1:
        return texts[0]
    return [{"type": "text", "text": t} for t in texts] if texts else ""


def _result_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(b.get("text") or "") for b in content if isinstance(b, dict) and b.get("type") == "text"
        )
    return ""


def _part(block: Block) -> dict[str, Any] | None:
    kind = block.get("type")
    if kind == "text":
        return {"type": "text", "text": str(block.get("text") or "")}
    if kind == "image":
        source = block.get("source") or {}
        if source.get("type") == "base64":
            url = f"data:{source.get('media_type') or 'image/png'};base64,{source.get('data') or ''}"
        elif source.get("type") == "url":
            url = str(source.get("url") or "")
        else:
            return None
        return {"type": "image_url", "image_url": {"url": url}}
    if kind == "document":
        source = block.get("source") or {}
        if source.get("type") == "text":
            return {"type": "text", "text": str(source.get("data") or "")}
        if source.get("type") == "base64":
            data = f"data:{source.get('media_type') or 'application/pdf'};base64,{source.get('data') or ''}"
            file: dict[str, Any] = {"file_data": data}
            if block.get("title"):
                file["filename"] = str(block["title"])
            return {"type": "file", "file": file}
        return None
    if kind in ("input_audio", "file"):
        return dict(block)
    return None
