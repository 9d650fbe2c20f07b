"""Prefix caching's bookkeeping: which pool block holds which prompt prefix, who uses it, what to evict.

A prompt is cut into blocks of ``block_size`` tokens; a block is named by the hash of (its parent block's
hash, its token ids), as vLLM names them, so a block's hash stands for the whole prefix up to its end and two
prompts share a block only if they share everything before it too. Only full blocks of ``prompt[:-1]`` are
cached: the last prompt token is always computed, since its logits are the first output.

Each cached block has a reference count: the sequences that matched or stored it hold it until they end,
and a held block is never evicted. Blocks nobody holds stay cached (and can be hit again) until the pool
needs room: then the least recently released goes first (LRU), a sequence's tail before its head, so a
shared system prompt outlives the turns that followed it.

The tensors live in the model (:meth:`LlamaFamilyModel.save_blocks`/``load_blocks``); this class is pure
bookkeeping, testable without a model.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


def block_hashes(tokens: Sequence[int], block_size: int) -> list[int]:
    """Chained hashes of the full blocks of ``tokens[:-1]``."""
    hashes: list[int] = []
    parent = 0
    usable = (len(tokens) - 1) // block_size * block_size
    for start in range(0, usable, block_size):
        parent = hash((parent, tuple(tokens[start : start + block_size])))
        hashes.append(parent)
    return hashes


class PrefixCache:
    """A pool of ``num_blocks`` blocks: hash → block, reference counts, and an LRU of unreferenced blocks."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # never used (or invalidated)
        self._by_hash: dict[int, int] = {}
        self._hash_of: dict[int, int] = {}
        self._refs: dict[int, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; oldest first
        #: vLLM's counters, in tokens: prompt tokens looked up, and those found cached.
        self.queries = 0
        self.hits = 0
        self.evictions = 0

    def match(self, hashes: Sequence[int]) -> list[int]:
        """The blocks holding the longest cached prefix of ``hashes`` (nothing is acquired)."""
        blocks: list[int] = []
        for h in hashes:
            block = self._by_hash.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def record(self, prompt_tokens: int, hit_tokens: int) -> None:
        """Count one lookup (``vllm:prefix_cache_queries`` / ``vllm:prefix_cache_hits``, in tokens)."""
        self.queries += prompt_tokens
        self.hits += hit_tokens

    def lookup(self, h: int) -> int | None:
        return self._by_hash.get(h)

    def acquire(self, blocks: Sequence[int]) -> None:
        """A sequence holds these blocks (none can be evicted until it releases them)."""
        for block in blocks:
            self._refs[block] = self._refs.get(block, 0) + 1
            self._evictable.pop(block, None)

    def release(self, blocks: Sequence[int]) -> None:
        """A sequence ended; blocks nobody holds become evictable, its last block first."""
        for block in reversed(blocks):
            refs = self._refs[block] - 1
            if refs:
                self._refs[block] = refs
                continue
            del self._refs[block]
            self._evictable[block] = None

    def store(self, h: int) -> int | None:
        """A block to hold the prefix named ``h``, registered and acquired; None when the pool is all held.

        Takes a never-used block first, else evicts the least recently released one.
        """
        if self._free:
            block = self._free.pop()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            del self._by_hash[self._hash_of.pop(block)]
            self.evictions += 1
        else:
            return None
        self._by_hash[h] = block
        self._hash_of[block] = h
        self._refs[block] = 1
        return block

    # ------------------------------------------------------------------------------------------------ state

    @property
    def held(self) -> int:
        """Blocks some sequence holds."""
        return len(self._refs)

    @property
    def cached(self) -> int:
        """Blocks holding a prefix (held or evictable)."""
        return len(self._by_hash)
