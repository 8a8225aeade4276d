#!/usr/bin/env bash
# llama.cpp's llama-server as a peer for `fuselm bench serve`, on the very same weights as fuselm.
#
#   benchmarks/peers/llama_cpp.sh build     # fetch the llama-cpp-python sdist, build llama-server (CPU, Release)
#   benchmarks/peers/llama_cpp.sh convert   # export the embedded GGUF to HF ($DTYPE), convert to model-<f32|bf16>.gguf
#   benchmarks/peers/llama_cpp.sh serve     # start llama-server in the foreground (after build + convert)
#   benchmarks/peers/llama_cpp.sh all       # build + convert (the default)
#
# Every step is skipped when its output already exists. Everything lands in benchmarks/peers/.build/
# (git-ignored). Settings, all from the environment:
#   DTYPE (float32 or bfloat16; default float32)  PORT (8080)  NP (16 slots)  CTX_PER_SLOT (2048)  THREADS (all cores)  PYTHON (/work/main/.venv python)
#   JOBS (make -j, all cores)  LLAMA_EXTRA_ARGS (appended to the llama-server command line)
#   LLAMA_REPACK=1 to allow llama.cpp's extra buffer types (AMX / weight repacking) at run time.
set -euo pipefail

VERSION=0.3.36
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
BUILD="$HERE/.build"
SRC="$BUILD/llama_cpp_python-$VERSION"
LLAMA="$SRC/vendor/llama.cpp"
CMAKE_BUILD="$BUILD/llama.cpp-build"
SERVER="$CMAKE_BUILD/bin/llama-server"
DTYPE="${DTYPE:-float32}"  # float32 or bfloat16: the precision every engine runs at
case "$DTYPE" in float32) SHORT=f32 ;; bfloat16) SHORT=bf16 ;; *) echo "DTYPE must be float32 or bfloat16" >&2; exit 2 ;; esac
HF_DIR="$BUILD/hf-$SHORT"
GGUF="$BUILD/model-$SHORT.gguf"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
NCPU="$(nproc)"

log() { echo "[llama_cpp.sh] $*" >&2; }

ensure_build_dir() {
    mkdir -p "$BUILD"
    [ -f "$BUILD/.gitignore" ] || printf '*\n' > "$BUILD/.gitignore"
}

fetch() {
    ensure_build_dir
    if [ -d "$LLAMA" ]; then
        log "sources present: $SRC"
        return
    fi
    local tarball="$BUILD/llama_cpp_python-$VERSION.tar.gz"
    if [ ! -f "$tarball" ]; then
        log "downloading the llama-cpp-python==$VERSION sdist"
        "$PYTHON" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$BUILD"
    fi
    log "unpacking $tarball"
    tar -xzf "$tarball" -C "$BUILD"
}

build() {
    fetch
    if [ -x "$SERVER" ] && [ -x "$CMAKE_BUILD/bin/llama-quantize" ] && [ -x "$CMAKE_BUILD/bin/llama-bench" ]; then
        log "llama-server, llama-quantize and llama-bench already built in $CMAKE_BUILD/bin"
        return
    fi
    # CPU only, Release. GGML_NATIVE keeps -march=native (AVX2/AVX-512 where the CPU has them), but AMX
    # is switched off both as ggml options and as compiler flags: GCC lets an explicit -mno-* win over
    # what -march=native implies, so ggml's AMX extra buffer type (ggml-cpu/amx, compiled only under
    # __AMX_INT8__) is never built. `serve` also passes --no-repack (no extra buffer types at all).
    local nofl="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    log "configuring with cmake"
    cmake -S "$LLAMA" -B "$CMAKE_BUILD" \
        -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=OFF \
        -DGGML_NATIVE=ON \
        -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
        -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_OPENCL=OFF -DGGML_SYCL=OFF -DGGML_HIP=OFF \
        -DGGML_CCACHE=OFF \
        -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON \
        -DCMAKE_C_FLAGS="$nofl" -DCMAKE_CXX_FLAGS="$nofl"
    log "building llama-server, llama-quantize and llama-bench with -j${JOBS:-$NCPU}"
    cmake --build "$CMAKE_BUILD" --config Release --target llama-server llama-quantize llama-bench -j "${JOBS:-$NCPU}"
    log "built $SERVER"
}

convert() {
    fetch
    if [ -f "$GGUF" ]; then
        log "GGUF present: $GGUF"
        return
    fi
    log "exporting the embedded model as an HF directory ($DTYPE): $HF_DIR"
    "$PYTHON" -c "import sys; from fuselm.bench.hf_export import export_hf_dir; print(export_hf_dir(sys.argv[1], sys.argv[2]))" "$HF_DIR" "$DTYPE"
    # convert_hf_to_gguf.py needs the gguf package of the SAME llama.cpp revision: take it from the
    # vendored gguf-py rather than whatever `gguf` release pip would give.
    # The converter also imports sentencepiece (before it looks for a tokenizer.model); it goes into
    # .build/pydeps with `pip --target`, so fuselm's venv itself is left untouched.
    if ! PYTHONPATH="$BUILD/pydeps" "$PYTHON" -c "import sentencepiece" 2>/dev/null; then
        log "installing sentencepiece into $BUILD/pydeps"
        "$PYTHON" -m pip install --target "$BUILD/pydeps" sentencepiece
    fi
    log "converting to a $SHORT GGUF with the vendored convert_hf_to_gguf.py"
    PYTHONPATH="$LLAMA/gguf-py:$BUILD/pydeps${PYTHONPATH:+:$PYTHONPATH}" \
        "$PYTHON" "$LLAMA/convert_hf_to_gguf.py" "$HF_DIR" --outtype "$SHORT" --outfile "$GGUF.tmp"
    mv "$GGUF.tmp" "$GGUF"
    log "wrote $GGUF ($(du -h "$GGUF" | cut -f1))"
}

serve() {
    [ -x "$SERVER" ] || { log "no llama-server yet; run: $0 build"; exit 1; }
    [ -f "$GGUF" ] || { log "no $GGUF yet; run: $0 convert"; exit 1; }
    local np="${NP:-16}" ctx_per_slot="${CTX_PER_SLOT:-2048}"
    local extra=()
    [ "${LLAMA_REPACK:-0}" = 1 ] || extra+=(--no-repack)
    # -c is the TOTAL context, split evenly over the -np slots; continuous batching is on by default
    # (-cb) and is passed anyway to make it explicit. The model name clients send is its alias.
    log "serving $GGUF on 127.0.0.1:${PORT:-8080} with $np slots x $ctx_per_slot tokens"
    # shellcheck disable=SC2086
    exec "$SERVER" -m "$GGUF" --host 127.0.0.1 --port "${PORT:-8080}" \
        -np "$np" -c "$((np * ctx_per_slot))" -cb -t "${THREADS:-$NCPU}" \
        --alias "${MODEL_ALIAS:-smollm2-135m-$SHORT}" "${extra[@]}" ${LLAMA_EXTRA_ARGS:-}
}

case "${1:-all}" in
    fetch) fetch ;;
    build) build ;;
    convert) convert ;;
    serve) serve ;;
    all) build; convert ;;
    -h|--help|help) sed -n '2,14p' "$0" ;;
    *) echo "usage: $0 {build|convert|serve|all}" >&2; exit 2 ;;
esac
