#!/usr/bin/env bash
# ViLBERT's matching, from shapes-vilbert@7 (../vilbert-counting/), on this 2-core CPU:
#   1. every task, match x3 / VQA x2 / grounding x1 a cycle, lr 1e-4, 30 min -> shapes-vilbert@8
#      (fine-tuning's last step fits the match calibration on val)
#   2. the test split
#
#   docs/experiments/vilbert-matching/run.sh STORE FEATURES DATA OUTDIR
#
# STORE must hold shapes-vilbert@7 and shapes-detector@1 (a copy of model_store/); the
# version written depends on what it holds already.
set -euo pipefail
STORE=${1:?usage: run.sh STORE FEATURES DATA OUTDIR} FEATURES=${2:?} DATA=${3:?} OUT=${4:?}
HERE=docs/experiments/vilbert-matching
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=60
mkdir -p "$OUT"
common=(--store "$STORE" --features "$FEATURES" --data "$DATA")
python -m service.cli train finetune --task all --init shapes-vilbert@7 --name shapes-vilbert \
  --include-easyvqa --mix $HERE/match_mix.json --batch-size 64 --steps 100000 --lr 1e-4 \
  --max-seconds 1800 "${common[@]}" >"$OUT/1-all.log" 2>&1
python -m service.cli eval --model shapes-vilbert --task all --split test --align-queries 0 \
  "${common[@]}" --out "$OUT/eval" >"$OUT/2-eval.log" 2>&1
