"""Paged KV cache bookkeeping: a block pool with reference counts and hash-based prefix caching.

The tensors themselves live in the model runner; this file only decides which block ids a request
owns. A full block is identified by hash(parent block's hash, its token ids), so equal prefixes
map to equal hash chains. Freed blocks keep their hash and stay findable until the pool needs
them: eviction takes the least recently freed block first (an OrderedDict used as an LRU list),
and blocks that hold nothing reusable are handed out before cached ones.
"""

from __future__ import annotations

from collections import OrderedDict

from fuselm.core.request import Request


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.free_blocks: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def allocate(self, n: int) -> list[int]:
        assert n <= len(self.free_blocks), "caller must check num_free first"
        ids = []
        for _ in range(n):
            block_id, _ = self.free_blocks.popitem(last=False)
            h = self.block_hash[block_id]
            if h is not None:  # evict: this block's contents are about to be overwritten
                if self.cached.get(h) == block_id:
                    del self.cached[h]
                self.block_hash[block_id] = None
            self.ref_cnt[block_id] = 1
            ids.append(block_id)
        return ids

    def touch(self, block_ids: list[int]) -> None:
        """Take another reference to blocks (a prefix-cache hit or a fork)."""
        for block_id in block_ids:
            if self.ref_cnt[block_id] == 0:
                del self.free_blocks[block_id]
            self.ref_cnt[block_id] += 1

    def release(self, block_ids: list[int]) -> None:
        # Tail blocks first, so a request's prefix is evicted last.
        for block_id in reversed(block_ids):
            assert self.ref_cnt[block_id] > 0, f"double free of block {block_id}"
            self.ref_cnt[block_id] -= 1
            if self.ref_cnt[block_id] == 0:
                self.free_blocks[block_id] = None
                if self.block_hash[block_id] is None:  # nothing reusable inside: hand it out first
                    self.free_blocks.move_to_end(block_id, last=False)

    def register(self, block_id: int, block_hash: int) -> None:
        if self.block_hash[block_id] is None and block_hash not in self.cached:
            self.cached[block_hash] = block_id
            self.block_hash[block_id] = block_hash

    def lookup(self, block_hash: int) -> int | None:
        return self.cached.get(block_hash)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.num_lookup_tokens = 0  # prefix-cache statistics: prompt tokens looked up / found
        self.num_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_lookup_tokens if self.num_lookup_tokens else 0.0

    def _hash_full_blocks(self, request: Request, upto_tokens: int) -> None:
        bs = self.block_size
        tokens = request.all_token_ids
        hashes = request.block_hashes
        while (len(hashes) + 1) * bs <= upto_tokens:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(hash((parent, tuple(tokens[i * bs:(i + 1) * bs]))))

    def takes_prefix_hits(self, request: Request) -> bool:
        """Whether find_cached_prefix may give `request` blocks (prompt logprobs score the whole prompt;
        compressed blocks are private, core/kv_eviction.py)."""
        return self.enable_prefix_caching and request.params.prompt_logprobs is None and request.kv_compression is None

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Block ids holding this request's longest cached prefix (at least one token is left to compute)."""
        if not self.takes_prefix_hits(request):
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        self._hash_full_blocks(request, max_blocks * self.block_size)
        hits = []
        for h in request.block_hashes[:max_blocks]:
            block_id = self.pool.lookup(h)
            if block_id is None:
                break
            hits.append(block_id)
        self.num_lookup_tokens += request.num_tokens
        self.num_hit_tokens += len(hits) * self.block_size
        return hits

    def prompt_block_hashes(self, request: Request) -> list[int]:
        """The chained hashes of the blocks find_cached_prefix could find for `request` (no lookup made)."""
        max_blocks = (request.num_tokens - 1) // self.block_size
        self._hash_full_blocks(request, max_blocks * self.block_size)
        return request.block_hashes[:max_blocks]

    def leader_prefix(self, leader: Request, usable: int) -> list[int]:
        """The first `usable` blocks of an n > 1 request's first sample, for a sibling to share."""
        return leader.block_ids[:usable]

    def allocate_slots(self, request: Request, num_new_tokens: int, shared_blocks: list[int] = ()) -> bool:
        """Give `request` blocks for `shared_blocks` (already computed, reused) plus `num_new_tokens`.

        Returns False, changing nothing, when the pool cannot supply them.
        """
        total = request.num_computed_tokens - request.kv_offset + len(shared_blocks) * self.block_size + num_new_tokens
        needed = -(-total // self.block_size) - len(request.block_ids) - len(shared_blocks)
        reclaimed = sum(1 for b in shared_blocks if self.pool.ref_cnt[b] == 0)
        if needed > self.pool.num_free - reclaimed:
            return False
        if shared_blocks:
            self.pool.touch(list(shared_blocks))
            request.block_ids.extend(shared_blocks)
            request.num_computed_tokens += len(shared_blocks) * self.block_size
        if needed > 0:
            request.block_ids.extend(self.pool.allocate(needed))
        return True

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's computed full blocks so later requests can reuse them."""
        if not self.enable_prefix_caching or request.kv_compression is not None:
            return
        num_full = min(request.num_computed_tokens, request.num_tokens) // self.block_size
        if num_full <= request.num_registered_blocks:
            return
        self._hash_full_blocks(request, num_full * self.block_size)
        for i in range(request.num_registered_blocks, num_full):
            self.pool.register(request.block_ids[i], request.block_hashes[i])
        request.num_registered_blocks = num_full

    def trim(self, request: Request) -> None:
        """Return the blocks past the request's computed tokens (slots of rejected speculative tokens)."""
        keep = -(-(request.num_computed_tokens - request.kv_offset) // self.block_size)
        if len(request.block_ids) > keep:
            self.pool.release(request.block_ids[keep:])
            del request.block_ids[keep:]

    def free(self, request: Request) -> None:
        self.pool.release(request.block_ids)
        request.block_ids = []
        request.num_registered_blocks = 0
