"""Quantizers, the fake-quant wrappers that hold them, and the shared calibration helpers.

The quantizer properties are checked with hypothesis over shapes, bit widths, granularities and
value ranges, since a quantizer that is right on the tensors one thinks of and wrong on a
constant channel or a one-signed range would silently distort every method built on it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

from benchsuite.quant.calibration import iter_quantizers, observe, observing, set_enabled
from benchsuite.quant.canonical import CanonicalModel, InputKind, Role, Site
from benchsuite.quant.modules import QuantConv2d, QuantLinear, QuantMatMul
from benchsuite.quant.quantizers import Quantizer, UniformQuantizer, round_ste

PROPERTY = settings(max_examples=60, deadline=None)

bits_st = st.integers(min_value=2, max_value=8)
values_st = st.floats(-1e3, 1e3, width=32, allow_nan=False, allow_subnormal=False)
shapes_st = hnp.array_shapes(min_dims=1, max_dims=4, max_side=6)
arrays_st = hnp.arrays(np.float32, shapes_st, elements=values_st)


@st.composite
def calibrated(draw) -> tuple[UniformQuantizer, torch.Tensor]:
    """A quantizer of random configuration, calibrated on the tensor returned with it."""
    x = torch.from_numpy(draw(arrays_st))
    granularity = draw(st.sampled_from(["tensor", "channel"]))
    channel_dim = draw(st.integers(-x.ndim, x.ndim - 1))
    q = UniformQuantizer(draw(bits_st), granularity, channel_dim, symmetric=draw(st.booleans()))
    calibrate(q, x)
    return q, x


def calibrate(q: Quantizer, *batches: torch.Tensor) -> None:
    observe(None, [q], batches)


def per_channel_view(q: UniformQuantizer, x: torch.Tensor) -> torch.Tensor:
    """``x`` as (channels, everything else); one row per tensor when per tensor."""
    if not q.per_channel:
        return x.reshape(1, -1)
    return x.movedim(q.channel_dim % x.ndim, 0).reshape(x.shape[q.channel_dim], -1)


def float_slack(x: torch.Tensor) -> float:
    """Room for float32 rounding in x/Δ + z and (x_int − z)·Δ, relative to the data's size."""
    return 1e-6 * float(x.abs().max()) + 1e-12


# --------------------------------------------------------------------------------------------
# round_ste and the state machine
# --------------------------------------------------------------------------------------------


def test_round_ste_rounds_forward_and_passes_gradient() -> None:
    x = torch.tensor([-2.5, -1.4, -0.5, 0.2, 0.5, 1.5, 2.6], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y, torch.round(x.detach()))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@given(arrays_st)
@PROPERTY
def test_observing_returns_input_unchanged(array: np.ndarray) -> None:
    x = torch.from_numpy(array)
    q = UniformQuantizer(4)
    q.observing = True
    out = q(x)
    assert out is x
    assert torch.equal(x, torch.from_numpy(array))
    assert q.has_observations and not q.initialized


@given(calibrated())
@PROPERTY
def test_identity_when_disabled(case: tuple[UniformQuantizer, torch.Tensor]) -> None:
    q, x = case
    q.enabled = False
    assert q(x) is x


def test_identity_before_calibration_and_after_reset() -> None:
    x = torch.randn(3, 5)
    q = UniformQuantizer(4)
    assert not q.initialized and q(x) is x
    calibrate(q, x)
    assert q.initialized and not torch.equal(q(x), x)
    q.reset()
    assert not q.initialized and not q.has_observations and q(x) is x


def test_finalize_without_observations_raises() -> None:
    with pytest.raises(RuntimeError, match="observed no data"):
        UniformQuantizer(8).finalize()


@pytest.mark.parametrize("bits", [0, 17, 4.0, True])
def test_rejects_bad_bits(bits) -> None:
    with pytest.raises(ValueError):
        UniformQuantizer(bits)


# --------------------------------------------------------------------------------------------
# Properties of the grid
# --------------------------------------------------------------------------------------------


@given(calibrated(), st.integers(0, 2**31 - 1))
@PROPERTY
def test_error_at_most_half_step_inside_calibrated_range(
    case: tuple[UniformQuantizer, torch.Tensor], seed: int
) -> None:
    q, x = case
    low = q.min_val.reshape(q.scale.shape) if q.per_channel else q.min_val
    high = q.max_val.reshape(q.scale.shape) if q.per_channel else q.max_val
    # The calibration tensor itself plus fresh points drawn inside each channel's range.
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed))
    for points in (x, (low + u * (high - low)).to(x.dtype)):
        scale, _ = q.quant_params(points)
        error = (q(points) - points).abs()
        assert bool((error <= scale / 2 + float_slack(points)).all()), float((error - scale / 2).max())


