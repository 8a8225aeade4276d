"""The MoE blocks of a model in the C layer step: what decode_layers.c needs to run a Mixtral-style
layer's feed-forward (router, top-k routing, grouped experts, a Qwen2-MoE shared expert: moe.c
`fuselm_moe_block`) without returning to Python, and the routing statistics it hands back.

A `QMoe` per MoE layer points at the router's packed or quantised weight and at the experts' weights
that `GroupedExperts` already prepared for kernels/moe.c. Each call writes the experts every row chose
into a buffer kept here; after the call those ids go to the blocks' recorders (the runner's routing
statistics, fuselm/runner/expert_stats.py), exactly as the torch layers would have passed them.
"""

from __future__ import annotations

import ctypes

import torch

from fuselm.kernels.abi import QMoe, QProj
from fuselm.layers.moe import MoEBlock


def unsupported_reason(block: MoEBlock) -> str | None:
    """Why the C layer step cannot run this MoE block (None when it can)."""
    if block.experts._c_parts is None:
        return "its experts run on the torch path"
    if block.local_experts is not None or block.reduce is not None:
        return "it holds only some experts (expert parallelism)"
    return None


class MoELayers:
    """The QMoe structures of a model's MoE layers (by layer index) and their routed-id buffer."""

    def __init__(self, model, router_proj) -> None:
        """`router_proj`: c_layers' LinearMethod -> QProj converter."""
        self.blocks = {i: layer.mlp for i, layer in enumerate(model.layers) if isinstance(layer.mlp, MoEBlock)}
        self.position = {i: p for p, i in enumerate(self.blocks)}  # layer index -> index among MoE layers
        self.structs: dict[int, QMoe] = {}
        self._shared: list[QProj] = []  # the shared experts' projections, which the QMoe structures point at
        for i, block in self.blocks.items():
            gate, up, down = block.experts._c_parts
            struct = QMoe(router_proj(block.gate), gate, up, down, block.experts.num_experts, block.top_k,
                          int(block.renormalize), 0, None)
            if (shared := block.shared_expert) is not None:  # Qwen2-MoE: gated MLP every row takes, sigmoid-scaled
                projs = [router_proj(m) for m in (shared.gate_up_proj, shared.down_proj, shared.expert_gate)]
                self._shared.extend(projs)
                struct.shared_gate_up, struct.shared_down, struct.shared_gate = (
                    ctypes.addressof(p) for p in projs)
                struct.shared_intermediate = shared.intermediate
            self.structs[i] = struct
        self.top_k = max((b.top_k for b in self.blocks.values()), default=1)
        self._routed = torch.empty((len(self.blocks), 0, self.top_k), dtype=torch.int64)  # [MoE layers, rows, k]
        self._recorders, self._stats = None, None  # the blocks' recorders, and their one ExpertStats if they share it

    def pointer(self, layer: int):
        """The QMoe pointer for QLayer.moe (None: a dense layer)."""
        struct = self.structs.get(layer)
        return None if struct is None else ctypes.pointer(struct)

    def prepare(self, rows: int) -> None:
        """Room for `rows` rows of routed ids in every MoE layer's buffer."""
        if self._routed.shape[1] < rows:
            self._routed = torch.empty((len(self.blocks), max(rows, 32), self.top_k), dtype=torch.int64)
            for i, struct in self.structs.items():
                struct.routed_ids = self._routed[self.position[i]].data_ptr()

    def record(self, rows: int, layer: int | None = None) -> None:
        """Hand the ids the last call chose to the recorders: every MoE layer's, or only `layer`'s."""
        if layer is None and self._record_all(rows):
            return
        for i in self.blocks if layer is None else [layer] if layer in self.blocks else []:
            block = self.blocks[i]
            if block.recorder is not None:
                block.recorder(self._routed[self.position[i], :rows, :block.top_k])

    def _record_all(self, rows: int) -> bool:
        """Every layer's ids in one call of the routing statistics, where all blocks record into one ExpertStats in
        the buffer's layer order and with one top_k; False where they do not (then each recorder is called)."""
        recorders = tuple(self.blocks[i].recorder for i in self.blocks)
        if recorders != self._recorders:  # what they are is checked once, not every step
            self._recorders, self._stats = recorders, self._one_stats(recorders)
        if self._stats is None:
            return False
        self._stats.record_all(self._routed[:, :rows])
        return True

    def _one_stats(self, recorders: tuple):
        from fuselm.runner.expert_stats import LayerRecorder

        if not recorders or not all(isinstance(r, LayerRecorder) for r in recorders):
            return None
        stats = recorders[0].stats
        if (any(r.stats is not stats or r.position != self.position[i] for r, i in zip(recorders, self.blocks))
                or len(recorders) != len(stats.layers) or any(b.top_k != self.top_k for b in self.blocks.values())):
            return None
        return stats
