"""The protocol seam: one canonical request and event stream; a frontend per client protocol, a backend
adapter per wire protocol. Imports ``core`` only."""
