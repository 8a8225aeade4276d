"""Prompt chunks attended as query rows through the shared-prefix kernel (layers/cascade.py
chunk_as_query_rows): the kernel on chunk-shaped steps (every token of a chunk a query row whose context
ends at itself) against a float64 reference, and whole engines with the option on and off giving the
same greedy tokens and float32 logits within 1e-5 when requests' own prompt tails follow a cached prefix."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import random_prompts
from fuselm import SamplingParams
from fuselm.layers import cascade
from fuselm.layers.cascade import plan_shared_prefix
from test_cascade_attention import kernels, padded, reference  # noqa: F401  (kernels: the per-ISA fixture)
from test_cascade_engine import assert_same, run

POOL_BLOCKS = 400


def chunk_step(seed: int, block_size: int, kv_heads: int, group: int, head_dim: int, kv_dtype: torch.dtype,
               families: list[tuple[int, int]], loners: int):
    """A random paged cache and a step of prompt chunks: `families` of (sequences, shared blocks) whose
    tables start with the same blocks, each sequence with cached tokens of its own past them and a chunk
    of 2..40 new tokens; `loners` chunks over a context shared with nobody. Each chunk token is a query
    row over the context up to itself. Returns (caches, tables, context lengths, q)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    pool = iter(rng.sample(range(POOL_BLOCKS), POOL_BLOCKS))
    tables, lens = [], []

    def chunk(prefix: list[int], cached: int) -> None:
        n = rng.randrange(2, 41)
        table = prefix + [next(pool) for _ in range(-(-(cached + n) // block_size) - len(prefix))]
        for j in range(n):
            tables.append(tuple(table))
            lens.append(cached + j + 1)

    for sequences, shared in families:
        prefix = [next(pool) for _ in range(shared)]
        for _ in range(sequences):
            chunk(prefix, shared * block_size + rng.randrange(0, 2 * block_size))
    for _ in range(loners):
        chunk([], rng.randrange(0, 6 * block_size))
    shape = (POOL_BLOCKS + 1, block_size, kv_heads, head_dim)
    q = torch.randn(len(tables), kv_heads * group, head_dim)
    return torch.randn(shape).to(kv_dtype), torch.randn(shape).to(kv_dtype), tables, lens, q


CHUNK_CASES = [  # block_size, kv_heads, group, head_dim, families, loners
    (16, 3, 3, 64, [(6, 12)], 0),
    (16, 2, 2, 32, [(1, 3), (3, 0), (2, 7)], 2),
    (32, 1, 8, 16, [(4, 2)], 1),
    (16, 4, 1, 128, [(2, 5)], 3),
]


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(CHUNK_CASES)))
def test_chunk_rows_match_float64(kernels, case, kv_dtype):  # noqa: F811
    bs, kv_heads, group, dim, families, loners = CHUNK_CASES[case]
    k_cache, v_cache, tables, lens, q = chunk_step(case, bs, kv_heads, group, dim, kv_dtype, families, loners)
    scale = dim ** -0.5
    plan = plan_shared_prefix(tables, lens, bs, min_rows=2, min_blocks=1, min_reads=0)
    assert plan is not None and max(len(rows) for rows in plan.rows) > 8  # chunks form large groups
    out = torch.empty_like(q)
    kernels.cascade_attention(q, out, k_cache, v_cache, padded(tables, 0), torch.tensor(lens), scale, plan.encoded)
    tol = 1e-5 if kv_dtype == torch.float32 else 1e-4
    torch.testing.assert_close(out.double(), reference(q, k_cache, v_cache, tables, lens, scale), atol=tol, rtol=tol)


@pytest.fixture(autouse=True)
def group_small_shares(monkeypatch):
    """Groups from 2 rows sharing 2 blocks, and chunks after 2 cached blocks as query rows: correctness must
    hold at every size, the defaults are speed thresholds."""
    monkeypatch.setattr(cascade, "MIN_GROUP_ROWS", 2)
    monkeypatch.setattr(cascade, "MIN_SHARED_BLOCKS", 2)
    monkeypatch.setattr(cascade, "MIN_GROUP_BLOCK_READS", 0)
    monkeypatch.setattr(cascade, "CHUNK_QUERY_ROWS_MIN_BLOCKS", 2)


def counting_chunk_rows(monkeypatch) -> list[int]:
    """Record each step's prompt-chunk query rows (the rows this feature moves to the kernel)."""
    from fuselm.runner.model_runner import ModelRunner

    counts: list[int] = []
    build = ModelRunner._build_batch

    def recording(self, out):
        batch = build(self, out)
        counts.append(batch[2].chunk_query_rows)
        return batch

    monkeypatch.setattr(ModelRunner, "_build_batch", recording)
    return counts


def tails_after_prefix(families: int, per_family: int, seed: int):
    """Prompts of `families` cached 5-block prefixes (+3 tokens), each request with a tail of 20-90 tokens."""
    prefixes = random_prompts([16 * 5 + 3] * families, seed=seed)
    prompts = [prefixes[f] + tail for f in range(families)
               for tail in random_prompts([20 + (i * 23) % 71 for i in range(per_family)], seed=seed + 10 + f)]
    return prompts, prefixes


@pytest.mark.parametrize("kv_cache_dtype", [None, "int8"])
def test_chunked_tails_match(tiny_llama, monkeypatch, kv_cache_dtype):
    """Tails longer than a query-row step, chunked by a small token budget, with and without a KV cache in int8."""
    counts = counting_chunk_rows(monkeypatch)
    prompts, prefixes = tails_after_prefix(2, 5, seed=11)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    options = {"max_num_batched_tokens": 48} | ({"kv_cache_dtype": kv_cache_dtype} if kv_cache_dtype else {})
    on = run(tiny_llama[0], prompts, params, True, warm=prefixes, **options)
    moved = sum(counts)
    counts.clear()
    off = run(tiny_llama[0], prompts, params, False, warm=prefixes, **options)
    assert_same(on, off)
    assert moved > 0 and sum(counts) == 0


def test_chunked_tails_with_n_samples_and_preemption(tiny_llama, monkeypatch):
    """n > 1 samples of prompts with long tails, in a pool too small for all: preempted requests compute their
    prompts again, in chunks over the cached prefix."""
    from fuselm import LLM

    counts = counting_chunk_rows(monkeypatch)
    prompts, prefixes = tails_after_prefix(1, 3, seed=12)
    params = SamplingParams(temperature=0, max_tokens=40, n=4, ignore_eos=True)
    probe = LLM(tiny_llama[0], dtype="float32", device="cpu")
    small = 30 * probe.engine.runner.bytes_per_block
    on = run(tiny_llama[0], prompts, params, True, warm=prefixes, kv_cache_memory_bytes=small,
             max_num_batched_tokens=40)
    assert sum(counts) > 0
    off = run(tiny_llama[0], prompts, params, False, warm=prefixes, kv_cache_memory_bytes=small,
              max_num_batched_tokens=40)
    assert_same(on, off)
    assert on[3] > 0 and off[3] > 0


def test_a_chunk_no_other_row_reads_takes_the_chunk_kernel(tiny_llama, monkeypatch):
    """A lone request's later chunks over its own cached context share no leading block with another row: they
    attend through the chunk kernel (faster alone), not as query rows; a second request over the same cached
    prefix makes its chunk a query-row group again. Tokens and logits as with the option off."""
    from fuselm import LLM

    counts = counting_chunk_rows(monkeypatch)
    prompt = random_prompts([100], seed=13)[0]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm = LLM(tiny_llama[0], dtype="float32", device="cpu", max_num_batched_tokens=40, enable_prefix_caching=False)
    chunk_calls = []
    real = llm.engine.runner.cpu_kernels.chunk_attention
    monkeypatch.setattr(llm.engine.runner.cpu_kernels, "chunk_attention",
                        lambda *a, **k: chunk_calls.append(1) or real(*a, **k))
    alone = llm.generate([prompt], params, use_tqdm=False)[0]
    layers = llm.engine.runner.model_config.num_hidden_layers
    assert sum(counts) == 0 and len(chunk_calls) == 3 * layers  # 100 tokens: chunks of 40, 40 (after 40), 20
    off = LLM(tiny_llama[0], dtype="float32", device="cpu", max_num_batched_tokens=40, enable_prefix_caching=False,
              enable_cascade_attention=False)
    assert alone.outputs[0].token_ids == off.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    counts.clear()
    prompts, prefixes = tails_after_prefix(1, 4, seed=14)  # four tails over one cached prefix, run together
    on_run = run(tiny_llama[0], prompts, params, True, warm=prefixes, max_num_batched_tokens=48)
    assert sum(counts) > 0
    assert_same(on_run, run(tiny_llama[0], prompts, params, False, warm=prefixes, max_num_batched_tokens=48))
