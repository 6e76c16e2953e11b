"""ADFQ-ViT's shift-log quantizer for post-GELU activations (adfq_vit.md §5).

GELU outputs are mostly small with a long positive tail, like attention probabilities, but dip to
about -0.17. ADFQ-ViT shifts them positive and applies a log quantizer:

1. ``m = min(X)`` of the current tensor, at every forward (``shift_mode="dynamic"``, the reference
   code), or a constant (``"static"``, proposal: the calibrated minimum, or the GELU lower bound
   :data:`GELU_LOWER_BOUND` = -0.17 passed as ``static_min``, which is deployable);
2. ``X' = X - m + ε`` (ε = 1e-6), so ``X' > 0``;
3. ``q = round(-k·log2(X' / δ))`` with ``k = 2`` for base √2 (the reference code) or ``k = 1`` for
   base 2 (the paper's wording); ``q ≥ 2**b`` → ``X̂' = 0``, otherwise ``q`` is clamped to
   ``[0, 2**b - 1]`` and ``X̂' = δ · base^(-q)``;
4. ``X̂ = X̂' + m - ε``.

δ, the top level, is chosen once by the percentile/MSE search on ``X'`` of the calibration data.
At inference the shift folds into fc2's bias: ``W(x̂' + m) = W·x̂' + m·W·1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from torch import nn

from benchsuite.quant.init_search import DEFAULT_PERCENTILES, quantiles
from benchsuite.quant.outlier import GradientMode, check_gradient_mode
from benchsuite.quant.quantizers import (
    MIN_SCALE,
    Quantizer,
    _check_percentiles,
    _private_rows,
    needs_grad,
)

__all__ = [
    "GELU_LOWER_BOUND",
    "LogBase",
    "ShiftLogQuantizer",
    "ShiftMode",
    "fake_quantize_log",
    "search_log_scale",
]

LogBase = Literal["sqrt2", "2"]
ShiftMode = Literal["dynamic", "static"]

#: GELU's minimum, rounded as in adfq_vit.md §5 (the exact value is about -0.16997).
GELU_LOWER_BOUND = -0.17
_CODES_PER_OCTAVE = {"sqrt2": 2, "2": 1}


def fake_quantize_log(x: torch.Tensor, scale: torch.Tensor | float, bits: int, k: int) -> torch.Tensor:
    """Log fake quantization of positive ``x`` with top level δ = ``scale``, plain rounding.

    ``q = round(-k·log2(x/δ))``; ``x̂ = δ·2^(-q/k)`` for ``q`` clamped to ``[0, 2**b - 1]``, and 0
    where ``q ≥ 2**b`` or ``x ≤ 0``. ``k = 2`` is the log√2 quantizer (same numbers as
    :func:`~benchsuite.quant.init_search.fake_quantize_log_sqrt2`), ``k = 1`` the log2 one.
    """
    return _fake_quantize_log_(x.clone(), scale, bits, k)


def _fake_quantize_log_(
    x: torch.Tensor, scale: torch.Tensor | float, bits: int, k: int, *, positive: bool = False
) -> torch.Tensor:
    """:func:`fake_quantize_log` in place on ``x``, a tensor the caller owns (and loses).

    On a CPU, a fresh activation-sized buffer costs as much as several elementwise passes (page
    faults), so the evaluation path allocates only the boolean masks. ``positive=True``: the
    caller guarantees ``x > 0`` (the dynamic shift ``x - min(x) + ε``), which saves the mask of
    non-positive entries.
    """
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    codes, underflow = _log_codes_(x, scale, bits, k, positive=positive)
    return _log_levels_(codes, underflow, scale, bits, k)


def _log_codes_(
    x: torch.Tensor, scale: torch.Tensor, bits: int, k: int, *, positive: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q = round(-k·log2(x/δ))`` in place on ``x``, unclamped, and the mask of zero codes.

    The zero code covers ``q ≥ 2**b`` and, unless ``positive``, ``x ≤ 0`` (and NaN), whose codes
    here are NaN or inf.
    """
    nonpositive = None if positive else (x > 0).logical_not_()
    codes = x.div_(scale).log2_().mul_(-k).round_()
    underflow = codes >= 2**bits
    if nonpositive is not None:
        underflow.logical_or_(nonpositive)
    return codes, underflow


