"""The Dockerfile, checked without a Docker engine: its instructions, and the commands it
runs executed here (the dependency step against this venv's pip, offline and dry; the
HEALTHCHECK against a live app; the CMD through the console script's parser)."""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from service.app import create_app
from service.cli import build_parser
from service.config import Settings
from tests.support import LiveServer, make_settings

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    out, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        op, _, args = (pending + line).partition(" ")
        out.append((op.upper(), args.strip()))
        pending = ""
    return out


@pytest.fixture(scope="module")
def steps() -> list[tuple[str, str]]:
    return instructions((ROOT / "Dockerfile").read_text())


def find(steps, op: str, contains: str = "") -> int:
    """Index of the first `op` instruction whose arguments contain `contains`."""
    return next(i for i, (o, a) in enumerate(steps) if o == op and contains in a)


def arg_default(steps, name: str) -> str:
    return next(a.split("=", 1)[1] for o, a in steps if o == "ARG" and a.startswith(f"{name}="))


def env_vars(steps) -> dict[str, str]:
    env = {}
    for op, args in steps:
        if op == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(args))
    return env


def test_base_image_is_slim_python_311(steps):
    assert steps[0] == ("FROM", "python:3.11-slim")
    assert [o for o, _ in steps].count("FROM") == 1


def test_runs_as_a_non_root_user(steps):
    users = [a for o, a in steps if o == "USER"]
    assert users, "no USER instruction"
    uid = users[-1].split(":")[0]
    assert uid not in ("root", "0")
    assert f"--uid {uid}" in steps[find(steps, "RUN", "useradd")][1]
    assert find(steps, "USER") < find(steps, "CMD")


def test_dependencies_install_before_the_code_is_copied(steps):
    copies = [(i, a) for i, (o, a) in enumerate(steps) if o == "COPY"]
    deps = find(steps, "RUN", "pip install -r requirements.txt")
    code = find(steps, "COPY", "service")
    assert [a for i, a in copies if i < deps] == ["pyproject.toml ./"]
    assert deps < code < find(steps, "RUN", "pip install --no-deps .")


