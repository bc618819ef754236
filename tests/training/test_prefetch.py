"""Batch prefetch in the training loop: the same batches in the same order, overlap, resume
and errors, on a toy model and on tiny fine-tuning and pretraining runs."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from service.data.tokenizer import load_tokenizer
from service.models.backbone import build_backbone
from service.training.examples import PairSource
from service.training.finetune import make_objectives, make_step_loss
from service.training.loop import TrainConfig, train
from service.training.pretrain import PretrainData, build_pretrain_model, pretrain_step_loss
from tests.training.pretrain_support import tiny_overrides, write_tiny_split
from tests.training.test_loop import _states_equal, regression_loss, toy_model

pytestmark = pytest.mark.usefixtures("one_thread")


class SplitRegression:
    """test_loop's regression_loss in two halves; records who prepared what, and when."""

    def __init__(self, fail_at: int | None = None, interrupt_at: int | None = None):
        self.fail_at, self.interrupt_at = fail_at, interrupt_at
        self.prepared_by: dict[int, str] = {}
        self.started: dict[int, threading.Event] = {}
        self.overlapped: list[int] = []  # steps whose run saw step + 1 being prepared

    def _event(self, step: int) -> threading.Event:
        return self.started.setdefault(step, threading.Event())

    def prepare(self, step: int, rng: np.random.Generator, device) -> tuple:
        self._event(step).set()
        self.prepared_by[step] = threading.current_thread().name
        if step == self.fail_at:
            raise _PrepareFailed(f"no batch for step {step}")
        x = torch.from_numpy(rng.standard_normal((16, 4))).float()
        noise = torch.from_numpy(rng.standard_normal((16, 1))).float()
        return step, x.to(device), noise.to(device)

    def run(self, model, prepared: tuple) -> dict:
        step, x, noise = prepared
        if step == self.interrupt_at:
            raise _Interrupt
        if self._event(step + 1).wait(timeout=0.5):
            self.overlapped.append(step)
        y = x @ torch.tensor([[1.5, -2.0, 0.5, 3.0]]).T + 0.01 * noise
        mse = ((model(x) - y) ** 2).mean()
        return {"loss": mse, "mse": mse}

    def __call__(self, model, step: int, rng: np.random.Generator) -> dict:
        return self.run(model, self.prepare(step, rng, "cpu"))


class _PrepareFailed(Exception):
    pass


class _Interrupt(Exception):
    pass


def _prefetch_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("prefetch")]


# ---- the toy model ------------------------------------------------------------------------


def test_prefetch_draws_the_plain_step_losss_batches_and_overlaps_the_steps():
    cfg = TrainConfig(steps=8, batch_size=16, lr=3e-2, progress=False, prefetch=True)
    plain = train(toy_model(), regression_loss, cfg)  # no prepare: samples inline
    split = SplitRegression()
    fetched = train(toy_model(), split, cfg)

    assert fetched.history == plain.history and _states_equal(fetched.model, plain.model)
    assert set(split.prepared_by) == set(range(8))  # nothing prepared past the last step
    assert all(name.startswith("prefetch") for name in split.prepared_by.values())
    assert split.overlapped == list(range(7))  # step s+1 was being prepared while s ran
    assert _prefetch_threads() == []


@pytest.mark.parametrize("prefetch", [False, None])  # None: a GPU only; this is a CPU
def test_without_prefetch_the_split_step_loss_runs_inline(prefetch):
    cfg = TrainConfig(steps=4, batch_size=16, lr=3e-2, progress=False, prefetch=prefetch)
    split = SplitRegression()
    train(toy_model(), split, cfg)
    assert set(split.prepared_by.values()) == {threading.current_thread().name}
    assert split.overlapped == []


