#!/usr/bin/env bash
# The GPU check, at most 8 minutes on one GPU:  bench/gpu.sh OUTDIR
#
# 1. bench.gpu on CUDA (bf16): both backbones at the demo and the papers' full size,
#    ResNet-50 FPN at 600 px and the tiny detector -> OUTDIR/gpu_bench.json (<= 4 min).
# 2. the test suite with what time is left -> OUTDIR/pytest.txt, OUTDIR/pytest.rc.
#    The tests pin device="cpu" (tests/support.make_settings), so they check the code
#    on a GPU machine, not CUDA kernels; the benchmark is what runs on the GPU.
# CI never runs this: nothing else depends on a GPU. Without one, the Python part runs
# as  .venv/bin/python -m bench.gpu --device cpu --quick --out DIR
set -uo pipefail

OUT=${1:?usage: bench/gpu.sh OUTDIR}
TOTAL_S=${GPU_CHECK_SECONDS:-480}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
start=$(date +%s)
left() { echo $((TOTAL_S - ($(date +%s) - start))); }

{ nvidia-smi || true; "$PY" -c 'import torch; print(torch.__version__, torch.cuda.is_available())'; } \
  >"$OUT/environment.txt" 2>&1

timeout 270 "$PY" -m bench.gpu --device cuda --budget-s 200 --out "$OUT" 2>&1 | tee "$OUT/bench.txt"
echo "${PIPESTATUS[0]}" >"$OUT/bench.rc"

budget=$(($(left) - 15))
if [ "$budget" -gt 30 ]; then
  # GPU_TESTS: test paths to run (default: the whole suite)
  timeout "$budget" "$PY" -m pytest -q -m "not load" -p no:cacheprovider ${GPU_TESTS:-} \
    >"$OUT/pytest.txt" 2>&1
  echo $? >"$OUT/pytest.rc"
else
  echo "skipped: no time left" >"$OUT/pytest.txt"
fi
tail -n 3 "$OUT/pytest.txt"
echo "gpu check done in $(($(date +%s) - start)) s; results in $OUT"
