"""The one training loop: AdamW, warm-up and linear decay, clipping, eval, resume, DDP.

Every objective (pretraining, fine-tuning) is a `step_loss(model, step, rng)` that
samples its own batch from `rng` and returns {"loss": total, **parts}; `train` does the
rest. Both papers train this way: AdamW (BERT's Adam with decoupled weight decay, none on
biases and LayerNorm weights), linear warm-up then linear decay, gradient clipping.

Resume: with `checkpoint_dir`, every `checkpoint_every` steps and at the end the loop
writes model and optimizer tensors (safetensors), the torch and numpy generator states
and its own bookkeeping (JSON) into `<checkpoint_dir>/step_<n>/` and then points
`<checkpoint_dir>/latest` at it. A later `train` with the same arguments starts from
there and ends in the same state as a run that was never interrupted. Nothing is pickled.

Multi-process: under torchrun (torch.distributed initialised; gloo on CPU, nccl on
GPU) the loop wraps the model in DistributedDataParallel, seeds each rank's `rng` with
seed + rank so the ranks sample different batches (the global batch is batch_size x
world size), and only rank 0 shows progress and writes checkpoints.

Prefetch: a step_loss may come in two halves, `prepare(step, rng, device) -> prepared`
(every draw from rng, tokenising, masking, collating, the copy to `device`: nothing that
needs the model) and `run(model, prepared) -> {"loss", ...}` (forward and loss). Then,
with cfg.prefetch (default: on a GPU only), one background thread prepares step s+1
while step s runs, so that a step costs max(prepare, compute) rather than their sum.
That thread alone draws from `rng`, in step order, so the batches are the ones drawn
without prefetch; a checkpoint holds the rng state from before the prepared-but-unused
batch was drawn. Prepare must draw from `rng` only (not from torch's global generator,
which dropout uses meanwhile).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

StepLoss = Callable[[nn.Module, int, np.random.Generator], dict[str, Tensor]]
Evaluate = Callable[[nn.Module], dict[str, float]]
LATEST = "latest"  # file naming the newest complete checkpoint folder


@dataclass
class TrainConfig:
    """How to train; `batch_size` is per process and is read by the step_loss."""

    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.01
    warmup_frac: float = 0.05
    clip_norm: float = 1.0  # 0 = no clipping
    seed: int = 0
    # in steps, or under a time box in the clock's share of `steps` (see _crossed)
    eval_every: int = 0  # 0 = evaluate only at the end (when `evaluate` is given)
    checkpoint_every: int = 0  # 0 = checkpoint only at the end (when checkpoint_dir is set)
    checkpoint_dir: str | None = None
    device: str = "cpu"
    progress: bool = True
    max_seconds: float = 0  # > 0: a time box; the schedule and the stop follow the clock
    # prepare the next batch in a background thread (see module doc); None: on a GPU only,
    # since on a CPU the preparation and the step share the same few cores
    prefetch: bool | None = None


@dataclass
class TrainResult:
    """The trained model (holding the best state when a select_metric was given).

    `history` has one dict per step, {"kind": "train", "step", "lr", "loss", ...parts},
    and one per evaluation, {"kind": "eval", "step", ...metrics}; `step` counts the
    optimizer steps done so far.
    """

    model: nn.Module
    history: list[dict]
    best_metrics: dict[str, float]
    steps_done: int


@dataclass
class _Progress:
    """What a checkpoint holds besides tensors."""

    step: int = 0
    history: list[dict] = field(default_factory=list)
    best_metrics: dict[str, float] = field(default_factory=dict)
    best_step: int | None = None
    best_state: dict[str, Tensor] | None = None


class _StepModule(nn.Module):
    """The step as a module's forward, so that DDP sees every parameter it used.

    DDP synchronises the gradients of what runs inside its wrapped forward; wrapping the
    whole step (not just `model.forward`) lets a step_loss call any method (answer,
    match, embed_text, ...) and leave whole heads unused. `step_fn(model, *inputs)` is
    the step_loss itself (inputs: step, rng) or its `run` half (inputs: prepared).
    """

    def __init__(self, model: nn.Module, step_fn: Callable[..., dict[str, Tensor]]):
        super().__init__()
        self.model = model
        self.step_fn = step_fn

    def forward(self, *inputs) -> dict[str, Tensor]:
        out = self.step_fn(self.model, *inputs)
        # only the total may carry a graph: DDP expects every output to reach the loss
        return {k: (v if k == "loss" else v.detach()) for k, v in out.items()}


def lr_factor(step: float, steps: int, warmup_frac: float) -> float:
    """Linear warm-up over warmup_frac of the steps, then linear decay to 0 at `steps`."""
    warmup = max(1, round(warmup_frac * steps)) if warmup_frac > 0 else 0
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (steps - step) / max(1, steps - warmup))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases and LayerNorm weights (1-d tensors), as BERT."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters live: put a step's batch there."""
    return next(model.parameters()).device


