"""The model store: versioned checkpoints that describe themselves.

Layout: <root>/<name>/<version>/{manifest.json, *.safetensors, tokenizer files, ...}.
Versions are integers 1, 2, 3, ... Every file but manifest.json is listed in the manifest
with its sha256. Weights are safetensors only; nothing here ever unpickles.

A write builds the whole entry in a hidden temp dir inside the root and renames it into
place, so readers see a complete entry or none, and a failed write leaves nothing behind.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

KINDS = ("detector", "vilbert", "lxmert")
MANIFEST = "manifest.json"
AFTER_TRAINING = {"match_calibration"}  # manifest fields set after the entry is written
WEIGHTS = "model.safetensors"
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
_FILENAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_REF = re.compile(r"(?P<name>[^@]+)(?:@(?P<version>[^@]+))?")


class StoreError(Exception):
    """Anything wrong with the store or one of its entries."""


class ModelNotFound(StoreError):
    """No entry matches the reference."""


class ChecksumMismatch(StoreError):
    """A file of an entry is missing or its bytes are not those the manifest recorded."""

    def __init__(self, path: Path, message: str):
        super().__init__(f"{path}: {message}")
        self.path = path


@dataclass
class Manifest:
    """manifest.json of one entry; `path` is the entry's folder and is not serialised."""

    name: str
    kind: str
    version: int
    config: dict
    files: dict[str, str]  # filename -> sha256 hex
    tokenizer: list[str] | None = None
    answers: list[str] | None = None
    detector: str | None = None  # "name@version" of the detector it was trained on
    data: dict = field(default_factory=dict)  # data recipe and seed
    command: str | None = None
    git_commit: str | None = None
    created: str = ""  # ISO 8601, UTC
    metrics: dict = field(default_factory=dict)
    tasks: list[str] = field(default_factory=list)
    # tensors kept out of the entry and read from an installed package (frozen weights):
    # state key -> {"package": module, "file": path inside it, "key": tensor, "sha256": file's}
    external: dict[str, dict[str, str]] = field(default_factory=dict)
    # how the served match logit combines the alignment head and the embeddings
    # (service.models.backbone.MatchCalibration), fitted after training; None: head alone
    match_calibration: dict | None = None
    path: Path = field(default=Path(), compare=False)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict:
        d = asdict(self)
        del d["path"]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_file(cls, path: Path | str) -> Manifest:
        """Read `path` (an entry folder or its manifest.json)."""
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise StoreError(f"{path}: unreadable manifest ({e})") from e
        known = {f.name for f in fields(cls)} - {"path"}
        required = {"name", "kind", "version", "config", "files"}
        if not isinstance(raw, dict) or not required <= raw.keys():
            raise StoreError(f"{path}: manifest lacks one of {sorted(required)}")
        try:
            m = cls(**{k: v for k, v in raw.items() if k in known}, path=path.parent)
            m.version = int(m.version)
        except (TypeError, ValueError) as e:
            raise StoreError(f"{path}: bad manifest ({e})") from e
        for filename in m.files:
            _check_filename(filename, where=str(path))
        return m


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _check_sha256(path: Path, expected: str, ref: str) -> None:
    if not path.is_file():
        raise ChecksumMismatch(path, f"missing (listed in {ref}'s manifest)")
    got = sha256_file(path)
    if got != expected:
        raise ChecksumMismatch(
            path,
            f"sha256 mismatch (expected {expected[:12]}.., got {got[:12]}..): "
            "the file was changed or corrupted",
        )


def package_file(external: dict[str, str]) -> Path:
    """The file an external tensor lives in, inside its installed package."""
    spec = importlib.util.find_spec(external["package"])
    if spec is None or not spec.submodule_search_locations:
        raise StoreError(
            f"package {external['package']!r} is not installed; it holds the frozen "
            f"tensor {external['key']!r} this model references"
        )
    return Path(spec.submodule_search_locations[0]) / external["file"]


def external_ref(package: str, file: str, key: str) -> dict[str, str]:
    """An `external` entry for `key` of <package>/<file>, pinned by the file's sha256."""
    ref = {"package": package, "file": file, "key": key}
    return {**ref, "sha256": sha256_file(package_file(ref))}


