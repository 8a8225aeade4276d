"""Bad input gets a clear ValueError/FileNotFoundError, and nothing else is lost.

Request validation raises InvalidRequestError, a ValueError that names the field at fault in
`param` (and an OpenAI-style `code` where one applies), so nobody reads the field out of a message.
"""

from __future__ import annotations

import json
import pickle
import shutil

import pytest

from conftest import random_prompts
from fuselm import LLM, SamplingParams
from fuselm.config import EngineConfig
from fuselm.engine.engine import LLMEngine
from fuselm.errors import InvalidConfigError, InvalidRequestError


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(tiny_llama[0], dtype="float32", device="cpu", max_model_len=256)


@pytest.mark.parametrize("kwargs, words", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"n": 0}, "n "),
    ({"max_tokens": -1}, "max_tokens"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"logprobs": 99}, "logprobs"),
    ({"stop": [""]}, "stop"),
])
def test_invalid_sampling_values(kwargs, words):
    with pytest.raises(ValueError, match=words):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("field, kwargs", [
    ("n", {"n": 0}), ("temperature", {"temperature": -1}), ("top_p", {"top_p": 1.5}), ("top_k", {"top_k": -2}),
    ("min_p", {"min_p": -0.1}), ("repetition_penalty", {"repetition_penalty": 0}),
    ("presence_penalty", {"presence_penalty": 3}), ("frequency_penalty", {"frequency_penalty": -2.5}),
    ("max_tokens", {"max_tokens": -1}), ("min_tokens", {"min_tokens": -1}),
    ("min_tokens", {"min_tokens": 5, "max_tokens": 2}), ("logprobs", {"logprobs": 21}),
    ("prompt_logprobs", {"prompt_logprobs": -1}), ("seed", {"seed": 1.5}), ("stop", {"stop": ["ok", ""]}),
    ("stop_token_ids", {"stop_token_ids": [3, -1]}),
    ("temperature", {"temperature": float("nan")}), ("top_p", {"top_p": float("inf")}),
    ("max_tokens", {"max_tokens": True}), ("max_tokens", {"max_tokens": "5"}), ("n", {"n": 2.0}),
    ("stop", {"stop": ["ok", "\ud800"]}), ("stop", {"stop": [7]}), ("ignore_eos", {"ignore_eos": "yes"}),
])
def test_sampling_errors_name_their_field(field, kwargs):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == field and isinstance(info.value, ValueError)
    copy = pickle.loads(pickle.dumps(info.value))  # the attributes survive a process boundary
    assert (copy.param, copy.code, str(copy)) == (field, None, str(info.value))


def test_engine_errors_name_their_field(llm):
    cases = [
        ("", "prompt", None),
        ([[]], "prompt", None),
        ([[1, 2, 10**6]], "prompt", None),
        ({"prompt": "a", "prompt_token_ids": [1]}, "prompt", None),
        ("a lone \udfff surrogate", "prompt", None),
        ({"prompt": "\ud800"}, "prompt", None),
        (random_prompts([300])[0], "prompt", "context_length_exceeded"),
    ]
    for prompt, field, code in cases:
        with pytest.raises(InvalidRequestError) as info:
            llm.generate(prompt, use_tqdm=False)
        assert (info.value.param, info.value.code) == (field, code), prompt
    with pytest.raises(InvalidRequestError) as info:
        llm.generate(random_prompts([200])[0], SamplingParams(max_tokens=100), use_tqdm=False)
    assert (info.value.param, info.value.code) == ("max_tokens", "context_length_exceeded")
    llm.engine.add_request("taken", [5, 6])
    with pytest.raises(InvalidRequestError) as info:
        llm.engine.add_request("taken", [5, 6])
    assert info.value.param == "request_id"
    llm.engine.abort_request("taken")
    assert not llm.engine.has_unfinished_requests()


def test_empty_and_too_long_prompts(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate("", use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate(random_prompts([300])[0], use_tqdm=False)
    with pytest.raises(ValueError, match="lower max_tokens"):
        llm.generate(random_prompts([200])[0], SamplingParams(max_tokens=100), use_tqdm=False)
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate([[1, 2, 10**6]], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.kv.num_free_blocks == llm.engine.runner.num_blocks


def test_bad_request_does_not_disturb_running_ones(llm):
    engine: LLMEngine = llm.engine
    prompts = random_prompts([20, 60], seed=30)
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    engine.add_request("a", prompts[0], greedy)
    engine.step()
    with pytest.raises(ValueError):
        engine.add_request("bad", random_prompts([400])[0], greedy)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", prompts[0], greedy)
    engine.add_request("b", prompts[1], greedy)
    engine.step()
    engine.add_request("c", prompts[1], greedy)
    engine.abort_request("c")
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert done == {"a": expected[0], "b": expected[1]}
    assert engine.kv.num_free_blocks == engine.runner.num_blocks


def test_failed_step_fails_its_requests_not_the_engine(llm, monkeypatch):
    engine = llm.engine
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine.add_request("boom", random_prompts([10])[0], greedy)
    monkeypatch.setattr(engine.runner, "execute", lambda out: (_ for _ in ()).throw(RuntimeError("kernel failed")))
    outs = engine.step()
    assert outs[0].finished and outs[0].outputs[0].finish_reason == "error" and "kernel failed" in outs[0].error
    monkeypatch.undo()
    assert engine.kv.num_free_blocks == engine.runner.num_blocks
    ok = llm.generate(random_prompts([10])[0], greedy, use_tqdm=False)[0]
    assert len(ok.outputs[0].token_ids) == 4


def test_unknown_model_path_and_architecture(tmp_path, tiny_llama):
    with pytest.raises(FileNotFoundError, match="not found"):
        LLM(str(tmp_path / "nope"), device="cpu")
    bad = tmp_path / "gpt2"
    shutil.copytree(tiny_llama[0], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture"):
        LLM(str(bad), device="cpu")
    with pytest.raises(ValueError, match="unknown engine option"):
        LLM(tiny_llama[0], max_num_seq=3)


@pytest.mark.parametrize("option, value", [
    ("block_size", 24), ("max_num_batched_tokens", 0), ("max_num_seqs", 0), ("max_decode_slowdown", 1.0),
    ("max_model_len", 0), ("kv_cache_memory_bytes", 0), ("kv_cache_memory_fraction", 1.5),
    ("kv_cache_dtype", "int4"), ("quantization", "fp8"), ("gpu_memory_utilization", 0), ("max_num_seq", 3),
])
def test_config_errors_name_their_option(option, value):
    with pytest.raises(InvalidConfigError) as info:
        EngineConfig.from_kwargs(None, **{option: value})
    assert info.value.option == option and isinstance(info.value, ValueError)
    for quantization, group in (("int4", 48), ("int8", 24), (None, 32)):
        with pytest.raises(InvalidConfigError) as info:
            EngineConfig(quantization=quantization, quantization_group_size=group)
        assert info.value.option == "quantization_group_size"


def test_truncated_safetensors(tmp_path, tiny_llama):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama[0], broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        LLM(str(broken), device="cpu")
    (broken / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        LLM(str(broken), device="cpu")