@pytest.mark.parametrize("with_eval", [False, True])
def test_resume_with_prefetch_equals_the_uninterrupted_run(tmp_path, with_eval):
    common = dict(steps=20, batch_size=16, lr=3e-2, progress=False)
    common["eval_every"] = 3 if with_eval else 0
    evaluate = (lambda m: {"w": float(m[0].weight.sum())}) if with_eval else None
    whole = train(toy_model(), regression_loss, TrainConfig(**common, prefetch=False), evaluate)

    cfg = TrainConfig(**common, checkpoint_every=5, checkpoint_dir=str(tmp_path), prefetch=True)
    with pytest.raises(_Interrupt):  # step 12 fails after steps 12 and 13 were drawn
        train(toy_model(), SplitRegression(interrupt_at=12), cfg, evaluate)
    assert (tmp_path / "latest").read_text().startswith("step_00000010")
    resumed = train(toy_model(seed=5), SplitRegression(), cfg, evaluate)

    assert resumed.history == whole.history
    assert _states_equal(resumed.model, whole.model)


def test_a_time_box_leaves_the_prefetched_batch_to_the_resumed_run(tmp_path):
    """Stopped by the clock with step s+1 prepared: the checkpoint must hold the rng
    state from before that batch, so the next run draws it again."""
    cfg = TrainConfig(
        steps=10**6, batch_size=16, lr=1e-2, progress=False, max_seconds=0.2,
        checkpoint_dir=str(tmp_path), prefetch=True,
    )  # fmt: skip
    split = SplitRegression()
    boxed = train(toy_model(), split, cfg)
    done = boxed.steps_done
    assert done in split.prepared_by and _prefetch_threads() == []  # drawn, unused

    def first_batch(model, step, rng):
        first_batch.x = rng.standard_normal((16, 4))
        raise _Interrupt

    with pytest.raises(_Interrupt):
        train(toy_model(), first_batch, cfg)
    again = SplitRegression()
    rng = np.random.default_rng(0)
    for step in range(done + 1):
        x, _ = again.prepare(step, rng, "cpu")[1:]
    assert np.allclose(first_batch.x, x.numpy())


def test_an_error_in_prepare_is_raised_by_train_and_the_thread_stops():
    cfg = TrainConfig(steps=10, batch_size=16, lr=1e-2, progress=False, prefetch=True)
    split = SplitRegression(fail_at=4)
    with pytest.raises(_PrepareFailed, match="step 4"):
        train(toy_model(), split, cfg)
    assert max(split.prepared_by) == 4 and _prefetch_threads() == []


# ---- fine-tuning and pretraining ----------------------------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> PairSource:
    data_dir, features_dir = write_tiny_split(tmp_path_factory.mktemp("prefetch"), n=16)
    return PairSource.load(data_dir, features_dir, "train")


def _finetune_all_run(source: PairSource, prefetch: bool):
    objectives = make_objectives("all", source, load_tokenizer())
    config = {**tiny_overrides("vilbert"), "hidden_dropout_prob": 0.1}  # torch draws too
    torch.manual_seed(0)
    model = build_backbone("vilbert", config)
    cfg = TrainConfig(steps=6, batch_size=4, lr=1e-3, progress=False, prefetch=prefetch)
    return train(model, make_step_loss(objectives, 4), cfg)


def test_finetune_all_is_the_same_with_and_without_prefetch(source):
    on, off = _finetune_all_run(source, True), _finetune_all_run(source, False)
    assert [h.keys() - {"kind", "step", "lr", "loss"} for h in on.history[:3]] == [
        {"vqa"},
        {"match", "nce"},
        {"ground"},
    ]
    assert on.history == off.history
    assert _states_equal(on.model, off.model)


def test_pretraining_is_the_same_with_and_without_prefetch(source):
    def run(prefetch: bool):
        model, _ = build_pretrain_model("lxmert", source, tiny_overrides("lxmert"), 0, "none")
        data = PretrainData("lxmert", source, load_tokenizer())
        cfg = TrainConfig(steps=4, batch_size=4, lr=1e-3, progress=False, prefetch=prefetch)
        return train(model, pretrain_step_loss(data, 4), cfg)

    on, off = run(True), run(False)
    assert on.history == off.history and _states_equal(on.model, off.model)
    assert all(h["mlm"] > 0 for h in on.history)
