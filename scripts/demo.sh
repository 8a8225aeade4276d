#!/usr/bin/env bash
# Set everything up, then run the main job: a batch of chat prompts on the embedded SmolLM2-135M-Instruct.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/fuselm generate "$@"
