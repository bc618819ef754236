import numpy as np
import pytest

from service.errors import Conflict, NotFound
from service.gallery.storage import GalleryStorage, StoredImage


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
