#!/usr/bin/env bash
# ViLBERT's counting, from shapes-vilbert@4 (../vilbert-relations/), on this 2-core CPU:
#   1. count questions alone at lr 3e-4, 30 min (validation scores the count family) -> vilbert-count@2
#   2. every task, count x6 and relation x4, every answer alike, lr 1e-4, 30 min     -> shapes-vilbert@7
#   3. the match calibration on val (fine-tuning's last step), then the test split
#
#   docs/experiments/vilbert-counting/run.sh STORE FEATURES DATA OUTDIR
#
# STORE must hold shapes-vilbert@4 and shapes-detector@1 (a copy of model_store/); the
# versions written depend on what it holds already.
set -euo pipefail
STORE=${1:?usage: run.sh STORE FEATURES DATA OUTDIR} FEATURES=${2:?} DATA=${3:?} OUT=${4:?}
D=docs/experiments/diagnosis
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=60
mkdir -p "$OUT"
common=(--store "$STORE" --features "$FEATURES" --data "$DATA" --batch-size 64 --steps 100000)
python -m service.cli train finetune --task vqa --init shapes-vilbert@4 --name vilbert-count \
  --mix $D/count_only_mix.json --lr 3e-4 --max-seconds 1800 "${common[@]}" >"$OUT/1-count.log" 2>&1
python -m service.cli train finetune --task all --init vilbert-count@1 --name shapes-vilbert \
  --include-easyvqa --mix $D/count_even_mix.json --lr 1e-4 --max-seconds 1800 "${common[@]}" \
  >"$OUT/2-all.log" 2>&1
python -m service.cli eval --model shapes-vilbert --task all --split test --align-queries 0 \
  --store "$STORE" --features "$FEATURES" --data "$DATA" --out "$OUT/eval" >"$OUT/3-eval.log" 2>&1
