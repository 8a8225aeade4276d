"""Large float32 buffers on transparent huge pages, for weights the C kernels stream every step.

A batch-32 decode step of a float32 MoE model streams ~3.2 GB of expert panels (kernels/moe_float.c,
dense_linear.c's few-row pass). On 4 KB pages every 64 lines of a panel stream start a new page:
a TLB miss, and a hardware prefetcher that stops at the page boundary and has to pick the stream up
again. Linux backs an anonymous range with 2 MB pages when asked (`madvise(MADV_HUGEPAGE)`, which
works in the common THP mode "madvise" as well as "always"); torch's allocator asks only when
THP_MEM_ALLOC_ENABLE is set, for the whole process. This asks for the large packed weights alone: they
are written once at load and read every step, so the fewer, larger page faults cost nothing later
(unlike a growing KV pool, where huge pages were tried and cost more system time than they saved:
docs/performance.md, "Tried and not kept").

The same holds for the largest dense weights (an LM head of 32,000 x 1,024 is 131 MB): one thread, loaded
machine, 1 row 3.03-3.05 -> 2.98-3.00 ms, 32 rows 11.9-12.1 -> 11.6 ms. Only buffers from HUGE_MIN_BYTES on
take huge pages: the last one is faulted in whole, up to 2 MB past the end, which is noise against 32 MB
but would add up to half to a model's many 4-7 MB projections. One MoE layer at 32 rows, one thread:
6.08-6.39 -> 6.01-6.03 ms.

Where madvise is missing (not Linux) or refused, the buffer is an ordinary tensor: same results.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import lru_cache

import torch

HUGE_PAGE = 2 * 1024 * 1024
HUGE_MIN_BYTES = 32 * 1024 * 1024
MADV_HUGEPAGE = 14  # linux/mman.h


@lru_cache(maxsize=1)
def libc_madvise():
    """libc's madvise, or None where it cannot be used (not Linux, no libc). Also runner/kv_prefault.py's."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    fn = libc.madvise
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def empty_float32(numel: int) -> torch.Tensor:
    """An uninitialised float32 tensor of `numel` values; from HUGE_MIN_BYTES on, its pages are huge pages where
    the kernel grants them (asked before anything is written, so the first touch faults them in whole)."""
    madvise = libc_madvise()
    if madvise is None or numel * 4 < HUGE_MIN_BYTES:
        return torch.empty(numel, dtype=torch.float32)
    raw = torch.empty(numel * 4 + HUGE_PAGE, dtype=torch.uint8)  # room to start on a 2 MB boundary
    skip = -raw.data_ptr() % HUGE_PAGE
    length = (numel * 4 + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
    if skip + length <= raw.numel():
        madvise(raw.data_ptr() + skip, length, MADV_HUGEPAGE)  # advice only: a refusal leaves 4 KB pages
    return raw[skip:skip + numel * 4].view(torch.float32)  # a view keeps `raw` alive
