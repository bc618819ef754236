"""The GPU benchmark's configurations and its CPU path (no GPU needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.gpu import Budget, bench_backbone, bench_detector, full_config, parse_args

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]


def test_full_sizes_are_the_papers():
    lx = full_config("lxmert")
    assert (lx["l_layers"], lx["r_layers"], lx["x_layers"]) == (9, 5, 5)
    assert (lx["hidden_size"], lx["visual_feat_dim"]) == (768, 2048)
    vb = full_config("vilbert")  # bert_base_6layer_6conect
    assert (vb["num_hidden_layers"], vb["hidden_size"], vb["v_feature_size"]) == (12, 768, 2048)
    assert (vb["v_num_hidden_layers"], vb["v_hidden_size"]) == (6, 1024)
    assert vb["t_biattention_id"] == [6, 7, 8, 9, 10, 11] and len(vb["v_biattention_id"]) == 6


def test_quick_cpu_run_measures_a_demo_backbone_and_the_tiny_detector(tmp_path):
    args = parse_args(["--device", "cpu", "--quick", "--out", str(tmp_path)])
    device = torch.device("cpu")
    row = bench_backbone("lxmert", "demo", args, device, Budget(60))
    assert row["dtype"] == "float32" and row["params_m"] > 1
    [batch] = row["batches"]
    assert batch["batch_size"] == 2 and batch["forward_answers_per_s"] > 0
    assert row["best_forward"]["batch_size"] == 2
    det = bench_detector("tiny", 128, args, device, Budget(60))
    assert [b["mode"] for b in det["batches"]] == ["float32"] and det["best_images_per_s"] > 0
    skipped = bench_detector("tiny", 128, args, device, Budget(-1))
    assert skipped["batches"][0]["skipped"] == "time budget"


def test_gpu_script_refuses_cuda_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and "--device cpu --quick" in out.stderr
    assert not (tmp_path / "gpu_bench.json").exists()
