"""PNG figures of the benchmark results, for docs/BENCHMARKS.md.

    .venv/bin/python -m bench.plots [--results bench/results]

Reads batching_cpu.json, cache_cpu.json and retrieval_cpu.json (whichever exist) and
writes batching_throughput.png, batching_latency.png, cache_latency.png and
retrieval_latency.png beside them; --markdown prints the docs' tables too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.common import RESULTS  # noqa: E402

STYLE = {
    "dynamic": ("tab:blue", "o", "dynamic batching (max 32)"),
    "dynamic_wait0": ("tab:cyan", "^", "dynamic, max_wait_ms 0"),
    "max_batch_1": ("tab:red", "s", "max_batch_size 1"),
    "raw": ("black", "x", "raw batched forward (batch = concurrency)"),
}


def _caption(fig, result: dict) -> None:
    load = f"load {result['loadavg_start'][0]:.1f} -> {result['loadavg_end'][0]:.1f}"
    text = f"{result['command']}  |  {result['machine']['cpu_count']} CPUs, {load}"
    fig.text(0.01, 0.005, text, fontsize=7, color="gray")


def batching_throughput(result: dict, out: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for ax, mode in zip(axes, ("cached", "cold"), strict=True):
        for config, (color, marker, label) in STYLE.items():
            rows = [r for r in result["summary"] if r["config"] == config and r["mode"] == mode]
            rows = [r for r in rows if r["concurrency"] in (1, 8, 32)]
            if rows:
                xs = [r["concurrency"] for r in rows]
                ys = [r["answers_per_s"] for r in rows]
                ax.plot(xs, ys, marker=marker, color=color, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 8, 32], ["1", "8", "32"])
        ax.set_xlabel("concurrent requests (raw: batch size)")
        ax.set_title(f"{mode} images")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("answers per second")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"POST /v1/vqa throughput, {result['model']} (weights: see the JSON)", fontsize=10)
    _caption(fig, result)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return _save(fig, out / "batching_throughput.png")


def batching_latency(result: dict, out: Path) -> Path:
    configs = [c for c in STYLE if c != "raw"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, mode in zip(axes, ("cached", "cold"), strict=True):
        width = 0.8 / len(configs)
        for i, config in enumerate(configs):
            rows = [r for r in result["summary"] if r["config"] == config and r["mode"] == mode]
            if not rows:
                continue
            color = STYLE[config][0]
            xs = [j + i * width for j in range(len(rows))]
            ax.bar(xs, [r["p99_ms"] for r in rows], width, color=color, alpha=0.25)
            ax.bar(xs, [r["p95_ms"] for r in rows], width, color=color, alpha=0.5)
            ax.bar(xs, [r["p50_ms"] for r in rows], width, color=color, label=STYLE[config][2])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(3)], ["c=1", "c=8", "c=32"])
        ax.set_yscale("log")
        ax.set_title(f"{mode} images: p50 (solid), p95, p99 (paler)")
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("latency (ms)")
    axes[0].legend(fontsize=8)
    _caption(fig, result)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return _save(fig, out / "batching_latency.png")


def cache_latency(result: dict, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    cases = result["cases"]
    labels = [f"{c['detector']}\n{c['image_px']} px" for c in cases]
    xs = range(len(cases))
    ax.bar([x - 0.2 for x in xs], [c["first"]["p50_ms"] for c in cases], 0.4, label="first")
    ax.bar([x + 0.2 for x in xs], [c["later"]["p50_ms"] for c in cases], 0.4, label="later")
    for x, c in zip(xs, cases, strict=True):
        ax.text(x, c["first"]["p50_ms"] * 1.1, f"{c['first_over_later_p50']:.1f}x", ha="center")
    ax.set_xticks(list(xs), labels)
    ax.set_yscale("log")
    ax.set_ylabel("p50 latency (ms)")
    ax.set_title("first question about an image vs later ones (cached regions)", fontsize=10)
    ax.legend(loc="upper left")
    _caption(fig, result)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _save(fig, out / "cache_latency.png")


def retrieval_latency(result: dict, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    rows = result["galleries"]
    sizes = [r["gallery_size"] for r in rows]
    series = [
        ("two_stage", "two-stage (rerank 50), in process", "o"),
        ("two_stage_http", "two-stage through HTTP", "^"),
        ("exhaustive", "alignment head on every image", "s"),
    ]
    for key, label, marker in series:
        ax.plot(sizes, [r[key]["p50_ms"] for r in rows], marker=marker, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(sizes, [f"{s:,}" for s in sizes])
    ax.set_xlabel("gallery size (images)")
    ax.set_ylabel("p50 query latency (ms)")
    ax.set_title(f"caption search, {result['model']}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _caption(fig, result)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _save(fig, out / "retrieval_latency.png")


# ---- markdown tables ----------------------------------------------------------------------


def batching_table(result: dict) -> str:
    lines = [
        "| images | config | c (raw: batch) | answers/s | p50 ms | p95 ms | p99 ms "
        "| mean batch | server CPU ms/answer |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(result["summary"], key=lambda r: (r["mode"], r["config"], r["concurrency"])):
        cpu = r.get("server_cpu_ms_per_answer", r.get("cpu_ms_per_answer"))
        lines.append(
            f"| {r['mode']} | {r['config']} | {r['concurrency']} | {r['answers_per_s']} "
            f"| {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | {r.get('mean_batch', '')} "
            f"| {cpu} |"
        )
    return "\n".join(lines)


def cache_table(result: dict) -> str:
    lines = [
        "| detector | image | first p50 ms | later p50 ms | first / later "
        "| first: decode / detect / encode ms | later: encode ms |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for c in result["cases"]:
        f, la = c["stages_mean_ms"]["first"], c["stages_mean_ms"]["later"]
        lines.append(
            f"| {c['detector']} | {c['image_px']} px | {c['first']['p50_ms']} "
            f"| {c['later']['p50_ms']} | {c['first_over_later_p50']}x "
            f"| {f['decode']} / {f['detect']} / {f['encode']} | {la['encode']} |"
        )
    return "\n".join(lines)


def retrieval_table(result: dict) -> str:
    lines = [
        "| gallery | two-stage p50 ms (in process) | two-stage p50 ms (HTTP) "
        "| exhaustive p50 ms (queries) | speed-up | fill s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["galleries"]:
        lines.append(
            f"| {r['gallery_size']:,} | {r['two_stage']['p50_ms']} "
            f"| {r['two_stage_http']['p50_ms']} | {r['exhaustive']['p50_ms']} "
            f"({r['exhaustive']['n']}) | {r['speedup_p50']}x | {r['fill_s']} |"
        )
    return "\n".join(lines)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--markdown", action="store_true", help="also print the tables")
    args = p.parse_args(argv)
    tables = {
        "batching_cpu.json": batching_table,
        "cache_cpu.json": cache_table,
        "retrieval_cpu.json": retrieval_table,
    }
    written = []
    for name, plots in [
        ("batching_cpu.json", (batching_throughput, batching_latency)),
        ("cache_cpu.json", (cache_latency,)),
        ("retrieval_cpu.json", (retrieval_latency,)),
    ]:
        path = args.results / name
        if path.exists():
            result = json.loads(path.read_text())
            written += [plot(result, args.results) for plot in plots]
            if args.markdown:
                print(f"\n{name}:\n{tables[name](result)}\n")
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
