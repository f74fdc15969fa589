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

# Benchmarks (appends to BENCHMARKS.md)
bench *ARGS:
    {{python}} bench/convert.py {{ARGS}}

# Check the install: vision probe, engine build, RAM
doctor:
    .venv/bin/huatuo-local doctor
