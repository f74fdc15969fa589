#!/usr/bin/env bash
# The GPU check (see scripts/gpu_check.py): three phases, each fitting one call on a lent CUDA machine.
#   bash scripts/gpu_check.sh --phase build --dir /tmp/gc --deadline 540
#   bash scripts/gpu_check.sh --phase measure --dir /tmp/gc --deadline 540
#   bash scripts/gpu_check.sh --phase test --dir /tmp/gc --deadline 540
# With no arguments: all three phases in turn, without a deadline (a machine of your own).
# PY names the Python (default .venv/bin/python, else python3); REHEARSE=1 runs it on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
if [ $# -eq 0 ]; then
  for phase in build measure test; do "$PY" scripts/gpu_check.py --phase "$phase" --python "$PY"; done
else
  exec "$PY" scripts/gpu_check.py --python "$PY" "$@"
fi
