"""The kernel choice by measurement (fuselm/runner/kernel_choice.py): every candidate a role can take
matches the float64 reference, the cache key follows the CPU and the shapes, a cached result is
read back instead of timing again, busy-machine timings are not trusted, and FUSELM_KERNEL_CHOICE
forces choices that an engine honours (its greedy output equal to the portable torch path's)."""

from __future__ import annotations

import time

import pytest
import torch

from conftest import random_prompts
from fuselm import LLM, SamplingParams
from fuselm.kernels import build
from fuselm.kernels.cpu import get_kernels
from fuselm.kernels.onednn import onednn_available, pack_weight
from fuselm.layers.linear import TorchLinear
from fuselm.runner import kernel_choice
from fuselm.runner.execution_plan import linear_candidates
from fuselm.runner.kernel_choice import CHOICE_ENV, Override, cache_path, choose_linear_kinds, environment_key

kernels = get_kernels()


def _linear(n, k, dtype, bias, seed):
    g = torch.Generator().manual_seed(seed)
    module = TorchLinear(k, n, bias=bias)
    with torch.no_grad():
        module.weight.copy_(torch.randn(n, k, generator=g))
        if bias:
            module.bias.copy_(torch.randn(n, generator=g))
    return module.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("role", ["qkv", "lm_head"])
@pytest.mark.parametrize("bias", [False, True])
def test_every_candidate_matches_float64(dtype, role, bias):
    module = _linear(80, 64, dtype, bias, seed=3)
    candidates = linear_candidates(module, kernels, onednn_available(), role)
    assert next(reversed(candidates)) == "torch"  # F.linear is always a candidate, and the last resort
    if kernels is not None and kernels.has_simd_dense and dtype == torch.float32:
        assert next(iter(candidates)) == "fuselm-fp32-gemm"
    w = module.weight.double()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for kind, make in candidates.items():
        method = make()
        assert method.kind == kind
        for m in (1, 5, 70):
            x = torch.randn(m, 64, generator=torch.Generator().manual_seed(m)).to(dtype)
            want = x.double() @ w.T + (module.bias.double() if bias else 0)
            got = method(x).double()
            scale = (x.double().abs() @ w.abs().T).max().item() + 1
            assert (got - want).abs().max().item() <= tol * scale, (kind, m)


def test_cache_key_follows_cpu_model_and_shapes(monkeypatch):
    key = {**environment_key(kernels), "role": "qkv", "shape": [960, 576]}
    assert cache_path(key) == cache_path(dict(key))
    assert cache_path({**key, "shape": [1152, 576]}) != cache_path(key)
    assert cache_path({**key, "threads": key["threads"] + 1}) != cache_path(key)
    monkeypatch.setattr(build, "cpu_model_name", lambda: "Another CPU")
    other = {**environment_key(kernels), "role": "qkv", "shape": [960, 576]}
    assert other["cpu"] == "Another CPU" and cache_path(other) != cache_path(key)


def test_cpu_name_tells_apart_hosts_with_the_same_model_name():
    """Cloud guests on a Zen 4 and a Zen 5 host both read "AMD EPYC": family/model/stepping keep their
    measured choices apart; the first processor's block is the one described."""
    block = "processor\t: {}\nvendor_id\t: AuthenticAMD\ncpu family\t: {}\nmodel\t\t: {}\nmodel name\t: AMD EPYC\nstepping\t: 1\n"
    zen4 = block.format(0, 25, 17) + "\n" + block.format(1, 99, 99)
    zen5 = block.format(0, 26, 2)
    assert build.cpu_model_name(zen4) == "AMD EPYC (family 25 model 17 stepping 1)"
    assert build.cpu_model_name(zen5) == "AMD EPYC (family 26 model 2 stepping 1)"
    assert build.cpu_model_name("processor\t: 0\nmodel name\t: Some CPU\n") == "Some CPU"


def _roles():
    return {"qkv": (torch.empty(4, 8), {"slow-default": None, "fast": None, "torch": None})}


