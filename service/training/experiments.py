"""The papers' claim in miniature: docs/experiments/pretraining.md and its plots.

(a) With a fraction (10%) of the VQA training labels, a pretrained backbone against the
    same model fine-tuned from scratch: same fine-tuning steps, seed and labelled images.
(b) ViLBERT with its text stream initialised from the packaged MiniLM (frozen word
    embeddings, `init_text=None`) against a random text stream (`init_text="none"`), both
    pretrained alike, on the test questions and on a paraphrase set whose wordings never
    occur in training (`service.data.paraphrase`).

Runs ("arms"), each fine-tuned on VQA with the same labelled images, steps and seed:

  lxmert_pretrained   LXMERT pretrained (its five objectives, from scratch), fine-tuned
  lxmert_scratch      LXMERT fine-tuned from a random initialisation
  vilbert_minilm      ViLBERT pretrained from a MiniLM text stream, fine-tuned
  vilbert_random      ViLBERT pretrained from a random text stream, fine-tuned
  vilbert_scratch     ViLBERT fine-tuned from a random initialisation

Pretraining reads the training split's captions only (its questions are removed), so a
pretrained model sees no VQA label beyond the labelled fraction (LXMERT's QA objective
then has nothing to train on). Every finished stage is recorded in
<work_dir>/report_state.json, so the same call resumes, and re-renders the report from
the recorded numbers when everything is done.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from service.data.features import FeatureFile
from service.data.language import FAMILIES
from service.data.paraphrase import (
    NEW_WORDS,
    paraphrase_records,
    parse,
    training_texts,
    vocabulary,
)
from service.data.records import load_records, write_records
from service.store import ModelStore
from service.training.demo import DemoState
from service.training.evaluate import eval_vqa, load_model
from service.training.examples import PairSource, feature_path
from service.training.finetune import run_finetune
from service.training.metrics import vqa_accuracy
from service.training.pretrain import run_pretrain

REPORT = "pretraining.md"
BLIND_LABEL = "Blind prior (no image)"
BLIND_NOTE = "the most frequent training answer of each question template"
PLOTS = {
    "family": "pretraining_vqa_by_family.png",
    "paraphrase": "pretraining_paraphrase.png",
    "curves": "pretraining_curves.png",
}


@dataclass(frozen=True)
class Arm:
    name: str
    backbone: str
    label: str
    init_text: str | None = None  # for the pretraining run; ignored without one
    pretrained: bool = True


ARMS = (
    Arm("lxmert_pretrained", "lxmert", "LXMERT pretrained"),
    Arm("lxmert_scratch", "lxmert", "LXMERT from scratch", pretrained=False),
    Arm("vilbert_minilm", "vilbert", "ViLBERT pretrained, MiniLM text", init_text=None),
    Arm("vilbert_random", "vilbert", "ViLBERT pretrained, random text", init_text="none"),
    Arm("vilbert_scratch", "vilbert", "ViLBERT from scratch", pretrained=False),
)


@dataclass
class ReportRecipe:
    """Sizes, steps and time boxes. The defaults take about 42 minutes on one thread of the
    2-core CPU they were measured on; the time boxes cap the training at 47."""

    label_fraction: float = 0.1
    seed: int = 0
    batch_size: int = 32
    backbones: tuple[str, ...] = ("lxmert", "vilbert")
    pretrain_steps: dict[str, int] = field(default_factory=lambda: {"lxmert": 600, "vilbert": 150})
    pretrain_lr: dict[str, float] = field(default_factory=lambda: {"lxmert": 5e-4, "vilbert": 2e-4})
    pretrain_seconds: dict[str, float] = field(
        default_factory=lambda: {"lxmert": 390, "vilbert": 290}
    )
    finetune_steps: dict[str, int] = field(default_factory=lambda: {"lxmert": 900, "vilbert": 350})
    finetune_lr: dict[str, float] = field(default_factory=lambda: {"lxmert": 3e-4, "vilbert": 1e-4})
    finetune_seconds: dict[str, float] = field(
        default_factory=lambda: {"lxmert": 400, "vilbert": 350}
    )
    val_images: int = 30  # validation (best-state selection) during fine-tuning
    eval_images: int = 500  # the first test images; every question of each is asked
    text_init: str | None = None  # the MiniLM arm's text stream: None = packaged MiniLM
    config_overrides: dict[str, dict] = field(default_factory=dict)  # tests shrink models

    def arms(self) -> list[Arm]:
        out = []
        for arm in ARMS:
            if arm.backbone in self.backbones:
                text = self.text_init if arm.name == "vilbert_minilm" else arm.init_text
                out.append(Arm(arm.name, arm.backbone, arm.label, text, arm.pretrained))
        return out

    def max_seconds(self) -> float:
        """The sum of the training time boxes (evaluation comes on top)."""
        total = 0.0
        for arm in self.arms():
            total += self.finetune_seconds.get(arm.backbone, 0)
            total += self.pretrain_seconds.get(arm.backbone, 0) if arm.pretrained else 0
        return total


# ---- the run ------------------------------------------------------------------------------


def run_pretraining_report(
    data_dir: str | Path,
    features_dir: str | Path,
    work_dir: str | Path,
    out_dir: str | Path = "docs/experiments",
    recipe: ReportRecipe | None = None,
    command: str = "",
    log: Callable[[str], None] = print,
) -> Path:
    """Run (or resume) the experiment and write <out_dir>/pretraining.md; returns its path.

    data_dir holds the shapes world's {train,val,test}.jsonl, features_dir the region
    features of the same splits; models go into <work_dir>/store (never the shipped
    model_store), the captions-only and paraphrase texts into work_dir.
    """
    recipe = recipe or ReportRecipe()
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    _check_recipe(work / "recipe.json", recipe)
    state = DemoState(work / "report_state.json")
    store = ModelStore(work / "store")
    started = time.perf_counter()
    state.run("data", lambda: _prepare_texts(data_dir, work, recipe.seed), log)
    test = _test_sources(data_dir, features_dir, work)
    state.run("blind_prior", lambda: _blind_prior(data_dir, test, recipe.eval_images), log)
    for arm in recipe.arms():
        _arm_stages(arm, recipe, state, store, data_dir, features_dir, work, test, command, log)
    env = _environment(time.perf_counter() - started)
    env["detector"] = test["test"].features.meta.get("detector")
    path = write_report(state.done, recipe, out_dir, store, command, env)
    log(f"[report] wrote {path}")
    return path


def _check_recipe(path: Path, recipe: ReportRecipe) -> None:
    """A work folder belongs to one recipe: resuming with another would mix results."""
    mine = json.loads(json.dumps(asdict(recipe)))
    if path.is_file() and json.loads(path.read_text()) != mine:
        raise ValueError(f"{path.parent} holds a run of another recipe; use a fresh work_dir")
    path.write_text(json.dumps(mine, indent=2) + "\n")


def _prepare_texts(data_dir: str | Path, work: Path, seed: int) -> dict:
    """Captions-only training texts for pretraining, and the paraphrased test split."""
    train = load_records(data_dir, "train")
    test = load_records(data_dir, "test")
    write_records(work / "captions" / "train.jsonl", [{**r, "questions": []} for r in train])
    para = paraphrase_records(test, train, seed=seed)
    write_records(work / "paraphrase" / "test.jsonl", para)
    return {
        "train_images": len(train),
        "train_questions": sum(len(r["questions"]) for r in train),
        "test_images": len(test),
        "paraphrased_questions": sum(len(r["questions"]) for r in para),
        "train_vocabulary": len(vocabulary(training_texts(train))),
        "new_words": sorted(NEW_WORDS),
        "examples": [
            {"original": q["original"], "paraphrase": q["question"], "answer": q["answer"]}
            for r in para[:4]
            for q in r["questions"][:2]
        ],
    }


def _test_sources(data_dir, features_dir, work: Path) -> dict[str, PairSource]:
    features = FeatureFile(feature_path(features_dir, "test"))
    return {
        "test": PairSource(load_records(data_dir, "test"), features),
        "paraphrase": PairSource(load_records(work / "paraphrase", "test"), features),
    }


def _arm_stages(arm, recipe, state, store, data_dir, features_dir, work, test, command, log):
    kind = arm.backbone
    overrides = recipe.config_overrides.get(kind)
    init = "none"
    if arm.pretrained:
        init = state.run(
            f"{arm.name}_pretrain",
            lambda: _trained(
                run_pretrain(
                    kind,
                    features_dir,
                    work / "captions",
                    store.root,
                    out_name=f"{arm.name}-pretrained",
                    config_overrides=overrides,
                    steps=recipe.pretrain_steps[kind],
                    batch_size=recipe.batch_size,
                    lr=recipe.pretrain_lr[kind],
                    seed=recipe.seed,
                    init_text=arm.init_text,
                    command=f"{command} (pretrain {arm.name})",
                    progress=False,
                    max_seconds=recipe.pretrain_seconds.get(kind, 0),
                )
            ),
            log,
        )["ref"]
    fine = state.run(
        f"{arm.name}_finetune",
        lambda: _trained(
            run_finetune(
                "vqa",
                init,
                backbone=kind,
                features_dir=features_dir,
                data_dir=data_dir,
                store_root=store.root,
                out_name=arm.name,
                steps=recipe.finetune_steps[kind],
                batch_size=recipe.batch_size,
                lr=recipe.finetune_lr[kind],
                seed=recipe.seed,
                label_fraction=recipe.label_fraction,
                config_overrides=overrides if init == "none" else None,
                command=f"{command} (finetune {arm.name})",
                val_images=recipe.val_images,
                progress=False,
                max_seconds=recipe.finetune_seconds.get(kind, 0),
            )
        ),
        log,
    )["ref"]
    state.run(f"{arm.name}_eval", lambda: _evaluate(store, fine, test, recipe.eval_images), log)


def _blind_prior(data_dir, sources: dict[str, PairSource], images: int) -> dict:
    """Answering without the image: the most frequent training answer of each question
    template kind (`paraphrase.parse`), on the questions the models are tested on."""
    prior: dict[str, Counter] = defaultdict(Counter)
    for r in load_records(data_dir, "train"):
        for q in r["questions"]:
            prior[parse(q["question"])[0]][q["answer"]] += 1
    source = sources["test"]
    chosen = [i for i in range(len(source)) if source.questions(i)][:images]
    questions = [q for i in chosen for q in source.questions(i)]
    pred = [prior[parse(q["question"])[0]].most_common(1)[0][0] for q in questions]
    gold, fams = [q["answer"] for q in questions], [q["family"] for q in questions]
    present = [f for f in FAMILIES if f in set(fams)]
    return {"test": vqa_accuracy(pred, gold, fams, all_families=present)}


def _trained(manifest) -> dict:
    data = manifest.data
    return {
        "ref": manifest.ref,
        "steps": data["steps"],
        "steps_done": data["steps_done"],
        "lr": data["lr"],
        "batch_size": data["batch_size"],
        "vqa_images": data.get("vqa_images"),
        "metrics": manifest.metrics,
    }


def _evaluate(store: ModelStore, ref: str, sources: dict[str, PairSource], images: int) -> dict:
    model, tokenizer = load_model(store, store.resolve(ref))
    answers = list(store.resolve(ref).answers)
    out = {
        name: eval_vqa(model, tokenizer, answers, s, max_images=images)
        for name, s in sources.items()
    }
    out["parameters"] = sum(p.numel() for p in model.parameters())
    return out


def _environment(seconds: float) -> dict:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "this_call_seconds": round(seconds, 1),
    }


# ---- the report ---------------------------------------------------------------------------


def _ci(p: float | None, n: int) -> float:
    """Half-width of the normal 95% interval of an accuracy p measured on n questions."""
    return 1.96 * math.sqrt(p * (1 - p) / n) if p is not None and n else float("nan")


def _pct(p: float | None) -> str:
    return "n/a" if p is None else f"{100 * p:.1f}"


def _delta(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None else f"{100 * (a - b):+.1f}"


def _verdict(a: dict, b: dict) -> str:
    """How a's accuracy compares with b's, against the sampling noise of both."""
    d = a["overall"] - b["overall"]
    noise = math.hypot(_ci(a["overall"], a["count"]), _ci(b["overall"], b["count"]))
    if abs(d) <= noise:
        return f"{100 * d:+.1f} points, within the noise (±{100 * noise:.1f})"
    word = "better" if d > 0 else "worse"
    return f"{100 * d:+.1f} points ({word}; noise ±{100 * noise:.1f})"


def write_report(
    done: dict, recipe: ReportRecipe, out_dir, store: ModelStore, command: str, env: dict
) -> Path:
    """pretraining.md, its plots and pretraining.json (every recorded number) in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arms = [a for a in recipe.arms() if f"{a.name}_eval" in done]
    evals = {a.name: done[f"{a.name}_eval"] for a in arms}
    histories = {a.name: _history(store, done[f"{a.name}_finetune"]["ref"]) for a in arms}
    blind = done.get("blind_prior", {}).get("test")
    plot_families(arms, evals, out / PLOTS["family"], blind)
    plot_paraphrase(arms, evals, out / PLOTS["paraphrase"])
    plot_curves(arms, histories, out / PLOTS["curves"])
    raw = {"recipe": asdict(recipe), "command": command, "environment": env, "stages": done}
    (out / "pretraining.json").write_text(json.dumps(raw, indent=2) + "\n")
    path = out / REPORT
    kept = {a.name: _kept_step(histories[a.name]) for a in arms}
    path.write_text(_markdown(done, recipe, arms, evals, kept, command, env))
    return path


