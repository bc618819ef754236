#!/usr/bin/env bash
# The shipped models' third stage: shapes-*@2 (docs/experiments/cpu-continue) fine-tuned
# further on this 2-core CPU, one thread each, both at once, with mix.json: matching gets
# half the steps, 70% of true captions are the complete one and 75% of false captions are
# its one-change twins (relation x4, colour and size x2), each twin is also ranked against
# its true caption (align_rank); count / relation questions weigh x4 / x3 and count answers
# 3, 4, 5, 6 (undercounted by one) x2, x3, x4, x4.
#
#   docs/experiments/cpu-continue-2/run.sh STORE FEATURES DATA OUTDIR
#
# STORE must hold shapes-vilbert@2 and shapes-lxmert@2; the new versions land beside them
# as @3, then each is scored on the test split into OUTDIR/<kind>/ (metrics.json, plots).
set -euo pipefail
STORE=${1:?usage: run.sh STORE FEATURES DATA OUTDIR} FEATURES=${2:?} DATA=${3:?} OUT=${4:?}
MIX=docs/experiments/cpu-continue-2/mix.json
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1 TQDM_MININTERVAL=60
mkdir -p "$OUT"
train_and_eval() {  # kind lr steps seconds
  python -m service.cli train finetune --task all --init "shapes-$1@2" --name "shapes-$1" \
    --features "$FEATURES" --data "$DATA" --store "$STORE" --include-easyvqa --mix "$MIX" \
    --batch-size 64 --lr "$2" --steps "$3" --max-seconds "$4" \
    --checkpoint-dir "$OUT/ckpt-$1" >"$OUT/$1.log" 2>&1
  python -m service.cli eval --model "shapes-$1@3" --task all --split test --align-queries 0 \
    --store "$STORE" --features "$FEATURES" --data "$DATA" --out "$OUT/$1" >"$OUT/eval-$1.log" 2>&1
}
train_and_eval lxmert 1e-4 1800 4200 &
train_and_eval vilbert 5e-5 640 6000 &
wait
