"""The Anthropic stand-in's "model": a deterministic answer for a conversation, and the blocks it streams.

Why deterministic: a gateway that cuts a stream and continues it elsewhere must deliver exactly the answer an
uninterrupted backend gives. Here the answer is a pure function of what a model sees — model, system, the
turns before any assistant prefill, tools and the thinking config — so every stand-in gives the same one, and
a prefill ``P`` is continued with the rest of that same answer (``A[len(P):]`` when ``A`` starts with ``P``;
the real API refuses a prefill ending in whitespace, so a client that trimmed it gets the whitespace back).

**Tokens.** One token is a maximal run of whitespace or of non-whitespace (:func:`count_tokens`); answers are
built of alternating word and whitespace tokens, so re-tokenizing an answer gives the tokens it was built
from. ``max_tokens`` and every ``usage`` figure use this count. Answers hold punctuation, blank lines,
indented code lines and non-ASCII characters (2- and 4-byte UTF-8), so whitespace and byte boundaries matter.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import random
import re
from dataclasses import dataclass, field
from typing import Any

#: The stand-ins' shared signing key: any stand-in verifies a thinking block another one signed.
DEFAULT_SECRET = b"skyfabric-anthropic-standin"

_TOKEN = re.compile(r"\s+|\S+")

_WORDS = (  # noqa: SIM905
    "the request router picks a pool and keeps every stream honest while the fleet drains one region "
    "into another backend token budget retry cache prefix model gateway answer continues after cut "
    "naïve café latency window signal"
).split(" ")
_CODE = (
    ("def", "route(request):"),
    ("return", "pool.pick(request)"),
    ("if", "budget.left()", "<=", "0:"),
    ("raise", 'Overloaded("529")'),
    ("for", "part", "in", "progress:"),
    ("yield", "part.text"),
)
_THOUGHT = (  # noqa: SIM905
    "the user wants a careful answer so I should check the request first then weigh the pool and the "
    "budget before I reply with code"
).split(" ")


def count_tokens(text: str) -> int:
    """The stand-in's tokenizer: a maximal whitespace run or non-whitespace run is one token."""
    return len(_TOKEN.findall(text))


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


def digest(*parts: Any) -> bytes:
    """A stable hash of JSON-able parts (the seed of an answer)."""
    data = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(data.encode()).digest()


def sign_thinking(thinking: str, secret: bytes = DEFAULT_SECRET) -> str:
    """The signature of a thinking block: base64 of HMAC-SHA256 of its text (tests recompute it)."""
    return base64.b64encode(hmac.new(secret, thinking.encode(), hashlib.sha256).digest()).decode()


def verify_thinking(thinking: str, signature: str, secret: bytes = DEFAULT_SECRET) -> bool:
    return hmac.compare_digest(sign_thinking(thinking, secret), signature)


def _rng(seed: bytes, salt: str) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(seed + salt.encode()).digest()[:8], "big"))


def prose(seed: bytes, n: int, *, salt: str = "text", code: bool = True) -> str:
    """``n`` tokens of deterministic text: words, punctuation, newlines and indented code lines.

    Built as alternating word / whitespace tokens (never two whitespace runs in a row), so the result
    re-tokenizes into exactly ``n`` tokens and ends with a word.
    """
    rng = _rng(seed, salt)
    out: list[str] = []
    vocab = _WORDS if code else _THOUGHT
    pending: list[str] = []  # the rest of a code line being written
    while len(out) < n:
        if pending:
            word = pending.pop(0)
            sep = " " if pending else rng.choice(("\n    ", "\n        ", "\n"))
        else:
            if code and out and out[-1].startswith("\n") and rng.random() < 0.4:
                pending = list(rng.choice(_CODE))
                continue
            word = rng.choice(vocab)
            if rng.random() < 0.08:
                word += "🙂" if rng.random() < 0.5 else "→"
            mark = rng.random()
            word += "." if mark < 0.12 else "," if mark < 0.2 else ":" if mark < 0.24 else ""
            newline = word.endswith((".", ":")) and rng.random() < 0.5
            sep = rng.choice(("\n", "\n\n")) if newline else " "
        out.extend((word, sep))
    return "".join(out[:n]).rstrip()


def answer_length(seed: bytes, base: int | None) -> int:
    """How many tokens a full answer has: ``base`` if set, else 40 to 80 (odd: it ends with a word)."""
    if base is not None:
        return base
    return 41 + 2 * (seed[0] % 20)


