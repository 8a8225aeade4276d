"""Speculative rejection sampling keeps the target distribution (chi-square tests).

Unit level: on a 6-token vocabulary with known p and q, tokens emitted by rejection_sample follow
p, including the corners q = 0 where p > 0 (only the residual can produce those) and p = 0 where
q > 0 (those must never appear). Engine level: sampled outputs with speculation (ngram and a
draft model that disagrees with the target) match the plain engine's in a two-sample test.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from conftest import random_prompts
from fuselm import LLM, SamplingParams
from fuselm.runner.rejection import greedy_accept, rejection_sample

# Upper 0.1% points of the chi-square distribution, df = 1..15 (statistical tables).
CHI2_999 = [10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32, 26.12, 27.88, 29.59, 31.26, 32.91, 34.53, 36.12, 37.70]


def chi2_goodness(counts: Counter, probs: torch.Tensor) -> tuple[float, int]:
    n = sum(counts.values())
    support = [t for t in range(len(probs)) if probs[t] > 0]
    stat = sum((counts[t] - n * float(probs[t])) ** 2 / (n * float(probs[t])) for t in support)
    return stat, len(support) - 1


P = torch.tensor([[0.30, 0.00, 0.25, 0.05, 0.40, 0.00],   # position 0
                  [0.10, 0.20, 0.00, 0.50, 0.15, 0.05],   # position 1
                  [0.25, 0.25, 0.25, 0.00, 0.00, 0.25]])  # bonus position
Q = torch.tensor([[0.10, 0.30, 0.00, 0.30, 0.30, 0.00],   # q > 0 where p = 0 (token 1); q = 0 where p > 0 (token 2)
                  [0.50, 0.00, 0.20, 0.10, 0.10, 0.10]])


def test_rejection_sample_follows_p_with_a_draft_distribution():
    gen = torch.Generator().manual_seed(0)
    first, second = Counter(), Counter()
    for _ in range(12000):
        drafts = [int(torch.multinomial(Q[i], 1, generator=gen)) for i in range(2)]
        out = rejection_sample(P, drafts, Q, gen)
        assert 1 <= len(out) <= 3 and out[:-1] == drafts[:len(out) - 1]
        first[out[0]] += 1
        if len(out) >= 2:
            second[out[1]] += 1  # the first token was accepted: the second must follow p_1
    assert first[1] == first[5] == 0  # p_0 = 0 there, even though q proposes token 1
    assert first[2] > 0  # q_0 = 0 there: only the residual can emit it
    for counts, probs in ((first, P[0]), (second, P[1])):
        stat, df = chi2_goodness(counts, probs)
        assert stat < CHI2_999[df - 1], (stat, counts)


def test_rejection_sample_point_mass_and_bonus():
    """ngram proposals: q is a point mass on the proposed token."""
    gen = torch.Generator().manual_seed(1)
    first, bonus = Counter(), Counter()
    for _ in range(12000):
        out = rejection_sample(P, [4, 3], None, gen)
        first[out[0]] += 1
        if len(out) == 3:
            bonus[out[2]] += 1  # both accepted: the bonus token follows p_2
    for counts, probs in ((first, P[0]), (bonus, P[2])):
        stat, df = chi2_goodness(counts, probs)
        assert stat < CHI2_999[df - 1], (stat, counts)
    # a proposed token with p = 0 is always rejected, and never emitted
    for _ in range(200):
        out = rejection_sample(P, [1, 0], None, gen)
        assert out[0] != 1 and len(out) == 1


def test_no_proposals_samples_p():
    gen = torch.Generator().manual_seed(2)
    counts = Counter(rejection_sample(P[:1], [], None, gen)[0] for _ in range(6000))
    stat, df = chi2_goodness(counts, P[0])
    assert stat < CHI2_999[df - 1]


def test_greedy_accept():
    assert greedy_accept([5, 6, 7], [5, 6]) == [5, 6, 7]
    assert greedy_accept([5, 9, 7], [5, 6]) == [5, 9]
    assert greedy_accept([8, 6, 7], [5, 6]) == [8]
    assert greedy_accept([3], []) == [3]


def two_sample_chi2(a: Counter, b: Counter) -> tuple[float, int]:
    """Homogeneity of two equal-size samples; cells with fewer than 10 observations in all are pooled."""
    cells = [c for c in set(a) | set(b) if a[c] + b[c] >= 10]
    pooled = (sum(v for c, v in a.items() if c not in cells), sum(v for c, v in b.items() if c not in cells))
    pairs = [(a[c], b[c]) for c in cells] + ([pooled] if sum(pooled) else [])
    stat = sum((x - y) ** 2 / (x + y) for x, y in pairs)
    return stat, len(pairs) - 1


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_engine_sampling_distribution_unchanged(tiny_model_factory, tiny_llama, method):
    path = tiny_llama[0]
    # The model's own greedy continuation, twice: likely next tokens occur in the prompt, so lookup proposes.
    seed_prompt = random_prompts([5], seed=31)[0]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    cont = LLM(path, dtype="float32", device="cpu").generate([seed_prompt], greedy, use_tqdm=False)[0]
    prompt = (seed_prompt + cont.outputs[0].token_ids) * 2
    params = SamplingParams(temperature=1.0, top_k=3, max_tokens=3, ignore_eos=True)
    config = {"method": method, "num_speculative_tokens": 2, "adaptive": False, "prompt_lookup_min": 1}
    if method == "draft_model":
        config = {"method": method, "model": tiny_model_factory("llama_tied")[0], "num_speculative_tokens": 2,
                  "adaptive": False}
    n = 1500
    samples = {}
    for name, spec in (("plain", None), ("spec", config)):
        # a budget larger than admissions can use, so speculation (scheduled last) gets tokens
        llm = LLM(path, dtype="float32", device="cpu", seed=7 if spec else 8, speculative_config=spec,
                  max_num_seqs=256, max_num_batched_tokens=16384)
        outs = llm.generate([prompt] * n, params, use_tqdm=False)
        samples[name] = Counter(tuple(o.outputs[0].token_ids[1:]) for o in outs)  # tokens 2-3: verified ones
        if spec:
            stats = llm.engine.speculator.stats
            assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    stat, df = two_sample_chi2(samples["plain"], samples["spec"])
    assert df >= 3
    assert stat < CHI2_999[min(df, 15) - 1] if df <= 15 else stat < df + 3.3 * (2 * df) ** 0.5, (stat, df)
