import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from service.errors import Conflict, NotFound
from service.gallery.storage import GalleryStorage, Rebound, StoredImage


def _image(i: int, dim: int = 8, regions: int = 3) -> StoredImage:
    rng = np.random.default_rng(i)
    emb = rng.normal(size=dim).astype(np.float32)
    return StoredImage(
        id=f"img{i}",
        sha256=f"{i:064x}",
        embedding=emb / np.linalg.norm(emb),
        features=rng.normal(size=(regions, 5)).astype(np.float32),
        boxes=rng.uniform(size=(regions, 4)).astype(np.float32),
    )


@pytest.fixture
def storage(tmp_path):
    s = GalleryStorage(tmp_path)
    yield s
    s.close()


def test_create_add_count_and_conflicts(storage):
    storage.create("pets", "tiny@1")
    with pytest.raises(Conflict):
        storage.create("pets", "tiny@1")
    storage.add("pets", [_image(0), _image(1)])
    assert storage.count("pets") == 2
    assert storage.model_of("pets") == "tiny@1"
    with pytest.raises(Conflict, match="img1"):
        storage.add("pets", [_image(2), _image(1)])
    assert storage.count("pets") == 2, "a failed batch must add nothing"


def test_nearest_finds_the_image_whose_embedding_is_the_query(storage):
    storage.create("g", "m@1")
    images = [_image(i) for i in range(50)]
    storage.add("g", images)
    hits = storage.nearest("g", images[17].embedding, k=5)
    assert hits[0][0] == "img17"
    assert hits[0][1] == pytest.approx(1.0, abs=1e-5)
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)


def test_regions_round_trip_in_requested_order(storage):
    storage.create("g", "m@1")
    images = [_image(i, regions=2 + i) for i in range(3)]
    storage.add("g", images)
    got = storage.regions("g", ["img2", "img0"])
    np.testing.assert_allclose(got[0][0], images[2].features, atol=1e-2)  # stored as fp16
    np.testing.assert_array_equal(got[1][1], images[0].boxes)


def test_delete_image_and_gallery(storage):
    storage.create("g", "m@1")
    storage.add("g", [_image(0), _image(1)])
    storage.nearest("g", _image(0).embedding, 1)  # builds the index
    storage.delete_image("g", "img0")
    assert [i for i, _ in storage.nearest("g", _image(0).embedding, 5)] == ["img1"]
    with pytest.raises(NotFound):
        storage.delete_image("g", "img0")
    storage.delete("g")
    with pytest.raises(NotFound):
        storage.count("g")


def test_persists_across_reopen(tmp_path):
    first = GalleryStorage(tmp_path)
    first.create("g", "m@1")
    first.add("g", [_image(i) for i in range(4)])
    first.close()
    second = GalleryStorage(tmp_path)
    assert second.count("g") == 4
    assert second.nearest("g", _image(3).embedding, 1)[0][0] == "img3"
    second.close()


def test_unknown_gallery_is_not_found(storage):
    with pytest.raises(NotFound):
        storage.add("nope", [_image(0)])
    with pytest.raises(NotFound):
        storage.nearest("nope", _image(0).embedding, 3)


# -- moving a gallery to another model version ------------------------------------------


def _embeddings(ids: list[str], seed: int, dim: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in ids:
        e = rng.normal(size=dim).astype(np.float32)
        out[i] = e / np.linalg.norm(e)
    return out


def test_rebind_swaps_embeddings_and_model_and_the_index_follows(storage):
    storage.create("g", "m@1")
    storage.add("g", [_image(i) for i in range(4)])
    storage.nearest("g", _image(0).embedding, 1)  # builds the index on m@1's embeddings
    new = _embeddings([f"img{i}" for i in range(4)], seed=99)
    assert storage.rebind("g", "m@1", "m@2", new) == []
    assert storage.model_of("g") == "m@2"
    assert storage.bindings() == {"g": "m@2"}
    hits = storage.nearest("g", new["img2"], 4, model="m@2")
    assert hits[0] == ("img2", pytest.approx(1.0, abs=1e-5))
    np.testing.assert_allclose(  # region features are untouched
        storage.regions("g", ["img3"])[0][0], _image(3).features, atol=1e-2
    )


def test_rebind_names_images_it_lacks_and_changes_nothing(storage):
    storage.create("g", "m@1")
    storage.add("g", [_image(i) for i in range(3)])
    partial = _embeddings(["img0", "img2", "gone"], seed=5)
    assert storage.rebind("g", "m@1", "m@2", partial) == ["img1"]
    assert storage.model_of("g") == "m@1"
    assert storage.nearest("g", _image(1).embedding, 1)[0][0] == "img1"  # old embeddings


def test_a_request_computed_with_the_old_model_is_told_to_retry(storage):
    storage.create("g", "m@1")
    storage.add("g", [_image(0)], model="m@1")
    storage.rebind("g", "m@1", "m@2", _embeddings(["img0"], seed=1))
    with pytest.raises(Rebound, match="m@1 to m@2"):
        storage.nearest("g", _image(0).embedding, 1, model="m@1")
    with pytest.raises(Rebound):
        storage.add("g", [_image(1)], model="m@1")
    assert storage.count("g") == 1
    storage.add("g", [_image(1)], model="m@2")
    assert storage.count("g") == 2


def test_region_pages_read_every_image_once_in_insertion_order(storage):
    storage.create("g", "m@1")
    images = [_image(i, regions=1 + i % 4) for i in range(7)]
    storage.add("g", images)
    storage.delete_image("g", "img3")
    pages = list(storage.region_pages("g", size=3))
    assert [len(ids) for ids, _ in pages] == [3, 3]
    ids = [i for page_ids, _ in pages for i in page_ids]
    assert ids == ["img0", "img1", "img2", "img4", "img5", "img6"]
    boxes = {i: b for page_ids, regs in pages for i, (_, b) in zip(page_ids, regs, strict=True)}
    np.testing.assert_array_equal(boxes["img5"], images[5].boxes)


CRASH_MID_REBIND = """
import os, sys
import numpy as np
from service.gallery.storage import GalleryStorage

class DiesOnSecondRead(dict):
    reads = 0
    def __getitem__(self, key):
        DiesOnSecondRead.reads += 1
        if DiesOnSecondRead.reads == 2:
            os._exit(17)  # the process dies inside the transaction, one row written
        return super().__getitem__(key)

storage = GalleryStorage(sys.argv[1])
ids = [r[0] for r in storage._db.execute("SELECT id FROM images")]
storage.rebind("g", "m@1", "m@2", DiesOnSecondRead({i: np.ones(8, np.float32) for i in ids}))
"""


def test_a_crash_mid_rebind_leaves_the_gallery_on_the_old_model(tmp_path):
    first = GalleryStorage(tmp_path)
    first.create("g", "m@1")
    images = [_image(i) for i in range(3)]
    first.add("g", images)
    first.close()
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_MID_REBIND, str(tmp_path)], cwd=root, capture_output=True
    )
    assert proc.returncode == 17, proc.stderr.decode()
    after = GalleryStorage(tmp_path)
    assert after.model_of("g") == "m@1"
    for im in images:
        assert after.nearest("g", im.embedding, 1, model="m@1")[0] == (
            im.id,
            pytest.approx(1.0, abs=1e-5),
        )
    after.close()
