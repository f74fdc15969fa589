# The everyday commands. `just` itself comes with the dev install (rust-just).
python := ".venv/bin/python"

# Create .venv, build the fixed llama.cpp engine (cached), install everything
setup:
    python3 scripts/bootstrap.py

# Lint, then run the test suite
test *ARGS: lint
    {{python}} -m pytest -q {{ARGS}}

# Lint
lint:
    {{python}} -m ruff check .

# All benchmarks (each appends its table to BENCHMARKS.md)
bench: bench-convert bench-runtime bench-encode bench-settings bench-load bench-serve bench-eval bench-rpc bench-cluster

# Converter throughput and peak memory vs llama.cpp's convert_hf_to_gguf.py
bench-convert *ARGS:
    {{python}} bench/convert.py --depths 2 4 {{ARGS}}

# Runtime speed and memory vs llama.cpp's tools and PyTorch
bench-runtime *ARGS:
    {{python}} bench/runtime.py {{ARGS}}

# Check the install: vision probe, engine build, RAM
doctor:
    .venv/bin/huatuo-local doctor

# Image encode time by mmproj type (after bench-runtime, which writes the checkpoint)
bench-encode *ARGS:
    {{python}} bench/encode.py {{ARGS}}

# Engine settings sweep (micro-batch, flash attention, threads) on runtime.py's 4-layer checkpoint
bench-settings *ARGS:
    {{python}} bench/settings.py {{ARGS}}

# Serving: huatuo-local serve vs llama-server, 1/2/4 clients, image interference, memory
bench-serve *ARGS:
    {{python}} bench/serve.py {{ARGS}}

# Model load: read vs mmap vs mmap-release, and a whole one-shot chat vs llama-mtmd-cli (full 7B depth)
bench-load *ARGS:
    {{python}} bench/settings.py --load --depth 28 {{ARGS}}

# The REPL's wait after Enter when the question is typed 5/20/60 s after the start (full 7B depth)
bench-interactive *ARGS:
    {{python}} bench/runtime.py --interactive --depths 28 28 --quants Q4_K_M {{ARGS}}

# Eval: cost per question with and without shared images, vs llama-mtmd-cli per question
bench-eval *ARGS:
    {{python}} bench/eval.py {{ARGS}}

# RPC: the model split over local llama.cpp RPC workers vs all local; bytes per token
bench-rpc *ARGS:
    {{python}} bench/rpc.py {{ARGS}}

# serve --ray local (1 and 2 replicas) beside plain serve; follow-ups under affinity vs power of two choices
bench-cluster *ARGS:
    {{python}} bench/cluster.py {{ARGS}}

# Sampling's cost per token on a 152064-token vocabulary, in isolation
bench-sampling:
    {{python}} bench/sampling.py

# On a CUDA machine: build the engine for CUDA, measure beside llama.cpp's tools, test on the GPU
# (three phases; see the README's GPU section; REHEARSE=1 runs them on a machine without a GPU)
gpu-check *ARGS:
    bash scripts/gpu_check.sh {{ARGS}}
