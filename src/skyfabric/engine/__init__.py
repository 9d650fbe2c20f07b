"""The embedded local engine: a small code model this project grows, served with continuous batching.

The engine depends on :mod:`skyfabric.core` only; the gateway never imports it (it talks to replicas over
HTTP like to any other OpenAI-compatible backend).
"""

from __future__ import annotations

from pathlib import Path

#: The model that ships with the project (made by ``skyfabric grow``; see its MODEL_CARD.md).
DEFAULT_MODEL_DIR = Path(__file__).parent / "weights" / "skyfabric-code-tiny"
