"""Text out of token ids: incremental detokenization and stop strings, shared by the in-process engines.

Both run in the replica's event loop, after the engine produced tokens, so they cost no forward-pass time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


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


class HFTokenizing:
    """``tokenize`` and ``tokenize_chat`` for engines that keep an HF tokenizer in ``_tokenizer``."""

    _tokenizer: Any

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a raw completion prompt, with the special tokens the model expects (e.g. BOS)."""
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
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
