"""Which adapter speaks each engine kind and each client protocol, as data: name → ``"module:Class"``.

Resolved when the fleet file loads (:func:`backends_for`): a pool whose engine kind has no adapter is a
configuration error then, not a surprise at the first request. Adapters are imported only when a fleet
uses them.
"""

from __future__ import annotations

import importlib
from typing import Any

from skyfabric.core.errors import ConfigError

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