def test_measured_choice_is_cached_and_busy_timings_are_not_trusted(monkeypatch, tmp_path):
    monkeypatch.setenv("FUSELM_CACHE_DIR", str(tmp_path))
    calls = []

    def fake_measure(candidates, in_features, dtype, rows):
        calls.append(rows)
        return {"slow-default": [2.0] * len(rows), "fast": [1.0] * len(rows), "torch": [1.9] * len(rows)}

    monkeypatch.setattr(kernel_choice, "measure_linear", fake_measure)
    monkeypatch.setattr(kernel_choice, "machine_busy", lambda: True)  # busy already: nothing is timed
    chosen, timings = choose_linear_kinds(_roles(), kernels, None, max_num_seqs=32, max_num_batched_tokens=512)
    assert chosen == {"qkv": "slow-default"} and timings["qkv"].busy and calls == []
    busy = iter([False, True])  # busy while timing: shown, neither trusted nor stored
    monkeypatch.setattr(kernel_choice, "machine_busy", lambda: next(busy))
    chosen, timings = choose_linear_kinds(_roles(), kernels, None, max_num_seqs=32, max_num_batched_tokens=512)
    assert chosen == {"qkv": "slow-default"} and timings["qkv"].busy and calls == [(1, 32, 256)]
    assert "fast" in timings["qkv"].describe()
    monkeypatch.setattr(kernel_choice, "machine_busy", lambda: False)
    chosen, timings = choose_linear_kinds(_roles(), kernels, None, max_num_seqs=32, max_num_batched_tokens=512)
    assert chosen == {"qkv": "fast"} and not timings["qkv"].cache_hit and len(calls) == 2
    chosen, timings = choose_linear_kinds(_roles(), kernels, None, max_num_seqs=32, max_num_batched_tokens=512)
    assert chosen == {"qkv": "fast"} and timings["qkv"].cache_hit and len(calls) == 2  # read back, not timed
    chosen, _ = choose_linear_kinds(_roles(), kernels, None, max_num_seqs=8, max_num_batched_tokens=512)
    assert len(calls) == 3  # other row counts: another key


def test_rounds_are_cut_to_the_budget():
    calls = []
    kernel_choice.time_interleaved({"slow": lambda: (calls.append(1), time.sleep(0.05))},
                                   rounds=10, budget_s=0.12)
    assert 2 <= len(calls) <= 4  # the warm-up and two rounds, not ten
    calls.clear()
    best = kernel_choice.time_interleaved({"slow": lambda: (calls.append(1), time.sleep(0.05))}, budget_s=0.01)
    assert len(calls) == 1 and best["slow"] >= 0.05  # over budget on the warm-up: it is the measurement


def test_default_keeps_its_place_within_the_margin():
    assert kernel_choice.pick({"rule": [1.0, 1.0], "other": [0.97, 0.97]}, "rule") == "rule"
    assert kernel_choice.pick({"rule": [1.0, 1.0], "other": [0.5, 0.9]}, "rule") == "other"


def test_bad_override_is_a_clear_error(monkeypatch):
    for text in ("qkv", "nonsense=onednn", "layers=fast", "tile_rows=tall", "tile_rows=0"):
        monkeypatch.setenv(CHOICE_ENV, text)
        with pytest.raises(ValueError, match=CHOICE_ENV):
            Override.from_env()
    monkeypatch.setenv(CHOICE_ENV, "qkv=fuselm-fp32-gemm")
    with pytest.raises(ValueError, match="does not apply"):
        choose_linear_kinds({"qkv": (torch.empty(4, 8, dtype=torch.bfloat16), {"onednn": None, "torch": None})},
                            kernels, Override.from_env(), 8, 64)


@pytest.mark.skipif(kernels is None or kernels.dense_max_tile_rows < max(kernel_choice.TILE_ROWS_CANDIDATES),
                    reason="needs the AVX-512 fp32 GEMM tiles")
