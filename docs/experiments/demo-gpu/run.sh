#!/usr/bin/env bash
# The shipped ViLBERT and LXMERT, trained on one GPU with `vqa train demo` in time boxes.
#
#   docs/experiments/demo-gpu/run.sh OUTDIR [DEVICE] [RECIPE]
#
# Reuses the committed detector (model_store/shapes-detector): the data, detector and
# detector_eval stages are marked done, the features are computed here on DEVICE, then
# the two backbones' chains (pretrain -> fine-tune all -> eval) run side by side, each
# with its own work folder, into $STORE (default ./model_store). OUTDIR gets logs.tgz
# (logs, demo states, eval reports) and the new fine-tuned entries (a tar in 15 MB parts).
set -uo pipefail
OUT=${1:?usage: run.sh OUTDIR [DEVICE] [RECIPE]}
DEVICE=${2:-cuda}
RECIPE=${3:-docs/experiments/demo-gpu/recipe.json}
WORK=${DEMO_WORK:-/tmp/demo-gpu}
PY=${PYTHON:-python3}
STORE=${STORE:-model_store}
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20
mkdir -p "$OUT" "$WORK"
start=$(date +%s)
stamp() { echo "[$(($(date +%s) - start)) s] $*" | tee -a "$OUT/timeline.txt"; }

field() { "$PY" -c "import json,sys; print(json.load(open('$RECIPE')).get('$1', $2))"; }
stamp "data"
for split in train val test; do
  n=$(field ${split}_images 0)
  "$PY" -c "from service.data.shapes import write_split; write_split('$WORK/shapes', '$split', $n)" &
done
wait
stamp "features"
easy=$(field include_easyvqa True)
[ "$easy" = "True" ] && easyflag="" || easyflag="--no-easyvqa"
"$PY" -m service.cli features --store "$STORE" --detector shapes-detector --data "$WORK/shapes" $easyflag \
  --out "$WORK/features" --device "$DEVICE" --batch-size 64 >"$OUT/features.log" 2>&1 \
  || { stamp "features failed"; tail -20 "$OUT/features.log"; exit 1; }

det=$("$PY" -c "from service.store import ModelStore; print(ModelStore('$STORE').resolve('shapes-detector').ref)")
for kind in vilbert lxmert; do
  w="$WORK/$kind"
  mkdir -p "$w"
  ln -sfn "$WORK/shapes" "$w/shapes"
  ln -sfn "$WORK/features" "$w/features"
  "$PY" - "$w/demo_state.json" "$det" <<'PY'
import json, sys
path, det = sys.argv[1], sys.argv[2]
done = {"data": {}, "detector": {"ref": det}, "detector_eval": {"reused": True}, "features": {}}
json.dump(done, open(path, "w"))
PY
  stamp "$kind chain"
  "$PY" -m service.cli train demo --work "$w" --store "$STORE" --device "$DEVICE" \
    --recipe "$RECIPE" --backbones "$kind" >"$OUT/$kind.log" 2>&1 &
done
wait
stamp "chains done"
for kind in vilbert lxmert; do
  cp "$WORK/$kind/demo_state.json" "$OUT/${kind}_state.json" 2>/dev/null
  grep -v "^train\|^eval\|it/s\|s/it" "$OUT/$kind.log" | tail -4
done
(cd "$WORK" && cp -r */reports "$OUT/" 2>/dev/null; true)
tar czf "$WORK/logs.tgz" -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv "$WORK/logs.tgz" "$OUT/"
tar cf "$WORK/entries.tar" -C "$STORE" shapes-vilbert shapes-lxmert
split -b 15M -d "$WORK/entries.tar" "$OUT/entries.tar.part"
ls -la "$OUT"
stamp "done"
