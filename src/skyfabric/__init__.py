"""skyfabric: one OpenAI- and Anthropic-compatible endpoint in front of a multi-cloud model fleet."""

from __future__ import annotations

__version__ = "0.1.0"
