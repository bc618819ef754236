"""`vqa train demo`: the whole chain that produces the models the service ships.

data -> detector -> detector eval -> region features -> for each backbone: pretrain ->
the recipe's fine-tuning phases, if any (e.g. `RELATIONS_PHASE`, `COUNTING_PHASE`) ->
fine-tune (all tasks) -> eval. Each finished stage is recorded in
<work>/demo_state.json and skipped on the next run, and the long stages checkpoint inside
<work>/checkpoints, so an interrupted run resumed with the same command picks up where it
stopped.

The default recipe is a 90-minute budget on a 2-core CPU: the stages before the backbones
run to the end, then each backbone's pretraining and fine-tuning get a time box cut from
what the budget has left (`time_box`), so the whole chain ends near the budget whatever
the machine's speed. A stage interrupted and resumed gets a fresh box.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from service.data.language import FAMILIES
from service.data.shapes import write_split
from service.store import ModelStore
from service.training.detector_ops import run_eval_detector, run_features, run_train_detector
from service.training.evaluate import run_eval
from service.training.finetune import TASKS, run_finetune
from service.training.mix import Mix
from service.training.pretrain import run_pretrain

BACKBONES = ("vilbert", "lxmert")


def one_family_phase(name: str, family: str, steps: int, **mix) -> dict:
    """A fine-tuning phase of one shapes-world question family alone, VQA only, at lr 3e-4."""
    others = {f: 0 for f in FAMILIES if f != family}
    return {
        "name": name,
        "task": "vqa",
        "lr": 3e-4,
        "steps": steps,
        "mix": {
            "objectives": {"vqa": 1},
            "vqa_sources": {"shapes": 1, "easy-vqa": 0},
            "vqa_families": others,
            **mix,
        },
    }


# The phases that taught the shipped ViLBERT its relation words and its counts, after it
# knew the rest (docs/experiments/vilbert-relations, vilbert-counting: relation 73.0 ->
# 92.8%, count 87.3 -> 94.6% on test), for recipes with the time for them. Not the 90-minute
# CPU default's: there they take time from the all-task fine-tune of a model that has
# learnt nothing yet, and it ended far worse (docs/experiments/demo-cpu/, run 3).
RELATIONS_PHASE = one_family_phase("relations", "relation", 1500, vqa_turned=1.0)
COUNTING_PHASE = one_family_phase("counting", "count", 2000)


@dataclass
class DemoRecipe:
    """Sizes and steps of the demo; the defaults are the shipped recipe for a 2-core CPU."""

    train_images: int = 8000
    val_images: int = 500
    test_images: int = 1000
    # test mAP@0.5 0.990 at 1,200 steps, 0.998 at 2,400, 0.999 at 4,000 (0.45 s a step)
    detector_steps: int = 2000
    # backbone steps are caps: under the budget the time boxes end the stages first
    pretrain_steps: dict[str, int] = field(
        default_factory=lambda: {"vilbert": 2000, "lxmert": 3000}
    )
    pretrain_lr: dict[str, float] = field(default_factory=lambda: {"vilbert": 2e-4, "lxmert": 5e-4})
    finetune_steps: dict[str, int] = field(
        default_factory=lambda: {"vilbert": 3000, "lxmert": 4000}
    )
    finetune_lr: dict[str, float] = field(default_factory=lambda: {"vilbert": 1e-4, "lxmert": 3e-4})
    # per backbone, fine-tuning phases between pretraining and the all-task fine-tune, each
    # {"name", "task", "lr", "steps", "mix" (Mix fields), "seconds" (own box, optional)};
    # stage "<kind>_<name>", its budget share under that key in budget_shares
    finetune_phases: dict[str, list[dict]] = field(default_factory=dict)
    # time boxes in seconds (absent or 0: run every step), e.g. to fit a GPU lease
    pretrain_seconds: dict[str, float] = field(default_factory=dict)
    finetune_seconds: dict[str, float] = field(default_factory=dict)
    # the whole chain's wall-clock budget (0: none): see `time_box`
    budget_minutes: float = 90.0
    budget_shares: dict[str, float] = field(
        default_factory=lambda: {
            "vilbert_pretrain": 2,
            "vilbert_finetune": 5,
            "lxmert_pretrain": 2,
            "lxmert_finetune": 3,
        }
    )
    # kept back for each backbone's evaluation still to run: on the 2-core CPU the test
    # split takes 8.2 (ViLBERT) and 2.2-3.7 (LXMERT) minutes (docs/experiments/demo-cpu/)
    eval_minutes: dict[str, float] = field(default_factory=lambda: {"vilbert": 10, "lxmert": 5})
    # kept back for the match calibration that ends each stage training "match" or "all"
    # (after its box): on the 2-core CPU 3.5 (ViLBERT) and 0.5 (LXMERT) minutes (run 3)
    calibrate_minutes: dict[str, float] = field(default_factory=lambda: {"vilbert": 4, "lxmert": 1})
    # what fine-tuning draws how often (service.training.mix.Mix fields; empty: uniform)
    finetune_mix: dict = field(default_factory=dict)
    batch_size: int = 32
    gallery_size: int = 1000
    seed: int = 0
    include_easyvqa: bool = True
    detector_overrides: dict | None = None  # tests shrink the models through these
    backbone_overrides: dict | None = None
    # config fields of one backbone, over backbone_overrides, e.g. {"vilbert": {"box_init_std":
    # 0.6}}: ViLBERT's box projection as loud as the feature's (diagnosis section 10)
    kind_overrides: dict[str, dict] = field(default_factory=dict)
    backbones: tuple[str, ...] = BACKBONES

    def __post_init__(self):
        Mix.parse(self.finetune_mix)  # a bad mix fails here, not after an hour of pretraining
        for name in ("eval_minutes", "calibrate_minutes"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f'{name}: minutes per backbone, e.g. {{"vilbert": 10}}')
        for kind, phases in self.finetune_phases.items():
            for phase in phases:
                check_phase(kind, phase)

    def stages(self, kind: str) -> list[str]:
        """A backbone's training stages in order: "<kind>_pretrain", phases, "<kind>_finetune"."""
        phases = [p["name"] for p in self.finetune_phases.get(kind, [])]
        return [f"{kind}_{name}" for name in ("pretrain", *phases, "finetune")]

    def _phase(self, stage: str) -> dict:
        kind, name = stage.split("_", 1)
        return next(p for p in self.finetune_phases[kind] if p["name"] == name)

    def calibrates(self, stage: str) -> bool:
        """Whether a training stage ends with the match calibration (its task match or all)."""
        name = stage.split("_", 1)[1]
        if name in ("pretrain", "finetune"):
            return name == "finetune"
        return self._phase(stage)["task"] in ("match", "all")

    def own_seconds(self, stage: str) -> float:
        """The recipe's own time box for a training stage (0: none)."""
        kind, name = stage.split("_", 1)
        if name in ("pretrain", "finetune"):
            return getattr(self, f"{name}_seconds").get(kind, 0)
        return self._phase(stage).get("seconds", 0)

    @classmethod
    def from_json(cls, path: str | Path, **overrides) -> DemoRecipe:
        """The defaults updated with a JSON file's fields (unknown fields are an error)."""
        fields = {**json.loads(Path(path).read_text()), **overrides}
        if unknown := set(fields) - set(asdict(cls())):
            raise ValueError(f"{path}: unknown recipe fields {sorted(unknown)}")
        if "backbones" in fields:
            fields["backbones"] = tuple(fields["backbones"])
        return cls(**fields)


