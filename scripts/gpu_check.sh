#!/usr/bin/env bash
# The GPU check, one command for a CUDA machine (issue 20): the engine built with CUDA (one build gives
# huatuo-local's libraries and llama.cpp's own tools), doctor and the self-test on the GPU, the
# fidelity, chat and serve tests with the model on the GPU (the default placement), then decode, time
# to first token and serving beside llama.cpp's tools from that same build (bench/gpu.py,
# bench/serve.py --ngl 99). Results go to BENCHMARKS.md's history.
#
#   bash scripts/gpu_check.sh                  in a project set up by scripts/bootstrap.py
#
# On a machine without network, with the Python packages already installed (e.g. into a --target
# folder on PYTHONPATH) and llama-cpp-python's source distribution unpacked:
#   PY=python3 SITE=/tmp/site SRC=/tmp/src/llama_cpp_python-0.3.36 bash scripts/gpu_check.sh
# GPU_CMAKE_ARGS sets the build's flags (default: CUDA for the GPUs present, with the RPC backend).
# REHEARSE=1 runs every step on a machine without a GPU (a CPU build, tiny shapes, no GPU required,
# nothing appended to BENCHMARKS.md): the script itself is checked before a GPU's time is spent on it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
REHEARSE=${REHEARSE:-0}
# Not CMAKE_ARGS from the caller: an offline setup may have exported one for a bindings-only build.
if [ "$REHEARSE" = 1 ]; then DEFAULT_ARGS="-DGGML_RPC=ON"; else DEFAULT_ARGS="-DGGML_CUDA=on -DGGML_RPC=ON"; fi
export CMAKE_ARGS=${GPU_CMAKE_ARGS:-$DEFAULT_ARGS}
export PYTHONUNBUFFERED=1
T0=$(date +%s); step() { echo "== [$(( $(date +%s) - T0 ))s] $*"; }
if [ "$REHEARSE" = 1 ]; then
  SHAPES=(--tiny --depth 2 --workdir /tmp/huatuo-gpu-check-rehearsal --no-append); CLIENTS=(1 4); TOKENS=16
else
  SHAPES=(--depth 28); CLIENTS=(1 16 64); TOKENS=64
fi

# The speed steps' model (at full depth: a 16 GB checkpoint, converted and quantized) is made in the background
# beside the build and the tests: writing the checkpoint needs no engine, converting it needs the engine's
# quantizer. Both are atomic (a killed job leaves nothing the speed steps would take as done); the speed
# steps wait for it and make whatever is missing themselves, so nothing is timed while it runs.
PREP_LOG=${TMPDIR:-/tmp}/huatuo-gpu-check-prepare.log
PREP=""
trap '[ -n "$PREP" ] && kill "$PREP" 2>/dev/null; true' EXIT
prepare() {  # prepare checkpoint|model: in the background, its output in $PREP_LOG
  "$PY" bench/gpu.py "${SHAPES[@]}" --prepare "$1" >>"$PREP_LOG" 2>&1 & PREP=$!
}
finish_prepare() {
  if [ -n "$PREP" ] && ! wait "$PREP"; then
    echo "preparing the model failed (the speed step will try again); its log:"; tail -n 20 "$PREP_LOG"
  fi
  PREP=""
}
: >"$PREP_LOG"
step "model: writing the speed steps' checkpoint in the background ($PREP_LOG)"
prepare checkpoint
step "engine: one build of llama.cpp's libraries and tools ($CMAKE_ARGS; cached after the first)"
"$PY" scripts/engine_build.py --install ${SITE:+--target "$SITE"} ${SRC:+--source "$SRC"}
finish_prepare
step "model: converting it in the background while the checks run"
prepare model
step "doctor: a GPU must be listed"
"$PY" -m huatuo_local doctor
"$PY" -m huatuo_local doctor --json | REHEARSE=$REHEARSE "$PY" -c 'import json, os, sys
r = json.load(sys.stdin)
assert r["gpus"] or os.environ["REHEARSE"] == "1", "no GPU found"
print("GPUs:", [g["description"] for g in r["gpus"] or []])'
step "issue 20's crash: a model load with the C++-runtime guard off (do the backends' exports alone hold?)"
# huatuo_local imports numpy before llama.cpp, the order that crashed; a crash here is reported, not fatal:
# native.py's guard (on in every other step) is what the product relies on then.
if HUATUO_LOCAL_NO_CPP_GLOBAL=1 "$PY" -m huatuo_local doctor --selftest | grep "^selftest"; then
  echo "holds without the guard (the backends export only their C interface)"
else
  echo "CRASHED without the guard: the version script alone is not enough here; the guard is what holds"
fi
step "self-test on the GPU"
"$PY" -m huatuo_local doctor --selftest | grep "^selftest"  # grep reads it all: head would break the pipe
step "tests with the model on the GPU (fidelity, chat, serve, native, sampling; the GPU beside RPC workers)"
"$PY" -m pytest -q -x tests/test_native.py tests/test_sampling.py tests/test_fidelity.py tests/test_chat_cli.py \
  tests/test_serve.py "tests/test_rpc.py::test_the_line_at_load_says_where_each_layer_went_as_llama_cpp_put_it"
step "model: waiting for the background conversion (nothing is timed while it runs)"
finish_prepare
step "speed: decode and time to first token vs llama-bench and llama-mtmd-cli"
"$PY" bench/gpu.py "${SHAPES[@]}"
step "speed: serving ${CLIENTS[*]} clients vs llama-server"
"$PY" bench/serve.py --ngl 99 "${SHAPES[@]}" --tokens "$TOKENS" --rounds 1 --clients "${CLIENTS[@]}" --ctx 2048
step "done"
