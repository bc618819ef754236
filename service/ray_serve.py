"""`vqa serve --engine ray`: the same FastAPI app as a Ray Serve deployment, N replicas.

Each replica builds its own app with `create_app(settings)`, so each has its own engine,
batchers, feature cache and device; Serve's HTTP proxy spreads requests over them.
Galleries are shared through `settings.data_dir` (see docs/SCALING.md for the limits).
Ray is an optional extra (`pip install 'vqa-service[ray]'`): only this module imports it.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass

from ray import serve
from ray.serve.config import HTTPOptions
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.config import Settings

APP_NAME = "vqa"


@dataclass(frozen=True)
class ReplicaOptions:
    """How many replicas, and what each one reserves from the Ray cluster."""

    replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0  # a fraction (0.25) packs several replicas on one GPU
    max_ongoing_requests: int | None = None  # None: settings.max_queue


@serve.ingress()
class VqaReplica:
    """One replica: the app is built on the replica, after Ray placed it on its device."""

    def __init__(self, settings: dict):
        self.settings = Settings(**settings)

    def __serve_build_asgi_app__(self):
        from service.app import create_app

        app = create_app(self.settings)
        app.add_middleware(ProxyRequestId)
        return app


class ProxyRequestId:
    """Serve's proxy gives each request an X-Request-ID (the client's, or a new one), logs
    it and adds it to the response. An app that takes that id as its own would echo it: the
    echo is dropped, so the response names the id once.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        given = Headers(scope=scope).get("x-request-id") if scope["type"] == "http" else None
        if given is None:
            await self.app(scope, receive, send)
            return

        async def send_once(message: Message) -> None:
            if message["type"] == "http.response.start":
                echo = (b"x-request-id", given.encode())
                headers = message.get("headers", ())
                message["headers"] = [h for h in headers if (h[0].lower(), h[1]) != echo]
            await send(message)

        await self.app(scope, receive, send_once)


def build_application(settings: Settings, options: ReplicaOptions = ReplicaOptions()):
    """The bound Serve application: `options.replicas` copies of the app on `settings`."""
    if options.replicas < 1:
        raise ValueError("replicas must be at least 1")
    shipped = settings.model_dump(mode="json")
    # Replicas run in other processes (other machines on a cluster): relative paths would
    # resolve against their working directory, not ours.
    shipped["store"] = str(settings.store.resolve())
    shipped["data_dir"] = str(settings.data_dir.resolve())
    deployment = serve.deployment(
        VqaReplica,
        name=APP_NAME,
        num_replicas=options.replicas,
        # Dynamic batching needs many requests in flight on a replica: Serve's default (5)
        # would cap every batch at 5. The app's own queue limit answers 503 beyond this.
        max_ongoing_requests=options.max_ongoing_requests or settings.max_queue,
        ray_actor_options={"num_cpus": options.num_cpus, "num_gpus": options.num_gpus},
        # Requests in flight get the app's drain time, then the app's own shutdown runs.
        graceful_shutdown_timeout_s=settings.drain_timeout_s + 5,
        health_check_period_s=10,
    )
    return deployment.bind(shipped)


def app_builder(args: dict):
    """The entry of a Serve config file (`import_path: service.ray_serve:app_builder`), as
    KubeRay's RayService deploys: `args` holds Settings fields (absolute paths) and
    `replicas`, `cpus_per_replica`, `gpus_per_replica`."""
    args = dict(args)
    options = ReplicaOptions(
        replicas=int(args.pop("replicas", 1)),
        num_cpus=float(args.pop("cpus_per_replica", 1.0)),
        num_gpus=float(args.pop("gpus_per_replica", 0.0)),
    )
    return build_application(Settings(**args), options)


def start_ray(
    settings: Settings,
    options: ReplicaOptions = ReplicaOptions(),
    ray_address: str | None = None,
) -> str:
    """Start Serve's proxy on settings.host:port and the replicas; return the base URL.

    Connects to the cluster at `ray_address` ("auto" finds a local `ray start`), or starts
    a local Ray when none is given and none is running in this process.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_address, include_dashboard=False)
    serve.start(http_options=HTTPOptions(host=settings.host, port=settings.port))
    serve.run(build_application(settings, options), name=APP_NAME, route_prefix="/")
    return f"http://{settings.host}:{settings.port}"


def stop_ray() -> None:
    """Delete the deployment (each replica drains and runs the app's shutdown) and Serve."""
    serve.shutdown()


def run_ray(
    settings: Settings,
    replicas: int = 1,
    *,
    ray_address: str | None = None,
    cpus_per_replica: float = 1.0,
    gpus_per_replica: float = 0.0,
) -> None:
    """Entry of `vqa serve --engine ray`: serve until SIGINT or SIGTERM, then shut down."""
    options = ReplicaOptions(replicas, cpus_per_replica, gpus_per_replica)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before start-up: a signal during it counts
        signal.signal(sig, lambda *_: stop.set())
    started = time.perf_counter()
    url = start_ray(settings, options, ray_address)
    print(f"serving {replicas} replica(s) at {url} ({time.perf_counter() - started:.1f} s)")
    stop.wait()
    stop_ray()
