"""The distinct-rows benchmark: both paths timed on both backbones, and they agree."""

from __future__ import annotations

from bench.distinct_rows import main


def test_both_paths_are_timed_and_give_the_same_logits(tmp_path):
    out = tmp_path / "r.json"
    result = main(["--rounds", "1", "--rerank", "4", "--images", "2", "--out", str(out)])
    assert out.exists()
    assert set(result["cases"]) == {
        "vilbert/search",
        "vilbert/questions",
        "lxmert/search",
        "lxmert/questions",
    }
    for case in result["cases"].values():
        assert case["max_abs_logit_difference"] < 1e-4
        assert case["once_per_distinct"]["n"] == case["every_row"]["n"] >= 1
