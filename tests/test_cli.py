"""The command line as a user meets it: one-line errors with exit 2, listings, plans, reports."""

from __future__ import annotations

import json

import pytest

from benchsuite.cli import EXIT_CELLS_FAILED, EXIT_OK, EXIT_USAGE, main


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["run", "--bits", "w5a5", "--tasks", "digits"], "unsupported bit setting 'w5a5'"),
        (["run", "--methods", "minmx", "--tasks", "digits"], "did you mean 'minmax'"),
        (["run", "--tasks", "digts"], "did you mean 'digits'"),
        (["run", "--tasks", "digits", "--models", "nope"], "has no model 'nope'"),
        (["run", "--tasks", "digits", "--config", "minmax.nope=1"], "no field 'nope'"),
        (["run", "--tasks", "digits", "--config", "minmax=1"], "METHOD.FIELD=VALUE"),
        (["run", "--tasks", "digits", "--calib-size", "0"], "at least 1"),
        (["run", "--tasks", "digits", "--device", "tpu"], "unknown device"),
        (["run", "--seeds", "a,b"], "seeds are integers"),
        (["run", "--overwrite", "sometimes"], "invalid choice"),
        (["frobnicate"], "invalid choice"),
        (["report", "/nonexistent/results"], "holds no benchsuite results"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(argv, expected, capsys):
    assert main(argv) == EXIT_USAGE
    assert expected in one_line_error(capsys)


def test_list_names_methods_tasks_and_defaults(capsys):
    assert main(["list"]) == EXIT_OK
    out = capsys.readouterr().out
    for word in ("fp32", "minmax", "digits", "vit-tiny-digits", "calib_size", "top1", "available"):
        assert word in out


def test_dry_run_prints_the_plan_without_running(tmp_path, capsys):
    assert main(["run", "--tasks", "digits", "--methods", "fp32,minmax", "--bits", "w4a4,w6a6", "--seeds", "0,1", "--out", str(tmp_path), "--dry-run"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "5 cells planned" in out
    assert out.count("run ") == 5
    assert not (tmp_path / "cells").exists()


def test_run_and_report_on_the_toy_task(toy_plugins, tmp_path, capsys):
    argv = ["run", "--tasks", "toy", "--methods", "fp32,minmax,explode", "--bits", "w8a8", "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == EXIT_CELLS_FAILED  # explode fails, the rest finishes
    captured = capsys.readouterr()
    assert "minmax" in captured.out and "fp32" in captured.out
    assert "failed toy/toy-vit explode w8a8" in captured.err
    for suffix in ("md", "csv", "tex", "html"):
        assert (tmp_path / f"leaderboard.{suffix}").exists()
    assert main(["report", str(tmp_path), "--format", "csv"]) == EXIT_OK
    assert "minmax" in capsys.readouterr().out
    out_file = tmp_path / "board.tex"
    assert main(["report", str(tmp_path), "--format", "tex", "--output", str(out_file)]) == EXIT_OK
    assert "\\toprule" in out_file.read_text()
    cells = sorted((tmp_path / "cells").glob("*.json"))
    assert len(cells) == 3
    record = json.loads(next(p for p in cells if "__minmax__" in p.name).read_text())
    assert record["status"] == "ok" and record["calibration"]["size"] == 32
