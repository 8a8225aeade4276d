"""MoE decode and prompt speed against HF transformers, and the MoE layer's memory bandwidth (not a test).

A realistic MoE shape with random weights (transformers' own init), saved as an HF directory and as a
GGUF with Q4_0 weights (experts and attention; router, norms, embeddings and LM head float), then:

- fuselm float32 (HF directory) and fuselm Q4_0 (GGUF, kept quantised): decode tok/s at batch 1, 8
  and 32 (greedy, prompts of 16 tokens prefilled first) and prompt tok/s for a 1,024-token prompt;
- HF transformers float32 on the same weights: the same figures;
- this machine's stream bandwidth as the roofline tool measures it (fuselm/bench/roofline.py
  `measure_stream_gbps`: the better of a read and a copy of 512 MiB, the engine's threads), and the MoE
  layer's achieved bytes/s at batch 1 against it: one layer's GroupedExperts call on one token,
  cycling through the layers so the routed experts come from memory, bytes = top_k experts'
  gate/up/down as stored.

    .venv/bin/python benchmarks/moe.py                      # mixtral-like: 16 x 1024, 32 experts of 512, top-4
    .venv/bin/python benchmarks/moe.py --shape qwen2moe     # 64 experts of 256, top-8, a shared expert of 1024

    .venv/bin/python benchmarks/moe.py --llama-cpp          # and llama.cpp (benchmarks/moe_llama_cpp.py)

With --llama-cpp the same run converts the HF directory with llama.cpp's own converter (f32, and Q4_0
and Q8_0 through llama-quantize), measures llama-bench's batch-1 decode and 1,024-token prompt at each
precision, checks that llama-server's greedy tokens equal fuselm's, and runs fuselm on llama.cpp's
Q4_0 and Q8_0 files too (fuselm's float32 figures are the same weights at llama.cpp's f32).

Results: benchmarks/results/moe-<shape>-<cpu>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from fuselm.bench.roofline import measure_stream_gbps

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the tiny tokenizer and the MoE GGUF writer

SHAPES = {
    "mixtral": dict(kind="mixtral", layers=16, hidden=1024, heads=16, kv_heads=4, experts=32, expert_width=512,
                    top_k=4, shared=None, vocab=32000),
    "qwen2moe": dict(kind="qwen2_moe", layers=16, hidden=1024, heads=16, kv_heads=4, experts=64, expert_width=256,
                     top_k=8, shared=1024, vocab=32000),
    "smoke": dict(kind="qwen2_moe", layers=2, hidden=256, heads=4, kv_heads=2, experts=8, expert_width=256, top_k=2,
                  shared=256, vocab=384),  # checks the script in seconds
    "mixtral-smoke": dict(kind="mixtral", layers=2, hidden=256, heads=4, kv_heads=2, experts=8, expert_width=256,
                          top_k=2, shared=None, vocab=512),  # checks --llama-cpp in seconds
}


def build(shape: dict, out: Path):
    """Save the random model as an HF directory and a Q4_0 GGUF (once); return (hf_dir, gguf_path)."""
    import transformers
    from gguf import GGMLQuantizationType as Q

    from moe_models import write_moe_gguf
    from tiny_models import save_tokenizer

    hf_dir, gguf_path = out / "hf", out / "q4_0.gguf"
    if gguf_path.exists():
        return hf_dir, gguf_path
    common = dict(vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                  num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                  num_experts_per_tok=shape["top_k"], max_position_embeddings=4096, bos_token_id=1, eos_token_id=4,
                  tie_word_embeddings=False)
    torch.manual_seed(0)
    if shape["kind"] == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
            intermediate_size=shape["expert_width"], num_local_experts=shape["experts"], **common))
    else:
        model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
            intermediate_size=4 * shape["hidden"], moe_intermediate_size=shape["expert_width"],
            num_experts=shape["experts"], shared_expert_intermediate_size=shape["shared"], norm_topk_prob=False,
            **common))
    with torch.no_grad():  # a router with real preferences, so tokens spread unevenly over the experts
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
    hf_dir.mkdir(parents=True, exist_ok=True)
    save_tokenizer(hf_dir, 384)
    model.save_pretrained(hf_dir, safe_serialization=True)
    layer_types = {f"{n}.weight": Q.Q4_0 for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_shexp",
                                                  "ffn_up_shexp", "ffn_down_shexp", "ffn_gate", "ffn_up", "ffn_down")}
    write_moe_gguf(model, shape["kind"], hf_dir, gguf_path, expert_type=Q.Q4_0, layer_types=layer_types)
    return hf_dir, gguf_path


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def prompts(batch: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 384, (batch, length), generator=g).tolist()


def warm_up(llm, seconds: float) -> float:
    """Decode at batch 1 for `seconds` after loading; returns the tok/s of the last run.

    The first seconds after a load run slower on a VM: fuselm repacks the weights into freshly allocated memory, and
    a Mixtral-like float32 model decoded at ~47-54 tok/s for its first ~10 runs of 24 tokens (no page faults after the
    second) before settling at 60-66 on a 2-vCPU Zen 4 guest (llama.cpp reads its weights from the page cache, and
    llama-bench runs a warm-up of its own). Each engine is measured after this, never during it."""
    from fuselm import SamplingParams

    end, last = time.perf_counter() + seconds, 0.0
    while time.perf_counter() < end:
        res = llm.generate(prompts(1, 16, seed=7), SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                           use_tqdm=False)
        m = res[0].metrics
        last = 23 / (m.last_token_time - m.first_token_time)
    return round(last, 2)


def fuselm_figures(model: str, batches: list[int], tokens: int, repeats: int = 1, warm_up_s: float = 0.0) -> dict:
    """Decode tok/s at each batch (the median of `repeats` runs, each listed), the 1,024-token prompt, one MoE layer."""
    from fuselm import LLM, SamplingParams

    llm = LLM(model, dtype="float32", device="cpu", max_num_seqs=max(batches))
    runner = llm.engine.runner
    out = {"plan": runner.plan.summary(), "weight_mib": round(runner.weight_bytes / 2**20, 1)}
    if warm_up_s > 0:
        out["warm_up_s"], out["warm_up_last_batch1_tok_s"] = warm_up_s, warm_up(llm, warm_up_s)
    for b in batches:
        ps = prompts(b, 16, seed=b)
        llm.generate(ps, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)  # prefix-cache the prompts
        runs = []
        for _ in range(repeats):
            res = llm.generate(ps, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True), use_tqdm=False)
            first = min(o.metrics.first_token_time for o in res)
            last = max(o.metrics.last_token_time for o in res)
            runs.append(round(b * (tokens - 1) / (last - first), 2))
        out[f"decode_batch{b}_tok_s"] = statistics.median(runs)
        if repeats > 1:
            out[f"decode_batch{b}_runs"] = runs
    long = prompts(1, 1024, seed=99)
    llm.generate(prompts(1, 64, seed=98), SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)  # warm-up
    seconds = _timed(lambda: llm.generate(long, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False))
    out["prompt_1024_tok_s"] = round(1024 / seconds, 1)
    out.update(moe_layer_bandwidth(llm))
    del llm
    gc.collect()
    return out


def moe_layer_bandwidth(llm, rounds: int = 8) -> dict:
    """One token through each layer's experts in turn: routed bytes / time."""
    from fuselm.layers.moe import MoEBlock

    blocks = [layer.mlp for layer in llm.engine.runner.model.layers if isinstance(layer.mlp, MoEBlock)]
    experts = blocks[0].experts
    top_k = blocks[0].top_k
    per_expert = sum(t.numel() * t.element_size() for t in experts.weight_tensors()) / experts.num_experts
    x = torch.randn(1, experts.in_features)
    g = torch.Generator().manual_seed(0)
    calls = [(b.experts, torch.randperm(experts.num_experts, generator=g)[:top_k].view(1, -1)) for _ in range(rounds)
             for b in blocks]
    weights = torch.full((1, top_k), 1.0 / top_k)
    for module, ids in calls[:len(blocks)]:
        module(x, ids, weights)  # warm-up (first-touch, thread pool)
    start = time.perf_counter()
    for module, ids in calls:
        module(x, ids, weights)
    seconds = (time.perf_counter() - start) / len(calls)
    return {"moe_layer_batch1_us": round(seconds * 1e6, 1), "moe_layer_routed_bytes": int(top_k * per_expert),
            "moe_layer_batch1_gb_s": round(top_k * per_expert / seconds / 1e9, 2), "experts_kind": experts.kind}


