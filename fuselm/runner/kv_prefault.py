"""The KV pool's pages, faulted in by the chunk just before a step first writes them.

The pool is one large uninitialised tensor per layer and K/V (5.5 GiB for SmolLM2-135M in float32 by
default), so the kernel maps its pages on first write: inside the step's K/V writes and the C decode
step, one 4 KB page fault at a time, while the other thread waits at the parallel region's barrier.
A 128-request float32 chat run on a Zen 3 guest took ~650,000 such faults (every KV token's 46 KB
written for the first time) and 3.1-4.4 s of system time. Mapping the whole pool at start costs 6-11 s
there (and gained 1% on a Zen 4 guest: docs/performance.md), most of it for blocks a run never reaches.

So the runner asks for the pages of each block just before a step first uses it, a chunk of blocks at
a time (`madvise(MADV_POPULATE_WRITE)`, Linux 5.14+: one call maps a range, without a fault per page).
It leans on the block pool's order (core/kv_cache.py): never-used blocks are handed out in increasing id
order before any freed block is reused, so the blocks at or below a high-water mark are mapped and a
step only has to look at its rows' last block ids. What this misses (a block written outside a step)
is faulted in on first write as before; results never depend on it. Measured on that Zen 3
(benchmarks/kv_prefault.py, 16 x 16 chat requests, each batch on both engines in turn): system time
22.0 -> 11.6 s, wall 1.045x in all (batches 0.86-1.67x, median 1.015x); an earlier run 1.011x.
"""

from __future__ import annotations

import ctypes
import logging

import torch

from fuselm.kernels.huge_pages import libc_madvise

logger = logging.getLogger("fuselm")

MADV_POPULATE_WRITE = 23  # linux/mman.h, Linux 5.14+
PAGE = 4096
CHUNK_BYTES = 64 * 2**20  # per call of cover() that crosses the mark: ~25-75 ms of page mapping on a Zen 3 guest


def populate(tensor: torch.Tensor, start: int, end: int) -> bool:
    """Map the pages under elements [start, end) of a contiguous CPU tensor's first dimension for writing,
    without changing their contents. False where the kernel refuses (older than 5.14, or not Linux)."""
    madvise = libc_madvise()
    if madvise is None or end <= start:
        return madvise is not None
    row = tensor.stride(0) * tensor.element_size()
    lo = tensor.data_ptr() + start * row
    hi = tensor.data_ptr() + end * row
    lo -= lo % PAGE  # the pages holding the range: mapped, since the tensor's bytes are
    hi += -hi % PAGE
    if madvise(lo, hi - lo, MADV_POPULATE_WRITE) != 0:
        logger.debug("MADV_POPULATE_WRITE refused (errno %d): the KV pool is faulted in on first write",
                     ctypes.get_errno())
        return False
    return True


class KVPrefault:
    """Maps the KV pool's blocks up to a high-water mark, a chunk of blocks at a time."""

    def __init__(self, tensors: list[torch.Tensor], num_blocks: int) -> None:
        self.tensors = [t for t in tensors if t.device.type == "cpu" and t.is_contiguous()]
        self.num_blocks = num_blocks
        block_bytes = sum(t.stride(0) * t.element_size() for t in self.tensors) or 1
        self.chunk_blocks = max(1, CHUNK_BYTES // block_bytes)
        self.mapped = 0  # blocks [0, mapped) are mapped
        self.enabled = bool(self.tensors) and libc_madvise() is not None
        self.calls = 0

    def cover(self, last_block: int) -> None:
        """Make sure blocks [0, last_block] are mapped (in whole chunks)."""
        last_block = min(last_block, self.num_blocks - 1)
        if not self.enabled or last_block < self.mapped:
            return
        end = min(self.num_blocks, (last_block // self.chunk_blocks + 1) * self.chunk_blocks)
        for t in self.tensors:
            if not populate(t, self.mapped, end):
                self.enabled = False
                return
        self.calls += 1
        self.mapped = end

    def cover_step(self, scheduled) -> None:
        """Cover the blocks a step's rows may write: each row's (and each KV group's) last block id."""
        if not self.enabled or self.mapped >= self.num_blocks:  # nothing left to map: no scan of the rows
            return
        last = -1
        for r in scheduled:
            if r.block_ids and r.block_ids[-1] > last:
                last = r.block_ids[-1]
            for table in r.group_block_ids:
                if table and table[-1] > last:
                    last = table[-1]
        self.cover(last)
