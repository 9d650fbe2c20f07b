"""The control plane: starting fleets (embedded replicas), and later planning and launch specs."""