def hf_figures(hf_dir: Path, batches: list[int], tokens: int, warm_up_s: float = 0.0) -> dict:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = {}
    with torch.inference_mode():
        end = time.perf_counter() + warm_up_s  # the same settling time after the load as fuselm gets (warm_up)
        while time.perf_counter() < end:
            model.generate(torch.tensor(prompts(1, 16, seed=7)), max_new_tokens=8, do_sample=False, pad_token_id=0)
        for b in batches:
            ids = torch.tensor(prompts(b, 16, seed=b))
            gen = dict(do_sample=False, pad_token_id=0)
            one = _timed(lambda: model.generate(ids, max_new_tokens=1, **gen))
            many = _timed(lambda: model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **gen))
            out[f"decode_batch{b}_tok_s"] = round(b * (tokens - 1) / (many - one), 2)
        long = torch.tensor(prompts(1, 1024, seed=99))
        out["prompt_1024_tok_s"] = round(1024 / _timed(lambda: model(long, use_cache=False)), 1)
    del model
    gc.collect()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="mixtral")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--tokens", type=int, default=24, help="decode tokens per request (fuselm)")
    ap.add_argument("--repeats", type=int, default=5,
                    help="decode runs per batch size; the median is reported (llama-bench repeats 5 by default)")
    ap.add_argument("--hf-tokens", type=int, default=10, help="decode tokens per request (HF transformers)")
    ap.add_argument("--build-dir", default=str(HERE.parent / ".build" / "moe-bench"))
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--warm-up", type=float, default=10.0,
                    help="seconds of batch-1 decoding after each load (fuselm's and HF's) before measuring (see warm_up)")
    ap.add_argument("--out", help="result file (default: benchmarks/results/moe-<shape>-epyc-avx512.json)")
    ap.add_argument("--llama-cpp", action="store_true", help="also llama.cpp on the same weights (moe_llama_cpp.py)")
    ap.add_argument("--peers-dir", default=str(HERE / "peers" / ".build"), help="where llama_cpp.sh built llama.cpp")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    shape = SHAPES[args.shape]
    batches = [int(b) for b in args.batches.split(",")]
    hf_dir, gguf_path = build(shape, Path(args.build_dir) / args.shape)
    from fuselm.kernels.build import cpu_model_name

    result = {"shape": shape, "cpu": cpu_model_name(), "threads": torch.get_num_threads(), "python": platform.python_version(),
              "torch": torch.__version__, "command": " ".join(sys.argv),
              "load_average_at_start": os.getloadavg()[0]}
    stream = measure_stream_gbps()  # the roofline tool's figure, which the MoE layer is set against
    result["stream_bandwidth"] = {k: round(v, 2) for k, v in stream.items()}
    result["fuselm_float32"] = fuselm_figures(str(hf_dir), batches, args.tokens, args.repeats, args.warm_up)
    result["fuselm_gguf_q4_0"] = fuselm_figures(str(gguf_path), batches, args.tokens, args.repeats, args.warm_up)
    if not args.skip_hf:
        result["hf_transformers_float32"] = hf_figures(hf_dir, batches, args.hf_tokens, args.warm_up)
    if args.llama_cpp:  # llama.cpp's own conversion and Q4_0 of hf_dir; fuselm also runs that Q4_0 file
        import moe_llama_cpp

        moe_llama_cpp.use_peers_dir(Path(args.peers_dir))
        peer = moe_llama_cpp.llama_cpp_figures(hf_dir, gguf_path.parent, result["threads"], prompts(4, 16, seed=7), 16)
        result["llama_cpp"] = peer
        for precision in ("q4_0", "q8_0"):
            result[f"fuselm_llama_cpp_{precision}"] = fuselm_figures(peer["files"][precision], batches, args.tokens,
                                                                      args.repeats, args.warm_up)
    result["load_average_at_end"] = os.getloadavg()[0]  # other processes on these cores skew every figure
    for name in ("fuselm_float32", "fuselm_gguf_q4_0", "fuselm_llama_cpp_q4_0", "fuselm_llama_cpp_q8_0"):
        if name not in result:
            continue
        r = result[name]
        r["moe_layer_share_of_stream_bandwidth"] = round(r["moe_layer_batch1_gb_s"] / stream["stream_gbps"], 3)
    out = Path(args.out) if args.out else HERE / "results" / f"moe-{args.shape}-epyc-avx512.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
