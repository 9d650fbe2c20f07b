"""Text out of token ids: incremental detokenization and stop strings, shared by the in-process engines.

Both run in the replica's event loop, after the engine produced tokens, so they cost no forward-pass time.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from skyfabric.core.errors import PromptTooLong
from skyfabric.core.textsize import nonspace_chars, tokens_at_least


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without splitting a UTF-8 character.

    Byte-level tokenizers spread one character over several tokens; decoding a partial character gives U+FFFD.
    We decode a small window (the tokens since the last emitted delta, plus the ones before them for context,
    as vLLM does) and hold text back while it ends in U+FFFD. :meth:`flush` reconciles with a full decode so
    the concatenated deltas equal ``tokenizer.decode(all_ids, skip_special_tokens=True)``.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._emitted_chars = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    def push(self, new_ids: Sequence[int]) -> str:
        """Add tokens; return the text that is now safe to show (may be empty)."""
        if not new_ids:
            return ""
        self._ids.extend(new_ids)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            self._emitted_chars += len(delta)
            return delta
        return ""

    def flush(self) -> str:
        """Return whatever the full decode has beyond what was emitted (held-back bytes at the very end)."""
        full = self._decode(self._ids)
        if len(full) <= self._emitted_chars:
            return ""
        rest = full[self._emitted_chars :]
        self._emitted_chars = len(full)
        return rest


class StopStringMatcher:
    """Cuts the output at the first stop string, holding back any tail that could be the start of one.

    The held-back tail is what lets a stop string split across two deltas still be caught before any of it is
    sent to the client.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was hit)."""
        if not self._stops:
            return text, False
        buf = self._pending + text
        hits = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._pending = ""
            return buf[: min(hits)], True
        hold = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buf)), hold, -1):
                if buf.endswith(stop[:k]):
                    hold = k
                    break
        self._pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """Release held-back text once generation ended without a stop string."""
        rest, self._pending = self._pending, ""
        return rest


class TextStream:
    """Token ids in, text deltas out: incremental detokenizing followed by stop-string matching.

    ``feed(ids, last=True)`` releases everything held back (partial characters, possible stop-string
    starts) once the engine has finished the sequence.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str]) -> None:
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stops = StopStringMatcher(stops)

    def feed(self, new_ids: Sequence[int], *, last: bool = False) -> tuple[str, bool]:
        """Return (text safe to send, whether a stop string ended the output)."""
        text, hit_stop = self._stops.feed(self._detok.push(new_ids))
        if last and not hit_stop:
            more, hit_stop = self._stops.feed(self._detok.flush())
            text += more
            if not hit_stop:
                text += self._stops.flush()
        return text, hit_stop


#: Normalizers that never make text shorter (in characters other than whitespace).
_NON_SHRINKING = frozenset({"Prepend", "Lowercase", "NFD", "NFKD", "Strip", "ByteLevel"})


def _may_shrink(normalizer: Any) -> bool:
    """Whether an HF ``tokenizers`` normalizer (as serialized) can map text to fewer characters."""
    if not normalizer:
        return False
    kind = normalizer.get("type")
    if kind == "Sequence":
        return any(_may_shrink(n) for n in normalizer.get("normalizers", []))
    if kind == "Replace":
        pattern = normalizer.get("pattern", {})
        return "String" not in pattern or len(normalizer.get("content", "")) < len(pattern["String"])
    return kind not in _NON_SHRINKING


class HFTokenizing:
    """``tokenize`` and ``tokenize_chat`` for engines that keep an HF tokenizer in ``_tokenizer``.

    Tokenizing costs time and memory in proportion to the text however far past the context it runs (a
    30 MB prompt took 73 s and 4.6 GB here before its 400). So the text the tokenizer would see is first
    bounded by size: no token spells more than :attr:`max_token_chars` characters, and a text of more
    characters than ``max_model_len`` times that is refused with :class:`PromptTooLong`, untokenized.
    What is tokenized is therefore at most ``max_model_len × max_token_chars`` characters.
    """

    _tokenizer: Any
    _token_chars: int = 0
    _token_shrinks: bool = True
    _eos: list[int]
    _token_texts: list[str] | None = None

    if TYPE_CHECKING:

        @property
        def max_model_len(self) -> int: ...

    @property
    def max_token_chars(self) -> int:
        """The longest token of the vocabulary, in characters (computed once, from the vocabulary).

        A vocabulary entry is never shorter than the text it decodes to (byte-level entries spell one
        byte per character, byte-fallback entries like ``<0x41>`` are longer than their byte). When the
        tokenizer normalizes in a way that can shorten text (NFC/NFKC composition, say), one token may
        stand for more input characters than it spells: ×4 covers composition (Hangul jamo are 3:1), and
        whitespace is then not counted (a normalizer may collapse it).
        """
        if not self._token_chars and self._tokenizer is not None:
            longest = max((len(t) for t in self._tokenizer.get_vocab()), default=1)
            backend = getattr(self._tokenizer, "backend_tokenizer", None)
            self._token_shrinks = backend is None or _may_shrink(
                json.loads(backend.to_str()).get("normalizer")
            )
            self._token_chars = longest * (4 if self._token_shrinks else 1)
        return self._token_chars

    def _refuse_oversized(self, text: str) -> None:
        """Raise :class:`PromptTooLong` when ``text`` certainly makes ``max_model_len`` tokens or more."""
        per_token = self.max_token_chars
        if not per_token or len(text) <= self.max_model_len * per_token:
            return
        chars = nonspace_chars(text) if self._token_shrinks else len(text)
        at_least = tokens_at_least(chars, per_token)
        if at_least >= self.max_model_len:  # not even one token of room left for the answer
            raise PromptTooLong(at_least)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return tuple(getattr(self, "_eos", ()))

    def tokenize_fragment(self, text: str) -> list[int]:
        """Token ids of text appended to a rendered prompt (no BOS): guided decoding's re-rendered prefix."""
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=True))

    def token_texts(self) -> Sequence[str]:
        """Each id decoded alone (special tokens spell ""), computed once, when guided decoding first asks."""
        if self._token_texts is None:
            tokenizer = self._tokenizer
            self._token_texts = [
                str(tokenizer.decode([i], skip_special_tokens=True)) for i in range(len(tokenizer))
            ]
        return self._token_texts

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a raw completion prompt, with the special tokens the model expects (e.g. BOS)."""
        self._refuse_oversized(text)
        return list(self._tokenizer(text, add_special_tokens=True)["input_ids"])

    def tokenize_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool,
        continue_final_message: bool,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        """Render ``messages`` with the model's chat template and tokenize; ValueError when it cannot."""
        tokenizer = self._tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template; use /v1/completions")
        try:
            text = tokenizer.apply_chat_template(
                [dict(m) for m in messages],
                tokenize=False,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                continue_final_message=continue_final_message,
                tools=[dict(t) for t in tools] if tools else None,
            )
        except ValueError:
            raise
        except Exception as exc:  # jinja errors (raise_exception in templates, bad roles)
            raise ValueError(f"cannot render messages with the chat template: {exc}") from exc
        self._refuse_oversized(text)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
