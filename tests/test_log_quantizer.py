"""The log√2 quantizer for post-softmax attention (RepQ-ViT §3.2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from benchsuite.quant.calibration import observe
from benchsuite.quant.init_search import (
    DEFAULT_PERCENTILES,
    fake_quantize_log_sqrt2,
    search_log_sqrt2_scale,
)
from benchsuite.quant.quantizers import LogSqrt2Quantizer

PROPERTY = settings(max_examples=60, deadline=None)

bits_st = st.integers(min_value=2, max_value=8)
delta_st = st.floats(1e-3, 1.0, allow_nan=False)
# Probabilities in [0, 1], with exact zeros and values far below any level.
probs_st = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=1, max_dims=4, max_side=6),
    elements=st.one_of(
        st.floats(0, 1, width=32),
        st.floats(0, 2**-20, width=32),
        st.just(0.0),
    ),
)


def quantizer(bits: int, delta: float) -> LogSqrt2Quantizer:
    q = LogSqrt2Quantizer(bits)
    q.set_params(delta)
    return q


def reference_form(x: torch.Tensor, delta: float, bits: int) -> torch.Tensor:
    """The reference code's way of writing the dequantizer: 2^-ceil(q/2) · (1 + (√2-1)[q odd]) · Δ."""
    code = torch.round(-2 * torch.log2(x / delta))
    underflow = code >= 2**bits
    code = code.clamp(0, 2**bits - 1)
    value = 2 ** (-torch.ceil(code / 2)) * ((code % 2) * (math.sqrt(2) - 1) + 1) * delta
    return torch.where(underflow, torch.zeros_like(value), value)


def test_three_bit_levels_of_the_spec() -> None:
    q = quantizer(3, 1.0)
    expected = [1, 0.707, 0.5, 0.354, 0.25, 0.177, 0.125, 0.088]
    assert q.levels().tolist() == pytest.approx(expected, abs=5e-4)
    # Below the smallest level's rounding boundary 2^(-7.5/2) ≈ 0.0743 everything becomes 0.
    x = torch.tensor([1.7, 1.0, 0.8, 0.55, 0.3, 0.2, 0.1, 0.08, 0.0745, 0.074, 0.01, 0.0, -0.2])
    got = q(x)
    want = [1, 1, 0.7071, 0.5, 0.3536, 0.1768, 0.0884, 0.0884, 0.0884, 0, 0, 0, 0]
    assert got.tolist() == pytest.approx(want, abs=1e-4)


@given(probs_st, bits_st, delta_st)
@PROPERTY
def test_outputs_are_zero_or_levels(array: np.ndarray, bits: int, delta: float) -> None:
    q = quantizer(bits, delta)
    out = q(torch.from_numpy(array))
    allowed = torch.cat([torch.zeros(1), q.levels()])
    assert bool(torch.isin(out, allowed).all())
    assert out.unique().numel() <= 2**bits + 1


@given(probs_st, bits_st, delta_st)
@PROPERTY
def test_idempotent(array: np.ndarray, bits: int, delta: float) -> None:
    q = quantizer(bits, delta)
    once = q(torch.from_numpy(array))
    assert torch.equal(q(once), once)


@given(probs_st, bits_st, delta_st)
@PROPERTY
def test_nearest_level_in_log_domain_above_and_below_range(
    array: np.ndarray, bits: int, delta: float
) -> None:
    q = quantizer(bits, delta)
    x = torch.from_numpy(array).double()
    out = q(x.float()).double()
    d = float(q.scale)
    boundary = d * 2 ** (-(2**bits - 0.5) / 2)  # rounding boundary of the smallest level
    above = x >= d
    assert bool((out[above] == d).all())
    below = x < boundary * (1 - 1e-5)
    assert bool((out[below] == 0).all())
    inside = (x > boundary * (1 + 1e-5)) & ~above
    # Rounding −2·log2 to an integer: within a quarter of a log2 unit (float slack aside).
    gap = (torch.log2(out[inside]) - torch.log2(x[inside])).abs()
    assert bool((gap <= 0.25 + 1e-5).all())