def _log_levels_(codes: torch.Tensor, underflow: torch.Tensor, scale: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """``δ·2^(-q/k)`` for ``q`` clamped to the grid, 0 under ``underflow``; in place on ``codes``."""
    values = codes.clamp_(0, 2**bits - 1).mul_(-1.0 / k).exp2_().mul_(scale)
    return values.masked_fill_(underflow, 0)


def search_log_scale(
    x: torch.Tensor, bits: int, k: int, percentiles: Sequence[float] = DEFAULT_PERCENTILES
) -> torch.Tensor:
    """δ of a log quantizer: ``quantile(x, p)`` for each ``p``, lowest MSE wins (first on ties).

    For ``k = 2`` this is :func:`~benchsuite.quant.init_search.search_log_sqrt2_scale`. Returns a
    1-element tensor, at least ``MIN_SCALE``.
    """
    with torch.no_grad():
        rows = x.detach().reshape(1, -1)
        if rows.dtype not in (torch.float32, torch.float64):
            rows = rows.float()
        candidates = quantiles(rows, list(percentiles))[:, 0].clamp_min(MIN_SCALE)
        errors = torch.stack(
            [fake_quantize_log(rows, delta, bits, k).sub_(rows).square_().mean() for delta in candidates]
        ).nan_to_num(nan=float("inf"))
        return candidates[errors.argmin()].reshape(1)


class _ShiftLogFakeQuant(torch.autograd.Function):
    """``fake_quantize_log(x - m + ε, δ) + m - ε`` with the gradients of both modes, one node.

    Written op by op, the shift-log forward records about fifteen elementwise nodes on the
    widest activation of an MLP block (4x its width); as one node it saves two tensors. The
    gradients are those of the op-by-op form (with ``X' = x - m + ε``, ``X̂'`` its quantized value):

    - ``"reference"`` (plain rounding): x gets nothing directly; m gets ``Σ grad`` (the output is
      ``X̂' + m - ε``); δ gets ``Σ grad · X̂'/δ`` (``X̂' = δ·base^(-q)``, 0 where it underflows).
    - ``"ste"``: where the code is in ``[0, 2**b - 1]`` and ``X' > 0`` (``pass``), ``dX̂'/dX' =
      X̂'/X'`` and the two paths to δ (the level and the code) cancel; elsewhere only the level's
      ``X̂'/δ`` reaches δ. m gets ``Σ grad`` minus what x gets.
    """

    @staticmethod
    def forward(ctx, x, shift, delta, bits, k, eps, ste):  # noqa: D102 - see the class docstring
        shifted = (x - shift).add_(eps)
        # STE's backward needs X' itself; the reference mode lets the codes take its buffer.
        codes, underflow = _log_codes_(shifted.clone() if ste else shifted, delta, bits, k)
        passing = (codes >= 0).logical_and_(underflow.logical_not()) if ste else None
        shifted_hat = _log_levels_(codes, underflow, delta, bits, k)
        ctx.ste = ste
        ctx.save_for_backward(shifted_hat, shifted if ste else None, passing, delta)
        return (shifted_hat + shift).sub_(eps)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        shifted_hat, shifted, passing, delta = ctx.saved_tensors
        grad_x = grad_shift = grad_delta = None
        if ctx.ste:
            direct = torch.where(passing, grad * shifted_hat / shifted, 0.0)
            grad_x = direct if ctx.needs_input_grad[0] else None
            if ctx.needs_input_grad[1]:
                grad_shift = (grad.sum() - direct.sum()).reshape(())
            if ctx.needs_input_grad[2]:
                grad_delta = (torch.where(passing, 0.0, grad * shifted_hat).sum() / delta).reshape(delta.shape)
        else:
            if ctx.needs_input_grad[1]:  # x itself gets nothing (None: zero, not materialised)
                grad_shift = grad.sum().reshape(())
            if ctx.needs_input_grad[2]:
                grad_delta = ((grad * shifted_hat).sum() / delta).reshape(delta.shape)
        return grad_x, grad_shift, grad_delta, None, None, None, None


class ShiftLogQuantizer(Quantizer):
    """Shift-then-log fake quantizer for post-GELU activations (ADFQ-ViT), per tensor.

    Outputs are ``m - ε`` (the zero code) or ``δ·base^(-q) + m - ε`` for ``q = 0 .. 2**b - 1``:
    ``2**b + 1`` symbols, the same quirk as the log√2 quantizer, kept for parity.

    Calibration keeps every observed tensor until :meth:`finalize` (several batches give the
    same δ as one concatenated batch), records their minimum in the buffer ``min_val``, shifts
    by the minimum the forward will use (the calibrated minimum in dynamic mode, i.e. what the
    reference's dynamic shift sees on the concatenated calibration tensor; ``static_min`` or the
    calibrated minimum in static mode) and searches δ (:func:`search_log_scale`). δ lives in the
    buffer ``scale`` (alias :attr:`delta`); :meth:`make_scale_learnable` makes it a Parameter.

    Gradients (``gradient_mode``, adfq_vit.md §8):

    - ``"reference"``: plain rounding. ``x`` receives gradient only through the dynamic minimum
      ``m`` (the whole upstream gradient lands on the minimum element, as in the reference code);
      δ receives ``base^(-q)`` from the multiplication.
    - ``"ste"``: straight-through rounding (zero where ``q`` is clamped or underflows), plus the
      path through ``m``; LSQ-style gradient to δ.
    """

    scale: torch.Tensor
    min_val: torch.Tensor

    def __init__(
        self,
        bits: int,
        enabled: bool = True,
        *,
        base: LogBase = "sqrt2",
        shift_mode: ShiftMode = "dynamic",
        static_min: float | None = None,
        eps: float = 1e-6,
        percentiles: Sequence[float] = DEFAULT_PERCENTILES,
        gradient_mode: GradientMode = "reference",
        lazy_init: bool = False,
    ) -> None:
        super().__init__(bits, enabled, lazy_init=lazy_init)
        if base not in _CODES_PER_OCTAVE:
            raise ValueError(f"base must be 'sqrt2' or '2', got {base!r}")
        if shift_mode not in ("dynamic", "static"):
            raise ValueError(f"shift_mode must be 'dynamic' or 'static', got {shift_mode!r}")
        if static_min is not None and shift_mode != "static":
            raise ValueError("static_min is only used with shift_mode='static'")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        self.base: LogBase = base
        self.shift_mode: ShiftMode = shift_mode
        self.static_min = None if static_min is None else float(static_min)
        self.eps = float(eps)
        self.percentiles = _check_percentiles(percentiles)
        self.gradient_mode: GradientMode = check_gradient_mode(gradient_mode)
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("min_val", torch.empty(0))
        self._samples: list[torch.Tensor] = []

    # -- state -------------------------------------------------------------------------------

    @property
    def codes_per_octave(self) -> int:
        """``k``: 2 for base √2, 1 for base 2."""
        return _CODES_PER_OCTAVE[self.base]

    @property
    def delta(self) -> torch.Tensor:
        """δ, the largest level of the shifted tensor (alias of ``scale``)."""
        return self.scale

    @property
    def initialized(self) -> bool:
        return self.scale.numel() > 0

    @property
    def has_observations(self) -> bool:
        """Whether tensors were observed and not yet consumed by :meth:`finalize`."""
        return bool(self._samples)

    def reset(self) -> None:
        """Forget observations and parameters (a learnable δ becomes a buffer again)."""
        self._make_buffer("scale", torch.empty(0, device=self.scale.device))
        self.min_val = torch.empty(0, device=self.min_val.device)
        self._samples = []

    def make_scale_learnable(self) -> nn.Parameter:
        """Turn the calibrated δ into an ``nn.Parameter`` (ADFQ-ViT trains the fc2-input δ)."""
        return self._make_learnable("scale")

    # -- calibration -------------------------------------------------------------------------

    def observe(self, x: torch.Tensor) -> None:
        """Keep a flat copy of ``x`` for the δ search."""
        if x.numel() == 0:
            return
        self._samples.append(_private_rows(x.detach(), "tensor", 0))

    def finalize(self) -> None:
        """Shift the kept tensors, search δ on them, then release them."""
        if not self._samples:
            raise RuntimeError(f"{self.__class__.__name__} cannot finalize: it observed no data")
        rows = self._take_samples()
        self.min_val = rows.amin().reshape(1).float()
        shift = self.min_val.to(rows.dtype).reshape(())
        if self.shift_mode == "static" and self.static_min is not None:
            shift = torch.tensor(self.static_min, dtype=rows.dtype, device=rows.device)
        shifted = rows.sub_(shift).add_(self.eps)  # rows are our own copy
        delta = search_log_scale(shifted, self.bits, self.codes_per_octave, self.percentiles)
        self._set_tensor("scale", delta.float())

    def set_params(self, delta: torch.Tensor | float, min_val: torch.Tensor | float | None = None) -> None:
        """Set δ (and, for static mode without ``static_min``, the calibrated minimum) directly."""
        delta_t = torch.as_tensor(delta, dtype=torch.float32).detach().clone().reshape(-1)
        if delta_t.numel() != 1 or not bool((delta_t > 0).all()):
            raise ValueError(f"δ must be one strictly positive value, got {delta!r}")
        self._set_tensor("scale", delta_t.to(self.scale.device))
        if min_val is not None:
            self.min_val = torch.as_tensor(min_val, dtype=torch.float32).reshape(1).to(self.scale.device)

    def _shift(self, x: torch.Tensor) -> torch.Tensor:
        """``m`` for ``x``: its minimum (dynamic, with autograd) or the static constant."""
        if self.shift_mode == "dynamic":
            return x.amin()
        if self.static_min is not None:
            return torch.tensor(self.static_min, dtype=x.dtype, device=x.device)
        if self.min_val.numel() == 0:
            raise RuntimeError("static shift without static_min needs a calibrated minimum (min_val)")
        return self.min_val.reshape(()).to(device=x.device, dtype=x.dtype)

    # -- quantization ------------------------------------------------------------------------

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        compute = x if x.dtype in (torch.float32, torch.float64) else x.float()
        delta = self.scale.reshape(()).to(compute.dtype)
        k = self.codes_per_octave
        if not needs_grad(x, delta):
            shift = self._shift(compute)
            shifted = torch.sub(compute, shift).add_(self.eps)  # ≥ ε > 0 with the dynamic shift
            positive = self.shift_mode == "dynamic"
            hat = _fake_quantize_log_(shifted, delta, self.bits, k, positive=positive)
            return hat.add_(shift).sub_(self.eps).to(x.dtype)
        shift = self._shift(compute)
        ste = self.gradient_mode == "ste"
        return _ShiftLogFakeQuant.apply(compute, shift, delta, self.bits, k, self.eps, ste).to(x.dtype)

    def levels(self) -> torch.Tensor:
        """The ``2**b`` non-zero levels of the shifted tensor, ``δ·base^(-q)`` (descending)."""
        if not self.initialized:
            raise RuntimeError("ShiftLogQuantizer has no δ yet")
        codes = torch.arange(self.n_levels, dtype=self.scale.dtype, device=self.scale.device)
        return self.scale.detach().reshape(()) * torch.exp2(codes * (-1.0 / self.codes_per_octave))

    # -- serialization -----------------------------------------------------------------------

    #: Tensors that take their shape at calibration (resized to the saved shapes on load).
    SHAPED_AT_CALIBRATION: ClassVar[tuple[str, ...]] = ("scale", "min_val")

    def extra_repr(self) -> str:
        parts = [super().extra_repr(), f"base={self.base!r}", f"shift_mode={self.shift_mode!r}"]
        if self.static_min is not None:
            parts.append(f"static_min={self.static_min:g}")
        parts.append(f"gradient_mode={self.gradient_mode!r}")
        if self.initialized:
            parts.append(f"delta={float(self.scale):.6g}")
        return ", ".join(parts)
