"""KV cache groups: paged KV for models whose layers do not all see the whole context.

A sliding-window layer (window W) only ever reads the last W positions, so its cache needs only
the blocks the window can still reach; a full-attention layer needs them all. Layers are put into
groups of equal size (`kv_cache_groups`): every group holds layers of one window only, and the
group size is the greatest common divisor of the layer counts per window (Gemma 3 270M: 3 full
and 15 sliding layers -> 1 full group and 5 sliding groups of 3 layers). All groups draw their
blocks from ONE pool: block id b of any group is one page of `group_size` layers' K/V, and the
runner keeps `group_size` cache tensors per K and V, the j-th layer of every group reading the
j-th tensor. A block id belongs to one group at a time, so groups never overwrite each other,
and how the KV memory divides between full and windowed layers follows the running sequences
instead of being fixed at start.

Each request holds one block table per group (`Request.block_ids` for group 0, the others in
`Request.group_block_ids`), all indexed by block position. A windowed group releases the blocks
that lie wholly before the window of every query the request can still issue (the next query's
position minus W - 1); their table entries become the pool's null block id, which the runner maps
to its all-zero page. A prefix-cache hit of L tokens is usable only when every group still holds
the blocks its layers read for the query at L (a windowed group: those covering [L - W + 1, L));
otherwise the longest shorter hit that every group can serve is taken.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fuselm.core.kv_cache import KVCacheManager
from fuselm.core.request import Request


@dataclass(frozen=True, slots=True)
class KVCacheGroup:
    window: int | None  # sliding window in positions; None: full attention
    layers: tuple[int, ...]  # model layer indices, in order; layer layers[j] reads cache tensor j


def kv_cache_groups(windows: list[int | None]) -> list[KVCacheGroup]:
    """Groups of equal size over the layers whose windows are `windows` (one entry per layer).

    A model whose layers all share one window (or none) is one group: the cache is laid out as
    without groups. Full-attention groups come first."""
    by_window: dict[int | None, list[int]] = {}
    for index, window in enumerate(windows):
        by_window.setdefault(window, []).append(index)
    size = math.gcd(*(len(layers) for layers in by_window.values()))
    groups = []
    for window in sorted(by_window, key=lambda w: (w is not None, w or 0)):
        layers = by_window[window]
        groups.extend(KVCacheGroup(window, tuple(layers[i:i + size])) for i in range(0, len(layers), size))
    return groups


def blocks_for_tokens(group: KVCacheGroup, num_tokens: int, max_chunk: int, block_size: int) -> int:
    """The most blocks one sequence of `num_tokens` tokens holds in `group` at once, computing its
    prompt in chunks of up to `max_chunk` tokens (a chunk's K/V are all stored before the window
    moves past them)."""
    full = -(-num_tokens // block_size)
    if group.window is None:
        return full
    return min(full, -(-(group.window - 1 + max_chunk) // block_size) + 1)


def describe_groups(groups: list[KVCacheGroup], num_tokens: int, max_chunk: int, block_size: int) -> str:
    """One log phrase: the groups, and the blocks each kind holds for one sequence of `num_tokens`."""
    kinds: dict[int | None, list[KVCacheGroup]] = {}
    for group in groups:
        kinds.setdefault(group.window, []).append(group)
    parts = [f"{'full' if window is None else f'window {window}'} x{len(same)} groups: "
             f"{len(same) * blocks_for_tokens(same[0], num_tokens, max_chunk, block_size)} blocks"
             for window, same in kinds.items()]
    total = sum(blocks_for_tokens(g, num_tokens, max_chunk, block_size) for g in groups)
    return (f"KV cache groups of {len(groups[0].layers)} layers per block; one {num_tokens}-token sequence holds "
            f"at most {total} blocks ({', '.join(parts)})")


def sequence_capacity(groups: list[KVCacheGroup], num_blocks: int, max_chunk: int, block_size: int) -> int:
    """The most tokens one sequence alone can hold in a pool of `num_blocks` blocks."""
    def fits(num_tokens: int) -> bool:
        return sum(blocks_for_tokens(g, num_tokens, max_chunk, block_size) for g in groups) <= num_blocks

    if all(g.window for g in groups):  # no group grows past its window: any length fits, or none
        return 1 << 40 if fits(1 << 40) else 0
    low, high = 0, num_blocks * block_size
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


class _GroupedPrefix(list):
    """A prefix hit over several groups: the list itself is group 0's blocks (its length is the hit
    in blocks, as for one group), `tables` every group's, null ids before a window."""

    def __init__(self, tables: list[list[int]]) -> None:
        super().__init__(tables[0])
        self.tables = tables