def continue_prefill(answer: str, prefill: str, seed: bytes) -> str:
    """What a model writes after the assistant prefill ``prefill`` when its full answer would be ``answer``.

    A prefill that is a prefix of the answer (a cut stream, whitespace-trimmed or not) gets the exact rest;
    any other prefill is continued anyway, as a real model does, with text of its own.
    """
    if answer.startswith(prefill):
        return answer[len(prefill) :]
    more = prose(digest(seed.hex(), prefill), 21, salt="elsewhere")
    return " " + more


def tool_input(schema: Any, seed: bytes, path: str = "") -> Any:
    """A deterministic value for a JSON schema: strings carry an escaped quote and multi-byte characters."""
    rng = _rng(seed, "tool:" + path)
    if not isinstance(schema, dict):
        return {}
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][rng.randrange(len(schema["enum"]))]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind is None:
        kind = "object" if "properties" in schema else "string"
    if kind == "object":
        props = schema.get("properties")
        if not isinstance(props, dict):
            return {}
        return {name: tool_input(sub, seed, f"{path}.{name}") for name, sub in props.items()}
    if kind == "array":
        return [tool_input(schema.get("items", {}), seed, f"{path}[{i}]") for i in range(2)]
    if kind == "integer":
        return rng.randrange(1, 5000)
    if kind == "number":
        return rng.randrange(1, 100000) / 100
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    word = rng.choice(_WORDS)
    return f'{word} said "hi" — naïve 🙂 {rng.randrange(100)}'


def split_json(text: str, seed: bytes) -> list[str]:
    """``text`` in uneven pieces, as the API chunks ``input_json_delta``: cuts fall inside an escape too."""
    rng = _rng(seed, "json-pieces")
    cuts: set[int] = set()
    pos = 0
    while True:
        pos += rng.randrange(2, 14)
        if pos >= len(text):
            break
        cuts.add(pos)
    escape = text.find('\\"')
    if escape >= 0:
        cuts.add(escape + 1)  # a piece ends with the backslash; the quote starts the next one
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(text)), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def group_tokens(text: str, sizes: tuple[int, ...]) -> list[str]:
    """``text`` as delta pieces of several tokens each, sizes cycling through ``sizes``."""
    toks = tokens(text)
    out: list[str] = []
    i = 0
    k = 0
    while i < len(toks):
        size = sizes[k % len(sizes)]
        out.append("".join(toks[i : i + size]))
        i += size
        k += 1
    return out


@dataclass
class Block:
    """One content block of an answer; ``pieces`` are its streamed deltas (text, thinking or JSON)."""

    kind: str  # "text" | "thinking" | "redacted_thinking" | "tool_use"
    text: str = ""  # text, thinking text, redacted data, or the tool input's JSON
    pieces: list[str] = field(default_factory=list)
    signature: str = ""
    tool_id: str = ""
    tool_name: str = ""

    @property
    def tokens(self) -> int:
        return count_tokens(self.text) if self.kind != "redacted_thinking" else 1 + len(self.text) // 64

    def content(self) -> dict[str, Any]:
        """The block as a non-streaming Message holds it."""
        if self.kind == "text":
            return {"type": "text", "text": self.text}
        if self.kind == "thinking":
            return {"type": "thinking", "thinking": self.text, "signature": self.signature}
        if self.kind == "redacted_thinking":
            return {"type": "redacted_thinking", "data": self.text}
        try:
            value = json.loads(self.text) if self.text else {}
        except ValueError:  # cut by max_tokens mid-JSON
            value = {}
        return {"type": "tool_use", "id": self.tool_id, "name": self.tool_name, "input": value}


@dataclass
class Answer:
    """The blocks a request gets and why it stopped."""

    blocks: list[Block]
    stop_reason: str
    stop_sequence: str | None = None

    @property
    def output_tokens(self) -> int:
        return sum(b.tokens for b in self.blocks)


def truncate_tokens(text: str, n: int) -> str:
    return "".join(tokens(text)[:n])


def limit(blocks: list[Block], max_tokens: int, stops: list[str], natural: str) -> Answer:
    """Apply ``max_tokens`` (over all blocks, thinking included) and ``stop_sequences`` (text blocks only)."""
    kept: list[Block] = []
    left = max_tokens
    reason = natural
    for block in blocks:
        if block.tokens <= left:
            kept.append(block)
            left -= block.tokens
            continue
        reason = "max_tokens"
        if left > 0 and block.kind != "redacted_thinking":
            block.text = truncate_tokens(block.text, left)
            kept.append(block)
        break
    for i, block in enumerate(kept):
        if block.kind != "text":
            continue
        hits = [(block.text.find(s), s) for s in stops if s and s in block.text]
        if hits:
            at, seq = min(hits)
            block.text = block.text[:at]
            del kept[i + 1 :]
            if not block.text:
                kept.pop()
            return Answer(kept, "stop_sequence", seq)
    return Answer(kept, reason)
