import torch

from service.data.features import FeatureFile, ImageRegions, write_feature_file


def _regions(n: int, seed: int) -> ImageRegions:
    g = torch.Generator().manual_seed(seed)
    return ImageRegions(
        features=torch.randn(n, 8, generator=g),
        boxes=torch.rand(n, 4, generator=g),
        class_probs=torch.softmax(torch.randn(n, 4, generator=g), -1),
        attributes={"color": torch.softmax(torch.randn(n, 8, generator=g), -1)},
        scores=torch.rand(n, generator=g),
    )


def test_round_trip_by_index_and_id(tmp_path):
    regions = [_regions(n, i) for i, n in enumerate([3, 10, 1])]
    path = write_feature_file(
        tmp_path / "train.safetensors", ["a", "b", "c"], regions, {"detector": "det@1"}
    )
    f = FeatureFile(path)
    assert len(f) == 3 and f.ids == ["a", "b", "c"] and f.meta["detector"] == "det@1"
    got = f.by_id("b")
    assert got.features.shape == (10, 8)
    torch.testing.assert_close(got.features.float(), regions[1].features, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got.boxes, regions[1].boxes)
    assert f[2].attributes["color"].shape == (1, 8)
    assert f[0].region_set().features.dtype == torch.float32
    assert not list(tmp_path.glob("*.tmp"))
