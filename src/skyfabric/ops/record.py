"""One usage record: what one request cost, as the ledger stores and bills it.

A streamed answer has two records with the same ``request_id``: an *open* one written when the stream
commits (before its first byte reaches the client) and the *final* one when it ends. The open record is
what makes a stream the gateway was killed in the middle of still appear in the ledger; the final one
replaces it (never the other way round), so replays in any order converge on one row per request.

**The outbox line** is positional, a JSON array of the fields in declaration order up to ``outcome``
(:data:`LINE_FIELDS`): encoding a tuple costs a fraction of a dict's, and the line is half as long. The
``instance`` is not in it: the shipper knows it from the slot the line was read from. Reading is lenient
both ways: fields a newer gateway appended are ignored, missing trailing ones take their defaults, and a
JSON object (the format before positional lines) is still read, so an outbox left by an older gateway
ships.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import orjson

#: Outcomes: answered in full; an error answer; a stream the client left or that ended with an in-band
#: error (billed for what was generated); a stream still running; a stream whose gateway stopped first.
OK, ERROR, INCOMPLETE, OPEN, INTERRUPTED = "ok", "error", "incomplete", "open", "interrupted"


@dataclass(slots=True)
class UsageRecord:
    """The ledger's row for one request (tokens as the backends reported them)."""

    request_id: str
    ts: float  # wall-clock seconds (Unix) when the request arrived
    model: str
    protocol: str = "openai"
    kind: str = "chat"
    key_id: str | None = None
    endpoints: str = ""  # the endpoints that served it, in order, comma-separated
    provider: str | None = None
    region: str | None = None
    attempts: int = 0
    continuations: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    tokens_cached: int = 0
    cost: float = 0.0
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    status: int = 0
    outcome: str = OK
    instance: str = ""

    @property
    def final(self) -> bool:
        """Whether this is the request's last word (an open stream's record is not)."""
        return self.outcome != OPEN

    def to_line(self) -> bytes:
        """One outbox line (positional; see the module docstring), newline-terminated."""
        return line_of(tuple(getattr(self, name) for name in LINE_FIELDS))

    def row(self) -> tuple[Any, ...]:
        """The values in :data:`COLUMNS` order (``final`` last)."""
        return (*(getattr(self, name) for name in _NAMES), int(self.final))


_NAMES = tuple(f.name for f in fields(UsageRecord))
_DEFAULTS = tuple((f.name, f.default) for f in fields(UsageRecord))
#: The ledger table's columns, in the order :meth:`UsageRecord.row` gives them.
COLUMNS: tuple[str, ...] = (*_NAMES, "final")
#: The fields of an outbox line, in order: every column but ``instance`` (the slot's) and ``final``.
LINE_FIELDS: tuple[str, ...] = _NAMES[: _NAMES.index("instance")]
_LINE_DEFAULTS = tuple(default for _, default in _DEFAULTS[: len(LINE_FIELDS)])
_OUTCOME = LINE_FIELDS.index("outcome")
_APPEND_NEWLINE = orjson.OPT_APPEND_NEWLINE


#: An outbox line from the values of :data:`LINE_FIELDS`, in order (the hot path builds the tuple):
#: ``orjson.dumps`` bound to its option, so that encoding a record is one C call and no Python frame.
line_of: Callable[[tuple[Any, ...]], bytes] = functools.partial(orjson.dumps, option=_APPEND_NEWLINE)


def row_of(line: bytes, instance: str = "") -> tuple[Any, ...]:
    """One outbox line as a table row (the shipper's fast path: no record object), ``instance`` filled in
    for a positional line; ``ValueError`` on a torn or foreign line (see the module docstring)."""
    data = orjson.loads(line)
    if type(data) is list:
        n = len(data)
        if n == len(LINE_FIELDS):
            values = data
        elif n > len(LINE_FIELDS):
            values = data[: len(LINE_FIELDS)]
        else:
            values = [*data, *_LINE_DEFAULTS[n:]]
        if n < 3 or not isinstance(values[0], str):
            raise ValueError("not a usage record")
        return (*values, instance, int(values[_OUTCOME] != OPEN))
    if not isinstance(data, dict) or not isinstance(data.get("request_id"), str):
        raise ValueError("not a usage record")
    get = data.get
    row = [get(name, default) for name, default in _DEFAULTS]
    if not row[-1]:
        row[-1] = instance
    return (*row, int(get("outcome") != OPEN))


def lines_of(lines: list[bytes]) -> list[list[Any]] | None:
    """Many outbox lines parsed at once, when every one is a current positional record (exactly
    :data:`LINE_FIELDS`, a string id first): the shipper's fast path. None: parse them one by one
    (:func:`rows_of`)."""
    try:
        batch = orjson.loads(b"[" + b",".join(lines) + b"]")
    except orjson.JSONDecodeError:
        return None
    n = len(LINE_FIELDS)
    if all(type(v) is list and len(v) == n and type(v[0]) is str for v in batch):
        return batch
    return None


def rows_of(lines: list[bytes], instance: str = "") -> tuple[list[tuple[Any, ...]], int]:
    """Many outbox lines as rows (lenient: :func:`row_of` each), and how many lines were dropped as not
    records (torn by a machine crash)."""
    rows = []
    for line in lines:
        try:
            rows.append(row_of(line, instance))
        except ValueError:
            pass
    return rows, len(lines) - len(rows)


def from_line(line: bytes, instance: str = "") -> UsageRecord:
    """Parse one outbox line into a record (raises ``ValueError`` like :func:`row_of`)."""
    return UsageRecord(*row_of(line, instance)[:-1])


def newest(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """One row per request id (the first column): the first final one, else the last open one."""
    out: dict[str, tuple[Any, ...]] = {}
    for row in rows:
        seen = out.get(row[0])
        if seen is None or not seen[-1]:
            out[row[0]] = row
    return list(out.values())


def as_dict(record: UsageRecord) -> dict[str, Any]:
    """The record as a plain dict (for JSON reports)."""
    return asdict(record)
