"""fuselm's C kernels for CPU (paged decode attention, RMSNorm, quantised and packed float32
linear layers, whole decoder layers), loaded through ctypes.

Eager torch has no attention that reads a paged KV cache in place, and at decode batch sizes its
per-op overhead dwarfs the arithmetic of a small model's layer; these kernels (fuselm/kernels/*.c,
interface in fuselm_kernels.h) replace those paths. `get_kernels()` compiles them with the system
C compiler the first time they are needed (a few seconds; fuselm/kernels/build.py), for the best
ISA variant this CPU supports (generic, avx2, avx512, avx512bf16; FUSELM_CPU_ISA forces one), and
keeps the library in a cache under ~/.cache/fuselm keyed by its target, so a cache shared between
machines never hands one a binary built for another CPU. The loaded library must report the ABI
version and structure layout fuselm/kernels/abi.py mirrors. If no compiler is present, the build
fails, the ABI version differs, or FUSELM_CPU_KERNELS=0, `get_kernels()` returns None and the
torch path is used.

The .so links libgomp by its soname, so inside a process that imported torch it shares torch's
OpenMP runtime and thread pool.
"""

from __future__ import annotations

import ctypes
import logging
import os
from functools import lru_cache
from pathlib import Path

import torch

from fuselm.kernels import abi, build
from fuselm.kernels.abi import DTYPE_CODES
from fuselm.kernels.huge_pages import empty_float32

logger = logging.getLogger("fuselm")

_ACTIVATION_DTYPES = (torch.float32, torch.bfloat16)  # queries, KV caches, RMSNorm


class LibraryMismatch(RuntimeError):
    """The library is not the build its record describes (another key or ISA inside)."""


def _weight_pointers(weight) -> tuple:
    """(qweight, scales, mins) pointers of a QuantWeight, or (tiles, NULL, NULL) of an Int4Rows16 / Int8Rows16:
    the C side tells the tiles by their missing scales (quant_linear.c)."""
    tiles = getattr(weight, "tiles", None)
    if tiles is not None:
        return tiles.data_ptr(), None, None
    return (weight.qweight.data_ptr(), weight.scales.data_ptr(),
            None if weight.mins is None else weight.mins.data_ptr())


def _scale_code(weight) -> int:
    return DTYPE_CODES[getattr(weight, "scale_dtype", None) or weight.scales.dtype]


