"""Re-pin the MiniLM reference of ViLBERT entries trained on a GPU lease with the slim copy.

    python docs/experiments/demo-gpu/repin.py STORE NAME SLIM_MODEL_SAFETENSORS

The lease could not carry the 90 MB package, so make_carry.py shipped a slim MiniLM whose
word-embedding rows are exact for every token the data can produce and zero elsewhere.
The entry's weights never hold the table (it is frozen and referenced), but its manifest
pinned the slim file's sha256. This checks that every kept row equals the installed
package's row bit for bit, then pins the installed file's sha256 instead.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from service.store import ModelStore, package_file, sha256_file

store, name, slim = ModelStore(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
manifest = store.resolve(name)
kept = json.loads((slim.parent / "kept_ids.json").read_text())
for key, ref in manifest.external.items():
    real_file = package_file(ref)
    with safe_open(str(real_file), "pt") as f, safe_open(str(slim), "pt") as g:
        real, used = f.get_tensor(ref["key"]), g.get_tensor(ref["key"])
    ids = torch.tensor(kept)
    assert torch.equal(real[ids], used[ids]), f"{key}: kept rows differ from the package"
    print(f"{key}: {len(kept)} kept rows equal the package's; sha {ref['sha256'][:12]}..", end="")
    ref["sha256"] = sha256_file(real_file)
    print(f" -> {ref['sha256'][:12]}..")
path = manifest.path / "manifest.json"
raw = json.loads(path.read_text())
raw["external"] = manifest.external
path.write_text(json.dumps(raw, indent=2) + "\n")
store.verify(store.resolve(name))
print(f"{manifest.ref}: verified against the installed package")
