"""HF transformers as a peer: static padded `generate` and continuous-batching `generate_batch`.

Both read a workload file (token-id prompts and each request's output length, written by
benchmarks/run_all.py) so they run exactly the requests fuselm and vLLM run, greedy, with EOS
ignored, on the HF directory exported from the embedded GGUF (the same weights fuselm loads).

    .venv/bin/python benchmarks/peers/hf_transformers.py --workload W.json --mode generate --batch-size 16
    .venv/bin/python benchmarks/peers/hf_transformers.py --workload W.json --mode generate_batch

`generate` pads each static batch on the left and decodes max_new_tokens = min_new_tokens = the
batch's longest target, so it computes more tokens than it delivers; only each request's own
target length counts as output. `generate_batch` is transformers' own continuous batching
(paged cache, `attn_implementation="sdpa"`); its manager takes a max_new_tokens per request, and
EOS is disabled so every request decodes exactly its length. Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def load_model(hf_dir: Path, dtype: str, attn: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype), attn_implementation=attn).eval()


def pad_id(hf_dir: Path) -> int:
    cfg = json.loads((hf_dir / "config.json").read_text())
    pad = cfg.get("pad_token_id")
    if pad is None:
        eos = cfg.get("eos_token_id")
        pad = eos[0] if isinstance(eos, list) else (eos or 0)
    return int(pad)


def run_generate(model, work: list[tuple[list[int], int]], batch_size: int, pad: int) -> tuple[float, int]:
    """Static batches, left padding. Returns (seconds, tokens the batches actually decoded)."""

    def one_batch(batch):
        width = max(len(p) for p, _ in batch)
        new = max(o for _, o in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (prompt, _) in enumerate(batch):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=pad)
        assert out.shape[1] == width + new, "generate stopped early"
        return len(batch) * new

    one_batch([(work[0][0][:16], 4)] * 2)  # warm-up, untimed
    decoded = 0
    t0 = time.perf_counter()
    for start in range(0, len(work), batch_size):
        decoded += one_batch(work[start:start + batch_size])
    return time.perf_counter() - t0, decoded


def run_generate_batch(model, work: list[tuple[list[int], int]], max_batch_tokens: int | None) -> tuple[float, int]:
    """transformers' continuous batching manager, one request per workload entry with its own length."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    gen = GenerationConfig(do_sample=False, max_new_tokens=max(o for _, o in work), eos_token_id=None,
                           pad_token_id=model.config.pad_token_id or 0)
    cb = ContinuousBatchingConfig(max_batch_tokens=max_batch_tokens) if max_batch_tokens else None
    with model.continuous_batching_context_manager(generation_config=gen, continuous_batching_config=cb,
                                                   block=True, timeout=5) as manager:
        warm = manager.add_request(work[0][0][:16], request_id="warmup", max_new_tokens=4, eos_token_id=-1)
        while not ((r := manager.get_result(timeout=60)) and r.request_id == warm and r.is_finished()):
            pass
        t0 = time.perf_counter()
        for i, (prompt, olen) in enumerate(work):
            manager.add_request(prompt, request_id=f"r{i}", max_new_tokens=olen, eos_token_id=-1)
        done: dict[str, int] = {}
        while len(done) < len(work):
            r = manager.get_result(timeout=5)
            if r is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' continuous batching manager stopped")
                continue
            if r.is_finished():
                if r.error is not None:
                    raise RuntimeError(f"request {r.request_id} failed: {r.error}")
                done[r.request_id] = len(r.generated_tokens)
        seconds = time.perf_counter() - t0
    short = [(rid, n, work[int(rid[1:])][1]) for rid, n in done.items() if n != work[int(rid[1:])][1]]
    if short:
        raise RuntimeError(f"{len(short)} requests came back with the wrong length, e.g. {short[0]}")
    return seconds, sum(done.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", type=Path, required=True, help="JSON written by benchmarks/run_all.py")
    p.add_argument("--mode", choices=["generate", "generate_batch"], required=True)
    p.add_argument("--hf-dir", type=Path, default=HERE / ".build" / "hf-f32")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-size", type=int, default=16, help="static batch size of --mode generate")
    p.add_argument("--max-batch-tokens", type=int, default=None, help="token budget per step of generate_batch")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    doc = json.loads(args.workload.read_text())
    work = [(r["prompt_token_ids"], r["output_len"]) for r in doc["requests"]]
    t0 = time.perf_counter()
    model = load_model(args.hf_dir, args.dtype, "sdpa")
    load_s = time.perf_counter() - t0
    if args.mode == "generate":
        seconds, decoded = run_generate(model, work, args.batch_size, pad_id(args.hf_dir))
    else:
        seconds, decoded = run_generate_batch(model, work, args.max_batch_tokens)
    prompt_tokens = sum(len(p) for p, _ in work)
    output_tokens = sum(o for _, o in work)
    import transformers

    print(json.dumps({"engine": f"hf-{args.mode}", "transformers": transformers.__version__, "dtype": args.dtype,
                      "threads": args.threads, "batch_size": args.batch_size if args.mode == "generate" else None,
                      "load_s": load_s, "elapsed_s": seconds, "num_requests": len(work),
                      "prompt_tokens": prompt_tokens, "output_tokens": output_tokens, "decoded_tokens": decoded,
                      "output_throughput": output_tokens / seconds,
                      "total_token_throughput": (prompt_tokens + output_tokens) / seconds}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