@given(calibrated())
@PROPERTY
def test_at_most_two_pow_bits_levels(case: tuple[UniformQuantizer, torch.Tensor]) -> None:
    q, x = case
    # Constant tensors swept over and well beyond the range, plus scaled copies of x, so that
    # every code and both clamps get hit in every channel.
    reach = 3 * (float(x.abs().max()) + 1)
    trials = [torch.full_like(x, float(v)) for v in torch.linspace(-reach, reach, 3 * q.n_levels)]
    trials += [x * float(s) for s in torch.linspace(-3, 3, 13)]
    rows = torch.cat([per_channel_view(q, q(t)) for t in trials], dim=1)
    for row in rows:
        assert row.unique().numel() <= q.n_levels


@given(calibrated())
@PROPERTY
def test_idempotent(case: tuple[UniformQuantizer, torch.Tensor]) -> None:
    q, x = case
    once = q(x)
    assert torch.equal(q(once), once)


@given(
    low=st.floats(-100, 100, allow_nan=False),
    width=st.floats(1e-2, 200, allow_nan=False),
    bits=bits_st,
    symmetric=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
@PROPERTY
def test_straight_through_gradient(low: float, width: float, bits: int, symmetric: bool, seed: int) -> None:
    q = UniformQuantizer(bits, symmetric=symmetric)
    calibrate(q, torch.tensor([low, low + width]))
    step = float(q.scale)
    grid_low = -float(q.zero_point) * step
    grid_high = (q.qmax - float(q.zero_point)) * step
    # The grid covers the calibrated range up to half a step at each end (all of it but the top
    # half step when symmetric), so "inside" is the grid itself, kept off its float-fuzzy ends.
    u = torch.rand(64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    inside = grid_low + (0.01 + 0.98 * u) * (grid_high - grid_low)
    outside = torch.cat([grid_high + step * (1.5 + 10 * u), grid_low - step * (1.5 + 10 * u)])
    for points, expected in ((inside, 1.0), (outside, 0.0)):
        points = points.float().requires_grad_(True)
        q(points).sum().backward()
        assert torch.equal(points.grad, torch.full_like(points, expected))


def test_gradient_reaches_values_rounded_onto_the_grid_ends() -> None:
    # torch.clamp has zero gradient at its bounds; values rounded onto code 0 or 2**b - 1 are
    # still inside the range and must keep the straight-through gradient.
    q = UniformQuantizer(2)
    calibrate(q, torch.tensor([0.0, 3.0]))  # Δ = 1, z = 0, codes 0..3
    points = torch.tensor([0.0, 0.2, -0.4, 2.9, 3.0, 3.4, 3.6, -0.6], requires_grad=True)
    q(points).sum().backward()
    assert points.grad.tolist() == [1, 1, 1, 1, 1, 1, 0, 0]


# --------------------------------------------------------------------------------------------
# Granularity and layout
# --------------------------------------------------------------------------------------------


def test_per_channel_along_dim0_of_conv_weight() -> None:
    torch.manual_seed(0)
    weight = torch.randn(8, 3, 4, 4) * torch.linspace(0.1, 5, 8).reshape(8, 1, 1, 1)
    q = UniformQuantizer(4, granularity="channel", channel_dim=0)
    calibrate(q, weight)
    assert q.scale.shape == (8, 1, 1, 1) and q.zero_point.shape == (8, 1, 1, 1)
    flat = weight.reshape(8, -1)
    expected = (flat.amax(1) - flat.amin(1)) / 15
    torch.testing.assert_close(q.scale.reshape(-1), expected)
    assert torch.equal(q.zero_point.reshape(-1), torch.round(-flat.amin(1) / expected))
    # Each output channel keeps its own range: the small channel is not crushed by the large one.
    error = (q(weight) - weight).abs().reshape(8, -1).amax(1)
    assert bool((error <= q.scale.reshape(-1) / 2 + 1e-6).all())


def test_per_channel_along_last_dim_serves_any_rank() -> None:
    torch.manual_seed(0)
    tokens = torch.randn(2, 5, 6) * torch.arange(1, 7)
    q = UniformQuantizer(8, granularity="channel", channel_dim=-1)
    calibrate(q, tokens[:1], tokens[1:])
    assert q.scale.shape == (1, 1, 6)
    torch.testing.assert_close(q.min_val, tokens.amin((0, 1)))
    torch.testing.assert_close(q.max_val, tokens.amax((0, 1)))
    pooled = tokens.mean(1)  # (B, C): same channels, lower rank
    assert q(pooled).shape == pooled.shape
    with pytest.raises(ValueError, match="channels"):
        q(torch.randn(2, 7))
    with pytest.raises(ValueError, match="channel_dim"):
        UniformQuantizer(8, granularity="channel", channel_dim=2).observe(torch.randn(3, 4))


def test_per_tensor_scale_is_one_element() -> None:
    q = UniformQuantizer(8)
    calibrate(q, torch.tensor([[-1.0, 3.0]]), torch.tensor([[5.0]]))
    assert q.scale.shape == (1,)
    torch.testing.assert_close(q.scale, torch.tensor([6.0 / 255]))
    assert float(q.zero_point) == round(1.0 / (6.0 / 255))


def test_constant_tensor_gets_minimum_step() -> None:
    q = UniformQuantizer(4)
    calibrate(q, torch.zeros(10))
    assert float(q.scale) == pytest.approx(1e-8)
    assert torch.equal(q(torch.zeros(3)), torch.zeros(3))


def test_tensor_larger_than_two_pow_24_elements() -> None:
    big = torch.empty(2**24 + 7).uniform_(-1, 1, generator=torch.Generator().manual_seed(0))
    big[123] = -3.0
    big[-1] = 2.0
    q = UniformQuantizer(8)
    calibrate(q, big)
    assert float(q.min_val) == -3.0 and float(q.max_val) == 2.0


def test_set_params_and_state_dict_round_trip() -> None:
    q = UniformQuantizer(4, granularity="channel", channel_dim=0)
    q.set_params(torch.tensor([[0.5], [0.25]]), 3.0)
    assert q.initialized and q.zero_point.shape == (2, 1)
    x = torch.tensor([[1.0, -0.9], [0.3, 10.0]])
    expected = (torch.clamp(torch.round(x / q.scale) + 3, 0, 15) - 3) * q.scale
    assert torch.equal(q(x), expected)

    restored = UniformQuantizer(4, granularity="channel", channel_dim=0)
    restored.load_state_dict(q.state_dict())
    assert torch.equal(restored(x), q(x))

    with pytest.raises(ValueError):
        UniformQuantizer(4).set_params(torch.ones(2), torch.zeros(2))
    with pytest.raises(ValueError):
        q.set_params(torch.tensor([0.0, 1.0]), torch.zeros(2))


# --------------------------------------------------------------------------------------------
# Fake-quant wrappers
# --------------------------------------------------------------------------------------------


def test_quant_linear_equals_float_and_shares_parameters() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(6, 4)
    wrapped = QuantLinear.from_float(linear, Role.FC1, InputKind.POST_LAYERNORM)
    x = torch.randn(2, 3, 6)
    assert torch.equal(wrapped(x), linear(x))
    assert wrapped.weight is linear.weight and wrapped.bias is linear.bias
    assert list(wrapped.quantizers()) == [] and wrapped.input_quantizer(0) is None

    no_bias = QuantLinear.from_float(nn.Linear(6, 4, bias=False), Role.OTHER)
    assert no_bias.bias is None and no_bias(x).shape == (2, 3, 4)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_quant_conv_equals_float(padding_mode: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, padding_mode=padding_mode)
    wrapped = QuantConv2d.from_float(conv, Role.PATCH_EMBED, InputKind.IMAGE)
    x = torch.randn(2, 4, 9, 9)
    assert torch.equal(wrapped(x), conv(x))
    assert wrapped.weight is conv.weight


def test_wrapper_quantizer_slots() -> None:
    torch.manual_seed(0)
    wrapped = QuantLinear.from_float(nn.Linear(5, 3), Role.PROJ)
    x = torch.randn(4, 5)
    act, weight = UniformQuantizer(4), UniformQuantizer(4, granularity="channel", channel_dim=0)
    wrapped.set_input_quantizer(0, act)
    wrapped.set_weight_quantizer(weight)
    assert list(wrapped.quantizers()) == [act, weight]
    calibrate(weight, wrapped.weight)
    calibrate(act, x)
    assert torch.equal(wrapped(x), nn.functional.linear(act(x), weight(wrapped.weight), wrapped.bias))
    wrapped.set_input_quantizer(0, None)
    wrapped.set_weight_quantizer(None)
    assert list(wrapped.quantizers()) == []
    with pytest.raises(IndexError):
        wrapped.set_input_quantizer(1, act)


def test_quant_matmul() -> None:
    torch.manual_seed(0)
    mm = QuantMatMul(Role.MATMUL_AV, (InputKind.POST_SOFTMAX, InputKind.GENERIC))
    a, b = torch.randn(2, 3, 4, 5).softmax(-1), torch.randn(2, 3, 5, 6)
    assert torch.equal(mm(a, b), a @ b)
    assert mm.weight_quantizer is None
    with pytest.raises(TypeError, match="no weight"):
        mm.set_weight_quantizer(UniformQuantizer(4))
    qa, qb = UniformQuantizer(4), UniformQuantizer(4)
    mm.set_input_quantizer(0, qa)
    mm.set_input_quantizer(1, qb)
    observe(lambda pair: mm(*pair), [qa, qb], [(a, b)])
    assert torch.equal(mm(a, b), qa(a) @ qb(b))
    assert not torch.equal(mm(a, b), a @ b)


# --------------------------------------------------------------------------------------------
# Calibration helpers
# --------------------------------------------------------------------------------------------


def _toy_canonical() -> tuple[CanonicalModel, QuantLinear, QuantLinear]:
    first = QuantLinear.from_float(nn.Linear(4, 4), Role.FC1)
    second = QuantLinear.from_float(nn.Linear(4, 2), Role.FC2)
    body = nn.Sequential(first, nn.GELU(), second)
    sites = [Site(name, m, m.role, m.input_kinds) for name, m in (("0", first), ("2", second))]
    return CanonicalModel(body, "toy", sites, [], []), first, second


def test_iter_quantizers_yields_each_once_in_site_order() -> None:
    model, first, second = _toy_canonical()
    shared, weight = UniformQuantizer(8), UniformQuantizer(8)
    first.set_input_quantizer(0, shared)
    first.set_weight_quantizer(weight)
    second.set_input_quantizer(0, shared)
    assert list(iter_quantizers(model)) == [shared, weight]
    set_enabled(iter_quantizers(model), False)
    assert not shared.enabled and not weight.enabled


def test_observe_calibrates_then_stops_observing() -> None:
    torch.manual_seed(0)
    model, first, second = _toy_canonical()
    qs = [UniformQuantizer(8), UniformQuantizer(8)]
    first.set_input_quantizer(0, qs[0])
    second.set_input_quantizer(0, qs[1])
    batches = [torch.randn(3, 4), torch.randn(5, 4)]
    observe(model, qs, batches)
    assert all(q.initialized and not q.observing for q in qs)
    torch.testing.assert_close(qs[0].min_val, torch.cat(batches).amin().reshape(1))


def test_observe_turns_observing_off_when_forward_raises() -> None:
    q = UniformQuantizer(8)

    def explode(batch: torch.Tensor) -> None:
        q(batch)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        observe(explode, [q], [torch.randn(3)])
    assert not q.observing and not q.initialized

    with pytest.raises(KeyError), observing([q]):
        assert q.observing
        raise KeyError
    assert not q.observing


@pytest.mark.parametrize("scale_shape", [(), (8,), (1, 8, 1, 1)])
def test_fused_straight_through_matches_the_op_by_op_form(scale_shape):
    """One autograd node (speed) with the op-by-op form's values and gradients."""
    from benchsuite.quant.quantizers import _FakeQuantSTE, clamp_inclusive, round_ste

    generator = torch.Generator().manual_seed(len(scale_shape))
    shape = (4, 8, 5, 5) if len(scale_shape) == 4 else (4, 7, 8)
    x = (torch.randn(shape, generator=generator) * 3).requires_grad_()
    scale = (torch.rand(scale_shape, generator=generator) * 0.3 + 0.1).requires_grad_()
    zero = torch.randint(0, 16, scale_shape, generator=generator).float().requires_grad_()
    x.data[0, 0, 0] = float(scale.reshape(-1)[0] * (15 - zero.reshape(-1)[0]))  # exactly on the top code
    grad = torch.randn(shape, generator=generator)
    reference = (clamp_inclusive(round_ste(x / scale) + zero, 0, 15) - zero) * scale
    fused = _FakeQuantSTE.apply(x, scale, zero, 15.0)
    assert torch.equal(fused, reference)
    for got, want in zip(torch.autograd.grad(fused, (x, scale, zero), grad),
                         torch.autograd.grad(reference, (x, scale, zero), grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