class CpuKernels:
    """One loaded build of the library (`isa`: its variant), with typed wrappers around its functions.
    Construction refuses a library whose ABI version, recorded build or structure layout differs."""

    def __init__(self, built: build.Built) -> None:
        lib = ctypes.CDLL(str(built.path))
        abi.check_version(lib)
        abi.bind(lib)
        inside = (lib.fuselm_isa().decode(), lib.fuselm_build_key().decode())
        if inside != (built.variant.name, built.key):
            recorded = (built.variant.name, built.key)
            raise LibraryMismatch(f"{built.path} holds build {inside}, its record says {recorded}")
        abi.check_layout(lib)  # fuselm_decode_layers reads the ctypes structures c_layers.py fills
        self._lib = lib
        self.isa = built.variant.name  # the ISA variant loaded: generic, avx2, avx512 or avx512bf16
        self.build_key = built.key
        self.path = built.path
        self._decode = lib.fuselm_paged_window_attention
        self._decode_int8 = lib.fuselm_paged_decode_attention_int8  # an int8 KV cache (paged_attention_int8.c)
        self._cascade = lib.fuselm_cascade_attention  # shared-prefix groups read their blocks once
        self._cascade_supported = lib.fuselm_cascade_supported
        self._cascade_int8 = lib.fuselm_cascade_attention_int8
        # a prompt chunk's causal attention (chunk_attention.c); absent only from an older tree's library that
        # benchmarks/decode_gemm.py loads as a baseline
        self._chunk = getattr(lib, "fuselm_chunk_attention", None)
        self._chunk_supported = getattr(lib, "fuselm_chunk_attention_supported", None)
        self.max_group = lib.fuselm_max_group()
        self.max_dim = lib.fuselm_max_dim()
        self.max_block = lib.fuselm_max_block()
        # AVX-512 BF16 path for bf16 queries over a bf16 cache (head_dim % 32 == 0, block_size % 16 == 0)
        self.has_bf16_fast_path = bool(lib.fuselm_has_bf16_fast_path())
        # AVX-512 path for float32 queries (head_dim and block_size % 16 == 0), else the AVX2 one
        self.has_f32_avx512_attention = bool(lib.fuselm_has_f32_avx512_attention())
        self._linear = lib.fuselm_linear_bf16_small_m
        # AVX-512 BF16 linear for up to small_m_max rows (the portable C loop is too slow to use)
        self.has_small_m_linear = bool(lib.fuselm_has_small_m_linear())
        self.small_m_max = lib.fuselm_small_m_max()
        self._rms_norm = lib.fuselm_rms_norm
        self._qlinear = lib.fuselm_qlinear
        self.has_simd_qlinear = bool(lib.fuselm_qlinear_has_simd())  # AVX2+FMA+F16C; else a scalar C loop
        self._dequantize = lib.fuselm_dequantize
        self._scratch = torch.empty(0)  # one layer's dequantised weight at a time, reused (see dequantize)
        self._dense_pack = lib.fuselm_dense_pack  # fp32 panel-packed GEMM (dense_linear.c, dense_linear.py)
        self._dense_size = lib.fuselm_dense_packed_size
        self._dense = lib.fuselm_dense_linear
        self.has_simd_dense = bool(lib.fuselm_dense_has_simd())  # AVX2+FMA; the scalar fallback is not used
        # (an older checkout's library, loaded by benchmarks/decode_gemm.py, has no setter: its tiles stay as built)
        has_rows = hasattr(lib, "fuselm_dense_max_tile_rows")
        self.dense_max_tile_rows = int(lib.fuselm_dense_max_tile_rows()) if has_rows else 0
        self._dense_set_tile_rows = lib.fuselm_dense_set_tile_rows if has_rows else None
        # every layer of a decode step (decode_layers.c, c_layers.py), and a layer in halves around
        # attention (steps with prompt chunks)
        self.decode_layers_fn = lib.fuselm_decode_layers
        self.layer_attention_inputs_fn = lib.fuselm_layer_attention_inputs
        self.layer_attention_outputs_fn = lib.fuselm_layer_attention_outputs
        # every routed expert of an MoE layer in one call (moe.c; fuselm/layers/moe.py builds its QParts)
        self.moe_experts_fn = lib.fuselm_moe_experts
        # int4/int8 g32 weights repacked sixteen rows to a tile (int4_rows16.c: AVX512_VNNI or AVX2 builds;
        # int8_rows16.c: AVX512_VNNI builds)
        self.int4_rows16_available = bool(lib.fuselm_int4_rows16_available())
        self.int8_rows16_available = bool(lib.fuselm_int8_rows16_available())

    def qlinear(self, x: torch.Tensor, weight, bias: torch.Tensor | None, float_activations: bool = False) -> torch.Tensor:
        """x [M, K] float32 @ dequant(weight)^T (+ bias, float32) for a fuselm.quant.QuantWeight (or its
        Int4Rows16 / Int8Rows16 tiles, which always take rounded activations) on CPU.

        By default (with AVX2) x is rounded to int16 per 32 values for integer dot products (quant_linear.c,
        quant_rows.c; int4 groups, int8 groups of 16 or a multiple of 32); float_activations=True keeps x in
        float (exact weight-only arithmetic)."""
        assert x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] == weight.in_features
        assert bias is None or (bias.dtype == torch.float32 and bias.is_contiguous())
        x = x.contiguous()
        m, k = x.shape
        n = weight.out_features
        y = torch.empty((m, n), dtype=torch.float32)
        self._qlinear(x.data_ptr(), *_weight_pointers(weight), None if bias is None else bias.data_ptr(), y.data_ptr(), m, n, k,
                      weight.group_size, weight.bits, _scale_code(weight), int(float_activations),
                      torch.get_num_threads())
        return y

    def dense_packed_size(self, n: int, k: int) -> int:
        """Floats that dense_pack makes of an [n, k] weight."""
        return int(self._dense_size(n, k))

    def dense_pack(self, weight: torch.Tensor) -> torch.Tensor:
        """A float32 [N, K] weight in dense_linear.c's panel layout (a flat float32 tensor)."""
        assert weight.dtype == torch.float32 and weight.dim() == 2
        weight = weight.contiguous()
        n, k = weight.shape
        out = empty_float32(self._dense_size(n, k))  # the largest (an LM head) on huge pages
        self._dense_pack(weight.data_ptr(), out.data_ptr(), n, k, torch.get_num_threads())
        return out

    def dense_linear(self, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
        """x [M, K] float32 @ W^T (+ bias [N] float32) for W [N, K] packed by dense_pack."""
        assert x.dtype == torch.float32 and x.dim() == 2 and packed.numel() == self._dense_size(n, x.shape[1])
        assert bias is None or (bias.dtype == torch.float32 and bias.is_contiguous())
        if x.stride(1) != 1:
            x = x.contiguous()
        m, k = x.shape
        y = torch.empty((m, n), dtype=torch.float32)
        if m:
            self._dense(x.data_ptr(), x.stride(0), packed.data_ptr(), None if bias is None else bias.data_ptr(),
                        y.data_ptr(), n, m, n, k, torch.get_num_threads())
        return y

    def set_dense_tile_rows(self, rows: int) -> None:
        """The most rows a float GEMM register tile takes, for this process (runner/kernel_choice.py measures it);
        results do not depend on it."""
        if self._dense_set_tile_rows is not None:
            self._dense_set_tile_rows(int(rows))

    def linear_small_m(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [M, K] @ weight[N, K]^T (+ bias) in bf16 for M <= small_m_max, K % 32 == 0."""
        assert x.dtype == weight.dtype == torch.bfloat16 and x.shape[0] <= self.small_m_max and x.shape[1] % 32 == 0
        assert weight.is_contiguous() and (bias is None or bias.is_contiguous())
        x = x.contiguous()
        m, k = x.shape
        n = weight.shape[0]
        y = torch.empty((m, n), dtype=torch.bfloat16)
        self._linear(x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
                     m, n, k, torch.get_num_threads())
        return y

    def dequantize(self, weight) -> torch.Tensor:
        """A QuantWeight (or its tiles) as float32 [N, K], written into a scratch buffer shared by every layer (valid
        until the next call): prompt chunks multiply by it with a float GEMM."""
        n, k = weight.shape
        if self._scratch.numel() < n * k:
            self._scratch = torch.empty(n * k, dtype=torch.float32)
        out = self._scratch[: n * k].view(n, k)
        self._dequantize(*_weight_pointers(weight), out.data_ptr(), n, k, weight.group_size, weight.bits,
                         _scale_code(weight), torch.get_num_threads())
        return out

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm of the rows of x [M, D] (float32 or bfloat16, HF's rounding)."""
        assert x.dtype == weight.dtype and x.dtype in _ACTIVATION_DTYPES and x.dim() == 2
        x = x.contiguous()
        out = torch.empty_like(x)
        self._rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], eps,
                       DTYPE_CODES[x.dtype], torch.get_num_threads())
        return out

    def supports(self, dtype: torch.dtype, kv_dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int,
                 block_size: int) -> bool:
        return (dtype in _ACTIVATION_DTYPES and kv_dtype in (*_ACTIVATION_DTYPES, torch.int8)
                and num_heads // num_kv_heads <= self.max_group and head_dim <= self.max_dim
                and block_size <= self.max_block)

    def paged_decode_attention(self, q: torch.Tensor, out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_table: torch.Tensor, ctx_lens: torch.Tensor, scale: float,
                               k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None,
                               k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                               ctx_starts: torch.Tensor | None = None) -> None:
        """q, out: [n, Hq, D] contiguous; caches [blocks, block_size, Hkv, D]; block_table [n, B] int64.

        With k_new/v_new ([w, Hkv, D], q's dtype, w <= n), the new token of each of the first w rows
        is first written into its cache slot (position ctx_len - 1): the write lands in the block
        the kernel reads next, instead of a separate scatter over the whole cache (measured 186 us
        per layer at 128 rows). Rows from w on must have their K/V in the cache already.
        An int8 cache comes with its scales k_scale/v_scale [blocks, block_size, Hkv] bfloat16
        (paged_attention_int8.c; new rows are quantised as fuselm/layers/kv_quant.py does).
        ctx_starts ([n] int64): row i attends to positions ctx_starts[i] .. ctx_lens[i] - 1 only (a
        sliding window); the table's entries for blocks before that are never read.
        """
        assert q.is_contiguous() and out.is_contiguous() and block_table.is_contiguous()
        assert q.dtype == out.dtype and block_table.dtype == ctx_lens.dtype == torch.int64
        n, num_heads, head_dim = q.shape
        new_k = new_v = None
        num_write = 0
        if k_new is not None:
            num_write = k_new.shape[0]
            assert num_write <= n and k_new.dtype == v_new.dtype == q.dtype
            assert k_new.shape == v_new.shape == (num_write, k_cache.shape[2], head_dim)
            k_new, v_new = k_new.contiguous(), v_new.contiguous()
            new_k, new_v = k_new.data_ptr(), v_new.data_ptr()
        if ctx_starts is not None:
            assert ctx_starts.dtype == torch.int64 and ctx_starts.is_contiguous() and ctx_starts.shape == (n,)
        if k_cache.dtype == torch.int8:
            assert ctx_starts is None, "the int8 kernel takes no sliding window"
            assert k_scale is not None and v_scale is not None and k_scale.dtype == v_scale.dtype == torch.bfloat16
            self._decode_int8(q.data_ptr(), out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_scale.data_ptr(),
                              v_scale.data_ptr(), new_k, new_v, num_write, block_table.data_ptr(), ctx_lens.data_ptr(),
                              n, block_table.shape[1], num_heads, k_cache.shape[2], head_dim, k_cache.shape[1], scale,
                              DTYPE_CODES[q.dtype], torch.get_num_threads())
            return
        self._decode(q.data_ptr(), out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), new_k, new_v, num_write,
                     block_table.data_ptr(), ctx_lens.data_ptr(), None if ctx_starts is None else ctx_starts.data_ptr(),
                     n, block_table.shape[1], num_heads, k_cache.shape[2],
                     head_dim, k_cache.shape[1], scale, DTYPE_CODES[q.dtype], DTYPE_CODES[k_cache.dtype],
                     torch.get_num_threads())

    def cascade_supports(self, head_dim: int, block_size: int) -> bool:
        """Whether fuselm_cascade_attention takes these shapes (head_dim and block_size multiples of 16)."""
        return bool(self._cascade_supported(head_dim, block_size))

    def cascade_attention(self, q: torch.Tensor, out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          block_table: torch.Tensor, ctx_lens: torch.Tensor, scale: float, shared: torch.Tensor,
                          k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None,
                          k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
        """paged_decode_attention's contract, with `shared` (int64, fuselm/layers/cascade.py's encoding of
        the shared-prefix groups): each group's queries read its shared blocks once, together. An int8
        cache comes with its bf16 scales k_scale/v_scale, as for paged_decode_attention."""
        assert q.is_contiguous() and out.is_contiguous() and block_table.is_contiguous() and shared.is_contiguous()
        assert q.dtype == out.dtype and block_table.dtype == ctx_lens.dtype == shared.dtype == torch.int64
        n, num_heads, head_dim = q.shape
        num_write = 0
        if k_new is not None:
            num_write = k_new.shape[0]
            assert num_write <= n and k_new.dtype == v_new.dtype == q.dtype
            k_new, v_new = k_new.contiguous(), v_new.contiguous()
        if k_cache.dtype == torch.int8:
            assert k_scale is not None and v_scale is not None and k_scale.dtype == v_scale.dtype == torch.bfloat16
            self._cascade_int8(q.data_ptr(), out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_scale.data_ptr(),
                               v_scale.data_ptr(), None if k_new is None else k_new.data_ptr(),
                               None if v_new is None else v_new.data_ptr(), num_write, block_table.data_ptr(),
                               ctx_lens.data_ptr(), n, block_table.shape[1], num_heads, k_cache.shape[2], head_dim,
                               k_cache.shape[1], scale, DTYPE_CODES[q.dtype], torch.get_num_threads(), shared.data_ptr())
            return
        self._cascade(q.data_ptr(), out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                      None if k_new is None else k_new.data_ptr(), None if v_new is None else v_new.data_ptr(),
                      num_write, block_table.data_ptr(), ctx_lens.data_ptr(), n, block_table.shape[1], num_heads,
                      k_cache.shape[2], head_dim, k_cache.shape[1], scale, DTYPE_CODES[q.dtype],
                      DTYPE_CODES[k_cache.dtype], torch.get_num_threads(), shared.data_ptr())


    def chunk_attention_supports(self, q: torch.Tensor, k_cache: torch.Tensor) -> bool:
        """Whether chunk_attention takes these queries [n, Hq, D] and this cache."""
        return (self._chunk is not None and q.dtype in (torch.float32, torch.bfloat16)
                and k_cache.dtype in (torch.float32, torch.bfloat16, torch.int8)
                and q.shape[1] % k_cache.shape[2] == 0 and bool(self._chunk_supported(q.shape[2])))

    def chunk_attention(self, q: torch.Tensor, out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slots: torch.Tensor, num_cached: int, scale: float, k_scale: torch.Tensor | None = None,
                        v_scale: torch.Tensor | None = None) -> None:
        """q, out [n, Hq, D] float32 or bfloat16: a prompt chunk's n tokens at positions num_cached ..
        num_cached + n - 1, each attending causally to the context through slots [num_cached + n] int64 (every
        position's cache slot; the chunk's own K/V stored already). An int8 cache comes with its bf16 scales.
        bfloat16 queries over a bfloat16 cache take bf16 products where the library has AVX-512-BF16 (P rounded
        to bf16 for P V, as the shared-prefix kernel's bf16 panels); otherwise the kernel computes in float32."""
        assert q.is_contiguous() and out.is_contiguous() and slots.is_contiguous() and slots.dtype == torch.int64
        n, num_heads, head_dim = q.shape
        assert slots.shape == (num_cached + n,) and self.chunk_attention_supports(q, k_cache) and out.dtype == q.dtype
        if k_cache.dtype == torch.int8:
            assert k_scale is not None and v_scale is not None and k_scale.dtype == v_scale.dtype == torch.bfloat16
        self._chunk(q.data_ptr(), out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                    None if k_scale is None else k_scale.data_ptr(), None if v_scale is None else v_scale.data_ptr(),
                    slots.data_ptr(), num_cached, n, num_heads, k_cache.shape[2], head_dim, scale,
                    DTYPE_CODES[q.dtype], DTYPE_CODES[k_cache.dtype], torch.get_num_threads())


def load_kernels(isa: str | None = None, directory: Path | None = None) -> CpuKernels | None:
    """The kernels built for `isa` (default: FUSELM_CPU_ISA, else the best variant this CPU supports,
    falling back to the next one if a build fails), or None when they cannot be built or loaded.
    An ISA this CPU lacks is an error. `directory` replaces the cache directory."""
    choices = [(build.require(isa), f"requested {isa}")] if isa is not None else build.candidates()
    compiler = build.find_compiler()
    if compiler is None:
        logger.warning("no C compiler found; using the portable torch path on CPU")
        return None
    failed = []
    for variant, reason in choices:
        try:
            built = build.build(variant, compiler, directory)
        except build.BuildError as exc:
            logger.warning("building the %s CPU kernels failed (%s)", variant.name, exc)
            failed.append(variant.name)
            continue
        try:
            kernels = CpuKernels(built)
        except (OSError, abi.AbiVersionMismatch, LibraryMismatch) as exc:
            logger.warning("not using the CPU kernels %s (%s); using the torch path", built.path, exc)
            return None
        why = reason if not failed else f"{reason}; {', '.join(failed)} failed to build"
        how = "cache hit" if built.cache_hit else f"built in {built.seconds:.1f} s"
        logger.info("CPU kernels: %s (%s), %s", kernels.isa, why, how)
        return kernels
    logger.warning("no CPU kernel variant could be built; using the torch path")
    return None


@lru_cache(maxsize=1)
def get_kernels() -> CpuKernels | None:
    """The process's kernels (see load_kernels), or None with FUSELM_CPU_KERNELS=0."""
    if os.environ.get("FUSELM_CPU_KERNELS", "1") == "0":
        return None
    return load_kernels()
