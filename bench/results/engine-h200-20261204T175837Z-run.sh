#!/bin/bash
# Device run: GPU tests, then the full-size engine benchmark. Everything lands in $OUT.
# Wheels: transformers 5.25.0, mistral-common 1.13.1 and their missing dependencies for
# CPython 3.12 manylinux, in .whl/ (the device image has torch 2.11.0+cu130, not these).
set -o pipefail
START=$(date +%s)
TOTAL=${TOTAL:-400}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
[ -n "$SKIP_INSTALL" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || { echo "pip install failed"; exit 3; }
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{
  date -u; nvidia-smi; uname -a; nproc; free -g
  python3 - <<'PY'
import sys, torch, transformers, mistral_common, numpy, pytest, triton
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
print("transformers", transformers.__version__, transformers.__file__)
print("mistral_common", mistral_common.__version__, "numpy", numpy.__version__, "pytest", pytest.__version__, "triton", triton.__version__)
PY
} 2>&1 | tee "$OUT/env.log"
echo "== setup took $(( $(date +%s) - START )) s"
timeout -s INT -k 15 ${TEST_S:-160} python3 -m pytest -p no:cacheprovider -m gpu tests/gpu -v -rA --durations=0 --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log"
echo "== pytest rc=$? at $(( $(date +%s) - START )) s"
LEFT=$(( TOTAL - ($(date +%s) - START) )); [ $LEFT -ge 150 ] || LEFT=150
echo "== bench deadline ${LEFT} s"
timeout -s INT -k 10 $(( LEFT + 15 )) python3 bench/results/engine-h200-20261204T175837Z-driver.py --out "$OUT" --deadline-s "$LEFT" "$@" 2>&1 | grep -v -e "FutureWarning: .past_key_values" -e "output = func(self" | tee "$OUT/bench.log"
echo "== bench rc=$? at $(( $(date +%s) - START )) s"
nvidia-smi --query-gpu=name,memory.used,memory.total,temperature.gpu,clocks.sm --format=csv
