"""The `vqa` command: serve, data, train, eval, features, bench, store.

Each subcommand parses its flags here and hands over to one function of the layer
that owns the work; heavy imports happen inside the handlers so `vqa --help` is fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# service.training.finetune.TASKS, spelt out so that `vqa --help` need not import torch
# (tests/test_cli.py keeps the two equal)
TASKS = ("vqa", "retrieval", "grounding", "match", "all")


class CliError(Exception):
    """A user mistake on the command line: printed as one line, exit status 2."""


def _data_shapes(args: argparse.Namespace) -> None:
    import time

    from service.data.shapes import write_split

    start = time.perf_counter()
    path = write_split(
        args.out, args.split, args.n, size=args.size, seed=args.seed, noise=args.noise
    )
    print(f"wrote {args.n} {args.split} scenes to {path} in {time.perf_counter() - start:.1f} s")


def _data_preview(args: argparse.Namespace) -> None:
    from service.data.preview import draw_preview

    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        raise CliError(f"no such data folder: {data_dir}")
    split = args.split or _first_split(data_dir)
    out = draw_preview(data_dir, args.out, split=split, n=args.n)
    print(f"wrote preview of {split} to {out}")


def _first_split(data_dir: Path) -> str:
    for split in ("train", "val", "test"):
        if (data_dir / f"{split}.jsonl").exists():
            return split
    raise CliError(f"{data_dir} holds no train/val/test .jsonl; run `vqa data shapes` first")


def _store_list(args: argparse.Namespace) -> None:
    from service.store import ModelStore

    for m in ModelStore(args.store).list():
        metrics = json.dumps(m.metrics, sort_keys=True) if m.metrics else ""
        print(f"{m.ref:32s} {m.kind:9s} detector={m.detector or '-':24s} {metrics}")


def _store_verify(args: argparse.Namespace) -> None:
    from service.store import ModelStore

    store = ModelStore(args.store)
    for m in store.list():
        store.verify(m)
        print(f"ok  {m.ref}")


def _command_line(args: argparse.Namespace) -> str:
    """The command as typed, for manifests: `main`'s argv (sys.argv's by default)."""
    return "vqa " + " ".join(args.argv)


def _training_kwargs(args: argparse.Namespace) -> dict:
    """The flags `_add_training_args` gives pretrain and finetune, as keyword arguments."""
    return dict(
        features_dir=args.features,
        data_dir=args.data,
        store_root=args.store,
        detector_ref=args.detector,
        out_name=args.name,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        checkpoint_dir=args.checkpoint_dir,
        device=args.device,
        max_seconds=args.max_seconds,
        config_overrides=_config_overrides(args),
        command=_command_line(args),
    )


def _json_object(text: str | None, flag: str, example: str) -> dict | None:
    """A flag's JSON object, or None when the flag is not given."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise CliError(f"{flag} is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise CliError(f"{flag} must be a JSON object, e.g. '{example}', not {text}")
    return value


def _config_overrides(args: argparse.Namespace) -> dict | None:
    """--config's JSON object of config overrides, or None when not given."""
    return _json_object(args.config, "--config", '{"hidden_size": 384}')


def _train_pretrain(args: argparse.Namespace) -> None:
    from service.training.pretrain import run_pretrain

    m = run_pretrain(args.backbone, init_text=args.init_text, **_training_kwargs(args))
    print(f"wrote {m.ref} to {m.path}")


def _train_calibrate(args: argparse.Namespace) -> None:
    from service.training.calibrate import check_weights, run_calibrate

    try:  # refused here, as a usage error, rather than as a traceback from the fit
        weights = check_weights(_json_object(args.weights, "--weights", '{"hard": 2}'))
    except ValueError as exc:
        raise CliError(f"--weights: {exc}") from exc
    m = run_calibrate(
        args.model,
        args.store,
        args.features,
        args.data,
        args.split,
        args.seed,
        args.device,
        weights=weights,
    )
    if m.match_calibration is None:
        print(f"{m.ref}: the alignment head alone does better on {args.split}; match uses it")
    else:
        print(f"{m.ref}: match_calibration set")
    print(json.dumps(m.match_calibration, indent=2))


def _train_demo(args: argparse.Namespace) -> None:
    from service.training.demo import DemoRecipe, run_demo

    overrides = {"backbones": tuple(args.backbones)} if args.backbones else {}
    recipe = (
        DemoRecipe.from_json(args.recipe, **overrides) if args.recipe else DemoRecipe(**overrides)
    )
    state = run_demo(args.work, args.store, recipe, device=args.device, command=_command_line(args))
    print(json.dumps({k: v.get("ref", v.get("seconds")) for k, v in state.items()}, indent=2))


