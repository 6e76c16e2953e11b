"""isvit: quantizer placement per role, the three stages, ablation switches, config."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from benchsuite.api import CalibrationSet
from benchsuite.bits import BitSpec
from benchsuite.methods.isvit import ISViT, ISViTConfig
from benchsuite.quant.adapters import adapt
from benchsuite.quant.canonical import InputKind, Role
from benchsuite.quant.quantizers import Log2Quantizer, UniformQuantizer
from benchsuite.quant.sulq import SULQuantizer
from test_every_method import tiny_swin
from toy_plugins import toy_vit


def run(factory=toy_vit, size=16, bits=BitSpec(4, 4), **overrides):
    model = adapt(factory())
    images = torch.randn(16, 3, size, size, generator=torch.Generator().manual_seed(0))
    calibration = CalibrationSet.from_tensor(images, [str(i) for i in range(16)], "random", 0)
    settings = {"budget": "fast", "iters": 3, "batch_size": 8, "init_size": 8, **overrides}
    config = dataclasses.replace(ISViTConfig(), **settings)
    method = ISViT()
    return method.quantize(model, calibration, bits, config), method, images


@pytest.mark.parametrize("factory,size", [(toy_vit, 16), (tiny_swin, 32)])
def test_quantizers_by_role_after_the_three_stages(factory, size):
    model, method, _ = run(factory, size)
    for site in model.sites():
        for kind, slot in zip(site.input_kinds, site.module.input_quantizers):
            if kind is InputKind.IMAGE:
                assert not isinstance(slot, UniformQuantizer), "the image input stays float"
            elif kind is InputKind.POST_SOFTMAX:
                assert isinstance(slot, SULQuantizer) and slot.initialized
            else:
                assert isinstance(slot, UniformQuantizer) and slot.initialized
                assert not slot.per_channel, f"{site.name}: per tensor after stage 2"
        if site.module.has_weight:
            weight_quantizer = site.module.weight_quantizer
            assert isinstance(weight_quantizer, UniformQuantizer) and weight_quantizer.per_channel
    info = method.run_info(model)
    assert set(info["units"]) == {"stage1", "stage3"}
    stage1 = [u["name"] for u in info["units"]["stage1"]]
    assert "patch_embed.proj" not in stage1, "a float patch embedding has nothing to tune in stage 1"
    assert "patch_embed.proj" in [u["name"] for u in info["units"]["stage3"]]
    reductions = [s for s in model.sites() if s.role is Role.REDUCTION]
    assert info["reparameterized_pairs"] == len(list(model.layernorm_pairs())) - len(reductions)


def test_stage_switches_and_log2_ablation():
    model, method, _ = run(stage1=False, softmax_quantizer="log2")
    assert set(method.run_info(model)["units"]) == {"stage3"}
    softmax = [s.module.input_quantizer(0) for s in model.sites() if s.role is Role.MATMUL_AV]
    assert softmax and all(isinstance(q, Log2Quantizer) for q in softmax)
    model, method, _ = run(stage3=False)
    assert set(method.run_info(model)["units"]) == {"stage1"}


def test_sulq_eta_per_layer_is_recorded_and_the_model_runs():
    model, method, images = run(iters=5)
    sulq = [q for s in model.sites() for q in s.module.quantizers() if isinstance(q, SULQuantizer)]
    etas = [float(q.eta) for q in sulq]
    assert etas == method.run_info(model)["sulq_eta"]
    with torch.no_grad():
        out = model(images)
    assert torch.isfinite(out).all()


def test_config_resolves_the_budget_and_round_trips():
    paper = ISViTConfig().resolve(BitSpec(4, 4))
    assert (paper.iters, paper.calib_size) == (1000, 1024)
    assert ISViTConfig().resolve(BitSpec(6, 6)).iters == 200
    fast = ISViTConfig(budget="fast").resolve(BitSpec(3, 3))
    assert fast.iters < 1000 and fast.calib_size < 1024
    assert ISViTConfig(iters=7).resolve(BitSpec(4, 4)).iters == 7
    config = ISViTConfig().with_overrides({"sulq_mode": "strict", "stage1": "false", "budget": "fast"})
    assert type(config).from_dict(config.to_dict()) == config
