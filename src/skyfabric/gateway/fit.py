"""Whether a prompt can fit a model's context, known from its size alone — before any upstream works on it.

No tokenizer runs here (the gateway does not know the backends' tokenizers, and tokenizing a 30 MB prompt
is exactly the work to avoid). Instead a *lower bound* on the prompt's tokens: no token of any tokenizer
covers more than :data:`MAX_CHARS_PER_TOKEN` characters, so a prompt of ``n`` characters is at least
``n / MAX_CHARS_PER_TOKEN`` tokens. The bound only ever rejects a prompt that cannot fit:

* it counts characters (code points), never bytes, and only non-whitespace ones: a tokenizer may merge a
  long run of spaces into one token, a normalizer may collapse it, a chat template may strip it;
* it counts only what templates pass through verbatim: the text of system, developer, user and tool
  messages (assistant turns are skipped — some templates drop earlier reasoning), the text parts of
  multi-part content (an image's base64 is not text tokens), and a completions prompt; token-id prompts
  count exactly;
* the longest tokens in the vocabularies of common models (GPT-2, cl100k/o200k, Llama 3, Qwen 2,
  Mistral, Gemma) are runs of punctuation or spaces of at most a few hundred characters; 1024 leaves a
  wide margin above every vocabulary we know of.

The bound costs nothing on ordinary requests: it is computed only when the raw body is larger than
``MAX_CHARS_PER_TOKEN`` × the smallest known context of the models the request can reach (a body's byte
count is never below its text's character count).
"""

from __future__ import annotations

from typing import Any

from skyfabric.core.textsize import nonspace_chars, tokens_at_least

#: An upper bound on the characters one token covers, in any tokenizer (see the module docstring).
MAX_CHARS_PER_TOKEN = 1024

_VERBATIM_ROLES = frozenset({"system", "developer", "user", "tool", "function"})


def _tokens(chars: int) -> int:
    return tokens_at_least(chars, MAX_CHARS_PER_TOKEN)


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [
            part["text"]
            for part in content
            if isinstance(part, dict)
            and part.get("type") in ("text", "input_text")
            and isinstance(part.get("text"), str)
        ]
    return []


def _floor(texts: list[str], enough: int | None) -> int:
    """Tokens ``texts`` together certainly have at least; may stop counting past ``enough`` tokens."""
    limit = None if enough is None else enough * MAX_CHARS_PER_TOKEN
    chars = 0
    for text in texts:
        chars += nonspace_chars(text, None if limit is None else limit - chars)
        if limit is not None and chars > limit:
            break
    return _tokens(chars)


def prompt_token_floor(kind: str, body: dict[str, Any], enough: int | None = None) -> int:
    """A number of tokens the prompt certainly has at least, in any tokenizer (0 when unknown).

    With ``enough``, counting may stop once the floor passes it: a 30 MB prompt for a model of a few
    thousand tokens is judged by its first megabytes, and the gateway's loop is not held for the rest.
    """
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list):
            return 0
        texts = [
            text
            for m in messages
            if isinstance(m, dict) and m.get("role") in _VERBATIM_ROLES
            for text in _texts(m.get("content"))
        ]
        return _floor(texts, enough)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return _floor([prompt], enough)
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) for t in prompt):
            return len(prompt)  # token ids: exact
        # a batch: every prompt must fit on its own, so the largest one decides
        floors = [
            len(p) if isinstance(p, list) else _floor([p], enough)
            for p in prompt
            if isinstance(p, list | str)
        ]
        return max(floors, default=0)
    return 0
