import pytest
import torch

from service.data.collate import RegionSet, collate, normalise_boxes
from service.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def _regions(n: int, dim: int = 6) -> RegionSet:
    g = torch.Generator().manual_seed(n)
    return RegionSet(torch.randn(n, dim, generator=g), torch.rand(n, 4, generator=g))


def test_pads_tokens_and_regions_with_masks(tokenizer):
    texts = ["what color is the circle?", "is there a red shape?"]
    batch = collate(texts, [_regions(3), _regions(5)], tokenizer)
    assert len(batch) == 2
    assert batch.region_features.shape == (2, 5, 6)
    assert batch.region_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert torch.equal(batch.region_features[0, :3], _regions(3).features)
    assert batch.region_features[0, 3:].abs().sum() == 0
    ids = tokenizer(texts[1])["input_ids"]
    assert batch.input_ids[1, : len(ids)].tolist() == ids
    assert batch.attention_mask.sum(1).tolist() == [len(tokenizer(t)["input_ids"]) for t in texts]


def test_one_image_many_questions_shares_regions(tokenizer):
    rs = _regions(4)
    batch = collate(["a", "b", "c"], [rs, rs, rs], tokenizer)
    assert torch.equal(batch.region_features[0], batch.region_features[2])


def test_truncates_long_text(tokenizer):
    batch = collate(["word " * 200], [_regions(2)], tokenizer, max_length=16)
    assert batch.input_ids.shape == (1, 16)


def test_mismatched_lengths_rejected(tokenizer):
    with pytest.raises(ValueError, match="2 texts but 1 region sets"):
        collate(["a", "b"], [_regions(2)], tokenizer)


def test_normalise_boxes_divides_by_size():
    boxes = torch.tensor([[0.0, 10.0, 64.0, 128.0]])
    assert normalise_boxes(boxes, width=128, height=128).tolist() == [[0.0, 10 / 128, 0.5, 1.0]]


def test_the_longest_shapes_captions_fit_uncut(tokenizer):
    """Every complete caption keeps its relation clause: six objects and a relation fit."""
    from service.data.collate import MAX_TEXT_TOKENS
    from service.data.shapes import generate_scene, scene_record, split_rng

    captions = []
    for i in range(400):
        rng = split_rng(3, "train", i)
        captions.append(
            scene_record(generate_scene(rng, size=96), rng, "x.png", str(i))["captions"][0]
        )
    longest = max(captions, key=lambda c: len(tokenizer(c)["input_ids"]))
    n = len(tokenizer(longest)["input_ids"])
    assert 40 < n <= MAX_TEXT_TOKENS, (n, longest)  # 40, the old limit, cut these
    batch = collate([longest], [_regions(2)], tokenizer)
    assert batch.attention_mask.sum().item() == n