def check_phase(kind: str, phase: dict) -> None:
    """A fine-tuning phase's fields, checked before anything trains."""
    where = f"finetune_phases[{kind!r}]"
    if unknown := set(phase) - {"name", "task", "lr", "steps", "mix", "seconds"}:
        raise ValueError(f"{where}: unknown phase fields {sorted(unknown)}")
    name = phase.get("name")
    if not isinstance(name, str) or not name.isalnum() or name in ("pretrain", "finetune", "eval"):
        raise ValueError(f"{where}: a phase needs a name of letters and digits, not {name!r}")
    if phase.get("task") not in TASKS:
        raise ValueError(f"{where}: {name}'s task must be one of {TASKS}")
    if not phase.get("lr", 0) > 0 or not int(phase.get("steps", 0)) > 0:
        raise ValueError(f"{where}: {name} needs lr > 0 and steps > 0")
    Mix.parse(phase.get("mix", {}))


MIN_TIME_BOX = 60.0  # seconds a training stage gets even when the budget is spent


def spent_seconds(done: dict[str, dict]) -> float:
    """Wall-clock seconds of the finished stages."""
    return sum(v.get("seconds", 0.0) for v in done.values())


def time_box(recipe: DemoRecipe, done: dict[str, dict], stage: str) -> float:
    """Seconds for a backbone's training stage (one of `DemoRecipe.stages`).

    Under a budget, the stage gets its share (`budget_shares`) of what is left: the budget
    less the seconds of the stages done, `eval_minutes` for each evaluation still to run
    and `calibrate_minutes` for each calibration still to run (this stage's too: it runs
    after the box), split over the training stages not yet done; at least MIN_TIME_BOX. The
    recipe's own box for the stage, when set, caps it. 0: no box (every step runs).
    """
    own = recipe.own_seconds(stage)
    if recipe.budget_minutes <= 0:
        return own
    stages = [s for k in recipe.backbones for s in recipe.stages(k)]
    pending = [s for s in stages if s not in done]
    evals = sum(recipe.eval_minutes.get(k, 0) for k in recipe.backbones if f"{k}_eval" not in done)
    calibrations = sum(
        recipe.calibrate_minutes.get(s.split("_", 1)[0], 0) for s in pending if recipe.calibrates(s)
    )
    left = recipe.budget_minutes * 60 - spent_seconds(done) - (evals + calibrations) * 60
    weights = {s: recipe.budget_shares.get(s, 1.0) for s in pending}
    share = weights[stage] / sum(weights.values()) if sum(weights.values()) > 0 else 0.0
    allotted = max(left * share, MIN_TIME_BOX)
    return min(allotted, own) if own > 0 else allotted