def _history(store: ModelStore, ref: str) -> list[dict]:
    manifest = store.resolve(ref)
    return json.loads(store.file_path(manifest, "history.json").read_text())


def _kept_step(history: list[dict]) -> int | None:
    """The step whose validation score fine-tuning kept (the first best, as the loop)."""
    evals = [h for h in history if h["kind"] == "eval" and "score" in h]
    if not evals:
        return None
    best = max(h["score"] for h in evals)
    return next(h["step"] for h in evals if h["score"] == best)


def _markdown(done, recipe, arms, evals, kept, command, env) -> str:
    data = done["data"]
    by_name = {a.name: a for a in arms}
    first = next(iter(evals.values()))
    n_test, n_para = first["test"]["count"], first["paraphrase"]["count"]
    labelled = done[f"{arms[0].name}_finetune"]["vqa_images"]
    frac = f"{100 * recipe.label_fraction:g}%"
    lines = [
        "# Pretraining in miniature: does it help, and do pretrained words read new wordings?",
        "",
        "Generated by `run_pretraining_report` (service/training/experiments.py); rerun with",
        "",
        f"    {command or 'python -m service.training.experiments'}",
        "",
        "The claim of both papers (issue 6 §7): pretraining pays when labels are scarce (a),",
        "and ViLBERT's text stream starting from a pretrained BERT helps it understand",
        "language (b). Here both are measured at toy scale on the shapes world. What follows",
        "is what was measured, whichever way it fell.",
        "",
        "## Setup",
        "",
        f"- Data: shapes world, {data['train_images']} training images "
        f"({data['train_questions']} questions). Fine-tuning sees "
        f"{frac} of the labelled images "
        f"({labelled[0] if labelled else '?'} images, drawn with seed {recipe.seed}, the same "
        "images for every run). Pretraining reads the captions of all training images and "
        f"no question, so no pretrained model sees a VQA label outside that {frac} "
        "(LXMERT's image-QA pretraining objective is therefore idle here).",
        f"- Test: the first {recipe.eval_images} test images, {n_test} questions (of "
        f"{data['test_images']} images); the paraphrase set asks the same {n_para} questions "
        "reworded (answers unchanged). Region features of every split come from the "
        f"same detector ({env['detector']}).",
        f"- Seed {recipe.seed} everywhere; batch {recipe.batch_size}; AdamW, 5% warm-up, linear "
        "decay, clip 1.0; fine-tuning keeps the state with the best accuracy on "
        f"{recipe.val_images} validation images (checked 5 times).",
        f"- Machine: {env['cpu']}, {env['cpu_count']} cores shared with other jobs; torch "
        f"{env['torch']} with {env['torch_threads']} thread(s). Every run has a time box "
        f"(sum {recipe.max_seconds() / 60:.0f} min); steps done are listed below. All stages, "
        f"evaluation included, took {_total_seconds(done) / 60:.0f} min.",
        "",
        "### Runs",
        "",
        "| run | backbone | parameters | pretraining steps (done/planned), s | "
        "fine-tuning steps (done/planned), s | state kept (best validation) | fine-tuning lr |",
        "|---|---|---:|---|---|---:|---:|",
    ]
    for a in arms:
        pre = done.get(f"{a.name}_pretrain")
        fine = done[f"{a.name}_finetune"]
        pre_cell = (
            f"{pre['steps_done']}/{pre['steps']}, {pre['seconds']:.0f} s (lr {pre['lr']:g}; "
            f"final loss {pre['metrics'].get('final_loss', float('nan')):.2f})"
            if pre
            else "none"
        )
        lines.append(
            f"| {a.label} | {a.backbone} | {evals[a.name]['parameters'] / 1e6:.1f} M | "
            f"{pre_cell} | {fine['steps_done']}/{fine['steps']}, {fine['seconds']:.0f} s | "
            f"step {kept[a.name]} | {fine['lr']:g} |"
        )
    blind = done.get("blind_prior")
    lines += ["", *_part_a(arms, by_name, evals, frac, blind), "", *_part_b(by_name, evals, data)]
    findings = [*_findings_a(by_name, evals, blind), *_findings_b(by_name, evals)]
    findings += _cut_short(arms, done)
    at = lines.index("## Setup")
    lines[at:at] = ["## Findings", "", *findings, ""]
    lines += ["", *_limits(env, data)]
    return "\n".join(lines) + "\n"


