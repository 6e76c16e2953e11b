"""``benchsuite bench``: the figures are measured, consistent with each other, and printed."""

from __future__ import annotations

import json

import pytest
import torch

from benchsuite.bench import bench_method, matmul_peak_flops
from benchsuite.bits import BitSpec
from benchsuite.cli import main
from toy_plugins import toy_vit


def test_matmul_peak_is_a_positive_rate():
    assert matmul_peak_flops(size=256, repeats=2) > 1e6


@pytest.mark.parametrize("method", ["minmax", "isvit"])
def test_bench_method_measures_steps_flops_and_ratios(method):
    calib = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    row = bench_method(method, toy_vit, calib, calib, BitSpec(4, 4), overrides={"iters": "2", "batch_size": "4"}
                       if method == "isvit" else {}, batch_size=4, repeats=1, peak=1e12)
    assert row.calibration_seconds > 0 and row.float_forward_seconds > 0
    assert row.calibration_ratio == pytest.approx(row.calibration_seconds / row.float_forward_seconds)
    assert row.eval_ratio > 0 and row.peak_memory_mb > 0
    if method == "isvit":  # two stages, 2 steps per tuned unit
        assert row.steps > 0 and row.steps % 2 == 0
        assert row.step_flops > 0 and row.achieved_flops_per_second > 0
        assert row.peak_share == pytest.approx(row.achieved_flops_per_second / 1e12)
    else:
        assert row.steps == 0 and row.achieved_flops_per_second is None


def test_cli_bench(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--methods", "minmax", "--model", "test_vit", "--calib-size", "2", "--eval-images", "2",
            "--batch-size", "2", "--repeats", "1", "--json", str(out)]
    assert main(argv) == 0
    assert "minmax" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["rows"][0]["method"] == "minmax" and data["matmul_peak_flops"] > 0
    assert main(["bench", "--model", "not_a_model"]) == 2
    assert "timm model" in capsys.readouterr().err
