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
bench: bench-convert bench-runtime bench-encode bench-settings bench-serve

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