def _family_table(arms, evals, split: str, extra: dict | None = None) -> list[str]:
    """Overall and per-family accuracy of each run; `extra` adds label -> result rows."""
    fams = [f for f in FAMILIES if f in evals[arms[0].name][split]["by_family"]]
    head = "| run | overall (±95%) | " + " | ".join(fams) + " |"
    rows = [head, "|---|---:|" + "---:|" * len(fams)]
    results = [(a.label, evals[a.name][split]) for a in arms] + list((extra or {}).items())
    for label, r in results:
        cells = [_pct(r["by_family"][f]) for f in fams]
        ci = 100 * _ci(r["overall"], r["count"])
        rows.append(f"| {label} | {_pct(r['overall'])} ± {ci:.1f} | " + " | ".join(cells) + " |")
    return rows


def _part_a(arms, by_name, evals, frac: str, blind: dict | None) -> list[str]:
    extra = {BLIND_LABEL: blind["test"]} if blind else None
    lines = [
        f"## (a) Pretrained against from scratch, with {frac} of the labels",
        "",
        f"VQA accuracy (%) on the test questions, overall and per family. ![]({PLOTS['family']})",
        "",
        *_family_table([a for a in arms if a.name != "vilbert_random"], evals, "test", extra),
        "",
        f"The last row answers without looking at the image ({BLIND_NOTE}): a run near it "
        "has learnt the answer priors of the questions, not yet to read the image.",
        "",
    ]
    lines += [*_findings_a(by_name, evals, blind), ""]
    lines += [f"Fine-tuning curves (VQA loss; validation accuracy): ![]({PLOTS['curves']})"]
    return lines


