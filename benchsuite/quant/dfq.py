"""AIQViT's dynamic focusing quantizer (DFQ) for post-softmax attention (aiqvit.md §4, proposal).

No reference code exists; this is benchsuite's reading of the paper's description: a learnable
interval ``[b1, b2]`` inside ``[0, 1]`` gets all ``2**k`` uniform levels, with no log transform:

    s   = (b2 - b1) / (2**k - 1)
    x_c = clamp(x, b1, b2)
    q   = round((x_c - b1) / s)          in {0, …, 2**k - 1}
    x̂   = s·q + b1

Values below ``b1`` are clamped to ``b1`` (``below="clamp"``, the literal reading) or mapped to an
exact 0 (``below="zero"``, worth testing: clamping lifts every tiny probability to ``b1``).

Parametrization (proposal): unconstrained Parameters ``u1``, ``u2`` with

    b1 = c · sigmoid(u1),        c = ``b1_max`` = 0.5
    b2 = min(b1 + softplus(u2), 1)

so ``0 < b1 < c`` and ``b1 < b2 ≤ 1`` hold for any ``u1``, ``u2`` an optimizer produces. ``c = 0.5``
leaves the upper half of [0, 1] to b2 (softmax mass above 0.5 is rare but real, and b1 must stay
below it). A sigmoid never reaches 0, so the initialization's "b1 = 0" is represented by
``b1 = b1_init`` = 1e-6 (``u1 = logit(b1_init / c) ≈ -13.1``), far below any level spacing that
matters; note that the sigmoid is then saturated, so gradients to ``u1`` are tiny (about b1 times
the gradient to b1) and b1 moves slowly from there (with Adam by about ``lr`` in ``u1`` per step,
i.e. multiplicatively).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from benchsuite.quant.init_search import quantiles
from benchsuite.quant.quantizers import (
    MIN_SCALE,
    Quantizer,
    _private_rows,
    clamp_inclusive,
    needs_grad,
    round_ste,
)

__all__ = ["BelowMode", "DFQGranularity", "DFQInit", "DynamicFocusingQuantizer", "fake_quantize_interval"]

BelowMode = Literal["clamp", "zero"]
DFQGranularity = Literal["layer", "head"]
DFQInit = Literal["quantile", "mse"]


def fake_quantize_interval(
    x: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor, bits: int, below: BelowMode = "clamp"
) -> torch.Tensor:
    """DFQ's forward with plain rounding and no autograd (the MSE search and the no-grad path).

    Same arithmetic, in the same order, as :class:`DynamicFocusingQuantizer`'s STE path.
    """
    qmax = 2**bits - 1
    step = ((b2 - b1) / qmax).clamp_min(MIN_SCALE)
    values = torch.maximum(torch.minimum(x, b2), b1)
    values = values.sub_(b1).div_(step).round_().clamp_(0, qmax).mul_(step).add_(b1)
    if below == "zero":
        values = values.masked_fill_(x < b1, 0)
    return values


def _inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """``u`` with ``softplus(u) = y`` for ``y > 0``, stable for tiny and large ``y``."""
    y = y.double()
    return (y + torch.log(-torch.expm1(-y))).float()


class DynamicFocusingQuantizer(Quantizer):
    """Uniform quantizer on a learnable interval ``[b1, b2]`` of post-softmax values (AIQViT, proposal).

    ``granularity="layer"``: one interval per quantizer; ``"head"``: one per head along dim 1 of a
    (B, H, N, N) attention map (the head count is fixed at calibration). The Parameters ``u1``,
    ``u2`` (shape (1,) or (H,); empty before calibration) define the interval as in the module
    docstring; :meth:`interval` returns ``(b1, b2)`` with autograd.

    Initialization (``init``), with ``b1 = b1_init``:

    - ``"quantile"``: ``b2 = quantile(x, 0.999)`` (``quantile`` argument), per layer or per head,
      exactly ``torch.quantile``'s value, capped to 1;
    - ``"mse"`` (proposal): ``b2`` from the grid ``max(x) · i / steps``, ``i = 1 .. steps``
      (``steps = 100``, as in the L_p search of QDrop), lowest MSE of this quantizer wins.

    The observed tensors are kept until :meth:`finalize`, so several batches give the same
    interval as one concatenated batch.

    Forward: STE rounding; the gradient to ``x`` is 1 inside ``[b1, b2]`` and 0 outside;
    LSQ-style gradients reach ``b1`` and ``b2`` through ``s``, through the clamped elements and
    through the ``+ b1`` offset. Distinct outputs: at most ``2**k`` with ``below="clamp"``, at most
    ``2**k + 1`` (the extra exact 0) with ``below="zero"``.
    """

    u1: nn.Parameter
    u2: nn.Parameter

    def __init__(
        self,
        bits: int,
        enabled: bool = True,
        *,
        below: BelowMode = "clamp",
        granularity: DFQGranularity = "layer",
        init: DFQInit = "quantile",
        quantile: float = 0.999,
        mse_steps: int = 100,
        b1_max: float = 0.5,
        b1_init: float = 1e-6,
        lazy_init: bool = False,
    ) -> None:
        super().__init__(bits, enabled, lazy_init=lazy_init)
        if below not in ("clamp", "zero"):
            raise ValueError(f"below must be 'clamp' or 'zero', got {below!r}")
        if granularity not in ("layer", "head"):
            raise ValueError(f"granularity must be 'layer' or 'head', got {granularity!r}")
        if init not in ("quantile", "mse"):
            raise ValueError(f"init must be 'quantile' or 'mse', got {init!r}")
        if not 0.0 <= quantile <= 1.0:
            raise ValueError(f"quantile must lie in [0, 1], got {quantile!r}")
        if mse_steps < 1:
            raise ValueError(f"mse_steps must be at least 1, got {mse_steps!r}")
        if not 0.0 < b1_max < 1.0 or not 0.0 < b1_init < b1_max:
            raise ValueError(f"need 0 < b1_init < b1_max < 1, got b1_init={b1_init!r}, b1_max={b1_max!r}")
        self.below: BelowMode = below
        self.granularity: DFQGranularity = granularity
        self.init: DFQInit = init
        self.quantile = float(quantile)
        self.mse_steps = int(mse_steps)
        self.b1_max = float(b1_max)
        self.b1_init = float(b1_init)
        self.u1 = nn.Parameter(torch.empty(0))
        self.u2 = nn.Parameter(torch.empty(0))
        self._samples: list[torch.Tensor] = []

    # -- state -------------------------------------------------------------------------------

    @property
    def initialized(self) -> bool:
        return self.u1.numel() > 0

    @property
    def has_observations(self) -> bool:
        """Whether tensors were observed and not yet consumed by :meth:`finalize`."""
        return bool(self._samples)

    def reset(self) -> None:
        """Forget observations and the interval (``u1``, ``u2`` become empty Parameters again)."""
        self._set_tensor("u1", torch.empty(0, device=self.u1.device))
        self._set_tensor("u2", torch.empty(0, device=self.u2.device))
        self._samples = []

    def interval(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(b1, b2)``, each of shape (1,) or (H,), differentiable in ``u1`` and ``u2``."""
        if not self.initialized:
            raise RuntimeError("DynamicFocusingQuantizer is not calibrated")
        b1 = self.b1_max * torch.sigmoid(self.u1)
        b2 = torch.clamp_max(b1 + F.softplus(self.u2), 1.0)
        return b1, b2

    def set_interval(self, b1: torch.Tensor | float, b2: torch.Tensor | float) -> None:
        """Set ``u1``, ``u2`` so that :meth:`interval` gives ``(b1, b2)`` (up to float rounding).

        Needs ``0 < b1 < b1_max`` and ``b1 < b2 ≤ 1``; one value per layer, or one per head.
        """
        b1_t = torch.as_tensor(b1, dtype=torch.float64).detach().reshape(-1)
        b2_t = torch.as_tensor(b2, dtype=torch.float64).detach().reshape(-1)
        if b1_t.numel() == 1 and b2_t.numel() > 1:
            b1_t = b1_t.expand(b2_t.numel())
        if b1_t.numel() != b2_t.numel() or b1_t.numel() == 0:
            raise ValueError(f"b1 has {b1_t.numel()} values, b2 {b2_t.numel()}")
        if self.granularity == "layer" and b1_t.numel() != 1:
            raise ValueError("a per-layer DFQ takes one interval")
        if not bool(((b1_t > 0) & (b1_t < self.b1_max) & (b2_t > b1_t) & (b2_t <= 1)).all()):
            raise ValueError(f"need 0 < b1 < {self.b1_max} and b1 < b2 ≤ 1, got {b1_t.tolist()}, {b2_t.tolist()}")
        ratio = b1_t / self.b1_max
        u1 = torch.log(ratio) - torch.log1p(-ratio)  # logit
        u2 = _inverse_softplus(b2_t - b1_t)
        device = self.u1.device
        self._set_tensor("u1", u1.float().to(device))
        self._set_tensor("u2", u2.float().to(device))

    # -- calibration -------------------------------------------------------------------------

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        if self.granularity == "layer":
            return _private_rows(x, "tensor", 0)
        if x.ndim < 2:
            raise ValueError(f"per-head DFQ needs heads along dim 1, got a {x.ndim}-D tensor")
        return _private_rows(x, "channel", 1)

    def observe(self, x: torch.Tensor) -> None:
        """Keep a copy of ``x`` (one row per head when per head) for the initialization."""
        if x.numel() == 0:
            return
        rows = self._rows(x.detach())
        if self._samples and rows.shape[0] != self._samples[0].shape[0]:
            raise ValueError(f"observed {rows.shape[0]} heads, earlier batches had {self._samples[0].shape[0]}")
        self._samples.append(rows)

    def finalize(self) -> None:
        """Initialize the interval(s) on every tensor observed since the last finalize."""
        if not self._samples:
            raise RuntimeError(f"{self.__class__.__name__} cannot finalize: it observed no data")
        rows = self._take_samples()
        with torch.no_grad():
            b1 = torch.full((rows.shape[0],), self.b1_init, dtype=rows.dtype, device=rows.device)
            b2 = self._search_b2(rows, b1) if self.init == "mse" else quantiles(rows, [self.quantile])[0]
            # Keep b1 < b2 ≤ 1 (a row of zeros would otherwise give an empty interval).
            b2 = torch.clamp(b2, min=2 * self.b1_init, max=1.0)
        self.set_interval(b1, b2)

    def _search_b2(self, rows: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
        """Per row, the ``b2`` of ``max · i / steps`` with the lowest MSE (first on ties)."""
        top = rows.amax(dim=1).clamp(max=1.0)
        best_error = torch.full_like(top, float("inf"))
        best = top.clone()
        for i in range(1, self.mse_steps + 1):
            candidate = (top / self.mse_steps * i).clamp_min(b1 + MIN_SCALE)
            quantized = fake_quantize_interval(rows, b1[:, None], candidate[:, None], self.bits, self.below)
            error = quantized.sub_(rows).square_().mean(dim=1).nan_to_num(nan=float("inf"))
            better = error < best_error
            best = torch.where(better, candidate, best)
            best_error = torch.where(better, error, best_error)
        return best

    # -- quantization ------------------------------------------------------------------------

    def _broadcast(self, param: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.granularity == "layer":
            return param.reshape(())
        if x.ndim < 2 or x.shape[1] != param.numel():
            raise ValueError(
                f"quantizer has {param.numel()} heads, input has shape {tuple(x.shape)} (heads along dim 1)"
            )
        shape = [1] * x.ndim
        shape[1] = -1
        return param.reshape(shape)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        compute = x if x.dtype in (torch.float32, torch.float64) else x.float()
        if not needs_grad(x, self.u1, self.u2):
            with torch.no_grad():
                b1, b2 = (self._broadcast(b, compute).to(compute.dtype) for b in self.interval())
                return fake_quantize_interval(compute, b1, b2, self.bits, self.below).to(x.dtype)
        b1, b2 = (self._broadcast(b, compute).to(compute.dtype) for b in self.interval())
        step = ((b2 - b1) / self.qmax).clamp_min(MIN_SCALE)
        clamped = torch.where(compute < b1, b1, torch.where(compute > b2, b2, compute))
        codes = clamp_inclusive(round_ste((clamped - b1) / step), 0, self.qmax)
        values = codes * step + b1
        if self.below == "zero":
            values = torch.where(compute < b1, torch.zeros_like(values), values)
        return values.to(x.dtype)

    # -- serialization -----------------------------------------------------------------------

    #: Tensors that take their shape at calibration (resized to the saved shapes on load).
    SHAPED_AT_CALIBRATION: ClassVar[tuple[str, ...]] = ("u1", "u2")

    def extra_repr(self) -> str:
        parts = [super().extra_repr(), f"below={self.below!r}", f"granularity={self.granularity!r}"]
        parts.append(f"init={self.init!r}")
        if self.initialized and self.granularity == "layer":
            b1, b2 = self.interval()
            parts.append(f"interval=[{float(b1):.4g}, {float(b2):.4g}]")
        return ", ".join(parts)
