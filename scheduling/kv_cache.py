"""Logical KV blocks: allocation, reference counts and a prefix cache of full blocks.

The manager never sees tensors; the model runner owns the physical cache and only reads the block
ids written into each request. A free block whose contents are still valid stays findable by its
hash until it is handed out again, least recently freed first (LRU reuse).
"""

from __future__ import annotations

from collections import OrderedDict

from .request import Request


class KVBlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # block hash -> block id
        # Free blocks in eviction order (first = evicted first). Values unused.
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.num_prefix_queries = 0
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
    def _full_block_hashes(self, request: Request) -> list[int]:
        """Chained hashes of the request's full blocks, extended incrementally."""
        hashes = request.block_hashes
        bs = self.block_size
        tokens = request.token_ids
        while (len(hashes) + 1) * bs <= len(tokens):
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(hash((parent, tuple(tokens[i * bs:(i + 1) * bs]))))
        return hashes

    def claim_cached_prefix(self, request: Request) -> int:
        """Attach the longest cached prefix to a request that holds no blocks; returns its length.

        At least one token is always left to compute, since its logits are what we sample from.
        """
        assert not request.block_ids and request.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hit: list[int] = []
        for h in self._full_block_hashes(request)[:max_blocks]:
            block = self.cached.get(h)
            if block is None:
                break
            hit.append(block)
        self.num_prefix_queries += request.num_tokens
        self.num_prefix_hits += len(hit) * self.block_size
        for block in hit:
            self._ref(block)
        request.block_ids = hit
        request.num_computed_tokens = len(hit) * self.block_size
        return request.num_computed_tokens

    def peek_cached_prefix(self, request: Request) -> int:
        """How many tokens `claim_cached_prefix` would attach, without attaching them."""
        if not self.enable_prefix_caching or request.block_ids:
            return 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        n = 0
        for h in self._full_block_hashes(request)[:max_blocks]:
            if h not in self.cached:
                break
            n += 1
        return n * self.block_size

    def cache_full_blocks(self, request: Request) -> None:
        """Make the request's computed full blocks findable by later requests."""
        if not self.enable_prefix_caching:
            return
        num_full = request.num_computed_tokens // self.block_size
        hashes = self._full_block_hashes(request)
        for i in range(num_full):
            block = request.block_ids[i]
            if self.block_hash[block] is not None:
                continue
            h = hashes[i]
            if h in self.cached:  # the same content computed twice concurrently: keep the first
                continue
            self.block_hash[block] = h
            self.cached[h] = block

    # ---- allocation -------------------------------------------------------------------------
    def _ref(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1

    def _take_free_block(self) -> int:
        block, _ = self.free.popitem(last=False)
        h = self.block_hash[block]
        if h is not None:  # evict its cached contents
            del self.cached[h]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    def can_allocate(self, request: Request, num_new_tokens: int) -> bool:
        return self.num_blocks_needed(request, num_new_tokens) <= len(self.free)

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
