"""The demo chain end to end at toy sizes: every stage runs, and a rerun resumes."""

import json

import pytest

from service.store import ModelStore
from service.training.demo import DemoRecipe, run_demo

TINY_LXMERT = dict(
    hidden_size=32,
    num_attention_heads=2,
    intermediate_size=64,
    l_layers=1,
    x_layers=1,
    r_layers=1,
    embed_dim=16,
)


def test_demo_chain_produces_served_models_and_resumes(tmp_path):
    recipe = DemoRecipe(
        train_images=12,
        val_images=6,
        test_images=6,
        detector_steps=3,
        pretrain_steps={"lxmert": 3},
        pretrain_lr={"lxmert": 1e-3},
        finetune_steps={"lxmert": 4},
        finetune_lr={"lxmert": 1e-3},
        batch_size=4,
        gallery_size=6,
        include_easyvqa=False,
        backbones=("lxmert",),
        detector_overrides={"representation_size": 32, "min_regions": 4, "max_regions": 8},
        backbone_overrides=TINY_LXMERT,
    )
    lines: list[str] = []
    state = run_demo(tmp_path / "work", tmp_path / "store", recipe, log=lines.append)
    assert list(state) == [
        "data",
        "detector",
        "detector_eval",
        "features",
        "lxmert_pretrain",
        "lxmert_finetune",
        "lxmert_eval",
    ]
    store = ModelStore(tmp_path / "store")
    served = store.resolve("shapes-lxmert")
    assert served.detector == state["detector"]["ref"]
    assert {"vqa", "match"} <= set(served.tasks)
    assert any(k.startswith("test/") for k in store.resolve("shapes-lxmert").metrics)
    saved = json.loads((tmp_path / "work" / "demo_state.json").read_text())
    assert saved["lxmert_finetune"]["ref"] == served.ref

    lines.clear()
    run_demo(tmp_path / "work", tmp_path / "store", recipe, log=lines.append)
    assert all("skipped" in line for line in lines if line.startswith("[demo]"))
    assert len(store.list()) == 3, "a resumed run must not train anything again"


def test_a_recipe_file_changes_only_the_fields_it_names(tmp_path):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"batch_size": 64, "finetune_seconds": {"lxmert": 130}}))
    recipe = DemoRecipe.from_json(path, backbones=("lxmert",))
    assert recipe.batch_size == 64 and recipe.finetune_seconds == {"lxmert": 130}
    assert recipe.backbones == ("lxmert",) and recipe.train_images == DemoRecipe().train_images
    path.write_text(json.dumps({"batch_sise": 64}))
    with pytest.raises(ValueError, match="batch_sise"):
        DemoRecipe.from_json(path)
    path.write_text(json.dumps({"finetune_mix": {"vqa_families": {"count": -2}}}))
    with pytest.raises(ValueError, match="weight >= 0"):
        DemoRecipe.from_json(path)