def _findings_a(by_name, evals, blind: dict | None) -> list[str]:
    lines = []
    for pre, scratch in (
        ("lxmert_pretrained", "lxmert_scratch"),
        ("vilbert_minilm", "vilbert_scratch"),
    ):
        if pre in evals and scratch in evals:
            lines.append(
                f"- (a) {by_name[pre].label} against {by_name[scratch].label}: "
                f"{_verdict(evals[pre]['test'], evals[scratch]['test'])}."
            )
    if blind:
        prior = blind["test"]["overall"]
        gains = [
            f"{by_name[n].label} {_delta(e['test']['overall'], prior)}" for n, e in evals.items()
        ]
        lines.append(f"- (a) Points above the blind prior ({_pct(prior)}%): {'; '.join(gains)}.")
    return lines


def _findings_b(by_name, evals) -> list[str]:
    if not {"vilbert_minilm", "vilbert_random"} <= set(evals):
        return []
    m, r = evals["vilbert_minilm"], evals["vilbert_random"]
    drops = [
        f"{by_name[n].label} {_delta(e['paraphrase']['overall'], e['test']['overall'])}"
        for n, e in evals.items()
    ]
    return [
        "- (b) On paraphrases, MiniLM text against random text: "
        f"{_verdict(m['paraphrase'], r['paraphrase'])}.",
        f"- (b) On the ordinary test questions: {_verdict(m['test'], r['test'])}.",
        f"- (b) Paraphrase minus test accuracy, in points: {'; '.join(drops)}.",
    ]


