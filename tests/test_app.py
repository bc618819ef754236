"""The app's request gate (request id, body limit, counts, 500s), torch threads and the
keep-alive setting of `vqa serve`, over real HTTP on the tiny store."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from service.app import create_app
from tests.api.helpers import metric, vqa_body
from tests.support import LiveServer, make_settings, png_bytes

LIMIT = 64_000


@pytest.fixture(scope="module")
def served(tiny_store, tmp_path_factory):
    settings = make_settings(tiny_store[0], tmp_path_factory.mktemp("data"), max_body_bytes=LIMIT)
    app = create_app(settings)
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=30) as client:
        yield client, app.state.engine


def chunks(data: bytes, size: int = 8192):
    """A body httpx sends chunked, without Content-Length."""
    for i in range(0, len(data), size):
        yield data[i : i + size]


def assert_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code
    assert error["request_id"] == r.headers["x-request-id"]
    return error


def test_chunked_json_over_the_limit_is_refused(served):
    client, _ = served
    before = metric(client, "vqa_requests_total", route="/v1/vqa", status="413")
    body = b'{"questions": ["q"], "image": "' + b"A" * (2 * LIMIT) + b'"}'
    r = client.post("/v1/vqa", content=chunks(body), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert str(LIMIT) in assert_error(r, 413, "payload_too_large")["message"]
    assert metric(client, "vqa_requests_total", route="/v1/vqa", status="413") == before + 1


def test_chunked_multipart_over_the_limit_is_413_not_a_bad_form(served):
    client, _ = served
    boundary = "b0undary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + b"\x00" * (2 * LIMIT)
        + f"\r\n--{boundary}--\r\n".encode()
    )
    ctype = f"multipart/form-data; boundary={boundary}"
    r = client.post("/v1/vqa", content=chunks(body), headers={"content-type": ctype})
    assert_error(r, 413, "payload_too_large")


def test_chunked_body_under_the_limit_is_answered(served):
    client, _ = served
    body = httpx.Request("POST", "/", json=vqa_body(png_bytes(1), "what colour?")).content
    assert len(body) < LIMIT
    r = client.post(
        "/v1/vqa", content=chunks(body, 512), headers={"content-type": "application/json"}
    )
    assert r.status_code == 200, r.text
    assert r.json()["answers"][0]["answers"]
    assert re.fullmatch(r"[0-9a-f]{16}", r.headers["x-request-id"])


def test_request_ids_differ_and_errors_quote_theirs(served):
    client, _ = served
    ids = {client.get("/healthz").headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3
    error = assert_error(client.get("/v1/nowhere"), 404, "not_found")
    assert error["request_id"] not in ids


def test_an_unexpected_exception_is_a_500_with_the_request_id(served, monkeypatch):
    client, engine = served

    async def broken(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(engine, "vqa", broken)
    before = metric(client, "vqa_requests_total", route="/v1/vqa", status="500")
    r = client.post("/v1/vqa", json=vqa_body(png_bytes(2)))
    error = assert_error(r, 500, "internal")
    assert error["request_id"] in error["message"]
    assert "secret" not in r.text
    assert metric(client, "vqa_requests_total", route="/v1/vqa", status="500") == before + 1
    monkeypatch.undo()
    assert client.post("/v1/vqa", json=vqa_body(png_bytes(2))).status_code == 200


def test_torch_threads_reach_the_model_thread(tiny_store, tmp_path):
    default = torch.get_num_threads()
    torch.set_num_threads(2)  # what a fresh thread would take without the setting
    try:
        app = create_app(make_settings(tiny_store[0], tmp_path, torch_threads=1))
        with LiveServer(app):
            executor = app.state.engine.worker.executor
            assert executor.submit(torch.get_num_threads).result(timeout=10) == 1
    finally:
        torch.set_num_threads(default)


def test_vqa_serve_closes_idle_connections_after_keep_alive_s(tiny_store, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "VQA_DEVICE": "cpu", "VQA_KEEP_ALIVE_S": "1"}
    args = ["--store", str(tiny_store[0]), "--data-dir", str(tmp_path), "--port", str(port)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", *args],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        conn = connect(port, proc)
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        assert read_response(conn).startswith(b"HTTP/1.1 200")
        idle_from = time.monotonic()
        conn.settimeout(10)
        assert conn.recv(4096) == b""  # the server closed the idle connection
        assert 0.8 < time.monotonic() - idle_from < 3  # uvicorn's default would be 5 s
        conn.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def connect(port: int, proc: subprocess.Popen, timeout: float = 60) -> socket.socket:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=1)
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"vqa serve did not listen on port {port} (exit {proc.poll()})")


def read_response(conn: socket.socket) -> bytes:
    """One whole HTTP/1.1 response with a Content-Length, however the reads split it."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < length(data):
        chunk = conn.recv(4096)
        assert chunk, f"the server closed the connection mid-response: {data!r}"
        data += chunk
    return data


def length(data: bytes) -> int:
    match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", data.partition(b"\r\n\r\n")[0])
    return int(match.group(1)) if match else 0
