"""What tokens cost, from the fleet file: per pool, defaulting to its model's prices.

A request's output tokens are priced by the pool that generated them (a continued stream spans several
pools); its prompt and cached tokens by the pool that first served it, where the client's prompt was read.
OpenAI-style usage counts cached tokens inside ``prompt_tokens``, so they are taken out of the prompt
price and charged at the cached price instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from skyfabric.core.fleet import Fleet

_MILLION = 1_000_000.0


@dataclass(frozen=True, slots=True)
class Prices:
    """USD per million tokens."""

    tokens_in: float = 0.0
    tokens_out: float = 0.0
    tokens_cached: float = 0.0


FREE = Prices()


class PriceBook:
    """Prices by pool (``provider/region/pool``, the first three parts of an endpoint id).

    Key budgets use the same prices: a request's reservation at admission is priced at the dearest pool
    that may serve it (:meth:`ceiling`: its model's pools and those of its fallbacks), so the settlement by
    the real pools' prices can only give back.
    """

    def __init__(self, fleet: Fleet) -> None:
        models = {m.name: m for m in fleet.models}
        self.pools: dict[str, Prices] = {}
        #: Endpoint id → its pool's prices (the lookup :meth:`answer_cost` makes once per endpoint).
        self._by_endpoint: dict[str, Prices] = {}
        by_model: dict[str, list[Prices]] = {}
        for provider in fleet.providers:
            for region in provider.regions:
                for pool in region.pools:
                    model = models[pool.model]
                    tokens_in = _first(pool.price_per_mtok_in, model.price_per_mtok_in)
                    cached = _first(pool.price_per_mtok_cached, model.price_per_mtok_cached, tokens_in)
                    tokens_out = _first(pool.price_per_mtok_out, model.price_per_mtok_out)
                    prices = Prices(tokens_in, tokens_out, cached)
                    self.pools[f"{provider.name}/{region.name}/{pool.name}"] = prices
                    by_model.setdefault(pool.model, []).append(prices)
        self.ceilings: dict[str, Prices] = {}
        for name in models:
            reach, todo = set(), [name]
            while todo:
                m = todo.pop()
                if m in reach or m not in models:
                    continue
                reach.add(m)
                larger = models[m].larger_context
                todo += [*models[m].fallbacks, *([larger] if larger is not None else [])]
            every = [p for m in reach for p in by_model.get(m, [])]
            self.ceilings[name] = Prices(
                max((p.tokens_in for p in every), default=0.0),
                max((p.tokens_out for p in every), default=0.0),
                max((p.tokens_cached for p in every), default=0.0),
            )

    @classmethod
    def of_models(cls, prices: dict[str, Prices]) -> PriceBook:
        """A book with only models' prices (no pools): for limits tested without a fleet."""
        book = cls.__new__(cls)
        book.pools, book.ceilings, book._by_endpoint = {}, dict(prices), {}
        return book

    def ceiling(self, model: str) -> Prices:
        """The dearest prices among the pools a request for ``model`` may reach (free when unknown)."""
        return self.ceilings.get(model, FREE)

    def of(self, endpoint_id: str) -> Prices:
        """The prices of the pool an endpoint belongs to (free when unknown)."""
        pool = endpoint_id.rsplit("/", 1)[0]
        return self.pools.get(pool, FREE)

    def answer_cost(self, endpoint: str, tokens_in: int, cached: int, tokens_out: int) -> float:
        """USD for one backend's whole answer (:meth:`parts_cost` of one part, without building it)."""
        prices = self._by_endpoint.get(endpoint)
        if prices is None:
            prices = self._by_endpoint[endpoint] = self.of(endpoint)
            if len(self._by_endpoint) > 100_000:  # endpoints come and go with discovery: stay bounded
                self._by_endpoint.clear()
        return _micro(prices, tokens_in, cached, tokens_out) / _MILLION

    def parts_cost(self, parts: list[tuple[str, int, int, int]]) -> float:
        """USD for a stream's parts: (endpoint, input, cached, output) of each backend's own usage."""
        total = 0.0
        for endpoint, tokens_in, cached, tokens_out in parts:
            total += _micro(self.of(endpoint), tokens_in, cached, tokens_out)
        return total / _MILLION

    def cost(self, first: str, tokens_in: int, cached: int, outputs: list[tuple[str, int]]) -> float:
        """USD for a request read by endpoint ``first`` whose output came from ``outputs`` (endpoint, n)."""
        return self.parts_cost([(first, tokens_in, cached, 0), *((e, 0, 0, n) for e, n in outputs)])


def _micro(prices: Prices, tokens_in: int, cached: int, tokens_out: int) -> float:
    """One part's cost in micro-USD: cached tokens (at most the prompt) at the cached price."""
    if cached:  # most answers have none: no clamping to do
        cached = min(max(cached, 0), max(tokens_in, 0))
    total = (tokens_in - cached) * prices.tokens_in + cached * prices.tokens_cached
    return total + max(tokens_out, 0) * prices.tokens_out


def _first(*values: float | None) -> float:
    for value in values:
        if value is not None:
            return value
    return 0.0
