#!/usr/bin/env bash
# bench/gpu.sh: the scale benchmark (bench/scale.py) on a GPU, in under 5 minutes where torch
# sees one. Where it does not, it FALLS BACK to a tiny CPU run (bench/scale.py --tiny), says so,
# and its figures say nothing about a GPU.
#
#   bench/gpu.sh [--dry-run]      (PYTHON=... to choose the interpreter; default .venv/bin/python)
#
# --dry-run prints the command it would run and exits.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; fi

if "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "bench/gpu.sh: GPU found; scale benchmark on cuda"
  args=(--device cuda --threads 4 --private-size 2000 --ks 1024 2048 4096)
else
  echo "bench/gpu.sh: no GPU (torch.cuda.is_available() is False): FALLING BACK to a tiny CPU" \
    "run (bench/scale.py --tiny); its figures say nothing about a GPU"
  args=(--device cpu --tiny)
fi
command=("$PYTHON" bench/scale.py "${args[@]}")
echo "+ ${command[*]}"
if (( DRY_RUN )); then exit 0; fi
exec "${command[@]}"
