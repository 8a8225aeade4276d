"""llama.cpp on the MoE benchmark's own weights (not a test): convert, quantise, llama-bench, greedy check.

benchmarks/moe.py builds a random Mixtral-like model as an HF directory; this converts that directory
with llama.cpp's own converter (convert_hf_to_gguf.py, f32) and quantises it with llama-quantize to
Q4_0 and to Q8_0 (experts and attention quantised; the token embedding and the LM head kept f32, as in
fuselm's Q4_0 file, the router and norms f32 in all), then measures each with llama-bench: decode
tok/s at batch 1 (`-n`, tg) and prompt tok/s for 1,024 tokens (`-p`, pp), Q4_0 also without
llama.cpp's CPU weight repacking. fuselm also runs llama.cpp's Q4_0 and Q8_0 files itself, so both
engines read the very same bytes.

The greedy check sends token ids (not text) to llama-server's /completion and compares the tokens it
generates with fuselm's on the HF directory. The benchmark tokenizer is a tiny byte-level BPE whose
pre-tokenizer hash llama.cpp's converter does not know; as only token ids are exchanged, the
conversion registers it as llama.cpp's "default" pre-tokenizer.

Needs llama.cpp built by benchmarks/peers/llama_cpp.sh build (llama-bench, llama-quantize,
llama-server and the vendored converter). Run through benchmarks/moe.py --llama-cpp, or alone:

    .venv/bin/python benchmarks/moe_llama_cpp.py --shape mixtral
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEERS = HERE / "peers" / ".build"  # where benchmarks/peers/llama_cpp.sh builds; --peers-dir changes it
BIN = PEERS / "llama.cpp-build" / "bin"


def use_peers_dir(path: Path) -> None:
    global PEERS, BIN
    PEERS, BIN = path, path / "llama.cpp-build" / "bin"

_CONVERT = """
import runpy, sys
llama, hf_dir, out = sys.argv[1:4]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"  # the tiny benchmark tokenizer
sys.argv = ["convert_hf_to_gguf.py", hf_dir, "--outtype", "f32", "--outfile", out]
runpy.run_path(llama + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def vendored_llama() -> Path:
    found = sorted(PEERS.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if not found or not (BIN / "llama-bench").exists():
        raise SystemExit("llama.cpp is not built: run benchmarks/peers/llama_cpp.sh build")
    return found[-1]


def convert(hf_dir: Path, out_dir: Path) -> dict[str, Path]:
    """llama.cpp's f32 GGUF of hf_dir and its Q4_0 and Q8_0 quantisations (made once), by precision."""
    f32 = out_dir / "llama-f32.gguf"
    llama = vendored_llama()
    if not f32.exists():
        pydeps = PEERS / "pydeps"  # the converter imports sentencepiece; like llama_cpp.sh, kept out of the venv
        if subprocess.run([sys.executable, "-c", "import sentencepiece"], env=dict(os.environ, PYTHONPATH=str(pydeps)),
                          capture_output=True).returncode != 0:
            subprocess.run([sys.executable, "-m", "pip", "install", "--target", str(pydeps), "sentencepiece"], check=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(llama), str(llama / "gguf-py"), str(pydeps)]))
        subprocess.run([sys.executable, "-c", _CONVERT, str(llama), str(hf_dir), str(f32) + ".tmp"], check=True, env=env)
        Path(str(f32) + ".tmp").rename(f32)
    files = {"f32": f32}
    for precision in ("q4_0", "q8_0"):
        quantised = files[precision] = out_dir / f"llama-{precision}.gguf"
        if not quantised.exists():
            subprocess.run([str(BIN / "llama-quantize"), "--output-tensor-type", "f32", "--token-embedding-type", "f32",
                            str(f32), str(quantised) + ".tmp", precision.upper()], check=True, capture_output=True)
            Path(str(quantised) + ".tmp").rename(quantised)
    return files


def bench(gguf: Path, threads: int, decode_tokens: int = 32, prompt_tokens: int = 1024, repack: int = 1,
          repetitions: int = 3) -> dict:
    """llama-bench's tg (batch 1 decode) and pp (prompt) tok/s."""
    out = subprocess.run([str(BIN / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", str(prompt_tokens),
                          "-n", str(decode_tokens), "-r", str(repetitions), "--repack", str(repack), "-o", "json"],
                         check=True, capture_output=True, text=True).stdout
    result = {}
    for row in json.loads(out):
        name = "decode_batch1_tok_s" if row["n_gen"] else f"prompt_{row['n_prompt']}_tok_s"
        result[name] = round(row["avg_ts"], 2)
        result[name.replace("_tok_s", "_stddev")] = round(row["stddev_ts"], 2)
    return result


def greedy_tokens(gguf: Path, prompts: list[list[int]], max_tokens: int, threads: int) -> list[list[int]]:
    """Greedy continuations of token-id prompts from llama-server."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(BIN / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
                               "-t", str(threads), "-np", "1", "-c", "2048"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("llama-server did not start")
        outs = []
        for ids in prompts:
            body = json.dumps({"prompt": ids, "n_predict": max_tokens, "temperature": 0, "top_k": 1,
                               "cache_prompt": False, "return_tokens": True, "ignore_eos": True}).encode()
            req = urllib.request.Request(url + "/completion", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=600) as r:
                outs.append(json.loads(r.read())["tokens"])
        return outs
    finally:
        server.terminate()
        server.wait()


def fuselm_greedy(model: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from fuselm import LLM, SamplingParams

    llm = LLM(model, dtype="float32", device="cpu")
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                        use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """How many leading tokens each pair of continuations shares."""
    common = [next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), min(len(p), len(q))) for p, q in zip(a, b)]
    return {"identical": a == b, "common_prefix_tokens": common}


def llama_cpp_figures(hf_dir: Path, out_dir: Path, threads: int, prompts: list[list[int]], max_tokens: int) -> dict:
    files = convert(hf_dir, out_dir)
    result = {precision: bench(path, threads) for precision, path in files.items()}
    result["q4_0_no_repack"] = bench(files["q4_0"], threads, repack=0)
    result["files"] = {precision: str(path) for precision, path in files.items()}
    theirs = greedy_tokens(files["f32"], prompts, max_tokens, threads)
    ours = fuselm_greedy(str(hf_dir), prompts, max_tokens)
    result["greedy_f32_vs_fuselm"] = {"llama_cpp": theirs, "fuselm": ours, **agreement(theirs, ours)}
    return result


def main() -> None:
    import argparse

    import torch

    sys.path.insert(0, str(HERE))
    import moe

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(moe.SHAPES), default="mixtral")
    ap.add_argument("--build-dir", default=str(HERE.parent / ".build" / "moe-bench"))
    ap.add_argument("--peers-dir", default=str(PEERS), help="benchmarks/peers/.build of a llama.cpp build")
    args = ap.parse_args()
    use_peers_dir(Path(args.peers_dir))
    out_dir = Path(args.build_dir) / args.shape
    hf_dir, _ = moe.build(moe.SHAPES[args.shape], out_dir)
    figures = llama_cpp_figures(hf_dir, out_dir, torch.get_num_threads(), moe.prompts(4, 16, seed=7), 16)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