def to_device(obj: Any, device: torch.device | str) -> Any:
    """`obj` with its tensors on `device`: a tensor, or dataclasses, dicts, lists and
    tuples of them. Non-blocking, so that a copy issued by the prefetch thread does not
    wait for the GPU (the copy and the kernels that read it share a stream)."""
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if is_dataclass(obj) and not isinstance(obj, type):
        return replace(
            obj, **{f.name: to_device(getattr(obj, f.name), device) for f in fields(obj)}
        )
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def train(
    model: nn.Module,
    step_loss: StepLoss,
    cfg: TrainConfig,
    evaluate: Evaluate | None = None,
    select_metric: str | None = None,
) -> TrainResult:
    """Train `model` for cfg.steps optimizer steps of `step_loss`; see the module doc.

    `evaluate(model)` runs every cfg.eval_every steps (under a time box, each time the
    clock passes another cfg.eval_every of the schedule) and after the last step (model in
    eval mode, no grad). With `select_metric` the returned model holds the state of the
    evaluation where that metric was highest, and best_metrics are that evaluation's;
    otherwise the last state and the last evaluation's metrics. Seeds torch's global
    generator with cfg.seed + rank (dropout draws from it).
    """
    rank, world = _rank_and_world()
    device = _device(cfg.device)
    if device.type == "cuda" and world > 1:
        torch.cuda.set_device(device)  # NCCL collectives run on the current device
    model.to(device)
    torch.manual_seed(cfg.seed + rank)  # dropout and anything else drawn from torch
    rng = np.random.default_rng(cfg.seed + rank)
    optimizer = make_optimizer(model, cfg)
    progress = _Progress()
    if cfg.checkpoint_dir and (ckpt := _latest(Path(cfg.checkpoint_dir))):
        progress = _load_checkpoint(ckpt, model, optimizer, rng, rank, world, device)
    saved_step = progress.step if cfg.checkpoint_dir else None

    feed = _feed(step_loss, rng, device, cfg)
    runner: nn.Module = _StepModule(model, step_loss.run if feed.prefetches else step_loss)
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        runner = nn.parallel.DistributedDataParallel(
            runner, device_ids=ids, find_unused_parameters=True
        )
    bar = tqdm(
        total=cfg.steps,
        initial=progress.step,
        desc="train",
        unit="step",
        disable=not cfg.progress or rank != 0,
    )
    model.train()
    clock = _Clock(cfg, world, device)
    last = float(progress.step)  # the schedule's position when evaluation/checkpoint last looked
    try:
        while (position := clock.position(progress.step)) < cfg.steps:
            inputs = feed.take(progress.step)
            record = _train_step(runner, model, optimizer, inputs, progress.step, position, cfg)
            progress.step += 1
            progress.history.append(record)
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k not in ("kind", "step")})
            now = max(float(progress.step), position)  # a time box's clock can run ahead
            if evaluate and _crossed(last, now, cfg.eval_every):
                feed.settle()  # evaluate may share what prepare uses (the tokenizer)
                _run_eval(model, evaluate, select_metric, progress)
            if cfg.checkpoint_dir and _crossed(last, now, cfg.checkpoint_every):
                _checkpoint(cfg, model, optimizer, feed.rng_state(), progress, rank, world, device)
                saved_step = progress.step
            last = now
        bar.close()
        evaluated_last = progress.history and progress.history[-1]["kind"] == "eval"
        if evaluate and not evaluated_last:
            feed.settle()
            _run_eval(model, evaluate, select_metric, progress)
            saved_step = None  # the evaluation is news to the checkpoint
        if cfg.checkpoint_dir and saved_step != progress.step:
            _checkpoint(cfg, model, optimizer, feed.rng_state(), progress, rank, world, device)
    finally:
        feed.close()
    if select_metric and progress.best_state is not None:
        model.load_state_dict(progress.best_state)
    return TrainResult(model, progress.history, dict(progress.best_metrics), progress.step)


