"""What one request used and cost, from the backends' own usage: the ledger and the keys' budgets read it.

A non-streamed answer reports its usage in its body (OpenAI's ``usage`` or Anthropic's, in the client's
protocol). A stream may have been served by several backends in turn (``ctx.usage_parts``: each backend's
own cumulative usage, ``ctx.parts_endpoints``: who served each part): each part is priced at its own pool
— a prefilled continuation paid for its prompt, the text already sent included, and a replay for the
whole answer again — and the costs are summed. The tokens reported to the client (and counted against a
key's tokens per minute) are the answer's: the first part's prompt, and the output tokens the client was
sent, which the relay counted by the backends' usage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from skyfabric.ops.pricing import PriceBook
from skyfabric.protocols.canonical import Usage

_NUMBER = re.compile(rb"\s*:\s*(\d+)")


@dataclass(slots=True)
class Spent:
    """A request's tokens as the client sees them, and their cost in USD by the pools that served them."""

    tokens_in: int | None
    tokens_out: int
    tokens_cached: int
    cost: float


def _field(body: bytes, key: bytes) -> int | None:
    at = body.rfind(key)
    if at < 0:
        return None
    found = _NUMBER.match(body, at + len(key))
    return int(found.group(1)) if found else None


def answer_usage(body: bytes, family: str) -> Usage | None:
    """A whole answer's usage, searched from the body's end (where servers put it), never parsed whole.

    ``input_tokens`` counts the whole prompt, cached tokens included (the seam's convention; Anthropic's
    own ``input_tokens`` leaves cache reads and writes out).
    """
    if family == "anthropic":
        output = _field(body, b'"output_tokens"')
        if output is None:
            return None
        read = _field(body, b'"cache_read_input_tokens"') or 0
        created = _field(body, b'"cache_creation_input_tokens"') or 0
        uncached = _field(body, b'"input_tokens"')
        prompt = None if uncached is None else uncached + read + created
        return Usage(prompt, output, read, created)
    output = _field(body, b'"completion_tokens"')
    if output is None:
        return None
    return Usage(_field(body, b'"prompt_tokens"'), output, _field(body, b'"cached_tokens"') or 0)


def answer_spent_once(
    observed: dict[str, Any], body: bytes, family: str, endpoint: str, prices: PriceBook
) -> Spent | None:
    """:func:`answer_spent` of ``body``, computed once per request for every observer that reads it (the
    keys' settlement and the ledger): memoized in the request's ``ctx.observed``."""
    memo = observed.get("spent")
    if memo is not None and memo[0] is body and memo[1] == endpoint:
        spent: Spent | None = memo[2]
        return spent
    spent = answer_spent(answer_usage(body, family), endpoint, prices)
    observed["spent"] = (body, endpoint, spent)
    return spent


def answer_spent(usage: Usage | None, endpoint: str, prices: PriceBook) -> Spent | None:
    """A non-streamed answer's :class:`Spent` (None: it reported no usage)."""
    if usage is None or usage.output_tokens is None:
        return None
    prompt = usage.input_tokens
    cost = prices.parts_cost([(endpoint, prompt or 0, usage.cached_input_tokens, usage.output_tokens)])
    return Spent(prompt, usage.output_tokens, usage.cached_input_tokens, cost)


def stream_spent(
    parts: list[Usage], endpoints: list[str], tokens: int, prices: PriceBook, splits: list[int] | None = None
) -> Spent:
    """A stream's :class:`Spent`: ``tokens`` the client was sent, each part priced at its own pool.

    A part that reported no usage is priced by the output tokens the client got from it (``splits``:
    tokens sent before each part took over, when known; else all of them to the last part).
    """
    first = parts[0] if parts else None
    prompt = first.input_tokens if first is not None else None
    cached = first.cached_input_tokens if first is not None else 0
    priced: list[tuple[str, int, int, int]] = []
    for i, endpoint in enumerate(endpoints):
        usage = parts[i] if i < len(parts) else None
        if usage is not None and usage.output_tokens is not None:
            priced.append((endpoint, usage.input_tokens or 0, usage.cached_input_tokens, usage.output_tokens))
            continue
        if splits is not None and i < len(splits):
            after = splits[i + 1] if i + 1 < len(splits) else tokens
            out = max(0, after - splits[i])
        else:
            out = tokens if i == len(endpoints) - 1 else 0
        priced.append((endpoint, (prompt or 0) if i == 0 else 0, cached if i == 0 else 0, out))
    return Spent(prompt, tokens, cached, prices.parts_cost(priced))
