"""Build and call fuselm's C kernels for CPU (paged decode attention).

Eager torch has no attention that reads a paged KV cache in place: the portable path gathers each
sequence's context into a padded copy every layer, which costs more memory traffic than the
attention itself on CPU. This module compiles `paged_attention.c` with the system C compiler the
first time it is needed (well under a second; cached under ~/.cache/fuselm keyed by the source
hash and compiler flags) and calls it through ctypes. If no compiler is present, or
FUSELM_CPU_KERNELS=0, `get_kernels()` returns None and the torch path is used.

The .so links libgomp by its soname, so inside a process that imported torch it shares torch's
OpenMP runtime and thread pool.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

logger = logging.getLogger("fuselm")

_SOURCES = [Path(__file__).with_name(n) for n in ("paged_attention.c", "layer_ops.c", "quant_linear.c", "dense_linear.c",
                                                     "decode_layers.c")]
_HEADER = Path(__file__).with_name("bf16_simd.h")  # included by both; part of the cache key
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC", "-std=c11"]
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def _cache_dir() -> Path:
    root = os.environ.get("FUSELM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fuselm")
    return Path(root) / "kernels"


def _build() -> Path | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.warning("no C compiler found; using the portable torch attention path on CPU")
        return None
    source = b"".join(src.read_bytes() for src in [*_SOURCES, _HEADER])
    key = hashlib.sha256(source + " ".join([compiler, *_FLAGS]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"fuselm_cpu_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *_FLAGS, *map(str, _SOURCES), "-o", tmp, "-lm"], check=True, capture_output=True, text=True)
        os.replace(tmp, target)  # atomic: concurrent builders never see a half-written file
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        logger.warning("building the CPU attention kernel failed (%s); using the torch path", detail.strip()[:500])
        Path(tmp).unlink(missing_ok=True)
        return None
    return target


class CpuKernels:
    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        fn = lib.fuselm_paged_decode_attention
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        fn.argtypes = [p, p, p, p, p, p, i64, p, p, i64, i64, i64, i64, i64, i64, ctypes.c_float, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int]
        fn.restype = None
        self._decode = fn
        self.max_group = lib.fuselm_max_group()
        self.max_dim = lib.fuselm_max_dim()
        self.max_block = lib.fuselm_max_block()
        # AVX-512 BF16 path for bf16 queries over a bf16 cache (head_dim % 32 == 0, block_size % 16 == 0)
        self.has_bf16_fast_path = bool(lib.fuselm_has_bf16_fast_path())
        lin = lib.fuselm_linear_bf16_small_m
        lin.argtypes = [p, p, p, p, i64, i64, i64, ctypes.c_int]
        lin.restype = None
        self._linear = lin
        # AVX-512 BF16 linear for up to small_m_max rows (the portable C loop is too slow to use)
        self.has_small_m_linear = bool(lib.fuselm_has_small_m_linear())
        self.small_m_max = lib.fuselm_small_m_max()
        norm = lib.fuselm_rms_norm
        norm.argtypes = [p, p, p, i64, i64, ctypes.c_float, ctypes.c_int, ctypes.c_int]
        norm.restype = None
        self._rms_norm = norm
        ql = lib.fuselm_qlinear
        ql.argtypes = [p, p, p, p, p, p, i64, i64, i64, i64, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        ql.restype = None
        self._qlinear = ql
        self.has_simd_qlinear = bool(lib.fuselm_qlinear_has_simd())  # AVX2+FMA+F16C; else a scalar C loop
        deq = lib.fuselm_dequantize
        deq.argtypes = [p, p, p, p, i64, i64, i64, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        deq.restype = None
        self._dequantize = deq
        self._scratch = torch.empty(0)  # one layer's dequantised weight at a time, reused (see dequantize)
        pack = lib.fuselm_dense_pack  # fp32 panel-packed GEMM (dense_linear.c, dense_linear.py)
        pack.argtypes = [p, p, i64, i64, ctypes.c_int]
        pack.restype = None
        self._dense_pack = pack
        lib.fuselm_dense_packed_size.argtypes = [i64, i64]
        lib.fuselm_dense_packed_size.restype = i64
        self._dense_size = lib.fuselm_dense_packed_size
        dense = lib.fuselm_dense_linear
        dense.argtypes = [p, i64, p, p, p, i64, i64, i64, i64, ctypes.c_int]
        dense.restype = None
        self._dense = dense
        self.has_simd_dense = bool(lib.fuselm_dense_has_simd())  # AVX2+FMA; the scalar fallback is not used
        layers = lib.fuselm_decode_layers  # every layer of a decode step (decode_layers.c, fused_decode.py)
        layers.argtypes = [p, i64, p, p, i64, i64, p, p, p, p]
        layers.restype = None
        self.decode_layers_fn = layers
        half = lib.fuselm_layer_attention_inputs  # a layer in halves around attention (steps with prompt chunks)
        half.argtypes = [p, i64, p, p, i64, p, p, p, p, p]
        half.restype = None
        self.layer_attention_inputs_fn = half
        half = lib.fuselm_layer_attention_outputs
        half.argtypes = [p, i64, p, p, p, i64]
        half.restype = None
        self.layer_attention_outputs_fn = half
        self.has_decode_layers = True

    def qlinear(self, x: torch.Tensor, weight, bias: torch.Tensor | None, float_activations: bool = False) -> torch.Tensor:
        """x [M, K] float32 @ dequant(weight)^T (+ bias, float32) for a fuselm.quant.QuantWeight on CPU.

        By default (with AVX2) x is rounded to int8 per 32 values for integer dot products, as
        llama.cpp does; float_activations=True keeps x in float (exact weight-only arithmetic)."""
        assert x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] == weight.in_features
        assert bias is None or (bias.dtype == torch.float32 and bias.is_contiguous())
        x = x.contiguous()
        m, k = x.shape
        n = weight.out_features
        y = torch.empty((m, n), dtype=torch.float32)
        sdt = {torch.float32: 0, torch.float16: 1}[weight.scales.dtype]
        self._qlinear(x.data_ptr(), weight.qweight.data_ptr(), weight.scales.data_ptr(),
                      None if weight.mins is None else weight.mins.data_ptr(), None if bias is None else bias.data_ptr(),
                      y.data_ptr(), m, n, k, weight.group_size, weight.bits, sdt, int(float_activations),
                      torch.get_num_threads())
        return y

    def dense_pack(self, weight: torch.Tensor) -> torch.Tensor:
        """A float32 [N, K] weight in dense_linear.c's panel layout (a flat float32 tensor)."""
        assert weight.dtype == torch.float32 and weight.dim() == 2
        weight = weight.contiguous()
        n, k = weight.shape
        out = torch.empty(self._dense_size(n, k), dtype=torch.float32)
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
        """A QuantWeight as float32 [N, K], written into a scratch buffer shared by every layer (valid
        until the next call): prompt chunks multiply by it with a float GEMM."""
        n, k = weight.shape
        if self._scratch.numel() < n * k:
            self._scratch = torch.empty(n * k, dtype=torch.float32)
        out = self._scratch[: n * k].view(n, k)
        sdt = {torch.float32: 0, torch.float16: 1}[weight.scales.dtype]
        self._dequantize(weight.qweight.data_ptr(), weight.scales.data_ptr(),
                         None if weight.mins is None else weight.mins.data_ptr(), out.data_ptr(), n, k,
                         weight.group_size, weight.bits, sdt, torch.get_num_threads())
        return out

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm of the rows of x [M, D] (float32 or bfloat16, HF's rounding)."""
        assert x.dtype == weight.dtype and x.dtype in _DTYPES and x.dim() == 2
        x = x.contiguous()
        out = torch.empty_like(x)
        self._rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], eps,
                       _DTYPES[x.dtype], torch.get_num_threads())
        return out

    def supports(self, dtype: torch.dtype, kv_dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int,
                 block_size: int) -> bool:
        return (dtype in _DTYPES and kv_dtype in _DTYPES and num_heads // num_kv_heads <= self.max_group and head_dim <= self.max_dim
                and block_size <= self.max_block)

    def paged_decode_attention(self, q: torch.Tensor, out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_table: torch.Tensor, ctx_lens: torch.Tensor, scale: float,
                               k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None) -> None:
        """q, out: [n, Hq, D] contiguous; caches [blocks, block_size, Hkv, D]; block_table [n, B] int64.

        With k_new/v_new ([w, Hkv, D], q's dtype, w <= n), the new token of each of the first w rows
        is first written into its cache slot (position ctx_len - 1): the write lands in the block
        the kernel reads next, instead of a separate scatter over the whole cache (measured 186 us
        per layer at 128 rows). Rows from w on must have their K/V in the cache already.
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
        self._decode(q.data_ptr(), out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), new_k, new_v, num_write,
                     block_table.data_ptr(), ctx_lens.data_ptr(), n, block_table.shape[1], num_heads, k_cache.shape[2],
                     head_dim, k_cache.shape[1], scale, _DTYPES[q.dtype], _DTYPES[k_cache.dtype],
                     torch.get_num_threads())


@lru_cache(maxsize=1)
def get_kernels() -> CpuKernels | None:
    if os.environ.get("FUSELM_CPU_KERNELS", "1") == "0":
        return None
    path = _build()
    if path is None:
        return None
    try:
        return CpuKernels(path)
    except OSError as exc:
        logger.warning("loading the CPU attention kernel failed (%s); using the torch path", exc)
        return None
