"""Which part of each weight a tensor-parallel rank holds (Megatron-style), cut as the file is read.

A rank's shard is the model of a smaller config (`rank_model_config`): its whole query heads
(num_attention_heads / N), the KV heads those use (num_key_value_heads / N, or the one KV head its
query heads share when there are fewer KV heads than ranks: KV heads are then replicated), its
slice of the MLP (intermediate_size / N) and of the vocabulary (padded up to a multiple of N, the
padding rows zero). The model classes build that config unchanged; the execution plan then wraps
o, down, the embedding and the LM head with the collectives (fuselm/parallel/layers.py).

`TensorShard(rank, size).bind(config)` gives the loaders a `RankShard`, which cuts each HF-named
checkpoint tensor as it is read (safetensors slices, or a GGUF tensor straight after it is read from
the memory map), so no rank ever holds the whole model:

| tensor                         | cut                                              |
|--------------------------------|--------------------------------------------------|
| q_proj weight/bias             | rows of the rank's query heads                   |
| k_proj, v_proj weight/bias     | rows of its KV heads                             |
| o_proj weight                  | columns of its query heads (row-parallel)        |
| gate_proj, up_proj weight      | rows of its intermediate slice                   |
| down_proj weight               | columns of its intermediate slice (row-parallel) |
| embed_tokens, lm_head weight   | rows of its vocabulary slice, zero-padded        |
| norms, q/k norms               | replicated                                       |

Quantised weights (QuantWeight: GGUF's kept formats) are cut the same way: rows freely, columns
only on quantisation-group boundaries (checked; an int4 byte holds weights j and j + 16 of a
32-weight run, so a group boundary is a byte boundary).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

from fuselm.config import ModelConfig
from fuselm.errors import InvalidConfigError
from fuselm.quant.formats import QuantWeight

_OPTION = "tensor_parallel_size"


@dataclass(frozen=True, slots=True)
class Cut:
    """Keep [start, stop) along `dim`, then zero-pad to `size` along it."""

    dim: int
    start: int
    stop: int
    size: int


def padded_vocab(vocab_size: int, tp: int) -> int:
    return -(-vocab_size // tp) * tp


def is_moe(config: ModelConfig) -> bool:
    hf = config.hf_config
    return bool(hf.get("num_local_experts") or hf.get("num_experts"))


def check_shardable(config: ModelConfig, tp: int) -> None:
    """Raise InvalidConfigError (option tensor_parallel_size) when `config` cannot be split over `tp` ranks."""
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    why = None
    if is_moe(config):
        why = (f"{config.architecture} is a mixture-of-experts model; tensor parallelism shards dense models "
               "(Llama, Mistral, Qwen2, Qwen3, Gemma 3) only: add enable_expert_parallel to spread its experts")
    elif heads % tp:
        why = f"the model's {heads} query heads do not split evenly over {tp} ranks"
    elif kv % tp and tp % kv:
        why = f"the model's {kv} KV heads neither split over {tp} ranks nor divide {tp} (for replication)"
    elif config.intermediate_size % tp:
        why = f"the MLP's intermediate size {config.intermediate_size} does not split evenly over {tp} ranks"
    if why:
        raise InvalidConfigError(f"tensor_parallel_size={tp}: {why}", option=_OPTION)


def rank_model_config(config: ModelConfig, tp: int) -> ModelConfig:
    """The config of one rank's shard (every rank's is the same shape)."""
    kv = config.num_key_value_heads
    return dataclasses.replace(
        config, num_attention_heads=config.num_attention_heads // tp,
        num_key_value_heads=kv // tp if kv >= tp else 1, intermediate_size=config.intermediate_size // tp,
        vocab_size=padded_vocab(config.vocab_size, tp) // tp)


class TensorShard:
    """A rank's place among `size` ranks; `bind` it to the model's config to cut tensors.

    `quantization`/`group_size`: the engine's round-to-nearest options, checked against the cut."""

    def __init__(self, rank: int, size: int, quantization: str | None = None, group_size: int | None = None) -> None:
        self.rank, self.size = rank, size
        self.quantization, self.group_size = quantization, group_size

    @classmethod
    def of(cls, engine_config, rank: int):
        """Rank `rank`'s shard for the engine's options (an ExpertShard with enable_expert_parallel)."""
        if getattr(engine_config, "enable_expert_parallel", False):
            from fuselm.parallel.expert_parallel import ExpertShard

            return ExpertShard(rank, engine_config.tensor_parallel_size, engine_config.expert_placement)
        return cls(rank, engine_config.tensor_parallel_size, engine_config.quantization,
                   engine_config.quantization_group_size)

    def bind(self, config: ModelConfig) -> "RankShard":
        check_shardable(config, self.size)
        if self.quantization in ("int8", "int4"):
            check_rtn_groups(config, self.size, self.quantization, self.group_size)
        return RankShard(config, self.rank, self.size)


_Q = re.compile(r"\.self_attn\.q_proj\.(weight|bias)$")
_KV = re.compile(r"\.self_attn\.[kv]_proj\.(weight|bias)$")
_O = re.compile(r"\.self_attn\.o_proj\.weight$")
_GATE_UP = re.compile(r"\.mlp\.(gate|up)_proj\.weight$")
_DOWN = re.compile(r"\.mlp\.down_proj\.weight$")
_VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


