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
from typing import TYPE_CHECKING

from skyfabric.ops.pricing import PriceBook
from skyfabric.protocols.canonical import Usage

if TYPE_CHECKING:
    from skyfabric.gateway.context import RequestContext

_NUMBER = re.compile(rb"\s*:\s*(\d+)")
#: OpenAI's usage object as engines write it (prompt, completion, total — vLLM puts total between the two
#: — compact or with Python's ``", "`` and ``": "`` separators): both counts in one match (a pattern with
#: ``\s*`` everywhere took twice as long; any other spacing or order takes the field-by-field search).
#: The last group says whether more fields follow (``prompt_tokens_details``: cached tokens) or not.
_OPENAI_USAGE = re.compile(
    rb'"usage": ?\{"prompt_tokens": ?(\d+), ?(?:"total_tokens": ?\d+, ?)?"completion_tokens": ?(\d+)'
    rb'(?:, ?"total_tokens": ?\d+)?([,}])'
)
_CACHED = re.compile(rb'"prompt_tokens_details"\s*:\s*\{[^{}]*?"cached_tokens"\s*:\s*(\d+)')


@dataclass(slots=True)
class Spent:
    """A request's tokens as the client sees them, and their cost in USD by the pools that served them."""

    tokens_in: int | None
    tokens_out: int
    tokens_cached: int
    cost: float


def _field(body: bytes, key: bytes, start: int = 0) -> int | None:
    at = body.rfind(key, start)
    if at < 0:
        return None
    found = _NUMBER.match(body, at + len(key))
    return int(found.group(1)) if found else None


#: A whole answer's token counts: (prompt, output, cached, cache writes); prompt None when not reported.
Tokens = tuple[int | None, int, int, int]


def answer_tokens(body: bytes, family: str) -> Tokens | None:
    """A whole answer's usage, searched from the body's end (where servers put it), never parsed whole.

    The prompt counts the whole prompt, cached tokens included (the seam's convention; Anthropic's own
    ``input_tokens`` leaves cache reads and writes out). Searched from the last ``"usage"`` key: a quote
    inside generated text is escaped, so the text cannot fake it. OpenAI's usual layout is read by one
    match; any other order of its fields by a search for each. A tuple, not a :class:`Usage`: this runs on
    every non-streaming answer while metrics, keys or the ledger are on.
    """
    at = body.rfind(b'"usage"')
    if at < 0:
        return None
    if family != "anthropic":
        found = _OPENAI_USAGE.match(body, at)
        if found is not None:
            if found[3] == b"}":
                return int(found[1]), int(found[2]), 0, 0
            # More fields: the cached tokens, if any, inside the prompt tokens' details object itself.
            details = _CACHED.search(body, found.end())
            return int(found[1]), int(found[2]), int(details[1]) if details is not None else 0, 0
        output = _field(body, b'"completion_tokens"', at)
        if output is None:
            return None
        prompt = _field(body, b'"prompt_tokens"', at)
        return prompt, output, _field(body, b'"cached_tokens"', at) or 0, 0
    output = _field(body, b'"output_tokens"', at)
    if output is None:
        return None
    read = _field(body, b'"cache_read_input_tokens"', at) or 0
    created = _field(body, b'"cache_creation_input_tokens"', at) or 0
    uncached = _field(body, b'"input_tokens"', at)
    return None if uncached is None else uncached + read + created, output, read, created


def answer_usage(body: bytes, family: str) -> Usage | None:
    """:func:`answer_tokens` as a :class:`Usage`."""
    tokens = answer_tokens(body, family)
    return None if tokens is None else Usage(*tokens)


def answer_tokens_once(ctx: RequestContext, body: bytes) -> Tokens | None:
    """:func:`answer_tokens` of ``body`` in the client's protocol, read once per answer for every observer
    that needs it (the GenAI metrics, the keys' settlement, the ledger): memoized in ``ctx.usage_memo``."""
    memo = ctx.usage_memo
    if memo is not None and memo[0] is body:
        return memo[1]
    tokens = answer_tokens(body, ctx.frontend.family)
    ctx.usage_memo = (body, tokens)
    return tokens


def answer_spent_once(ctx: RequestContext, body: bytes, endpoint: str, prices: PriceBook) -> Spent | None:
    """A non-streamed answer's :class:`Spent` (None: it reported no usage), computed once per request for
    every observer that reads it (the keys' settlement and the ledger): memoized in ``ctx.spent_memo``."""
    memo = ctx.spent_memo
    if memo is not None and memo[0] is body and memo[1] == endpoint:
        return memo[2]
    tokens = answer_tokens_once(ctx, body)
    spent = None
    if tokens is not None:
        prompt, output, cached, _ = tokens
        spent = Spent(prompt, output, cached, prices.answer_cost(endpoint, prompt or 0, cached, output))
    ctx.spent_memo = (body, endpoint, spent)
    return spent


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
