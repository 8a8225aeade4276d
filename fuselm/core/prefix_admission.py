"""Prefix-aware admission (BatchLLM): among waiting requests of equal priority, those whose prompt starts
with a prefix that running requests hold in the cache are admitted first, so that sequences sharing a
prefix run together and shared-prefix attention (layers/cascade.py) finds them as large groups.

Requests of several prompt families arriving interleaved are admitted in arrival order otherwise:
with 64 sequence slots and 16 families, each family runs 4 at a time, too few to form a group. Here a
waiting request whose leading prompt blocks (by their chained hashes, so equal hashes mean an equal
prefix) are computed blocks of a running request past its prompt (one still computing its prompt
would have the newcomer compute the rest of the prefix a second time) moves ahead of those that share nothing with the
running set, in a stable way, and only within its priority. The reordering is bounded: a request that
was passed over (a request behind it in the queue was placed ahead of it) `max_passes` times goes first
among its priority from then on, so nobody waits more than that many admission rounds because of it.

It reorders the queue's own order only: with several clients, fair sharing (core/fair_share.py)
decides and nothing is reordered.
"""

from __future__ import annotations

from collections.abc import Iterable

from fuselm.core.kv_cache import KVCacheManager
from fuselm.core.request import Request

DEFAULT_MAX_PASSES = 8


class PrefixAdmission:
    def __init__(self, kv: KVCacheManager, max_passes: int = DEFAULT_MAX_PASSES) -> None:
        if max_passes < 0:
            raise ValueError("max_passes must be >= 0")
        self.kv = kv
        self.max_passes = max_passes
        self.passes: dict[int, int] = {}  # seq_id -> times passed over by a reordering, while waiting

    def shared_blocks(self, request: Request, running_hashes: set[int]) -> int:
        """Leading full prompt blocks of `request` that running requests have computed (none for a request
        that takes no prefix-cache hits: it would compute them again)."""
        if not self.kv.takes_prefix_hits(request):
            return 0
        count = 0
        for h in self.kv.prompt_block_hashes(request):
            if h not in running_hashes:
                break
            count += 1
        return count

    def order(self, candidates: Iterable[Request], running: list[Request]) -> list[Request]:
        """`candidates` (in admission order, by priority first) reordered: within each run of equal
        priority, the overdue (passed over max_passes times) first, then those sharing a computed
        prefix with a running request, then the rest, each part in its original order."""
        queue = list(candidates)
        self.passes = {r.seq_id: self.passes[r.seq_id] for r in queue if r.seq_id in self.passes}
        running_hashes: set[int] = set()
        for r in running:  # only prompts computed to the end: a prefix still being computed is not shared yet
            if r.num_computed_tokens >= r.num_prompt_tokens:
                running_hashes.update(r.block_hashes[:r.num_registered_blocks])
        if not running_hashes or len(queue) < 2:
            return queue
        result: list[Request] = []
        start = 0
        while start < len(queue):
            end = start
            while end < len(queue) and queue[end].priority == queue[start].priority:
                end += 1
            run = queue[start:end]
            parts: tuple[list[Request], list[Request], list[Request]] = ([], [], [])  # overdue, sharing, rest
            for r in run:
                if self.passes.get(r.seq_id, 0) >= self.max_passes:
                    parts[0].append(r)
                else:
                    parts[1 if self.shared_blocks(r, running_hashes) else 2].append(r)
            reordered = parts[0] + parts[1] + parts[2]
            position = {id(r): i for i, r in enumerate(run)}
            furthest = -1
            for r in reordered:  # passed over: someone from behind it was placed ahead
                if furthest > position[id(r)]:
                    self.passes[r.seq_id] = self.passes.get(r.seq_id, 0) + 1
                furthest = max(furthest, position[id(r)])
            result += reordered
            start = end
        return result
