"""The figures and tables for docs/BENCHMARKS.md, from small result files."""

from __future__ import annotations

import json

from bench.plots import main


def machine_fields(command: str) -> dict:
    return {
        "command": command,
        "machine": {"cpu_count": 2},
        "loadavg_start": [1.0, 1.0, 1.0],
        "loadavg_end": [2.0, 1.0, 1.0],
    }


def stats(p50: float) -> dict:
    return {"n": 3, "p50_ms": p50, "p95_ms": 2 * p50, "p99_ms": 3 * p50}


def test_figures_and_tables_come_from_the_results(tmp_path, capsys):
    rows = [
        {"config": c, "mode": m, "concurrency": n, "answers_per_s": 10.0 * n, **stats(n)}
        for c in ("dynamic", "max_batch_1", "raw")
        for m in ("cached", "cold")
        for n in (1, 8, 32)
    ]
    batching = {**machine_fields("python -m bench.batching"), "summary": rows}
    batching.update(model="m@1", weights="random")
    stages = {"decode": 1.0, "detect": 30.0, "encode": 20.0}
    case = {"detector": "tiny", "image_px": 128, "first": stats(60), "later": stats(20)}
    case.update(first_over_later_p50=3.0, stages_mean_ms={"first": stages, "later": stages})
    cache = {**machine_fields("python -m bench.cache"), "cases": [case]}
    gallery = {"gallery_size": 1000, "speedup_p50": 20.0, "fill_s": 1.0}
    gallery.update(two_stage=stats(5), two_stage_http=stats(6), exhaustive=stats(100))
    retrieval = {**machine_fields("python -m bench.retrieval"), "model": "m@1"}
    retrieval["galleries"] = [gallery]
    for name, result in [
        ("batching_cpu", batching),
        ("cache_cpu", cache),
        ("retrieval_cpu", retrieval),
    ]:
        (tmp_path / f"{name}.json").write_text(json.dumps(result))

    written = main(["--results", str(tmp_path), "--markdown"])

    names = sorted(p.name for p in written)
    assert names == [
        "batching_latency.png",
        "batching_throughput.png",
        "cache_latency.png",
        "retrieval_latency.png",
    ]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)
    out = capsys.readouterr().out
    assert "| cached | dynamic | 32 | 320.0 | 32 |" in out
    assert "| tiny | 128 px | 60 | 20 | 3.0x |" in out
    assert "| 1,000 | 5 | 6 | 100 (3) | 20.0x | 1.0 |" in out