@given(probs_st, bits_st, delta_st)
@PROPERTY
def test_matches_the_reference_formulation(array: np.ndarray, bits: int, delta: float) -> None:
    q = quantizer(bits, delta)
    x = torch.from_numpy(array)
    d = float(q.scale)
    torch.testing.assert_close(q(x), reference_form(x, d, bits).float(), rtol=1e-6, atol=0)
    assert torch.equal(q(x), fake_quantize_log_sqrt2(x, q.scale.reshape(()), bits))


def test_straight_through_gradient() -> None:
    q = quantizer(4, 0.5)
    boundary = 0.5 * 2 ** (-15.5 / 2)
    points = [0.3, 0.1, 0.02, boundary * 1.1, 0.7, 1.0, boundary * 0.9, 0.0, -0.1]
    x = torch.tensor(points, requires_grad=True)
    out = q(x)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    inside = slice(0, 4)
    # d/dx of Δ·2^(−q/2) with a straight-through q = −2·log2(x/Δ) is x̂/x, about 1.
    torch.testing.assert_close(x.grad[inside], (out / x).detach()[inside])
    assert bool(((x.grad[inside] > 0.7) & (x.grad[inside] < 1.42)).all())
    assert x.grad[4:].tolist() == [0.0] * 5  # clamped at Δ, underflow, zero, negative


def test_delta_search_matches_quantile_candidates() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 3, 50, 50, generator=gen) * 3
    attn = scores.softmax(-1)
    for bits in (3, 4, 6):
        candidates = [torch.quantile(attn.reshape(-1), p) for p in DEFAULT_PERCENTILES]
        errors = [float((reference_form(attn, float(c), bits) - attn).pow(2).mean()) for c in candidates]
        expected = candidates[int(np.argmin(errors))]
        got = search_log_sqrt2_scale(attn, bits)
        assert got.shape == (1,) and float(got) == float(expected)


def test_observe_finalize_and_lazy_init() -> None:
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(2, 2, 20, 20, generator=gen).mul(4).softmax(-1) for _ in range(3)]
    q = LogSqrt2Quantizer(4)
    assert not q.initialized and q(batches[0]) is batches[0]
    observe(None, [q], batches)
    assert q.initialized and q.scale.shape == (1,) and not q.has_observations
    assert float(q.delta) == float(search_log_sqrt2_scale(torch.cat(batches), 4))
    with pytest.raises(RuntimeError, match="observed no data"):
        LogSqrt2Quantizer(4).finalize()

    lazy = LogSqrt2Quantizer(4, lazy_init=True)
    out = lazy(batches[0])
    assert float(lazy.delta) == float(search_log_sqrt2_scale(batches[0], 4))
    assert torch.equal(out, lazy(batches[0]))

    restored = LogSqrt2Quantizer(4)
    restored.load_state_dict(q.state_dict())
    assert torch.equal(restored(batches[1]), q(batches[1]))
    q.reset()
    assert not q.initialized and q(batches[1]) is batches[1]
    q.enabled = False
    with pytest.raises(ValueError):
        q.set_params(0.0)
    assert "bits=4" in repr(restored) and "delta=" in repr(restored)


def test_log2_quantizer_has_one_code_per_octave():
    from benchsuite.quant.quantizers import Log2Quantizer
    from benchsuite.quant.shift_log import fake_quantize_log

    x = torch.softmax(torch.randn(4, 2, 10, 10, generator=torch.Generator().manual_seed(0)) * 3, dim=-1)
    quantizer = Log2Quantizer(3, lazy_init=True)
    y = quantizer(x)
    torch.testing.assert_close(y, fake_quantize_log(x, quantizer.scale, 3, 1))
    ratios = quantizer.levels()[:-1] / quantizer.levels()[1:]
    torch.testing.assert_close(ratios, torch.full_like(ratios, 2.0))
    assert set(y.unique().tolist()) <= set(quantizer.levels().tolist()) | {0.0}
