"""Which cores each tensor-parallel rank on one machine runs on.

Ranks on one machine split its available cores into equal, disjoint slices (rank i on that machine
takes slice i) and each sets torch's threads to its slice (or to num_threads when given), so the
ranks' OpenMP teams do not fight over cores. With more ranks than cores nobody is pinned.
Pinning applies to the calling thread and the threads it starts afterwards (OpenMP's included);
`restore` undoes it for the thread that pinned.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import torch


def core_slices(local_world: int) -> list[list[int]] | None:
    """The cores of each of `local_world` ranks on this machine, from this process's affinity; None when
    there are fewer cores than ranks."""
    cores = sorted(os.sched_getaffinity(0))
    per = len(cores) // local_world
    if per < 1:
        return None
    return [cores[i * per:(i + 1) * per] for i in range(local_world)]


@dataclass
class Pinning:
    thread_id: int
    previous_cores: set[int]
    previous_threads: int

    def restore(self) -> None:
        try:
            os.sched_setaffinity(self.thread_id, self.previous_cores)
        except OSError:  # the thread is gone
            pass
        torch.set_num_threads(self.previous_threads)


def pin(cores: list[int] | None, num_threads: int | None) -> Pinning:
    """Run the calling thread (and what it starts) on `cores` with `num_threads` (default: one per core)."""
    pinning = Pinning(threading.get_native_id(), os.sched_getaffinity(0), torch.get_num_threads())
    if cores:
        os.sched_setaffinity(0, cores)
    threads = num_threads or (len(cores) if cores else None)
    if threads:
        torch.set_num_threads(threads)
    return pinning
