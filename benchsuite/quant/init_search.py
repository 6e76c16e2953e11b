"""Percentile/MSE initialization searches for quantizers, vectorised over channels.

RepQ-ViT (and methods that reuse its calibration) initialize a uniform asymmetric quantizer by
trying a few clipping percentiles and keeping the one whose fake-quantized tensor is closest to
the original in mean squared error:

- for each ``p`` in ``percentiles``: ``hi = quantile(x, p)``, ``lo = quantile(x, 1 - p)``
  (both tails clipped with the same probability);
- ``Δ = (hi - lo) / (2**b - 1)``, ``z = round(-lo / Δ)``;
- fake-quantize ``x`` with ``(Δ, z)``; the lowest MSE wins (the first candidate on ties).

Per channel, the search runs independently for every channel, all channels at once.

Quantiles follow ``torch.quantile``'s linear interpolation exactly (rank ``p · (n - 1)`` computed
in the data's dtype, ``lerp`` between the two neighbouring order statistics), so on tensors that
``torch.quantile`` accepts the results are bit-identical. ``torch.quantile`` refuses more than
2**24 elements per reduction (the reference code then falls back to ``numpy.percentile``, whose
linear rule is the same); here the order statistics come from ``torch.topk`` (only the tails
that the percentiles need, much faster than sorting tens of millions of values) or a full sort,
so any size works with the same rule.

:func:`search_uniform_lp` is a different search, QDrop's (used by ADFQ-ViT for Q, K and V): a grid
over clipping ranges and zero points minimizing the mean ``|x - x̂|^p`` with ``p = 2.4``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

__all__ = [
    "DEFAULT_LP_NORM",
    "DEFAULT_PERCENTILES",
    "LP_SEARCH_STEPS",
    "fake_quantize_uniform",
    "fake_quantize_log_sqrt2",
    "order_statistics",
    "quantiles",
    "search_log_sqrt2_scale",
    "search_uniform_lp",
    "search_uniform_params",
    "search_uniform_rows",
    "to_rows",
]

#: The reference code's candidates for both the uniform and the log√2 search.
DEFAULT_PERCENTILES: tuple[float, ...] = (0.999, 0.9999, 0.99999)
#: Lower bound of a step size (a constant channel would otherwise give Δ = 0).
MIN_SCALE = 1e-8
#: Use ``topk`` on the tails when they hold at most this share of a row, else sort the row.
_TOPK_SHARE = 0.125


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def to_rows(
    x: torch.Tensor, granularity: Literal["tensor", "channel"] = "tensor", channel_dim: int = -1
) -> torch.Tensor:
    """``x`` as a 2-D (rows, values) tensor: one row per tensor, or one row per channel.

    Per channel, row ``c`` holds every element whose index along ``channel_dim`` is ``c`` (for a
    (B, N, C) activation with ``channel_dim=-1``: all B·N values of channel c; for an (O, I)
    weight with ``channel_dim=0``: output row c). May share memory with ``x``.
    """
    if granularity == "tensor":
        return x.reshape(1, -1)
    if granularity != "channel":
        raise ValueError(f"granularity must be 'tensor' or 'channel', got {granularity!r}")
    if not -x.ndim <= channel_dim < x.ndim:
        raise ValueError(f"channel_dim {channel_dim} does not exist in a {x.ndim}-D tensor")
    axis = channel_dim % x.ndim
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def order_statistics(rows: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
    """The ``indices``-th smallest values (0-based) of every row: shape (rows, len(indices)).

    Uses ``topk`` on the low and high tails when the requested indices lie within a small share
    of each end of the rows, otherwise one full sort. NaNs sort as the largest values.
    """
    if rows.ndim != 2:
        raise ValueError(f"order_statistics takes a 2-D (rows, values) tensor, got {rows.ndim}-D")
    length = rows.shape[1]
    idx = [int(i) for i in indices]
    if length == 0 or any(not 0 <= i < length for i in idx):
        raise IndexError(f"order statistics {idx} out of range for rows of {length} values")
    if not idx:
        return rows.new_empty(rows.shape[0], 0)
    low = [i for i in idx if 2 * i < length]
    high = [i for i in idx if 2 * i >= length]
    need_low = max(low) + 1 if low else 0
    need_high = length - min(high) if high else 0
    if need_low + need_high > _TOPK_SHARE * length:
        ordered = rows.sort(dim=1).values
        return ordered[:, idx]
    rows = rows.contiguous()
    columns: dict[int, torch.Tensor] = {}
    if need_low:
        smallest = _tail(rows, need_low, largest=False)  # ascending
        columns.update({i: smallest[:, i] for i in low})
    if need_high:
        largest = _tail(rows, need_high, largest=True)  # descending
        columns.update({i: largest[:, length - 1 - i] for i in high})
    return torch.stack([columns[i] for i in idx], dim=1)


#: Rows longer than this have their tails prefiltered before topk (see :func:`_tail`).
_PREFILTER_MIN_LENGTH = 1 << 20
_PREFILTER_SAMPLE = 1 << 16


def _tail(rows: torch.Tensor, need: int, largest: bool) -> torch.Tensor:
    """The ``need`` largest (descending) or smallest (ascending) values of every row.

    For one long row, a threshold from a strided subsample first keeps only about twice the
    needed values, and ``topk`` runs on those: exact whenever at least ``need`` values pass the
    threshold (the ``need``-th extreme value then passes too), which is checked; otherwise the
    plain ``topk`` over the whole row runs. It makes the calibration search about 2x cheaper on
    large activations, where ``topk`` with a large ``k`` dominates.
    """
    length = rows.shape[1]
    if rows.shape[0] == 1 and length >= _PREFILTER_MIN_LENGTH:
        row = rows[0]
        sample = row[:: max(1, length // _PREFILTER_SAMPLE)]
        keep_share = min(1.0, 2.0 * need / length + 64.0 / sample.numel())
        rank = max(1, min(sample.numel(), int(sample.numel() * keep_share)))
        if largest:
            threshold = sample.kthvalue(sample.numel() - rank + 1).values
            selected = row[row >= threshold]
        else:
            threshold = sample.kthvalue(rank).values
            selected = row[row <= threshold]
        if selected.numel() >= need:
            return selected.topk(need, largest=largest, sorted=True).values[None, :]
    return rows.topk(need, dim=1, largest=largest, sorted=True).values


def quantiles(rows: torch.Tensor, probs: Sequence[float]) -> torch.Tensor:
    """Per-row quantiles with ``torch.quantile``'s linear interpolation: shape (len(probs), rows).

    Bit-identical to ``torch.quantile(rows, torch.tensor(probs), dim=1)`` for float32/float64
    rows of at most 2**24 values (NaNs excepted: rows must be free of them), and defined for
    longer rows, where ``torch.quantile`` raises.
    """
    if rows.ndim != 2 or rows.shape[1] == 0:
        raise ValueError(f"quantiles takes a non-empty 2-D (rows, values) tensor, got {tuple(rows.shape)}")
    if any(not 0.0 <= p <= 1.0 for p in probs):
        raise ValueError(f"probabilities must lie in [0, 1], got {list(probs)}")
    dtype = _compute_dtype(rows)
    rows = rows.to(dtype)
    last = rows.shape[1] - 1
    # Same arithmetic as torch.quantile: p is rounded to the data's dtype, the rank p · (n - 1) is
    # computed in float64, truncated below and ceiled above, the weight rank - below is cast back
    # to the data's dtype, and the result is lerp(below, above, weight) in the data's dtype.
    ranks = torch.tensor(list(probs), dtype=dtype).to(torch.float64) * last
    below = ranks.to(torch.long)
    above = ranks.ceil().to(torch.long)
    weights = (ranks - below).to(dtype).to(rows.device)
    needed = sorted(set(below.tolist()) | set(above.tolist()))
    stats = order_statistics(rows, needed)
    column = {index: position for position, index in enumerate(needed)}
    values_below = stats[:, [column[i] for i in below.tolist()]]  # (rows, P)
    values_above = stats[:, [column[i] for i in above.tolist()]]
    return torch.lerp(values_below, values_above, weights).T


def fake_quantize_uniform(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int
) -> torch.Tensor:
    """``(clamp(round(x / Δ) + z, 0, 2**b - 1) - z) · Δ`` with plain rounding (no STE)."""
    codes = torch.round(x / scale).add_(zero_point).clamp_(0, 2**bits - 1)
    return codes.sub_(zero_point).mul_(scale)


def _check_rows(rows: torch.Tensor) -> torch.Tensor:
    if rows.ndim != 2 or rows.numel() == 0:
        raise ValueError(f"the search needs a non-empty 2-D (rows, values) tensor, got {tuple(rows.shape)}")
    if bool(torch.isnan(rows.sum())) and bool(torch.isnan(rows).any()):  # one cheap pass first
        raise ValueError("the initialization search got NaN values")
    return rows.to(_compute_dtype(rows))


def _check_percentiles(percentiles: Sequence[float]) -> list[float]:
    chosen = [float(p) for p in percentiles]
    if not chosen or any(not 0.0 <= p <= 1.0 for p in chosen):
        raise ValueError(f"percentiles must be a non-empty sequence in [0, 1], got {list(percentiles)}")
    return chosen


def search_uniform_rows(
    rows: torch.Tensor,
    bits: int,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    min_scale: float = MIN_SCALE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The percentile/MSE search for every row of a 2-D (rows, values) tensor at once.

    Returns ``(scale, zero_point, choice)``, each 1-D with one entry per row; ``choice`` is the
    index into ``percentiles`` of the winning candidate. ``Δ`` is at least ``min_scale``.
    """
    rows = _check_rows(rows)
    probs = _check_percentiles(percentiles)
    # One call for every needed quantile: hi for each p, then lo = quantile(1 - p).
    q = quantiles(rows, probs + [1.0 - p for p in probs])  # (2P, R)
    hi, lo = q[: len(probs)], q[len(probs) :]
    scales = ((hi - lo) / (2**bits - 1)).clamp_min(min_scale)  # (P, R)
    zero_points = torch.round(-lo / scales)
    errors = []
    for scale, zero_point in zip(scales, zero_points):
        error = fake_quantize_uniform(rows, scale[:, None], zero_point[:, None], bits).sub_(rows)
        errors.append(error.square_().mean(dim=1))
    mse = torch.stack(errors).nan_to_num(nan=float("inf"))
    choice = mse.argmin(dim=0)  # first minimum on ties, as the reference's strict "<"
    pick = choice[None, :]
    return scales.gather(0, pick)[0], zero_points.gather(0, pick)[0], choice


