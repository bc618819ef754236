#!/usr/bin/env bash
# LXMERT's half of run.sh, rerun alone: 25 minutes into run.sh the hard negatives changed
# (commit 87c93ac: twins of whichever true caption they are paired with, partial captions
# included, not only of the complete caption), so LXMERT was stopped and started again
# from @2 with the new code. ViLBERT's run went on with the earlier code (twins of the
# complete caption only).
#
#   docs/experiments/cpu-continue-2/run-lxmert.sh STORE FEATURES DATA OUTDIR
set -euo pipefail
STORE=${1:?usage: run-lxmert.sh STORE FEATURES DATA OUTDIR} FEATURES=${2:?} DATA=${3:?} OUT=${4:?}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1 TQDM_MININTERVAL=60
mkdir -p "$OUT"
python -m service.cli train finetune --task all --init shapes-lxmert@2 --name shapes-lxmert \
  --features "$FEATURES" --data "$DATA" --store "$STORE" --include-easyvqa \
  --mix docs/experiments/cpu-continue-2/mix.json --batch-size 64 --lr 1e-4 --steps 1800 \
  --max-seconds 4200 --checkpoint-dir "$OUT/ckpt-lxmert" >"$OUT/lxmert.log" 2>&1
python -m service.cli eval --model shapes-lxmert@3 --task all --split test --align-queries 0 \
  --store "$STORE" --features "$FEATURES" --data "$DATA" --out "$OUT/lxmert" >"$OUT/eval-lxmert.log" 2>&1
