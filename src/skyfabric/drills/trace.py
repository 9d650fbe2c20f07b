"""Request traces: rows of (arrival time, prompt tokens, output tokens), read from a CSV and replayed.

The format is the Azure LLM inference trace's (``TIMESTAMP,ContextTokens,GeneratedTokens``); any CSV with
those three columns works, and a plain number of seconds is accepted as the timestamp too. Replay keeps
the trace's inter-arrival times, divided by ``speed`` (time compression), so a burst in the trace stays a
burst in the drill.
"""

from __future__ import annotations

import csv
import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from skyfabric.core.errors import ConfigError

#: File name of the trace shipped with the package: the first 15 minutes of the Azure LLM inference trace
#: 2023 (conversation service), CC BY 4.0; ``data/NOTICE.md`` beside it has the attribution.
DEFAULT_TRACE_NAME = "azure_conv_slice.csv"


def default_trace() -> Path:
    """The trace a ``kind: trace`` workload replays unless the scenario or ``--trace`` names another.

    It is package data, so it resolves inside whatever installation runs the drill (not a path on the
    machine where skyfabric was developed).
    """
    return Path(str(resources.files("skyfabric.drills") / "data" / DEFAULT_TRACE_NAME))


@dataclass(frozen=True, slots=True)
class TraceRow:
    """One request of a trace; ``t`` is seconds since the trace's first request."""

    t: float
    context_tokens: int
    generated_tokens: int


def parse_timestamp(text: str) -> float:
    """Seconds since the epoch (UTC assumed) for ``2023-11-16 18:15:46.6805900``, or a plain number.

    Handled by hand because the trace has seven fractional digits, more than ``fromisoformat`` accepts on
    every Python version we support.
    """
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    base, _, fraction = text.partition(".")
    try:
        moment = dt.datetime.fromisoformat(base).replace(tzinfo=dt.UTC)
    except ValueError:
        raise ValueError(f"not a timestamp: {text!r}") from None
    seconds = moment.timestamp()
    if fraction:
        if not fraction.isdigit():
            raise ValueError(f"not a timestamp: {text!r}")
        seconds += int(fraction) / 10 ** len(fraction)
    return seconds


def parse_trace(lines: Iterable[str], source: str = "<trace>") -> list[TraceRow]:
    """Rows sorted by time, times relative to the first row. Errors name the source and line."""
    reader = csv.reader(lines)
    header = next(reader, None)
    if header is None:
        raise ConfigError(f"{source}: empty trace")
    names = [h.strip().lower() for h in header]
    try:
        i_t, i_c, i_g = names.index("timestamp"), names.index("contexttokens"), names.index("generatedtokens")
    except ValueError:
        raise ConfigError(
            f"{source}: expected columns TIMESTAMP, ContextTokens, GeneratedTokens; got {', '.join(header)}"
        ) from None
    raw: list[tuple[float, int, int]] = []
    for number, row in enumerate(reader, start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        try:
            raw.append((parse_timestamp(row[i_t]), int(row[i_c]), int(row[i_g])))
        except (ValueError, IndexError) as exc:
            raise ConfigError(f"{source}:{number}: {exc}") from None
    if not raw:
        raise ConfigError(f"{source}: no requests in the trace")
    raw.sort(key=lambda r: r[0])
    first = raw[0][0]
    return [TraceRow(t - first, max(0, c), max(0, g)) for t, c, g in raw]


def load_trace(path: str | Path) -> list[TraceRow]:
    """Read a trace CSV file."""
    path = Path(path)
    try:
        with path.open(newline="") as handle:
            return parse_trace(handle, str(path))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read trace: {exc.strerror}") from None


def compress(
    rows: list[TraceRow], *, speed: float, start: float = 0.0, duration: float
) -> list[tuple[float, TraceRow]]:
    """The rows to replay in ``duration`` wall seconds, with their wall-clock arrival offsets.

    ``speed`` > 1 compresses time: ``duration`` wall seconds cover ``duration × speed`` seconds of the
    trace, starting ``start`` seconds into it.
    """
    if speed <= 0:
        raise ValueError("speed must be positive")
    end = start + duration * speed
    return [((row.t - start) / speed, row) for row in rows if start <= row.t < end]


def trace_span(rows: list[TraceRow]) -> float:
    """Seconds from the first to the last request."""
    return rows[-1].t - rows[0].t if rows else 0.0
