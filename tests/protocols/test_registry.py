"""No engine kind in the fleet schema lacks an adapter; a kind without one is refused when the fleet loads."""

from __future__ import annotations

from typing import get_args

import pytest

from skyfabric.core.errors import ConfigError
from skyfabric.core.fleet import EngineKind, parse_fleet
from skyfabric.protocols.registry import BACKENDS, backend, backends_for


@pytest.mark.parametrize("engine", get_args(EngineKind))
def test_every_engine_kind_in_the_schema_has_an_adapter(engine: str) -> None:
    adapter = backend(engine)
    assert adapter.family in ("openai", "anthropic", "vertex", "bedrock")
    assert callable(adapter.build) and callable(adapter.decoder) and callable(adapter.classify)


def test_the_adapter_table_names_no_kind_the_schema_refuses() -> None:
    assert set(BACKENDS) == set(get_args(EngineKind))


@pytest.mark.parametrize("engine", ["made-up", "gemini-direct"])
def test_an_engine_kind_nothing_speaks_is_refused_at_load(engine: str) -> None:
    data = {
        "models": [{"name": "m"}],
        "providers": [
            {
                "name": "p",
                "regions": [
                    {
                        "name": "r",
                        "pools": [
                            {
                                "name": "pool",
                                "accelerator": "managed",
                                "engine": engine,
                                "model": "m",
                                "endpoints": ["https://example.invalid/v1"],
                            }
                        ],
                    }
                ],
            }
        ],
    }
    with pytest.raises(ConfigError, match="engine"):
        backends_for(parse_fleet(data))
