"""What a new user sees first: the demo batch is reproducible and right, `fuselm` alone explains
itself, and the one-off kernel compile says what it is doing."""

from __future__ import annotations

import re

import pytest

from fuselm.cli import DEMO_PROMPTS, build_parser, main
from fuselm.kernels import build


def demo_answers(capsys) -> dict[str, str]:
    assert main(["generate", "--max-tokens", "24", "--kv-cache-memory-bytes", str(32 << 20)]) == 0
    out = capsys.readouterr().out
    answers = dict(re.findall(r"^=== (.*)\n((?:.|\n)*?)(?=\n=== |\Z)", out, flags=re.M))
    assert set(answers) == set(DEMO_PROMPTS), out
    return answers


def test_demo_batch_is_reproducible_and_answers_paris(capsys):
    first = demo_answers(capsys)
    second = demo_answers(capsys)
    assert first == second
    assert "Paris" in first["What is the capital of France?"]


def test_fuselm_alone_prints_an_overview(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"generate", "chat", "serve", "bench"} <= set(commands)
    for name in commands:
        assert re.search(rf"^  {name}\b", out, flags=re.M), f"the overview does not name {name}"
    assert "SmolLM2-135M-Instruct" in out and "e.g. fuselm generate" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert re.fullmatch(r"fuselm \S+\n", capsys.readouterr().out)


def test_first_build_says_it_compiles_and_a_cache_hit_is_silent(tmp_path, capsys):
    variant, compiler = build.VARIANTS["generic"], build.find_compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    first = build.build(variant, compiler, tmp_path)
    err = capsys.readouterr().err
    assert not first.cache_hit and "compiling CPU kernels for" in err and "first run only" in err
    assert build.build(variant, compiler, tmp_path).cache_hit
    assert "compiling" not in capsys.readouterr().err