def _external_tensors(external: dict[str, dict[str, str]]) -> dict[str, torch.Tensor]:
    out = {}
    for name, ref in external.items():
        with safe_open(str(package_file(ref)), "pt") as f:
            out[name] = f.get_tensor(ref["key"])
    return out


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"bad model name {name!r}: use lowercase [a-z0-9][a-z0-9._-]*")


def _check_filename(filename: str, where: str = "") -> None:
    if not _FILENAME.fullmatch(filename) or filename == MANIFEST:
        raise StoreError(f"{where}: bad file name {filename!r} (a plain name, not manifest.json)")


@functools.cache
def _git_commit() -> str | None:
    """HEAD when this process first asked (it asks on import): the commit of the code it
    runs, even when the checkout moves on during an hour of training."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


_git_commit()  # now, at import, before any training runs


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors safetensors can save: on CPU, contiguous, none sharing memory with another.

    Tied weights (one storage under two names) and views into a larger buffer are cloned.
    """
    out, seen = {}, set()
    for key, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{key!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().cpu()
        storage = t.untyped_storage()
        whole = t.is_contiguous() and storage.nbytes() == t.nbytes
        if storage.data_ptr() in seen or not whole:
            t = t.contiguous().clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


class ModelStore:
    """A folder of versioned model entries."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"ModelStore({str(self.root)!r})"

    # reading

    def list(self) -> list[Manifest]:
        """Every entry, sorted by name, then version as a number."""
        if not self.root.is_dir():
            return []
        entries = []
        for name_dir in sorted(self.root.iterdir()):
            if not name_dir.is_dir() or not _NAME.fullmatch(name_dir.name):
                continue  # temp dirs start with "." and are skipped
            for version_dir in name_dir.iterdir():
                if version_dir.name.isdigit() and (version_dir / MANIFEST).is_file():
                    entries.append(_read_entry(version_dir))
        return sorted(entries, key=lambda m: (m.name, m.version))

    def latest(self) -> list[Manifest]:
        """The newest version of every name."""
        newest: dict[str, Manifest] = {}
        for m in self.list():
            newest[m.name] = m  # list() is sorted, so the last one wins
        return list(newest.values())

    def resolve(self, ref: str) -> Manifest:
        """ "name" (its newest version) or "name@version" -> that entry's manifest."""
        match = _REF.fullmatch(ref) if isinstance(ref, str) else None
        name, version = (match["name"], match["version"]) if match else (str(ref), None)
        if not match or not _NAME.fullmatch(name) or (version and not version.isdigit()):
            raise ModelNotFound(f"{ref!r} is not a model reference: use name or name@version")
        entries = [m for m in self.list() if m.name == name]
        if not entries:
            have = ", ".join(m.ref for m in self.latest()) or "none"
            raise ModelNotFound(f"no model {name!r} in {self.root} (models there: {have})")
        if version is None:
            return entries[-1]
        for m in entries:
            if m.version == int(version):
                return m
        have = ", ".join(m.ref for m in entries)
        raise ModelNotFound(f"no version {version} of {name!r} in {self.root} (there: {have})")

    def file_path(self, manifest: Manifest, filename: str) -> Path:
        if filename not in manifest.files:
            listed = ", ".join(manifest.files) or "none"
            raise StoreError(f"{manifest.ref} has no file {filename!r} (files: {listed})")
        return manifest.path / filename

    def verify(self, manifest: Manifest, filenames: list[str] | None = None) -> None:
        """Check that every listed file (or just `filenames`) is there with its sha256;
        with no `filenames`, the package files of its external tensors too."""
        checks = [
            (self.file_path(manifest, f), manifest.files[f])
            for f in (manifest.files if filenames is None else filenames)
        ]
        if filenames is None:
            checks += [(package_file(e), e["sha256"]) for e in manifest.external.values()]
        for path, expected in dict(checks).items():
            _check_sha256(path, expected, manifest.ref)

    def load_tensors(
        self, manifest: Manifest, filename: str = WEIGHTS, verify: bool = True
    ) -> dict[str, torch.Tensor]:
        """The tensors of one safetensors file; with `verify`, first check the whole entry
        (weights, tokenizer files, ...) against its sha256s, as loading it to serve needs."""
        if not filename.endswith(".safetensors"):
            raise StoreError(f"{filename!r}: only .safetensors files hold tensors")
        path = self.file_path(manifest, filename)
        if verify:
            self.verify(manifest)
        tensors = load_file(path)
        if filename == WEIGHTS:
            tensors.update(_external_tensors(manifest.external))
        return tensors

    # writing

    def write(
        self,
        name: str,
        kind: str,
        tensors: dict[str, dict[str, torch.Tensor]],
        config: dict,
        extra_files: dict[str, bytes | Path] | None = None,
        **meta,
    ) -> Manifest:
        """Store a new version of `name`; meta fills the other manifest fields."""
        _check_name(name)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        allowed = {f.name for f in fields(Manifest)} - {"name", "kind", "version", "config"}
        allowed -= {"files", "path"}
        if unknown := set(meta) - allowed:
            raise TypeError(
                f"unknown manifest fields {sorted(unknown)}; allowed: {sorted(allowed)}"
            )
        extra_files = extra_files or {}
        for filename in [*tensors, *extra_files]:
            _check_filename(filename, where=name)
        if bad := [f for f in tensors if not f.endswith(".safetensors")]:
            raise ValueError(f"tensor files must end in .safetensors: {bad}")
        if both := set(tensors) & set(extra_files):
            raise ValueError(f"files given twice: {sorted(both)}")
        meta.setdefault("created", datetime.now(UTC).isoformat(timespec="seconds"))
        if "git_commit" not in meta:
            meta["git_commit"] = _git_commit()

        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=self.root))
        name_dir = self.root / name
        made_name_dir = not name_dir.exists()
        try:
            for filename, state in tensors.items():
                save_file(_unshared(state), tmp / filename)
            for filename, src in extra_files.items():
                if isinstance(src, bytes | bytearray):
                    (tmp / filename).write_bytes(src)
                else:
                    shutil.copyfile(src, tmp / filename)
            files = {f: sha256_file(tmp / f) for f in sorted([*tensors, *extra_files])}
            manifest = Manifest(name=name, kind=kind, version=0, config=config, files=files, **meta)
            return self._publish(tmp, manifest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if made_name_dir:
                _remove_if_empty(name_dir)
            raise

    def _publish(self, tmp: Path, manifest: Manifest) -> Manifest:
        """Number the entry and rename it into place; retry if a concurrent write took it."""
        name_dir = self.root / manifest.name
        name_dir.mkdir(exist_ok=True)
        for _ in range(100):
            versions = [int(p.name) for p in name_dir.iterdir() if p.name.isdigit()]
            manifest.version = max(versions, default=0) + 1
            (tmp / MANIFEST).write_text(manifest.to_json())
            target = name_dir / str(manifest.version)
            try:
                os.rename(tmp, target)
            except OSError:
                if target.exists():
                    continue  # another writer took this version number
                raise
            manifest.path = target
            return manifest
        raise StoreError(f"could not find a free version for {manifest.name!r}")

    def update_manifest(
        self, manifest: Manifest, metrics: dict | None = None, **fields
    ) -> Manifest:
        """Merge `metrics` into the entry's manifest on disk and set `fields` (those made
        after training: metrics, match_calibration); an atomic replace. The checksummed
        files are never touched."""
        if unknown := set(fields) - AFTER_TRAINING:
            raise TypeError(f"cannot update manifest fields {sorted(unknown)}")
        current = Manifest.from_file(manifest.path)
        current.metrics = {**current.metrics, **(metrics or {})}
        for name, value in fields.items():
            setattr(current, name, value)
        fd, tmp = tempfile.mkstemp(prefix=".manifest-", dir=current.path)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(current.to_json())
            os.replace(tmp, current.path / MANIFEST)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return current

    def delete(self, ref: str) -> Manifest:
        """Remove the entry `ref` names (as `resolve` reads it: "name" is its newest version)."""
        manifest = self.resolve(ref)
        trash = Path(tempfile.mkdtemp(prefix=f".del-{manifest.name}-", dir=self.root))
        os.rename(manifest.path, trash / "entry")  # gone for readers in one step
        shutil.rmtree(trash)
        _remove_if_empty(self.root / manifest.name)
        return manifest


def _read_entry(folder: Path) -> Manifest:
    """The manifest of <root>/<name>/<version>, which must say that name and version."""
    m = Manifest.from_file(folder)
    if (m.name, str(m.version)) != (folder.parent.name, folder.name):
        raise StoreError(f"{folder / MANIFEST}: says {m.ref} but lies in {folder}")
    return m


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass
