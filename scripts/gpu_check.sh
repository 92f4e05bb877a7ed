#!/usr/bin/env bash
# `make gpu-check`: the first campaign on a GPU machine, under 8 minutes on one H200: environment,
# BERT-base vanilla vs SIFT@1 throughput and MFU, a ZeRO-3 SIFT smoke, and the study's recipe at a GPU
# batch size. One table on stdout, gpu_check.json in the run directory (benchmarks/gpu_check.py).
#   bash scripts/gpu_check.sh [--out DIR] [--data DIR] [--seconds S] [--study-seconds S]
# `make gpu-check-dry` (--dry-run): the same campaign on the CPU with the tiny preset and tiny data,
# under 3 minutes on 2 cores; the CUDA-only figures print as n/a.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
export TOKENIZERS_PARALLELISM=false
for arg in "$@"; do
  if [ "$arg" = "--dry-run" ]; then
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  fi
done
exec "$PY" benchmarks/gpu_check.py "$@"
