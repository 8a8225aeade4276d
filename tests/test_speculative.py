"""Speculative decoding is lossless: greedy output is token-for-token the plain engine's, on every path.

ngram (prompt lookup) and draft_model, alone and batched with requests that get no proposals,
with heavy chunking, prefix-cache hits, forced preemption, stop tokens, max_tokens and n > 1;
the KV pool is full again afterwards. Proposals are forced (adaptive off) so verification really
runs, and each test checks that both accepted and rejected proposals happened.
"""

from __future__ import annotations

import pytest

from conftest import random_prompts
from fuselm import LLM, SamplingParams
from fuselm.core.request import Request

GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
         "adaptive": False}


def greedy_ids(llm: LLM, prompts, params=GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def assert_pool_full(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.kv.num_free_blocks == engine.runner.num_blocks
    spec = engine.speculator
    if spec is not None and spec.draft is not None:
        spec.draft.release_finished()
        assert spec.draft.num_free_blocks == spec.draft.runner.num_blocks


def assert_spec_exercised(llm: LLM) -> None:
    stats = llm.engine.speculator.stats
    assert stats.num_accepted_tokens > 0, "no proposal was accepted: the accept path was not tested"
    assert stats.num_accepted_tokens < stats.num_draft_tokens, "nothing was rejected: rollback was not tested"


@pytest.fixture(scope="module")
def prompts():
    # Repetitive prompts give prompt lookup matches; random ones give none (non-speculative rows).
    base = random_prompts([6, 11, 4, 25], seed=21)
    loops = [(b * 8)[: 40 + 7 * i] for i, b in enumerate(base)]
    return loops + random_prompts([3, 30, 70, 150], seed=22)


@pytest.fixture(scope="module")
def reference(tiny_llama, prompts):
    llm = LLM(tiny_llama[0], dtype="float32", device="cpu", max_num_batched_tokens=4096)
    return greedy_ids(llm, prompts)


@pytest.mark.parametrize("options", [
    {},  # one big budget, prefix caching on
    {"max_num_batched_tokens": 16},  # heavy chunking: speculation gets what prompt chunks leave
    {"max_num_batched_tokens": 7, "enable_prefix_caching": False},
    {"cpu_kernels": False},  # the portable attention path
])
def test_ngram_greedy_identical(tiny_llama, prompts, reference, options):
    llm = LLM(tiny_llama[0], dtype="float32", device="cpu", speculative_config=NGRAM, **options)
    assert greedy_ids(llm, prompts) == reference
    assert_spec_exercised(llm)
    assert_pool_full(llm)


def test_ngram_with_prefix_hits_and_preemption(tiny_llama, prompts, reference):
    path = tiny_llama[0]
    per_block = LLM(path, dtype="float32", device="cpu").engine.runner.bytes_per_block
    llm = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=64, kv_cache_memory_bytes=24 * per_block,
              speculative_config=NGRAM)
    assert greedy_ids(llm, prompts[:4]) == reference[:4]  # a first pass fills the prefix cache
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == reference
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.kv.num_hit_tokens > 0
    assert_spec_exercised(llm)
    assert_pool_full(llm)


def test_stop_tokens_max_tokens_and_n(tiny_llama, prompts, reference):
    """A stop token inside an accepted run ends the output exactly where plain decoding ends it."""
    path = tiny_llama[0]
    plain = LLM(path, dtype="float32", device="cpu")
    spec = LLM(path, dtype="float32", device="cpu", speculative_config=NGRAM)
    for p, ref in zip(prompts[:4], reference[:4]):
        stop = ref[len(ref) // 2]
        params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop_token_ids=[stop], n=2)
        want = plain.generate([p], params, use_tqdm=False)[0]
        got = spec.generate([p], params, use_tqdm=False)[0]
        assert [c.token_ids for c in got.outputs] == [c.token_ids for c in want.outputs]
        assert [c.finish_reason for c in got.outputs] == ["stop", "stop"]
        for max_tokens in (1, 2, 5):
            params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
            assert greedy_ids(spec, [p], params) == [ref[:max_tokens]]
    assert_spec_exercised(spec)
    assert_pool_full(spec)


def test_logprobs_match_plain(tiny_llama, prompts):
    path = tiny_llama[0]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=2)
    want = LLM(path, dtype="float32", device="cpu").generate(prompts[:2], params, use_tqdm=False)
    spec = LLM(path, dtype="float32", device="cpu", speculative_config=NGRAM)
    got = spec.generate(prompts[:2], params, use_tqdm=False)
    for w, g in zip(want, got):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for lw, lg in zip(w.outputs[0].logprobs, g.outputs[0].logprobs):
            assert lw.keys() == lg.keys()
            for tok in lw:
                assert lg[tok].rank == lw[tok].rank
                assert abs(lg[tok].logprob - lw[tok].logprob) < 1e-4
    assert got[0].metrics.spec_num_draft_tokens > 0


@pytest.mark.parametrize("draft", ["same", "other"])
def test_draft_model_greedy_identical(tiny_model_factory, tiny_llama, prompts, reference, draft):
    """The target as its own draft accepts everything; a different random model is mostly rejected."""
    path = tiny_llama[0]
    draft_path = path if draft == "same" else tiny_model_factory("llama_tied")[0]
    config = {"method": "draft_model", "model": draft_path, "num_speculative_tokens": 3, "adaptive": False}
    llm = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=32, speculative_config=config)
    assert greedy_ids(llm, prompts) == reference
    stats = llm.engine.speculator.stats
    if draft == "same":
        assert stats.num_accepted_tokens == stats.num_draft_tokens > 0
    else:
        assert stats.num_accepted_tokens < stats.num_draft_tokens
    assert_pool_full(llm)


