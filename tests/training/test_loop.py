"""The training loop on a toy model: schedule, learning, resume, best-state selection."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from service.training import loop
from service.training.loop import TrainConfig, lr_factor, make_optimizer, train

TRUE_W = torch.tensor([[1.5, -2.0, 0.5, 3.0]])


pytestmark = pytest.mark.usefixtures("one_thread")


def toy_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))


def regression_loss(model: nn.Module, step: int, rng: np.random.Generator) -> dict:
    """A batch drawn from rng (and dropout from torch's generator): y = x W^T + noise."""
    x = torch.from_numpy(rng.standard_normal((16, 4))).float()
    y = x @ TRUE_W.T + 0.01 * torch.from_numpy(rng.standard_normal((16, 1))).float()
    mse = ((model(x) - y) ** 2).mean()
    return {"loss": mse, "mse": mse}


def _states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_lr_schedule_warms_up_then_decays_to_zero():
    factors = [lr_factor(s, 100, 0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(factors[10:], factors[11:], strict=False))
    assert factors[-1] == pytest.approx(1 / 90)
    assert lr_factor(0, 10, 0.0) == 1.0


def test_no_weight_decay_on_biases():
    opt = make_optimizer(toy_model(), TrainConfig(steps=1, batch_size=1, lr=1e-3))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.01 and all(p.ndim == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])


def test_training_lowers_the_loss_and_logs_every_step():
    cfg = TrainConfig(steps=150, batch_size=16, lr=3e-2, progress=False)
    result = train(toy_model(), regression_loss, cfg)
    train_logs = [h for h in result.history if h["kind"] == "train"]
    assert [h["step"] for h in train_logs] == list(range(1, 151))
    first, last = train_logs[0]["mse"], np.mean([h["mse"] for h in train_logs[-10:]])
    assert last < 0.2 * first
    assert result.steps_done == 150 and result.best_metrics == {}


class _Interrupt(Exception):
    pass


def _interrupting(at_step: int):
    def step_loss(model, step, rng):
        if step == at_step:
            raise _Interrupt
        return regression_loss(model, step, rng)

    return step_loss


def peaked_eval(model: nn.Module) -> dict:
    """A function of the weights alone whose score peaks mid-run (validation MSE near 5)."""
    x = torch.from_numpy(np.random.default_rng(99).standard_normal((64, 4))).float()
    mse = float(((model(x) - x @ TRUE_W.T) ** 2).mean())
    return {"score": -abs(mse - 5.0), "val_mse": mse}


@pytest.mark.parametrize("with_eval", [False, True])
def test_resume_gives_the_same_final_state_as_an_uninterrupted_run(tmp_path, with_eval):
    common = dict(steps=40, batch_size=16, lr=3e-2, eval_every=5 if with_eval else 0)
    common["progress"] = False
    evaluate, select = (peaked_eval, "score") if with_eval else (None, None)
    whole = train(toy_model(), regression_loss, TrainConfig(**common), evaluate, select)

    cfg = TrainConfig(**common, checkpoint_every=10, checkpoint_dir=str(tmp_path / "ckpt"))
    with pytest.raises(_Interrupt):
        train(toy_model(), _interrupting(23), cfg, evaluate, select)
    pointer = (tmp_path / "ckpt" / "latest").read_text()
    assert pointer.startswith("step_00000020")
    # a fresh process would start from a fresh model: the checkpoint must restore it all
    resumed = train(toy_model(seed=7), regression_loss, cfg, evaluate, select)

    assert resumed.steps_done == whole.steps_done == 40
    assert _states_equal(resumed.model, whole.model)
    assert resumed.history == whole.history
    assert resumed.best_metrics == whole.best_metrics
    if with_eval:  # the best state predates the interruption: it came from the checkpoint
        best = max((h for h in whole.history if h["kind"] == "eval"), key=lambda h: h["score"])
        assert best["step"] <= 20 and whole.best_metrics["val_mse"] == best["val_mse"]


def test_best_state_is_the_one_evaluated_best(tmp_path):
    snapshots = {}

    def evaluate(model):
        step = len(snapshots) + 1
        snapshots[step] = {k: v.clone() for k, v in model.state_dict().items()}
        return {"score": -abs(step - 2)}

    cfg = TrainConfig(steps=20, batch_size=16, lr=1e-2, eval_every=5, progress=False)
    result = train(toy_model(), regression_loss, cfg, evaluate, select_metric="score")
    assert len(snapshots) == 4 and result.best_metrics == {"score": 0.0}
    state = result.model.state_dict()
    assert all(torch.equal(state[k], snapshots[2][k]) for k in state)
    assert not torch.equal(state["0.weight"], snapshots[4]["0.weight"])


def test_a_finished_run_resumes_to_itself_without_training(tmp_path):
    cfg = TrainConfig(
        steps=12, batch_size=16, lr=1e-2, checkpoint_dir=str(tmp_path), progress=False
    )
    first = train(toy_model(), regression_loss, cfg)

    def must_not_run(model, step, rng):
        raise AssertionError("a finished run trained again")

    again = train(toy_model(seed=3), must_not_run, cfg)
    assert again.steps_done == 12 and _states_equal(again.model, first.model)
    # checkpoints hold safetensors and JSON only, never pickles
    names = {p.name for p in tmp_path.rglob("*") if p.is_file()}
    assert names == {
        "latest",
        "model.safetensors",
        "optimizer.safetensors",
        "rng.safetensors",
        "state.json",
    }
    state = json.loads(next(tmp_path.rglob("state.json")).read_text())
    assert state["step"] == 12 and len(state["history"]) == 12


def test_a_time_box_evaluates_and_checkpoints_on_the_way_not_only_at_its_end(tmp_path, monkeypatch):
    """eval_every / checkpoint_every count in the schedule's position, which a time box's
    clock moves: a box far short of cfg.steps still validates as it goes."""
    steps = 1_000_000
    cfg = TrainConfig(
        steps=steps,
        batch_size=16,
        lr=1e-2,
        progress=False,
        max_seconds=1.5,
        eval_every=steps // 5,
        checkpoint_every=steps // 5,
        checkpoint_dir=str(tmp_path),
    )
    saved = []
    write = loop._checkpoint
    monkeypatch.setattr(loop, "_checkpoint", lambda *a: (saved.append(a[4].step), write(*a)))
    result = train(toy_model(), regression_loss, cfg, evaluate=lambda m: {"x": 1.0})
    eval_steps = [h["step"] for h in result.history if h["kind"] == "eval"]
    assert result.steps_done < steps // 5  # no step count reached the first multiple
    assert len(eval_steps) >= 3 and eval_steps == sorted(set(eval_steps))
    assert eval_steps[-1] == result.steps_done  # ...and the last is at the end, as always
    assert len(saved) >= 3 and saved[-1] == result.steps_done


def test_a_time_box_stops_the_run_and_fits_the_whole_schedule_into_it():
    cfg = TrainConfig(steps=1_000_000, batch_size=16, lr=1e-2, progress=False, max_seconds=0.5)
    result = train(toy_model(), regression_loss, cfg)
    lrs = [h["lr"] for h in result.history]
    assert 10 < result.steps_done < cfg.steps  # stopped by the clock, not the step count
    assert max(lrs) > 0.5 * cfg.lr  # it warmed up inside the box...
    assert lrs[-1] < 0.2 * cfg.lr  # ...and decayed close to zero by its end
