"""``--task-option``: task configs that change results are part of the cell, its key and its label."""

from __future__ import annotations

import json

import pytest

from benchsuite.bits import parse_bits_list
from benchsuite.cli import main
from benchsuite.errors import ConfigError
from benchsuite.leaderboard import results_frame
from benchsuite.results import ResultStore
from benchsuite.runner import PlanRequest, RunSettings, plan_cells, run_cells


def _plan(tmp_path, **task_overrides):
    request = PlanRequest(methods=["fp32", "minmax"], tasks=["toy"], bits=parse_bits_list("w8a8"),
                          task_overrides={"toy": task_overrides} if task_overrides else {})
    return plan_cells(request, RunSettings(out_dir=tmp_path))


def test_quantized_cells_carry_every_override_the_float_cell_only_float_ones(toy_plugins, tmp_path):
    default_float, default_cell = _plan(tmp_path)
    float_cell, cell = _plan(tmp_path, weight_seed="7", calib_offset="3")
    assert cell.task_overrides == (("calib_offset", "3"), ("weight_seed", "7"))
    assert float_cell.task_overrides == (("weight_seed", "7"),)
    assert cell.key != default_cell.key and float_cell.key != default_float.key
    # an option that does not change the float model leaves the float cell alone
    same_float, _ = _plan(tmp_path, calib_offset="3")
    assert same_float == default_float


def test_bad_task_options_are_config_errors(toy_plugins, tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'calib_offset'"):
        _plan(tmp_path, calib_ofset="3")
    with pytest.raises(ConfigError, match="integer"):
        _plan(tmp_path, calib_offset="three")
    request = PlanRequest(methods=["minmax"], tasks=["toy"], bits=parse_bits_list("w8a8"),
                          task_overrides={"digits": {"x": "1"}})
    with pytest.raises(ConfigError, match="not in --tasks"):
        plan_cells(request, RunSettings(out_dir=tmp_path))


def test_options_reach_the_task_and_are_recorded_and_labelled(toy_plugins, tmp_path):
    settings = RunSettings(out_dir=tmp_path)
    summary = run_cells(_plan(tmp_path) + _plan(tmp_path, weight_seed="7", calib_offset="3"), settings)
    assert not summary.failed and len(summary.ran) == 4
    floats = sorted(p.name for p in ResultStore(tmp_path).float_dir.glob("*.json"))
    assert len(floats) == 2  # the other float model has its own baseline

    varied = next(r for r in summary.ran if r.method == "minmax" and r.cell["task_overrides"])
    assert varied.config["task"]["fields"] == {"weight_seed": 7, "calib_offset": 3}
    assert varied.data == {"calib_offset": 3, "weight_seed": 7}  # the cell's own manifest
    assert all(sample.startswith("toy:") and int(sample[4:]) >= 3 for sample in varied.calibration["sample_ids"])
    assert varied.task_label == "toy [weight_seed=7]"
    assert varied.method_label == "minmax [calib_offset=3]"

    frame = results_frame(ResultStore(tmp_path).results())
    main = frame[frame.main_metric]
    assert set(main.task) == {"toy", "toy [weight_seed=7]"}
    assert set(main[main.task == "toy [weight_seed=7]"].method) == {"fp32", "minmax [calib_offset=3]"}
    # a different float model is its own reference: its float top-1 is 100 against its own labels
    assert set(main[main.method == "fp32"].value) == {100.0}


def test_cli_task_option(toy_plugins, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["run", "--methods", "minmax", "--tasks", "toy", "--bits", "w8a8", "--out", str(out), "--no-progress"]
    assert main(argv + ["--task-option", "toy.calib_offset=5"]) == 0
    (cell_file,) = (out / "cells").glob("*.json")
    assert "__task" in cell_file.name
    assert json.loads(cell_file.read_text())["cell"]["task_overrides"] == {"calib_offset": "5"}
    assert "minmax [calib_offset=5]" in capsys.readouterr().out

    for bad in (["--task-option", "toy.nope=1"], ["--task-option", "calib_offset=1"],
                ["--task-option", "digits.calib_offset=1"]):
        assert main(argv + bad) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
