"""The registry is what the user is told: `fuselm --help` and the engine commands' help list every
registered architecture and GGUF architecture, and an unsupported architecture names them."""

from __future__ import annotations

import json

import pytest

from fuselm.cli import build_parser
from fuselm.models.registry import ARCHITECTURES, GGUF_ARCHITECTURES


def help_text(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare with spaces collapsed


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["serve", "--help"]])
def test_help_lists_every_architecture_and_format(argv, capsys):
    if argv[0] == "serve" and "serve" not in build_parser()._subparsers._group_actions[0].choices:
        pytest.skip("the server extra is not installed")
    text = help_text(argv, capsys)
    for arch, (_, _, covers) in ARCHITECTURES.items():
        assert f"{arch} ({covers})" in text
    for gguf_arch in GGUF_ARCHITECTURES:
        assert f"{gguf_arch} (" in text
    assert "GGUF" in text and "safetensors" in text


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    from fuselm import LLM

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FalconForCausalLM"], "vocab_size": 8}))
    with pytest.raises(ValueError) as err:
        LLM(str(tmp_path), device="cpu")
    message = str(err.value)
    assert "FalconForCausalLM" in message
    assert all(arch in message for arch in ARCHITECTURES)
