"""Keep the memory of freed per-step tensors in the process instead of handing it back to the OS.

A step allocates and frees tensors of a few to tens of MB (activations of a prompt chunk, the LM
head's logits). glibc serves those above its mmap threshold (128 KB, raised as far as 32 MB as
large blocks are freed) with fresh mappings and trims the top of its heap when freed, so each step
faulted the same memory in again, the kernel zeroing every page. Raising the mmap threshold and the trim threshold (mallopt) lets the
heap keep that memory between steps. Allocations above the threshold (the weights, the KV pool)
are still mapped and returned when freed.

Measured on a 2-vCPU Zen 4 EPYC, float32 SmolLM2-135M, `fuselm bench throughput --workload chat
--num-requests 256`: 1.51-1.54M minor faults a run without, 1.30-1.32M with; docs/performance.md has
the throughput (within the machine's noise). Set FUSELM_KEEP_FREED_MEMORY=0 to leave glibc's defaults (or set MALLOC_* yourself:
the engine then leaves them alone).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 256 * 2**20  # allocations above this are mapped (and unmapped when freed) as before
TRIM_THRESHOLD_BYTES = 512 * 2**20  # free memory the heap's top may keep before it is returned

_done = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process, once. Returns whether they are set: False off
    Linux/glibc, where FUSELM_KEEP_FREED_MEMORY=0, or where the environment sets MALLOC_MMAP_THRESHOLD_ or
    MALLOC_TRIM_THRESHOLD_ (a user's own choice)."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("FUSELM_KEEP_FREED_MEMORY", "1") == "0":
        return False
    if any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)):
        logger.debug("mallopt refused the heap thresholds; glibc's defaults stay")
        return False
    _done = True
    return True
