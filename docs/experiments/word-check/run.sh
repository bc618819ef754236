#!/usr/bin/env bash
# LXMERT@3 + the word check: task "all" for 60 minutes on the 2-core CPU, then the test
# evaluation. The store must hold shapes-lxmert@3 (this repository's model_store/).
#
#   docs/experiments/word-check/run.sh STORE FEATURES DATA OUTDIR
set -euo pipefail
STORE=${1:?usage: run.sh STORE FEATURES DATA OUTDIR} FEATURES=${2:?} DATA=${3:?} OUT=${4:?}
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=60
mkdir -p "$OUT"
python -m service.cli train finetune --task all --init shapes-lxmert@3 --name shapes-lxmert \
  --features "$FEATURES" --data "$DATA" --store "$STORE" --include-easyvqa \
  --mix docs/experiments/word-check/mix.json --config '{"word_check": true}' \
  --batch-size 64 --lr 1e-4 --steps 5000 --max-seconds 3600 \
  --checkpoint-dir "$OUT/ckpt-lxmert" >"$OUT/lxmert.log" 2>&1
python -m service.cli eval --model shapes-lxmert@4 --task all --split test --align-queries 0 \
  --store "$STORE" --features "$FEATURES" --data "$DATA" --out "$OUT/lxmert" >"$OUT/eval-lxmert.log" 2>&1
