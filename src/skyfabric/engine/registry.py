"""Which engines ``skyfabric replica --engine NAME`` knows, as data: name → ``"module:attribute"``.

The interfaces (:mod:`skyfabric.engine.base` for in-process engines, :mod:`skyfabric.engine.external` for
engines that are servers of their own) look an implementation up here and import it with :mod:`importlib`
only when it is chosen. So the interfaces import no implementation, implementations import their interface,
and imports run one way (``tests/test_architecture.py``). It also keeps ``skyfabric --help`` from paying
for torch: the transformers engine is imported only when a replica runs it.

Plug-ins that are not built in call ``register_engine`` / ``register_server_engine`` at run time instead.
"""

from __future__ import annotations

import importlib
from typing import Any

#: In-process engines: name → the factory (an :class:`~skyfabric.engine.base.Engine` subclass).
ENGINES: dict[str, str] = {
    "native": "skyfabric.engine.native_engine:NativeEngine",
    "transformers": "skyfabric.engine.transformers_engine:TransformersEngine",
}

#: Engines the replica execs: name → ``build(spec: ServerSpec) -> ServerCommand``.
SERVER_ENGINES: dict[str, str] = {
    "llama-cpp": "skyfabric.engine.llamacpp_engine:build_llamacpp_command",
    "vllm": "skyfabric.engine.vllm_engine:build_vllm_command",
}


def resolve(target: str) -> Any:
    """Import ``"package.module:attribute"`` and return the attribute."""
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)
