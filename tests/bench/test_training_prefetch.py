"""The prefetch benchmark runs end to end on a tiny model and reports both modes."""

from __future__ import annotations

import pytest

from bench.training_prefetch import main

pytestmark = pytest.mark.timeout(120)


def test_prefetch_bench_times_both_modes_and_the_preparation():
    out = main(["--steps", "3", "--repeats", "1", "--images", "16", "--hidden", "32"])
    assert out["steps_per_s_off"] > 0 and out["steps_per_s_on"] > 0
    assert len(out["runs_ms"]["off"]) == len(out["runs_ms"]["on"]) == 1
    assert out["prepare_ms"] > 0
    assert out["speedup_on_over_off"] == pytest.approx(
        out["steps_per_s_on"] / out["steps_per_s_off"], rel=0.02
    )
