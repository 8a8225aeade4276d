"""The `fuselm` command: generate | chat (and serve / bench where installed).

Engine options are generated from EngineConfig's fields and their help metadata, so the CLI can
never drift from the API. `chat` prints each output's new text as it comes: the engine holds
back text that a stop string could still cut, so what is printed is never taken back.
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


_FLAG_TYPES = {"int": int, "float": float, "str": str, "Any": str}  # EngineConfig annotations -> argparse types


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field: its name, type, choices, default and help text (the field's
    `help` metadata in fuselm/config.py, the only place an option is documented)."""
    from fuselm.config import EngineConfig
    from fuselm.models.registry import models_help

    parser.add_argument_group("models", models_help().replace("%", "%%"))
    group = parser.add_argument_group("engine options", "the options of fuselm.config.EngineConfig (LLM(...) "
                                                        "takes the same names)")
    for f in dataclasses.fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        doc = f.metadata["help"].replace("%", "%%")
        kind = str(f.type).removesuffix(" | None")
        if kind == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                               help=f"{doc} (default: {'on' if f.default else 'off'})")
        else:
            default = "" if f.default is None else f" (default: {f.default})"
            group.add_argument(flag, type=_FLAG_TYPES[kind], default=f.default, choices=f.metadata["choices"],
                               help=doc + default)


def engine_kwargs(args: argparse.Namespace) -> dict:
    from fuselm.config import EngineConfig

    return {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)}


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """Sampling flags. Those left out take the model's generation_config.json defaults (as vLLM does),
    else SamplingParams' own; the demo batch is greedy unless a flag says otherwise."""
    g = parser.add_argument_group("sampling options", "unset: the model's generation_config.json defaults, "
                                                      "else SamplingParams' (the demo batch: greedy)")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None, help="0 = off")
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--presence-penalty", type=float, default=None)
    g.add_argument("--frequency-penalty", type=float, default=None)
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--min-tokens", type=int, default=0)
    g.add_argument("--n", type=int, default=1, help="samples per prompt")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


_SAMPLING_FLAGS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                   "repetition_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
                   "frequency_penalty": "frequency_penalty"}


def sampling_params(args: argparse.Namespace, defaults: dict | None = None):
    """SamplingParams from the flags given, over `defaults` (the model's generation_config.json)."""
    from fuselm.sampling_params import SamplingParams

    values = dict(defaults or {})
    values.update({name: getattr(args, flag) for name, flag in _SAMPLING_FLAGS.items()
                   if getattr(args, flag, None) is not None})
    return SamplingParams(n=args.n, max_tokens=args.max_tokens, min_tokens=args.min_tokens, stop=args.stop,
                          ignore_eos=args.ignore_eos, **values)


def cmd_generate(args: argparse.Namespace) -> int:
    from fuselm.llm import LLM

    options = engine_kwargs(args)
    demo = not args.prompts
    if demo and options["dtype"] == "auto":
        options["dtype"] = "float32"  # the demo's answers then do not depend on whether the CPU has bf16
    llm = LLM(**options)
    # The demo batch is greedy (the same answers on every run); prompts of one's own get the model's
    # generation_config.json defaults; flags override either.
    params = sampling_params(args, {"temperature": 0.0} if demo else llm.engine.generation_defaults)
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

    if args.n != 1:
        raise ValueError("chat streams one answer; use --n 1")
    llm = LLM(**engine_kwargs(args))
    engine, tok = llm.engine, llm.engine.tokenizer
    params = sampling_params(args, engine.generation_defaults)
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
    from fuselm.models.registry import models_help

    parser = argparse.ArgumentParser(prog="fuselm", description="fuselm: fast LLM inference and serving",
                                     epilog=models_help())
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING, ...")
    parser.add_argument("--version", action="version", version=f"fuselm {version()}")
    sub = parser.add_subparsers(dest="command")

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
    """Subcommands whose modules exist (server, router, bench) and `placement` (expert placement)."""
    import importlib
    import importlib.util

    found = []
    for module in ("fuselm.server.cli", "fuselm.router.cli", "fuselm.bench.cli", "fuselm.parallel.placement"):
        if importlib.util.find_spec(module) is not None:
            found.append(importlib.import_module(module).register)
    return found


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("fuselm")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def overview(parser: argparse.ArgumentParser) -> str:
    """What `fuselm` with no command prints: the commands, the embedded model, one example each."""
    from fuselm.loader.defaults import default_model_path

    try:
        embedded = default_model_path()
    except (FileNotFoundError, ImportError, ValueError) as exc:
        embedded = f"not installed ({exc})"
    subcommands = parser._subparsers._group_actions[0]  # the registered commands, optional ones included
    commands = {a.dest: a.help for a in subcommands._choices_actions}
    examples = {
        "generate": 'fuselm generate "The capital of France is" --max-tokens 20   # no prompt: a demo batch',
        "chat": 'fuselm chat --system "You are terse."',
        "serve": "fuselm serve --port 8000   # OpenAI-compatible: /v1/chat/completions, /v1/completions",
        "router": "fuselm router --worker http://127.0.0.1:8001 --worker http://127.0.0.1:8002 --port 8000",
        "bench": "fuselm bench throughput --workload chat --num-requests 64",
        "placement": "fuselm placement --stats expert_stats.json --ranks 2 --out placement.json",
    }
    lines = [f"fuselm {version()}: fast LLM inference and serving on CPU", "",
             f"Embedded default model (used when --model is not given): {embedded}", "", "Commands:"]
    for name, summary in commands.items():
        lines.append(f"  {name:<10} {summary or ''}".rstrip())
        if name in examples:
            lines.append(f"             e.g. {examples[name]}")
    lines += ["", "`fuselm COMMAND --help` lists a command's options; `fuselm --help` the models it runs."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        print(overview(parser))
        return 0
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"fuselm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
