"""The pretraining report end to end at toy size: every run, the report, a resume."""

from __future__ import annotations

import json

import pytest

from service.store import ModelStore
from service.training.experiments import PLOTS, REPORT, ReportRecipe, run_pretraining_report
from tests.training.pretrain_support import tiny_overrides, write_tiny_split

PNG = b"\x89PNG\r\n\x1a\n"


def _vilbert_with_minilm_widths() -> dict:
    """A tiny ViLBERT whose one text layer still has MiniLM's widths, so it initialises
    from the packaged MiniLM (its first layer) as the real recipe does."""
    cfg = tiny_overrides("vilbert")
    cfg.update(hidden_size=384, num_attention_heads=12, intermediate_size=1536)
    cfg.update(max_position_embeddings=512, embed_dim=16)
    return cfg


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("p7")
    for split, n in (("train", 40), ("val", 6), ("test", 8)):
        data_dir, features_dir = write_tiny_split(root, split, n)
    recipe = ReportRecipe(
        label_fraction=0.25,
        batch_size=4,
        pretrain_steps={"lxmert": 2, "vilbert": 2},
        finetune_steps={"lxmert": 3, "vilbert": 2},
        pretrain_lr={"lxmert": 1e-3, "vilbert": 1e-3},
        finetune_lr={"lxmert": 1e-3, "vilbert": 1e-3},
        pretrain_seconds={"lxmert": 60, "vilbert": 60},
        finetune_seconds={"lxmert": 60, "vilbert": 60},
        val_images=4,
        eval_images=6,
        config_overrides={
            "lxmert": tiny_overrides("lxmert"),
            "vilbert": _vilbert_with_minilm_widths(),
        },
    )
    lines: list[str] = []
    args = (data_dir, features_dir, root / "work", root / "out", recipe)
    path = run_pretraining_report(*args, command="vqa train report-pretraining", log=lines.append)
    return root, args, path, lines


def test_every_run_is_trained_evaluated_and_reported(report):
    root, _, path, _ = report
    text = path.read_text()
    assert path.name == REPORT
    for label in (
        "LXMERT pretrained",
        "LXMERT from scratch",
        "ViLBERT pretrained, MiniLM text",
        "ViLBERT pretrained, random text",
        "ViLBERT from scratch",
    ):
        assert f"| {label} |" in text
    assert "| Blind prior (no image) |" in text and "state kept (best validation)" in text
    assert "vqa train report-pretraining" in text and "## Limits" in text
    for name in PLOTS.values():
        assert (root / "out" / name).read_bytes().startswith(PNG)
        assert f"]({name})" in text

    raw = json.loads((root / "out" / "pretraining.json").read_text())
    stages = raw["stages"]
    blind = stages["blind_prior"]["test"]
    assert blind["count"] == stages["lxmert_scratch_eval"]["test"]["count"]
    assert 0.0 < blind["overall"] < 1.0
    for arm in ("lxmert_scratch", "vilbert_minilm", "vilbert_random", "vilbert_scratch"):
        ev = stages[f"{arm}_eval"]
        assert ev["test"]["count"] == ev["paraphrase"]["count"] > 0
        assert 0.0 <= ev["paraphrase"]["overall"] <= 1.0
        fine = stages[f"{arm}_finetune"]
        assert fine["vqa_images"] == [10]  # 25% of 40 training images, the same for every arm
        assert fine["steps_done"] == fine["steps"]


def test_pretrained_arms_start_from_their_pretraining_and_text_init(report):
    root, *_ = report
    store = ModelStore(root / "work" / "store")
    minilm = store.resolve("vilbert_minilm-pretrained")
    random_text = store.resolve("vilbert_random-pretrained")
    assert minilm.data["init_text"] and "text_embeddings.word.weight" in minilm.external
    assert random_text.data["init_text"] is None and not random_text.external
    assert store.resolve("vilbert_minilm").data["init"] == minilm.ref
    assert store.resolve("vilbert_scratch").data["init"] == "none"
    lxmert = store.resolve("lxmert_pretrained-pretrained")
    assert lxmert.data["data_dir"].endswith("captions")  # pretraining saw no question
    assert lxmert.metrics["final_qa"] == 0.0


def test_a_rerun_resumes_without_training_and_another_recipe_is_refused(report):
    root, args, path, _ = report
    before = json.loads((root / "out" / "pretraining.json").read_text())["stages"]
    lines: list[str] = []
    run_pretraining_report(*args, log=lines.append)
    assert all("skipped" in ln for ln in lines if ln.startswith("[demo]"))
    after = json.loads((root / "out" / "pretraining.json").read_text())["stages"]
    assert after == before
    other = ReportRecipe(seed=1)
    with pytest.raises(ValueError, match="another recipe"):
        run_pretraining_report(*args[:4], other)


def test_verdicts_weigh_a_difference_against_the_sampling_noise():
    from service.training.experiments import _verdict

    def result(p: float) -> dict:
        return {"overall": p, "count": 1000}

    assert "better" in _verdict(result(0.60), result(0.50))  # 10 points, noise about 4.4
    assert "worse" in _verdict(result(0.40), result(0.50))
    assert "within the noise" in _verdict(result(0.51), result(0.50))
