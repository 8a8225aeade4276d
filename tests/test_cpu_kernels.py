"""fuselm's C kernels against float64 / torch references on random inputs of many shapes, once for
every ISA variant of the library this CPU runs (fuselm/kernels/build.py), and the engine with the
kernels against the engine without them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import random_prompts
from fuselm import LLM, SamplingParams
from fuselm.kernels.build import find_compiler, supported_variants
from fuselm.kernels.cpu import get_kernels, load_kernels
from fuselm.quant.formats import QuantWeight, quantize_int4, quantize_int8

HAVE_COMPILER = find_compiler() is not None
pytestmark = pytest.mark.skipif(not HAVE_COMPILER, reason="no C compiler: the torch path is used and tested elsewhere")
VARIANTS = supported_variants() if HAVE_COMPILER else []


@pytest.fixture
def engine_variant(request, monkeypatch):
    """The engine's kernels forced to one variant through FUSELM_CPU_ISA for the test."""
    monkeypatch.setenv("FUSELM_CPU_ISA", request.param)
    get_kernels.cache_clear()
    yield request.param
    get_kernels.cache_clear()


def reference(q, k_cache, v_cache, table, lens, scale):
    n, hq, d = q.shape
    hkv = k_cache.shape[2]
    bs = k_cache.shape[1]
    out = torch.empty(n, hq, d, dtype=torch.float64)
    for i in range(n):
        L = int(lens[i])
        slots = [int(table[i, p // bs]) * bs + p % bs for p in range(L)]
        k = k_cache.reshape(-1, hkv, d)[slots].double()  # [L, Hkv, D]
        v = v_cache.reshape(-1, hkv, d)[slots].double()
        for h in range(hq):
            kv = h // (hq // hkv)
            w = torch.softmax((k[:, kv] @ q[i, h].double()) * scale, dim=0)  # [L]
            out[i, h] = w @ v[:, kv]
    return out


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("n, hq, hkv, d, bs, max_len", [
    (1, 1, 1, 8, 1, 1), (3, 4, 2, 16, 4, 37), (5, 9, 3, 64, 16, 300), (2, 8, 8, 128, 16, 70),
    (4, 14, 2, 64, 32, 129), (6, 32, 8, 128, 16, 50), (3, 6, 2, 32, 64, 200), (2, 3, 1, 64, 16, 15),
])
def test_kernel_matches_float64_reference(kernels, dtype, tol, n, hq, hkv, d, bs, max_len):
    g = torch.Generator().manual_seed(n * 1000 + d)
    nb = -(-max_len // bs)
    num_blocks = n * nb + 3
    k_cache = torch.randn(num_blocks, bs, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, bs, hkv, d, generator=g).to(dtype)
    table = torch.randperm(num_blocks, generator=g)[: n * nb].view(n, nb).contiguous()
    lens = torch.randint(1, max_len + 1, (n,), generator=g)
    lens[0] = max_len
    q = torch.randn(n, hq, d, generator=g).to(dtype)
    out = torch.empty_like(q)
    scale = d ** -0.5
    kernels.paged_decode_attention(q, out, k_cache, v_cache, table, lens, scale)
    ref = reference(q, k_cache, v_cache, table, lens, scale)
    assert (out.double() - ref).abs().max().item() < tol


@pytest.mark.parametrize("engine_variant", VARIANTS, indirect=True)
def test_engine_kernel_and_torch_paths_agree(tiny_llama, engine_variant):
    """Every variant: C attention and RMSNorm; from avx2 on also the packed fp32 GEMM and the one-call
    decode step (decode_layers.c)."""
    path, _ = tiny_llama
    prompts = random_prompts([1, 30, 77, 140], seed=40)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=2)
    fast = LLM(path, dtype="float32", device="cpu", cpu_kernels=True)
    plain = LLM(path, dtype="float32", device="cpu", cpu_kernels=False)
    assert fast.engine.runner.cpu_kernels.isa == engine_variant and plain.engine.runner.cpu_kernels is None
    a = fast.generate(prompts, params, use_tqdm=False)
    b = plain.generate(prompts, params, use_tqdm=False)
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        for lx, ly in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
            for tok in lx:
                assert abs(lx[tok].logprob - ly[tok].logprob) < 1e-4


def test_kernel_reads_bf16_cache_for_fp32_queries(kernels):
    g = torch.Generator().manual_seed(7)
    n, hq, hkv, d, bs, max_len = 3, 9, 3, 64, 16, 90
    nb = -(-max_len // bs)
    k_cache = torch.randn(n * nb, bs, hkv, d, generator=g).to(torch.bfloat16)
    v_cache = torch.randn(n * nb, bs, hkv, d, generator=g).to(torch.bfloat16)
    table = torch.arange(n * nb).view(n, nb)
    lens = torch.tensor([90, 1, 47])
    q = torch.randn(n, hq, d, generator=g)
    out = torch.empty_like(q)
    kernels.paged_decode_attention(q, out, k_cache, v_cache, table, lens, d ** -0.5)
    assert (out.double() - reference(q, k_cache, v_cache, table, lens, d ** -0.5)).abs().max().item() < 1e-5


def test_bf16_kv_cache_on_fp32_model(tiny_llama):
    path, _ = tiny_llama
    prompts = random_prompts([5, 40, 130], seed=41)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    full = LLM(path, dtype="float32", device="cpu")
    half = LLM(path, dtype="float32", device="cpu", kv_cache_dtype="bfloat16")
    plain_half = LLM(path, dtype="float32", device="cpu", kv_cache_dtype="bfloat16", cpu_kernels=False)
    assert half.engine.runner.bytes_per_block * 2 == full.engine.runner.bytes_per_block
    a = full.generate(prompts, params, use_tqdm=False)
    b = half.generate(prompts, params, use_tqdm=False)
    c = plain_half.generate(prompts, params, use_tqdm=False)
    for x, y, z in zip(a, b, c):
        assert y.outputs[0].token_ids == z.outputs[0].token_ids  # kernel == torch path on the same bf16 cache
        tok = x.outputs[0].token_ids[0]
        assert abs(x.outputs[0].logprobs[0][tok].logprob - y.outputs[0].logprobs[0][tok].logprob) < 0.05


def _cpu_has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512_bf16" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not _cpu_has_avx512_bf16(), reason="the AVX-512 BF16 path is only built on CPUs that have it")
def test_bf16_fast_path_is_built_where_the_cpu_has_it():
    # test_kernel_matches_float64_reference then checks that path (bf16 cases with d % 32 == 0, bs % 16 == 0)
    assert get_kernels().isa == "avx512bf16" and get_kernels().has_bf16_fast_path


def test_each_variant_compiles_the_paths_its_instructions_allow(kernels):
    """The preprocessor paths (#if __AVX2__ && __FMA__ ..., __AVX512BF16__) each variant's flags switch on."""
    simd = kernels.isa != "generic"
    assert kernels.has_simd_dense == simd and kernels.has_simd_qlinear == simd
    assert kernels.has_bf16_fast_path == kernels.has_small_m_linear == (kernels.isa == "avx512bf16")
    assert kernels.has_f32_avx512_attention == kernels.isa.startswith("avx512")


@pytest.mark.parametrize("dtype, kv_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                             (torch.bfloat16, torch.bfloat16)])
def test_kernel_writes_the_new_token_then_attends(kernels, dtype, kv_dtype):
    """With k_new/v_new the kernel stores each sequence's new row at position ctx_len - 1 first:
    the cache must end up as torch's index_copy_ would leave it, and the output must match."""
    g = torch.Generator().manual_seed(11)
    n, hq, hkv, d, bs = 4, 6, 2, 64, 16
    lens = torch.tensor([1, 16, 17, 90])
    nb = -(-int(lens.max()) // bs)
    num_blocks = n * nb + 2
    k_cache = torch.randn(num_blocks, bs, hkv, d, generator=g).to(kv_dtype)
    v_cache = torch.randn(num_blocks, bs, hkv, d, generator=g).to(kv_dtype)
    table = torch.randperm(num_blocks, generator=g)[: n * nb].view(n, nb).contiguous()
    q = torch.randn(n, hq, d, generator=g).to(dtype)
    k_new = torch.randn(n, hkv, d, generator=g).to(dtype)
    v_new = torch.randn(n, hkv, d, generator=g).to(dtype)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    slots = torch.tensor([int(table[i, (int(lens[i]) - 1) // bs]) * bs + (int(lens[i]) - 1) % bs for i in range(n)])
    want_k.view(-1, hkv, d).index_copy_(0, slots, k_new.to(kv_dtype))
    want_v.view(-1, hkv, d).index_copy_(0, slots, v_new.to(kv_dtype))
    out = torch.empty_like(q)
    kernels.paged_decode_attention(q, out, k_cache, v_cache, table, lens, d ** -0.5, k_new, v_new)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    tol = 1e-5 if dtype == kv_dtype == torch.float32 else 2e-2
    assert (out.double() - reference(q, want_k, want_v, table, lens, d ** -0.5)).abs().max().item() < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 64, 200])
def test_c_rms_norm_matches_the_torch_module(kernels, dtype, rows):
    from fuselm.layers.norm import RMSNorm

    g = torch.Generator().manual_seed(rows)
    norm = RMSNorm(576, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(576, generator=g) + 0.5)
    x = (torch.randn(rows, 576, generator=g) * 3).to(dtype)
    want = norm(x).double()  # cpu_kernels is None: the torch ops
    got = kernels.rms_norm(x, norm.weight, 1e-5).double()
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: at most one rounding step apart
    assert (got - want).abs().max().item() <= tol * want.abs().max().item()


@pytest.mark.parametrize("rows, inter", [(1, 1536), (7, 40), (70, 1536), (3, 13)])
def test_c_silu_mul_matches_torch(kernels, rows, inter):
    """decode_layers.c's silu(gate) * up: 16-lane, 8-lane and scalar loops (40 and 13 columns reach the
    shorter ones), against torch in float64, with gates far into exp's clamped range."""
    g = torch.Generator().manual_seed(rows * inter)
    gu = torch.randn(rows, 2 * inter, generator=g) * 6
    gu[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -87.5])
    act = torch.empty(rows, inter)
    kernels._lib.fuselm_silu_mul(gu.data_ptr(), act.data_ptr(), rows, inter, torch.get_num_threads())
    want = F.silu(gu[:, :inter].double()) * gu[:, inter:].double()
    assert (act.double() - want).abs().max().item() <= 1e-6 * want.abs().max().item()


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("n_out, bias", [(576, False), (960, True), (37, True), (3072, False)])
def test_small_m_linear_matches_float64(kernels, rows, n_out, bias):
    if not kernels.has_small_m_linear:
        pytest.skip("the small-M linear needs AVX-512 BF16")
    g = torch.Generator().manual_seed(rows * 7 + n_out)
    x = torch.randn(rows, 576, generator=g).to(torch.bfloat16)
    w = torch.randn(n_out, 576, generator=g).to(torch.bfloat16)
    b = torch.randn(n_out, generator=g).to(torch.bfloat16) if bias else None
    want = x.double() @ w.double().T + (b.double() if bias else 0)
    got = kernels.linear_small_m(x, w, b).double()
    assert (got - want).abs().max().item() <= 1e-2 * want.abs().max().item()


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
def test_kernel_ignores_cache_rows_past_the_context(kernels, kv_dtype):
    """Blocks are read in vector-sized pieces; rows a block holds past a sequence's length (stale or
    never written: NaN here) must not reach the output."""
    g = torch.Generator().manual_seed(12)
    n, hq, hkv, d, bs = 3, 9, 3, 64, 16
    lens = torch.tensor([5, 16, 21])
    nb = 2
    k_cache = torch.full((n * nb + 1, bs, hkv, d), float("nan")).to(kv_dtype)
    v_cache = torch.full((n * nb + 1, bs, hkv, d), float("nan")).to(kv_dtype)
    table = torch.randperm(n * nb, generator=g).view(n, nb).contiguous()
    for i in range(n):
        for p in range(int(lens[i])):
            blk, off = int(table[i, p // bs]), p % bs
            k_cache[blk, off] = torch.randn(hkv, d, generator=g).to(kv_dtype)
            v_cache[blk, off] = torch.randn(hkv, d, generator=g).to(kv_dtype)
    q = torch.randn(n, hq, d, generator=g)
    out = torch.empty_like(q)
    kernels.paged_decode_attention(q, out, k_cache, v_cache, table, lens, d ** -0.5)
    assert not out.isnan().any()
    assert (out.double() - reference(q, k_cache, v_cache, table, lens, d ** -0.5)).abs().max().item() < 1e-5


@pytest.mark.parametrize("m, n, k", [(1, 80, 96), (6, 130, 257), (13, 33, 600), (131, 17, 3)])
def test_dense_linear_matches_float64(kernels, m, n, k):
    """The packed fp32 GEMM (tests/test_dense_linear.py covers the default variant in depth)."""
    g = torch.Generator().manual_seed(m * 31 + k)
    w, b, x = torch.randn(n, k, generator=g), torch.randn(n, generator=g), torch.randn(m, k, generator=g)
    got = kernels.dense_linear(x, kernels.dense_pack(w), b, n).double()
    want = x.double() @ w.double().T + b.double()
    assert (got - want).abs().max().item() <= 1e-5 * ((x.double().abs() @ w.double().abs().T).max().item() + 1)


@pytest.mark.parametrize("rows", [1, 5])
def test_quantised_linear_and_dequantise_match_the_reference(kernels, rows):
    """fuselm_qlinear and fuselm_dequantize against QuantWeight.dequantize (fuselm/quant/formats.py),
    with float16 and float32 scales (tests/test_quant_formats.py covers the default variant in depth)."""
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(48, 256, generator=g) * 0.05
    x = torch.randn(rows, 256, generator=g)
    int4 = quantize_int4(w, 64)
    int4_f32_scales = QuantWeight(4, 64, int4.shape, int4.qweight, int4.scales.float(), int4.mins.float())
    for qw in (int4, int4_f32_scales, quantize_int8(w, 32), quantize_int8(w)):
        reference = qw.dequantize().double()
        assert torch.allclose(kernels.dequantize(qw).double(), reference, rtol=0, atol=1e-6), (qw.bits, qw.scales.dtype)
        want = F.linear(x.double(), reference)
        exact = kernels.qlinear(x, qw, None, float_activations=True).double()
        assert (exact - want).abs().max() <= 1e-5 * want.abs().max(), (qw.bits, qw.scales.dtype)
        rounded = kernels.qlinear(x, qw, None).double()  # int16 activations where the variant has AVX2
        assert (rounded - want).abs().max() < 5e-4 * want.abs().max(), (qw.bits, qw.scales.dtype)