def _cut_short(arms, done) -> list[str]:
    """A line naming the runs whose time box stopped them before their planned steps."""
    short = [
        f"{a.label} {stage} {done[f'{a.name}_{stage}']['steps_done']}/"
        f"{done[f'{a.name}_{stage}']['steps']}"
        for a in arms
        for stage in ("pretrain", "finetune")
        if f"{a.name}_{stage}" in done
        and done[f"{a.name}_{stage}"]["steps_done"] < done[f"{a.name}_{stage}"]["steps"]
    ]
    if not short:
        return ["- Every run did all its planned steps."]
    return [f"- Stopped by their time box before the planned steps: {'; '.join(short)}."]


def _part_b(by_name, evals, data) -> list[str]:
    names = [n for n in ("vilbert_minilm", "vilbert_random", "vilbert_scratch") if n in evals]
    if not names:
        return ["## (b) not run: ViLBERT was left out of this recipe"]
    arms = [by_name[n] for n in names]
    lines = [
        "## (b) ViLBERT's text stream: MiniLM against random initialisation",
        "",
        "Both pretrained with the same recipe (planned steps, seed, captions); MiniLM's word "
        "embeddings stay frozen as the shipped models have them, the random ones train. "
        "The paraphrase set "
        "rewrites every test question with words that occur nowhere in the training texts "
        f"({', '.join(data['new_words'])}); `service.data.paraphrase` checks that, and "
        "that no paraphrase is a training text. Examples:",
        "",
        "| test question | paraphrase | answer |",
        "|---|---|---|",
        *[f"| {e['original']} | {e['paraphrase']} | {e['answer']} |" for e in data["examples"]],
        "",
        f"![]({PLOTS['paraphrase']})",
        "",
        "| run | test (±95%) | paraphrase (±95%) | paraphrase − test |",
        "|---|---:|---:|---:|",
    ]
    others = [a for a in by_name.values() if a.name not in names]
    for a in arms + others:
        t, p = evals[a.name]["test"], evals[a.name]["paraphrase"]
        lines.append(
            f"| {a.label} | {_pct(t['overall'])} ± {100 * _ci(t['overall'], t['count']):.1f} | "
            f"{_pct(p['overall'])} ± {100 * _ci(p['overall'], p['count']):.1f} | "
            f"{_delta(p['overall'], t['overall'])} |"
        )
    lines += [
        "",
        "Paraphrase accuracy (%) per family:",
        "",
        *_family_table(arms, evals, "paraphrase"),
    ]
    if findings := _findings_b(by_name, evals):
        lines += ["", *findings]
    return lines


