#!/usr/bin/env bash
# The GPU check, one command for a CUDA machine (issue 20): the engine built with CUDA, doctor and the
# self-test on the GPU, the fidelity, chat and serve tests with the model on the GPU (the default
# placement), then decode, time to first token and serving beside llama.cpp's own tools built from the
# same source (bench/gpu.py, bench/serve.py --ngl 99). Results go to BENCHMARKS.md's history.
#
#   bash scripts/gpu_check.sh                       (after python3 scripts/bootstrap.py with CUDA)
#   PY=python3 bash scripts/gpu_check.sh            (an environment prepared otherwise, e.g. offline)
#
# Setup with CUDA: CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90" python3 scripts/bootstrap.py
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export CMAKE_ARGS=${CMAKE_ARGS:-"-DGGML_CUDA=on -DGGML_RPC=ON"}
export PYTHONUNBUFFERED=1
T0=$(date +%s); step() { echo "== [$(( $(date +%s) - T0 ))s] $*"; }

step "doctor: a GPU must be listed"
"$PY" -m huatuo_local doctor
"$PY" -m huatuo_local doctor --json | "$PY" -c 'import json,sys; r=json.load(sys.stdin); assert r["gpus"], "no GPU found"; print("GPUs:", [g["description"] for g in r["gpus"]])'
step "self-test on the GPU"
"$PY" -m huatuo_local doctor --selftest | grep "^selftest"  # grep reads it all: head would break the pipe
step "tests with the model on the GPU (fidelity, chat, serve, native, sampling)"
"$PY" -m pytest -q -x tests/test_native.py tests/test_sampling.py tests/test_fidelity.py tests/test_chat_cli.py \
  tests/test_serve.py
step "speed: decode and time to first token vs llama-bench and llama-mtmd-cli"
"$PY" bench/gpu.py --depth 28
step "speed: serving 1/16/64 clients vs llama-server"
"$PY" bench/serve.py --ngl 99 --depth 28 --tokens 64 --rounds 1 --clients 1 16 64 --ctx 2048
step "done"
