"""`vqa serve --engine ray`: the app as a Ray Serve deployment with 2 replicas on a local
Ray (2 CPUs), over HTTP through Serve's proxy, answers as the app served directly does."""

from __future__ import annotations

import base64
import socket
import subprocess
import sys

import httpx
import pytest

from service.app import create_app
from tests.support import LiveServer, make_settings, png_bytes

ray = pytest.importorskip("ray", reason="the [ray] extra is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def direct(tiny_store, tmp_path_factory, request):
    """The app under uvicorn in this process: what Ray's answers must equal.

    Ray runs a replica that reserves 1 CPU with OMP_NUM_THREADS=1; torch's sums then add up
    in another order than with 2 threads (scores differ in the 5th digit), so the app served
    directly runs on one thread too while this module runs.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    settings = make_settings(tiny_store[0], tmp_path_factory.mktemp("direct"))
    with (
        LiveServer(create_app(settings)) as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        yield client


@pytest.fixture(scope="module")
def through_ray(tiny_store, tmp_path_factory):
    from service.ray_serve import ReplicaOptions, start_ray, stop_ray

    data_dir = tmp_path_factory.mktemp("ray")
    settings = make_settings(tiny_store[0], data_dir, port=_free_port())
    # One torch thread per replica, as `direct` runs (Ray's default for num_cpus=1, unless
    # OMP_NUM_THREADS is set already in this environment). Serve gives its proxy 5 s to
    # come up before killing it; on 2 busy cores (a `make test` beside a training run) its
    # imports took longer and the module errored at setup, so it gets 60 here.
    proxy_wait = ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv(*proxy_wait)  # the controller reads it from the environment
    env = {"env_vars": {"OMP_NUM_THREADS": "1", proxy_wait[0]: proxy_wait[1]}}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=env)
    try:
        url = start_ray(settings, ReplicaOptions(replicas=2, num_cpus=1))
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client
    finally:
        from ray import serve

        if serve.status().applications:
            stop_ray()
        ray.shutdown()
        monkeypatch.undo()


def _same(direct, through_ray, method: str, path: str, **kwargs) -> dict:
    """Send the same request to both; they must answer with one status and one JSON."""
    a = direct.request(method, path, **kwargs)
    b = through_ray.request(method, path, **kwargs)
    assert b.status_code == a.status_code, b.text
    assert b.json() == a.json()
    return b.json()


def test_two_replicas_run_each_with_its_own_engine(through_ray):
    from ray import serve

    status = serve.status().applications["vqa"]
    assert status.status == "RUNNING"
    deployment = status.deployments["vqa"]
    assert deployment.replica_states == {"RUNNING": 2}


def test_health_readiness_and_models(direct, through_ray):
    assert _same(direct, through_ray, "GET", "/healthz") == {"status": "ok"}
    assert _same(direct, through_ray, "GET", "/readyz") == {"status": "ready"}
    models = _same(direct, through_ray, "GET", "/v1/models")
    assert {m["backbone"] for m in models} == {"vilbert", "lxmert"}


@pytest.mark.parametrize("model", ["vilbert", "lxmert"])
def test_vqa_match_and_ground_answer_as_without_ray(direct, through_ray, model):
    image = _b64(png_bytes(1))
    body = {"image": image, "questions": ["what color is it?", "is it round?"], "model": model}
    out = _same(direct, through_ray, "POST", "/v1/vqa", json=body)
    assert [a["question"] for a in out["answers"]] == body["questions"]
    texts = ["a red rectangle", "two blue circles"]
    body = {"image": image, "texts": texts, "model": model}
    out = _same(direct, through_ray, "POST", "/v1/match", json=body)
    assert [s["text"] for s in out["scores"]] == texts
    body = {"image": image, "expressions": ["the red rectangle"], "model": model}
    out = _same(direct, through_ray, "POST", "/v1/ground", json=body)
    assert 0 < out["results"][0]["score"] <= 1


def test_multipart_upload_goes_through_the_proxy(direct, through_ray):
    files = {"image": ("x.png", png_bytes(2), "image/png")}
    out = _same(direct, through_ray, "POST", "/v1/vqa", files=files, data={"question": ["q?"]})
    assert len(out["answers"]) == 1


def test_an_error_answers_as_without_ray_and_names_its_request_id(direct, through_ray):
    body = {"image": "not base64!", "questions": ["q"]}
    a, b = direct.post("/v1/vqa", json=body), through_ray.post("/v1/vqa", json=body)
    assert b.status_code == a.status_code == 400
    error = b.json()["error"]
    assert b.headers.get_list("x-request-id") == [error.pop("request_id")]
    assert error == {k: v for k, v in a.json()["error"].items() if k != "request_id"}
    r = through_ray.get("/healthz", headers={"X-Request-ID": "client-chosen-id"})
    assert r.headers.get_list("x-request-id") == ["client-chosen-id"]  # the proxy's id, once


def test_the_proxys_request_id_is_not_echoed_twice():
    """An app that adopts the proxy's X-Request-ID would send it back; the proxy adds it
    too, so the replica drops the app's copy (and keeps any other id the app sends)."""
    import asyncio

    from service.ray_serve import ProxyRequestId

    async def app(scope, receive, send):
        headers = [(b"X-Request-ID", b"given"), (b"x-request-id", b"own"), (b"a", b"b")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "headers": [(b"x-request-id", b"given")]}
    asyncio.run(ProxyRequestId(app)(scope, None, send))
    assert sent[0]["headers"] == [(b"x-request-id", b"own"), (b"a", b"b")]


def test_gallery_lifecycle_answers_as_without_ray(direct, through_ray):
    info = _same(direct, through_ray, "PUT", "/v1/galleries/pics", json={"model": "lxmert"})
    assert info["count"] == 0
    images = [{"id": f"im{i}", "image": _b64(png_bytes(10 + i))} for i in range(3)]
    body = {"images": images}
    assert _same(direct, through_ray, "POST", "/v1/galleries/pics/images", json=body) == {
        "ids": ["im0", "im1", "im2"]
    }
    search = {"caption": "a red rectangle", "k": 3}
    hits = _same(direct, through_ray, "POST", "/v1/galleries/pics/search", json=search)
    assert {h["id"] for h in hits["results"]} == {"im0", "im1", "im2"}
    r = through_ray.delete("/v1/galleries/pics/images/im0")
    assert r.status_code == 204
    assert direct.delete("/v1/galleries/pics/images/im0").status_code == 204
    assert _same(direct, through_ray, "GET", "/v1/galleries/pics")["count"] == 2
    assert through_ray.delete("/v1/galleries/pics").status_code == 204
    assert through_ray.get("/v1/galleries/pics").status_code == 404


def test_a_write_on_one_replica_is_searched_on_every_replica(through_ray):
    """Both replicas cache the gallery's index first; after an add and a delete, every
    search (spread over both replicas by the proxy) sees the gallery as it now is."""
    assert through_ray.put("/v1/galleries/shared", json={"model": "vilbert"}).status_code == 201
    first = [{"id": "a", "image": _b64(png_bytes(20))}]
    assert through_ray.post("/v1/galleries/shared/images", json={"images": first}).is_success
    search = {"caption": "a shape", "k": 5, "rerank": 0}
    for _ in range(6):
        r = through_ray.post("/v1/galleries/shared/search", json=search)
        assert [h["id"] for h in r.json()["results"]] == ["a"]
    later = [{"id": "b", "image": _b64(png_bytes(21))}]
    assert through_ray.post("/v1/galleries/shared/images", json={"images": later}).is_success
    assert through_ray.delete("/v1/galleries/shared/images/a").status_code == 204
    for _ in range(6):
        r = through_ray.post("/v1/galleries/shared/search", json=search)
        assert [h["id"] for h in r.json()["results"]] == ["b"]


def test_concurrent_requests_all_answer(through_ray):
    """More requests in flight than Serve's default per-replica limit (5)."""
    import concurrent.futures

    body = {"image": _b64(png_bytes(3)), "questions": ["how many shapes?"]}
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        codes = list(
            pool.map(lambda _: through_ray.post("/v1/vqa", json=body).status_code, range(32))
        )
    assert codes == [200] * 32


def test_a_serve_config_file_sets_replicas_and_their_resources():
    """What KubeRay's RayService deploys: `import_path: service.ray_serve:app_builder`."""
    from service.ray_serve import app_builder

    args = {"store": "/models", "data_dir": "/data", "max_queue": 64, "device": "cuda"}
    app = app_builder({**args, "replicas": 3, "gpus_per_replica": 0.5})
    deployment = app._bound_deployment  # Serve 2.60's Application; no public accessor
    assert deployment.num_replicas == 3
    assert deployment.ray_actor_options == {"num_cpus": 1.0, "num_gpus": 0.5}
    assert deployment.max_ongoing_requests == 64  # the app's queue limit, not Serve's 5
    shipped = deployment.init_args[0]
    assert {k: shipped[k] for k in args} == args


def test_service_runs_without_ray_and_the_cli_says_what_is_missing():
    """Ray is an optional extra: the package and its CLI load with ray blocked, and
    `vqa serve --engine ray` then names the extra to install (exit status 2)."""
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "import service, service.app, service.cli\n"
        "sys.exit(service.cli.main(['serve', '--engine', 'ray', '--replicas', '2']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "[ray] extra" in out.stderr
