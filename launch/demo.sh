#!/usr/bin/env bash
# The main job: a short multi-rank training on real data with a summary on rank 0.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$repo/.venv}"
NP="${NP:-2}"
cd "$repo"
export OMP_NUM_THREADS=1 PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$VENV/bin/horovodrun" -np "$NP" -H "localhost:$NP" --gloo \
    "$VENV/bin/python" tests/ranks/dense_smoke.py
