#!/usr/bin/env bash
# The shipped ViLBERT's last stages, from shapes-vilbert@3 (docs/experiments/gpu-continue),
# on this 2-core CPU (diagnosis sections 10-12 tell why each step):
#   1. the box projection x30, then the minimal-pair mix, 60 min        -> vilbert-loc@1
#   2. relation questions alone at lr 3e-4, 40 min                      -> vilbert-rel@1
#   3. every task, the minimal-pair mix, lr 1e-4, 2,000 s               -> shapes-vilbert@4
#   4. the match calibration (whole, by sentence, by claims) on val, then the test split
#
#   docs/experiments/vilbert-relations/run.sh STORE FEATURES DATA OUTDIR
#
# STORE must hold shapes-vilbert@3 and shapes-detector@1 (a copy of model_store/).
set -euo pipefail
STORE=${1:?usage: run.sh STORE FEATURES DATA OUTDIR} FEATURES=${2:?} DATA=${3:?} OUT=${4:?}
D=docs/experiments/diagnosis
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=60
mkdir -p "$OUT"
common=(--store "$STORE" --features "$FEATURES" --data "$DATA" --batch-size 64 --steps 100000)
python $D/scale_location.py "$STORE" "$FEATURES" "$DATA" 3600 30 >"$OUT/1-loc.log" 2>&1
python -m service.cli train finetune --task vqa --init vilbert-loc@1 --name vilbert-rel \
  --mix $D/relation_only_mix.json --lr 3e-4 --max-seconds 2400 "${common[@]}" >"$OUT/2-rel.log" 2>&1
python -m service.cli train finetune --task all --init vilbert-rel@1 --name shapes-vilbert \
  --include-easyvqa --mix $D/turned_mix.json --lr 1e-4 --max-seconds 2000 "${common[@]}" \
  >"$OUT/3-all.log" 2>&1
python -m service.cli train calibrate --model shapes-vilbert@4 --store "$STORE" \
  --features "$FEATURES" --data "$DATA" >"$OUT/4-calibrate.log" 2>&1
python -m service.cli eval --model shapes-vilbert@4 --task all --split test --align-queries 0 \
  --store "$STORE" --features "$FEATURES" --data "$DATA" --out "$OUT/eval" >"$OUT/4-eval.log" 2>&1
