"""The model store: round trip, checksums, atomic writes, references, versions."""

import hashlib
import json
import os
import subprocess
from datetime import datetime
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from service.store import (
    ChecksumMismatch,
    Manifest,
    ModelNotFound,
    ModelStore,
    StoreError,
    external_ref,
    sha256_file,
)


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(8, 4, generator=g),
        "layer.bias": torch.randn(8, generator=g),
    }


def put(store: ModelStore, name: str = "tiny", seed: int = 0, **meta) -> Manifest:
    meta.setdefault("git_commit", "0" * 40)
    return store.write(name, "vilbert", {"model.safetensors": weights(seed)}, {"hidden": 8}, **meta)


@pytest.fixture
def store(tmp_path) -> ModelStore:
    return ModelStore(tmp_path / "model_store")


def test_write_list_resolve_load_round_trip(store, tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[CLS]\ncircle\n")
    m = store.write(
        "tiny-vilbert",
        "vilbert",
        {"model.safetensors": weights(1), "heads.safetensors": {"vqa.w": torch.ones(2, 3)}},
        {"hidden": 8, "layers": 1},
        extra_files={"vocab.txt": vocab, "notes.txt": b"trained for a test"},
        tokenizer=["vocab.txt"],
        answers=["yes", "no"],
        detector="tiny-detector@3",
        data={"recipe": "shapes", "seed": 7},
        command="vqa train vilbert --steps 1",
        metrics={"vqa_acc": 0.5},
        tasks=["vqa", "match"],
    )
    assert (m.name, m.version, m.ref) == ("tiny-vilbert", 1, "tiny-vilbert@1")
    assert [x.ref for x in store.list()] == ["tiny-vilbert@1"]

    again = ModelStore(store.root).resolve("tiny-vilbert@1")  # read back from disk
    assert again == m
    assert again.path == store.root / "tiny-vilbert" / "1"
    assert again.config == {"hidden": 8, "layers": 1}
    assert (again.tokenizer, again.answers, again.detector) == (
        ["vocab.txt"],
        ["yes", "no"],
        "tiny-detector@3",
    )
    assert (again.data, again.command, again.tasks) == (
        {"recipe": "shapes", "seed": 7},
        "vqa train vilbert --steps 1",
        ["vqa", "match"],
    )
    assert again.metrics == {"vqa_acc": 0.5}
    assert datetime.fromisoformat(again.created).tzinfo is not None

    loaded = store.load_tensors(again)
    assert loaded.keys() == weights(1).keys()
    assert all(torch.equal(loaded[k], v) for k, v in weights(1).items())
    assert torch.equal(store.load_tensors(again, "heads.safetensors")["vqa.w"], torch.ones(2, 3))
    assert store.file_path(again, "vocab.txt").read_text() == vocab.read_text()
    assert store.file_path(again, "notes.txt").read_bytes() == b"trained for a test"
    on_disk = json.loads((again.path / "manifest.json").read_text())
    assert "path" not in on_disk and on_disk["version"] == 1


def test_sha256_of_every_file_is_recorded(store):
    m = store.write(
        "tiny", "detector", {"model.safetensors": weights()}, {}, extra_files={"a.txt": b"abc"}
    )
    assert set(m.files) == {"model.safetensors", "a.txt"}
    for name, digest in m.files.items():
        assert digest == hashlib.sha256((m.path / name).read_bytes()).hexdigest()
    assert sha256_file(m.path / "a.txt") == hashlib.sha256(b"abc").hexdigest()
    store.verify(m)


def test_a_changed_byte_is_refused_naming_the_file_and_entry(store):
    m = put(store, "foo")
    path = m.path / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # flip one bit of the last tensor value
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatch) as err:
        store.verify(m)
    message = str(err.value)
    assert "foo/1/model.safetensors" in message and "sha256 mismatch" in message
    assert m.files["model.safetensors"][:12] in message
    with pytest.raises(ChecksumMismatch):
        store.load_tensors(m)
    assert store.load_tensors(m, verify=False).keys() == weights().keys()


def test_a_changed_tokenizer_file_blocks_loading_the_weights(store):
    m = store.write(
        "foo", "vilbert", {"model.safetensors": weights()}, {}, extra_files={"vocab.txt": b"a\nb\n"}
    )
    (m.path / "vocab.txt").write_bytes(b"a\nc\n")
    with pytest.raises(ChecksumMismatch, match="vocab.txt"):
        store.load_tensors(m)


