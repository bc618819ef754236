"""Settings: every knob of the service in one place, read from VQA_* environment variables.

Built inside `create_app` (or by `vqa serve` from its flags), never at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VQA_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    store: Path = Field(Path("model_store"), description="model store folder")
    data_dir: Path = Field(Path("vqa_data"), description="galleries and other state")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    models: list[str] | None = Field(None, description="model names to load; None loads all")
    default_model: str | None = Field(None, description="name, name@version or backbone alias")

    max_batch_size: int = Field(32, ge=1, le=1024)
    max_wait_ms: float = Field(5.0, ge=0, le=1000)
    max_queue: int = Field(1024, ge=1)
    timeout_s: float = Field(30.0, gt=0)
    drain_timeout_s: float = Field(10.0, ge=0)

    torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch intra-op threads, set once at start; None leaves torch's default "
        "(one per core). On a small machine that other processes also load, 1 is the fastest: "
        "two threads on two busy cores wait for each other (docs/BENCHMARKS.md)",
    )
    keep_alive_s: int = Field(
        75,
        gt=0,
        description="how long an idle HTTP keep-alive connection stays open; keep it longer "
        "than the idle timeout of the clients and proxies in front (60 s on most load "
        "balancers), so that they close idle connections, never the server under them",
    )

    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    feature_cache_entries: int = Field(4096, ge=0)
    api_key: str | None = Field(None, description="when set, gallery writes need this bearer key")
