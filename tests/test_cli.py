"""The `vqa` command line: what its flags reach and how it refuses bad ones."""

from __future__ import annotations

import json

import pytest

from service import cli
from service.cli import main
from service.store import ModelStore
from service.training import finetune
from tests.training.pretrain_support import tiny_overrides, write_tiny_split


def test_the_cli_offers_the_tasks_fine_tuning_and_evaluation_know():
    assert cli.TASKS == finetune.TASKS
    parser = cli.build_parser()
    for argv in (["train", "finetune"], ["eval", "--model", "m"]):
        assert parser.parse_args([*argv, "--task", "match"]).task == "match"
        with pytest.raises(SystemExit):
            parser.parse_args([*argv, "--task", "caption"])


def test_pretrain_config_overrides_reach_the_written_entry(tmp_path, capsys):
    data, features = write_tiny_split(tmp_path, n=16)
    config = {**tiny_overrides("lxmert"), "x_layers": 2}
    argv = ["train", "pretrain", "--backbone", "lxmert", "--data", str(data)]
    argv += ["--features", str(features), "--store", str(tmp_path / "store"), "--steps", "2"]
    argv += ["--batch-size", "4", "--name", "wide", "--config", json.dumps(config)]
    assert main(argv) == 0
    assert "wrote wide@1" in capsys.readouterr().out
    entry = ModelStore(tmp_path / "store").resolve("wide@1")
    assert entry.config["x_layers"] == 2 and entry.config["hidden_size"] == config["hidden_size"]
    assert "--config" in entry.command


@pytest.mark.parametrize(
    ("value", "message"),
    [("{hidden_size: 384}", "--config is not JSON"), ("[384]", "must be a JSON object")],
)
@pytest.mark.parametrize("command", [["pretrain", "--backbone", "lxmert"], ["finetune"]])
def test_a_bad_config_is_refused_before_any_work(tmp_path, capsys, command, value, message):
    argv = ["train", *command, "--store", str(tmp_path / "store"), "--config", value]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{hard: 2}", "--weights is not JSON"),
        ('{"strict": 2}', "unknown ['strict']"),
        ('{"hard": -1}', "numbers >= 0"),
        ('{"random": 0, "hard": 0, "partial": 0}', "not all 0"),
    ],
)
def test_bad_calibration_weights_are_refused_before_any_work(tmp_path, capsys, value, message):
    argv = ["train", "calibrate", "--model", "m", "--store", str(tmp_path / "store")]
    assert main([*argv, "--weights", value]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "store").exists()
