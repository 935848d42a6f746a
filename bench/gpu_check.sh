#!/usr/bin/env bash
# The GPU path checked (issue 17), in one short run on a machine with a CUDA device:
#
#     bash bench/gpu_check.sh [OUT_DIR]       # from the repository root; about 5 minutes
#
# 1. the dump against the bare bf16 teacher forward, MiniLM and BERT-base sizes, random weights
#    (target: dump >= 0.9 x bare), and the host path alone with a synthetic teacher;
# 2. teacher-dump + a short student-train on the device (target: data wait < 5% of a step);
# 3. the tests marked `cuda` (they skip on a machine without one).
# Everything it prints also goes to OUT_DIR (default $OUT, else ./gpu-check); copy the tables into
# bench/RESULTS.md ("GPU check") with the date and the machine line.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu-check}}"
mkdir -p "$out"
PY="${PY:-python}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ! "$PY" -c "import kdpipe.pipeline" 2>/dev/null; then  # not installed: the checkout is the package
  shim="$(mktemp -d)"
  ln -s "$PWD" "$shim/kdpipe"
  export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
fi
{
  date -u
  uptime
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  echo "cores: $(nproc)"
  git rev-parse --short HEAD 2>/dev/null || true
} 2>&1 | tee "$out/machine.txt"
status=0
timeout 300 "$PY" bench/gpu_check.py dump 2>&1 | tee "$out/dump.txt" || status=1
timeout 300 "$PY" bench/gpu_check.py train 2>&1 | tee "$out/train.txt" || status=1
timeout 300 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/tests.txt" || status=1
uptime | tee -a "$out/machine.txt"
exit $status