def run_dependency_step(steps, tmp_path: Path, torch_index: str, extras: str = "") -> list[str]:
    """Run the dependency RUN line in a folder holding pyproject.toml, as docker would, with
    `pip` forwarding to this venv's pip offline and dry; returns the pip calls it made."""
    shim_dir, work = tmp_path / "bin", tmp_path / "app"
    shim_dir.mkdir(parents=True)
    work.mkdir(parents=True)
    shutil.copy(ROOT / "pyproject.toml", work)
    log = tmp_path / "pip.log"
    shim = shim_dir / "pip"
    shim.write_text(
        f'#!/bin/sh\necho "$*" >> {log}\n[ -f requirements.txt ] && cat requirements.txt'
        f" > {tmp_path / 'requirements.seen'}\n"
        f'exec {VENV_BIN / "pip"} "$@" --dry-run --no-index -q\n'
    )
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    env = {
        "PATH": f"{shim_dir}:{VENV_BIN}:/usr/bin:/bin",
        "TORCH_INDEX": torch_index,
        "EXTRAS": extras,
        "HOME": str(tmp_path),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    command = steps[find(steps, "RUN", "pip install -r requirements.txt")][1]
    done = subprocess.run(
        ["sh", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert not (work / "requirements.txt").exists()  # cleaned up in the same layer
    return log.read_text().splitlines()


def test_dependency_step_takes_torch_from_the_chosen_index(steps, tmp_path):
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d for d in deps if d.startswith(("torch==", "torchvision=="))]
    assert len(pins) == 2
    cpu = arg_default(steps, "TORCH_INDEX")
    assert cpu == "https://download.pytorch.org/whl/cpu"
    calls = run_dependency_step(steps, tmp_path / "cpu", cpu)
    assert calls == [f"install --index-url {cpu} {' '.join(pins)}", "install -r requirements.txt"]
    # An empty TORCH_INDEX leaves torch to PyPI: its default build, CUDA on linux x86_64.
    assert run_dependency_step(steps, tmp_path / "cuda", "") == ["install -r requirements.txt"]


def test_extras_add_their_optional_dependencies(steps, tmp_path):
    """--build-arg EXTRAS=ray installs Ray Serve beside the service; no extras by default."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert arg_default(steps, "EXTRAS") == ""
    ray = project["optional-dependencies"]["ray"]
    assert run_dependency_step(steps, tmp_path / "ray", "", extras="ray") == [
        "install -r requirements.txt"
    ]
    wanted = (tmp_path / "ray" / "requirements.seen").read_text().splitlines()
    assert wanted == project["dependencies"] + ray
    run_dependency_step(steps, tmp_path / "plain", "")
    assert (tmp_path / "plain" / "requirements.seen").read_text().splitlines() == (
        project["dependencies"]
    )


def test_cmd_is_the_console_script_serving_on_8000(steps):
    cmd = json.loads(steps[find(steps, "CMD")][1])
    assert cmd == ["vqa", "serve", "--host", "0.0.0.0", "--port", "8000"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[cmd[0]] == "service.cli:main"
    args = build_parser().parse_args(cmd[1:])
    assert (args.host, args.port) == ("0.0.0.0", 8000)
    assert ("EXPOSE", "8000") in steps
    assert (VENV_BIN / "vqa").exists()
    done = subprocess.run(
        [str(VENV_BIN / "vqa"), *cmd[1:2], "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "--port" in done.stdout


def test_store_is_baked_in_and_a_volume(steps):
    env = env_vars(steps)
    assert env["VQA_STORE"] == "/app/model_store"
    assert ("WORKDIR", "/app") in steps and ("COPY", "model_store ./model_store") in steps
    volumes = json.loads(steps[find(steps, "VOLUME")][1])
    assert env["VQA_STORE"] in volumes and env["VQA_DATA_DIR"] in volumes
    for name in (k for k in env if k.startswith("VQA_")):  # each is a real setting
        assert name.removeprefix("VQA_").lower() in Settings.model_fields, name


def healthcheck_program(steps) -> str:
    args = steps[find(steps, "HEALTHCHECK")][1]
    words = shlex.split(args[args.index("CMD ") + 4 :])
    assert words[:2] == ["python", "-c"] and len(words) == 3
    return words[2]


def run_healthcheck(program: str, port: int) -> int:
    program = program.replace("127.0.0.1:8000/", f"127.0.0.1:{port}/")
    return subprocess.run(
        [sys.executable, "-c", program], capture_output=True, timeout=30
    ).returncode


def test_healthcheck_passes_only_when_ready(steps, tiny_store, tmp_path):
    program = healthcheck_program(steps)
    assert "http://127.0.0.1:8000/readyz" in program
    app = create_app(make_settings(tiny_store[0], tmp_path / "data"))
    with LiveServer(app) as live:
        assert run_healthcheck(program, live.port) == 0
        engine = app.state.engine
        engine.state = "draining"  # /readyz answers 503 while draining
        try:
            assert run_healthcheck(program, live.port) != 0
        finally:
            engine.state = "ready"
    assert run_healthcheck(program, live.port) != 0  # nothing listens any more


def ignored(patterns: list[str], path: str) -> bool:
    return any(fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in patterns)


def test_dockerignore_drops_local_state_but_keeps_what_is_copied(steps):
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in lines if p.strip() and not p.startswith("#")]
    for path in (".git", ".venv", "tests", "test-artifacts", "vqa_data"):
        assert ignored(patterns, path), path
    sources = [shlex.split(a)[0] for o, a in steps if o == "COPY"]
    assert sources == ["pyproject.toml", "README.md", "service", "model_store"]
    for path in [*sources, "service/static/app.js", "service/data/shapes.py"]:
        assert not ignored(patterns, path), path


def test_installed_package_carries_the_page(tmp_path):
    """`pip install --no-deps .` in the image installs a wheel: the page must be in it."""
    context = tmp_path / "context"
    context.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, context)
    shutil.copytree(
        ROOT / "service", context / "service", ignore=shutil.ignore_patterns("__pycache__")
    )
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = subprocess.run(
        [str(VENV_BIN / "pip"), "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path / "dist"), str(context)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    static = ["index.html", "app.js", "app.css", "samples/index.json", "samples/test-000003.png"]
    for name in static:
        assert f"service/static/{name}" in names, name
    assert any(n.endswith("entry_points.txt") for n in names)
