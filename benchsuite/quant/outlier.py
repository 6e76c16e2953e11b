"""ADFQ-ViT's per-patch outlier-aware quantizer for post-LayerNorm activations (adfq_vit.md §4).

Post-LayerNorm activations have a few very large values in a few channels. Per-channel input
scales would handle them but do not factor out of ``X̂·Wᵀ``; per-token (per-patch) scales do (a
diagonal scaling of the output rows), so ADFQ-ViT quantizes with one (Δ, z) per token position and
lets the rare values above a threshold bypass quantization (deployed as a sparse float matmul):

1. ``M = |X| > α``, recomputed at every forward;
2. ``X̃ = X`` with ``X̃[M] = 0``;
3. ``X̂ = (clamp(round(X̃ / Δ_n) + z_n, 0, 2**b - 1) - z_n) · Δ_n`` with one (Δ_n, z_n) per position n;
4. ``X̂[M] = X[M]``: outliers come back exactly.

(Δ_n, z_n) come from the percentile/MSE search on ``X̃[:, n, :]`` (all calibration images and all
channels of position n, outliers zeroed so they do not stretch the range), all positions at once
through :func:`~benchsuite.quant.init_search.search_uniform_rows`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from benchsuite.quant.init_search import DEFAULT_PERCENTILES, search_uniform_rows
from benchsuite.quant.quantizers import (
    MIN_SCALE,
    Quantizer,
    _check_percentiles,
    clamp_inclusive,
    needs_grad,
    round_ste,
)

__all__ = ["GradientMode", "PerPatchOutlierQuantizer", "check_gradient_mode"]

#: ``reference``: ADFQ-ViT's code (plain rounding, detached input); ``ste``: straight-through.
GradientMode = Literal["reference", "ste"]


def check_gradient_mode(mode: str) -> GradientMode:
    """``mode`` if it is a gradient mode, else ``ValueError``."""
    if mode not in ("reference", "ste"):
        raise ValueError(f"gradient_mode must be 'reference' or 'ste', got {mode!r}")
    return mode  # type: ignore[return-value]


class PerPatchOutlierQuantizer(Quantizer):
    """Per-token-position uniform fake quantizer whose outliers (``|x| > alpha``) bypass it.

    ``token_dims`` names the token axes of the input: ``(-2,)`` for (B, N, C) tokens (the
    default), ``(-3, -2)`` for (B, H, W, C) NHWC maps (each spatial position its own "patch").
    Parameters live in the buffers ``scale`` and ``zero_point`` with the rank of the observed
    tensors, the token sizes on the token axes and 1 elsewhere, e.g. (1, N, 1) or (1, H, W, 1);
    empty before calibration. The token count is fixed at calibration: an input with other
    token sizes (or another rank) raises ``ValueError``.

    :meth:`observe` keeps the inlier tensor (outliers zeroed) of every observed batch, laid out
    as one row per position, until :meth:`finalize`; several batches therefore give the same
    parameters as one concatenated batch.

    Gradients (``gradient_mode``, adfq_vit.md §8):

    - ``"reference"`` (ADFQ-ViT's code): the input is detached and rounded with plain
      ``torch.round``, outliers included, so no gradient reaches ``x`` at all; a learnable Δ
      (:meth:`make_scale_learnable`) gets ``q - z`` from the dequantizing multiplication only.
    - ``"ste"``: straight-through rounding: gradient 1 to ``x`` inside the grid and at the
      (bypassed) outliers, 0 where clamped; LSQ-style gradient to a learnable Δ.

    Outlier statistics for result records: :attr:`outlier_ratio` (all quantizing forwards since
    :meth:`reset_outlier_stats`) and :attr:`last_outlier_ratio` (the latest one). Observation
    passes are not counted. Counts accumulate on the input's device (no host sync per forward).
    """

    scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(
        self,
        bits: int,
        alpha: float = 5.0,
        token_dims: int | Sequence[int] = (-2,),
        enabled: bool = True,
        *,
        percentiles: Sequence[float] = DEFAULT_PERCENTILES,
        gradient_mode: GradientMode = "reference",
        lazy_init: bool = False,
    ) -> None:
        super().__init__(bits, enabled, lazy_init=lazy_init)
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha!r}")
        dims = (token_dims,) if isinstance(token_dims, int) else tuple(int(d) for d in token_dims)
        if not dims:
            raise ValueError("token_dims must name at least one axis")
        self.alpha = float(alpha)
        self.token_dims: tuple[int, ...] = dims
        self.percentiles = _check_percentiles(percentiles)
        self.gradient_mode: GradientMode = check_gradient_mode(gradient_mode)
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0))
        # Outlier counters: not saved, but they follow the module across devices.
        self.register_buffer("_outliers_total", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("_outliers_last", torch.zeros((), dtype=torch.long), persistent=False)
        self._elements_total = 0
        self._elements_last = 0
        self._samples: list[torch.Tensor] = []
        self._observed_layout: tuple[int, ...] | None = None  # parameter shape of what was observed

    # -- state -------------------------------------------------------------------------------

    @property
    def initialized(self) -> bool:
        return self.scale.numel() > 0

    @property
    def has_observations(self) -> bool:
        """Whether tensors were observed and not yet consumed by :meth:`finalize`."""
        return bool(self._samples)

    def reset(self) -> None:
        """Forget observations and parameters (a learnable ``scale`` becomes a buffer again)."""
        for name in ("scale", "zero_point"):
            self._make_buffer(name, torch.empty(0, device=getattr(self, name).device))
        self._samples = []
        self._observed_layout = None
        self.reset_outlier_stats()

    def make_scale_learnable(self) -> nn.Parameter:
        """Turn the calibrated per-position ``scale`` into an ``nn.Parameter`` and return it.

        ``zero_point`` stays a frozen buffer (ADFQ-ViT trains the Δ vectors of qkv/fc1 inputs).
        """
        return self._make_learnable("scale")

    # -- layout ------------------------------------------------------------------------------

    def _token_axes(self, ndim: int) -> tuple[int, ...]:
        """``token_dims`` as sorted non-negative axes of an ``ndim``-D tensor (checked)."""
        axes = []
        for dim in self.token_dims:
            if not -ndim <= dim < ndim:
                raise ValueError(f"token dim {dim} does not exist in a {ndim}-D tensor")
            axes.append(dim % ndim)
        if len(set(axes)) != len(axes):
            raise ValueError(f"token_dims {self.token_dims} repeat an axis of a {ndim}-D tensor")
        return tuple(sorted(axes))

    def _layout(self, shape: torch.Size) -> tuple[int, ...]:
        """Parameter shape for inputs of ``shape``: token sizes on the token axes, 1 elsewhere."""
        axes = self._token_axes(len(shape))
        return tuple(shape[d] if d in axes else 1 for d in range(len(shape)))

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as (positions, values): row n holds every batch/channel value of position n."""
        axes = self._token_axes(x.ndim)
        positions = _prod(x.shape[d] for d in axes)
        return x.movedim(axes, tuple(range(len(axes)))).reshape(positions, -1)

    def _check_input(self, x: torch.Tensor) -> None:
        expected = tuple(self.scale.shape)
        if x.ndim != len(expected) or self._layout(x.shape) != expected:
            axes = self._token_axes(len(expected))
            raise ValueError(
                f"{type(self).__name__} was calibrated on {len(expected)}-D inputs with token sizes "
                f"{tuple(expected[d] for d in axes)} on axes {axes}; got shape {tuple(x.shape)}. "
                "Per-patch scales fix the token count (other resolutions are not supported)."
            )

    # -- calibration -------------------------------------------------------------------------

    def outlier_mask(self, x: torch.Tensor) -> torch.Tensor:
        """``|x| > alpha``: the values that bypass quantization (no gradient)."""
        return x.detach().abs() > self.alpha

    def observe(self, x: torch.Tensor) -> None:
        """Keep the inliers of ``x`` (outliers zeroed), one row per token position."""
        if x.numel() == 0:
            return
        x = x.detach()
        layout = self._layout(x.shape)
        if self._observed_layout is not None and layout != self._observed_layout:
            raise ValueError(
                f"observed token layout {layout}, earlier batches had {self._observed_layout} "
                "(the token count is fixed at calibration)"
            )
        compute = x if x.dtype in (torch.float32, torch.float64) else x.float()
        inliers = compute.masked_fill(self.outlier_mask(x), 0.0)  # a new tensor, ours to keep
        self._samples.append(self._rows(inliers))
        self._observed_layout = layout

    def finalize(self) -> None:
        """Run the percentile/MSE search for every position on the kept inliers, then drop them."""
        if not self._samples or self._observed_layout is None:
            raise RuntimeError(f"{self.__class__.__name__} cannot finalize: it observed no data")
        rows = self._take_samples()
        scale, zero_point, _ = search_uniform_rows(rows, self.bits, self.percentiles, MIN_SCALE)
        self._set_tensor("scale", scale.float().reshape(self._observed_layout))
        self.zero_point = zero_point.float().reshape(self._observed_layout)
        self._observed_layout = None

    def set_params(self, scale: torch.Tensor, zero_point: torch.Tensor | float) -> None:
        """Set per-position Δ (shape = the parameter layout, e.g. (1, N, 1)) and z directly."""
        scale_t = torch.as_tensor(scale, dtype=torch.float32).detach().clone()
        zero_t = torch.as_tensor(zero_point, dtype=torch.float32).detach().clone()
        zero_t = zero_t.expand(scale_t.shape).clone() if zero_t.numel() == 1 else zero_t
        if scale_t.ndim == 0 or zero_t.shape != scale_t.shape:
            raise ValueError(f"scale {tuple(scale_t.shape)} and zero_point {tuple(zero_t.shape)} must share a layout")
        if self._layout(scale_t.shape) != tuple(scale_t.shape):
            raise ValueError(
                f"scale shape {tuple(scale_t.shape)} is not a token layout for token_dims {self.token_dims}"
            )
        if not bool((scale_t > 0).all()):
            raise ValueError("scale must be strictly positive")
        self._set_tensor("scale", scale_t.to(self.scale.device))
        self.zero_point = zero_t.to(self.scale.device)

    # -- quantization ------------------------------------------------------------------------

    def _count(self, mask: torch.Tensor) -> None:
        with torch.no_grad():
            count = mask.sum()
            self._outliers_last = count.to(self._outliers_last.device)
            self._outliers_total = self._outliers_total + self._outliers_last
        self._elements_last = mask.numel()
        self._elements_total += mask.numel()

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        scale, zero_point = self.scale, self.zero_point
        mask = self.outlier_mask(x)
        self._count(mask)
        compute = x if x.dtype in (torch.float32, torch.float64) else x.float()
        if not needs_grad(x, scale):  # one activation-sized buffer, reused in place
            codes = torch.div(compute, scale).masked_fill_(mask, 0.0).round_().add_(zero_point).clamp_(0, self.qmax)
            dequantized = codes.sub_(zero_point).mul_(scale)
            return torch.where(mask, compute, dequantized, out=dequantized).to(x.dtype)
        if self.gradient_mode == "reference":
            # Plain rounding has zero gradient, so the codes carry none: compute them without
            # autograd; Δ then gets exactly (q - z) from the multiplication, x gets nothing.
            detached = compute.detach()
            with torch.no_grad():
                codes = detached.masked_fill(mask, 0.0).div_(scale).round_().add_(zero_point).clamp_(0, self.qmax)
            return torch.where(mask, detached, (codes - zero_point) * scale).to(x.dtype)
        inliers = compute.masked_fill(mask, 0.0)
        codes = clamp_inclusive(round_ste(inliers / scale) + zero_point, 0, self.qmax)
        return torch.where(mask, compute, (codes - zero_point) * scale).to(x.dtype)

    # -- outlier statistics ------------------------------------------------------------------

    @property
    def outlier_ratio(self) -> float:
        """Share of ``|x| > alpha`` over every quantizing forward since the last reset (0 if none)."""
        return float(self._outliers_total) / self._elements_total if self._elements_total else 0.0

    @property
    def last_outlier_ratio(self) -> float:
        """Share of ``|x| > alpha`` in the latest quantizing forward (0 if none)."""
        return float(self._outliers_last) / self._elements_last if self._elements_last else 0.0

    @property
    def outlier_counts(self) -> tuple[int, int]:
        """(outliers, elements) over every quantizing forward since the last reset."""
        return int(self._outliers_total), self._elements_total

    def reset_outlier_stats(self) -> None:
        """Zero the outlier counters (e.g. before the evaluation pass whose ratio is logged)."""
        self._outliers_total = torch.zeros((), dtype=torch.long, device=self._outliers_total.device)
        self._outliers_last = torch.zeros((), dtype=torch.long, device=self._outliers_last.device)
        self._elements_total = 0
        self._elements_last = 0

    # -- serialization -----------------------------------------------------------------------

    #: Tensors that take their shape at calibration (resized to the saved shapes on load).
    SHAPED_AT_CALIBRATION: ClassVar[tuple[str, ...]] = ("scale", "zero_point")

    def extra_repr(self) -> str:
        parts = [super().extra_repr(), f"alpha={self.alpha:g}", f"token_dims={self.token_dims}"]
        parts.append(f"gradient_mode={self.gradient_mode!r}")
        if self.initialized:
            parts.append(f"layout={tuple(self.scale.shape)}")
        return ", ".join(parts)


def _prod(values: Any) -> int:
    result = 1
    for value in values:
        result *= int(value)
    return result