def search_uniform_params(
    x: torch.Tensor,
    bits: int,
    granularity: Literal["tensor", "channel"] = "tensor",
    channel_dim: int = -1,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    min_scale: float = MIN_SCALE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Δ and z of the uniform asymmetric quantizer by the percentile/MSE search.

    Per tensor: one ``(Δ, z)`` over all of ``x``. Per channel: one per index along
    ``channel_dim`` (dim 0 for weights, -1 for (B, N, C) activations), each searched over every
    element of its channel. Returns 1-D tensors of 1 or C entries, in ``x``'s dtype (float32 for
    non-float64 inputs); ``z`` holds integers.
    """
    with torch.no_grad():
        scale, zero_point, _ = search_uniform_rows(
            to_rows(x.detach(), granularity, channel_dim), bits, percentiles, min_scale
        )
    return scale, zero_point


def fake_quantize_log_sqrt2(x: torch.Tensor, scale: torch.Tensor | float, bits: int) -> torch.Tensor:
    """log√2 fake quantization with plain rounding (no STE), for the Δ search.

    ``q = round(-2·log2(x/Δ))``; ``x̂ = Δ·2^(-q/2)`` for ``q`` clamped to ``[0, 2**b - 1]``, and
    ``0`` where ``q ≥ 2**b`` or ``x ≤ 0``. Same numbers as
    :class:`~benchsuite.quant.quantizers.LogSqrt2Quantizer` in the forward pass.
    """
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    positive = x > 0
    # In place on one buffer: this runs on every attention map of the calibration batch.
    values = torch.where(positive, x, scale).div_(scale).log2_().mul_(-2).round_()  # codes q
    underflow = values >= 2**bits
    underflow.logical_or_(positive.logical_not_())
    values.clamp_(0, 2**bits - 1).mul_(-0.5).exp2_().mul_(scale)
    return values.masked_fill_(underflow, 0)


def search_log_sqrt2_scale(
    x: torch.Tensor,
    bits: int,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    min_scale: float = MIN_SCALE,
) -> torch.Tensor:
    """Δ of the log√2 quantizer: ``quantile(x, p)`` for each ``p``, lowest MSE wins.

    Per tensor only (one scalar Δ, as in the reference code). Returns a 1-element tensor.
    """
    with torch.no_grad():
        rows = _check_rows(to_rows(x.detach()))
        probs = _check_percentiles(percentiles)
        candidates = quantiles(rows, probs)[:, 0].clamp_min(min_scale)  # (P,)
        errors = torch.stack(
            [fake_quantize_log_sqrt2(rows, delta, bits).sub_(rows).square_().mean() for delta in candidates]
        ).nan_to_num(nan=float("inf"))
        return candidates[errors.argmin()].reshape(1)


#: Exponent of the error the Q/K/V search minimizes (QDrop's ``lp_loss(..., 2.4)``).
DEFAULT_LP_NORM = 2.4
#: Number of range fractions (2-D search) or thresholds (1-D search) tried: QDrop's ``num``.
LP_SEARCH_STEPS = 100
#: Most elements one batched evaluation of candidates may touch (bounds the search's memory).
_LP_CHUNK_ELEMENTS = 1 << 23


def _lp_qparams(
    low: torch.Tensor, high: torch.Tensor, bits: int, min_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """QDrop's ``calculate_qparams``: the range widened to contain 0, Δ ≥ ``min_scale``, z in the grid."""
    qmax = 2**bits - 1
    low_neg = torch.clamp_max(low, 0.0)
    high_pos = torch.clamp_min(high, 0.0)
    scale = ((high_pos - low_neg) / float(qmax)).clamp_min(min_scale)
    zero_point = torch.clamp(0.0 - torch.round(low_neg / scale), 0, qmax)  # 0 - round: no -0.0
    return scale, zero_point


