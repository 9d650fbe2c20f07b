"""Which adapter speaks each engine kind and each client protocol, as data: name → ``"module:Class"``.

Resolved when the fleet file loads (:func:`backends_for`): a pool whose engine kind has no adapter is a
configuration error then, not a surprise at the first request. Adapters are imported only when a fleet
uses them.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

from skyfabric.core.endpoints import Endpoint
from skyfabric.core.errors import ConfigError
from skyfabric.core.fleet import Fleet

#: Engine kind (the fleet file's ``engine``) → backend adapter class.
BACKENDS: dict[str, str] = {
    "local": "skyfabric.protocols.backends.openai:OpenAIBackend",
    "vllm": "skyfabric.protocols.backends.openai:OpenAIBackend",
    "vllm-tpu": "skyfabric.protocols.backends.openai:OpenAIBackend",
    "vllm-neuron": "skyfabric.protocols.backends.openai:OpenAIBackend",
    "sglang": "skyfabric.protocols.backends.openai:OpenAIBackend",
    "tgi": "skyfabric.protocols.backends.openai:OpenAIBackend",
    "llama-cpp": "skyfabric.protocols.backends.openai:OpenAIBackend",
    "openai": "skyfabric.protocols.backends.openai:OpenAIBackend",
    "anthropic": "skyfabric.protocols.backends.anthropic:AnthropicBackend",
    "azure-openai": "skyfabric.protocols.backends.azure:AzureOpenAIBackend",
    "vertex": "skyfabric.protocols.backends.vertex:VertexBackend",
    "bedrock": "skyfabric.protocols.backends.bedrock:BedrockBackend",
}

#: Client protocol → frontend class.
FRONTENDS: dict[str, str] = {
    "openai": "skyfabric.protocols.frontends.openai:OpenAIFrontend",
    "anthropic": "skyfabric.protocols.frontends.anthropic:AnthropicFrontend",
}


def resolve(target: str) -> Any:
    """Import ``"package.module:attribute"`` and return the attribute."""
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def backend(engine: str) -> Any:
    """A new adapter for engine kind ``engine``; :class:`ConfigError` when none speaks it."""
    target = BACKENDS.get(engine)
    if target is None:
        known = ", ".join(sorted(BACKENDS))
        raise ConfigError(f"engine {engine!r} has no protocol adapter (adapters exist for: {known})")
    return resolve(target)(engine)


def backends_for(fleet: Fleet, endpoints: Iterable[Endpoint] = ()) -> dict[str, Any]:
    """One adapter per engine kind the fleet's pools (and ``endpoints``) use; :class:`ConfigError` if any
    kind has none, naming the pool."""
    out: dict[str, Any] = {}
    for provider in fleet.providers:
        for region in provider.regions:
            for pool in region.pools:
                if pool.engine not in out:
                    try:
                        out[pool.engine] = backend(pool.engine)
                    except ConfigError as exc:
                        raise ConfigError(f"pool {provider.name}/{region.name}/{pool.name}: {exc}") from None
    for endpoint in endpoints:
        if endpoint.engine not in out:
            out[endpoint.engine] = backend(endpoint.engine)
        # An adapter with credentials to obtain (a cloud token) starts on them now, not at the first request.
        prepare = getattr(out[endpoint.engine], "prepare", None)
        if prepare is not None:
            prepare(endpoint)
    return out


def frontend(name: str) -> Any:
    """A new frontend for client protocol ``name`` (``openai``, ``anthropic``)."""
    return resolve(FRONTENDS[name])()
