"""Quantizers of the reconstruction-based methods: SULQ (I&S-ViT), the per-patch outlier-aware and
shift-log quantizers, the L_2.4 search and AdaRound (ADFQ-ViT), DFQ (AIQViT), and the small
additions to UniformQuantizer / LogSqrt2Quantizer they rely on.

Each quantizer is checked for its grid (error bounds, number of distinct outputs), its gradient
modes, its state machine (multi-batch observation, state_dict round trip) and, where the specs
state them, the facts measured on the reference code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from benchsuite.quant.adaround import AdaRoundQuantizer, RoundingSchedule, adaround_beta
from benchsuite.quant.calibration import observe
from benchsuite.quant.dfq import DynamicFocusingQuantizer
from benchsuite.quant.init_search import (
    fake_quantize_log_sqrt2,
    quantiles,
    search_log_sqrt2_scale,
    search_uniform_lp,
    search_uniform_rows,
)
from benchsuite.quant.outlier import PerPatchOutlierQuantizer
from benchsuite.quant.quantizers import LogSqrt2Quantizer, UniformQuantizer, clamp_inclusive, round_ste
from benchsuite.quant.shift_log import GELU_LOWER_BOUND, ShiftLogQuantizer, search_log_scale
from benchsuite.quant.sulq import DEFAULT_ETA_GRID, SULQuantizer

PROPERTY = settings(max_examples=25, deadline=None)
FEW = settings(max_examples=10, deadline=None)

bits_st = st.integers(min_value=2, max_value=6)
seed_st = st.integers(0, 2**31 - 1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def softmax_maps(seed: int, shape=(2, 3, 9, 9), sigma: float = 3.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen(seed)) * sigma).softmax(-1)


def calibrate(q, *batches: torch.Tensor) -> None:
    observe(None, [q], batches)


def round_trip(q, fresh):
    """Load ``q``'s state_dict into ``fresh`` (an uncalibrated instance) and return it."""
    fresh.load_state_dict(q.state_dict())
    return fresh


# ============================================================================================
# UniformQuantizer / LogSqrt2Quantizer additions
# ============================================================================================


@given(seed_st, bits_st, st.booleans())
@PROPERTY
def test_learnable_scale_keeps_values_and_gets_lsq_gradient(seed: int, bits: int, per_channel: bool) -> None:
    x = torch.randn(4, 6, generator=gen(seed)) * 3
    q = UniformQuantizer(bits, "channel" if per_channel else "tensor", channel_dim=-1)
    calibrate(q, x)
    before = q(x)
    scale = q.make_scale_learnable()
    assert isinstance(scale, torch.nn.Parameter) and q.make_scale_learnable() is scale
    assert dict(q.named_parameters())["scale"] is scale
    assert torch.equal(q(x), before)
    with torch.no_grad():  # the no-grad fast path is unchanged
        assert torch.equal(q(x), before)
    q(x).sum().backward()
    # LSQ: dx̂/dΔ = round(x/Δ) - x/Δ inside the grid, q - z where clamped.
    s, z = q.quant_params(x)
    ratio = x / s.detach()
    codes = torch.round(ratio) + z
    inside = (codes >= 0) & (codes <= q.qmax)
    expected = torch.where(inside, torch.round(ratio) - ratio, codes.clamp(0, q.qmax) - z)
    dims = [0] if per_channel else [0, 1]
    torch.testing.assert_close(scale.grad.reshape(-1), expected.sum(dims).reshape(-1), rtol=1e-4, atol=1e-4)


def test_learnable_scale_survives_finalize_state_dict_and_reset() -> None:
    x = torch.randn(5, 4, generator=gen(0))
    q = UniformQuantizer(4)
    calibrate(q, x)
    scale = q.make_scale_learnable()
    calibrate(q, x * 2)  # re-calibration writes into the same Parameter (optimizers keep it)
    assert q.scale is scale and float(scale.detach()) == pytest.approx(2 * float(UniformQuantizer_scale(x)), rel=1e-6)
    restored = round_trip(q, UniformQuantizer(4))
    assert not isinstance(restored.scale, torch.nn.Parameter) and torch.equal(restored(x), q(x).detach())
    learnable_fresh = UniformQuantizer(4)
    calibrate(learnable_fresh, torch.randn(3, 3))
    learnable_fresh.make_scale_learnable()
    round_trip(q, learnable_fresh)
    assert isinstance(learnable_fresh.scale, torch.nn.Parameter) and torch.equal(learnable_fresh.scale, q.scale)
    q.reset()
    assert not q.initialized and "scale" not in dict(q.named_parameters())
    with pytest.raises(RuntimeError, match="calibrate"):
        q.make_scale_learnable()


def UniformQuantizer_scale(x: torch.Tensor) -> torch.Tensor:  # noqa: N802 - helper mirrors the class
    q = UniformQuantizer(4)
    calibrate(q, x)
    return q.scale


@given(seed_st, bits_st)
@PROPERTY
def test_uniform_without_straight_through(seed: int, bits: int) -> None:
    x = torch.randn(3, 7, generator=gen(seed)) * 2
    ste = UniformQuantizer(bits)
    plain = UniformQuantizer(bits, straight_through=False)
    calibrate(ste, x)
    calibrate(plain, x)
    plain.make_scale_learnable()
    points = (x * 1.5).requires_grad_(True)
    out = plain(points)
    assert torch.equal(out.detach(), ste(points.detach()))
    out.sum().backward()
    assert torch.equal(points.grad, torch.zeros_like(points))
    codes = (torch.round(points.detach() / plain.scale.detach()) + plain.zero_point).clamp(0, plain.qmax)
    torch.testing.assert_close(plain.scale.grad, (codes - plain.zero_point).sum().reshape(1))
    assert "straight_through=False" in repr(plain)


def test_log_sqrt2_without_straight_through() -> None:
    attn = softmax_maps(0)
    ste, plain = LogSqrt2Quantizer(4), LogSqrt2Quantizer(4, straight_through=False)
    calibrate(ste, attn)
    calibrate(plain, attn)
    points = attn.clone().requires_grad_(True)
    out = plain(points)
    assert torch.equal(out.detach(), ste(attn))
    assert not out.requires_grad  # plain rounding, fixed Δ: nothing to differentiate
    plain.make_scale_learnable()
    out = plain(points)
    out.sum().backward()
    assert torch.equal(points.grad, torch.zeros_like(points))
    assert plain.scale.grad is not None and float(plain.scale.grad) > 0


