"""``--executor ray`` on a local Ray cluster: same results as the local runner, resume, lost workers.

Needs the ``ray`` extra; skips without it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray")

from benchsuite import registry  # noqa: E402
from benchsuite.bits import parse_bits_list  # noqa: E402
from benchsuite.cli import main  # noqa: E402
from benchsuite.ray_executor import run_cells_on_ray  # noqa: E402
from benchsuite.results import ResultStore  # noqa: E402
from benchsuite.runner import PlanRequest, RunSettings, plan_cells, run_cells  # noqa: E402

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def local_ray():
    """A 2-CPU local cluster whose workers can import the toy plugins (tests/ on their path)."""
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


@pytest.fixture
def crash_plugin(toy_plugins):
    from toy_plugins import Crash

    registry.methods.register("crash", Crash)
    yield
    registry.methods.unregister("crash")


def _plan(tmp_path, methods):
    request = PlanRequest(methods=methods, tasks=["toy"], bits=parse_bits_list("w8a8,w4a4"))
    return plan_cells(request, RunSettings(out_dir=tmp_path))


def _by_cell(folder):
    return {(r.method, r.bits): r for r in ResultStore(folder).results()}


def test_ray_runs_the_same_cells_as_the_local_runner(local_ray, crash_plugin, tmp_path):
    cells = _plan(tmp_path, ["fp32", "minmax", "repq-vit", "explode", "crash"])
    local_cells = [c for c in cells if c.method != "crash"]  # a crash would kill this process
    run_cells(local_cells, RunSettings(out_dir=tmp_path / "local"))
    summary = run_cells_on_ray(cells, RunSettings(out_dir=tmp_path / "ray"))

    assert len(summary.ran) == len(cells) and not summary.skipped
    on_ray, local = _by_cell(tmp_path / "ray"), _by_cell(tmp_path / "local")
    for key, result in local.items():
        assert on_ray[key].status == result.status
        assert on_ray[key].metrics == result.metrics, key  # same seeds, same numbers
        assert on_ray[key].calibration == result.calibration
    assert on_ray[("explode", "w8a8")].error["type"] == "RuntimeError"
    crashed = on_ray[("crash", "w4a4")]
    assert not crashed.ok and "Ray worker running this cell died" in crashed.error["message"]
    # one float baseline on disk, computed once before the cells
    assert len(list(ResultStore(tmp_path / "ray").float_dir.glob("*.json"))) == 1

    # resume: finished cells are skipped, failed ones rerun under only-missing
    again = run_cells_on_ray([c for c in cells if c.method in ("fp32", "minmax")], RunSettings(out_dir=tmp_path / "ray"))
    assert not again.ran and len(again.skipped) == 3


def test_cli_executor_ray(local_ray, toy_plugins, tmp_path, capsys):
    argv = ["run", "--methods", "fp32,minmax", "--tasks", "toy", "--bits", "w8a8", "--out", str(tmp_path),
            "--no-progress", "--executor", "ray"]
    assert main(argv) == 0
    assert {r.method for r in ResultStore(tmp_path).results() if r.ok} == {"fp32", "minmax"}
    assert "minmax" in capsys.readouterr().out
    assert main(["run", "--tasks", "toy", "--methods", "minmax", "--ray-address", "auto", "--out", str(tmp_path)]) == 2
    assert "--ray-address needs --executor ray" in capsys.readouterr().err