def _limits(env: dict, data: dict) -> list[str]:
    return [
        "## Limits",
        "",
        "- Tiny scale: a few hundred optimizer steps on a shared CPU "
        f"({env['torch_threads']} torch thread(s)), against the papers' millions of pairs "
        "on GPUs; absolute accuracies are far below the shipped models' "
        "(trained much longer on a GPU, docs/experiments/shapes-*/).",
        "- One seed per run: the ± columns are the sampling noise of the test questions "
        "only, not the spread across training seeds, which may be larger.",
        "- Time boxes: a run that is slower than planned stops before its planned steps "
        "(see Runs and Findings), its learning-rate schedule ending with the clock. The "
        "random-text and from-scratch ViLBERT runs also train the 30,522-word embedding "
        "table that the MiniLM runs keep frozen, so each of their steps costs more.",
        "- The shapes world's language is a small template grammar "
        f"({data['train_vocabulary']} distinct words in the training texts); the "
        "paraphrases are template rewrites too, so (b) measures word-level transfer, not "
        "open-ended language understanding.",
        "- Same fine-tuning, not the same compute: the pretrained runs spent their "
        "pretraining time on top (see Runs).",
        "- Fine-tuning keeps the state with the best of its five validation checks on a few "
        "validation images, as the shipped recipe does; with so small a validation set that "
        "choice is noisy, and the kept step differs between runs (see Runs).",
    ]


def _total_seconds(done: dict) -> float:
    return sum(stage.get("seconds", 0.0) for stage in done.values())


# ---- plots ----------------------------------------------------------------------------------


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _bars(ax, groups: list[str], series: dict[str, list[float | None]]) -> None:
    """Grouped bars: one group per x label, one bar per series, in %."""
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for k, (label, values) in enumerate(series.items()):
        heights = [100 * v if v is not None else 0.0 for v in values]
        ax.bar(x + (k - (len(series) - 1) / 2) * width, heights, width, label=label)
    ax.set_xticks(x, groups, fontsize=8)
    ax.set_ylim(0, 125)  # headroom for the legend above the bars
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=7, loc="upper left", ncol=2)