def test_draft_model_with_preemption(tiny_llama, prompts, reference):
    path = tiny_llama[0]
    per_block = LLM(path, dtype="float32", device="cpu").engine.runner.bytes_per_block
    config = {"method": "draft_model", "model": path, "num_speculative_tokens": 4, "adaptive": False}
    llm = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=64, kv_cache_memory_bytes=24 * per_block,
              speculative_config=config)
    assert greedy_ids(llm, prompts) == reference
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.speculator.stats.num_accepted_tokens > 0
    assert_pool_full(llm)


def test_embedded_model_ngram_identical():
    # Two fresh engines in float32, compared speculation vs plain. The code sits in a fence: without one the
    # first answer token is a near tie ("def" over "```" by 0.05 in log-probability on a Zen 3) that other
    # kernels may break the other way; with it no greedy step of the 48 is closer than ~1.1.
    plain = LLM(dtype="float32")
    code = "\n".join(f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(12))
    prompt = [{"role": "user", "content": "Repeat this code exactly, then stop:\n\n```python\n" + code + "```"}]
    params = SamplingParams(temperature=0, max_tokens=48)
    want = plain.chat([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    assert "def f1(x):" in plain.get_tokenizer().decode(want)  # the answer copies the prompt: guesses can land
    # adaptive off: the adaptive rule weighs measured step times, and on a busy machine (late in the full suite)
    # it ran all 48 tokens without a guess
    spec = LLM(dtype="float32", speculative_config={"method": "ngram", "num_speculative_tokens": 4, "adaptive": False})
    got = spec.chat([prompt], params, use_tqdm=False)[0]
    assert got.outputs[0].token_ids == want
    assert got.metrics.spec_num_accepted_tokens > 0
    # a stop string met inside an accepted run of guesses cuts the output where plain decoding does
    text = plain.get_tokenizer().decode(want)
    stop = text[len(text) // 2:len(text) // 2 + 6]
    params = SamplingParams(temperature=0, max_tokens=48, stop=[stop])
    want_stop = plain.chat([prompt], params, use_tqdm=False)[0].outputs[0]
    got_stop = spec.chat([prompt], params, use_tqdm=False)[0].outputs[0]
    assert (got_stop.text, got_stop.token_ids, got_stop.finish_reason) == \
        (want_stop.text, want_stop.token_ids, "stop")
    assert_pool_full(spec)


@pytest.mark.parametrize("bad, message", [
    ({"method": "medusa"}, "method must be one of"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "prompt_lookup_min": 3, "prompt_lookup_max": 2}, "prompt_lookup_min"),
    ({"method": "draft_model"}, "needs 'model'"),
    ({"method": "ngram", "k": 4}, "unknown speculative_config key"),
    ("{not json", "not valid JSON"),
])
def test_bad_speculative_config(tiny_llama, bad, message):
    with pytest.raises(ValueError, match=message):
        LLM(tiny_llama[0], dtype="float32", device="cpu", speculative_config=bad)


def test_draft_vocab_mismatch(tiny_llama, tmp_path):
    from tiny_models import make_tiny_model

    make_tiny_model(tmp_path, "llama", vocab_size=320)
    config = {"method": "draft_model", "model": str(tmp_path)}
    with pytest.raises(ValueError, match="share the target's tokenizer"):
        LLM(tiny_llama[0], dtype="float32", device="cpu", speculative_config=config)


def test_draft_pending_tokens_follow_its_prefix_cache(tiny_llama):
    """What the plan charges a draft for starting on a request: the whole prompt when the draft has
    never seen it, only the part past its prefix cache when it has (a repeated system prompt)."""
    path = tiny_llama[0]
    config = {"method": "draft_model", "model": path, "num_speculative_tokens": 3, "adaptive": False}
    llm = LLM(path, dtype="float32", device="cpu", speculative_config=config)
    seen, unseen = random_prompts([70, 70], seed=5)
    llm.generate([seen], GREEDY, use_tqdm=False)  # the draft computes and caches `seen`
    engine, draft = llm.engine, llm.engine.speculator.draft
    bs = engine.kv.block_size

    def pending(prompt) -> int:
        req = Request("probe", None, prompt, SamplingParams(), 8, arrival_seq=0)
        engine.kv.find_cached_prefix(req)  # the target's lookup fills req.block_hashes
        return draft.pending_tokens(req)

    assert pending(unseen) == 70
    assert pending(seen) == 70 - (69 // bs) * bs  # every full block but the one holding the last token
    assert_pool_full(llm)


def test_verification_steps_take_the_c_layers(tiny_llama, prompts, reference):
    """Steps whose rows are decodes plus speculative tokens being verified run in the one-call C
    decode step (several query rows per sequence); output stays the plain engine's, and the same
    run through the torch layers gives the same tokens."""
    path = tiny_llama[0]
    llm = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=4096, speculative_config=NGRAM)
    model = llm.engine.runner.model
    if model.c_layers is None:
        pytest.skip("the C layers need the C kernels and fuselm's fp32 GEMM (AVX2+FMA)")
    multi_row_calls = []
    run = model.c_layers.run

    def counting(x, cos, sin, block_table, ctx_lens, num_single=None, *rest):
        if num_single is not None and num_single < x.shape[0]:
            multi_row_calls.append(x.shape[0])
        return run(x, cos, sin, block_table, ctx_lens, num_single, *rest)

    model.c_layers.run = counting
    assert greedy_ids(llm, prompts) == reference
    assert multi_row_calls, "no verification step took the fused path"
    assert_spec_exercised(llm)
    model.c_layers = None  # the torch layers, same proposals
    assert greedy_ids(llm, prompts) == reference
    assert_pool_full(llm)
