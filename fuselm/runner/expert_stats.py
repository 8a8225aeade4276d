"""Routing statistics of a mixture-of-experts model: how many tokens each expert receives, per layer.

Placing experts over ranks so that no rank is the straggler (`fuselm placement`,
fuselm/parallel/placement.py) needs the load each expert actually gets, and, to keep tokens on one
rank from one layer to the next, which experts a token goes to in consecutive MoE layers. The
runner of the driver (rank 0 under tensor/expert parallelism; every rank routes every token, so one
is enough) gives each MoE block a recorder, called with the step's expert ids [T, k]:

- `load[p, e]`: (token, slot) assignments to expert e in the p-th MoE layer, summed over steps;
- `co_occurrence[p, a, b]`: pairs (a token's slot in MoE layer p on expert a, its slot in MoE layer
  p + 1 on expert b); a row sums to k times load[p, a].

Each record adds ones at the ids' positions of the running totals on the device the model runs on
(`index_add_`): no copy to the host, no synchronisation per step, and no table-sized temporary (a bincount
with minlength E * E per layer pair allocated, zeroed and added 61,440 counts a step for 16 layers of 64
experts, whatever the batch). Every token the forward computes counts (prompt chunks,
decodes, recomputation after preemption; prefix-cache hits are not computed, so not counted): that
is the work the experts do. `to_json` is the file `fuselm placement --stats` reads.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import torch

STATS_FORMAT = "fuselm-expert-stats"


def _count(totals: torch.Tensor, index: torch.Tensor) -> None:
    """totals.view(-1)[i] += 1 for each i in index (repeats counted)."""
    totals.view(-1).index_add_(0, index, torch.ones_like(index))


class ExpertStats:
    def __init__(self, layers: list[int], num_experts: int, top_k: int, device: torch.device) -> None:
        self.layers, self.num_experts, self.top_k = list(layers), num_experts, top_k
        e = num_experts
        self.load = torch.zeros(len(layers), e, dtype=torch.long, device=device)  # [L, E]
        self.co_occurrence = torch.zeros(max(len(layers) - 1, 0), e, e, dtype=torch.long, device=device)  # [L-1, E, E]
        self.steps = 0
        self.tokens = 0
        self._previous: torch.Tensor | None = None  # the last MoE layer's ids of this forward
        self._lock = threading.Lock()  # a reader (the server's /metrics) copies a consistent total

    @classmethod
    def attach(cls, model) -> "ExpertStats | None":
        """Give every MoE block of `model` a recorder; None when the model has no experts."""
        from fuselm.layers.moe import MoEBlock

        blocks = [(i, layer.mlp) for i, layer in enumerate(getattr(model, "layers", ()))
                  if isinstance(getattr(layer, "mlp", None), MoEBlock)]
        if not blocks:
            return None
        first = blocks[0][1]
        stats = cls([i for i, _ in blocks], first.num_experts, first.top_k, model.norm.weight.device)
        for position, (_, block) in enumerate(blocks):
            block.recorder = LayerRecorder(stats, position)
        return stats

    def record(self, position: int, ids: torch.Tensor) -> None:
        """The expert ids [T, k] the `position`-th MoE layer chose this step."""
        e = self.num_experts
        flat = ids.reshape(-1) + position * e  # into load.view(-1)
        joint = None
        previous = self._previous
        if position > 0 and previous is not None and previous.shape[0] == ids.shape[0]:
            # [T, k, k]: (expert before, expert now), into co_occurrence.view(-1)
            joint = (previous.unsqueeze(2) * e + ids.unsqueeze(1) + (position - 1) * e * e).reshape(-1)
        with self._lock:
            _count(self.load, flat)
            if joint is not None:
                _count(self.co_occurrence, joint)
            if position == 0:
                self.steps += 1
                self.tokens += ids.shape[0]
        self._previous = ids if position + 1 < len(self.layers) else None

    def record_all(self, ids: torch.Tensor) -> None:
        """Every MoE layer's ids of one forward at once, [layers, T, k]: what `record` gives called for each layer in
        order, in two index additions instead of two per layer (the one-call C layer step returns all layers' ids
        together; at batch 1 the per-layer calls cost more than a tenth of a millisecond a token)."""
        num_layers, tokens = ids.shape[0], ids.shape[1]
        if num_layers != len(self.layers):
            raise ValueError(f"ids of {num_layers} MoE layers, the model has {len(self.layers)}")
        e = self.num_experts
        layer_of = torch.arange(num_layers, device=ids.device).view(-1, 1, 1)
        flat = (ids + layer_of * e).reshape(-1)
        joint = None
        if num_layers > 1:  # [L-1, T, k, k]: (expert in layer p, expert in layer p + 1) of each token
            joint = (ids[:-1].unsqueeze(3) * e + ids[1:].unsqueeze(2) + layer_of[:-1].unsqueeze(3) * e * e).reshape(-1)
        with self._lock:
            _count(self.load, flat)
            if joint is not None:
                _count(self.co_occurrence, joint)
            self.steps += 1
            self.tokens += tokens
        self._previous = None

    def reset(self) -> None:
        with self._lock:
            self.load.zero_()
            self.co_occurrence.zero_()
            self.steps = self.tokens = 0

    def load_counts(self) -> list[list[int]]:
        """load as lists, [MoE layer][expert]."""
        with self._lock:
            return self.load.tolist()

    def load_imbalance(self) -> list[float]:
        """Per MoE layer: the most loaded expert's tokens over the mean (1.0 = perfectly even)."""
        return [max(row) * len(row) / sum(row) if sum(row) else 1.0 for row in self.load_counts()]

    def to_json(self, model: str | None = None) -> dict:
        with self._lock:
            load, co = self.load.tolist(), self.co_occurrence.tolist()
            steps, tokens = self.steps, self.tokens
        return {"format": STATS_FORMAT, "version": 1, "model": model, "num_experts": self.num_experts,
                "top_k": self.top_k, "steps": steps, "tokens": tokens, "layers": self.layers, "load": load,
                "co_occurrence": co}

    def dump(self, path: str | Path, model: str | None = None) -> dict:
        data = self.to_json(model)
        Path(path).write_text(json.dumps(data))
        return data


class LayerRecorder:
    """An MoE block's recorder: its ids go to `stats` as the `position`-th MoE layer's."""

    def __init__(self, stats: ExpertStats, position: int) -> None:
        self.stats, self.position = stats, position

    def __call__(self, ids: torch.Tensor) -> None:
        self.stats.record(self.position, ids)
