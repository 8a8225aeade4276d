"""The tensor-parallel layers: collectives wrapped around the methods the execution plan chose.

Each rank's model is built from its shard's config (fuselm/parallel/sharding.py), so q/k/v and
gate/up are already column-parallel: a rank computes its own heads and its own MLP slice with no
communication. What needs the other ranks is wrapped here, after the plan picked the inner methods
(so the plan line reads e.g. `o/down=tp-row(fuselm-fp32-gemm)`):

- `RowParallelLinear` (o, down): the inner method multiplies the rank's input columns, the partial
  outputs are summed over the ranks (one all-reduce), and a bias is added once, after the sum;
- `VocabParallelEmbedding`: each rank looks up the ids in its vocabulary slice, zeroes the others'
  rows, and the all-reduce assembles every row;
- `VocabParallelLMHead`: each rank's logits over its slice are gathered to rank 0 and trimmed to
  the real vocabulary (the padding rows); only rank 0 samples, the others get [S, 0] back.
"""

from __future__ import annotations

import torch
from torch import nn

from fuselm.layers.linear import LinearMethod
from fuselm.parallel.group import TensorParallelGroup

ROW_PARALLEL_ROLES = ("o", "down")
# an expert-parallel MoE block's projections: the block sums its partial output once, after the shared
# expert's slice is added (fuselm/parallel/expert_parallel.py)
EXPERT_PARALLEL_ROLES = ("router", "experts", "shared_gate_up", "shared_down", "shared_gate")


class RowParallelLinear(LinearMethod):
    def __init__(self, inner: LinearMethod, group: TensorParallelGroup) -> None:
        super().__init__()
        self.inner = inner
        self.group = group
        self.in_features, self.out_features = inner.in_features, inner.out_features
        self.bias = inner.bias  # added after the sum, once
        inner.bias = None
        self.kind = f"tp-row({inner.kind})"

    def weight_tensors(self) -> list[torch.Tensor]:
        return self.inner.weight_tensors() + ([self.bias] if self.bias is not None else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.group.all_reduce(self.inner(x).contiguous())  # [T, out]: the ranks' partial sums added
        return y if self.bias is None else y + self.bias.to(y.dtype)


class VocabParallelLMHead(LinearMethod):
    def __init__(self, inner: LinearMethod, group: TensorParallelGroup) -> None:
        super().__init__()
        self.inner = inner
        self.group = group
        self.in_features = inner.in_features
        self.out_features = group.vocab_size
        self.bias = None
        self.kind = f"tp-vocab({inner.kind})"

    def weight_tensors(self) -> list[torch.Tensor]:
        return self.inner.weight_tensors()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.inner(x)  # [S, padded vocab / N]
        logits = self.group.gather_columns(local)  # rank 0: [S, padded vocab]; others: None
        return local[:, :0] if logits is None else logits[:, :self.group.vocab_size]


class VocabParallelEmbedding(nn.Module):
    """An embedding table (nn.Embedding or QuantEmbedding) holding rows [start, start + rows) of the vocabulary."""

    def __init__(self, inner: nn.Module, group: TensorParallelGroup, rows: int) -> None:
        super().__init__()
        self.inner = inner
        self.group = group
        self.start, self.rows = group.rank * rows, rows

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start  # [T]
        mine = (local >= 0) & (local < self.rows)  # [T]
        x = self.inner(torch.where(mine, local, 0))  # [T, hidden]
        x = x * mine.unsqueeze(-1).to(x.dtype)  # rows other ranks own: zero
        return self.group.all_reduce(x.contiguous())


def wrap_linear(module: LinearMethod, role: str, group: TensorParallelGroup) -> LinearMethod:
    """The method for `role` under tensor parallelism (column-parallel roles need no wrapper)."""
    if role in ROW_PARALLEL_ROLES:
        return RowParallelLinear(module, group)
    if role == "lm_head":
        return VocabParallelLMHead(module, group)
    if role in ("qkv", "gate_up") or role in EXPERT_PARALLEL_ROLES:
        return module
    raise ValueError(f"tensor parallelism does not know how to split a {role!r} projection")


def wrap_embedding(model: nn.Module, group: TensorParallelGroup) -> None:
    model.embed_tokens = VocabParallelEmbedding(model.embed_tokens, group, model.config.vocab_size)
