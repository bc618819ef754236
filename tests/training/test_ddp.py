"""Two CPU processes under torchrun (gloo): DDP pretraining ends with identical weights.

The test launches this file under `python -m torch.distributed.run --standalone
--nproc_per_node 2`; each rank starts from a DIFFERENT random init and samples its own
batches, so the ranks agree at the end only if DDP broadcast the initial weights and
averaged every gradient.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from service.store import ModelStore
from tests.training.pretrain_support import tiny_overrides, write_tiny_split

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4


def _worker(out: Path, data_dir: Path, features_dir: Path) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from service.data.tokenizer import load_tokenizer
    from service.models.backbone import build_backbone
    from service.training.examples import PairSource
    from service.training.loop import TrainConfig, train
    from service.training.pretrain import PretrainData, pretrain_step_loss, write_pretrained

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(100 + rank)  # a different init on every rank
    model = build_backbone("vilbert", tiny_overrides("vilbert"))
    save_file(model.state_dict(), out / f"init{rank}.safetensors")
    data = PretrainData(
        "vilbert", PairSource.load(data_dir, features_dir, "train"), load_tokenizer()
    )
    cfg = TrainConfig(
        steps=STEPS,
        batch_size=8,
        lr=1e-3,
        checkpoint_every=2,
        checkpoint_dir=str(out / "ckpt"),
        progress=False,
    )
    result = train(model, pretrain_step_loss(data, 8), cfg)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, out / f"rank{rank}.safetensors"
    )
    manifest = write_pretrained(out / "store", "ddp-vilbert", model, result.history)
    (out / f"rank{rank}.json").write_text(
        json.dumps({"ref": manifest.ref, "history": result.history})
    )
    # both ranks tear gloo down together: once, on a loaded CPU, rank 0 aborted
    # ("terminate called without an active exception") while rank 1 still ran
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_end_with_identical_weights(tmp_path):
    data_dir, features_dir = write_tiny_split(tmp_path, n=24)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        __file__,
        str(out),
        str(data_dir),
        str(features_dir),
    ]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]

    inits = [load_file(out / f"init{r}.safetensors") for r in (0, 1)]
    finals = [load_file(out / f"rank{r}.safetensors") for r in (0, 1)]
    key = "text_layers.0.attn.query.weight"
    assert not torch.equal(inits[0][key], inits[1][key])  # the ranks did start apart
    assert finals[0].keys() == finals[1].keys()
    for k in finals[0]:
        assert torch.equal(finals[0][k], finals[1][k]), k
    assert not torch.equal(finals[0][key], inits[0][key])  # and they trained

    logs = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(logs[0]["history"]) == STEPS
    # each rank sampled its own batches
    assert logs[0]["history"][0]["loss"] != logs[1]["history"][0]["loss"]
    # rank 0 wrote the one store entry and both ranks name it
    assert logs[0]["ref"] == logs[1]["ref"] == "ddp-vilbert@1"
    assert [m.ref for m in ModelStore(out / "store").list()] == ["ddp-vilbert@1"]
    stored = ModelStore(out / "store").load_tensors(
        ModelStore(out / "store").resolve("ddp-vilbert")
    )
    assert torch.equal(stored[key], finals[0][key].half())  # entries store float16
    # the checkpoint keeps both ranks' generator states
    ckpt = out / "ckpt" / (out / "ckpt" / "latest").read_text()
    assert {"torch_cpu.rank0", "torch_cpu.rank1"} <= load_file(ckpt / "rng.safetensors").keys()


if __name__ == "__main__":  # a torchrun worker
    _worker(*(Path(a) for a in sys.argv[1:4]))
