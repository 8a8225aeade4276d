"""Admission waits for a prefix another request is computing, instead of computing it a second time.

Requests sharing a long prefix (a system prompt, a document) often arrive together, while none of it is
cached yet. The first one admitted computes the prefix in chunks of the step's token budget; each chunk's
full blocks reach the prefix cache only when its step ends. A second request admitted meanwhile takes
the blocks cached so far and computes the rest of the prefix itself, into blocks of its own: the same
tokens computed twice, and two copies that shared-prefix attention (layers/cascade.py) cannot read as
one. So a waiting request whose next uncached prompt block is one a running request is computing right
now (the same chained block hash: the same tokens after the same prefix) is passed over until that
block is cached; it is admitted with the whole prefix as a cache hit a few steps later. The wait is
bounded by the running request's prompt, other waiting requests are admitted meanwhile, and requests
admitted in the same step count as running: with a large token budget, requests arriving together with
one long prefix do not all compute it side by side.
"""

from __future__ import annotations

from fuselm.core.kv_cache import KVCacheManager
from fuselm.core.request import Request

# A short shared part (a chat template's first block) is cheaper to compute again than to delay a
# request's first token by a step or more: only a prefix of at least this many blocks in flight is waited for.
MIN_WAIT_BLOCKS = 8


def blocks_in_flight(running: list[Request]) -> set[int]:
    """Hashes of the prompt blocks running requests still have to compute (not yet in the prefix cache)."""
    hashes: set[int] = set()
    for r in running:
        if r.num_computed_tokens < r.num_prompt_tokens:
            hashes.update(r.block_hashes[r.num_registered_blocks:])
    return hashes


def waits_for_prefix(kv: KVCacheManager, request: Request, in_flight: set[int]) -> bool:
    """Whether `request`'s first prompt blocks past those in the prefix cache are at least MIN_WAIT_BLOCKS
    blocks that running requests are computing now (looked up without counting as cache lookups)."""
    if not in_flight or request.num_computed_tokens or not kv.takes_prefix_hits(request):
        return False
    hashes = kv.prompt_block_hashes(request)
    cached = 0
    while cached < len(hashes) and kv.pool.lookup(hashes[cached]) is not None:
        cached += 1
    following = hashes[cached:cached + MIN_WAIT_BLOCKS]
    return len(following) == MIN_WAIT_BLOCKS and all(h in in_flight for h in following)