class GroupedKVCacheManager(KVCacheManager):
    """KVCacheManager over several KV cache groups sharing one block pool (see the module docstring).

    Used when the model has any sliding-window layer; a model without one keeps KVCacheManager."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool,
                 groups: list[KVCacheGroup]) -> None:
        super().__init__(num_blocks, block_size, enable_prefix_caching)
        self.windows = [g.window for g in groups]
        self.null_block = num_blocks  # the runner's all-zero page: table entries of released blocks

    def tables(self, request: Request) -> list[list[int]]:
        if len(request.group_block_ids) != len(self.windows) - 1:
            request.group_block_ids = [[] for _ in self.windows[1:]]
        return [request.block_ids, *request.group_block_ids]

    def _key(self, group: int, block_hash: int):
        return block_hash if group == 0 else (group, block_hash)

    def _first_needed(self, group: int, position: int) -> int:
        """Index of the first block group `group` must hold for a query at `position` (and later)."""
        window = self.windows[group]
        return 0 if window is None else max(0, (position - window + 1) // self.block_size)

    def find_cached_prefix(self, request: Request) -> list[int]:
        if not self.enable_prefix_caching or request.params.prompt_logprobs is not None:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        self._hash_full_blocks(request, max_blocks * self.block_size)
        hashes = request.block_hashes[:max_blocks]
        found = [[self.pool.lookup(self._key(g, h)) for h in hashes] for g in range(len(self.windows))]
        self.num_lookup_tokens += request.num_tokens
        k = self._longest_usable(found, max_blocks)
        if not k:
            return []
        self.num_hit_tokens += k * self.block_size
        return self._prefix(found, k)

    def _longest_usable(self, found: list[list[int | None]], max_blocks: int) -> int:
        """The most leading blocks k such that every group holds its needed blocks for a query at k * block_size."""
        runs = []  # runs[g][i]: how many blocks up to and including i group g holds without a gap
        for ids in found:
            run, count = [], 0
            for block_id in ids:
                count = count + 1 if block_id is not None else 0
                run.append(count)
            runs.append(run)
        for k in range(max_blocks, 0, -1):
            if all(runs[g][k - 1] >= k - self._first_needed(g, k * self.block_size) for g in range(len(runs))):
                return k
        return 0

    def _prefix(self, found: list[list[int | None]], k: int) -> _GroupedPrefix:
        tables = []
        for g, ids in enumerate(found):
            first = self._first_needed(g, k * self.block_size)
            tables.append([self.null_block] * first + ids[first:k])
        return _GroupedPrefix(tables)

    def leader_prefix(self, leader: Request, usable: int) -> list[int]:
        """The blocks of an n > 1 request's first sample that a sibling can share (see
        KVCacheManager.leader_prefix): the longest prefix whose needed blocks every group still holds."""
        null = self.null_block
        found = [[None if b == null else b for b in table[:usable]] for table in self.tables(leader)]
        k = self._longest_usable(found, usable)
        return self._prefix(found, k) if k else []

    def _release_behind_window(self, request: Request, position: int) -> None:
        """Return the blocks no query at `position` or later can read."""
        for g, table in enumerate(self.tables(request)):
            first = min(self._first_needed(g, position), len(table))
            dead = [b for b in table[:first] if b != self.null_block]
            if dead:
                self.pool.release(dead)
                table[:first] = [self.null_block] * first

    def allocate_slots(self, request: Request, num_new_tokens: int, shared_blocks: list[int] = ()) -> bool:
        bs = self.block_size
        tables = self.tables(request)
        shared = shared_blocks.tables if shared_blocks else [[] for _ in tables]
        first_position = request.num_computed_tokens + len(shared_blocks) * bs
        self._release_behind_window(request, first_position)
        total = first_position + num_new_tokens
        blocks = -(-total // bs)
        needed = [max(0, blocks - len(table) - len(extra)) for table, extra in zip(tables, shared)]
        reused = {b for extra in shared for b in extra if b != self.null_block}
        reclaimed = sum(1 for b in reused if self.pool.ref_cnt[b] == 0)
        if sum(needed) > self.pool.num_free - reclaimed:
            return False
        if shared_blocks:
            for table, extra in zip(tables, shared):
                self.pool.touch([b for b in extra if b != self.null_block])
                table.extend(extra)
            request.num_computed_tokens += len(shared_blocks) * bs
        for table, n in zip(tables, needed):
            if n:
                table.extend(self.pool.allocate(n))
        return True

    def cache_full_blocks(self, request: Request) -> None:
        if not self.enable_prefix_caching:
            return
        num_full = min(request.num_computed_tokens, request.num_tokens) // self.block_size
        if num_full <= request.num_registered_blocks:
            return
        self._hash_full_blocks(request, num_full * self.block_size)
        for g, table in enumerate(self.tables(request)):
            for i in range(request.num_registered_blocks, num_full):
                if table[i] != self.null_block:
                    self.pool.register(table[i], self._key(g, request.block_hashes[i]))
        request.num_registered_blocks = num_full

    def trim(self, request: Request) -> None:
        keep = -(-request.num_computed_tokens // self.block_size)
        for table in self.tables(request):
            if len(table) > keep:
                self.pool.release([b for b in table[keep:] if b != self.null_block])
                del table[keep:]

    def free(self, request: Request) -> None:
        for table in self.tables(request):
            self.pool.release([b for b in table if b != self.null_block])
        request.block_ids = []
        request.group_block_ids = []
        request.num_registered_blocks = 0

    def held_blocks(self, request: Request) -> list[int]:
        """Blocks the request holds in each group (null entries not counted)."""
        return [sum(1 for b in table if b != self.null_block) for table in self.tables(request)]
