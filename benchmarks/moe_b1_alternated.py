"""Batch-1 MoE decode against llama.cpp, alternated round by round (not a test).

On a VM whose memory bandwidth moves between 25 and 60 GB/s from one minute to the next, two engines measured
minutes apart can differ by more than the engines do. This alternates them on the very same files: each round
runs fuselm's batch-1 greedy decode three times (one loaded engine, a 16-token prompt, `--tokens` tokens) and
then `llama-bench -p 0 -n <tokens> -r 3 -t <threads>`; the result is the median over rounds of each and
their ratio, and the median of the rounds' own ratios (each round's fuselm median over its llama-bench mean): the
paired figure, which a switch of the bandwidth state between rounds does not tip the way a switch can tip the
ratio of the medians when rounds of both states are mixed. The files are llama.cpp's own Q4_0 / Q8_0 conversions of benchmarks/moe.py's random weights
(what `benchmarks/moe.py --llama-cpp` leaves in its build directory), so both engines read the same bytes.

    .venv/bin/python benchmarks/moe_b1_alternated.py --shape mixtral --precisions q4_0,q8_0 \
        --out benchmarks/results/moe-b1-alternated-llamacpp-zen4-epyc.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import moe_llama_cpp
import torch

from fuselm.bench.roofline import measure_stream_gbps
from fuselm.kernels.build import cpu_model_name

HERE = Path(__file__).resolve().parent


def fuselm_tok_s(llm, tokens: int) -> float:
    from fuselm import SamplingParams

    prompt = [[(11 * i) % 300 + 20 for i in range(16)]]
    res = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True), use_tqdm=False)
    m = res[0].metrics
    return (tokens - 1) / (m.last_token_time - m.first_token_time)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="mixtral", help="a benchmarks/moe.py shape whose llama.cpp files exist")
    ap.add_argument("--precisions", default="q4_0,q8_0")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--build-dir", default=str(HERE.parent / ".build" / "moe-bench"))
    ap.add_argument("--peers-dir", default=str(HERE / "peers" / ".build"))
    ap.add_argument("--out")
    args = ap.parse_args()
    from fuselm import LLM

    moe_llama_cpp.use_peers_dir(Path(args.peers_dir))
    if not (moe_llama_cpp.BIN / "llama-bench").exists():
        raise SystemExit(f"{moe_llama_cpp.BIN / 'llama-bench'} missing: bash benchmarks/peers/llama_cpp.sh build")
    threads = torch.get_num_threads()
    result = {"cpu": cpu_model_name(), "torch": torch.__version__, "threads": threads, "shape": args.shape,
              "tokens": args.tokens, "stream": measure_stream_gbps(), "precisions": {}}
    print(f"# {result['cpu']}, {threads} threads, stream {result['stream']['stream_gbps']:.1f} GB/s", flush=True)
    for precision in args.precisions.split(","):
        path = Path(args.build_dir) / args.shape / f"llama-{precision}.gguf"
        if not path.exists():
            raise SystemExit(f"{path} missing: python benchmarks/moe.py --shape {args.shape} --llama-cpp")
        llm = LLM(str(path), dtype="float32", device="cpu", max_num_seqs=8)
        fuselm_tok_s(llm, args.tokens)  # warm-up
        rounds = []
        for r in range(args.rounds):
            ours = [fuselm_tok_s(llm, args.tokens) for _ in range(3)]
            theirs = moe_llama_cpp.bench(path, threads, decode_tokens=args.tokens, prompt_tokens=0)["decode_batch1_tok_s"]
            rounds.append({"fuselm": [round(x, 1) for x in ours], "llama_cpp": round(theirs, 1)})
            print(precision, r, rounds[-1], flush=True)
        del llm
        ours = statistics.median(statistics.median(x["fuselm"]) for x in rounds)
        theirs = statistics.median(x["llama_cpp"] for x in rounds)
        paired = [statistics.median(x["fuselm"]) / x["llama_cpp"] for x in rounds]
        result["precisions"][precision] = {"rounds": rounds, "fuselm": round(ours, 1), "llama_cpp": round(theirs, 1),
                                           "ratio": round(ours / theirs, 3),
                                           "round_ratios": [round(x, 3) for x in paired],
                                           "median_round_ratio": round(statistics.median(paired), 3)}
        print(precision, "median fuselm", round(ours, 1), "llama.cpp", round(theirs, 1), "ratio",
              round(ours / theirs, 3), "round ratios", [round(x, 3) for x in paired], "median",
              round(statistics.median(paired), 3), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
