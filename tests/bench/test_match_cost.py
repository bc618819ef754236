"""The match-cost benchmark times both scorings on both backbones."""

from __future__ import annotations

from bench.match_cost import main


def test_head_and_calibrated_scoring_are_both_timed(tmp_path):
    out = tmp_path / "r.json"
    result = main(["--rounds", "1", "--texts", "3", "--out", str(out)])
    assert out.exists() and set(result["cases"]) == {"vilbert", "lxmert"}
    for case in result["cases"].values():
        assert case["head"]["n"] == case["calibrated"]["n"] == 1
        assert case["calibrated_over_head"] > 0
