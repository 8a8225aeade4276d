"""Expert parallelism: a mixture-of-experts model's experts spread whole over the tensor-parallel ranks.

With `enable_expert_parallel` and tensor_parallel_size=N, attention, the vocabulary and any dense MLP
layer are sharded exactly as tensor parallelism shards them (fuselm/parallel/sharding.py), but each
rank holds whole experts, an equal share of every MoE layer's experts, instead of 1/N of every
expert:

| tensor                                     | a rank holds                                      |
|--------------------------------------------|---------------------------------------------------|
| experts.{e}.* (HF), experts.*_proj (GGUF)  | the experts the placement gives it, whole         |
| router (mlp.gate)                          | all of it (every rank scores every expert)        |
| shared expert gate/up, down                | rows / columns of its slice (tensor-parallel)     |
| shared expert gate (shared_expert_gate)    | all of it                                         |

Tokens go to their experts without moving: after attention's all-reduce every rank holds every
token's hidden state, so each rank routes all tokens, runs its own experts over the (token, slot)
pairs routed to them, adds its slice of the shared expert, and one all-reduce per layer sums the
ranks' partial outputs (layers/moe.py MoEBlock; the plan installs the all-reduce as its `reduce`).
That is the all-gather + reduce-scatter family with the all-gather already done by attention; an
all-to-all dispatch would need tokens split over the ranks first (docs/parallel.md has the
measurements).

Which rank holds which expert: expert e on rank e mod N (round-robin), or an `expert_placement`
JSON file (`fuselm placement`, fuselm/parallel/placement.py) that balances the recorded load. Each
rank holds the same number of experts of each layer.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from fuselm.config import ModelConfig
from fuselm.errors import InvalidConfigError
from fuselm.parallel.sharding import Cut, RankShard, cut_quant, padded_vocab
from fuselm.quant.formats import QuantWeight

PLACEMENT_FORMAT = "fuselm-expert-placement"
_OPTION = "enable_expert_parallel"

_ONE_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.")
_STACKED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate|up|down)_proj\.weight$")
_SHARED_GATE_UP = re.compile(r"\.mlp\.shared_expert\.(gate|up)_proj\.weight$")
_SHARED_DOWN = re.compile(r"\.mlp\.shared_expert\.down_proj\.weight$")


def family(config: ModelConfig):
    """The model class of `config` (an MoE family's class has moe_settings and is_sparse_layer)."""
    from fuselm.models.registry import ARCHITECTURES

    module, cls, _ = ARCHITECTURES[config.architecture]
    return getattr(importlib.import_module(module), cls)


def sparse_layers(config: ModelConfig) -> list[int]:
    cls = family(config)
    if not hasattr(cls, "is_sparse_layer"):
        return []
    return [i for i in range(config.num_hidden_layers) if cls.is_sparse_layer(config, i)]


@dataclass(frozen=True)
class ExpertPlacement:
    """owners[layer][e]: the rank holding expert e of that (model) layer."""

    num_ranks: int
    num_experts: int
    owners: dict[int, list[int]]

    @classmethod
    def round_robin(cls, layers: list[int], num_experts: int, num_ranks: int) -> "ExpertPlacement":
        return cls(num_ranks, num_experts, {i: [e % num_ranks for e in range(num_experts)] for i in layers})

    def held(self, layer: int, rank: int) -> list[int]:
        """The experts `rank` holds in `layer`, ascending (its local order)."""
        return [e for e, r in enumerate(self.owners[layer]) if r == rank]

    def to_json(self) -> dict:
        return {"format": PLACEMENT_FORMAT, "version": 1, "num_ranks": self.num_ranks,
                "num_experts": self.num_experts, "layers": {str(i): o for i, o in sorted(self.owners.items())}}

    @classmethod
    def from_json(cls, data: dict) -> "ExpertPlacement":
        if not isinstance(data, dict) or data.get("format") != PLACEMENT_FORMAT:
            raise ValueError(f"not a {PLACEMENT_FORMAT} file (write one with `fuselm placement`)")
        owners = {int(k): [int(r) for r in v] for k, v in data["layers"].items()}
        return cls(int(data["num_ranks"]), int(data["num_experts"]), owners)

    @classmethod
    def load(cls, path: str | Path) -> "ExpertPlacement":
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InvalidConfigError(f"expert_placement {str(path)!r} cannot be read: {exc}",
                                     option="expert_placement") from None

    def check(self, layers: list[int], num_experts: int, num_ranks: int) -> None:
        """Raise InvalidConfigError unless this places every expert of every MoE layer on one of
        `num_ranks` ranks, each rank holding num_experts / num_ranks of every layer."""
        why = None
        share = num_experts // num_ranks
        if self.num_ranks != num_ranks:
            why = f"it is for {self.num_ranks} ranks, the engine has {num_ranks}"
        elif self.num_experts != num_experts:
            why = f"it is for {self.num_experts} experts per layer, the model has {num_experts}"
        elif sorted(self.owners) != layers:
            why = f"it places layers {sorted(self.owners)}, the model's MoE layers are {layers}"
        else:
            for layer, owners in self.owners.items():
                counts = [owners.count(r) for r in range(num_ranks)]
                if len(owners) != num_experts or counts != [share] * num_ranks:
                    why = (f"layer {layer} gives the ranks {counts} experts; each must hold {share} of the "
                           f"{num_experts}")
                    break
        if why:
            raise InvalidConfigError(f"expert_placement does not fit: {why}", option="expert_placement")


def check_expert_parallel(config: ModelConfig, size: int) -> None:
    """Raise InvalidConfigError when `config` cannot be spread over `size` ranks with expert parallelism."""
    from fuselm.parallel.sharding import is_moe

    heads, kv = config.num_attention_heads, config.num_key_value_heads
    why = None
    if not is_moe(config):
        why = f"{config.architecture} has no experts; leave enable_expert_parallel off for dense models"
    elif heads % size:
        why = f"the model's {heads} query heads do not split evenly over {size} ranks"
    elif kv % size and size % kv:
        why = f"the model's {kv} KV heads neither split over {size} ranks nor divide {size} (for replication)"
    else:
        settings = family(config).moe_settings(config)
        dense = len(sparse_layers(config)) < config.num_hidden_layers
        if settings.num_experts % size:
            why = f"the model's {settings.num_experts} experts per layer do not split evenly over {size} ranks"
        elif settings.shared_intermediate and settings.shared_intermediate % size:
            why = f"the shared expert's width {settings.shared_intermediate} does not split evenly over {size} ranks"
        elif dense and config.intermediate_size % size:
            why = f"the dense MLP's intermediate size {config.intermediate_size} does not split over {size} ranks"
    if why:
        raise InvalidConfigError(f"expert parallelism over {size} ranks: {why}", option=_OPTION)


def expert_rank_config(config: ModelConfig, size: int, rank: int, placement: ExpertPlacement) -> ModelConfig:
    """One rank's config: tensor-parallel attention, vocabulary, dense MLP and shared expert; its experts."""
    kv = config.num_key_value_heads
    layers = sparse_layers(config)
    dense = len(layers) < config.num_hidden_layers
    hf = dict(config.hf_config)
    if hf.get("shared_expert_intermediate_size"):
        hf["shared_expert_intermediate_size"] = hf["shared_expert_intermediate_size"] // size
    held = [placement.held(i, rank) if i in placement.owners else None for i in range(config.num_hidden_layers)]
    return dataclasses.replace(
        config, num_attention_heads=config.num_attention_heads // size,
        num_key_value_heads=kv // size if kv >= size else 1,
        intermediate_size=config.intermediate_size // size if dense else config.intermediate_size,
        vocab_size=padded_vocab(config.vocab_size, size) // size, hf_config=hf, local_experts=held)


class ExpertShard:
    """A rank's place among `size` expert-parallel ranks (TensorShard's counterpart): `bind` it to the
    model's config to cut tensors."""

    def __init__(self, rank: int, size: int, placement_path: str | None = None) -> None:
        self.rank, self.size, self.placement_path = rank, size, placement_path

    def bind(self, config: ModelConfig) -> "ExpertRankShard":
        check_expert_parallel(config, self.size)
        layers = sparse_layers(config)
        num_experts = family(config).moe_settings(config).num_experts
        if self.placement_path is None:
            placement = ExpertPlacement.round_robin(layers, num_experts, self.size)
        else:
            placement = ExpertPlacement.load(self.placement_path)
            placement.check(layers, num_experts, self.size)
        return ExpertRankShard(config, self.rank, self.size, placement)


class ExpertRankShard(RankShard):
    """Cuts HF-named checkpoint tensors to one expert-parallel rank's part; `None` from read/apply: the
    rank holds none of the tensor (another rank's expert), and the loader skips it."""

    def __init__(self, config: ModelConfig, rank: int, size: int, placement: ExpertPlacement) -> None:
        super().__init__(config, rank, size)
        self.placement = placement
        self.local_config = expert_rank_config(config, size, rank, placement)
        shared = config.hf_config.get("shared_expert_intermediate_size") or 0
        part = shared // size
        self.shared = (rank * part, (rank + 1) * part, part)

    def holds(self, name: str) -> bool:
        match = _ONE_EXPERT.match(name)
        return match is None or self.placement.owners[int(match[1])][int(match[2])] == self.rank

    def cut(self, name: str) -> Cut | None:
        if _SHARED_GATE_UP.search(name):
            return Cut(0, *self.shared)
        if _SHARED_DOWN.search(name):
            return Cut(1, *self.shared)
        return super().cut(name)

    def _held_rows(self, name: str) -> list[int] | None:
        match = _STACKED.match(name)
        return None if match is None else self.placement.held(int(match[1]), self.rank)

    def apply(self, name: str, tensor):
        if not self.holds(name):
            return None
        held = self._held_rows(name)
        if held is None:
            return super().apply(name, tensor)
        if isinstance(tensor, QuantWeight):  # E * N rows: expert e's are e * N .. e * N + N - 1
            return _quant_experts(tensor, held, self.placement.num_experts)
        return tensor[torch.tensor(held)].contiguous()  # [E', N, K]

    def read(self, name: str, source) -> torch.Tensor | None:
        if not self.holds(name):
            return None  # never read from the file
        held = self._held_rows(name)
        if held is None:
            return super().read(name, source)
        return torch.cat([source[e:e + 1] for e in held])  # [E', N, K]


def _quant_experts(w: QuantWeight, held: list[int], num_experts: int) -> QuantWeight:
    n = w.out_features // num_experts
    parts = [cut_quant(w, Cut(0, e * n, (e + 1) * n, n), "experts") for e in held]
    cat = lambda ts: None if ts[0] is None else torch.cat(ts)  # noqa: E731
    return QuantWeight(w.bits, w.group_size, (len(held) * n, w.in_features), cat([p.qweight for p in parts]),
                       cat([p.scales for p in parts]), cat([p.mins for p in parts]), w.source)


def install_expert_parallel(model, group) -> int:
    """Give every MoE block that holds a share of the experts the group's all-reduce; returns how many."""
    from fuselm.layers.moe import MoEBlock

    blocks = [m for m in model.modules() if isinstance(m, MoEBlock) and m.local_experts is not None]
    for block in blocks:
        block.reduce = group.all_reduce
    return len(blocks)

