"""Shared fixtures: a temp model store with tiny random models."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import write_tiny_store


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("store") / "model_store"
    return root, write_tiny_store(root)