def test_a_missing_file_is_refused(store):
    m = put(store, "foo")
    (m.path / "model.safetensors").unlink()
    with pytest.raises(ChecksumMismatch, match=r"foo/1/model.safetensors: missing"):
        store.verify(m)
    with pytest.raises(ChecksumMismatch):
        store.load_tensors(m)


def test_a_failed_save_leaves_nothing_behind(store):
    put(store, "keep")
    before = sorted(p.relative_to(store.root) for p in store.root.rglob("*"))
    bad = {"model.safetensors": {"w": torch.ones(2)}, "other.safetensors": {"w": "not a tensor"}}
    with pytest.raises(TypeError):
        store.write("broken", "vilbert", bad, {})
    assert sorted(p.relative_to(store.root) for p in store.root.rglob("*")) == before
    assert [m.ref for m in store.list()] == ["keep@1"]


def test_a_failed_rename_leaves_nothing_behind(store, monkeypatch):
    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "rename", fail)
    with pytest.raises(OSError, match="disk full"):
        put(store, "foo")
    assert list(store.root.iterdir()) == []  # no entry, no temp dir, no empty name dir


def test_an_unserialisable_manifest_leaves_nothing_behind(store):
    with pytest.raises(TypeError):
        put(store, "foo", data={"path": Path("/x")})
    assert list(store.root.iterdir()) == []


def test_resolve_name_latest_and_exact_version(store):
    put(store, "foo", seed=1)
    put(store, "foo", seed=2)
    put(store, "bar")
    assert store.resolve("foo").ref == "foo@2"
    assert store.resolve("foo@1").ref == "foo@1"
    assert torch.equal(
        store.load_tensors(store.resolve("foo@1"))["layer.bias"], weights(1)["layer.bias"]
    )
    assert [m.ref for m in store.latest()] == ["bar@1", "foo@2"]


def test_unknown_references_say_what_exists(store):
    put(store, "foo")
    put(store, "bar")
    with pytest.raises(ModelNotFound, match=r"'baz'.*bar@1, foo@1"):
        store.resolve("baz")
    with pytest.raises(ModelNotFound, match=r"no version 7 of 'foo'.*foo@1"):
        store.resolve("foo@7")
    for ref in ["foo@latest", "foo@", "../foo", "foo@1@2", ""]:
        with pytest.raises(ModelNotFound):
            store.resolve(ref)
    with pytest.raises(ModelNotFound, match="none"):
        ModelStore(store.root / "empty").resolve("foo")


@pytest.mark.parametrize("name", ["../evil", "Foo", "", ".hidden", "a/b", "a@1", "-x", "a b"])
def test_bad_names_are_rejected(store, name):
    with pytest.raises(ValueError, match="bad model name"):
        put(store, name)
    assert not store.root.exists() or list(store.root.iterdir()) == []


@pytest.mark.parametrize("filename", ["../model.safetensors", "sub/x.safetensors", "manifest.json"])
def test_bad_file_names_are_rejected(store, filename):
    with pytest.raises(StoreError, match="bad file name"):
        store.write("foo", "vilbert", {}, {}, extra_files={filename: b"x"})


def test_pickle_files_and_unknown_kinds_are_refused(store):
    with pytest.raises(ValueError, match="safetensors"):
        store.write("foo", "vilbert", {"model.pt": weights()}, {})
    with pytest.raises(ValueError, match="kind"):
        store.write("foo", "bert", {"model.safetensors": weights()}, {})
    with pytest.raises(TypeError, match="unknown manifest fields"):
        put(store, "foo", epochs=3)