# ============================================================================================
# search_uniform_lp (Q/K/V initialization, adfq_vit.md §3)
# ============================================================================================


def reference_lp_search(x: torch.Tensor, bits: int, p: float = 2.4, num: int = 100):
    """QDrop's UniformAffineQuantizer MSE search, transcribed loop for loop."""
    n_levels = 2**bits
    eps = torch.tensor(1e-8)

    def qparams(lo, hi):
        lo_neg, hi_pos = torch.min(lo, torch.zeros_like(lo)), torch.max(hi, torch.zeros_like(hi))
        scale = torch.max((hi_pos - lo_neg) / float(n_levels - 1), eps)
        zero = torch.clamp(0 - torch.round(lo_neg / scale), 0, n_levels - 1)
        return scale, zero

    def score(lo, hi):
        scale, zero = qparams(lo, hi)
        x_q = (torch.clamp(torch.round(x / scale) + zero, 0, n_levels - 1) - zero) * scale
        return (x - x_q).abs().pow(p).mean()

    x_min, x_max = x.min(), x.max()
    best_score, best = torch.tensor(1e10), (x_min, x_max)
    if x_min >= 0 or x_max <= 0:
        xrange = torch.max(x_min.abs(), x_max)
        for i in range(1, num + 1):
            thres = xrange / num * i
            lo = torch.zeros_like(x_min) if x_min >= 0 else -thres
            hi = torch.zeros_like(x_max) if x_min < 0 else thres
            s = score(lo, hi)
            if s < best_score:
                best_score, best = s, (lo, hi)
    else:
        xrange = x_max - x_min
        for i in range(1, num + 1):
            tmp_max = xrange / num * i
            tmp_delta = tmp_max / (2**bits - 1)
            for zp in range(n_levels):
                lo, hi = 0 - zp * tmp_delta, tmp_max - zp * tmp_delta
                s = score(lo, hi)
                if s < best_score:
                    best_score, best = s, (lo, hi)
    return qparams(*best)


@given(seed_st, st.integers(2, 3), st.sampled_from(["both", "pos", "neg", "zeros"]))
@FEW
def test_lp_search_matches_the_reference_loops(seed: int, bits: int, sign: str) -> None:
    x = torch.randn(40, generator=gen(seed)) * 2 + 0.3
    x = {"both": x, "pos": x.abs(), "neg": -x.abs(), "zeros": torch.zeros(5)}[sign]
    scale, zero = search_uniform_lp(x, bits)
    ref_scale, ref_zero = reference_lp_search(x, bits)
    assert scale.shape == zero.shape == (1,)
    torch.testing.assert_close(scale[0], ref_scale, rtol=1e-6, atol=0)
    assert float(zero) == float(ref_zero)


def _lp_candidates(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 2-D search's candidates (Δ, z), in the reference's order."""
    from benchsuite.quant.init_search import _lp_qparams

    qmax = 2**bits - 1
    ranges = (x.max() - x.min()) / 100 * torch.arange(1, 101, dtype=x.dtype)
    shift = torch.arange(0, qmax + 1, dtype=x.dtype)[None, :] * (ranges / qmax)[:, None]
    return _lp_qparams((0.0 - shift).reshape(-1), (ranges[:, None] - shift).reshape(-1), bits, 1e-8)


@given(seed_st, st.sampled_from([2, 4, 8]))
@FEW
def test_sorted_lp_scores_equal_the_brute_force_scores(seed: int, bits: int) -> None:
    """The fast CPU scorer gives every candidate (Δ, z) the brute force's score."""
    from benchsuite.quant.init_search import _lp_errors, _lp_errors_sorted

    g = gen(seed)
    x = torch.randn(3000, generator=g) * torch.rand(3000, generator=g).pow(3) * 4 + torch.rand(1, generator=g) - 0.5
    x[:7] = 0.0  # exact ties with grid points
    scales, zero_points = _lp_candidates(x, bits)
    brute = _lp_errors(x, scales, zero_points, bits, 2.4)
    fast = _lp_errors_sorted(x.sort().values, scales, zero_points, bits, 2.4)
    torch.testing.assert_close(fast, brute, rtol=2e-5, atol=0)


@given(seed_st, st.sampled_from([2, 3, 4]), st.sampled_from(["gauss", "outliers", "ties", "one-signed"]))
@FEW
def test_lp_bounds_never_exceed_scores_and_pruning_keeps_the_winner(seed: int, bits: int, kind: str) -> None:
    """The bin bound is a true lower bound, so pruning by it returns the exhaustive argmin."""
    from benchsuite.quant import init_search

    g = gen(seed)
    x = torch.randn(5000, generator=g) * 1.5 + 0.3
    if kind == "outliers":
        x[torch.randint(0, 5000, (20,), generator=g)] *= 9
    elif kind == "ties":
        x = torch.round(x * 2) / 2  # many equal values, many exactly on grid points
    elif kind == "one-signed":
        x = x.abs()
    scales, zero_points = _lp_candidates(x, bits)
    x_sorted = x.sort().values
    exact = init_search._lp_errors(x, scales, zero_points, bits, 2.4).double()
    bounds = init_search._lp_lower_bounds(x_sorted, scales, zero_points, bits, 2.4)
    assert bool((bounds <= exact * (1 + 1e-5) + 1e-12).all())
    pruned = init_search._lp_errors_pruned(x_sorted, scales, zero_points, bits, 2.4)
    assert int(pruned.argmin()) == int(exact.argmin())
    assert int(torch.isfinite(pruned).sum()) < scales.numel()  # it did prune


@pytest.mark.parametrize("seed", range(3))
def test_lp_search_matches_the_reference_loops_at_4_bits(seed: int) -> None:
    x = torch.randn(300, generator=gen(seed)) * 1.5 - 0.2
    scale, zero = search_uniform_lp(x, 4)
    ref_scale, ref_zero = reference_lp_search(x, 4)
    torch.testing.assert_close(scale[0], ref_scale, rtol=1e-6, atol=0)
    assert float(zero) == float(ref_zero)


def test_lp_search_below_p_1_is_exhaustive_and_matches_the_reference() -> None:
    """The pruning bound needs a convex |d|^p; a p < 1 search scores every candidate."""
    x = torch.randn(300, generator=gen(5)) * 1.5 - 0.2
    scale, zero = search_uniform_lp(x, 3, 0.8)
    ref_scale, ref_zero = reference_lp_search(x, 3, 0.8)
    torch.testing.assert_close(scale[0], ref_scale, rtol=1e-6, atol=0)
    assert float(zero) == float(ref_zero)


def test_lp_search_beats_min_max_and_hooks_into_uniform_quantizer() -> None:
    x = torch.randn(2, 50, 8, generator=gen(3))
    x[0, 0, 0] = 12.0  # one outlier: clipping it pays off in L_2.4
    scale, zero = search_uniform_lp(x, 4)

    def lp_error(q: UniformQuantizer) -> float:
        return float((q(x) - x).abs().pow(2.4).mean())

    minmax = UniformQuantizer(4)
    calibrate(minmax, x)
    searched = UniformQuantizer(4, init="lp_search")
    calibrate(searched, x[:1], x[1:])  # two batches = one concatenated batch
    assert torch.equal(searched.scale, scale) and torch.equal(searched.zero_point, zero)
    assert lp_error(searched) < lp_error(minmax)
    assert "lp_search" in repr(searched)
    with pytest.raises(RuntimeError, match="consumes"):  # the kept tensors were released
        searched.finalize()
    other_p = UniformQuantizer(4, init="lp_search", lp_norm=2.0)
    calibrate(other_p, x)
    assert torch.equal(other_p.scale, search_uniform_lp(x, 4, 2.0)[0])
    with pytest.raises(ValueError, match="per tensor"):
        UniformQuantizer(4, "channel", init="lp_search")
    with pytest.raises(ValueError, match="asymmetric"):
        UniformQuantizer(4, symmetric=True, init="lp_search")


# ============================================================================================
# SULQ (isvit.md §4)
# ============================================================================================

probs_st = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=1, max_dims=3, max_side=6),
    elements=st.one_of(st.floats(0, 1, width=32), st.floats(0, 2**-12, width=32), st.just(0.0)),
)