def _train_report_pretraining(args: argparse.Namespace) -> None:
    import torch

    from service.training.experiments import run_pretraining_report

    torch.set_num_threads(args.threads)
    out = run_pretraining_report(
        args.data, args.features, args.work, args.out, command=_command_line(args)
    )
    print(f"wrote {out}")


def _train_finetune(args: argparse.Namespace) -> None:
    from service.training.finetune import run_finetune
    from service.training.mix import Mix

    try:
        mix = Mix.parse(args.mix)
    except (ValueError, OSError) as exc:
        raise CliError(f"--mix: {exc}") from exc
    m = run_finetune(
        args.task,
        args.init,
        backbone=args.backbone,
        label_fraction=args.label_fraction,
        include_easyvqa=args.include_easyvqa,
        mix=mix,
        **_training_kwargs(args),
    )
    print(f"wrote {m.ref} to {m.path}")


def _eval(args: argparse.Namespace) -> None:
    if args.what == "detector":
        return _eval_detector(args)
    from service.training.evaluate import run_eval

    metrics = run_eval(
        args.model,
        args.store,
        args.task,
        features_dir=args.features,
        data_dir=args.data or "data/shapes",
        split=args.split,
        gallery_size=args.gallery_size,
        device=args.device,
        out_dir=args.out,
        align_queries=args.align_queries,
    )
    print(json.dumps(metrics, indent=2, sort_keys=True))


def _train_detector(args: argparse.Namespace) -> None:
    from service.training.detector_ops import run_train_detector

    m = run_train_detector(
        args.data,
        args.store,
        out_name=args.name,
        config_overrides=_config_overrides(args),
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        include_easyvqa=args.easyvqa,
        eval_every=args.eval_every,
        device=args.device,
        command=_command_line(args),
        half=not args.float32,
    )
    print(f"wrote {m.ref} to {m.path}")
    print(json.dumps(m.metrics, indent=2, sort_keys=True))


def _eval_detector(args: argparse.Namespace) -> None:
    from service.training.detector_ops import run_eval_detector

    report = run_eval_detector(
        args.model,
        args.store,
        data_dir=args.data,
        split=args.split,
        easyvqa=args.easyvqa,
        out=args.out,
        device=args.device,
    )
    print(json.dumps(report, indent=2))


def _features(args: argparse.Namespace) -> None:
    from service.training.detector_ops import run_features

    paths = run_features(
        args.detector,
        args.store,
        args.data,
        args.out,
        splits=args.splits,
        easyvqa=args.easyvqa,
        batch_size=args.batch_size,
        device=args.device,
    )
    for path in paths:
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


def _add_training_args(p: argparse.ArgumentParser, steps: int, lr: float) -> None:
    p.add_argument("--features", default="data/features", help="region features folder")
    p.add_argument("--data", default="data/shapes", help="shapes-world data folder")
    p.add_argument("--store", default="model_store")
    p.add_argument("--detector", default=None, help="name@version the features came from")
    p.add_argument("--name", default=None, help="model_store name of the result")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-dir", default=None, help="resume from / save to here")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--max-seconds", type=float, default=0, help="time box: schedule and stop follow it"
    )
    p.add_argument(
        "--config", default=None, help='backbone config overrides as JSON: {"word_check": true}'
    )


def _serve(args: argparse.Namespace) -> None:
    if args.engine == "ray":
        return _serve_ray(args)
    try:
        from service.app import run_server
    except ImportError as exc:
        raise CliError(f"the HTTP service is not built yet in this version ({exc})") from exc
    run_server(args)