class RankShard:
    """Cuts HF-named checkpoint tensors to one rank's shard."""

    def __init__(self, config: ModelConfig, rank: int, size: int) -> None:
        self.config, self.rank, self.size = config, rank, size
        self.local_config = local = rank_model_config(config, size)
        d = config.head_dim
        q = local.num_attention_heads
        self.q_rows = (rank * q * d, (rank + 1) * q * d)
        kv = config.num_key_value_heads
        if kv >= size:
            first_kv = rank * local.num_key_value_heads
        else:  # fewer KV heads than ranks: the one KV head this rank's query heads attend with
            first_kv = rank * q // (config.num_attention_heads // kv)
        self.kv_rows = (first_kv * d, (first_kv + local.num_key_value_heads) * d)
        inter = local.intermediate_size
        self.inter = (rank * inter, (rank + 1) * inter)
        vocab = local.vocab_size
        self.vocab = (rank * vocab, min((rank + 1) * vocab, config.vocab_size), vocab)

    def cut(self, name: str) -> Cut | None:
        """How `name` is cut for this rank; None: every rank holds all of it."""
        if _Q.search(name):
            return Cut(0, *self.q_rows, self.q_rows[1] - self.q_rows[0])
        if _KV.search(name):
            return Cut(0, *self.kv_rows, self.kv_rows[1] - self.kv_rows[0])
        if _O.search(name):
            return Cut(1, *self.q_rows, self.q_rows[1] - self.q_rows[0])
        if _GATE_UP.search(name):
            return Cut(0, *self.inter, self.inter[1] - self.inter[0])
        if _DOWN.search(name):
            return Cut(1, *self.inter, self.inter[1] - self.inter[0])
        if name in _VOCAB:
            start, stop, size = self.vocab
            return Cut(0, start, max(start, stop), size)
        return None

    def apply(self, name: str, tensor):
        """The rank's part of a whole tensor (float, or QuantWeight); a copy, so the whole can be freed."""
        cut = self.cut(name)
        if cut is None:
            return tensor
        if isinstance(tensor, QuantWeight):
            return cut_quant(tensor, cut, name)
        return _pad(tensor.narrow(cut.dim, cut.start, cut.stop - cut.start).clone(), cut)

    def read(self, name: str, source) -> torch.Tensor:
        """The rank's part of a safetensors slice (`safe_open(...).get_slice(name)`): only that part is read."""
        cut = self.cut(name)
        if cut is None:
            return source[:]
        index = (slice(cut.start, cut.stop),) if cut.dim == 0 else (slice(None), slice(cut.start, cut.stop))
        return _pad(source[index], cut)


def _pad(t: torch.Tensor, cut: Cut) -> torch.Tensor:
    missing = cut.size - t.shape[cut.dim]
    if missing <= 0:
        return t.contiguous()
    shape = list(t.shape)
    shape[cut.dim] = missing
    return torch.cat([t, t.new_zeros(shape)], dim=cut.dim)


def cut_quant(w: QuantWeight, cut: Cut, name: str) -> QuantWeight:
    """A QuantWeight's rows [start, stop) (zero rows padded: they dequantise to 0), or its columns
    [start, stop), which must fall on quantisation-group boundaries."""
    if cut.dim == 0:
        rows = slice(cut.start, cut.stop)
        take = lambda t: None if t is None else _pad(t[rows].clone(), Cut(0, cut.start, cut.stop, cut.size))  # noqa: E731
        return QuantWeight(w.bits, w.group_size, (cut.size, w.in_features), take(w.qweight), take(w.scales),
                           take(w.mins), w.source)
    g = w.group_size
    if cut.start % g or cut.stop % g:
        raise InvalidConfigError(
            f"tensor parallelism cuts {name}'s {w.in_features} input columns at {cut.start}:{cut.stop}, which is not "
            f"on its quantisation groups of {g}; use a tensor_parallel_size whose slices hold whole groups",
            option=_OPTION)
    per_byte = 2 if w.bits == 4 else 1
    q = w.qweight[:, cut.start // per_byte:cut.stop // per_byte].clone()
    groups = slice(cut.start // g, cut.stop // g)
    mins = None if w.mins is None else w.mins[:, groups].clone()
    return QuantWeight(w.bits, g, (w.out_features, cut.stop - cut.start), q, w.scales[:, groups].clone(), mins,
                       w.source)


def check_rtn_groups(config: ModelConfig, tp: int, method: str, group_size: int | None) -> None:
    """Round-to-nearest quantisation at load picks a group size per layer width; a rank's narrower
    o/down must get the one the whole layer gets, or TP would quantise differently from one process."""
    from fuselm.quant.formats import fit_group_size

    widths = {"o_proj": config.num_attention_heads * config.head_dim, "down_proj": config.intermediate_size}
    for proj, width in widths.items():
        try:
            whole, part = fit_group_size(method, group_size, width), fit_group_size(method, group_size, width // tp)
        except ValueError:
            whole, part = 0, -1
        if whole != part:  # int8 per output channel (-1) always differs: a rank's scale would see half the row
            raise InvalidConfigError(
                f"tensor_parallel_size={tp}: {proj}'s {width} input columns split into {width // tp} per rank, which "
                f"{method} quantisation groups of the whole layer do not fit; choose another quantization_group_size "
                "or tensor_parallel_size", option=_OPTION)