@given(probs_st, probs_st, bits_st, st.sampled_from(["reference", "strict"]))
@PROPERTY
def test_sulq_outputs_are_shifted_powers_of_two(calib: np.ndarray, query: np.ndarray, bits: int, mode: str) -> None:
    q = SULQuantizer(bits, mode)
    calibrate(q, torch.from_numpy(calib))
    x = torch.from_numpy(np.concatenate([calib.ravel(), query.ravel(), [0.0, 1.0]]).astype(np.float32))
    out = q(x)
    eta = q.eta.reshape(())
    lowest, highest = round(float(q.y_min)), round(float(q.y_max))
    allowed = torch.exp2(torch.arange(lowest, highest + 1, dtype=torch.float32)) - eta
    assert bool(torch.isin(out, allowed).all())  # every output is 2^k - η, k integer in range
    assert bool(torch.isin(out, q.distinct_outputs()).all())
    limit = 2**bits + 1 if mode == "reference" else 2**bits
    assert out.unique().numel() <= min(limit, highest - lowest + 1)
    assert q.distinct_outputs().numel() <= limit


@given(probs_st, bits_st, st.sampled_from(["reference", "strict"]))
@PROPERTY
def test_sulq_idempotent_when_the_exponent_step_is_below_one(calib: np.ndarray, bits: int, mode: str) -> None:
    # With Δ ≤ 1 every integer exponent k in range maps back onto itself; with Δ > 1 the outer
    # rounding can move a requantized 2^k - η to another k, so idempotence does not hold there.
    q = SULQuantizer(bits, mode)
    x = torch.from_numpy(calib)
    calibrate(q, x)
    assume(float(q.step()) <= 0.9)
    once = q(x)
    assert torch.equal(q(once), once)


def test_sulq_spec_fact_reference_mode_emits_two_pow_b_plus_one_outputs() -> None:
    # isvit.md §4.2 consequence 1: softmax of 64x197 logits with σ = 3, η ∈ {0.001, 0.005}, b = 3:
    # the reference forward emits 9 distinct values, more than 2^3.
    attn = (torch.randn(64, 197, generator=gen(0)) * 3).softmax(-1)
    for eta in (0.001, 0.005):
        reference, strict = SULQuantizer(3, "reference", (eta,)), SULQuantizer(3, "strict", (eta,))
        calibrate(reference, attn)
        calibrate(strict, attn)
        assert reference(attn).unique().numel() == 9
        assert strict(attn).unique().numel() <= 8
        assert reference.distinct_outputs().numel() == 9


def test_sulq_spec_fact_extra_bits_add_no_levels() -> None:
    # isvit.md §4.2 consequence 2: the outer rounding caps the levels at the integer exponents in
    # range (≤ 11 for the default η grid); 4, 6 and 8 bits all give the same count once 2^b exceeds it.
    attn = (torch.randn(64, 197, generator=gen(1)) * 3).softmax(-1)
    counts = {}
    for bits in (4, 6, 8):
        q = SULQuantizer(bits, "reference", (0.005,))
        calibrate(q, attn)
        exponents = round(float(q.y_max)) - round(float(q.y_min)) + 1
        counts[bits] = q(attn).unique().numel()
        assert counts[bits] <= exponents <= 11
    assert counts[6] == counts[8]
    chosen = SULQuantizer(4)
    calibrate(chosen, attn)
    assert float(chosen.eta) in [pytest.approx(e) for e in DEFAULT_ETA_GRID]
    assert chosen(attn).unique().numel() <= 11


def test_sulq_spec_fact_smallest_level_can_be_negative() -> None:
    # isvit.md §4.2 consequence 3: 2^(-7) - 0.01 = -0.0022.
    q = SULQuantizer(3)
    q.set_params(0.01, -7.0, 0.0)
    smallest = float(q.distinct_outputs()[0])
    assert smallest == pytest.approx(2**-7 - 0.01) and smallest < 0
    assert float(q(torch.zeros(1))) == pytest.approx(-0.0021875)


def test_sulq_search_picks_the_lowest_mse_eta() -> None:
    attn = softmax_maps(2, (4, 2, 12, 12))
    q = SULQuantizer(3)
    calibrate(q, attn)
    errors = []
    for eta in DEFAULT_ETA_GRID:
        y = torch.log2(attn + eta)
        step = (y.max() - y.min()) / 7
        codes = torch.clamp(torch.round((y - y.min()) / step), 0, 7)
        errors.append(float(((2 ** torch.round(codes * step + y.min()) - eta) - attn).pow(2).mean()))
    assert float(q.eta) == pytest.approx(DEFAULT_ETA_GRID[int(np.argmin(errors))])
    y = torch.log2(attn + q.eta)
    assert float(q.y_min) == float(y.min()) and float(q.y_max) == float(y.max())


