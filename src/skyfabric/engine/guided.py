"""Guided decoding of tool-call arguments: the JSON skeleton from a tool's schema, and the token masks.

The simplest honest form of vLLM's guided JSON: the engine writes the structure (``{"key": `` … ``}``, keys
from ``parameters.properties`` in their order) and the model generates every value, sampled from the
tokens the value's type allows:

* ``string``: tokens whose text has no ``"``, ``\\`` or control character (so the value needs no escaping
  and cannot end the string early), at most :data:`STRING_TOKENS`; the model ends it early with EOS.
* ``integer`` / ``number``: tokens made of digits only, at most :data:`NUMBER_TOKENS`; written as
  ``str(int(digits))`` (JSON forbids leading zeros).
* ``boolean``: one token, the first token of ``true`` or of ``false``; the literal it starts is written.
* anything else (object, array, null, no type): the engine writes the empty value of that type.

So the arguments are valid JSON matching the properties' types by construction, and every value is the
model's choice among what the schema allows.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

#: Bounds on one value, in sampled tokens (keeps a tool call short on a small model).
STRING_TOKENS = 8
NUMBER_TOKENS = 2

ValueKind = Literal["string", "integer", "boolean", "fixed"]


@dataclass(frozen=True, slots=True)
class Field:
    """One property of the arguments object: its key and how its value is generated."""

    key: str
    kind: ValueKind
    fixed: str = ""  # the value the engine writes for kind "fixed"


def fields_of(parameters: Any) -> list[Field]:
    """The arguments' fields, in ``properties`` order (a schema without properties gives ``{}``)."""
    properties = parameters.get("properties") if isinstance(parameters, Mapping) else None
    if not isinstance(properties, Mapping):
        return []
    fields = []
    for key, schema in properties.items():
        kind = schema.get("type") if isinstance(schema, Mapping) else None
        if isinstance(kind, list):  # ["string", "null"]: the first type that is not null
            kind = next((k for k in kind if k != "null"), None)
        if kind == "string":
            fields.append(Field(str(key), "string"))
        elif kind in ("integer", "number"):
            fields.append(Field(str(key), "integer"))
        elif kind == "boolean":
            fields.append(Field(str(key), "boolean"))
        else:
            fields.append(Field(str(key), "fixed", {"object": "{}", "array": "[]"}.get(str(kind), "null")))
    return fields


def opening(fields: Sequence[Field], index: int) -> str:
    """The structure the engine writes before field ``index``'s value (``{"a": "`` or ``, "b": ``)."""
    head = "{" if index == 0 else ", "
    quote = '"' if fields[index].kind == "string" else ""
    return f"{head}{json.dumps(fields[index].key)}: {quote}"


def closing(fields: Sequence[Field], index: int) -> str:
    """What ends field ``index``'s value: its closing quote for strings (the object's ``}`` is separate)."""
    return '"' if fields[index].kind == "string" else ""


def is_string_safe(text: str) -> bool:
    """A token text that may appear inside a JSON string as is (and is not empty)."""
    return bool(text) and not any(c in '"\\' or ord(c) < 0x20 or c == "\x7f" for c in text)


class Vocabulary:
    """The token masks of one engine's vocabulary, built once from each id's decoded text."""

    def __init__(self, texts: Sequence[str], eos: Sequence[int]) -> None:
        ends = tuple(sorted(set(eos)))
        self.string_ids = tuple(i for i, t in enumerate(texts) if is_string_safe(t)) + ends
        self.digit_ids = tuple(i for i, t in enumerate(texts) if t and t.isascii() and t.isdigit()) + ends
        self.true_ids = tuple(i for i, t in enumerate(texts) if t and "true".startswith(t))
        self.false_ids = tuple(i for i, t in enumerate(texts) if t and "false".startswith(t))
        self.texts = texts

    def allowed(self, kind: ValueKind) -> tuple[int, ...]:
        if kind == "string":
            return self.string_ids
        if kind == "integer":
            return self.digit_ids
        return self.true_ids + self.false_ids

    def boolean(self, token_id: int) -> str:
        """The literal a sampled boolean token starts."""
        return "true" if token_id in self.true_ids else "false"


def number_text(digits: str) -> str:
    """A JSON integer from the sampled digits (no leading zeros; "0" when the model gave none)."""
    digits = "".join(c for c in digits if c.isascii() and c.isdigit())
    return str(int(digits)) if digits else "0"


def value_end(kind: ValueKind, text: str) -> int | None:
    """Where a value that starts ``text`` (the client's partial arguments) ends, if ``text`` shows it.

    A string ends at its closing quote; a number or boolean at the first character that cannot be part
    of it. ``None``: the text ends inside the value, or exactly where it could still go on.
    """
    if kind == "string":
        end = text.find('"')
        return None if end < 0 else end
    for i, c in enumerate(text):
        if not (c.isascii() and c.isalnum()):
            return i
    return None
