#!/usr/bin/env bash
# The GPU check in one command, on the lent GPU machine (its image lacks diffusers: the wheels in
# .gpu_wheels/ travel with the working tree; fetch them here first with
#   .venv/bin/pip download diffusers==0.42.1 importlib-metadata --no-deps -d .gpu_wheels ).
# Writes every figure under $OUT (benchmarks/gpu_check.py says which files).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
python3 -c "import diffusers" 2>/dev/null || python3 -m pip install -q --no-index --no-deps .gpu_wheels/*.whl
python3 benchmarks/gpu_check.py --out "$OUT" --budget "${BUDGET:-480}"