@pytest.mark.parametrize("mode", ["reference", "strict"])
def test_sulq_straight_through_gradient(mode: str) -> None:
    calib = torch.tensor([0.01, 0.2, 0.5])
    q = SULQuantizer(3, mode, (0.01,))
    calibrate(q, calib)
    inside = torch.tensor([0.012, 0.03, 0.1, 0.3, 0.45])
    clamped = torch.tensor([0.0, 0.001, 0.9, 1.0])  # below y_min or above y_max by > Δ/2
    x = torch.cat([inside, clamped]).requires_grad_(True)
    out = q(x)
    out.sum().backward()
    eta = float(q.eta)
    # dx̂/dx = 2^k / (x + η) = (x̂ + η) / (x + η) through both straight-through roundings.
    torch.testing.assert_close(x.grad[:5], ((out + eta) / (x + eta)).detach()[:5])
    assert x.grad[5:].tolist() == [0.0] * 4
    with torch.no_grad():
        assert torch.equal(q(x), out.detach())  # the fast path gives the same numbers


def test_sulq_state_machine() -> None:
    batches = [softmax_maps(s) for s in range(3)]
    q = SULQuantizer(4)
    assert q(batches[0]) is batches[0]
    calibrate(q, *batches)
    whole = SULQuantizer(4)
    calibrate(whole, torch.cat(batches))
    for name in ("eta", "y_min", "y_max"):
        assert torch.equal(getattr(q, name), getattr(whole, name))
    restored = round_trip(q, SULQuantizer(4))
    assert torch.equal(restored(batches[1]), q(batches[1]))
    lazy = SULQuantizer(4, lazy_init=True)
    out = lazy(batches[0])
    assert lazy.initialized and torch.equal(out, lazy(batches[0]))
    with pytest.raises(RuntimeError, match="observed no data"):
        SULQuantizer(4).finalize()
    with pytest.raises(ValueError):
        SULQuantizer(4, mode="loose")  # type: ignore[arg-type]
    q.reset()
    assert not q.initialized and "mode='reference'" in repr(q)


# ============================================================================================
# Per-patch outlier-aware quantizer (adfq_vit.md §4)
# ============================================================================================


@st.composite
def token_batches(draw) -> torch.Tensor:
    """(B, N, C) activations, LayerNorm-like, with a few large values of either sign."""
    b, n, c = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(2, 8))
    x = torch.randn(b, n, c, generator=gen(draw(seed_st))) * draw(st.floats(0.3, 3.0))
    for _ in range(draw(st.integers(0, 3))):
        idx = tuple(draw(st.integers(0, s - 1)) for s in (b, n, c))
        x[idx] = draw(st.sampled_from([-1.0, 1.0])) * draw(st.floats(5.5, 40.0))
    return x


def inlier_slack(x: torch.Tensor) -> float:
    return 1e-6 * float(x.abs().max()) + 1e-9


@given(token_batches(), bits_st, st.floats(2.0, 6.0))
@PROPERTY
def test_per_patch_outliers_bypass_and_inliers_stay_on_grid(x: torch.Tensor, bits: int, alpha: float) -> None:
    q = PerPatchOutlierQuantizer(bits, alpha)
    calibrate(q, x)
    assert q.scale.shape == q.zero_point.shape == (1, x.shape[1], 1)
    out = q(x)
    mask = x.abs() > alpha
    assert q.last_outlier_ratio == pytest.approx(float(mask.float().mean()))
    assert torch.equal(out[mask], x[mask])  # outliers returned exactly
    assert torch.equal(q(out), out)  # idempotent (a bypassed value is its own image)
    scale, zero = q.scale.expand_as(x), q.zero_point.expand_as(x)
    low, high = -zero * scale, (q.qmax - zero) * scale
    inside = ~mask & (x >= low) & (x <= high)
    error = (out - x).abs()
    assert bool((error[inside] <= scale[inside] / 2 + inlier_slack(x)).all())
    for n in range(x.shape[1]):  # at most 2^b levels per position among inliers
        assert out[:, n][~mask[:, n]].unique().numel() <= 2**bits


def test_per_patch_parameters_are_the_per_position_search_on_zeroed_outliers() -> None:
    x = torch.randn(3, 4, 16, generator=gen(4))
    x[:, :, 5] *= 20  # one outlier channel, as after LayerNorm
    q = PerPatchOutlierQuantizer(4, alpha=5.0)
    calibrate(q, x[:2], x[2:])  # two batches = one concatenated batch
    inliers = torch.where(x.abs() > 5.0, torch.zeros_like(x), x)
    rows = inliers.transpose(0, 1).reshape(4, -1)
    scale, zero, _ = search_uniform_rows(rows, 4)
    assert torch.equal(q.scale.reshape(-1), scale) and torch.equal(q.zero_point.reshape(-1), zero)
    # Retaining outliers beats a per-token quantizer that must stretch its range over them.
    plain = PerPatchOutlierQuantizer(4, alpha=1e9)
    calibrate(plain, x)
    assert float((q(x) - x).pow(2).mean()) < 0.2 * float((plain(x) - x).pow(2).mean())


def test_per_patch_nhwc_token_dims_and_token_count_check() -> None:
    x = torch.randn(2, 3, 4, 5, generator=gen(5))
    x[0, 1, 2, 3] = 9.0
    q = PerPatchOutlierQuantizer(3, 5.0, token_dims=(-3, -2))
    calibrate(q, x)
    assert q.scale.shape == (1, 3, 4, 1)
    rows = torch.where(x.abs() > 5, torch.zeros_like(x), x).permute(1, 2, 0, 3).reshape(12, -1)
    assert torch.equal(q.scale.reshape(-1), search_uniform_rows(rows, 3)[0])
    out = q(x)
    assert out[0, 1, 2, 3] == 9.0
    with pytest.raises(ValueError, match="token"):
        q(torch.randn(2, 3, 5, 5))
    tokens = PerPatchOutlierQuantizer(4)
    calibrate(tokens, torch.randn(2, 7, 4))
    with pytest.raises(ValueError, match="token count"):
        tokens(torch.randn(2, 8, 4))
    with pytest.raises(ValueError, match="token layout"):
        calibrate(PerPatchOutlierQuantizer(4), torch.randn(1, 7, 4), torch.randn(1, 6, 4))


