"""The `fuselm` command line: engine flags generated from EngineConfig, and `chat --stop` streaming.

The help of every command that takes engine options must carry each EngineConfig field's own
help text (the only place an option is documented), and the flags must parse back into the
EngineConfig the same values give. `fuselm chat` prints each output's new text as it comes: with
a stop string whose first characters arrive a step before its last ones, what it printed must be
exactly the final completion (the offline LLM.chat run of the same conversation), never the
partial match that the stop string later cuts.
"""

from __future__ import annotations

import builtins
import dataclasses
import json

import pytest

from fuselm import LLM, SamplingParams
from fuselm.cli import build_parser, engine_kwargs, main
from fuselm.config import EngineConfig

ENGINE_COMMANDS = [["generate"], ["chat"], ["serve"], ["bench", "throughput"]]


def squeeze(text: str) -> str:
    """Text without whitespace: argparse re-wraps help lines (and may break after a hyphen)."""
    return "".join(text.split())


@pytest.mark.parametrize("command", ENGINE_COMMANDS, ids=" ".join)
def test_help_documents_every_engine_option(command, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    shown = squeeze(capsys.readouterr().out)
    for f in dataclasses.fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in shown, f"{' '.join(command)} has no {flag}"
        assert squeeze(f.metadata["help"]) in shown, f"{' '.join(command)} --help lacks the doc of {f.name}"


NON_DEFAULT = {
    "model": "some/model.gguf", "tokenizer": "some/tokenizer", "dtype": "bfloat16", "device": "cpu",
    "max_model_len": 1024, "max_num_batched_tokens": 256, "max_num_seqs": 8, "max_num_seqs_per_client": 3,
    "max_decode_slowdown": 1.5,
    "block_size": 32, "enable_prefix_caching": False, "kv_cache_memory_bytes": 1 << 20,
    "kv_cache_memory_fraction": 0.5, "gpu_memory_utilization": 0.5, "seed": 7, "num_threads": 3,
    "kv_cache_dtype": "int8", "quantization": "int8", "quantization_group_size": 64, "quantize_lm_head": False,
    "cpu_kernels": False, "enable_cascade_attention": False, "prefix_aware_admission": True,
    "kv_compression": {"method": "snapkv", "budget": 512, "window": 16},
    "speculative_config": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5},
}
# The parallel options go in a set of their own: tensor parallelism refuses speculative decoding.
NON_DEFAULT_PARALLEL = {"tensor_parallel_size": 2, "distributed_executor_backend": "ray",
                        "enable_expert_parallel": True, "expert_placement": "placement.json"}


def as_flags(options: dict) -> list[str]:
    flags = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else flag.replace("--", "--no-", 1))
        else:
            flags += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    return flags


@pytest.mark.parametrize("command", ENGINE_COMMANDS, ids=" ".join)
def test_engine_flags_round_trip_into_engine_config(command):
    every = {**NON_DEFAULT, **NON_DEFAULT_PARALLEL}
    assert set(every) == {f.name for f in dataclasses.fields(EngineConfig)}, "a field without a test value"
    assert all(every[f.name] != f.default for f in dataclasses.fields(EngineConfig))
    parser = build_parser()
    defaults = EngineConfig.from_kwargs(**engine_kwargs(parser.parse_args(command)))
    assert defaults == EngineConfig()
    for options in (NON_DEFAULT, NON_DEFAULT_PARALLEL):
        parsed = EngineConfig.from_kwargs(**engine_kwargs(parser.parse_args([*command, *as_flags(options)])))
        assert parsed == EngineConfig(**options)


def test_choices_come_from_the_config(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--kv-cache-dtype", "int3"])
    assert "invalid choice" in capsys.readouterr().err


def run_chat(monkeypatch, capsys, argv: list[str], message: str) -> str:
    """What `fuselm chat` prints on stdout for one user message (stdin then ends)."""
    lines = iter([message])

    def fake_input(prompt: str = "") -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(builtins, "input", fake_input)
    capsys.readouterr()
    assert main(["chat", *argv]) == 0
    return capsys.readouterr().out


def test_chat_stop_never_prints_text_the_stop_string_cuts(tiny_llama, monkeypatch, capsys):
    path = tiny_llama[0]
    message = "Call me Ishmael."
    engine_flags = ["--model", path, "--dtype", "float32", "--device", "cpu"]
    sampling = ["--temperature", "0", "--max-tokens", "40", "--ignore-eos"]
    llm = LLM(path, dtype="float32", device="cpu")
    conversation = [{"role": "user", "content": message}]
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    full = llm.chat(conversation, greedy, use_tqdm=False)[0].outputs[0]
    text = full.text

    # where each token's text ends, and a 3-character stop string that one of those ends splits
    tok = llm.get_tokenizer()
    ends = {len(tok.decode(full.token_ids[:i])) for i in range(1, len(full.token_ids) + 1)}
    stop = start = None
    for a in range(1, len(text) - 3):
        candidate = text[a:a + 3]
        if text.find(candidate) == a and "\ufffd" not in candidate and any(a < e < a + 3 for e in ends):
            stop, start = candidate, a
            break
    if stop is None:
        pytest.skip("no token boundary inside a stop-string candidate")

    expected = llm.chat(conversation, greedy.clone(stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert expected.text == text[:start] and expected.finish_reason == "stop"
    printed = run_chat(monkeypatch, capsys, [*engine_flags, *sampling, "--stop", stop], message)
    assert printed == expected.text + "\n\n"  # the reply, its newline, and the one printed at the end of input

    printed = run_chat(monkeypatch, capsys, [*engine_flags, *sampling], message)
    assert printed == text + "\n\n"