def _crossed(last: float, now: float, every: int) -> bool:
    """Whether the schedule passed a multiple of `every` (0: never) between two positions.

    Positions are steps, or under a time box the clock's share of cfg.steps, so a run
    boxed far short of its cfg.steps still evaluates and checkpoints on the way."""
    return every > 0 and int(now // every) > int(last // every)


class _Clock:
    """Where the run is in its schedule, in steps: the step itself or, under a time box
    (cfg.max_seconds), the larger of it and the share of the time spent times cfg.steps,
    so warm-up, decay and the stop all fit the box. Rank 0's clock rules every rank."""

    def __init__(self, cfg: TrainConfig, world: int, device: torch.device):
        self.cfg, self.world, self.device = cfg, world, device
        self.started = time.monotonic()

    def position(self, step: int) -> float:
        if self.cfg.max_seconds <= 0:
            return float(step)
        spent = (time.monotonic() - self.started) / self.cfg.max_seconds
        pos = torch.tensor([max(float(step), spent * self.cfg.steps)], dtype=torch.float64)
        if self.world > 1:
            pos = pos.to(self.device)
            dist.broadcast(pos, src=0)
        return float(pos.item())


# ---- batches: inline or prefetched ----------------------------------------------------------


class _Inline:
    """No prefetch: the step_loss samples its own batch from rng when it runs."""

    prefetches = False

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def take(self, step: int) -> tuple:
        return step, self.rng

    def settle(self) -> None:
        pass

    def rng_state(self) -> dict:
        return self.rng.bit_generator.state

    def close(self) -> None:
        pass


class _Prefetcher:
    """Prepares step s+1 on one background thread while step s runs (a queue of depth 1).

    Only that thread draws from rng while a preparation is pending, in step order; the
    main thread reads the rng state only when none is (or the one captured before it).
    An error in prepare is raised by `take`, in the main thread.
    """

    prefetches = True

    def __init__(self, prepare, rng: np.random.Generator, device: torch.device, steps: int):
        self.prepare, self.rng, self.device, self.steps = prepare, rng, device, steps
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self.pending: tuple[int, dict, Future] | None = None  # step, rng state before, batch

    def take(self, step: int) -> tuple:
        """Step's prepared batch (waiting for it), having started on the next one."""
        if self.pending is None:  # the first step of this run: nothing prepared yet
            self._submit(step)
        assert self.pending[0] == step, "steps are taken in order"
        prepared = self.pending[2].result()
        self.pending = None
        if step + 1 < self.steps:  # a time box may still leave it unused
            self._submit(step + 1)
        return (prepared,)

    def _submit(self, step: int) -> None:
        state = self.rng.bit_generator.state  # nothing draws from rng now
        self.pending = (step, state, self.pool.submit(self.prepare, step, self.rng, self.device))

    def settle(self) -> None:
        """Wait until the pending preparation is done (kept for its step)."""
        if self.pending is not None:
            wait([self.pending[2]])

    def rng_state(self) -> dict:
        """The state the next unconsumed step draws from: what a checkpoint must hold."""
        return self.pending[1] if self.pending else self.rng.bit_generator.state

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _feed(step_loss, rng: np.random.Generator, device: torch.device, cfg: TrainConfig):
    split = callable(getattr(step_loss, "prepare", None)) and callable(
        getattr(step_loss, "run", None)
    )
    wanted = cfg.prefetch if cfg.prefetch is not None else device.type == "cuda"
    if wanted and split:
        return _Prefetcher(step_loss.prepare, rng, device, cfg.steps)
    return _Inline(rng)


def _train_step(
    runner, model, optimizer, inputs: tuple, step: int, position: float, cfg: TrainConfig
) -> dict:
    lr = cfg.lr * lr_factor(position, cfg.steps, cfg.warmup_frac)
    for group in optimizer.param_groups:
        group["lr"] = lr
    out = runner(*inputs)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    if cfg.clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
    optimizer.step()
    parts = {k: float(v.detach()) for k, v in out.items()}
    return {"kind": "train", "step": step + 1, "lr": lr, **parts}


def _run_eval(model: nn.Module, evaluate: Evaluate, select_metric, progress: _Progress) -> None:
    model.eval()
    with torch.no_grad():
        metrics = {k: float(v) for k, v in evaluate(model).items()}
    model.train()
    progress.history.append({"kind": "eval", "step": progress.step, **metrics})
    if select_metric is None:
        progress.best_metrics, progress.best_step = metrics, progress.step
        return
    if select_metric not in metrics:
        raise KeyError(f"select_metric {select_metric!r} not in evaluate's {sorted(metrics)}")
    best = progress.best_metrics.get(select_metric)
    if best is None or metrics[select_metric] > best:
        progress.best_metrics, progress.best_step = metrics, progress.step
        progress.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- distributed ------------------------------------------------------------------------


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device(name: str) -> torch.device:
    """cfg.device; under torchrun on GPUs each process takes cuda:LOCAL_RANK."""
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


# ---- checkpoints ------------------------------------------------------------------------


def _latest(root: Path) -> Path | None:
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    folder = root / pointer.read_text().strip()
    return folder if folder.is_dir() else None


def _step_dir(step: int) -> str:
    return f"step_{step:08d}"


def _cpu_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU copies that share no memory (safetensors refuses shared tensors)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def _torch_rng_state(device: torch.device) -> dict[str, Tensor]:
    """This rank's torch generator states."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["torch_cuda"] = torch.cuda.get_rng_state(device)
    return tensors


def _checkpoint(
    cfg, model, optimizer, numpy_state: dict, progress: _Progress, rank, world, device
) -> None:
    """Write step_<n>/ on rank 0 (with every rank's generator states), then point at it.

    numpy_state: the rng state the next step draws its batch from."""
    torch_states = _torch_rng_state(device)
    gathered = [(numpy_state, torch_states)]
    if world > 1:
        gathered = [None] * world
        cpu_states = {k: v.cpu() for k, v in torch_states.items()}
        dist.all_gather_object(gathered, (numpy_state, cpu_states))
    if rank == 0:
        _write_checkpoint(Path(cfg.checkpoint_dir), cfg, model, optimizer, progress, gathered)
    if world > 1:
        dist.barrier()


def _write_checkpoint(root: Path, cfg, model, optimizer, progress: _Progress, rngs) -> None:
    """Fill a fresh step_<n>-* folder; it counts once `latest` names it (atomic replace)."""
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{_step_dir(progress.step)}-", dir=root))
    try:
        save_file(_cpu_state(model.state_dict()), folder / "model.safetensors")
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        save_file(opt_tensors, folder / "optimizer.safetensors")
        if progress.best_state is not None:
            save_file(_cpu_state(progress.best_state), folder / "best.safetensors")
        rng_tensors = {
            f"{name}.rank{rank}": t.cpu()
            for rank, (_, ts) in enumerate(rngs)
            for name, t in ts.items()
        }
        save_file(rng_tensors, folder / "rng.safetensors")
        meta = {
            "step": progress.step,
            "history": progress.history,
            "best_metrics": progress.best_metrics,
            "best_step": progress.best_step,
            "numpy_rng": [state for state, _ in rngs],
            "optimizer": opt_meta,
            "config": asdict(cfg),
        }
        (folder / "state.json").write_text(json.dumps(meta))
        pointer = root / f".{LATEST}.tmp"
        pointer.write_text(folder.name)
        os.replace(pointer, root / LATEST)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    for old in root.glob("step_*"):
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(ckpt: Path, model, optimizer, rng, rank, world, device) -> _Progress:
    meta = json.loads((ckpt / "state.json").read_text())
    model.load_state_dict(load_file(ckpt / "model.safetensors", device=str(device)))
    opt_tensors = load_file(ckpt / "optimizer.safetensors", device=str(device))
    optimizer.load_state_dict(_unflatten_optimizer(opt_tensors, meta["optimizer"]))
    rng_tensors = load_file(ckpt / "rng.safetensors")
    if len(meta["numpy_rng"]) == world:
        rng.bit_generator.state = meta["numpy_rng"][rank]
        torch.set_rng_state(rng_tensors[f"torch_cpu.rank{rank}"])
        if device.type == "cuda" and f"torch_cuda.rank{rank}" in rng_tensors:
            torch.cuda.set_rng_state(rng_tensors[f"torch_cuda.rank{rank}"], device)
    else:  # resumed on a different number of processes: fresh, still distinct, streams
        rng.bit_generator.state = np.random.default_rng([meta["step"], rank]).bit_generator.state
        torch.manual_seed(meta["step"] * 1000 + rank)
    best = ckpt / "best.safetensors"
    return _Progress(
        step=meta["step"],
        history=meta["history"],
        best_metrics=meta["best_metrics"],
        best_step=meta["best_step"],
        best_state=load_file(best, device=str(device)) if best.is_file() else None,
    )


def _flatten_optimizer(state: dict) -> tuple[dict[str, Tensor], dict]:
    """An optimizer state_dict -> (tensors named "<param>.<key>", JSON-able rest)."""
    tensors, scalars = {}, {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}