def test_per_patch_reference_gradient_mode() -> None:
    x = torch.randn(2, 3, 6, generator=gen(6))
    x[0, 0, 0] = 8.0
    q = PerPatchOutlierQuantizer(4)
    calibrate(q, x)
    scale = q.make_scale_learnable()
    points = x.clone().requires_grad_(True)
    out = q(points)
    with torch.no_grad():
        fast = q(x)
    assert torch.equal(out.detach(), fast)
    (out * torch.arange(out.numel()).reshape(out.shape)).sum().backward()
    assert points.grad is None  # input detached: nothing reaches x
    assert scale.grad is not None and bool((scale.grad != 0).any())
    # Δ_n gets Σ w·(q - z) over the inliers of position n (plain rounding, no STE term).
    weights = torch.arange(out.numel()).reshape(out.shape).float()
    mask = x.abs() > q.alpha
    codes = (torch.round(x.masked_fill(mask, 0) / scale.detach()) + q.zero_point).clamp(0, q.qmax)
    expected = ((codes - q.zero_point) * weights).masked_fill(mask, 0).sum((0, 2), keepdim=True)
    torch.testing.assert_close(scale.grad, expected)


def test_per_patch_ste_gradient_mode() -> None:
    calib = torch.linspace(-1, 1, 2 * 3 * 8).reshape(2, 3, 8)
    q = PerPatchOutlierQuantizer(4, alpha=5.0, gradient_mode="ste")
    calibrate(q, calib)
    scale = q.make_scale_learnable()
    x = calib.clone()
    x[0, 0, 0], x[1, 2, 3], x[0, 1, 1] = 7.0, -3.0, 3.0  # outlier, clamped low, clamped high
    x.requires_grad_(True)
    q(x).sum().backward()
    mask = x.detach().abs() > q.alpha
    codes = torch.round(x.detach().masked_fill(mask, 0) / scale.detach()) + q.zero_point
    inside = (codes >= 0) & (codes <= q.qmax)
    expected = (inside | mask).float()  # STE inside, 0 where clamped, 1 for the bypassed outlier
    assert not bool(inside[1, 2, 3]) and not bool(inside[0, 1, 1]) and bool(mask[0, 0, 0])
    assert torch.equal(x.grad, expected)
    assert scale.grad is not None and bool((scale.grad != 0).any())


def test_per_patch_outlier_counters_and_state_dict() -> None:
    x = torch.zeros(1, 2, 5)
    x[0, 0, :2] = 6.0
    q = PerPatchOutlierQuantizer(4)
    calibrate(q, x)
    assert q.outlier_ratio == 0.0  # observation is not counted
    q(x)
    q(torch.zeros(1, 2, 5))
    assert q.last_outlier_ratio == 0.0 and q.outlier_ratio == pytest.approx(2 / 20)
    assert q.outlier_counts == (2, 20)
    q.reset_outlier_stats()
    assert q.outlier_counts == (0, 0)
    restored = round_trip(q, PerPatchOutlierQuantizer(4))
    assert torch.equal(restored(x), q(x)) and restored.scale.shape == (1, 2, 1)
    assert "_outliers_total" not in q.state_dict()
    direct = PerPatchOutlierQuantizer(2)
    direct.set_params(torch.tensor([0.5, 1.0]).reshape(1, 2, 1), 1.0)  # codes 0..3, grid [-z·Δ, (3-z)·Δ]
    points = torch.tensor([[[0.3, -0.7, 9.0], [0.4, 2.9, -6.0]]])
    assert direct(points).tolist() == [[[0.5, -0.5, 9.0], [0.0, 2.0, -6.0]]]
    with pytest.raises(ValueError, match="token layout"):
        direct.set_params(torch.ones(2, 1, 1), 0.0)
    with pytest.raises(ValueError):
        PerPatchOutlierQuantizer(4, gradient_mode="fast")  # type: ignore[arg-type]


# ============================================================================================
# Shift-log quantizer (adfq_vit.md §5)
# ============================================================================================


@st.composite
def gelu_batches(draw) -> torch.Tensor:
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=2, max_side=6))
    return F.gelu(torch.randn(shape, generator=gen(draw(seed_st))) * draw(st.floats(0.5, 4.0)))


def reference_fc2_quantize(x: torch.Tensor, delta: float, bits: int) -> torch.Tensor:
    """ADFQ-ViT's FC2Quantizer, written as in the reference code (2^-ceil(q/2) · odd factor · δ)."""
    x_min = x.min()
    shifted = x - x_min + 1e-6
    code = torch.round(-1 * (shifted / delta).log2() * 2)
    mask = code >= 2**bits
    code = torch.clamp(code, 0, 2**bits - 1)
    value = 2 ** (-1 * torch.ceil(code / 2)) * ((code % 2) * (math.sqrt(2) - 1) + 1) * delta
    value[mask] = 0
    return value + x_min - 1e-6


@given(gelu_batches(), bits_st, st.sampled_from(["sqrt2", "2"]))
@PROPERTY
def test_shift_log_levels_and_reference_form(x: torch.Tensor, bits: int, base: str) -> None:
    q = ShiftLogQuantizer(bits, base=base)
    calibrate(q, x)
    out = q(x)
    m = x.min()
    shifted_hat = (out - m + q.eps).double()
    levels = torch.cat([torch.zeros(1), q.levels()]).double()
    nearest = (shifted_hat[..., None] - levels).abs().min(-1).values
    assert bool((nearest <= 1e-5 * float(q.delta) + 4e-7 * (1 + float(m.abs()))).all())
    assert out.unique().numel() <= 2**bits + 1
    if base == "sqrt2":
        expected = reference_fc2_quantize(x, float(q.delta), bits)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@given(gelu_batches(), bits_st, st.sampled_from(["sqrt2", "2"]), st.floats(-3, 3))
@PROPERTY
def test_shift_log_dynamic_shift_follows_the_tensor(x: torch.Tensor, bits: int, base: str, offset: float) -> None:
    q = ShiftLogQuantizer(bits, base=base)
    calibrate(q, x)
    # The dynamic minimum makes the quantizer equivariant to a constant offset. Checked in float64
    # (the quantizer computes in the input's dtype): in float32, adding the offset rounds x itself
    # by more than a small δ's tolerance and can move a value across a rounding boundary.
    x64 = x.double()
    atol = 1e-9 * (1 + abs(offset)) * float(q.delta)
    torch.testing.assert_close(q(x64 + offset), q(x64) + offset, rtol=0, atol=atol)


