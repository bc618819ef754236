"""The demo chain end to end at toy sizes: every stage runs, and a rerun resumes."""

import json

import pytest

from service.data.language import FAMILIES
from service.store import ModelStore
from service.training.demo import (
    COUNTING_PHASE,
    MIN_TIME_BOX,
    RELATIONS_PHASE,
    DemoRecipe,
    run_demo,
    time_box,
)
from service.training.mix import Mix

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
        kind_overrides={"lxmert": {"embed_dim": 8}},
        finetune_phases={"lxmert": [{**RELATIONS_PHASE, "steps": 2}]},
    )
    lines: list[str] = []
    state = run_demo(tmp_path / "work", tmp_path / "store", recipe, log=lines.append)
    assert list(state) == [
        "data",
        "detector",
        "detector_eval",
        "features",
        "lxmert_pretrain",
        "lxmert_relations",
        "lxmert_finetune",
        "lxmert_eval",
    ]
    store = ModelStore(tmp_path / "store")
    pretrained = store.resolve(state["lxmert_pretrain"]["ref"])
    assert pretrained.config["embed_dim"] == 8  # the backbone's own overrides
    phase = store.resolve(state["lxmert_relations"]["ref"])
    assert phase.name == "shapes-lxmert-relations" and phase.data["init"] == pretrained.ref
    assert phase.data["task"] == "vqa" and phase.data["mix"]["vqa_families"]["count"] == 0
    assert store.resolve("shapes-lxmert").data["init"] == phase.ref  # the last fine-tune follows
    served = store.resolve("shapes-lxmert")
    assert served.detector == state["detector"]["ref"]
    assert {"vqa", "match"} <= set(served.tasks)
    assert any(k.startswith("test/") for k in store.resolve("shapes-lxmert").metrics)
    assert 0 < state["lxmert_pretrain"]["time_box"] <= 90 * 60  # the default budget's cut
    saved = json.loads((tmp_path / "work" / "demo_state.json").read_text())
    assert saved["lxmert_finetune"]["ref"] == served.ref

    lines.clear()
    run_demo(tmp_path / "work", tmp_path / "store", recipe, log=lines.append)
    stage_lines = [line for line in lines if line.startswith("[demo]") and "took" not in line]
    assert stage_lines and all("skipped" in line for line in stage_lines)
    assert len(store.list()) == 4, "a resumed run must not train anything again"


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


@pytest.mark.parametrize(
    "phase, message",
    [
        ({**RELATIONS_PHASE, "name": "my_phase"}, "letters and digits"),
        ({**RELATIONS_PHASE, "name": "finetune"}, "letters and digits"),
        ({**RELATIONS_PHASE, "task": "caption"}, "task must be one of"),
        ({**RELATIONS_PHASE, "lr": 0}, "lr > 0"),
        ({**RELATIONS_PHASE, "epochs": 3}, "unknown phase fields"),
        ({**RELATIONS_PHASE, "mix": {"vqa_families": {"count": -1}}}, "weight >= 0"),
    ],
)
def test_a_bad_finetune_phase_fails_before_anything_trains(phase, message):
    with pytest.raises(ValueError, match=message):
        DemoRecipe(finetune_phases={"vilbert": [phase]})


BEFORE_BACKBONES = {"data": 60.0, "detector": 900.0, "detector_eval": 60.0, "features": 300.0}


def test_time_boxes_share_what_the_budget_has_left():
    phases = {"vilbert": [RELATIONS_PHASE, COUNTING_PHASE]}
    shares = {"vilbert_relations": 1, "vilbert_counting": 1, "vilbert_finetune": 3}
    recipe = DemoRecipe(
        finetune_phases=phases, budget_shares={**DemoRecipe().budget_shares, **shares}
    )
    # 90 minutes; shares vilbert 2 + 1 + 1 + 3, lxmert 2 + 3
    assert recipe.stages("vilbert") == [
        "vilbert_pretrain",
        "vilbert_relations",
        "vilbert_counting",
        "vilbert_finetune",
    ]
    done = {k: {"seconds": v} for k, v in BEFORE_BACKBONES.items()}
    kept = sum(recipe.eval_minutes.values()) + sum(recipe.calibrate_minutes.values())
    left = 90 * 60 - 1320 - kept * 60
    assert time_box(recipe, done, "vilbert_pretrain") == pytest.approx(left * 2 / 12)
    done["vilbert_pretrain"] = {"seconds": 1000.0}  # it ran over its box: the rest shrink
    left -= 1000
    assert time_box(recipe, done, "vilbert_relations") == pytest.approx(left * 1 / 10)
    assert time_box(recipe, done, "vilbert_finetune") == pytest.approx(left * 3 / 10)


def test_the_shipped_models_phases_each_draw_one_question_family():
    # not the CPU default's: they cost it dearly there (docs/experiments/demo-cpu/, run 3)
    assert DemoRecipe().stages("vilbert") == ["vilbert_pretrain", "vilbert_finetune"]
    phases = [RELATIONS_PHASE, COUNTING_PHASE]
    drawn = [Mix.parse(p["mix"]).drawn_families(list(FAMILIES)) for p in phases]
    assert drawn == [["relation"], ["count"]]


@pytest.mark.parametrize(
    "phases", [{}, {"vilbert": [RELATIONS_PHASE, {**COUNTING_PHASE, "task": "all"}]}]
)
def test_stages_that_keep_to_their_boxes_end_the_chain_on_budget(phases):
    recipe = DemoRecipe(
        budget_minutes=60,
        eval_minutes={"vilbert": 4, "lxmert": 4},
        calibrate_minutes={"vilbert": 3, "lxmert": 1},
        finetune_phases=phases,
    )
    done = {k: {"seconds": v} for k, v in BEFORE_BACKBONES.items()}
    for kind in recipe.backbones:
        for stage in recipe.stages(kind):
            # the box, then the calibration of a stage that trains match or all
            calibration = recipe.calibrate_minutes[kind] * 60 if recipe.calibrates(stage) else 0
            done[stage] = {"seconds": time_box(recipe, done, stage) + calibration}
        done[f"{kind}_eval"] = {"seconds": 4 * 60.0}
    assert sum(v["seconds"] for v in done.values()) == pytest.approx(60 * 60)


def test_a_recipes_own_box_caps_the_budgets_and_a_spent_budget_gives_the_minimum():
    done = {k: {"seconds": v} for k, v in BEFORE_BACKBONES.items()}
    capped = DemoRecipe(finetune_seconds={"lxmert": 130})
    assert time_box(capped, done, "lxmert_finetune") == 130
    assert time_box(DemoRecipe(budget_minutes=0), done, "lxmert_finetune") == 0  # every step
    spent = DemoRecipe(budget_minutes=20)
    assert time_box(spent, done, "vilbert_pretrain") == MIN_TIME_BOX
    own = DemoRecipe(finetune_phases={"vilbert": [{**RELATIONS_PHASE, "seconds": 45}]})
    assert time_box(own, done, "vilbert_relations") == 45
