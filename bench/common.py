"""Shared pieces of the benchmarks: a demo-size model store, shapes-world images, the
service in a subprocess, latency statistics, machine facts and JSON results.

The demo store holds the backbone sizes the training module ships
(`pretrain.default_config`) with random weights (timing does not depend on the weights'
values, answers do) behind the trained `shapes-detector` of the repository's model_store
when there is one (how many regions it keeps does change the timing), else a detector
with random weights.
"""

from __future__ import annotations

import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SHIPPED_STORE = ROOT / "model_store"
SHIPPED_DETECTOR = "shapes-detector"  # trained by `vqa train detector`
SHAPE_CLASSES = 3  # circle, rectangle, triangle (background not counted)
SHAPE_ATTRIBUTES = {"color": 8, "size": 2}


# ---- models --------------------------------------------------------------------------------


def detector_config(backbone: str = "tiny") -> dict:
    """The shipped detector's config: `DetectorConfig` defaults (10 to 36 regions)."""
    from service.models.detector import DetectorConfig

    return asdict(DetectorConfig(backbone=backbone))


def demo_config(kind: str, feature_dim: int) -> dict:
    """The demo size of a backbone, as `vqa train pretrain` builds it for shapes regions."""
    from service.data.language import ANSWERS
    from service.training.pretrain import default_config

    return default_config(
        kind, feature_dim, SHAPE_CLASSES + 1, dict(SHAPE_ATTRIBUTES), num_answers=len(ANSWERS)
    )


def shipped_detector() -> str | None:
    """`shapes-detector@N` of the repository's model_store when one is there, else None."""
    from service.store import ModelNotFound, ModelStore

    try:
        return ModelStore(SHIPPED_STORE).resolve(SHIPPED_DETECTOR).ref
    except (ModelNotFound, OSError, ValueError):
        return None


def write_demo_store(
    root: Path,
    kinds=("lxmert", "vilbert"),
    detector: str = "tiny",
    seed: int = 0,
    trained_detector: str | None = None,
) -> dict[str, str]:
    """A store with a detector and demo-size backbones (random weights); refs by kind.

    trained_detector: a ref in the repository's model_store (`shipped_detector()`) whose
    weights are copied in (a trained detector keeps fewer regions than a random one: 10
    on shapes images, not 36); None = random weights of `DetectorConfig(backbone=detector)`.
    """
    from service.data.language import ANSWERS
    from service.data.tokenizer import load_tokenizer
    from service.models.backbone import build_backbone
    from service.models.detector import RegionDetector
    from service.store import ModelStore

    torch.manual_seed(seed)
    store = ModelStore(root)
    if trained_detector is not None:
        shipped = ModelStore(SHIPPED_STORE)
        manifest = shipped.resolve(trained_detector)
        det_cfg, tensors = manifest.config, shipped.load_tensors(manifest)
        name = manifest.name
    else:
        det_cfg = detector_config(detector)
        tensors = RegionDetector.from_config(det_cfg).state_dict()
        name = f"bench-detector-{detector.replace('_', '-')}"
    det = store.write(name, "detector", {"model.safetensors": tensors}, config=det_cfg)
    tok_dir = root.parent / "tokenizer"
    load_tokenizer().save_pretrained(tok_dir)
    tok_files = {p.name: p for p in tok_dir.iterdir()}
    refs = {"detector": det.ref}
    for kind in kinds:
        cfg = demo_config(kind, det_cfg["representation_size"])
        model = build_backbone(kind, cfg)
        m = store.write(
            f"bench-{kind}",
            kind,
            {"model.safetensors": model.state_dict()},
            config=cfg,
            extra_files=tok_files,
            tokenizer=sorted(tok_files),
            answers=list(ANSWERS),
            detector=det.ref,
            tasks=["vqa", "match", "ground", "retrieval"],
        )
        refs[kind] = m.ref
    return refs


def describe_weights(trained_detector: str | None, detector: str = "tiny") -> str:
    det = (
        f"{trained_detector} (trained, repository model_store)"
        if trained_detector
        else f"{detector} with random weights"
    )
    return f"backbone: random weights at the demo size (pretrain.default_config); detector: {det}"


# ---- images and questions ------------------------------------------------------------------


def shapes_scene(index: int, split: str = "test", size: int = 128):
    """(PNG bytes, questions) of shapes-world image `index` of `split` (as write_split draws it)."""
    from service.data.language import questions
    from service.data.shapes import generate_scene, render, split_rng

    rng = split_rng(0, split, index)
    scene = generate_scene(rng, size=size)
    image = render(scene, rng)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue(), [q["question"] for q in questions(scene, rng)]


def shapes_images(n: int, start: int = 0, split: str = "test", size: int = 128):
    """n distinct shapes-world images as (PNG bytes, first question) pairs."""
    out = []
    for i in range(start, start + n):
        png, qs = shapes_scene(i, split, size)
        out.append((png, qs[0]))
    return out


# ---- statistics and facts ------------------------------------------------------------------


def latency_stats(seconds: list[float]) -> dict:
    """p50/p95/p99/mean in milliseconds."""
    if not seconds:
        return {"n": 0}
    ms = np.asarray(seconds) * 1000.0
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {
        "n": int(len(ms)),
        "p50_ms": round(float(p50), 2),
        "p95_ms": round(float(p95), 2),
        "p99_ms": round(float(p99), 2),
        "mean_ms": round(float(ms.mean()), 2),
    }


def machine() -> dict:
    """Where the numbers came from: CPU, threads, versions, load at the time of asking."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    info["git_commit"] = git_commit()
    return info


def git_commit() -> str | None:
    """HEAD of the checkout, with "+changes" when the working tree differs from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return None
    return (head + ("+changes" if dirty else "")) or None


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def write_json(path: Path, result: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else round(a / b, 3)


# ---- the service in a subprocess -----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    """`uvicorn service.app:create_app --factory` in its own process (its own GIL), with
    settings from VQA_* variables; the context waits until /readyz answers 200."""

    def __init__(self, store: Path, data_dir: Path, log_path: Path | None = None, **settings):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("VQA_")}
        env.update(VQA_STORE=str(store), VQA_DATA_DIR=str(data_dir), VQA_DEVICE="cpu")
        for key, value in settings.items():
            env[f"VQA_{key.upper()}"] = json.dumps(value) if isinstance(value, list) else str(value)
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ServiceProcess:
        import httpx

        log = open(self.log_path or os.devnull, "ab")  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory"]
            + ["--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the service exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError("the service was not ready within 120 s")

    def __exit__(self, *exc) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