def test_shift_log_delta_search() -> None:
    x = F.gelu(torch.randn(4, 10, 12, generator=gen(7)) * 2)
    q = ShiftLogQuantizer(4)
    calibrate(q, x[:1], x[1:])  # two batches = one concatenated batch
    shifted = x - x.min() + 1e-6
    assert torch.equal(q.delta, search_log_sqrt2_scale(shifted, 4))
    assert float(q.min_val) == float(x.min())
    base2 = ShiftLogQuantizer(4, base="2")
    calibrate(base2, x)
    assert torch.equal(base2.delta, search_log_scale(shifted, 4, 1))
    levels = base2.levels()
    torch.testing.assert_close(levels[:-1] / levels[1:], torch.full((15,), 2.0))
    assert torch.equal(search_log_scale(shifted, 4, 2), search_log_sqrt2_scale(shifted, 4))
    torch.testing.assert_close(q.levels()[:-1] / q.levels()[1:], torch.full((15,), math.sqrt(2)))


def test_shift_log_static_shift() -> None:
    x = F.gelu(torch.randn(3, 20, generator=gen(8)) * 3)
    fixed = ShiftLogQuantizer(4, shift_mode="static", static_min=GELU_LOWER_BOUND)
    calibrate(fixed, x)
    shifted = x - GELU_LOWER_BOUND + 1e-6
    assert torch.equal(fixed.delta, search_log_sqrt2_scale(shifted, 4))
    part = x[:1] + 0.5  # a static shift does not follow the tensor's minimum
    expected = fake_quantize_log_sqrt2(part - GELU_LOWER_BOUND + 1e-6, fixed.delta.reshape(()), 4)
    torch.testing.assert_close(fixed(part), expected + GELU_LOWER_BOUND - 1e-6)
    calibrated = ShiftLogQuantizer(4, shift_mode="static")
    calibrate(calibrated, x)
    restored = round_trip(calibrated, ShiftLogQuantizer(4, shift_mode="static"))
    assert torch.equal(restored.min_val, x.min().reshape(1)) and torch.equal(restored(part), calibrated(part))
    with pytest.raises(ValueError, match="static"):
        ShiftLogQuantizer(4, static_min=-0.17)


def test_shift_log_reference_gradient_goes_through_the_minimum_only() -> None:
    x = F.gelu(torch.randn(2, 5, 6, generator=gen(9)) * 2)
    q = ShiftLogQuantizer(4)
    calibrate(q, x)
    delta = q.make_scale_learnable()
    points = x.clone().requires_grad_(True)
    out = q(points)
    with torch.no_grad():
        assert torch.equal(q(x), out.detach())
    out.sum().backward()
    expected = torch.zeros_like(x).reshape(-1)
    expected[x.reshape(-1).argmin()] = x.numel()  # every output depends on m = min(x)
    assert torch.equal(points.grad.reshape(-1), expected)
    assert delta.grad is not None and float(delta.grad) > 0


def test_shift_log_ste_gradient() -> None:
    x = torch.tensor([0.0, 0.05, 0.2, 0.6, 1.5, 9.0])
    q = ShiftLogQuantizer(3, shift_mode="static", static_min=0.0, gradient_mode="ste")
    q.set_params(1.0)  # levels 2^(-q/2), q = 0..7; boundary of the smallest 2^(-3.75)
    delta = q.make_scale_learnable()
    points = x.clone().requires_grad_(True)
    out = q(points)
    out.sum().backward()
    shifted = x + 1e-6
    inside = torch.tensor([False, False, True, True, False, False])  # tiny: underflow; ≥ δ: clamped
    torch.testing.assert_close(points.grad[inside], ((out - 0 + 1e-6) / shifted).detach()[inside])
    assert points.grad[~inside].tolist() == [0.0] * 4
    assert delta.grad is not None and float(delta.grad) != 0


def _shift_log_op_by_op(x, shift, delta, bits, k, eps, ste):
    """The shift-log forward written op by op: the gradients the fused node must reproduce."""
    shifted = (x - shift) + eps
    positive = shifted > 0
    exponents = torch.log2(torch.where(positive, shifted, delta) / delta) * (-k)
    codes = round_ste(exponents) if ste else torch.round(exponents)
    underflow = ~positive | (codes.detach() >= 2**bits)
    levels = delta * torch.exp2(clamp_inclusive(codes, 0, 2**bits - 1) * (-1.0 / k))
    return (torch.where(underflow, torch.zeros_like(levels), levels) + shift) - eps


@pytest.mark.parametrize("ste", [False, True], ids=["reference", "ste"])
@pytest.mark.parametrize("shift_mode", ["dynamic", "static"])
@pytest.mark.parametrize("base", ["sqrt2", "2"])
def test_fused_shift_log_matches_the_op_by_op_form(ste: bool, shift_mode: str, base: str) -> None:
    from benchsuite.quant.shift_log import _ShiftLogFakeQuant

    g = gen(int(ste) + 2 * (shift_mode == "static") + 4 * (base == "2"))
    x = (F.gelu(torch.randn(3, 9, 16, generator=g) * 2) * torch.rand(3, 9, 16, generator=g) * 3).requires_grad_()
    delta = torch.tensor(1.3, requires_grad=True)
    k = 2 if base == "sqrt2" else 1
    grad = torch.randn(x.shape, generator=g)
    for bits in (3, 4):
        if shift_mode == "dynamic":
            shift_for = lambda t: t.amin()  # noqa: E731 - autograd through the minimum
        else:
            shift_for = lambda t: torch.tensor(-0.05)  # noqa: E731 - some inputs become ≤ 0
        want = _shift_log_op_by_op(x, shift_for(x), delta, bits, k, 1e-6, ste)
        got = _ShiftLogFakeQuant.apply(x, shift_for(x), delta, bits, k, 1e-6, ste)
        assert torch.equal(got, want)
        grads = [torch.autograd.grad(out, (x, delta), grad, allow_unused=True, materialize_grads=True)
                 for out in (got, want)]
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_plain_rounding_with_a_fixed_step_records_no_autograd_nodes() -> None:
    """Zero gradient either way, so the cheap no-grad path serves autograd too (same values)."""
    x = torch.rand(2, 3, 8, 8, generator=gen(4)).softmax(-1).requires_grad_()
    log_q = LogSqrt2Quantizer(3, straight_through=False)
    uniform_q = UniformQuantizer(4, straight_through=False)
    for q in (log_q, uniform_q):
        calibrate(q, x.detach())
        out = q(x)
        assert not out.requires_grad
        with torch.no_grad():
            assert torch.equal(out, q(x))
        q.make_scale_learnable()
        assert q(x).requires_grad  # a learnable step still gets its gradient


