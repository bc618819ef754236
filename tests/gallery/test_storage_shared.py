"""Two storages on one data dir, as two replicas of the service have: a write by one is
seen by the other's next search (its cached faiss index is rebuilt)."""

from __future__ import annotations

import numpy as np
import pytest

from service.gallery.storage import GalleryStorage, StoredImage


def _image(i: int, dim: int = 8) -> StoredImage:
    rng = np.random.default_rng(i)
    emb = rng.normal(size=dim).astype(np.float32)
    return StoredImage(
        id=f"img{i}",
        sha256=f"{i:064x}",
        embedding=emb / np.linalg.norm(emb),
        features=rng.normal(size=(3, 5)).astype(np.float32),
        boxes=rng.uniform(size=(3, 4)).astype(np.float32),
    )


@pytest.fixture
def pair(tmp_path):
    a, b = GalleryStorage(tmp_path), GalleryStorage(tmp_path)
    yield a, b
    a.close()
    b.close()


def test_search_on_one_replica_sees_adds_and_deletes_of_the_other(pair):
    a, b = pair
    a.create("g", "m@1")
    a.add("g", [_image(0), _image(1)])
    new = _image(2)
    assert b.nearest("g", new.embedding, k=5)[0][0] != "img2"  # b's index is built now

    a.add("g", [new])
    top, score = b.nearest("g", new.embedding, k=5)[0]
    assert top == "img2" and score == pytest.approx(1.0, abs=1e-5)

    a.delete_image("g", "img2")
    assert "img2" not in {i for i, _ in b.nearest("g", new.embedding, k=5)}
    assert b.count("g") == 2


def test_a_gallery_deleted_and_made_again_elsewhere_is_searched_afresh(pair):
    a, b = pair
    a.create("g", "m@1")
    a.add("g", [_image(0)])
    assert [i for i, _ in b.nearest("g", _image(0).embedding, k=3)] == ["img0"]
    a.delete("g")
    a.create("g", "m@1")
    a.add("g", [_image(5)])
    assert [i for i, _ in b.nearest("g", _image(0).embedding, k=3)] == ["img5"]


def test_own_writes_keep_the_other_galleries_indexes(pair):
    """Only another connection's commits drop the cache; a storage's own writes drop just
    the gallery they touch."""
    a, _ = pair
    a.create("g", "m@1")
    a.create("h", "m@1")
    a.add("g", [_image(0)])
    a.add("h", [_image(1)])
    a.nearest("g", _image(0).embedding, k=1)
    a.nearest("h", _image(1).embedding, k=1)
    index_h = a._indexes["h"]
    a.add("g", [_image(2)])
    a.nearest("g", _image(2).embedding, k=1)
    assert a._indexes["h"] is index_h
