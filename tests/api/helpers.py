"""Helpers for the HTTP fault, batching and life-cycle tests: a live server on the tiny
store, a blocked device thread, /metrics samples, background calls."""

from __future__ import annotations

import base64
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.runtime.engine import Engine
from tests.support import LiveServer, make_settings


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def vqa_body(image: bytes, *questions: str, **extra) -> dict:
    return {"image": b64(image), "questions": list(questions) or ["what is it?"], **extra}


@contextmanager
def live(store: Path, data_dir: Path, **overrides):
    """A server on a model store, a client, and the engine behind them."""
    settings = make_settings(store, data_dir, **overrides)
    app = create_app(settings)
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        yield client, app.state.engine


@contextmanager
def worker_blocked(engine: Engine):
    """Occupy the device thread, so every model call waits until the block ends."""
    gate, running = threading.Event(), threading.Event()

    def hold() -> None:
        running.set()
        gate.wait(30)

    done = engine.worker.executor.submit(hold)
    assert running.wait(5)
    try:
        yield
    finally:
        gate.set()
        done.result(timeout=30)


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    """One sample of /metrics (0 when absent)."""
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.name == name and labels.items() <= s.labels.items():
                return s.value
    return 0.0


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def in_background(fn, *args, **kwargs) -> tuple[threading.Thread, list]:
    """Call fn in a thread; the list gets its result."""
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn(*args, **kwargs)), daemon=True)
    thread.start()
    return thread, out