def test_shift_log_state_machine() -> None:
    x = F.gelu(torch.randn(2, 8, 4, generator=gen(10)))
    q = ShiftLogQuantizer(4, base="2", lazy_init=True)
    out = q(x)
    assert q.initialized and torch.equal(out, q(x))
    restored = round_trip(q, ShiftLogQuantizer(4, base="2"))
    assert torch.equal(restored(x), q(x))
    restored_learnable = ShiftLogQuantizer(4, base="2")
    calibrate(restored_learnable, x * 2)
    restored_learnable.make_scale_learnable()
    round_trip(q, restored_learnable)
    assert torch.equal(restored_learnable.delta, q.delta)
    q.reset()
    assert not q.initialized
    with pytest.raises(RuntimeError, match="observed no data"):
        ShiftLogQuantizer(4).finalize()


# ============================================================================================
# DFQ (aiqvit.md §4)
# ============================================================================================


@st.composite
def dfq_cases(draw):
    bits = draw(bits_st)
    below = draw(st.sampled_from(["clamp", "zero"]))
    b1 = draw(st.floats(1e-4, 0.3))
    b2 = draw(st.floats(b1 + 1e-2, 1.0))
    q = DynamicFocusingQuantizer(bits, below=below)
    q.set_interval(b1, b2)
    return q, draw(probs_st)


@given(dfq_cases())
@PROPERTY
def test_dfq_grid(case) -> None:
    q, array = case
    x = torch.from_numpy(array)
    out = q(x)
    b1, b2 = (float(b) for b in q.interval())
    step = (b2 - b1) / q.qmax
    inside = (x >= b1) & (x <= b2)
    assert bool(((out - x).abs()[inside] <= step / 2 + 1e-6).all())
    assert out[x > b2].unique().numel() <= 1  # everything above b2 lands on the top level
    if q.below == "clamp":
        assert bool(((out >= b1 - 1e-6) & (out <= b2 + 1e-6)).all())
        assert out.unique().numel() <= 2**q.bits
    else:
        assert bool((out[x < b1] == 0).all())
        assert out.unique().numel() <= 2**q.bits + 1
    assert torch.equal(q(out), out)  # idempotent
    with torch.no_grad():
        assert torch.equal(q(x), out.detach())


def test_dfq_levels_cover_the_interval_exactly() -> None:
    q = DynamicFocusingQuantizer(2)
    q.set_interval(0.1, 0.4)
    x = torch.linspace(0, 1, 1001)
    values = q(x).detach().unique()
    torch.testing.assert_close(values, torch.tensor([0.1, 0.2, 0.3, 0.4]))
    zero = DynamicFocusingQuantizer(2, below="zero")
    zero.set_interval(0.1, 0.4)
    torch.testing.assert_close(zero(x).detach().unique(), torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4]))