def test_a_manifest_pointing_outside_its_entry_is_refused(store):
    m = put(store, "foo")
    raw = json.loads((m.path / "manifest.json").read_text())
    raw["files"]["../../secret"] = "0" * 64
    (m.path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(StoreError, match="bad file name"):
        store.resolve("foo")


def test_versions_sort_as_numbers(store):
    for seed in range(11):
        put(store, "foo", seed=seed)
    assert [m.version for m in store.list()] == list(range(1, 12))
    assert store.resolve("foo").ref == "foo@11"
    assert torch.equal(
        store.load_tensors(store.resolve("foo"))["layer.bias"], weights(10)["layer.bias"]
    )
    store.delete("foo@11")
    assert store.resolve("foo").ref == "foo@10"
    assert put(store, "foo").version == 11


def test_update_manifest_merges_metrics_and_sets_calibration(store):
    m = put(store, "foo", metrics={"vqa_acc": 0.5, "steps": 10})
    calibration = {"head": 0.8, "cosine": 1.4, "bias": -25.0}
    updated = store.update_manifest(
        m, {"vqa_acc": 0.9, "match_auc": 0.8}, match_calibration=calibration
    )
    assert updated.metrics == {"vqa_acc": 0.9, "steps": 10, "match_auc": 0.8}
    reread = ModelStore(store.root).resolve("foo@1")
    assert reread.metrics == updated.metrics and reread.match_calibration == calibration
    assert store.update_manifest(reread).match_calibration == calibration  # kept when not given
    assert sorted(p.name for p in m.path.iterdir()) == ["manifest.json", "model.safetensors"]
    store.verify(updated)
    with pytest.raises(TypeError, match="config"):
        store.update_manifest(m, config={})  # what rebuilds the model stays as written


def test_delete_removes_an_entry_and_an_emptied_name(store):
    put(store, "foo")
    put(store, "foo")
    assert store.delete("foo@1").ref == "foo@1"
    assert [m.ref for m in store.list()] == ["foo@2"]
    store.delete("foo")
    assert store.list() == [] and list(store.root.iterdir()) == []
    with pytest.raises(ModelNotFound):
        store.delete("foo")


def test_tied_and_sliced_tensors_save(store):
    shared = torch.randn(6, 4)
    state = {"embed.weight": shared, "decoder.weight": shared, "rows": shared[2:4], "t": shared.t()}
    m = store.write("tied", "lxmert", {"model.safetensors": state}, {})
    loaded = store.load_tensors(m)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_git_commit_is_recorded_unless_given(store):
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True
    )
    m = store.write("foo", "detector", {"model.safetensors": weights()}, {})
    assert m.git_commit == (head.stdout.strip() if head.returncode == 0 else None)
    assert put(store, "foo", git_commit="abc").git_commit == "abc"


def test_a_manifest_in_the_wrong_folder_is_refused(store):
    m = put(store, "foo")
    os.rename(m.path, m.path.parent / "2")
    with pytest.raises(StoreError, match="says foo@1"):
        store.list()


@pytest.fixture
def package(tmp_path, monkeypatch):
    """An installed package `frozen_pkg` holding weights/table.safetensors."""
    root = tmp_path / "site"
    (root / "frozen_pkg" / "weights").mkdir(parents=True)
    (root / "frozen_pkg" / "__init__.py").write_text("")
    save_file(
        {"table": torch.arange(12.0).reshape(3, 4)}, root / "frozen_pkg/weights/t.safetensors"
    )
    monkeypatch.syspath_prepend(str(root))
    return root / "frozen_pkg"


def test_external_tensors_load_from_their_package_and_are_checked(store, package):
    ref = external_ref("frozen_pkg", "weights/t.safetensors", "table")
    m = store.write(
        "ext",
        "vilbert",
        {"model.safetensors": {"w": torch.ones(2)}},
        config={},
        external={"emb": ref},
    )
    assert ModelStore(store.root).resolve("ext").external == {"emb": ref}
    tensors = store.load_tensors(m)
    assert torch.equal(tensors["emb"], torch.arange(12.0).reshape(3, 4))
    assert torch.equal(tensors["w"], torch.ones(2))
    save_file(
        {"table": torch.zeros(3, 4)}, package / "weights/t.safetensors"
    )  # the package changed
    with pytest.raises(ChecksumMismatch, match="t.safetensors"):
        store.load_tensors(m)


def test_an_external_tensor_from_a_missing_package_says_which(store):
    ref = {"package": "no_such_pkg_here", "file": "w.safetensors", "key": "k", "sha256": "0" * 64}
    m = store.write(
        "ext",
        "vilbert",
        {"model.safetensors": {"w": torch.ones(2)}},
        config={},
        external={"emb": ref},
    )
    with pytest.raises(StoreError, match="no_such_pkg_here"):
        store.load_tensors(m)
