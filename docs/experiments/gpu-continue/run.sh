#!/usr/bin/env bash
# shapes-vilbert@2 fine-tuned further (task "all", mix.json) on one GPU lease.
#
#   docs/experiments/gpu-continue/run.sh OUTDIR [DEVICE] [SECONDS] [TRAIN_IMAGES]
#
# The lease carries at most 64 MiB and the working tree already holds the store (run it
# with shapes-lxmert's weights moved aside), so the shapes data and its features are
# rebuilt there (same seeds as `vqa data shapes`: the test split stays unseen), and
# .devcarry (make_carry.py --embeddings-only) brings easy_vqa and MiniLM's tokenizer and
# word-embedding table. The entry's manifest pins the installed package's sha256; the
# lease's copy is re-pinned to the slim file there, and repin.py pins it back here.
# OUTDIR gets the log, the timeline and the new entry as a tar in 15 MB parts.
set -uo pipefail
OUT=${1:?usage: run.sh OUTDIR [DEVICE] [SECONDS] [TRAIN_IMAGES]}
DEVICE=${2:-cuda}
BOX=${3:-380}
N=${4:-10000}
WORK=${WORK:-/tmp/gpu-continue}
PY=${PYTHON:-python3}
MIX=docs/experiments/gpu-continue/mix.json
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20
mkdir -p "$OUT" "$WORK/site" "$WORK/store"
start=$(date +%s)
stamp() { echo "[$(($(date +%s) - start)) s] $*" | tee -a "$OUT/timeline.txt"; }

cp -r .devcarry/site/* "$WORK/site/" && tar xzf .devcarry/minilm_slim.tgz -C "$WORK"
export PYTHONPATH="$WORK/site:${PYTHONPATH:-}"
cp -r model_store/shapes-detector model_store/shapes-vilbert "$WORK/store/"
"$PY" - "$WORK/store" <<'PY' || exit 1
import json, sys
from service.store import ModelStore, package_file, sha256_file
store = ModelStore(sys.argv[1])
path = store.resolve("shapes-vilbert").path / "manifest.json"
raw = json.loads(path.read_text())
for ref in raw["external"].values():
    ref["sha256"] = sha256_file(package_file(ref))
path.write_text(json.dumps(raw, indent=2) + "\n")
store.verify(store.resolve("shapes-vilbert"))
print("lease copy re-pinned to the slim MiniLM")
PY

stamp "data"
"$PY" -c "from service.data.shapes import write_split; write_split('$WORK/shapes', 'train', $N, progress=False)" &
"$PY" -c "from service.data.shapes import write_split; write_split('$WORK/shapes', 'val', 500, progress=False)" &
wait
stamp "features"
"$PY" -m service.cli features --store "$WORK/store" --detector shapes-detector --data "$WORK/shapes" \
  --splits train val --out "$WORK/features" --device "$DEVICE" --batch-size 64 >"$OUT/features.log" 2>&1 \
  || { stamp "features failed"; tail -20 "$OUT/features.log"; exit 1; }
stamp "fine-tune ($BOX s)"
"$PY" -m service.cli train finetune --task all --init shapes-vilbert@2 --name shapes-vilbert \
  --features "$WORK/features" --data "$WORK/shapes" --store "$WORK/store" --include-easyvqa \
  --mix "$MIX" --batch-size 64 --lr 1e-4 --steps 100000 --max-seconds "$BOX" \
  --checkpoint-dir "$WORK/ckpt" --device "$DEVICE" >"$OUT/vilbert.log" 2>&1 \
  || { stamp "fine-tune failed"; tail -30 "$OUT/vilbert.log"; }
stamp "fine-tune done"
grep -v "it/s\|s/it" "$OUT/vilbert.log" | tail -5
new=$(ls -d "$WORK/store/shapes-vilbert"/* | sort -V | tail -1)
tar cf "$WORK/entry.tar" -C "$WORK/store/shapes-vilbert" "$(basename "$new")"
split -b 15M -d "$WORK/entry.tar" "$OUT/entry.tar.part"
ls -la "$OUT"
stamp "done"
