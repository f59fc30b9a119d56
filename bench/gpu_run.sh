#!/usr/bin/env bash
# The GPU machine's one script: install revify, run the CUDA tests, run the suite; everything under $OUT.
#   OUT=/path bash bench/gpu_run.sh [gpu_suite.py options, e.g. --only plain hf --models bert]
# Limits (seconds): CUDA tests TEST_TIMEOUT (90), suite SUITE_TIMEOUT (300, hard) with rows not
# started after SUITE_LIMIT (240) recorded as skipped; the suite writes its table after every row.
# A second, partial run: SKIP_TESTS=1 bash bench/gpu_run.sh --only compile compile-0.5 perblock+compile
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python3}"
start=$(date +%s)
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# torch is pinned in pyproject (2.13.0): --no-deps keeps the machine's own torch
"$PY" -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || echo "pip install failed (see install.log)"
if ! "$PY" -c "import revify.passes.capture" >> "$OUT/install.log" 2>&1; then
  # revify.passes lives in ./passes (package-dir); without the install, a link gives the same layout
  echo "revify not importable after install: linking revify/passes -> ../passes" | tee -a "$OUT/install.log"
  ln -sfn ../passes revify/passes
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
echo "install: $(( $(date +%s) - start )) s"

if [ "${SKIP_TESTS:-0}" = 1 ]; then
  echo "SKIP_TESTS=1: CUDA tests not run"
else
  timeout "${TEST_TIMEOUT:-90}" "$PY" -m pytest -m cuda -q -rs tests/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.log"
  echo "cuda tests exit ${PIPESTATUS[0]} at $(( $(date +%s) - start )) s" | tee -a "$OUT/cuda_tests.log"
fi

timeout "${SUITE_TIMEOUT:-300}" "$PY" bench/gpu_suite.py --out "$OUT" --time-limit "${SUITE_LIMIT:-240}" "$@" \
  2>&1 | tee "$OUT/suite.log"
echo "suite exit ${PIPESTATUS[0]} at $(( $(date +%s) - start )) s" | tee -a "$OUT/suite.log"
