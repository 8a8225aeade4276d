"""Tensor parallelism over 2 ranks (gloo, CPU) against one process on the same model.

The reference is the same engine in one process with the same options: TP=2 must give the same
greedy tokens, and prompt logprobs within 1e-4, through chunked prompts, prefix-cache hits and
preemption (the KV pool holds the same number of blocks on both). Models: a Llama with 4 query and
2 KV heads (one KV head per rank), and a tied Qwen2 with q/k/v biases and a single KV head (replicated
on both ranks); round-to-nearest int4/int8 and a GGUF file with Q8_0 and Q4_0 tensors; the `ray`
backend on a local Ray instance. A worker killed mid-run makes generate raise WorkerFailedError
within seconds, and a server answers 500/503 with an OpenAI error body. Each rank holds about half
of the weights.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from conftest import random_prompts
from fuselm import LLM, SamplingParams
from fuselm.errors import InvalidConfigError
from fuselm.parallel.group import WorkerFailedError
from tiny_models import save_tokenizer

BLOCKS = 14  # a pool this small preempts with the prompts below
BASE = dict(dtype="float32", device="cpu", max_model_len=160, max_num_batched_tokens=40, max_num_seqs=8)


def make_qwen2_one_kv_head(path):
    """A tied Qwen2 with q/k/v biases, 4 query heads and ONE KV head, MLP 128 wide (int4 groups fit a rank's half)."""
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    save_tokenizer(path, 384)
    config = transformers.Qwen2Config(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=1024,
                                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=4, rms_norm_eps=1e-5,
                                      rope_theta=1000000.0)
    torch.manual_seed(3)
    model = transformers.Qwen2ForCausalLM(config).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(path, safe_serialization=True)
    return model.eval()


@pytest.fixture(scope="module")
def qwen2_kv1(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2_kv1")
    return str(path), make_qwen2_one_kv_head(path)


def kv_bytes(num_blocks: int, kv_heads: int, layers: int = 2, head_dim: int = 16, block_size: int = 16) -> int:
    return num_blocks * 2 * layers * block_size * kv_heads * head_dim * 4  # float32 K and V


def workload() -> tuple[list[list[int]], list[SamplingParams]]:
    """Prompts with a shared 40-token prefix (prefix hits), long enough to be chunked, more than the pool
    holds; the others score their prompts (prompt logprobs, which skip the prefix cache)."""
    shared = random_prompts([40], seed=7)[0]
    prompts = [shared + p for p in random_prompts([9, 23, 5], seed=1)] + random_prompts([57, 31, 46], seed=2)
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    scored = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, prompt_logprobs=1)  # no prefix hits
    return prompts, [greedy] * 3 + [scored] * 3


def run(model: str, tp: int, kv_heads_per_rank: int, **options):
    llm = LLM(model, tensor_parallel_size=tp, kv_cache_memory_bytes=kv_bytes(BLOCKS, kv_heads_per_rank),
              **BASE, **options)
    try:
        prompts, params = workload()
        first = llm.generate(prompts[:1], params[:1], use_tqdm=False)  # its prefix blocks get cached
        outs = first + llm.generate(prompts[1:], params[1:], use_tqdm=False)
        engine = llm.engine
        facts = dict(blocks=engine.runner.num_blocks, preemptions=engine.scheduler.num_preemptions,
                     cached=sum(o.num_cached_tokens for o in outs), weight_bytes=engine.runner.weight_bytes,
                     ranks=getattr(engine.runner, "ranks", None))
        return outs, facts
    finally:
        llm.engine.shutdown()


def assert_same(reference, outs) -> None:
    for ref, got in zip(reference, outs, strict=True):
        assert got.outputs[0].token_ids == ref.outputs[0].token_ids
        if ref.prompt_logprobs is None:
            continue
        pairs = zip(ref.prompt_token_ids[1:], ref.prompt_logprobs[1:], got.prompt_logprobs[1:], strict=True)
        worst = max(abs(a[token].logprob - b[token].logprob) for token, a, b in pairs)  # each prompt token's
        assert worst < 1e-4


MODELS = {"llama_gqa_kv2": 2, "qwen2_tied_kv1": 1}  # KV heads of the whole model


@pytest.mark.parametrize("name", MODELS)
def test_tp2_matches_one_process(name, tiny_llama, qwen2_kv1):
    model = tiny_llama[0] if name == "llama_gqa_kv2" else qwen2_kv1[0]
    kv = MODELS[name]
    reference, single = run(model, 1, kv)
    outs, tp = run(model, 2, max(1, kv // 2))
    assert tp["blocks"] == single["blocks"] == BLOCKS
    assert single["preemptions"] > 0 and tp["preemptions"] > 0, "the pool was meant to run dry"
    assert single["cached"] > 0 and tp["cached"] > 0, "the shared prefix was meant to hit the cache"
    assert_same(reference, outs)
    # no rank holds the whole model: each about half (norms and a replicated KV head are whole on both)
    for rank in tp["ranks"]:
        assert 0.4 < rank.weight_bytes / single["weight_bytes"] < 0.62, rank


# Round-to-nearest at load quantises each rank's slice: o's 32 input columns per rank are one int8
# group, which must be quantised as a group (float16 scales) like the whole layer's, not per channel.
@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_tp2_round_to_nearest_quantised(quantization, qwen2_kv1):
    reference, single = run(qwen2_kv1[0], 1, 1, quantization=quantization)
    outs, tp = run(qwen2_kv1[0], 2, 1, quantization=quantization)
    assert f"{quantization}g32-c" in tp["ranks"][1].plan
    assert_same(reference, outs)


def test_tp2_gguf_q8_0_and_q4_0(qwen2_kv1, tmp_path):
    from gguf import GGMLQuantizationType as Q

    from gguf_writer import write_gguf_from_hf

    path, hf = qwen2_kv1
    quant = {name: (Q.Q4_0 if ".mlp." in name else Q.Q8_0) for name, p in hf.state_dict().items()
             if p.dim() == 2}
    gguf = str(write_gguf_from_hf(hf, path, tmp_path / "tiny.gguf", quantize=quant))
    reference, single = run(gguf, 1, 1)
    outs, tp = run(gguf, 2, 1)
    assert "int4g32-c" in tp["ranks"][1].plan and "int8g32-c" in tp["ranks"][1].plan
    assert_same(reference, outs)
    for rank in tp["ranks"]:
        assert rank.weight_bytes / single["weight_bytes"] < 0.62


def test_tp2_on_ray(tiny_llama):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    try:
        reference, _ = run(tiny_llama[0], 1, 2)
        outs, tp = run(tiny_llama[0], 2, 1, distributed_executor_backend="ray")
        assert tp["ranks"][1].pid != os.getpid()
        assert_same(reference, outs)
    finally:
        ray.shutdown()


def kill_rank1_after(llm, seconds: float) -> dict:
    killed: dict = {}

    def kill() -> None:
        time.sleep(seconds)
        killed["at"] = time.monotonic()
        os.kill(llm.engine.runner.worker_pids[0], signal.SIGKILL)

    threading.Thread(target=kill, daemon=True).start()
    return killed


def test_killed_worker_fails_generate_within_seconds(tiny_llama):
    llm = LLM(tiny_llama[0], tensor_parallel_size=2, **BASE)
    try:
        killed = kill_rank1_after(llm, 1.0)
        long = SamplingParams(temperature=0, max_tokens=150, ignore_eos=True)
        with pytest.raises(WorkerFailedError, match=r"rank 1 .*killed by signal 9"):
            for _ in range(100):  # far longer than the kill delay
                llm.generate(random_prompts([8] * 8), long, use_tqdm=False)
        assert time.monotonic() - killed["at"] < 8.0
        t0 = time.monotonic()
        with pytest.raises(WorkerFailedError):  # the engine stays failed, and says so at once
            llm.generate([[5, 6, 7]], long, use_tqdm=False)
        assert time.monotonic() - t0 < 1.0
    finally:
        llm.engine.shutdown()


def test_server_with_killed_worker_answers_an_openai_error(tiny_llama):
    import httpx

    from fuselm.engine.async_engine import AsyncLLMEngine
    from fuselm.server.app import build_app
    from server_helpers import MODEL, ServerThread, wait_until

    engine = AsyncLLMEngine.from_options(tiny_llama[0], tensor_parallel_size=2, **BASE)
    server = ServerThread(build_app(engine, MODEL)).start()
    try:
        body = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0}
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            assert client.post("/v1/completions", json=body).status_code == 200
            runner = engine.engine.runner
            os.kill(runner.worker_pids[0], signal.SIGKILL)
            assert wait_until(lambda: runner._life.workers.failure() is not None, 10)
            t0 = time.monotonic()
            for _ in range(2):  # the request that finds the engine failed (500), then one to a stopped engine (503)
                r = client.post("/v1/completions", json=body)
                assert r.status_code in (500, 503), r.text
                error = r.json()["error"]
                assert error["type"] == "server_error" and "rank 1" in error["message"] or r.status_code == 503
            assert r.status_code == 503
            assert time.monotonic() - t0 < 10
            assert client.get("/health").status_code == 503
    finally:
        server.stop()
        engine.shutdown()


def test_options_tp_cannot_take_are_refused(tiny_llama):
    with pytest.raises(InvalidConfigError) as err:
        LLM(tiny_llama[0], tensor_parallel_size=2, speculative_config={"method": "ngram"}, **BASE)
    assert err.value.option == "speculative_config"
    with pytest.raises(InvalidConfigError) as err:  # 4 query heads over 3 ranks
        LLM(tiny_llama[0], tensor_parallel_size=3, **BASE)
    assert err.value.option == "tensor_parallel_size" and "query heads" in str(err.value)
    with pytest.raises(InvalidConfigError) as err:  # the MLP (160) halves to 80: int4 groups of 32 do not fit
        LLM(tiny_llama[0], tensor_parallel_size=2, quantization="int4", **BASE)
    assert err.value.option == "tensor_parallel_size" and "down_proj" in str(err.value)