def test_dfq_gradients() -> None:
    q = DynamicFocusingQuantizer(3)
    q.set_interval(0.05, 0.5)
    x = torch.tensor([0.01, 0.05, 0.1, 0.27, 0.5, 0.7], requires_grad=True)
    out = q(x)
    (out * torch.arange(1.0, 7.0)).sum().backward()
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 0.0]  # STE inside [b1, b2], 0 outside
    assert float(q.u1.grad) != 0 and float(q.u2.grad) != 0
    # An element clamped above b2 outputs b2 itself: d x̂ / d b2 = 1 (LSQ-style), so u2 gets
    # softplus'(u2) = sigmoid(u2) > 0 from it.
    q.zero_grad()
    q(torch.tensor([0.9]))[0].backward()
    torch.testing.assert_close(q.u2.grad, torch.sigmoid(q.u2.detach()))


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_dfq_quantile_init(granularity: str) -> None:
    attn = softmax_maps(11, (3, 4, 10, 10))
    q = DynamicFocusingQuantizer(4, granularity=granularity)
    calibrate(q, attn[:1], attn[1:])  # two batches = one concatenated batch
    b1, b2 = q.interval()
    if granularity == "layer":
        expected = torch.quantile(attn.reshape(-1), 0.999).reshape(1)
    else:
        expected = torch.quantile(attn.transpose(0, 1).reshape(4, -1), 0.999, dim=1)
    torch.testing.assert_close(b2.detach(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(b1.detach(), torch.full_like(b1, 1e-6), rtol=1e-4, atol=0)
    assert b1.shape == ((1,) if granularity == "layer" else (4,))
    restored = round_trip(q, DynamicFocusingQuantizer(4, granularity=granularity))
    assert torch.equal(restored(attn), q(attn))
    if granularity == "head":
        with pytest.raises(ValueError, match="heads"):
            q(torch.rand(1, 3, 5, 5))


def test_dfq_mse_init_picks_the_best_candidate() -> None:
    attn = softmax_maps(12, (2, 2, 8, 8))
    q = DynamicFocusingQuantizer(3, init="mse", mse_steps=20)
    calibrate(q, attn)
    _, b2 = q.interval()
    errors = []
    for i in range(1, 21):
        trial = DynamicFocusingQuantizer(3)
        trial.set_interval(1e-6, float(attn.max()) / 20 * i)
        errors.append(float((trial(attn) - attn).pow(2).mean()))
    best = float(attn.max()) / 20 * (int(np.argmin(errors)) + 1)
    assert float(b2) == pytest.approx(best, rel=1e-4)
    lazy = DynamicFocusingQuantizer(3, lazy_init=True)
    lazy(attn)
    assert lazy.initialized
    lazy.reset()
    assert not lazy.initialized and len(list(lazy.parameters())) == 2
    with pytest.raises(ValueError):
        q.set_interval(0.6, 0.9)  # b1 beyond b1_max


# ============================================================================================
# AdaRound (adfq_vit.md §7)
# ============================================================================================


@st.composite
def weight_cases(draw):
    out_ch, in_ch = draw(st.integers(1, 6)), draw(st.integers(1, 8))
    w = torch.randn(out_ch, in_ch, generator=gen(draw(seed_st))) * draw(st.floats(0.01, 2.0))
    per_channel = draw(st.booleans())
    uq = UniformQuantizer(draw(bits_st), "channel" if per_channel else "tensor", channel_dim=0)
    calibrate(uq, w)
    return AdaRoundQuantizer.from_uniform(uq, w), uq, w


@given(weight_cases())
@PROPERTY
def test_adaround_soft_start_is_the_weight_and_hard_start_is_nearest(case) -> None:
    ada, uq, w = case
    ratio = w / ada.scale
    frac = ratio - torch.floor(ratio)
    torch.testing.assert_close(ada.rectified_sigmoid().detach(), frac, rtol=0, atol=1e-5)
    soft = ada(w)
    codes = torch.floor(ratio) + frac + ada.zero_point
    inside = (codes >= 0) & (codes <= ada.qmax)
    # W/Δ is huge for a constant weight (Δ = MIN_SCALE), hence the slack relative to |W| too.
    slack = 2e-5 * float(ada.scale.max()) + 1e-6 * float(w.abs().max())
    torch.testing.assert_close(soft[inside].detach(), w[inside], rtol=0, atol=slack)
    ada.harden()
    hard = ada(w)
    not_tie = (frac - 0.5).abs() > 1e-3
    assert torch.equal(hard[not_tie], uq(w)[not_tie])


@given(weight_cases(), seed_st)
@PROPERTY
def test_adaround_hard_output_lies_on_the_grid(case, seed: int) -> None:
    ada, _, w = case
    with torch.no_grad():
        ada.v.add_(torch.randn(ada.v.shape, generator=gen(seed)) * 3)
    ada.harden()
    out = ada(w)
    codes = ada.integer_weight()  # out / Δ + z, without the float error of inverting it
    assert torch.equal(codes, torch.round(codes)) and bool(((codes >= 0) & (codes <= ada.qmax)).all())
    assert torch.equal(out, (codes - ada.zero_point) * ada.scale)
    assert torch.equal(codes, torch.clamp(torch.floor(w / ada.scale) + (ada.v >= 0) + ada.zero_point, 0, ada.qmax))
    assert out.grad_fn is None  # hard mode uses no soft values: no gradient to V
    # Nudging V without crossing 0 changes nothing.
    with torch.no_grad():
        ada.v.mul_(1.5)
    assert torch.equal(ada(w), out)


def test_adaround_regularizer_and_soft_gradient() -> None:
    w = torch.randn(4, 6, generator=gen(13))
    uq = UniformQuantizer(3, "channel", channel_dim=0)
    calibrate(uq, w)
    ada = AdaRoundQuantizer.from_uniform(uq, w)
    ada(w).pow(2).sum().backward()
    assert ada.v.grad is not None and bool((ada.v.grad != 0).any())
    with torch.no_grad():
        ada.v.zero_()  # h = 0.5 everywhere: the regularizer is 1 per weight
    assert float(ada.regularizer(20.0)) == pytest.approx(w.numel())
    values = []
    for spread in (0.0, 0.5, 1.0, 2.0, 4.0, 8.0):  # h moves towards 0 and 1
        with torch.no_grad():
            ada.v.copy_(torch.where(torch.arange(w.numel()).reshape(w.shape) % 2 == 0, spread, -spread))
        values.append(float(ada.regularizer(2.0)))
    assert all(a > b for a, b in zip(values, values[1:5])) and values[-1] == 0.0
    regularizer = ada.regularizer(2.0)
    assert regularizer.requires_grad


def test_adaround_state_dict_and_errors() -> None:
    w = torch.randn(3, 2, 2, 2, generator=gen(14))
    uq = UniformQuantizer(4, "channel", channel_dim=0)
    calibrate(uq, w)
    ada = AdaRoundQuantizer.from_uniform(uq, w)
    assert ada.scale.shape == (3, 1, 1, 1) and ada.weight_floor.shape == w.shape
    ada.harden()
    restored = round_trip(ada, AdaRoundQuantizer(4))
    assert restored.is_hard and torch.equal(restored(w), ada(w))
    soft = round_trip(AdaRoundQuantizer.from_uniform(uq, w), AdaRoundQuantizer(4))
    assert not soft.is_hard
    with pytest.raises(ValueError, match="shape"):
        ada(torch.randn(3, 2, 2, 1))
    with pytest.raises(RuntimeError, match="from_uniform"):
        AdaRoundQuantizer(4).finalize()
    with pytest.raises(RuntimeError, match="calibrated"):
        AdaRoundQuantizer.from_uniform(UniformQuantizer(4), w)
    per_tensor = UniformQuantizer(4)
    calibrate(per_tensor, w)
    assert AdaRoundQuantizer.from_uniform(per_tensor, w).scale.shape == (1, 1, 1, 1)


def test_adaround_beta_schedule() -> None:
    # Reference LossFunction/LinearTempDecay with counter t = step + 1, warmup 0.2, β 20 → 2.
    betas = [adaround_beta(step, 10) for step in range(10)]
    assert betas[0] is None  # t = 1 < 0.2·10
    assert betas[1:] == pytest.approx([20.0, 17.75, 15.5, 13.25, 11.0, 8.75, 6.5, 4.25, 2.0])
    long = [adaround_beta(step, 3000) for step in range(3000)]
    assert sum(b is None for b in long) == 599 and long[599] == 20.0 and long[-1] == 2.0
    decaying = [b for b in long if b is not None]
    assert all(a >= b for a, b in zip(decaying, decaying[1:]))
    assert adaround_beta(0, 5, warmup=0.0) == pytest.approx(20 - 18 / 5)
    schedule = RoundingSchedule(total=10)
    assert [schedule(s) for s in range(10)] == betas
    with pytest.raises(ValueError):
        adaround_beta(0, 0)


# ============================================================================================
# Shared behaviour
# ============================================================================================


def test_quantile_helper_is_torch_quantile_for_dfq_rows() -> None:
    rows = softmax_maps(15).reshape(1, -1)
    assert torch.equal(quantiles(rows, [0.999])[0], torch.quantile(rows[0], 0.999).reshape(1))


@pytest.mark.parametrize(
    "make",
    [
        lambda: SULQuantizer(3),
        lambda: PerPatchOutlierQuantizer(3),
        lambda: ShiftLogQuantizer(3),
        lambda: DynamicFocusingQuantizer(3),
    ],
)
def test_disabled_and_observing_are_identity(make) -> None:
    x = softmax_maps(16, (2, 4, 6))
    q = make()
    q.observing = True
    assert q(x) is x and q.has_observations
    q.observing = False
    q.finalize()
    q.enabled = False
    assert q(x) is x
    q.enabled = True
    assert q(x) is not x and q(x).shape == x.shape
