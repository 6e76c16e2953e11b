"""The percentile/MSE initialization search (RepQ-ViT §3.1) and its order statistics.

The search must agree with the straightforward torch.quantile-based loop of the reference code,
per tensor and per channel, and keep working where torch.quantile refuses (above 2**24 values).
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from benchsuite.quant.calibration import observe
from benchsuite.quant.init_search import (
    DEFAULT_PERCENTILES,
    order_statistics,
    quantiles,
    search_uniform_params,
    search_uniform_rows,
    to_rows,
)
from benchsuite.quant.quantizers import UniformQuantizer

PROPERTY = settings(max_examples=40, deadline=None)

probs_st = st.lists(
    st.one_of(st.sampled_from([0.0, 1.0, 0.5, *DEFAULT_PERCENTILES]), st.floats(0, 1)), min_size=1, max_size=6
)


def reference_search(x: torch.Tensor, bits: int, granularity: str, channel_dim: int, percentiles):
    """The reference code's search, written plainly: a loop over channels and torch.quantile."""
    rows = to_rows(x, granularity, channel_dim)
    scales, zeros, mses = [], [], []
    for row in rows:
        best = None
        for p in percentiles:
            hi, lo = torch.quantile(row, p), torch.quantile(row, 1.0 - p)
            delta = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8)
            zero = torch.round(-lo / delta)
            xq = (torch.clamp(torch.round(row / delta) + zero, 0, 2**bits - 1) - zero) * delta
            mse = float((xq - row).pow(2).mean())
            if best is None or mse < best[2]:
                best = (delta, zero, mse)
        scales.append(best[0])
        zeros.append(best[1])
        mses.append(best[2])
    return torch.stack(scales), torch.stack(zeros), mses


def row_mse(rows: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    xq = (torch.clamp(torch.round(rows / scale[:, None]) + zero[:, None], 0, 2**bits - 1) - zero[:, None])
    return (xq * scale[:, None] - rows).pow(2).mean(1)


# --------------------------------------------------------------------------------------------
# Order statistics and quantiles
# --------------------------------------------------------------------------------------------


@given(
    hnp.arrays(
        st.sampled_from([np.float32, np.float64]),
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=300),
        elements=st.floats(-1e4, 1e4, width=32, allow_nan=False),
    ),
    probs_st,
)
@PROPERTY
def test_quantiles_are_bit_identical_to_torch_quantile(array: np.ndarray, probs: list[float]) -> None:
    rows = torch.from_numpy(array)
    expected = torch.stack([torch.quantile(rows, p, dim=1) for p in probs])
    assert torch.equal(quantiles(rows, probs), expected)


@pytest.mark.parametrize("length", [1, 5, 64, 1000, 40_000])
def test_order_statistics_topk_and_sort_paths_agree_with_sort(length: int) -> None:
    rows = torch.randn(3, length, generator=torch.Generator().manual_seed(length))
    ordered = rows.sort(dim=1).values
    tails = sorted({0, 1, length - 2, length - 1} & set(range(length)))  # topk path when long
    middle = sorted({0, length // 2, length - 1})  # sort path
    for indices in (tails, middle, list(reversed(tails))):
        assert torch.equal(order_statistics(rows, indices), ordered[:, indices])
    with pytest.raises(IndexError):
        order_statistics(rows, [length])


# --------------------------------------------------------------------------------------------
# The search against the reference loop
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "granularity", "channel_dim"),
    [
        ((7, 300), "tensor", -1),
        ((2, 50, 16), "tensor", -1),
        ((12, 40), "channel", 0),  # Linear weight: per output row
        ((6, 3, 4, 4), "channel", 0),  # Conv weight: per output filter
        ((4, 50, 10), "channel", -1),  # (B, N, C) activation: per last-dim channel
        ((4, 50, 10), "channel", 1),
    ],
)
@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_search_matches_torch_quantile_reference(shape, granularity, channel_dim, bits, dtype) -> None:
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, granularity, channel_dim, bits)).encode()))
    # Heavy tails (a Gaussian scale mixture), so the candidates really differ.
    x = torch.randn(shape, generator=gen, dtype=dtype) * torch.randn(shape, generator=gen, dtype=dtype).exp()
    scale, zero = search_uniform_params(x, bits, granularity, channel_dim)
    ref_scale, ref_zero, _ = reference_search(x, bits, granularity, channel_dim, DEFAULT_PERCENTILES)
    channels = 1 if granularity == "tensor" else shape[channel_dim]
    assert scale.shape == zero.shape == (channels,) and scale.dtype == dtype
    assert torch.equal(scale, ref_scale.reshape(-1))
    assert torch.equal(zero, ref_zero.reshape(-1))


