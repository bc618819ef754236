#!/usr/bin/env bash
# The shipped models' second stage: the GPU demo's entries (docs/experiments/demo-gpu)
# fine-tuned further on this 2-core CPU, one thread each, both at once, with mix.json
# (objectives 2:2:1, shapes over easy-VQA 4:1, count and relation questions x3, relation /
# colour / size hard negatives x3 / x2 / x2) and 64-token texts.
#
#   docs/experiments/cpu-continue/run.sh STORE FEATURES DATA OUTDIR
#
# STORE must hold shapes-vilbert@1 and shapes-lxmert@1; the new versions land beside them,
# then each is scored on the test split into OUTDIR/<kind>/ (metrics.json and plots).
set -euo pipefail
STORE=${1:?usage: run.sh STORE FEATURES DATA OUTDIR} FEATURES=${2:?} DATA=${3:?} OUT=${4:?}
MIX=docs/experiments/cpu-continue/mix.json
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1 TQDM_MININTERVAL=60
mkdir -p "$OUT"
train() {  # kind lr steps seconds
  python -m service.cli train finetune --task all --init "shapes-$1@1" --name "shapes-$1" \
    --features "$FEATURES" --data "$DATA" --store "$STORE" --include-easyvqa --mix "$MIX" \
    --batch-size 64 --lr "$2" --steps "$3" --max-seconds "$4" \
    --checkpoint-dir "$OUT/ckpt-$1" >"$OUT/$1.log" 2>&1
}
train lxmert 1.5e-4 3000 4000 &
train vilbert 5e-5 700 5400 &
wait
for kind in lxmert vilbert; do
  python -m service.cli eval --model "shapes-$kind@2" --task all --split test --align-queries 0 --store "$STORE" \
    --features "$FEATURES" --data "$DATA" --out "$OUT/$kind" >"$OUT/eval-$kind.log" 2>&1 &
done
wait
