"""Expert parallelism over 2 ranks (gloo, CPU) against one process, and the routing statistics.

EP=2 on tiny MoE models (Mixtral; Qwen2-MoE with its tensor-parallel shared expert and a dense
layer) must give the greedy tokens of the same engine in one process, prompt logprobs within 1e-4,
through chunked prompts, prefix-cache hits and preemption (the same KV pool on both), and record the
same routing counts. The same with a placement file (rank 0 then holds the experts the file gives
it) and with a GGUF file whose stacked experts are Q8_0. The routing counts one process records
equal the top-k of HF transformers' router logits over the tokens the engine computed.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import random_prompts
from fuselm import LLM, SamplingParams
from fuselm.errors import InvalidConfigError
from fuselm.parallel.expert_parallel import ExpertPlacement
from moe_models import make_tiny_moe

BLOCKS = 14  # a pool this small preempts with the prompts below
BASE = dict(dtype="float32", device="cpu", max_model_len=160, max_num_batched_tokens=40, max_num_seqs=8)
EP2 = dict(tensor_parallel_size=2, enable_expert_parallel=True)


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    cache: dict[str, tuple] = {}

    def get(kind: str):
        if kind not in cache:
            path = tmp_path_factory.mktemp(kind)
            cache[kind] = (str(path), make_tiny_moe(path, kind))
        return cache[kind]

    return get


def block_bytes(hf_config, ranks: int) -> int:
    """One KV block's bytes on one rank (float32 K and V; the tiny models' 2 KV heads split over the ranks)."""
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    return 2 * hf_config.num_hidden_layers * 16 * (hf_config.num_key_value_heads // ranks) * head_dim * 4


def workload() -> tuple[list[list[int]], list[SamplingParams]]:
    """A shared 40-token prefix (prefix hits), prompts long enough to be chunked, more than the pool holds;
    half of them score their prompts (prompt logprobs)."""
    shared = random_prompts([40], seed=7)[0]
    prompts = [shared + p for p in random_prompts([9, 23, 5], seed=1)] + random_prompts([57, 31, 46], seed=2)
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    scored = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, prompt_logprobs=1)
    return prompts, [greedy] * 3 + [scored] * 3


def run(model: str, hf_config, ranks: int, **options):
    options = {**BASE, **(EP2 if ranks == 2 else {}), **options}
    llm = LLM(model, kv_cache_memory_bytes=BLOCKS * block_bytes(hf_config, ranks), **options)
    try:
        prompts, params = workload()
        first = llm.generate(prompts[:1], params[:1], use_tqdm=False)  # its prefix blocks get cached
        outs = first + llm.generate(prompts[1:], params[1:], use_tqdm=False)
        engine = llm.engine
        facts = dict(blocks=engine.runner.num_blocks, preemptions=engine.scheduler.num_preemptions,
                     cached=sum(o.num_cached_tokens for o in outs), stats=engine.runner.expert_stats.to_json(),
                     held=[getattr(layer.mlp, "local_experts", None) for layer in engine.runner.model.layers],
                     ranks=getattr(engine.runner, "ranks", None), weight_bytes=engine.runner.weight_bytes)
        return outs, facts
    finally:
        llm.engine.shutdown()


def assert_same(reference, outs) -> None:
    for ref, got in zip(reference, outs, strict=True):
        assert got.outputs[0].token_ids == ref.outputs[0].token_ids
        if ref.prompt_logprobs is None:
            continue
        pairs = zip(ref.prompt_token_ids[1:], ref.prompt_logprobs[1:], got.prompt_logprobs[1:], strict=True)
        assert max(abs(a[token].logprob - b[token].logprob) for token, a, b in pairs) < 1e-4


def assert_same_run(single, ep) -> None:
    assert ep["blocks"] == single["blocks"] == BLOCKS
    assert single["preemptions"] > 0 and ep["preemptions"] > 0, "the pool was meant to run dry"
    assert single["cached"] > 0 and ep["cached"] > 0, "the shared prefix was meant to hit the cache"
    assert ep["stats"]["load"] == single["stats"]["load"]  # the same tokens, routed alike
    assert ep["stats"]["co_occurrence"] == single["stats"]["co_occurrence"]


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_ep2_matches_one_process(kind, tiny_moe):
    path, hf = tiny_moe(kind)
    reference, single = run(path, hf.config, 1)
    outs, ep = run(path, hf.config, 2)
    assert_same_run(single, ep)
    assert_same(reference, outs)
    experts = hf.config.num_local_experts if kind == "mixtral" else hf.config.num_experts
    sparse = [held for held in ep["held"] if held is not None]
    assert sparse and all(held == list(range(0, experts, 2)) for held in sparse)  # round-robin: rank 0 the even ones
    for rank in ep["ranks"]:  # each rank holds about half of the weights
        assert 0.4 < rank.weight_bytes / single["weight_bytes"] < 0.62, rank


def test_ep2_with_a_placement_file(tiny_moe, tmp_path):
    path, hf = tiny_moe("qwen3_moe")
    owners = {0: [0, 0, 1, 1, 0, 1, 1, 0], 1: [1, 1, 1, 0, 0, 0, 1, 0]}
    file = tmp_path / "placement.json"
    file.write_text(json.dumps(ExpertPlacement(2, 8, owners).to_json()))
    reference, single = run(path, hf.config, 1)
    outs, ep = run(path, hf.config, 2, expert_placement=str(file))
    assert_same_run(single, ep)
    assert_same(reference, outs)
    assert ep["held"] == [[0, 1, 4, 7], [3, 4, 5, 7]]


def test_ep2_gguf_with_q8_0_experts(tiny_moe, tmp_path):
    from gguf import GGMLQuantizationType as Q

    from moe_models import write_moe_gguf

    path, hf = tiny_moe("mixtral")
    gguf = str(write_moe_gguf(hf, "mixtral", path, tmp_path / "tiny.gguf", expert_type=Q.Q8_0))
    reference, single = run(gguf, hf.config, 1)
    outs, ep = run(gguf, hf.config, 2)
    assert "int8g32" in ep["ranks"][1].plan
    assert_same_run(single, ep)
    assert_same(reference, outs)


@pytest.mark.parametrize("cpu_kernels", [False, True], ids=["torch", "c"])  # c: Mixtral's stats from the C layer step
@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_expert_stats_match_hf_router_top_k(kind, cpu_kernels, tiny_moe, tmp_path):
    path, hf = tiny_moe(kind)
    prompts = random_prompts([5, 19, 33], seed=4)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm = LLM(path, dtype="float32", device="cpu", cpu_kernels=cpu_kernels, enable_prefix_caching=False,
              max_num_batched_tokens=16)
    outs = llm.generate(prompts, params, use_tqdm=False)
    stats = llm.dump_expert_stats(tmp_path / "stats.json")
    assert json.loads((tmp_path / "stats.json").read_text()) == stats

    experts, top_k = stats["num_experts"], stats["top_k"]
    load = torch.zeros(len(stats["layers"]), experts, dtype=torch.long)
    co = torch.zeros(len(stats["layers"]) - 1, experts, experts, dtype=torch.long)
    for prompt, out in zip(prompts, outs):  # the tokens computed: the prompt and every output but the last
        ids = torch.tensor([prompt + out.outputs[0].token_ids[:-1]])
        with torch.no_grad():
            router = hf(ids, output_router_logits=True).router_logits  # the MoE layers', [T, E] each
        chosen = [logits.topk(top_k, dim=-1).indices for logits in router]  # [T, k] per MoE layer
        for p, ids_p in enumerate(chosen):
            load[p] += torch.bincount(ids_p.reshape(-1), minlength=experts)
            if p + 1 < len(chosen):
                for a, b in zip(ids_p.tolist(), chosen[p + 1].tolist()):
                    for x in a:
                        for y in b:
                            co[p, x, y] += 1
    assert stats["load"] == load.tolist()
    assert stats["co_occurrence"] == co.tolist()
    assert stats["tokens"] == sum(len(p) + len(o.outputs[0].token_ids) - 1 for p, o in zip(prompts, outs))


def test_expert_parallel_options_are_checked(tiny_moe, tiny_llama, tmp_path):
    path, _ = tiny_moe("mixtral")
    with pytest.raises(InvalidConfigError) as err:
        LLM(path, enable_expert_parallel=True, **BASE)
    assert err.value.option == "enable_expert_parallel"
    with pytest.raises(InvalidConfigError) as err:
        LLM(path, tensor_parallel_size=2, **BASE)  # an MoE model needs expert parallelism to be split
    assert "enable_expert_parallel" in str(err.value)
    with pytest.raises(InvalidConfigError) as err:
        LLM(tiny_llama[0], **EP2, **BASE)
    assert err.value.option == "enable_expert_parallel" and "no experts" in str(err.value)
    file = tmp_path / "three.json"
    file.write_text(json.dumps(ExpertPlacement.round_robin([0, 1], 8, 4).to_json()))
    with pytest.raises(InvalidConfigError) as err:
        LLM(path, expert_placement=str(file), **EP2, **BASE)
    assert err.value.option == "expert_placement" and "4 ranks" in str(err.value)
    uneven = {0: [0] * 6 + [1] * 2, 1: [0, 1] * 4}
    file.write_text(json.dumps(ExpertPlacement(2, 8, uneven).to_json()))
    with pytest.raises(InvalidConfigError) as err:
        LLM(path, expert_placement=str(file), **EP2, **BASE)
    assert err.value.option == "expert_placement" and "layer 0" in str(err.value)
    with pytest.raises(InvalidConfigError) as err:
        LLM(tiny_llama[0], **BASE).dump_expert_stats(tmp_path / "none.json")
    assert "no experts" in str(err.value)


def test_server_exposes_routing_statistics(tiny_moe):
    import httpx

    from fuselm.engine.async_engine import AsyncLLMEngine
    from fuselm.server.app import build_app
    from fuselm.server.metrics import MOE_METRIC_NAMES
    from server_helpers import MODEL, ServerThread

    path, _ = tiny_moe("mixtral")
    engine = AsyncLLMEngine.from_options(path, **BASE)
    server = ServerThread(build_app(engine, MODEL)).start()
    try:
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            body = {"model": MODEL, "prompt": [5, 6, 7, 8, 9], "max_tokens": 4, "temperature": 0, "ignore_eos": True}
            assert client.post("/v1/completions", json=body).status_code == 200
            stats = client.get("/expert_stats").json()
            page = client.get("/metrics").text
        assert stats["layers"] == [0, 1] and stats["tokens"] == 5 + 3
        assert [sum(layer) for layer in stats["load"]] == [8 * 2, 8 * 2]  # 8 tokens x top-2
        for name in MOE_METRIC_NAMES:
            assert name in page
        for layer, load in enumerate(stats["load"]):
            assert f'fuselm_moe_layer_tokens{{layer="{layer}",model_name="{MODEL}"}} 16.0' in page
            top = max(load) * len(load) / sum(load)
            assert f'fuselm_moe_expert_load_max_over_mean{{layer="{layer}",model_name="{MODEL}"}} {top}' in page
            expert = load.index(max(load))
            line = f'fuselm_moe_expert_tokens{{expert="{expert}",layer="{layer}",model_name="{MODEL}"}} {max(load)}.0'
            assert line in page
    finally:
        server.stop()
        engine.shutdown()


def test_server_without_experts_answers_404_for_statistics(server):
    import httpx

    r = httpx.get(server.base_url + "/expert_stats")
    assert r.status_code == 404 and "no experts" in r.json()["error"]["message"]
    assert "fuselm_moe_layer_tokens{" not in httpx.get(server.base_url + "/metrics").text
