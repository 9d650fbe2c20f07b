"""The control plane: starting fleets (embedded replicas), and later planning and launch specs."""

from __future__ import annotations

from pathlib import Path

#: The embedded fleet that ``skyfabric up`` starts when no fleet file is named.
EMBEDDED_FLEET = Path(__file__).parent / "fleets" / "embedded.yaml"