class DemoState:
    """Which stages finished, persisted after each one (atomically)."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}

    def run(self, stage: str, fn: Callable[[], dict], log: Callable[[str], None]) -> dict:
        if stage in self.done:
            log(f"[demo] {stage}: done before, skipped")
            return self.done[stage]
        start = time.perf_counter()
        log(f"[demo] {stage}: running")
        result = fn()
        result["seconds"] = round(time.perf_counter() - start, 1)
        self.done[stage] = result
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.done, indent=2))
        os.replace(tmp, self.path)
        log(f"[demo] {stage}: finished in {result['seconds']} s")
        return result


def run_demo(
    work_dir: str | Path,
    store_root: str | Path,
    recipe: DemoRecipe | None = None,
    device: str = "cpu",
    command: str = "vqa train demo",
    log: Callable[[str], None] = print,
) -> dict:
    """Run (or resume) the chain; returns the state: each stage's outputs and seconds."""
    recipe = recipe or DemoRecipe()
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data, features, ckpt = work / "shapes", work / "features", work / "checkpoints"
    state = DemoState(work / "demo_state.json")
    store = ModelStore(store_root)
    (work / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2))

    def data_stage() -> dict:
        for split, n in [
            ("train", recipe.train_images),
            ("val", recipe.val_images),
            ("test", recipe.test_images),
        ]:
            write_split(data, split, n, seed=recipe.seed)
        return {"data_dir": str(data)}

    state.run("data", data_stage, log)
    det = state.run(
        "detector",
        lambda: {
            "ref": run_train_detector(
                data,
                store_root,
                config_overrides=recipe.detector_overrides,
                steps=recipe.detector_steps,
                seed=recipe.seed,
                include_easyvqa=recipe.include_easyvqa,
                device=device,
                command=f"{command} (detector)",
            ).ref
        },
        log,
    )["ref"]
    state.run(
        "detector_eval",
        lambda: run_eval_detector(
            det,
            store_root,
            data,
            easyvqa=recipe.include_easyvqa,
            device=device,
            out=work / "reports",
        ),
        log,
    )
    state.run(
        "features",
        lambda: {
            "files": [
                str(p)
                for p in run_features(
                    det, store_root, data, features, easyvqa=recipe.include_easyvqa, device=device
                )
            ]
        },
        log,
    )
    for kind in recipe.backbones:
        _backbone_stages(
            kind, det, recipe, state, store, data, features, ckpt, device, command, log
        )
    minutes = spent_seconds(state.done) / 60
    budget = f" of a {recipe.budget_minutes:g}-minute budget" if recipe.budget_minutes > 0 else ""
    log(f"[demo] the chain's stages took {minutes:.1f} min{budget}")
    return state.done


