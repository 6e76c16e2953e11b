"""The runner: planning, float baseline sharing, cell isolation, resume, interruption, seeding."""

from __future__ import annotations

import pytest

from benchsuite.api import Cell
from benchsuite.bits import BitSpec, parse_bits_list
from benchsuite.errors import ConfigError, UnknownNameError
from benchsuite.results import ResultStore
from benchsuite.runner import PlanRequest, RunSettings, execute_cell, plan_cells, run_cells


def request(methods=("fp32", "minmax"), bits="w8a8,w4a4", seeds=(0, 1), **kwargs) -> PlanRequest:
    return PlanRequest(methods=methods, tasks=("toy",), bits=parse_bits_list(bits), seeds=seeds, **kwargs)


def test_plan_is_the_cross_product_with_one_float_cell(toy_plugins, tmp_path):
    cells = plan_cells(request(), RunSettings(tmp_path))
    assert [c.method for c in cells].count("fp32") == 1
    assert next(c for c in cells if c.method == "fp32").bits.is_float
    quantized = [c for c in cells if c.method == "minmax"]
    assert {(c.bits.name, c.seed) for c in quantized} == {("w8a8", 0), ("w8a8", 1), ("w4a4", 0), ("w4a4", 1)}
    assert len({c.key for c in cells}) == len(cells)


def test_plan_rejects_unknown_model_and_bad_overrides(toy_plugins, tmp_path):
    with pytest.raises(UnknownNameError, match="did you mean 'toy-vit'"):
        plan_cells(request(models=("toy-vt",)), RunSettings(tmp_path))
    with pytest.raises(ConfigError, match="no field 'iters'"):
        plan_cells(request(config_overrides={"minmax": {"iters": "3"}}), RunSettings(tmp_path))
    with pytest.raises(ConfigError, match="not in --methods"):
        plan_cells(request(methods=("fp32",), config_overrides={"minmax": {"calib_size": "3"}}), RunSettings(tmp_path))


def test_overrides_reach_the_config_of_their_method_only(toy_plugins, tmp_path):
    cells = plan_cells(request(seeds=(0,), bits="w8a8", config_overrides={"minmax": {"calib_size": "5"}}), RunSettings(tmp_path))
    summary = run_cells(cells, RunSettings(tmp_path))
    by_method = {r.method: r for r in summary.ran}
    assert by_method["minmax"].config["fields"]["calib_size"] == 5
    assert by_method["minmax"].calibration["size"] == 5
    assert by_method["fp32"].cell["config_overrides"] == {}


def test_isolation_resume_and_shared_float_baseline(toy_plugins, tmp_path):
    settings = RunSettings(tmp_path)
    cells = plan_cells(request(methods=("fp32", "explode", "minmax"), bits="w8a8", seeds=(0,)), settings)
    summary = run_cells(cells, settings)
    assert len(summary.ran) == 3 and not summary.interrupted
    failed = summary.failed
    assert [r.method for r in failed] == ["explode"]
    assert failed[0].error["type"] == "RuntimeError" and "boom at w8a8" in failed[0].error["message"]
    assert "Traceback" in failed[0].error["traceback"]
    fp, mm = (next(r for r in summary.ran if r.method == m) for m in ("fp32", "minmax"))
    assert fp.metrics["top1"] == 100.0 and mm.float_metrics == fp.metrics
    assert mm.metrics["agreement"] > 90.0  # w8a8 min-max on a random tiny ViT barely changes it
    # float model built once for the baseline (shared by all three cells), plus once per quantizing cell
    assert toy_plugins.builds == 1 + 2
    assert ResultStore(tmp_path).load_float("toy", "toy-vit")["metrics"]["top1"] == 100.0

    toy_plugins.builds = 0
    again = run_cells(cells, settings)  # only-missing: the failed cell runs again, nothing else
    assert [r.method for r in again.ran] == ["explode"] and len(again.skipped) == 2
    assert toy_plugins.builds == 1  # the rerun cell only: the float baseline came from disk

    never = run_cells(cells, RunSettings(tmp_path, overwrite="never"))
    assert never.ran == [] and len(never.skipped) == 3
    always = run_cells(cells, RunSettings(tmp_path, overwrite="always"))
    assert len(always.ran) == 3


def test_interrupt_keeps_finished_cells(toy_plugins, tmp_path, monkeypatch):
    from toy_plugins import ToyTask

    settings = RunSettings(tmp_path)
    cells = plan_cells(request(methods=("minmax",), bits="w8a8,w4a4", seeds=(0,)), settings)
    real_evaluate = ToyTask.evaluate
    calls = {"n": 0}

    def evaluate_then_interrupt(self, model, model_name, reference=None):
        calls["n"] += 1
        if calls["n"] == 3:  # float baseline, first cell, then Ctrl-C in the second cell
            raise KeyboardInterrupt
        return real_evaluate(self, model, model_name, reference)

    monkeypatch.setattr(ToyTask, "evaluate", evaluate_then_interrupt)
    summary = run_cells(cells, settings)
    assert summary.interrupted and len(summary.ran) == 1
    store = ResultStore(tmp_path)
    assert store.has_ok(cells[0]) and not store.cell_path(cells[1]).exists()
    monkeypatch.setattr(ToyTask, "evaluate", real_evaluate)
    resumed = run_cells(cells, settings)
    assert [c.key for c in resumed.skipped] == [cells[0].key] and len(resumed.ran) == 1


def test_a_cell_is_a_function_of_the_cell_and_its_seed(toy_plugins, tmp_path):
    settings = RunSettings(tmp_path)
    cell = Cell("toy", "toy-vit", "minmax", BitSpec(4, 4), 3)
    first, second = execute_cell(cell, settings), execute_cell(cell, settings)
    assert first.ok and first.metrics == second.metrics
    assert first.calibration == second.calibration
    other = execute_cell(Cell("toy", "toy-vit", "minmax", BitSpec(4, 4), 4), settings)
    assert other.calibration["sample_ids"] != first.calibration["sample_ids"]
    assert first.config["fields"]["calib_size"] == 32
    assert first.versions["torch"] and first.versions["timm"] and first.versions["benchsuite"]
    assert first.peak_memory_mb > 0 and first.calibration_seconds >= 0


def test_float_baseline_without_outputs_is_read_back_from_disk(toy_plugins, tmp_path, monkeypatch):
    """A task whose evaluation keeps no outputs (COCO) must not recompute its float model per run."""
    original = toy_plugins.evaluate

    def no_outputs(self, model, model_name, reference=None):
        evaluation = original(self, model, model_name, reference)
        evaluation.outputs = None
        return evaluation

    monkeypatch.setattr(toy_plugins, "evaluate", no_outputs)
    settings = RunSettings(tmp_path)
    cells = plan_cells(request(methods=("fp32", "minmax"), bits="w8a8", seeds=(0,)), settings)
    run_cells(cells, settings)
    toy_plugins.builds = 0
    run_cells(cells, RunSettings(tmp_path, overwrite="always"))
    assert toy_plugins.builds == 1  # the minmax cell's model only; the float baseline came from disk
