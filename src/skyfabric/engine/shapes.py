"""The row counts the native engine pads its matmuls to."""

from __future__ import annotations

_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def bucket(rows: int) -> int:
    """The row count a matmul is padded to: a few fixed shapes instead of one per batch size.

    oneDNN (bf16 on CPU) builds and keeps kernels and buffers for every input shape it sees, a few MiB each:
    with raw batch sizes and prompt lengths a replica's memory would creep up with every new shape.
    """
    for size in _BUCKETS:
        if rows <= size:
            return size
    return -(-rows // 512) * 512
