"""adfq-vit: quantizer placement per role, hard AdaRound on the grid, gradient modes, ablation
switches, improvement over min-max, config."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from benchsuite.api import CalibrationSet
from benchsuite.bits import BitSpec
from benchsuite.errors import ConfigError
from benchsuite.methods.adfq_vit import ADFQViT, ADFQViTConfig
from benchsuite.methods.minmax import MinMax
from benchsuite.quant.adapters import adapt
from benchsuite.quant.adaround import AdaRoundQuantizer
from benchsuite.quant.calibration import fit_weight_quantizer
from benchsuite.quant.canonical import InputKind, Role
from benchsuite.quant.outlier import PerPatchOutlierQuantizer
from benchsuite.quant.quantizers import LogSqrt2Quantizer, UniformQuantizer
from benchsuite.quant.reconstruct import build_units, output_mse
from benchsuite.quant.shift_log import ShiftLogQuantizer
from test_every_method import tiny_swin
from toy_plugins import toy_vit


def calibration(count: int, size: int, seed: int = 0) -> tuple[CalibrationSet, torch.Tensor]:
    images = torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return CalibrationSet.from_tensor(images, [str(i) for i in range(count)], "random", seed), images


def run(factory=toy_vit, size=16, bits=BitSpec(4, 4), count=8, **overrides):
    calib, images = calibration(count, size)
    settings = {"budget": "fast", "iters": 2, "batch_size": 8, **overrides}
    config = dataclasses.replace(ADFQViTConfig(), **settings)
    method = ADFQViT()
    model = method.quantize(adapt(factory()), calib, bits, config)
    return model, method, images


def input_slots(model):
    for site in model.sites():
        for index, kind in enumerate(site.input_kinds):
            yield site, index, kind, site.module.input_quantizer(index)


# -- placement ---------------------------------------------------------------------------------


#: Per-patch Δ layouts: ViT 16 patches + cls; Swin qkv a 4×4 window, fc1 all positions (8×8, 4×4).
TOKEN_LAYOUTS = {
    "toy_vit": {"blocks.0.attn.qkv": 17, "blocks.1.mlp.fc1": 17},
    "tiny_swin": {"layers.0.blocks.0.attn.qkv": 16, "layers.0.blocks.0.mlp.fc1": 64, "layers.1.blocks.0.mlp.fc1": 16},
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: intra-op threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("factory,size", [(toy_vit, 16), (tiny_swin, 32)])
def test_quantizers_by_role_and_hard_adaround_on_the_grid(factory, size):
    model, method, images = run(factory, size)
    for name, tokens in TOKEN_LAYOUTS[factory.__name__].items():
        site = next(s for s in model.sites() if s.name == name)
        assert tuple(site.module.input_quantizer(0).scale.shape) == (1, tokens, 1), name
    per_patch_names = []
    for site, index, kind, q in input_slots(model):
        assert q is not None and q.enabled and q.initialized, f"{site.name}[{index}]"
        assert q.bits == 4, "every input at a_bits, first and last layers included"
        role = site.role
        if role in (Role.QKV, Role.FC1):
            assert isinstance(q, PerPatchOutlierQuantizer) and q.alpha == 5.0
            assert q.gradient_mode == "reference" and q.token_dims == (-2,)
            assert isinstance(q.scale, nn.Parameter), "per-patch Δ is trained"
            assert q.scale.ndim == 3 and q.scale.shape[0] == 1 and q.scale.shape[2] == 1
            per_patch_names.append(site.name)
        elif role is Role.FC2:
            assert isinstance(q, ShiftLogQuantizer) and q.base == "sqrt2" and q.shift_mode == "dynamic"
            assert isinstance(q.scale, nn.Parameter), "shift-log δ is trained"
        elif kind is InputKind.POST_SOFTMAX:
            assert type(q) is LogSqrt2Quantizer and not q.straight_through
            assert not isinstance(q.scale, nn.Parameter), "softmax quantizer is never trained"
        elif role in (Role.MATMUL_QK, Role.MATMUL_AV):  # Q, K and V
            assert isinstance(q, UniformQuantizer) and q.init == "lp_search" and q.lp_norm == 2.4
            assert q.straight_through and not q.per_channel
            assert not isinstance(q.scale, nn.Parameter), "Q/K/V are never trained"
        else:  # proj, image, head, reduction
            assert isinstance(q, UniformQuantizer) and q.init == "percentile_mse" and not q.per_channel
            assert not q.straight_through, "reference gradient mode: plain rounding"
            assert isinstance(q.scale, nn.Parameter), "Linear/Conv input Δ is trained"

        if site.module.has_weight:
            wq = site.module.weight_quantizer
            assert isinstance(wq, AdaRoundQuantizer) and wq.is_hard and wq.bits == 4
            assert wq.scale.shape[0] == site.module.weight.shape[0], "per output channel"
            with torch.no_grad():
                codes = site.module.quantized_weight() / wq.scale + wq.zero_point
            torch.testing.assert_close(codes, codes.round(), atol=1e-3, rtol=0)
            assert codes.min() >= -1e-3 and codes.max() <= 15 + 1e-3

    info = method.run_info(model)
    assert set(info["outlier_ratios"]) == set(per_patch_names)
    assert all(0.0 <= r <= 1.0 for r in info["outlier_ratios"].values())
    assert [u["name"] for u in info["units"]] == [u.name for u in build_units(model, "module")]
    assert all(u["iters"] == 2 for u in info["units"]) and info["iters_per_unit"] == 2
    assert info["gradient_mode"] == "reference"
    assert all(p.grad is None for p in model.parameters()), "no gradients left behind"
    with torch.no_grad():
        assert torch.isfinite(model(images)).all()


# -- gradient modes ------------------------------------------------------------------------------


def _changed_fraction(model, bits: int = 4):
    """Per Linear: (fraction of its AdaRound V that moved from the initial V) by row slice."""
    out = {}
    for site in model.sites():
        if not site.module.has_weight:
            continue
        initial = AdaRoundQuantizer.from_uniform(
            fit_weight_quantizer(site.module, bits, ADFQViTConfig().weight_percentiles), site.module.weight
        ).v
        out[site.name] = (site.module.weight_quantizer.v != initial)
    return out


@pytest.mark.parametrize("mode", ["reference", "ste"])
def test_gradient_mode_decides_which_roundings_train(mode):
    """Spec §8: with the reference's gradients the KL term alone reaches the Q/K rows of qkv, V rows
    get nothing, fc1 almost nothing; with STE everywhere all of them train. Without the rounding
    regularizer, Adam leaves a V whose gradient was always zero exactly where it started."""
    model, _, _ = run(iters=3, round_reg_weight=0.0, gradient_mode=mode)
    changed = _changed_fraction(model)
    dim = 32
    for block in (0, 1):
        qkv = changed[f"blocks.{block}.attn.qkv"]
        q_k, v = qkv[: 2 * dim].float().mean(), qkv[2 * dim:].float().mean()
        fc1 = changed[f"blocks.{block}.mlp.fc1"].float().mean()
        proj = changed[f"blocks.{block}.attn.proj"].float().mean()
        fc2 = changed[f"blocks.{block}.mlp.fc2"].float().mean()
        assert q_k > 0.5 and proj > 0.5 and fc2 > 0.5
        if mode == "reference":
            assert v == 0, "the non-STE proj-input quantizer blocks the path to the V rows"
            assert fc1 < 0.2, "fc1 only through the shift-log's dynamic minimum"
        else:
            assert v > 0.5 and fc1 > 0.5
    for site in model.sites():
        for q in site.module.quantizers():
            if isinstance(q, (PerPatchOutlierQuantizer, ShiftLogQuantizer)):
                assert q.gradient_mode == mode


def test_without_attention_kl_the_reference_gradients_never_reach_qkv():
    model, method, _ = run(iters=3, round_reg_weight=0.0, attention_kl=False)
    changed = _changed_fraction(model)
    assert not changed["blocks.0.attn.qkv"].any() and not changed["blocks.1.attn.qkv"].any()
    assert all("attention_kl" not in u["last_loss_terms"] for u in method.run_info(model)["units"])


def test_attention_units_carry_the_kl_term():
    model, method, _ = run()
    terms = {u["name"]: set(u["last_loss_terms"]) for u in method.run_info(model)["units"]}
    assert terms["block0.attn"] >= {"output_mse", "attention_kl"}
    assert "attention_kl" not in terms["block0.mlp"] and "attention_kl" not in terms["head"]


# -- ablation switches ---------------------------------------------------------------------------


def test_calibration_only_gives_round_to_nearest_weights():
    model, method, _ = run(reconstruction=False)
    assert all(u["iters"] == 0 for u in method.run_info(model)["units"])
    for site in model.sites():
        if site.module.has_weight:
            expected = fit_weight_quantizer(site.module, 4, ADFQViTConfig().weight_percentiles)(site.module.weight)
            with torch.no_grad():
                torch.testing.assert_close(site.module.quantized_weight(), expected)
        for q in site.module.quantizers():
            assert not isinstance(getattr(q, "scale", None), nn.Parameter)


@pytest.mark.parametrize(
    "overrides,check",
    [
        ({"post_layernorm_quantizer": "per_tensor"}, lambda q, s: not isinstance(q, PerPatchOutlierQuantizer)
         if s.role in (Role.QKV, Role.FC1) else True),
        ({"outlier_aware": False}, lambda q, s: q.alpha == math.inf if isinstance(q, PerPatchOutlierQuantizer) else True),
        ({"post_gelu_quantizer": "uniform"}, lambda q, s: isinstance(q, UniformQuantizer) if s.role is Role.FC2 else True),
        ({"shift_mode": "static", "shift_static_min": -0.17, "shift_log_base": "2"},
         lambda q, s: (q.static_min == -0.17 and q.base == "2") if isinstance(q, ShiftLogQuantizer) else True),
        ({"gradient_mode": "ste"}, lambda q, s: getattr(q, "straight_through", True)),
        ({"qdrop_prob": 1.0, "kl_axis": "keys", "unit_granularity": "block"}, lambda q, s: True),
        ({"learn_act_scale": False}, lambda q, s: not isinstance(getattr(q, "scale", None), nn.Parameter)),
    ],
)
def test_ablation_switches(overrides, check):
    model, _, images = run(**overrides)
    for site, _, _, q in input_slots(model):
        assert check(q, site), f"{site.name}: {q}"
    with torch.no_grad():
        assert torch.isfinite(model(images)).all()


# -- quality -------------------------------------------------------------------------------------


def test_short_run_beats_minmax_at_w3a3():
    """Held-out random images, 128 of them: measured ratios 0.78-0.81 over five seeds."""
    bits = BitSpec(3, 3)
    calib, _ = calibration(32, 16)
    held_out = torch.randn(128, 3, 16, 16, generator=torch.Generator().manual_seed(100))
    with torch.no_grad():
        target = toy_vit()(held_out)
    floor = MinMax().quantize(adapt(toy_vit()), calib, bits, MinMax().default_config())
    config = dataclasses.replace(ADFQViTConfig(), budget="fast", iters=40)
    quantized = ADFQViT().quantize(adapt(toy_vit()), calib, bits, config)
    with torch.no_grad():
        floor_mse = float(output_mse(floor(held_out), target))
        ours = float(output_mse(quantized(held_out), target))
    assert ours < 0.9 * floor_mse, f"adfq-vit {ours:.5f} vs minmax {floor_mse:.5f}"


# -- config --------------------------------------------------------------------------------------


def test_config_resolves_the_budget_round_trips_and_parses_overrides():
    paper = ADFQViTConfig().resolve(BitSpec(4, 4))
    assert (paper.iters, paper.calib_size) == (3000, 1024)
    assert ADFQViTConfig().resolve(BitSpec(6, 6)).iters == 3000
    fast = ADFQViTConfig(budget="fast").resolve(BitSpec(3, 3))
    assert fast.iters < 3000 and fast.calib_size < 1024
    assert ADFQViTConfig(iters=7, calib_size=5).resolve(BitSpec(4, 4)).iters == 7

    config = ADFQViTConfig()
    assert (config.gradient_mode, config.kl_axis, config.qdrop_prob, paper.batch_size) == ("reference", "heads", 0.5, 32)
    for c in (config, paper, fast):
        assert type(c).from_dict(c.to_dict()) == c
    changed = config.with_overrides({
        "gradient_mode": "ste",
        "kl_axis": "keys",
        "attention_kl": "false",
        "fc1_outlier_alpha": "10",
        "beta_range": "20,2",
        "shift_static_min": "-0.17",
        "iters": "5000",
        "shift_log_base": "2",
    })
    assert changed.gradient_mode == "ste" and changed.kl_axis == "keys" and changed.attention_kl is False
    assert changed.fc1_outlier_alpha == 10.0 and changed.beta_range == (20, 2) and changed.iters == 5000
    assert changed.shift_static_min == -0.17 and changed.shift_log_base == "2"
    assert type(changed).from_dict(changed.to_dict()) == changed
    with pytest.raises(ConfigError):
        config.with_overrides({"gradient_mode": "lsq"})
    with pytest.raises(ConfigError):
        config.with_overrides({"no_such_field": "1"})
