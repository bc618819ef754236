"""The match-cost benchmark times both scorings on both backbones."""

from __future__ import annotations

from bench.match_cost import main


def test_head_calibrated_and_claims_scoring_are_all_timed(tmp_path):
    out = tmp_path / "r.json"
    result = main(["--rounds", "1", "--texts", "5", "--out", str(out)])
    assert out.exists() and set(result["cases"]) == {"vilbert", "lxmert"}
    assert result["claims"] > 0, "a generated scene's captions include readable ones"
    for case in result["cases"].values():
        assert case["head"]["n"] == case["calibrated"]["n"] == case["claims"]["n"] == 1
        assert case["calibrated_over_head"] > 0 and case["claims_over_calibrated"] > 0
