"""``skyfabric usage``: spend and tokens over a period, grouped by key, model or provider.

Reads the ledger's database (records still waiting in an outbox are not in it yet: the report says what
the database holds). Table through ``rich`` when it is installed, else plain text; CSV and JSON for
billing pipelines.
"""

from __future__ import annotations

import csv
import io
import re
import sqlite3
import time
from datetime import UTC, datetime
from typing import Any

import orjson

from skyfabric.core.errors import ConfigError
from skyfabric.ops.database import Database

GROUPS = {"key": "key_id", "model": "model", "provider": "provider"}
FIELDS = ("requests", "tokens_in", "tokens_out", "tokens_cached", "cost")
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(text: str, now: float | None = None) -> float:
    """A point in time: ``now``, a duration ago (``90m``, ``24h``, ``7d``) or an ISO date (UTC if bare)."""
    now = time.time() if now is None else now
    text = text.strip()
    if text == "now":
        return now
    relative = _RELATIVE.match(text)
    if relative:
        return now - float(relative.group(1)) * _UNITS[relative.group(2)]
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"{text!r} is not a time: use now, 24h, 7d or an ISO date like 2026-12-01"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def usage_rows(database: Database, since: float, until: float, by: str) -> list[dict[str, Any]]:
    """One row per group with its requests, tokens and cost in ``[since, until)``, costliest first."""
    column = GROUPS[by]
    table = f"{database.prefix}usage"
    query = (
        f"SELECT {column}, COUNT(*), CAST(COALESCE(SUM(tokens_in), 0) AS BIGINT), "
        f"CAST(COALESCE(SUM(tokens_out), 0) AS BIGINT), CAST(COALESCE(SUM(tokens_cached), 0) AS BIGINT), "
        f"CAST(COALESCE(SUM(cost), 0) AS DOUBLE PRECISION) FROM {table} "
        f"WHERE ts >= {{p}} AND ts < {{p}} GROUP BY {column} ORDER BY 6 DESC, 2 DESC, 1"
    )
    if database.postgres:
        import psycopg

        try:
            with database.postgres_sync() as conn:
                rows = conn.execute(query.format(p="%s"), [since, until]).fetchall()
        except psycopg.Error as exc:
            raise ConfigError(f"ledger database {database.shown}: {exc}") from None
    else:
        try:
            with database.sqlite(read_only=True) as db:
                rows = db.execute(query.format(p="?"), [since, until]).fetchall()
        except sqlite3.Error as exc:
            raise ConfigError(f"ledger {database.shown}: {exc}") from None
    return [
        {by: group if group is not None else "(none)", **dict(zip(FIELDS, values, strict=True))}
        for group, *values in rows
    ]


def render(rows: list[dict[str, Any]], by: str, fmt: str) -> str:
    """The rows as ``table``, ``csv`` or ``json``."""
    columns = (by, *FIELDS)
    if fmt == "json":
        return orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode()
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()
    cells = [[_cell(row[c]) for c in columns] for row in rows]
    totals = ["total", *(_cell(sum(row[c] for row in rows)) for c in FIELDS)]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return plain_table([list(columns), *cells, totals])
    table = Table(*columns)
    for row in cells:
        table.add_row(*row)
    table.add_section()
    table.add_row(*totals)
    buffer = io.StringIO()
    Console(file=buffer, width=120, color_system=None).print(table)
    return buffer.getvalue()


def plain_table(rows: list[list[str]]) -> str:
    """Aligned columns without rich: the first left-aligned, the figures right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        pairs = enumerate(zip(row, widths, strict=True))
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs]
        lines.append("  ".join(cells))
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6f}"
    return str(value)