def _serve_ray(args: argparse.Namespace) -> None:
    """The same app as N Ray Serve replicas (the optional [ray] extra)."""
    from service.config import Settings

    try:
        from service.ray_serve import run_ray
    except ImportError as exc:
        raise CliError(f"--engine ray needs the [ray] extra: pip install '.[ray]' ({exc})") from exc
    if args.replicas < 1:
        raise CliError("--replicas must be at least 1")
    # As `run_server`: flags override VQA_* variables; Settings ignores the Ray flags.
    overrides = {
        k: v for k, v in vars(args).items() if v is not None and k not in ("func", "command")
    }
    run_ray(
        Settings(**overrides),
        args.replicas,
        ray_address=args.ray_address,
        cpus_per_replica=args.cpus_per_replica,
        gpus_per_replica=args.gpus_per_replica,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vqa", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--store", default=None, help="model store folder")
    serve.add_argument("--data-dir", default=None, help="galleries and other state")
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    serve.add_argument("--models", nargs="*", default=None, help="names to load (default all)")
    serve.add_argument("--max-batch-size", type=int, default=None)
    serve.add_argument("--max-wait-ms", type=float, default=None)
    serve.add_argument("--max-queue", type=int, default=None)
    serve.add_argument("--timeout-s", type=float, default=None)
    serve.add_argument("--drain-timeout-s", type=float, default=None)
    serve.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's own; 1 is best on a loaded 2-core box)",
    )
    serve.add_argument(
        "--keep-alive-s",
        type=int,
        default=None,
        help="seconds an idle keep-alive connection stays open (default 75)",
    )
    serve.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local: one process (uvicorn); ray: replicas on Ray Serve (the [ray] extra)",
    )
    serve.add_argument("--replicas", type=int, default=1, help="--engine ray: app replicas")
    serve.add_argument(
        "--ray-address", default=None, help="--engine ray: cluster to join (default: start one)"
    )
    serve.add_argument(
        "--cpus-per-replica", type=float, default=1.0, help="--engine ray: CPUs each reserves"
    )
    serve.add_argument(
        "--gpus-per-replica",
        type=float,
        default=0.0,
        help="--engine ray: GPUs each reserves; a fraction (0.5) shares one GPU",
    )
    serve.set_defaults(func=_serve)

    data = sub.add_parser("data", help="generate and inspect data sets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    shapes = data_sub.add_parser("shapes", help="write a shapes-world split")
    shapes.add_argument("--split", choices=["train", "val", "test"], default="train")
    shapes.add_argument("--n", type=int, default=1000)
    shapes.add_argument("--out", required=True)
    shapes.add_argument("--size", type=int, default=128)
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--noise", type=float, default=0.0)
    shapes.set_defaults(func=_data_shapes)
    preview = data_sub.add_parser("preview", help="draw a grid of scenes with boxes")
    preview.add_argument("data_dir")
    preview.add_argument("--out", default="grid.png")
    preview.add_argument("--split", default=None)
    preview.add_argument("--n", type=int, default=16)
    preview.set_defaults(func=_data_preview)

    train = sub.add_parser("train", help="offline training: detector, pretrain, finetune")
    train_sub = train.add_subparsers(dest="train_command", required=True)
    pre = train_sub.add_parser("pretrain", help="pretrain a backbone on captions")
    pre.add_argument("--backbone", choices=["vilbert", "lxmert"], required=True)
    pre.add_argument("--init-text", default=None, help="BERT folder for ViLBERT's text stream")
    _add_training_args(pre, steps=3000, lr=1e-4)
    pre.set_defaults(func=_train_pretrain)
    fine = train_sub.add_parser("finetune", help="fine-tune for vqa, retrieval, grounding, match")
    fine.add_argument("--task", choices=TASKS, default="all")
    fine.add_argument("--init", default="none", help="pretrained model ref, or none")
    fine.add_argument("--backbone", choices=["vilbert", "lxmert"], default=None)
    fine.add_argument("--label-fraction", type=float, default=1.0)
    fine.add_argument("--include-easyvqa", action="store_true")
    fine.add_argument(
        "--mix", default=None, help="weights of objectives, VQA families, ... (JSON or file)"
    )
    _add_training_args(fine, steps=2000, lr=5e-5)
    fine.set_defaults(func=_train_finetune)
    cal = train_sub.add_parser(
        "calibrate",
        help="fit how /v1/match combines the alignment head with the embeddings (val split)",
    )
    cal.add_argument("--model", required=True, help="name or name@version")
    cal.add_argument("--split", choices=["train", "val"], default="val")
    cal.add_argument("--data", default="data/shapes", help="shapes-world data folder")
    cal.add_argument("--features", default="data/features", help="region features folder")
    cal.add_argument("--store", default="model_store")
    cal.add_argument("--seed", type=int, default=0)
    cal.add_argument("--device", default="cpu")
    cal.add_argument(
        "--weights",
        default=None,
        help="the operating point: weights of the random, hard and partial accuracies the fit "
        "maximises (JSON; absent ones 1), e.g. '{\"hard\": 2}' to reject more near-duplicates",
    )
    cal.set_defaults(func=_train_calibrate)
    demo = train_sub.add_parser(
        "demo", help="the whole chain that makes the shipped models (resumable)"
    )
    demo.add_argument("--work", default="data/demo", help="data, features and checkpoints")
    demo.add_argument("--store", default="model_store")
    demo.add_argument("--device", default="cpu")
    demo.add_argument(
        "--recipe", help="JSON file of DemoRecipe fields to change (steps, lr, time boxes, ...)"
    )
    demo.add_argument("--backbones", nargs="+", choices=["vilbert", "lxmert"], help="default: both")
    demo.set_defaults(func=_train_demo)
    rep = train_sub.add_parser(
        "report-pretraining",
        help="docs/experiments/pretraining.md: pretrained vs scratch, MiniLM vs random text",
    )
    rep.add_argument("--data", default="data/shapes", help="shapes-world data folder")
    rep.add_argument("--features", default="data/features", help="region features folder")
    rep.add_argument("--work", default="data/pretraining-report", help="runs and their store")
    rep.add_argument("--out", default="docs/experiments")
    rep.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest here)")
    rep.set_defaults(func=_train_report_pretraining)
    det = train_sub.add_parser("detector", help="train the region detector on the shapes world")
    det.add_argument("--data", default="data/shapes", help="shapes-world data folder")
    det.add_argument("--store", default="model_store")
    det.add_argument("--name", default="shapes-detector", help="model_store name of the result")
    det.add_argument("--steps", type=int, default=4000)
    det.add_argument("--batch-size", type=int, default=8)
    det.add_argument("--lr", type=float, default=1e-3)
    det.add_argument("--seed", type=int, default=0)
    det.add_argument("--eval-every", type=int, default=500, help="validate every N steps")
    det.add_argument(
        "--no-easyvqa", dest="easyvqa", action="store_false", help="train on shapes only"
    )
    det.add_argument("--config", default=None, help="DetectorConfig overrides as JSON")
    det.add_argument("--float32", action="store_true", help="store float32 weights")
    det.add_argument("--device", default="cpu")
    det.set_defaults(func=_train_detector)

    ev = sub.add_parser(
        "eval",
        help="evaluate a model on a held-out split",
        description="vqa eval --model NAME [--task T] scores a backbone; "
        "vqa eval detector --model NAME scores a detector",
    )
    ev.add_argument("what", nargs="?", choices=["detector"], help="evaluate a detector")
    ev.add_argument("--model", required=True, help="name or name@version")
    ev.add_argument("--task", choices=TASKS, default="all")
    ev.add_argument("--split", default="test")
    ev.add_argument("--features", default="data/features")
    ev.add_argument(
        "--data",
        default=None,
        help="data folder (default data/shapes; a detector: the one it was trained on)",
    )
    ev.add_argument("--store", default="model_store")
    ev.add_argument("--gallery-size", type=int, default=1000)
    ev.add_argument(
        "--align-queries",
        type=int,
        default=100,
        help="retrieval: queries the alignment head scores against the whole gallery (0: none)",
    )
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--out", default=None, help="metrics.json and plots (default docs/experiments)")
    ev.add_argument(
        "--no-easyvqa", dest="easyvqa", action="store_false", help="detector: skip easy-VQA test"
    )
    ev.set_defaults(func=_eval)

    feats = sub.add_parser("features", help="precompute a data set's regions with a detector")
    feats.add_argument("--detector", required=True, help="name or name@version")
    feats.add_argument("--data", default="data/shapes", help="shapes-world data folder")
    feats.add_argument("--out", default="data/features", help="folder for <split>.safetensors")
    feats.add_argument("--splits", nargs="+", default=["train", "val", "test"])
    feats.add_argument(
        "--no-easyvqa", dest="easyvqa", action="store_false", help="skip easy-VQA train/test"
    )
    feats.add_argument("--store", default="model_store")
    feats.add_argument("--batch-size", type=int, default=16)
    feats.add_argument("--device", default="cpu")
    feats.set_defaults(func=_features)

    store = sub.add_parser("store", help="inspect the model store")
    store.add_argument("--store", default="model_store")
    store_sub = store.add_subparsers(dest="store_command", required=True)
    store_sub.add_parser("list", help="list entries").set_defaults(func=_store_list)
    store_sub.add_parser("verify", help="check sha256 of every file").set_defaults(
        func=_store_verify
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    from service.errors import ServiceError
    from service.store import StoreError

    try:
        args.func(args)
    except CliError as exc:
        print(f"vqa: {exc}", file=sys.stderr)
        return 2
    except (StoreError, ServiceError, FileNotFoundError) as exc:
        print(f"vqa: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