def _backbone_stages(
    kind, det, recipe, state, store, data, features, ckpt, device, command, log
) -> None:
    def boxed(stage: str, train: Callable[[float], str]) -> str:
        """Run a training stage under its time box (`time_box`); its store ref."""

        def run() -> dict:
            box = time_box(recipe, state.done, stage)
            log(f"[demo] {stage}: time box {box:.0f} s")
            return {"ref": train(box), "time_box": box}

        return state.run(stage, run, log)["ref"]

    overrides = {**(recipe.backbone_overrides or {}), **recipe.kind_overrides.get(kind, {})}
    pre = boxed(
        f"{kind}_pretrain",
        lambda box: (
            run_pretrain(
                kind,
                features,
                data,
                store.root,
                detector_ref=det,
                out_name=f"shapes-{kind}-pretrained",
                config_overrides=overrides or None,
                steps=recipe.pretrain_steps[kind],
                batch_size=recipe.batch_size,
                lr=recipe.pretrain_lr[kind],
                max_seconds=box,
                seed=recipe.seed,
                checkpoint_dir=str(ckpt / f"{kind}_pretrain"),
                device=device,
                command=f"{command} (pretrain {kind})",
            ).ref
        ),
    )

    def finetune(init: str, name: str, task: str, steps: int, lr: float, mix, box: float) -> str:
        return run_finetune(
            task,
            init,
            features_dir=features,
            data_dir=data,
            store_root=store.root,
            detector_ref=det,
            out_name=f"shapes-{kind}" if name == "finetune" else f"shapes-{kind}-{name}",
            steps=steps,
            batch_size=recipe.batch_size,
            lr=lr,
            max_seconds=box,
            seed=recipe.seed,
            include_easyvqa=recipe.include_easyvqa,
            mix=mix,
            checkpoint_dir=str(ckpt / f"{kind}_{name}"),
            device=device,
            command=f"{command} ({name} {kind})",
        ).ref

    init = pre
    for phase in recipe.finetune_phases.get(kind, []):
        init = boxed(
            f"{kind}_{phase['name']}",
            lambda box, phase=phase, init=init: finetune(
                init,
                phase["name"],
                phase["task"],
                int(phase["steps"]),
                phase["lr"],
                phase.get("mix", {}),
                box,
            ),
        )
    fine = boxed(
        f"{kind}_finetune",
        lambda box: finetune(
            init,
            "finetune",
            "all",
            recipe.finetune_steps[kind],
            recipe.finetune_lr[kind],
            recipe.finetune_mix,
            box,
        ),
    )
    state.run(
        f"{kind}_eval",
        lambda: run_eval(
            fine,
            store.root,
            "all",
            features,
            data,
            gallery_size=recipe.gallery_size,
            align_queries=0,  # the served two-stage search only: the head over every image is slow
            device=device,
            easyvqa=recipe.include_easyvqa,
            seed=recipe.seed,
            out_dir=ckpt.parent / "reports" / kind,
        ),
        log,
    )
