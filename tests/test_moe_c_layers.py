"""MoE layers in the one-call C layer step (decode_layers.c with moe.c's fuselm_moe_block): a Mixtral
model's decode and prompt steps run there, and match the torch layers (same C expert kernel inside)
and HF transformers, in float32 and with quantised GGUF experts; families the C step cannot run say why."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from conftest import random_prompts
from fuselm import LLM, SamplingParams
from fuselm.layers.moe import MoEBlock
from moe_models import make_tiny_moe, write_moe_gguf
from tiny_models import hf_greedy

PARAMS = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """8 experts, top-2, experts 256 wide (a multiple of GGUF's blocks): several tokens per expert at batch 8."""
    path = tmp_path_factory.mktemp("mixtral-c")
    return path, make_tiny_moe(path, "mixtral", expert_intermediate=256)


def run(llm: LLM, prompts):
    outs = llm.generate(prompts, PARAMS, use_tqdm=False)
    ids = [o.outputs[0].token_ids for o in outs]
    logprobs = [[step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outs]
    return ids, logprobs


def torch_layers(llm: LLM) -> LLM:
    """The same engine with the C layer step off: torch layers around the same C expert kernel."""
    llm.engine.runner.model.c_layers = None
    return llm


@pytest.mark.parametrize("expert_type", [None, Q.Q8_0, Q.Q4_0], ids=["hf-float32", "gguf-q8_0", "gguf-q4_0"])
def test_c_layer_step_matches_torch_layers(mixtral, tmp_path, expert_type):
    path, hf = mixtral
    model = str(path) if expert_type is None else str(write_moe_gguf(hf, "mixtral", path, tmp_path / "m.gguf",
                                                                    expert_type=expert_type))
    prompts = random_prompts([3, 7, 12, 20, 5, 9, 30, 16], seed=21)  # batch 8 x top-2 of 8 experts
    options = dict(dtype="float32", device="cpu", max_num_batched_tokens=24, enable_prefix_caching=False)
    c = LLM(model, **options)
    assert c.engine.runner.plan.layers == "c"
    assert c.engine.runner.model.c_layers.moe.blocks  # the MoE blocks are in the C step
    c_ids, c_logprobs = run(c, prompts)
    t_ids, t_logprobs = run(torch_layers(LLM(model, **options)), prompts)
    assert c_ids == t_ids
    assert max(abs(a - b) for x, y in zip(c_logprobs, t_logprobs) for a, b in zip(x, y)) < 1e-4
    if expert_type is None:  # the float model is HF's: greedy tokens equal transformers'
        assert c_ids == [hf_greedy(hf, p, PARAMS.max_tokens) for p in prompts]


@pytest.mark.parametrize("expert_type", [None, Q.Q8_0, Q.Q4_0], ids=["hf-float32", "gguf-q8_0", "gguf-q4_0"])
def test_c_layer_step_runs_the_qwen2_moe_shared_expert(tmp_path, expert_type):
    """Qwen2-MoE's shared expert (a gated MLP every row takes, scaled by sigmoid of its [1, hidden] gate) inside
    the C layer step: greedy tokens and logprobs of the torch layers, and HF's greedy tokens for the float model."""
    hf = make_tiny_moe(tmp_path / "hf", "qwen2_moe", expert_intermediate=256, seed=3)
    with torch.no_grad():  # the tiny model's shared expert moves logprobs by ~1e-5; scaled, by ~1e-3
        for layer in (layer for layer in hf.model.layers if hasattr(layer.mlp, "shared_expert")):
            layer.mlp.shared_expert.down_proj.weight.mul_(300.0)
    hf.save_pretrained(tmp_path / "hf")
    model = str(tmp_path / "hf") if expert_type is None else str(
        write_moe_gguf(hf, "qwen2_moe", tmp_path / "hf", tmp_path / "m.gguf", expert_type=expert_type,
                       layer_types={"ffn_gate_shexp.weight": expert_type, "ffn_up_shexp.weight": expert_type}))
    # (the shared down projection, 48 wide, stays float: GGUF blocks are 32)
    prompts = random_prompts([3, 7, 12, 20, 5, 9, 30, 16], seed=22)
    options = dict(dtype="float32", device="cpu", max_num_batched_tokens=24, enable_prefix_caching=False)
    c = LLM(model, **options)
    assert c.engine.runner.plan.layers == "c", c.engine.runner.plan.reasons
    moe = c.engine.runner.model.c_layers.moe
    assert all(struct.shared_gate_up for struct in moe.structs.values())  # the shared expert is in the C step
    c_ids, c_logprobs = run(c, prompts)
    t_ids, t_logprobs = run(torch_layers(LLM(model, **options)), prompts)

    def differ(logprobs) -> float:
        return max(abs(a - b) for x, y in zip(c_logprobs, logprobs) for a, b in zip(x, y))

    assert c_ids == t_ids and differ(t_logprobs) < 2e-5
    if expert_type is None:
        assert c_ids == [hf_greedy(hf, p, PARAMS.max_tokens) for p in prompts]
    without = torch_layers(LLM(model, **options))
    for layer in without.engine.runner.model.layers:
        if isinstance(layer.mlp, MoEBlock):
            layer.mlp.shared_expert = None
    assert differ(run(without, prompts)[1]) > 5e-4  # the comparison above sees a missing shared expert


def test_c_layer_step_runs_qwen3_moe(tmp_path):
    """Qwen3-MoE (per-head q/k norms, renormalised top-k) in the C layer step: the torch layers' tokens and
    logprobs, HF's greedy tokens."""
    hf = make_tiny_moe(tmp_path, "qwen3_moe", expert_intermediate=256, seed=4)
    prompts = random_prompts([3, 7, 12, 20, 5, 9], seed=23)
    options = dict(dtype="float32", device="cpu", max_num_batched_tokens=24, enable_prefix_caching=False)
    c = LLM(str(tmp_path), **options)
    assert c.engine.runner.plan.layers == "c", c.engine.runner.plan.reasons
    c_ids, c_logprobs = run(c, prompts)
    t_ids, t_logprobs = run(torch_layers(LLM(str(tmp_path), **options)), prompts)
    assert c_ids == t_ids
    assert max(abs(a - b) for x, y in zip(c_logprobs, t_logprobs) for a, b in zip(x, y)) < 1e-4
    assert c_ids == [hf_greedy(hf, p, PARAMS.max_tokens) for p in prompts]


def test_c_layer_step_records_the_routing(mixtral):
    path, _ = mixtral
    prompts = random_prompts([4, 11, 17], seed=5)
    options = dict(dtype="float32", device="cpu", max_num_batched_tokens=16, enable_prefix_caching=False)
    c = LLM(str(path), **options)
    t = torch_layers(LLM(str(path), **options))
    assert run(c, prompts)[0] == run(t, prompts)[0]
    assert c.engine.runner.expert_stats.to_json() == t.engine.runner.expert_stats.to_json()


def test_c_layer_step_runs_olmoe_with_its_clamp(tmp_path):
    """OLMoE (q/k norms over the whole projection, q/k/v clamped to +-clip_qkv) in the C layer step, with the clamp
    set low enough to cut values: the torch layers' tokens and logprobs, HF's greedy tokens; the same engine
    without the clamp gives other logprobs, so the comparison sees it."""
    import json

    import transformers

    make_tiny_moe(tmp_path, "olmoe", expert_intermediate=256, seed=5)
    config = json.loads((tmp_path / "config.json").read_text())
    config["clip_qkv"] = 0.5
    (tmp_path / "config.json").write_text(json.dumps(config))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompts = random_prompts([3, 7, 12, 20, 5, 9], seed=24)
    options = dict(dtype="float32", device="cpu", max_num_batched_tokens=24, enable_prefix_caching=False)
    c = LLM(str(tmp_path), **options)
    assert c.engine.runner.plan.layers == "c", c.engine.runner.plan.reasons
    assert all(layer.clip_qkv == 0.5 and layer.qk_norm_whole == 1 for layer in c.engine.runner.model.c_layers.layers)
    c_ids, c_logprobs = run(c, prompts)
    t_ids, t_logprobs = run(torch_layers(LLM(str(tmp_path), **options)), prompts)

    def differ(logprobs) -> float:
        return max(abs(a - b) for x, y in zip(c_logprobs, logprobs) for a, b in zip(x, y))

    assert c_ids == t_ids and differ(t_logprobs) < 1e-4
    assert c_ids == [hf_greedy(hf, p, PARAMS.max_tokens) for p in prompts]
    unclamped = torch_layers(LLM(str(tmp_path), **options))
    for layer in unclamped.engine.runner.model.layers:
        layer.self_attn.clip_qkv = None
    assert differ(run(unclamped, prompts)[1]) > 1e-3


@pytest.mark.parametrize("layers,tokens", [(1, 3), (4, 1), (3, 9)])
def test_routing_statistics_of_all_layers_at_once_equal_one_layer_at_a_time(layers, tokens):
    """ExpertStats.record_all (the C layer step's one call per step) against `record` called for each layer in order."""
    from fuselm.runner.expert_stats import ExpertStats

    g = torch.Generator().manual_seed(layers * 10 + tokens)
    together, alone = (ExpertStats(list(range(layers)), 8, 2, torch.device("cpu")) for _ in range(2))
    load = [[0] * 8 for _ in range(layers)]  # the counts by plain loops
    pairs = [[[0] * 8 for _ in range(8)] for _ in range(layers - 1)]
    for _ in range(3):  # three steps
        ids = torch.stack([torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(tokens)])
                           for _ in range(layers)])  # [layers, tokens, 2]
        together.record_all(ids)
        for p in range(layers):
            alone.record(p, ids[p])
        for p, rows in enumerate(ids.tolist()):
            for t, row in enumerate(rows):
                for e in row:
                    load[p][e] += 1
                    if p + 1 < layers:
                        for nxt in ids[p + 1, t].tolist():
                            pairs[p][e][nxt] += 1
    assert together.to_json() == alone.to_json()
    assert together.load.tolist() == load and together.co_occurrence.tolist() == pairs
    assert together.steps == 3 and together.tokens == 3 * tokens
