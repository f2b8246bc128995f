"""Logical KV blocks: allocation, reference counts and a prefix cache of full blocks.

The manager never sees tensors; the model runner owns the physical cache and only reads the block
ids written into each request. A free block whose contents are still valid stays findable by its
digest until it is handed out again, least recently freed first (LRU reuse).

A full block is found by a chained sha256 digest of its parent's digest and its own tokens, so equal
digests mean equal prefixes unless sha256 itself is broken; a per-server salt (`--prefix-cache-hash-salt`)
keeps one server's digests from being predicted on another. A hit is still checked against what the block
holds (its tokens, and that it follows the block just matched): a collision, accidental or crafted,
costs a miss, never another request's KV.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from .request import Request


def block_digest(parent: bytes, tokens: list[int]) -> bytes:
    """Digest of a full block: its parent's digest, then its tokens as fixed-width 64-bit ints (any token id
    fits, and no two token lists give the same bytes)."""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


class KVBlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, hash_salt: str = ""):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.root_digest = hashlib.sha256(b"halffull prefix cache\0" + hash_salt.encode()).digest()
        self.ref_counts = [0] * num_blocks
        # Per block, while it is cached: its digest, and what it holds (parent block or -1, the parent's fill
        # count when this block was cached, tokens).
        self.cached_digest: list[bytes | None] = [None] * num_blocks
        self.block_content: list[tuple[int, int, tuple[int, ...]] | None] = [None] * num_blocks
        # How many times each block has been handed out fresh: a child cached under one filling of its
        # parent must not match under a later one.
        self.fills = [0] * num_blocks
        self.cached: dict[bytes, int] = {}  # digest -> block id
        # Free blocks in eviction order (first = evicted first). Values unused.
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.num_prefix_hits = 0  # tokens

    # ---- accounting -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        return max(0, self.blocks_for(request.num_computed_tokens + num_new_tokens) - len(request.block_ids))

    # ---- prefix cache -----------------------------------------------------------------------
    def _full_block_digests(self, request: Request) -> list[bytes]:
        """Chained digests of the request's full blocks, extended incrementally."""
        digests = request.block_digests
        bs = self.block_size
        tokens = request.token_ids
        while (len(digests) + 1) * bs <= len(tokens):
            i = len(digests)
            parent = digests[-1] if digests else self.root_digest
            digests.append(block_digest(parent, tokens[i * bs:(i + 1) * bs]))
        return digests

    def _content(self, parent: int, tokens: list[int]) -> tuple[int, int, tuple[int, ...]]:
        return parent, self.fills[parent] if parent >= 0 else 0, tuple(tokens)

    def claim_cached_prefix(self, request: Request) -> int:
        """Attach the longest cached prefix to a request that holds no blocks; returns its length.

        At least one token is always left to compute, since its logits are what we sample from.
        """
        assert not request.block_ids and request.num_computed_tokens == 0
        if not self.enable_prefix_caching or request.skip_prefix_cache:
            return 0
        bs = self.block_size
        max_blocks = (request.num_tokens - 1) // bs
        hit: list[int] = []
        for i, digest in enumerate(self._full_block_digests(request)[:max_blocks]):
            block = self.cached.get(digest)
            parent = hit[-1] if hit else -1
            tokens = request.token_ids[i * bs:(i + 1) * bs]
            if block is None or self.block_content[block] != self._content(parent, tokens):
                break
            hit.append(block)
        self.num_prefix_hits += len(hit) * bs
        for block in hit:
            self._ref(block)
        request.block_ids = hit
        request.num_computed_tokens = len(hit) * bs
        return request.num_computed_tokens

    def cache_full_blocks(self, request: Request) -> None:
        """Make the request's computed full blocks findable by later requests."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        digests = self._full_block_digests(request)
        for i in range(request.num_computed_tokens // bs):
            block = request.block_ids[i]
            if self.cached_digest[block] is not None:
                continue
            if digests[i] in self.cached:  # the same content computed twice concurrently: keep the first
                continue
            self.cached_digest[block] = digests[i]
            self.block_content[block] = self._content(request.block_ids[i - 1] if i else -1,
                                                      request.token_ids[i * bs:(i + 1) * bs])
            self.cached[digests[i]] = block

    # ---- allocation -------------------------------------------------------------------------
    def _ref(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1

    def _take_free_block(self) -> int:
        block, _ = self.free.popitem(last=False)
        digest = self.cached_digest[block]
        if digest is not None:  # evict its cached contents
            del self.cached[digest]
            self.cached_digest[block] = self.block_content[block] = None
        self.fills[block] += 1
        self.ref_counts[block] = 1
        return block

    def allocate(self, request: Request, num_new_tokens: int) -> bool:
        """Give the request blocks for `num_new_tokens` more tokens; all or nothing."""
        needed = self.num_blocks_needed(request, num_new_tokens)
        if needed > len(self.free):
            return False
        for _ in range(needed):
            request.block_ids.append(self._take_free_block())
        return True

    def free_request(self, request: Request) -> None:
        """Release the request's blocks. The tail goes first into the eviction order, so a
        shared prefix outlives the unique suffix that hangs off it."""
        for block in reversed(request.block_ids):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
        request.block_ids = []
        request.num_computed_tokens = 0
