"""The runner's only state across steps: each seeded sequence's random generator.

A request with a seed samples from its own torch.Generator, so its tokens do not depend on what
else shares its batch. The scheduler's output is plain data, so the generators live here, on the
runner's side, keyed by the row's seq_id: created at the sequence's first sampled step (seed +
sample_index, so the n samples of a request differ), kept across preemption, dropped when the
sequence is listed in SchedulerOutput.finished_seq_ids.
"""

from __future__ import annotations

import torch

from fuselm.core.scheduler_output import ScheduledRequest


class SeededGenerators:
    def __init__(self) -> None:
        self._by_seq: dict[int, torch.Generator] = {}

    def __len__(self) -> int:
        return len(self._by_seq)

    def for_row(self, row: ScheduledRequest) -> torch.Generator | None:
        """The row's generator, or None when its request has no seed (it draws from the default RNG)."""
        seed = row.params.seed
        if seed is None:
            return None
        gen = self._by_seq.get(row.seq_id)
        if gen is None:
            gen = self._by_seq[row.seq_id] = torch.Generator().manual_seed(seed + row.sample_index)
        return gen

    def release(self, seq_ids: tuple[int, ...]) -> None:
        for seq_id in seq_ids:
            self._by_seq.pop(seq_id, None)
