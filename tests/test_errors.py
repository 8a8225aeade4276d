"""Bad input gets a clear ValueError/FileNotFoundError, and nothing else is lost."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import random_prompts
from fuselm import LLM, SamplingParams
from fuselm.engine.engine import LLMEngine


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(tiny_llama[0], dtype="float32", device="cpu", max_model_len=256)


@pytest.mark.parametrize("kwargs, words", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"n": 0}, "n "),
    ({"max_tokens": 0}, "max_tokens"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"logprobs": 99}, "logprobs"),
    ({"stop": [""]}, "stop"),
])
def test_invalid_sampling_values(kwargs, words):
    with pytest.raises(ValueError, match=words):
        SamplingParams(**kwargs)


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