@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=30),
        elements=st.floats(-1e3, 1e3, width=32, allow_nan=False, allow_subnormal=False),
    ),
    st.integers(2, 8),
    st.booleans(),
)
@settings(max_examples=25, deadline=None)
def test_search_reaches_the_reference_minimum(array: np.ndarray, bits: int, per_channel: bool) -> None:
    x = torch.from_numpy(array)
    granularity = "channel" if per_channel else "tensor"
    scale, zero = search_uniform_params(x, bits, granularity, -1)
    _, _, ref_mse = reference_search(x, bits, granularity, -1, DEFAULT_PERCENTILES)
    mse = row_mse(to_rows(x, granularity, -1), scale, zero, bits)
    # Same candidates, same minimum (up to the summation order of the MSE).
    torch.testing.assert_close(mse, torch.tensor(ref_mse, dtype=mse.dtype), rtol=1e-5, atol=1e-12)
    assert bool((zero == torch.round(zero)).all()) and bool((scale >= 1e-8).all())


def test_mse_picks_the_right_candidate_per_channel() -> None:
    gen = torch.Generator().manual_seed(0)
    n = 100_000
    bulk = torch.rand(3, n, generator=gen) * 2 - 1
    bulk[0] = torch.randn(n, generator=gen)
    # Channel 0: Gaussian, no outliers -> clipping the 0.1% tails (p=0.999, at ~3.1σ) costs little
    #   and keeps the resolution that p=0.99999 (~4.3σ) would spend on rare values.
    # Channel 1: 25 huge values on each side (0.025% per tail): p=0.999 would clip them at ~1,
    #   an MSE of ~5, while p=0.9999 keeps them (MSE ~0.3); p=0.99999 ties with it -> first wins.
    # Channel 2: 4 huge values per tail (0.004%): only p=0.99999 reaches them.
    x = bulk.clone()
    x[1, :25], x[1, 25:50] = 100.0, -100.0
    x[2, :4], x[2, 4:8] = 100.0, -100.0
    x = x[:, torch.randperm(n, generator=gen)]
    scale, zero, choice = search_uniform_rows(x, 4)
    assert choice.tolist() == [0, 1, 2]
    # The vectorised choice is the per-channel argmin of each candidate's MSE.
    errors = []
    for p in DEFAULT_PERCENTILES:
        hi, lo = torch.quantile(x, p, dim=1), torch.quantile(x, 1 - p, dim=1)
        cand_scale = (hi - lo) / 15
        errors.append(row_mse(x, cand_scale, torch.round(-lo / cand_scale), 4))
    assert torch.stack(errors).argmin(0).tolist() == [0, 1, 2]
    assert torch.equal(search_uniform_params(x.T.reshape(1, n, 3), 4, "channel", -1)[0], scale)


def test_custom_percentiles_and_bad_input() -> None:
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    scale, zero = search_uniform_params(x, 8, percentiles=(1.0,))
    assert float(scale) == pytest.approx(float(x.max() - x.min()) / 255, rel=1e-6)  # plain min-max
    assert float(zero) == float(torch.round(-x.min() / scale))
    with pytest.raises(ValueError, match="NaN"):
        search_uniform_params(torch.tensor([0.0, float("nan")]), 4)
    with pytest.raises(ValueError, match="percentiles"):
        search_uniform_params(x, 4, percentiles=(1.5,))
    with pytest.raises(ValueError, match="channel_dim"):
        search_uniform_params(x, 4, "channel", 1)
    constant = search_uniform_params(torch.full((2, 5), 3.0), 4, "channel", 0)
    assert torch.equal(constant[0], torch.full((2,), 1e-8))


