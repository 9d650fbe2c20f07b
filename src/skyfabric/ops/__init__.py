"""Operations: what running the gateway as a platform needs beyond routing.

The usage ledger (one durable record per request, shipped in batches to SQLite or PostgreSQL through a
local outbox) and the fleet state shared between gateway instances over Redis pub/sub. Imports ``core``
only: the gateway feeds it plain values through its observer hooks (``gateway/operations.py``).
"""
