"""repq-vit at w6a6 on a slice of the real assets (skipped when ../shared/assets is absent)."""

from __future__ import annotations

import math

import pytest
from conftest import ASSETS

from benchsuite.api import Cell
from benchsuite.bits import BitSpec
from benchsuite.runner import RunSettings, execute_cell


@pytest.mark.real_assets
@pytest.mark.slow
def test_repq_vit_w6a6_on_the_real_dinov2_probe(tmp_path):
    root = ASSETS / "imagenet"
    weights = ASSETS / "weights" / "dinov2_vits14_in1k_probe.safetensors"
    if not (root.is_dir() and weights.is_file()):
        pytest.skip("../shared/assets is absent")
    settings = RunSettings(tmp_path, data_roots=(("imagenet", root),), weights=(("imagenet", weights),),
                           eval_limit=48, eval_batch_size=48)
    cell = Cell("imagenet", "vit_small_patch14_dinov2", "repq-vit", BitSpec(6, 6), 0, calib_size=8)
    result = execute_cell(cell, settings)
    assert result.ok, result.error
    assert len(result.calibration["sample_ids"]) == 8
    assert result.config["fields"]["post_layernorm"] == "reparam"
    assert result.method_info["layernorm_pairs"] == 24
    assert 0.0 <= result.metrics["agreement"] <= 100.0 and math.isfinite(result.metrics["kl_to_float"])
    assert result.float_metrics["top1"] > 0.0
    assert result.data["preprocess"]["crop_pct"] == 0.875
