"""GGUF MoE files, written from tiny HF MoE models the way llama.cpp's converter writes them (experts
stacked as blk.N.ffn_{gate,up,down}_exps, Mixtral as arch llama with expert tensors): float files
compute like HF, and files with quantised experts keep them quantised and compute like HF with the
experts replaced by their dequantised weights."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from conftest import random_prompts
from fuselm import LLM, SamplingParams
from fuselm.loader.gguf import load_gguf
from moe_models import MOE_KINDS, make_tiny_moe, write_moe_gguf
from test_model_vs_hf import packed_last_logits
from tiny_models import hf_greedy, hf_last_logits

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_float_gguf_matches_hf(tmp_path, kind):
    hf = make_tiny_moe(tmp_path / "hf", kind)
    path = write_moe_gguf(hf, kind, tmp_path / "hf", tmp_path / "moe.gguf")
    llm = LLM(str(path), dtype="float32", device="cpu", max_num_batched_tokens=1024)
    assert llm.engine.model_config.architecture == type(hf).__name__
    prompts = random_prompts([1, 17, 90], seed=4)
    assert (packed_last_logits(llm, prompts) - hf_last_logits(hf, prompts)).abs().max().item() < 1e-4
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf, p, GREEDY.max_tokens) for p in prompts]


def _with_dequantised_experts(hf, gguf_path):
    """The HF model with every expert weight replaced by the file's dequantised one (gguf.quants)."""
    weights = load_gguf(gguf_path, torch.float32, keep_quantized=False).weights
    with torch.no_grad():
        for i, layer in enumerate(hf.model.layers):
            p = f"model.layers.{i}.mlp.experts."
            if p + "gate_proj.weight" not in weights:
                continue
            gate_up = torch.cat([weights[p + "gate_proj.weight"], weights[p + "up_proj.weight"]], dim=1)  # [E, 2I, H]
            layer.mlp.experts.gate_up_proj.copy_(gate_up)
            layer.mlp.experts.down_proj.copy_(weights[p + "down_proj.weight"])
    return hf


@pytest.mark.parametrize("kind,qtype,width,kept", [
    ("mixtral", Q.Q4_0, None, "int4g32"), ("qwen2_moe", Q.Q8_0, None, "int8g32"),
    ("qwen3_moe", Q.Q4_K, 256, "int4g32"), ("olmoe", Q.Q6_K, 256, "int8g16"), ("mixtral", Q.Q4_1, None, "int4g32"),
])
@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["c", "torch"])
def test_quantised_experts_stay_quantised_and_match_dequantised_reference(tmp_path, kind, qtype, width, kept,
                                                                           cpu_kernels):
    hidden = 256 if width else 64  # K-quants need rows of multiples of 256
    hf = make_tiny_moe(tmp_path / "hf", kind, hidden=hidden, expert_intermediate=width, seed=7)
    path = write_moe_gguf(hf, kind, tmp_path / "hf", tmp_path / "moe.gguf", expert_type=qtype)
    llm = LLM(str(path), dtype="float32", device="cpu", max_num_batched_tokens=1024, cpu_kernels=cpu_kernels)
    assert llm.engine.runner.plan.linear["experts"] == f"{'c' if cpu_kernels else 'torch'}-grouped-{kept}"
    ref = _with_dequantised_experts(hf, path)
    prompts = random_prompts([1, 17, 90], seed=5)
    ours, want = packed_last_logits(llm, prompts), hf_last_logits(ref, prompts)
    # the C path rounds activations to int16 per 32 values (kernels/quant_linear.c), the torch path is exact
    tolerance = 2e-3 * max(1.0, want.abs().max().item()) if cpu_kernels else 1e-4
    assert (ours - want).abs().max().item() < tolerance


def test_qwen2_moe_shared_gate_written_flat_as_llama_quantize_writes_it(tmp_path):
    """llama-quantize stores Qwen2-MoE's shared-expert gate [1, hidden] as a 1-D [hidden] tensor; it loads as the
    gate and the file computes like HF."""
    import gguf

    hf = make_tiny_moe(tmp_path / "hf", "qwen2_moe")
    path = write_moe_gguf(hf, "qwen2_moe", tmp_path / "hf", tmp_path / "moe.gguf", expert_type=Q.Q8_0,
                          flat_shared_gate=True)
    shapes = {t.name: tuple(t.shape) for t in gguf.GGUFReader(str(path)).tensors}
    assert shapes["blk.0.ffn_gate_inp_shexp.weight"] == (hf.config.hidden_size,)  # the layout under test
    llm = LLM(str(path), dtype="float32", device="cpu", max_num_batched_tokens=1024)
    ref = _with_dequantised_experts(hf, path)
    prompts = random_prompts([1, 17, 90], seed=5)
    ours, want = packed_last_logits(llm, prompts), hf_last_logits(ref, prompts)
    assert (ours - want).abs().max().item() < 2e-3 * max(1.0, want.abs().max().item())