def test_tile_rows_choice_is_measured_forced_and_never_changes_results(monkeypatch, tmp_path):
    """The tile height is timed on the machine (and cached), forced by the override, and every height gives the
    GEMM's bits at any row count (each output is one FMA chain whatever the tile)."""
    monkeypatch.setenv("FUSELM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(kernel_choice, "machine_busy", lambda: False)
    try:
        t = kernel_choice.choose_tile_rows(kernels, None, 256, 96, 16, 64)
        assert set(t.seconds) == {str(c) for c in kernel_choice.TILE_ROWS_CANDIDATES} and not t.cache_hit
        assert t.chosen in t.seconds and all(len(v) == len(t.rows) for v in t.seconds.values())
        assert kernel_choice.choose_tile_rows(kernels, None, 256, 96, 16, 64).cache_hit
        monkeypatch.setenv(CHOICE_ENV, "tile_rows=5")
        assert kernel_choice.choose_tile_rows(kernels, Override.from_env(), 256, 96, 16, 64) is None
        g = torch.Generator().manual_seed(3)
        w = torch.randn(200, 96, generator=g)
        packed = kernels.dense_pack(w)
        for m in (1, 7, 13, 37, 100):
            x = torch.randn(m, 96, generator=g)
            outs = []
            for rows in (kernels.dense_max_tile_rows, 8, 5, 1):
                kernels.set_dense_tile_rows(rows)
                outs.append(kernels.dense_linear(x, packed, None, 200))
            torch.testing.assert_close(outs[0], (x.double() @ w.double().T).float(), rtol=1e-4, atol=1e-4)
            assert all(torch.equal(outs[0], o) for o in outs[1:])
    finally:
        kernels.set_dense_tile_rows(kernels.dense_max_tile_rows)


@pytest.mark.skipif(kernels is None or not kernels.has_simd_dense or not onednn_available(),
                    reason="needs the C kernels with the fp32 GEMM, and oneDNN")
def test_forced_choice_is_honoured_by_the_engine(tiny_model_factory, monkeypatch):
    path, _ = tiny_model_factory("llama_untied")
    prompts = random_prompts([3, 17, 40], seed=5)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    monkeypatch.setenv(CHOICE_ENV, "qkv=onednn,o=torch,lm_head=onednn,layers=torch")
    forced = LLM(path, dtype="float32", device="cpu", cpu_kernels=True, max_num_batched_tokens=32)
    plan = forced.engine.runner.plan
    assert plan.linear == {"qkv": "onednn", "o": "torch", "gate_up": "fuselm-fp32-gemm", "down": "fuselm-fp32-gemm",
                           "lm_head": "onednn"}
    assert plan.layers == "torch" and forced.engine.runner.model.c_layers is None
    plain = LLM(path, dtype="float32", device="cpu", cpu_kernels=False)
    for a, b in zip(forced.generate(prompts, params, use_tqdm=False), plain.generate(prompts, params, use_tqdm=False)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids


@pytest.mark.skipif(kernels is None or not kernels.has_simd_dense, reason="needs the C kernels with the fp32 GEMM")
def test_measured_engine_matches_portable_path(tiny_model_factory, monkeypatch, tmp_path):
    """With measurement on, whatever it picks computes what the torch path does, and the plan line
    names the timings; a second engine reads them from the cache."""
    monkeypatch.setenv(CHOICE_ENV, "measure")
    monkeypatch.setenv("FUSELM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(kernel_choice, "machine_busy", lambda: False)
    path, _ = tiny_model_factory("qwen2_bias")
    prompts = random_prompts([3, 20], seed=7)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    measured = LLM(path, dtype="float32", device="cpu", cpu_kernels=True, max_num_seqs=4, max_num_batched_tokens=32)
    plan = measured.engine.runner.plan
    # the C layers read only fuselm's layout: the layer roles keep it, and the C layer step is timed instead
    tiles = {"tile_rows"} if kernels.dense_max_tile_rows >= max(kernel_choice.TILE_ROWS_CANDIDATES) else set()
    assert set(plan.measured) == {"lm_head", "layers", "chunks"} | tiles and "measured" in plan.summary()
    assert plan.chunks == ("c" if plan.measured["chunks"].chosen == "c" else "torch-sdpa")
    assert all(plan.linear[role] == "fuselm-fp32-gemm" for role in ("qkv", "o", "gate_up", "down"))
    assert not any(t.cache_hit for t in plan.measured.values())
    plain = LLM(path, dtype="float32", device="cpu", cpu_kernels=False)
    for a, b in zip(measured.generate(prompts, params, use_tqdm=False), plain.generate(prompts, params, use_tqdm=False)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    again = LLM(path, dtype="float32", device="cpu", cpu_kernels=True, max_num_seqs=4, max_num_batched_tokens=32)
    assert all(t.cache_hit for t in again.engine.runner.plan.measured.values())
    assert again.engine.runner.plan.linear == plan.linear and again.engine.runner.plan.layers == plan.layers


def _counting(monkeypatch, obj, name):
    """Count the calls of obj.name, which still runs."""
    calls = []
    real = getattr(obj, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, counted)
    return calls


@pytest.mark.skipif(kernels is None, reason="needs the C kernels")
@pytest.mark.parametrize("forced", [None, "chunks=torch"])
def test_prompt_chunks_take_the_chosen_attention_also_with_no_query_rows(tiny_model_factory, monkeypatch, forced):
    """A step of prompt chunks alone (one request on an idle engine) attends through the C chunk kernel where the
    plan says chunks=c (it took torch's SDPA whenever no query row shared the step), through SDPA where the
    override says torch; either way the greedy tokens are the portable torch path's."""
    monkeypatch.setenv(CHOICE_ENV, forced or "rules")
    path, _ = tiny_model_factory("llama_untied")
    prompts = random_prompts([40, 70], seed=11)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm = LLM(path, dtype="float32", device="cpu", cpu_kernels=True, max_num_seqs=1, max_num_batched_tokens=32)
    runner = llm.engine.runner
    assert runner.plan.chunks == ("torch-sdpa" if forced else "c")
    assert f"chunks={runner.plan.chunks}" in runner.plan.summary()
    chunk_calls = _counting(monkeypatch, runner.cpu_kernels, "chunk_attention")
    outs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]  # one at a time: no decode row beside
    layers = runner.model_config.num_hidden_layers
    # 40 tokens: chunks of 32 + 8, 70: 32 + 32 + 6; chunks of up to 16 tokens attend as query rows
    assert len(chunk_calls) == (0 if forced else 3 * layers)
    plain = LLM(path, dtype="float32", device="cpu", cpu_kernels=False)
    for a, b in zip(outs, plain.generate(prompts, params, use_tqdm=False)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids


@pytest.mark.skipif(kernels is None, reason="needs the C kernels")
def test_chunk_attention_choice_is_timed_and_cached(tiny_model_factory, monkeypatch, tmp_path):
    """The C chunk kernel and torch's SDPA are both timed on the engine's own cache at two shapes, the faster
    (within the margin, the C kernel) set in the plan, and a second engine reads the timings back."""
    monkeypatch.setenv(CHOICE_ENV, "measure")
    monkeypatch.setenv("FUSELM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(kernel_choice, "machine_busy", lambda: False)
    path, _ = tiny_model_factory("llama_untied")
    llm = LLM(path, dtype="float32", device="cpu", cpu_kernels=True, max_num_seqs=2, max_num_batched_tokens=48)
    t = llm.engine.runner.plan.measured["chunks"]
    assert set(t.seconds) == {"c", "torch"} and all(len(v) == 2 and min(v) > 0 for v in t.seconds.values())
    assert t.rows == (0, 48) and not t.cache_hit
    assert t.chosen == kernel_choice.pick(t.seconds, "c")
    assert llm.engine.runner.plan.chunks == ("c" if t.chosen == "c" else "torch-sdpa")
    again = LLM(path, dtype="float32", device="cpu", cpu_kernels=True, max_num_seqs=2, max_num_batched_tokens=48)
    assert again.engine.runner.plan.measured["chunks"].cache_hit
    assert again.engine.runner.plan.chunks == llm.engine.runner.plan.chunks


@pytest.mark.skipif(kernels is None or not onednn_available(), reason="needs the C kernels and oneDNN")
def test_every_role_is_timed_where_the_c_layers_cannot_run(tiny_model_factory, monkeypatch, tmp_path):
    """bfloat16 activations: no C layers, so each projection role is timed on its own, where oneDNN can pack a
    bfloat16 weight at all (it cannot without AVX-512, e.g. on a Zen 3: then torch's F.linear is every role's one
    candidate, and of the roles nothing is timed)."""
    monkeypatch.setenv(CHOICE_ENV, "measure")
    monkeypatch.setenv("FUSELM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(kernel_choice, "machine_busy", lambda: False)
    path, _ = tiny_model_factory("llama_untied")
    llm = LLM(path, dtype="bfloat16", device="cpu", cpu_kernels=True, max_num_seqs=4, max_num_batched_tokens=32)
    plan = llm.engine.runner.plan
    packs_bf16 = pack_weight(torch.randn(16, 64, dtype=torch.bfloat16)) is not None
    roles = {"qkv", "o", "gate_up", "down", "lm_head"}
    # prompt chunks' attention is timed too: the chunk kernel widens bfloat16 queries
    assert set(plan.measured) == (roles if packs_bf16 else set()) | {"chunks"} and plan.layers == "torch"
    assert all(plan.linear[role] == plan.measured[role].chosen for role in plan.measured if role != "chunks")
    if not packs_bf16:
        assert all(plan.linear[role] == TorchLinear.kind for role in roles)


@pytest.mark.skipif(kernels is None or not kernels.has_simd_dense, reason="needs the C kernels with the fp32 GEMM")
def test_router_faster_in_torch_does_not_cost_the_c_layer_step(tmp_path, monkeypatch):
    """An MoE router is read by the C layer step: even where torch times faster on it alone, it keeps
    fuselm's layout (untimed) and the C layer step stays, measured as a whole."""
    from moe_models import make_tiny_moe

    make_tiny_moe(tmp_path / "mixtral", "mixtral", expert_intermediate=256)
    monkeypatch.setenv(CHOICE_ENV, "measure")
    monkeypatch.setenv("FUSELM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(kernel_choice, "machine_busy", lambda: False)

    def torch_always_fastest(candidates, in_features, dtype, rows):
        return {kind: [1e-6 if kind == TorchLinear.kind else 1e-3] * len(rows) for kind in candidates}

    monkeypatch.setattr(kernel_choice, "measure_linear", torch_always_fastest)
    monkeypatch.setattr(kernel_choice, "measure_layer_step", lambda runner, steps: {"c": [1e-6] * len(steps), "torch": [1e-3] * len(steps)})
    llm = LLM(str(tmp_path / "mixtral"), dtype="float32", device="cpu", max_num_seqs=4, max_num_batched_tokens=32)
    plan = llm.engine.runner.plan
    assert "router" not in plan.measured and plan.linear["router"] != TorchLinear.kind
    assert plan.layers == "c" and llm.engine.runner.model.c_layers is not None
    assert plan.linear["lm_head"] == TorchLinear.kind  # the roles the C layers do not read are still measured
