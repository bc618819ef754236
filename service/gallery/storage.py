"""Galleries on disk: one SQLite file holds every gallery, its images and their features.

Each image keeps what search needs so the detector never runs twice on it: the
single-modality image embedding (first stage, faiss) and the region features and
boxes (second stage, the cross-attention rerank). Every write is one SQLite
transaction, so it happens whole or not at all, and survives restarts.

Because the region features are stored, a gallery can move to another version of its
model without its images: `rebind` swaps in the new embeddings and the new model in one
transaction (the faiss index is rebuilt from them on the next search).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from service.errors import Conflict, NotFound, Unavailable

SCHEMA = """
CREATE TABLE IF NOT EXISTS galleries (
    name TEXT PRIMARY KEY, model TEXT NOT NULL, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    gallery TEXT NOT NULL REFERENCES galleries(name) ON DELETE CASCADE,
    id TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    embedding BLOB NOT NULL,      -- float32 (D,)
    features BLOB NOT NULL,       -- float16 (R, F)
    boxes BLOB NOT NULL,          -- float32 (R, 4), normalised
    n_regions INTEGER NOT NULL,
    PRIMARY KEY (gallery, id)
);
"""


class Rebound(Unavailable):
    """The gallery moved to another model version while a request was computing with the old
    one; computing again with the new one succeeds."""

    retry_after_s = 1.0


@dataclass
class StoredImage:
    id: str
    sha256: str
    embedding: np.ndarray  # (D,) float32, L2-normalised
    features: np.ndarray  # (R, F)
    boxes: np.ndarray  # (R, 4) normalised


class GalleryStorage:
    """All galleries under one data dir; thread-safe; in-memory faiss index per gallery."""

    def __init__(self, data_dir: Path | str):
        root = Path(data_dir)
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / "galleries.sqlite3"
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        self._lock = threading.RLock()
        self._indexes: dict[str, tuple[faiss.Index, list[str]]] = {}
        self._data_version = self._version()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- galleries -----------------------------------------------------------------
    def create(self, name: str, model: str) -> None:
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO galleries VALUES (?, ?, ?)", (name, model, time.time())
                )
            except sqlite3.IntegrityError:
                raise Conflict(f"gallery {name!r} exists already") from None

    def model_of(self, name: str) -> str:
        row = self._query_one("SELECT model FROM galleries WHERE name = ?", (name,))
        if row is None:
            raise NotFound(f"no gallery named {name!r}")
        return row[0]

    def bindings(self) -> dict[str, str]:
        """Every gallery's name -> the model ref (name@version) it is bound to."""
        with self._lock:
            return dict(self._db.execute("SELECT name, model FROM galleries").fetchall())

    def count(self, name: str) -> int:
        self.model_of(name)
        return self._query_one("SELECT COUNT(*) FROM images WHERE gallery = ?", (name,))[0]

    def delete(self, name: str) -> None:
        with self._lock, self._transaction():
            self.model_of(name)
            self._db.execute("DELETE FROM images WHERE gallery = ?", (name,))
            self._db.execute("DELETE FROM galleries WHERE name = ?", (name,))
            self._indexes.pop(name, None)

    # -- images --------------------------------------------------------------------
    def add(self, name: str, images: list[StoredImage], model: str | None = None) -> None:
        """Add all images or none: an id already there (or twice in the batch) is a Conflict.

        `model`: the ref the embeddings were computed with; Rebound if the gallery is no
        longer bound to it.
        """
        ids = [im.id for im in images]
        if len(set(ids)) != len(ids):
            raise Conflict("the same image id appears twice in one request")
        with self._lock, self._transaction():
            self._check_model(name, model)
            for im in images:
                try:
                    self._db.execute(
                        "INSERT INTO images VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (
                            name,
                            im.id,
                            im.sha256,
                            _blob(im.embedding, np.float32),
                            _blob(im.features, np.float16),
                            _blob(im.boxes, np.float32),
                            len(im.boxes),
                        ),
                    )
                except sqlite3.IntegrityError:
                    raise Conflict(f"gallery {name!r} already holds an image {im.id!r}") from None
            self._indexes.pop(name, None)

    def delete_image(self, name: str, image_id: str) -> None:
        with self._lock, self._transaction():
            self.model_of(name)
            cur = self._db.execute(
                "DELETE FROM images WHERE gallery = ? AND id = ?", (name, image_id)
            )
            if cur.rowcount == 0:
                raise NotFound(f"gallery {name!r} holds no image {image_id!r}")
            self._indexes.pop(name, None)

    def regions(self, name: str, ids: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(features (R, F) float32, boxes (R, 4)) of each id, in the order given."""
        rows = self.region_map(name, ids)
        return [rows[i] for i in ids]

    def region_map(self, name: str, ids: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """id -> (features (R, F) float32, boxes (R, 4)) for those of `ids` still stored."""
        rows = {}
        with self._lock:
            for chunk in _chunks(ids, 500):
                marks = ",".join("?" * len(chunk))
                for row in self._db.execute(
                    f"SELECT id, features, boxes, n_regions FROM images "
                    f"WHERE gallery = ? AND id IN ({marks})",
                    (name, *chunk),
                ):
                    rows[row[0]] = _regions(row[1], row[2], row[3])
        return rows

    def region_pages(self, name: str, size: int = 64):
        """(ids, [(features (R, F) float32, boxes (R, 4))]) pages of every image, in rowid
        order; each page is read on its own, so a large gallery never sits in memory."""
        after = -1
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT rowid, id, features, boxes, n_regions FROM images "
                    "WHERE gallery = ? AND rowid > ? ORDER BY rowid LIMIT ?",
                    (name, after, size),
                ).fetchall()
            if not rows:
                return
            after = rows[-1][0]
            yield [r[1] for r in rows], [_regions(r[2], r[3], r[4]) for r in rows]

    # -- moving to another model version -------------------------------------------
    def rebind(self, name: str, old: str, new: str, embeddings: dict[str, np.ndarray]) -> list[str]:
        """In one transaction: every image's embedding from `embeddings`, and the gallery
        bound to `new` in place of `old`.

        Returns the ids of images that `embeddings` lacks (added meanwhile), and then
        changes nothing; an id in `embeddings` but no longer in the gallery is skipped.
        A crash before the commit leaves the gallery as it was, bound to `old`.
        """
        with self._lock, self._transaction():
            self._check_model(name, old)
            ids = [
                r[0] for r in self._db.execute("SELECT id FROM images WHERE gallery = ?", (name,))
            ]
            missing = [i for i in ids if i not in embeddings]
            if missing:
                return missing
            self._db.executemany(
                "UPDATE images SET embedding = ? WHERE gallery = ? AND id = ?",
                ((_blob(embeddings[i], np.float32), name, i) for i in ids),
            )
            self._db.execute("UPDATE galleries SET model = ? WHERE name = ?", (new, name))
            self._indexes.pop(name, None)
            return []

    # -- first-stage search --------------------------------------------------------
    def nearest(
        self, name: str, query: np.ndarray, k: int, model: str | None = None
    ) -> list[tuple[str, float]]:
        """Top-k ids by inner product with the L2-normalised query (D,).

        `model`: the ref the query was embedded with; Rebound if the gallery is no longer
        bound to it (its index holds another model's embeddings).
        """
        with self._lock:
            self._check_model(name, model)
            index, ids = self._index(name)
        if not ids:
            return []
        scores, rows = index.search(query.astype(np.float32)[None], min(k, len(ids)))
        return [(ids[r], float(s)) for s, r in zip(scores[0], rows[0], strict=True) if r >= 0]

    def _index(self, name: str) -> tuple[faiss.Index, list[str]]:
        with self._lock:
            self._drop_stale_indexes()
            if name not in self._indexes:
                self.model_of(name)
                rows = self._db.execute(
                    "SELECT id, embedding FROM images WHERE gallery = ? ORDER BY rowid", (name,)
                ).fetchall()
                ids = [r[0] for r in rows]
                vectors = [np.frombuffer(r[1], np.float32) for r in rows]
                index = faiss.IndexFlatIP(len(vectors[0]) if vectors else 1)
                if vectors:
                    index.add(np.stack(vectors))
                self._indexes[name] = (index, ids)
            return self._indexes[name]

    def _drop_stale_indexes(self) -> None:
        """Another process on this data dir (a second replica) committed a write: the
        indexes built before it may miss images or hold deleted ones, so rebuild them."""
        version = self._version()
        if version != self._data_version:
            self._indexes.clear()
            self._data_version = version

    # -- helpers -------------------------------------------------------------------
    def _version(self) -> int:
        """SQLite's data_version: changes when another connection commits to the file."""
        return self._query_one("PRAGMA data_version", ())[0]

    def _check_model(self, name: str, model: str | None) -> None:
        bound = self.model_of(name)
        if model is not None and bound != model:
            raise Rebound(
                f"gallery {name!r} moved from {model} to {bound} during this request; retry"
            )

    def _query_one(self, sql: str, params: tuple):
        with self._lock:
            return self._db.execute(sql, params).fetchone()

    def _transaction(self):
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, *_):
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        return False


def _blob(array: np.ndarray, dtype) -> bytes:
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def _regions(features: bytes, boxes: bytes, n: int) -> tuple[np.ndarray, np.ndarray]:
    feats = np.frombuffer(features, np.float16).reshape(n, -1).astype(np.float32)  # (R, F)
    return feats, np.frombuffer(boxes, np.float32).reshape(n, 4).copy()  # (R, 4)


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]