def _lp_errors(
    x: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, bits: int, p: float
) -> torch.Tensor:
    """Mean ``|x - x̂|^p`` of ``x`` (1-D) for each candidate (Δ, z) (1-D each), plain rounding."""
    chunk = max(1, _LP_CHUNK_ELEMENTS // max(1, x.numel()))
    errors = []
    for start in range(0, scales.numel(), chunk):
        scale = scales[start : start + chunk, None]
        zero_point = zero_points[start : start + chunk, None]
        x_q = fake_quantize_uniform(x[None, :], scale, zero_point, bits)
        errors.append(x_q.sub_(x[None, :]).abs_().pow_(p).mean(dim=1))
    return torch.cat(errors)


def _prefix_sums_at(values: torch.Tensor, positions: list[int]) -> dict[int, float]:
    """``{i: values[:i].sum()}`` (float64) for every i in ``positions``, in one pass over ``values``.

    A full float64 cumulative sum of tens of millions of values costs more than the rest of a
    candidate Δ's scoring; only the few cut points the zero points need are kept here.
    """
    cuts = sorted(set(positions) | {0})
    totals, running = {0: 0.0}, 0.0
    for begin, end in zip(cuts, cuts[1:]):
        running += float(values[begin:end].sum(dtype=torch.float64))
        totals[end] = running
    return totals


def _lp_errors_sorted(
    x_sorted: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, bits: int, p: float
) -> torch.Tensor:
    """:func:`_lp_errors` for many zero points per step size, from ``x`` sorted ascending.

    For one Δ, ``x̂ = Δ·clamp(u, -z, 2**b - 1 - z)`` with ``u = round(x/Δ)``, so an element inside
    the grid has the error ``Δ^p·|x/Δ - u|^p`` whatever z is: those are summed once per Δ (a
    prefix sum over the sorted values) and each zero point adds only its two clamped tails, which
    are contiguous slices because ``u`` is sorted too. Every candidate is still scored with its
    own (Δ, z) and plain rounding, as the brute force does; only the summation order differs.
    On CPU this is 3-9x faster than :func:`_lp_errors` for a 4-bit search, where ADFQ-ViT's Q/K/V
    initialisation spent most of its calibration time.
    """
    qmax = 2**bits - 1
    count = x_sorted.numel()
    errors = torch.empty(scales.numel(), dtype=torch.float64)
    flat_scales, flat_zero_points = scales.reshape(-1), zero_points.reshape(-1)
    for scale in torch.unique(flat_scales):
        chosen = torch.nonzero(flat_scales == scale).flatten()
        v = x_sorted / scale
        u = torch.round(v)
        lows = -flat_zero_points[chosen]
        highs = qmax - flat_zero_points[chosen]
        starts = torch.searchsorted(u, lows.to(u.dtype), side="left").tolist()
        ends = torch.searchsorted(u, highs.to(u.dtype), side="right").tolist()
        inside = _prefix_sums_at((v - u).abs_().pow_(p), starts + ends)
        for k, index in enumerate(chosen.tolist()):
            start, end = starts[k], ends[k]
            total = inside[end] - inside[start]
            if start:
                total += float((v[:start] - lows[k]).abs_().pow_(p).sum(dtype=torch.float64))
            if end < count:
                total += float((v[end:] - highs[k]).abs_().pow_(p).sum(dtype=torch.float64))
            errors[index] = total * float(scale) ** p / count
    return errors.nan_to_num(nan=float("inf")).to(x_sorted.dtype)


#: Sorted values per bin of :func:`_lp_lower_bounds` (smaller: tighter bounds, more work per Δ).
_LP_BOUND_BIN = 32
#: Sorted values per coarse bin, for the clipped tails in :func:`_lp_lower_bounds`.
_LP_TAIL_BIN = 512
#: Relative slack on a lower bound before it may prune a candidate (float rounding of the bound).
_LP_BOUND_SLACK = 1e-4


def _bins(x_sorted: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Consecutive bins of ``size`` sorted values: (first, last, mean, count) of each."""
    count = x_sorted.numel()
    full = count // size * size
    firsts, lasts = x_sorted[::size], x_sorted[size - 1 :: size]
    sums = x_sorted[:full].double().reshape(-1, size).sum(dim=1)
    counts = torch.full((sums.numel(),), float(size), dtype=torch.float64)
    if full < count:
        lasts = torch.cat([lasts, x_sorted[-1:]])
        sums = torch.cat([sums, x_sorted[full:].double().sum().reshape(1)])
        counts = torch.cat([counts, torch.tensor([float(count - full)], dtype=torch.float64)])
    return firsts, lasts, sums / counts, counts


def _lp_lower_bounds(
    x_sorted: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, bits: int, p: float
) -> torch.Tensor:
    """A lower bound on every candidate's mean ``|x - x̂|^p``, from bins of the sorted values.

    With plain rounding and clamping, an element's error is ``Δ^p`` times its distance (in units
    of Δ) to the nearest point of the candidate's grid ``{-z, ..., 2**b - 1 - z}``, to the power
    p. Two cuts of the sorted values into bins give the bound:

    - fine bins (:data:`_LP_BOUND_BIN` values) that reach into the grid's span: every element is
      at least as far from the integers as the bin's interval ``[first, last]`` (0 when it holds
      an integer). That does not depend on the zero point, so one prefix sum per Δ serves all.
    - coarse bins (:data:`_LP_TAIL_BIN` values) wholly below the grid (above it alike): ``d^p``
      with ``d = low - x`` is convex, so by Jensen's inequality (``p ≥ 1``) a bin's sum is at
      least ``count · (low - mean)^p``. Fine bins between the two cuts count as 0.

    The bins are narrow where the data are dense, so near the optimum the bound is close to the
    score, and it costs passes over bins per Δ instead of a pass over ``x`` per candidate.
    """
    qmax = 2**bits - 1
    count = x_sorted.numel()
    firsts, lasts, _, sizes = _bins(x_sorted, _LP_BOUND_BIN)
    tail_firsts, tail_lasts, tail_means, tail_sizes = _bins(x_sorted, _LP_TAIL_BIN)
    positions = torch.arange(tail_sizes.numel())
    zero = torch.zeros(1, dtype=torch.float64)
    bounds = torch.empty(scales.numel(), dtype=torch.float64)
    flat_scales, flat_zero_points = scales.reshape(-1), zero_points.reshape(-1)
    for scale in torch.unique(flat_scales):
        chosen = torch.nonzero(flat_scales == scale).flatten()
        lows = -flat_zero_points[chosen]
        highs = qmax - flat_zero_points[chosen]
        a, b = firsts / scale, lasts / scale
        gap = torch.where(torch.ceil(a) > b, torch.minimum(a - torch.floor(a), torch.ceil(b) - b), 0.0)
        overlap = torch.cat([zero, (sizes * gap.double().pow_(p)).cumsum(0)])
        inner = overlap[torch.searchsorted(a, highs, side="right")] - overlap[torch.searchsorted(b, lows)]
        means = tail_means / float(scale)
        n_low = torch.searchsorted(tail_lasts / scale, lows)  # coarse bins [0, n_low) lie below low
        d_low = (lows.double()[:, None] - means[None, :]).clamp_min_(0.0).pow_(p)
        d_low = torch.where(positions[None, :] < n_low[:, None], d_low, 0.0)
        n_high = torch.searchsorted(tail_firsts / scale, highs, side="right")  # [n_high, end) above
        d_high = (means[None, :] - highs.double()[:, None]).clamp_min_(0.0).pow_(p)
        d_high = torch.where(positions[None, :] >= n_high[:, None], d_high, 0.0)
        tails = ((d_low + d_high) * tail_sizes[None, :]).sum(dim=1)
        bounds[chosen] = (inner + tails) * float(scale) ** p / count
    return bounds


def _lp_errors_pruned(
    x_sorted: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, bits: int, p: float
) -> torch.Tensor:
    """:func:`_lp_errors_sorted` for the candidates that can still win; ``inf`` for the others.

    Candidates are scored exactly in ascending order of their :func:`_lp_lower_bounds`; once the
    smallest remaining bound exceeds the best exact score (with :data:`_LP_BOUND_SLACK` to spare),
    no remaining candidate can reach it, so the argmin, including the first-wins rule on ties, is
    the exhaustive search's. A 4-bit search over 12.6M values (ViT-S Q/K/V at 128 images) scores
    a few Δ exactly instead of all 100.
    """
    bounds = _lp_lower_bounds(x_sorted, scales, zero_points, bits, p)
    errors = torch.full((scales.numel(),), float("inf"), dtype=torch.float64)
    pending = torch.ones(scales.numel(), dtype=torch.bool)
    flat_scales, flat_zero_points = scales.reshape(-1), zero_points.reshape(-1)
    best = float("inf")
    while bool(pending.any()):
        candidate = int(torch.where(pending, bounds, float("inf")).argmin())
        if float(bounds[candidate]) * (1.0 - _LP_BOUND_SLACK) > best:
            break
        if best == float("inf"):
            chosen = torch.tensor([candidate])
        else:  # every pending candidate of this Δ that may still win, scored in one pass
            same = pending & (flat_scales == flat_scales[candidate])
            chosen = torch.nonzero(same & (bounds * (1.0 - _LP_BOUND_SLACK) <= best)).flatten()
        scored = _lp_errors_sorted(x_sorted, flat_scales[chosen], flat_zero_points[chosen], bits, p)
        errors[chosen] = scored.double()
        pending[chosen] = False
        best = min(best, float(scored.min()))
    return errors.to(x_sorted.dtype)


def search_uniform_lp(
    x: torch.Tensor,
    bits: int,
    p: float = DEFAULT_LP_NORM,
    *,
    steps: int = LP_SEARCH_STEPS,
    min_scale: float = MIN_SCALE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor asymmetric (Δ, z) minimizing the mean ``|x - x̂|^p``: QDrop's MSE search.

    ADFQ-ViT initializes its Q, K and V quantizers this way (adfq_vit.md §3), with p = 2.4:

    - ``x`` with both signs: a 2-D search. For ``i = 1 .. steps`` the range is
      ``r_i = (max - min) · i / steps`` with ``Δ_i = r_i / (2**b - 1)``; for every zero point
      ``z = 0 .. 2**b - 1`` the grid is ``[-z·Δ_i, r_i - z·Δ_i]``;
    - one-signed ``x`` (all ``≥ 0``, or all ``≤ 0``): a 1-D search over thresholds
      ``t_i = max(|min|, max) · i / steps``, grid ``[0, t_i]`` or ``[-t_i, 0]``.

    Each candidate grid goes through QDrop's ``calculate_qparams`` (range widened to contain 0,
    ``Δ = range / (2**b - 1)`` at least ``min_scale``, ``z = -round(min / Δ)`` clamped to the grid)
    and is scored with plain rounding; the first candidate with the lowest score wins, in the
    reference's loop order (range outer, zero point inner). Candidates are evaluated in batches
    (vectorised over zero points). On CPU they are scored from the sorted values
    (:func:`_lp_errors_sorted`, same scores up to summation order), and for ``p ≥ 1`` only those
    whose lower bound can still beat the best score (:func:`_lp_errors_pruned`, same argmin).
    Returns 1-element ``(scale, zero_point)`` tensors, ``z`` an integer, in ``x``'s dtype
    (float32 for non-float inputs).
    """
    if not p > 0:
        raise ValueError(f"p must be positive, got {p!r}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps!r}")
    with torch.no_grad():
        flat = _check_rows(x.detach().reshape(1, -1))[0]
        x_min, x_max = flat.amin(), flat.amax()
        qmax = 2**bits - 1
        fractions = torch.arange(1, steps + 1, dtype=flat.dtype, device=flat.device)
        if bool(x_min >= 0) or bool(x_max <= 0):
            # QDrop computes thres = xrange / num * i (divide first, then multiply).
            thresholds = torch.maximum(x_min.abs(), x_max) / steps * fractions
            zeros = torch.zeros_like(thresholds)
            low, high = (zeros, thresholds) if bool(x_min >= 0) else (-thresholds, zeros)
        else:
            ranges = (x_max - x_min) / steps * fractions  # tmp_max for every i
            steps_delta = ranges / float(qmax)  # tmp_delta
            zps = torch.arange(0, qmax + 1, dtype=flat.dtype, device=flat.device)
            shift = zps[None, :] * steps_delta[:, None]  # (steps, 2**b), zp * tmp_delta
            low = (0.0 - shift).reshape(-1)
            high = (ranges[:, None] - shift).reshape(-1)
        scales, zero_points = _lp_qparams(low, high, bits, min_scale)
        if flat.device.type == "cpu" and p >= 1:  # the tail bound needs a convex |d|^p
            errors = _lp_errors_pruned(flat.sort().values, scales, zero_points, bits, float(p))
        elif flat.device.type == "cpu":
            errors = _lp_errors_sorted(flat.sort().values, scales, zero_points, bits, float(p))
        else:
            errors = _lp_errors(flat, scales, zero_points, bits, float(p)).nan_to_num(nan=float("inf"))
        best = int(errors.argmin())
        return scales[best].reshape(1), zero_points[best].reshape(1)