def plot_families(arms: list[Arm], evals: dict, path: Path, blind: dict | None = None) -> Path:
    """Per backbone: test accuracy per family (and overall) of its runs, with the blind
    prior's accuracy marked."""
    backbones = list(dict.fromkeys(a.backbone for a in arms))
    fig = Figure(figsize=(6 * len(backbones), 3.8), dpi=110)
    for ax, kind in zip(np.atleast_1d(fig.subplots(1, len(backbones))), backbones, strict=True):
        mine = [a for a in arms if a.backbone == kind]
        fams = [f for f in FAMILIES if f in evals[mine[0].name]["test"]["by_family"]]
        series = {
            a.label: [evals[a.name]["test"]["overall"]]
            + [evals[a.name]["test"]["by_family"][f] for f in fams]
            for a in mine
        }
        if blind:
            prior = [blind["overall"]] + [blind["by_family"].get(f) for f in fams]
            ax.scatter(
                np.arange(len(prior)),
                [100 * v if v is not None else np.nan for v in prior],
                marker="_",
                s=600,
                color="black",
                zorder=3,
                label="blind prior",
            )
        _bars(ax, ["overall", *fams], series)
        ax.set_title(f"{kind}: test accuracy after fine-tuning", fontsize=10)
    return _save(fig, path)


def plot_paraphrase(arms: list[Arm], evals: dict, path: Path) -> Path:
    """Every run: overall accuracy on the test questions and on their paraphrases."""
    fig = Figure(figsize=(max(6, 1.6 * len(arms) + 2), 3.8), dpi=110)
    ax = fig.add_subplot()
    series = {
        split: [evals[a.name][split]["overall"] for a in arms] for split in ("test", "paraphrase")
    }
    _bars(ax, [a.label.replace(", ", ",\n") for a in arms], series)
    ax.set_title("test questions against paraphrases with unseen words", fontsize=10)
    return _save(fig, path)


def _smooth(values: list[float], window: int) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(v) < window:
        return v
    return np.convolve(v, np.ones(window) / window, mode="valid")


def plot_curves(arms: list[Arm], histories: dict[str, list[dict]], path: Path) -> Path:
    """Fine-tuning VQA loss (moving mean) and validation accuracy of every run."""
    fig = Figure(figsize=(11, 3.8), dpi=110)
    ax_loss, ax_val = fig.subplots(1, 2)
    for a in arms:
        train = [h for h in histories[a.name] if h["kind"] == "train"]
        window = max(1, len(train) // 20)
        loss = _smooth([h["loss"] for h in train], window)
        steps = [h["step"] for h in train][len(train) - len(loss) :]
        ax_loss.plot(steps, loss, label=a.label, linewidth=1.2)
        evals = [h for h in histories[a.name] if h["kind"] == "eval" and "vqa_accuracy" in h]
        if evals:
            ax_val.plot(
                [h["step"] for h in evals],
                [100 * h["vqa_accuracy"] for h in evals],
                marker="o",
                markersize=3,
                label=a.label,
            )
    ax_loss.set_xlabel("fine-tuning step")
    ax_loss.set_ylabel("VQA loss (moving mean)")
    ax_loss.set_yscale("log")
    ax_loss.legend(fontsize=7)
    ax_val.set_xlabel("fine-tuning step")
    ax_val.set_ylabel("validation accuracy (%)")
    if ax_val.lines:
        ax_val.legend(fontsize=7)
    return _save(fig, path)


# ---- command line ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """python -m service.training.experiments --data ... --features ... --work ... --out ..."""
    import argparse
    import sys

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/shapes", help="shapes-world data folder")
    p.add_argument("--features", default="data/features", help="region features folder")
    p.add_argument("--work", default="data/pretraining-report", help="store, texts, state")
    p.add_argument("--out", default="docs/experiments", help="where pretraining.md goes")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the budget assumes 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python -m service.training.experiments " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    run_pretraining_report(args.data, args.features, args.work, args.out, command=command)


if __name__ == "__main__":
    main()
