"""The `fuselm` command: generate | chat (and serve / bench where installed).

Engine options are generated from EngineConfig's fields so the CLI can never drift from the API.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time

DEMO_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences what a KV cache is.",
    "Give three tips for writing clear Python code.",
]


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    from fuselm.config import EngineConfig

    group = parser.add_argument_group("engine options")
    helps = {
        "model": "HF model directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)",
        "tokenizer": "tokenizer directory (default: the model's own)",
        "dtype": "auto | float32 | bfloat16 | float16 (auto = bfloat16 on CUDA and AMX/AVX512-BF16 CPUs, else float32)",
        "device": "auto | cpu | cuda",
        "max_model_len": "longest prompt + output in tokens (default: the model's, capped at 8192)",
        "max_num_batched_tokens": "token budget per step (decodes + prompt chunks)",
        "max_num_seqs": "most sequences running at once",
        "max_decode_slowdown": "cap prompt tokens in steps with running decodes so such a step takes at most "
                               "this many times a decode-only step (measured online); default: no cap",
        "block_size": "tokens per KV cache block",
        "enable_prefix_caching": "reuse KV blocks of equal prefixes across requests",
        "kv_cache_memory_bytes": "KV cache size in bytes (overrides the fractions)",
        "kv_cache_memory_fraction": "CPU: share of available RAM for the KV cache",
        "gpu_memory_utilization": "CUDA: share of GPU memory the engine may use",
        "seed": "global random seed",
        "num_threads": "CPU threads for torch (default: torch's choice)",
        "kv_cache_dtype": "auto (the model dtype) | bfloat16 | float32 | float16 | int8 (a scale per token and head; "
                          "the portable attention path for now)",
        "quantization": "unset: a GGUF file keeps its Q4_0/Q4_1/Q4_K/Q8_0/Q6_K weights quantised | none "
                        "(dequantise to --dtype) | int8 (weight-only, per output channel) | int4 (weight-only, "
                        "per group, asymmetric); round to nearest at load time",
        "quantization_group_size": "weights per scale: int4 32 (default), 64 or 128; int8 32 (default) or a "
                                   "multiple of 16, -1 = per output channel",
        "quantize_lm_head": "with int8/int4: LM head and embeddings in int8 per row (--no-quantize-lm-head "
                            "keeps them at --dtype)",
        "cpu_kernels": "CPU: fuselm's C kernels (decode attention, RMSNorm, fp32 GEMMs on a packed layout, "
                       "quantised matmuls, the one-call decode step, single-row bf16 linears) and oneDNN-packed "
                       "bf16 weights (off = portable torch path)",
        "speculative_config": 'speculative decoding as JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\' '
                              'or \'{"method": "draft_model", "model": PATH, "num_speculative_tokens": 4}\'',
    }
    for f in dataclasses.fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=helps.get(f.name))
        else:
            kind = {"int": int, "int | None": int, "float": float, "float | None": float}.get(str(f.type), str)
            group.add_argument(flag, type=kind, default=f.default, help=helps.get(f.name))


def engine_kwargs(args: argparse.Namespace) -> dict:
    from fuselm.config import EngineConfig

    return {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)}


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling options")
    g.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--min-tokens", type=int, default=0)
    g.add_argument("--n", type=int, default=1, help="samples per prompt")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def sampling_params(args: argparse.Namespace):
    from fuselm.sampling_params import SamplingParams

    return SamplingParams(
        n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, max_tokens=args.max_tokens, min_tokens=args.min_tokens,
        stop=args.stop, ignore_eos=args.ignore_eos,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from fuselm.llm import LLM

    params = sampling_params(args)
    llm = LLM(**engine_kwargs(args))
    print(f"model: {llm.engine.model_name} ({llm.engine.device}, {llm.engine.dtype}), "
          f"loaded in {llm.engine.load_seconds:.2f} s", file=sys.stderr)
    prompts = args.prompts or DEMO_PROMPTS
    use_chat = args.chat if args.chat is not None else not args.prompts
    start = time.perf_counter()
    if use_chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    else:
        outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    for prompt, out in zip(prompts, outputs):
        print(f"\n=== {prompt}")
        for c in out.outputs:
            tag = f"[{c.index}] " if len(out.outputs) > 1 else ""
            print(f"{tag}{c.text}  <{c.finish_reason}>")
    n_out = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    n_in = sum(len(o.prompt_token_ids) for o in outputs)
    print(f"\n{len(outputs)} requests, {n_in} prompt + {n_out} generated tokens in {elapsed:.2f} s "
          f"({n_out / elapsed:.1f} output tok/s)", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from fuselm.llm import LLM

    params = sampling_params(args)
    if params.n != 1:
        raise ValueError("chat streams one answer; use --n 1")
    llm = LLM(**engine_kwargs(args))
    engine, tok = llm.engine, llm.engine.tokenizer
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("fuselm chat: type a message, /reset to start over, /exit or Ctrl-D to quit.", file=sys.stderr)
    turn = 0
    while True:
        try:
            line = input("\n>>> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        prompt = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
        rid = f"chat-{turn}"
        turn += 1
        engine.add_request(rid, prompt, params)
        printed = 0
        reply = ""
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    reply = out.outputs[0].text
                    print(reply[printed:], end="", flush=True)
                    printed = len(reply)
        except KeyboardInterrupt:
            engine.abort_request(rid)
        print()
        messages.append({"role": "assistant", "content": reply})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fuselm", description="fuselm: fast LLM inference and serving")
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING, ...")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate completions for prompts (offline batch)",
                         description="Run prompts through the engine in one continuous batch. "
                                     "With no prompt, runs a demo batch of chat questions.")
    gen.add_argument("prompts", nargs="*", help="prompt texts (default: a demo batch)")
    gen.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                     help="wrap each prompt in the model's chat template (default: on for the demo batch)")
    add_sampling_args(gen)
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat, streaming tokens as they come")
    chat.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(chat)
    add_engine_args(chat)
    chat.set_defaults(func=cmd_chat)

    for register in _optional_commands():
        register(sub)
    return parser


def _optional_commands():
    """Subcommands whose modules exist (server, bench)."""
    import importlib
    import importlib.util

    found = []
    for module in ("fuselm.server.cli", "fuselm.bench.cli"):
        if importlib.util.find_spec(module) is not None:
            found.append(importlib.import_module(module).register)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"fuselm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