def test_more_than_two_pow_24_elements() -> None:
    """Beyond torch.quantile's old 2**24 limit: the tails are planted so the quantiles are known.

    (Older torch refuses this tensor in ``torch.quantile``, which is why the reference code falls
    back to numpy; torch 2.14 accepts it, so nothing here relies on either behaviour.)
    """
    n = 2**24 + 1001
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, generator=gen) * 2 - 1
    planted = 20_000  # more than the 0.1% tail (~16.8k values) that p = 0.999 reaches
    tail = torch.arange(planted, dtype=torch.float32) / 1024  # exact in float32
    where = torch.randperm(n, generator=gen)[: 2 * planted]
    x[where[:planted]] = 10 + tail  # ascending order statistic n - planted + i is 10 + i/1024
    x[where[planted:]] = -10 - tail  # order statistic planted - 1 - i is -10 - i/1024

    def statistic(index: int) -> float:
        if index >= n - planted:
            return 10 + (index - (n - planted)) / 1024
        assert index < planted
        return -10 - (planted - 1 - index) / 1024

    probs = [*DEFAULT_PERCENTILES, *(1 - p for p in DEFAULT_PERCENTILES)]
    got = quantiles(x.reshape(1, -1), probs)[:, 0]
    for p, value in zip(probs, got.tolist()):
        rank = float(torch.tensor(p, dtype=torch.float32)) * (n - 1)
        below, above = int(rank), int(np.ceil(rank))
        weight = torch.tensor(rank - below, dtype=torch.float32)
        expected = torch.lerp(torch.tensor(statistic(below)), torch.tensor(statistic(above)), weight)
        assert value == float(expected)

    scale, zero, choice = search_uniform_rows(x.reshape(1, -1), 4)
    hi, lo = got[int(choice)], got[len(DEFAULT_PERCENTILES) + int(choice)]
    assert float(scale) == pytest.approx(float((hi - lo) / 15), rel=1e-6)
    assert float(zero) == float(torch.round(-lo / scale))


# --------------------------------------------------------------------------------------------
# UniformQuantizer(init="percentile_mse")
# --------------------------------------------------------------------------------------------


def test_quantizer_percentile_init_searches_all_observed_batches() -> None:
    gen = torch.Generator().manual_seed(3)
    acts = torch.randn(6, 20, 8, generator=gen).pow(3) * torch.linspace(0.5, 4, 8)
    q = UniformQuantizer(4, "channel", -1, init="percentile_mse")
    observe(None, [q], [acts[:2], acts[2:5], acts[5:]])
    scale, zero = search_uniform_params(acts, 4, "channel", -1)
    assert q.scale.shape == (1, 1, 8)
    assert torch.equal(q.scale.reshape(-1), scale) and torch.equal(q.zero_point.reshape(-1), zero)
    assert q._samples == []  # released after the search

    weight = torch.randn(5, 12, generator=gen)
    wq = UniformQuantizer(4, "channel", 0, init="percentile_mse")
    observe(None, [wq], [weight])
    scale, zero = search_uniform_params(weight, 4, "channel", 0)
    assert wq.scale.shape == (5, 1) and torch.equal(wq.scale.reshape(-1), scale)
    weight.mul_(100)  # the quantizer kept its own copy while observing
    assert torch.equal(wq.zero_point.reshape(-1), zero)

    minmax = UniformQuantizer(4, "channel", 0)
    observe(None, [minmax], [weight / 100])
    assert not torch.equal(minmax.scale, wq.scale)  # different init, same data


def test_quantizer_lazy_init_calibrates_on_first_forward() -> None:
    x = torch.randn(4, 10, 6, generator=torch.Generator().manual_seed(5))
    q = UniformQuantizer(4, "channel", -1, init="percentile_mse", lazy_init=True)
    out = q(x)
    assert q.initialized
    scale, zero = search_uniform_params(x, 4, "channel", -1)
    assert torch.equal(q.scale.reshape(-1), scale) and torch.equal(q.zero_point.reshape(-1), zero)
    assert torch.equal(out, q(x))  # quantized the very batch it calibrated on
    assert torch.equal(q(x * 3), q(x * 3))  # later batches reuse the parameters
    assert torch.equal(q.scale.reshape(-1), scale)

    q.reset()
    q.enabled = False
    assert q(x) is x and not q.initialized  # disabled: no lazy init
    plain = UniformQuantizer(4)
    assert plain(x) is x and not plain.initialized  # lazy_init defaults to False


def test_quantizer_set_per_tensor_and_rejections() -> None:
    q = UniformQuantizer(4, "channel", -1, init="percentile_mse")
    observe(None, [q], [torch.randn(2, 3, 5)])
    q.set_per_tensor(torch.tensor(0.1), 7.5)
    assert not q.per_channel and q.scale.shape == (1,) and float(q.zero_point) == 7.5
    x = torch.randn(2, 3, 5)
    assert torch.equal(q(x), (torch.clamp(torch.round(x / q.scale) + 7.5, 0, 15) - 7.5) * q.scale)
    with pytest.raises(ValueError, match="asymmetric"):
        UniformQuantizer(4, symmetric=True, init="percentile_mse")
    with pytest.raises(ValueError, match="init"):
        UniformQuantizer(4, init="mse")
