"""LayerNorm scale reparameterization (RepQ-ViT §4).

Everything is built in float64 so that "unchanged" and "identical" can be checked to ~1e-10.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from benchsuite.quant.calibration import observe
from benchsuite.quant.canonical import InputKind, LayerNormPair, Role
from benchsuite.quant.init_search import search_uniform_params
from benchsuite.quant.modules import QuantLinear
from benchsuite.quant.quantizers import UniformQuantizer
from benchsuite.quant.reparam import reparameterize_layernorm, reparameterize_pair

PROPERTY = settings(max_examples=25, deadline=None)

case_st = st.fixed_dictionaries(
    {
        "channels": st.integers(2, 24),
        "outputs": st.lists(st.integers(1, 12), min_size=1, max_size=3),
        "tokens": st.integers(1, 40),
        "bits": st.integers(2, 8),
        "seed": st.integers(0, 2**31 - 1),
        "bias": st.booleans(),
    }
)


def build(case: dict) -> tuple[nn.LayerNorm, list[nn.Linear], torch.Tensor]:
    """A LayerNorm with outlier-channel affine parameters, its Linears, and an input batch."""
    gen = torch.Generator().manual_seed(case["seed"])
    c = case["channels"]
    norm = nn.LayerNorm(c, dtype=torch.float64)
    with torch.no_grad():
        # Log-uniform γ over two decades: per-channel ranges differ, as after a real ViT LayerNorm.
        norm.weight.copy_(torch.exp(torch.empty(c, dtype=torch.float64).uniform_(-2.3, 2.3, generator=gen)))
        norm.bias.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
    linears = []
    for index, out in enumerate(case["outputs"]):
        linear = nn.Linear(c, out, bias=case["bias"] or index > 0, dtype=torch.float64)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(out, c, generator=gen, dtype=torch.float64) / c**0.5)
            if linear.bias is not None:
                linear.bias.copy_(torch.randn(out, generator=gen, dtype=torch.float64))
        linears.append(linear)
    x = torch.randn(3, case["tokens"], c, generator=gen, dtype=torch.float64) * 2 + 1
    return norm, linears, x


def fq(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return (torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1) - zero) * scale


def outputs(norm: nn.LayerNorm, linears: list[nn.Linear], x: torch.Tensor, quant=None) -> list[torch.Tensor]:
    with torch.no_grad():
        h = norm(x)
        if quant is not None:
            h = quant(h)
        return [linear(h) for linear in linears]


def scale_of(reference: list[torch.Tensor]) -> float:
    return max(float(r.abs().max()) for r in reference) + 1.0


@given(case_st, st.booleans())
@PROPERTY
def test_float_function_unchanged(case: dict, round_zero: bool) -> None:
    norm, linears, x = build(case)
    before = outputs(norm, linears, x)
    scale, zero = search_uniform_params(norm(x).detach(), case["bits"], "channel", -1)
    s_mean, z_mean = reparameterize_layernorm(norm, linears, scale, zero, round_mean_zero_point=round_zero)
    after = outputs(norm, linears, x)
    tol = 1e-10 * scale_of(before)
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b, rtol=0, atol=tol)
    assert float(s_mean) == pytest.approx(float(scale.mean()), rel=1e-12)
    assert float(z_mean) == (round(float(zero.mean())) if round_zero else pytest.approx(float(zero.mean())))
    assert all(linear.bias is not None for linear in linears)  # a missing bias was created


@given(case_st)
@PROPERTY
def test_rounded_mean_zero_point_is_exact(case: dict) -> None:
    norm, linears, x = build(case)
    bits = case["bits"]
    scale, zero = search_uniform_params(norm(x).detach(), bits, "channel", -1)
    per_channel = outputs(norm, linears, x, lambda h: fq(h, scale, zero, bits))
    s_mean, z_mean = reparameterize_layernorm(norm, linears, scale, zero, round_mean_zero_point=True)
    per_tensor = outputs(norm, linears, x, lambda h: fq(h, s_mean, z_mean, bits))
    tol = 1e-10 * scale_of(per_channel)
    for pc, pt in zip(per_channel, per_tensor):
        torch.testing.assert_close(pt, pc, rtol=0, atol=tol)


@pytest.mark.parametrize("seed", range(4))
def test_unrounded_mean_zero_point_is_close_but_not_identical(seed: int) -> None:
    case = {"channels": 64, "outputs": [48], "tokens": 200, "bits": 4, "seed": seed, "bias": True}
    norm, linears, x = build(case)
    float_out = outputs(norm, linears, x)[0]
    h = norm(x).detach()
    scale, zero = search_uniform_params(h, 4, "channel", -1)
    naive_scale, naive_zero = search_uniform_params(h, 4, "tensor")
    per_channel = outputs(norm, linears, x, lambda t: fq(t, scale, zero, 4))[0]
    naive = outputs(norm, linears, x, lambda t: fq(t, naive_scale, naive_zero, 4))[0]

    s_mean, z_mean = reparameterize_layernorm(norm, linears, scale, zero)  # reference default
    assert float(z_mean) != round(float(z_mean))
    reparam = outputs(norm, linears, x, lambda t: fq(t, s_mean, z_mean, 4))[0]

    def rel_mse(out: torch.Tensor) -> float:
        return float((out - float_out).pow(2).mean() / float_out.pow(2).mean())

    assert not torch.allclose(reparam, per_channel, rtol=0, atol=1e-6)
    # The grid moves by frac(z̃) but keeps each channel's resolution: about per-channel error,
    # several times below plain per-tensor quantization of the unmodified output.
    assert rel_mse(reparam) < 1.5 * rel_mse(per_channel)
    assert rel_mse(naive) > 2.5 * rel_mse(reparam)


def test_layernorm_without_bias_and_shapes_of_quantizer_buffers() -> None:
    gen = torch.Generator().manual_seed(7)
    norm = nn.LayerNorm(6, bias=False, dtype=torch.float64)
    linear = nn.Linear(6, 3, bias=False, dtype=torch.float64)
    x = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64)
    before = outputs(norm, [linear], x)[0]
    scale = torch.rand(1, 1, 6, generator=gen, dtype=torch.float64) + 0.1  # a quantizer's layout
    zero = torch.randint(0, 16, (1, 1, 6), generator=gen).double()
    reparameterize_layernorm(norm, [linear], scale, zero)
    assert norm.bias is not None and linear.bias is not None
    torch.testing.assert_close(outputs(norm, [linear], x)[0], before, rtol=0, atol=1e-12)


def test_rejects_mismatches() -> None:
    norm, linears, _ = build({"channels": 4, "outputs": [3], "tokens": 2, "bits": 4, "seed": 0, "bias": True})
    ok_scale, ok_zero = torch.ones(4), torch.zeros(4)
    with pytest.raises(ValueError, match="channels"):
        reparameterize_layernorm(norm, linears, torch.ones(5), torch.zeros(5))
    with pytest.raises(ValueError):
        reparameterize_layernorm(norm, [nn.Linear(5, 2)], ok_scale, ok_zero)
    with pytest.raises(ValueError):
        reparameterize_layernorm(norm, [], ok_scale, ok_zero)
    with pytest.raises(ValueError, match="positive"):
        reparameterize_layernorm(norm, linears, torch.tensor([1.0, 0.0, 1.0, 1.0]), ok_zero)
    with pytest.raises(TypeError):
        reparameterize_layernorm(nn.BatchNorm1d(4), linears, ok_scale, ok_zero)
    with pytest.raises(ValueError, match="affine"):
        reparameterize_layernorm(nn.LayerNorm(4, elementwise_affine=False), linears, ok_scale, ok_zero)


def test_reparameterize_pair_rewires_quantizers() -> None:
    case = {"channels": 16, "outputs": [12, 5], "tokens": 30, "bits": 4, "seed": 3, "bias": False}
    norm, linears, x = build(case)
    wrapped = [QuantLinear.from_float(linear, Role.QKV, InputKind.POST_LAYERNORM) for linear in linears]
    shared = UniformQuantizer(4, "channel", -1, init="percentile_mse")
    for module in wrapped:
        module.set_input_quantizer(0, shared)
        weight_q = UniformQuantizer(4, "channel", 0, init="percentile_mse")
        module.set_weight_quantizer(weight_q)
        observe(None, [weight_q], [module.weight])
    observe(lambda batch: [m(norm(batch)) for m in wrapped], [shared], [x])
    float_model = copy.deepcopy((norm, wrapped))

    s_mean, z_mean = reparameterize_pair(LayerNormPair(norm, list(wrapped)))
    assert not shared.per_channel and shared.scale.shape == (1,)
    assert float(shared.scale) == pytest.approx(float(s_mean))
    assert float(shared.zero_point) == pytest.approx(float(z_mean))
    assert all(not m.weight_quantizer.initialized for m in wrapped)  # re-fit on W̃ next time
    assert wrapped[0].bias is not None and wrapped[0].weight is linears[0].weight  # edited in place

    ref_norm, ref_wrapped = float_model
    with torch.no_grad():
        for module, ref in zip(wrapped, ref_wrapped):
            module.weight_quantizer.enabled = ref.weight_quantizer.enabled = False
            shared.enabled = ref.input_quantizer(0).enabled = False
            torch.testing.assert_close(module(norm(x)), ref(ref_norm(x)), rtol=0, atol=1e-10)
            shared.enabled = ref.input_quantizer(0).enabled = True
            got, want = module(norm(x)), ref(ref_norm(x))  # per tensor after vs per channel before
            assert float((got - want).pow(2).mean()) < 0.05 * float(want.pow(2).mean())

    other = UniformQuantizer(4, "channel", -1)
    observe(None, [other], [torch.randn(2, 16, dtype=torch.float64) * 5])
    norm2, linears2, x2 = build(case)
    pair = [QuantLinear.from_float(linear, Role.QKV, InputKind.POST_LAYERNORM) for linear in linears2]
    first = UniformQuantizer(4, "channel", -1)
    observe(None, [first], [norm2(x2).detach()])
    pair[0].set_input_quantizer(0, first)
    pair[1].set_input_quantizer(0, other)
    with pytest.raises(ValueError, match="different parameters"):
        reparameterize_pair(LayerNormPair(norm2, pair))
    pair[1].set_input_quantizer(0, None)
    with pytest.raises(ValueError, match="per-channel UniformQuantizer"):
        reparameterize_pair(LayerNormPair(norm2, pair))
