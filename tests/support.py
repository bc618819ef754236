"""Test helpers: tiny random models in a temp store, sample images, a live HTTP server."""

from __future__ import annotations

import io
import socket
import threading
import time
from pathlib import Path

import numpy as np
import torch

TINY_ANSWERS = ["yes", "no", "0", "1", "2", "red", "green", "blue", "circle", "triangle"]


def tiny_detector_config() -> dict:
    from service.models.detector import DetectorConfig

    cfg = DetectorConfig(backbone="tiny", representation_size=32, min_regions=4, max_regions=8)
    from dataclasses import asdict

    return asdict(cfg)


def tiny_vilbert_config(feature_size: int) -> dict:
    return dict(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        v_feature_size=feature_size,
        v_hidden_size=32,
        v_num_hidden_layers=1,
        v_num_attention_heads=2,
        v_intermediate_size=64,
        bi_hidden_size=32,
        bi_num_attention_heads=2,
        bi_intermediate_size=64,
        t_biattention_id=[1],
        v_biattention_id=[0],
        v_target_size=4,
        num_answers=len(TINY_ANSWERS),
        embed_dim=16,
        max_position_embeddings=64,
    )


def tiny_lxmert_config(feature_size: int) -> dict:
    return dict(
        vocab_size=30522,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        l_layers=1,
        x_layers=1,
        r_layers=1,
        visual_feat_dim=feature_size,
        num_qa_labels=len(TINY_ANSWERS),
        num_object_labels=4,
        num_attr_labels=10,
        embed_dim=16,
        max_position_embeddings=64,
    )


def write_tiny_store(root: Path) -> dict[str, str]:
    """A detector and one model of each backbone, random weights, in a store at root."""
    from service.data.tokenizer import load_tokenizer
    from service.models.backbone import build_backbone
    from service.models.detector import RegionDetector
    from service.store import ModelStore

    torch.manual_seed(0)
    store = ModelStore(root)
    det_cfg = tiny_detector_config()
    detector = RegionDetector.from_config(det_cfg)
    det = store.write(
        "tiny-detector", "detector", {"model.safetensors": detector.state_dict()}, config=det_cfg
    )
    tok_dir = root.parent / "tokenizer"
    load_tokenizer().save_pretrained(tok_dir)
    tok_files = {p.name: p for p in tok_dir.iterdir()}
    refs = {"detector": det.ref}
    feat = det_cfg["representation_size"]
    for kind, cfg in [("vilbert", tiny_vilbert_config(feat)), ("lxmert", tiny_lxmert_config(feat))]:
        model = build_backbone(kind, cfg)
        m = store.write(
            f"tiny-{kind}",
            kind,
            {"model.safetensors": model.state_dict()},
            config=cfg,
            extra_files=tok_files,
            tokenizer=sorted(tok_files),
            answers=TINY_ANSWERS,
            detector=det.ref,
            tasks=["vqa", "match", "ground", "retrieval"],
        )
        refs[kind] = m.ref
    return refs


def png_bytes(seed: int = 0, size: tuple[int, int] = (64, 48)) -> bytes:
    """A small image with a coloured rectangle on a pastel background."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, tuple(int(v) for v in rng.integers(200, 256, 3)))
    x, y = int(rng.integers(0, size[0] // 2)), int(rng.integers(0, size[1] // 2))
    ImageDraw.Draw(image).rectangle([x, y, x + 15, y + 12], fill=(255, 0, 0))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class LiveServer:
    """The app under uvicorn on a free loopback port, in a thread: real HTTP."""

    def __init__(self, app):
        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def make_settings(store: Path, data_dir: Path, **overrides):
    from service.config import Settings

    return Settings(store=store, data_dir=data_dir, device="cpu", **overrides)
