"""Shared fixtures: tiny HF models on disk (session-scoped, built once) and the embedded model."""

from __future__ import annotations

import os
import random

import pytest
import torch

from tiny_models import make_tiny_model

torch.set_num_threads(2)
# engines in tests take the fixed kernel rules: a plan timed on a busy CI machine would differ from
# run to run (tests/test_kernel_choice.py covers the measured choice)
os.environ.setdefault("FUSELM_KERNEL_CHOICE", "rules")

pytest_plugins = ["server_helpers"]  # the real-server fixtures: engine, server

TINY_KINDS = {
    "llama_untied": ("llama", False),
    "llama_tied": ("llama", True),
    "llama3_scaled": ("llama3", False),
    "qwen2_bias": ("qwen2", False),
    "mistral": ("mistral", False),
}


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            kind, tie = TINY_KINDS[name]
            path = tmp_path_factory.mktemp(name)
            cache[name] = (str(path), make_tiny_model(path, kind, tie=tie))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory):
    """(path, hf_model) of the untied tiny Llama."""
    return tiny_model_factory("llama_untied")


def random_prompts(lengths: list[int], vocab: int = 384, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, vocab) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="session")
def embedded_llm():
    from fuselm import LLM

    return LLM()


def _kernel_variants() -> list[str]:
    from fuselm.kernels.build import find_compiler, supported_variants

    return supported_variants() if find_compiler() is not None else []


@pytest.fixture(scope="module", params=_kernel_variants())
def kernels(request):
    """The C kernel library built for one ISA variant (each supported one in turn); a test file may
    define its own `kernels` instead."""
    from fuselm.kernels.cpu import load_kernels

    loaded = load_kernels(request.param)
    assert loaded is not None and loaded.isa == request.param
    return loaded
