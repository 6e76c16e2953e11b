"""I&S-ViT's shift-uniform-log2 quantizer (SULQ) for post-softmax attention probabilities.

SULQ (isvit.md §4) quantizes the *exponent* of the shifted probability uniformly and then rounds
the dequantized exponent to an integer, so every output is ``2^k - η`` (a bit shift minus a
constant). With ``y = log2(x + η)``:

- calibration (reference code): for each η of ``eta_grid``, ``Δ = (y_max - y_min) / (2**b - 1)``,
  ``q = clamp(round((y - y_min) / Δ), 0, 2**b - 1)``, ``x̂ = 2^round(q·Δ + y_min) - η``; the η
  with the lowest MSE wins (the first on ties), and η, y_min, y_max are frozen;
- forward, ``mode="reference"``: ``Δ_f = (y_max - y_min) / 2**b`` and codes clamped to
  ``[0, 2**b]``, i.e. ``2**b + 1`` codes, as in the reference code (isvit.md §4.2 consequence 1);
- forward, ``mode="strict"`` (proposal, isvit.md §4.2): the calibration formula in the forward too,
  ``2**b`` codes.

Both modes keep the outer rounding of the exponent, which dominates: the outputs are the integers
``k`` between ``round(y_min)`` and ``round(y_max)``, so with the default η grid there are at most
about 11 distinct values however many bits are spent (consequence 2), and the smallest can be
slightly negative (consequence 3).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import torch

from benchsuite.quant.quantizers import (
    MIN_SCALE,
    Quantizer,
    _private_rows,
    clamp_inclusive,
    needs_grad,
    round_ste,
)

__all__ = ["DEFAULT_ETA_GRID", "SULQMode", "SULQuantizer", "search_sulq_params", "sulq_fake_quantize"]

SULQMode = Literal["reference", "strict"]

#: The reference code's candidates for the shift η.
DEFAULT_ETA_GRID: tuple[float, ...] = (0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.1, 0.2, 0.5, 1.0)


def _log2_shifted(x: torch.Tensor, eta: torch.Tensor | float) -> torch.Tensor:
    """``log2(x + η)`` in a new tensor; ``x + η ≤ 0`` (never for probabilities) becomes the
    smallest positive float, i.e. a very negative exponent that clamps to code 0."""
    return (x + eta).clamp_min_(torch.finfo(x.dtype).tiny).log2_()


def sulq_fake_quantize(
    x: torch.Tensor,
    eta: torch.Tensor | float,
    y_min: torch.Tensor | float,
    step: torch.Tensor | float,
    top_code: int,
) -> torch.Tensor:
    """``2^round(clamp(round((log2(x + η) - y_min) / step), 0, top_code)·step + y_min) - η``.

    Plain rounding, no autograd bookkeeping (the search and the no-grad forward use it); same
    arithmetic, in the same order, as :class:`SULQuantizer`'s straight-through path.
    """
    codes = _log2_shifted(x, eta).sub_(y_min).div_(step).round_().clamp_(0, top_code)
    return codes.mul_(step).add_(y_min).round_().exp2_().sub_(eta)


def search_sulq_params(
    rows: torch.Tensor, bits: int, eta_grid: Sequence[float] = DEFAULT_ETA_GRID
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """The reference code's η search: returns ``(η, y_min, y_max)`` of the lowest-MSE candidate.

    ``rows`` holds every calibration value (any shape; reduced as one tensor). For each η:
    ``y = log2(x + η)``, ``Δ = (y_max - y_min) / (2**b - 1)`` (at least ``MIN_SCALE``, so a
    constant tensor works), codes in ``[0, 2**b - 1]``, MSE against ``x``. Ties keep the first η
    (the reference's strict ``<``); NaN errors never win.
    """
    if rows.numel() == 0:
        raise ValueError("the SULQ search needs a non-empty tensor")
    x = rows.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    top = 2**bits - 1
    best: tuple[float, torch.Tensor, torch.Tensor] | None = None
    best_error = float("inf")
    for eta in eta_grid:
        y = _log2_shifted(x, float(eta))
        y_min, y_max = y.amin(), y.amax()
        del y
        step = ((y_max - y_min) / top).clamp_min(MIN_SCALE)
        error = float(sulq_fake_quantize(x, float(eta), y_min, step, top).sub_(x).square_().mean())
        if best is None or error < best_error:  # NaN compares False: kept only if nothing else
            best, best_error = (float(eta), y_min, y_max), error
    assert best is not None
    return best


class SULQuantizer(Quantizer):
    """I&S-ViT's SULQ for post-softmax attention, per tensor (one η per layer), with STE.

    Calibration is the reference η grid search (:func:`search_sulq_params`) over every tensor
    observed since the last :meth:`finalize` (kept until then, so several batches give the same
    η, y_min, y_max as one concatenated batch). Forward, with ``L = 2**b``:

    - ``mode="reference"``: ``Δ_f = (y_max - y_min) / L``, ``q = clamp(round_ste((y - y_min) / Δ_f),
      0, L)``: ``L + 1`` codes, so up to ``2**b + 1`` distinct outputs (the reference quirk);
    - ``mode="strict"`` (proposal): ``Δ = (y_max - y_min) / (L - 1)``, codes in ``[0, L - 1]``.

    Then ``x̂ = 2^round_ste(q·Δ + y_min) - η``. Gradients are straight-through through both
    roundings and zero where the code is clamped (``clamp_inclusive``: codes landing exactly on
    a bound keep theirs); inside the grid ``dx̂/dx = 2^k / (x + η)``. η, y_min and y_max are
    frozen buffers (one float32 element each; empty before calibration).
    """

    eta: torch.Tensor
    y_min: torch.Tensor
    y_max: torch.Tensor

    def __init__(
        self,
        bits: int,
        mode: SULQMode = "reference",
        eta_grid: Sequence[float] = DEFAULT_ETA_GRID,
        enabled: bool = True,
        *,
        lazy_init: bool = False,
    ) -> None:
        super().__init__(bits, enabled, lazy_init=lazy_init)
        if mode not in ("reference", "strict"):
            raise ValueError(f"mode must be 'reference' or 'strict', got {mode!r}")
        grid = tuple(float(eta) for eta in eta_grid)
        if not grid or any(not eta > 0 for eta in grid):
            raise ValueError(f"eta_grid must be a non-empty sequence of positive values, got {list(eta_grid)}")
        self.mode: SULQMode = mode
        self.eta_grid = grid
        self.register_buffer("eta", torch.empty(0))
        self.register_buffer("y_min", torch.empty(0))
        self.register_buffer("y_max", torch.empty(0))
        self._samples: list[torch.Tensor] = []

    # -- state -------------------------------------------------------------------------------

    @property
    def initialized(self) -> bool:
        return self.eta.numel() > 0

    @property
    def has_observations(self) -> bool:
        """Whether tensors were observed and not yet consumed by :meth:`finalize`."""
        return bool(self._samples)

    @property
    def top_code(self) -> int:
        """Largest forward code: ``2**b`` in reference mode, ``2**b - 1`` in strict mode."""
        return self.n_levels if self.mode == "reference" else self.qmax

    def reset(self) -> None:
        for name in ("eta", "y_min", "y_max"):
            setattr(self, name, torch.empty(0, device=getattr(self, name).device))
        self._samples = []

    # -- calibration -------------------------------------------------------------------------

    def observe(self, x: torch.Tensor) -> None:
        """Keep a flat copy of ``x`` for the η search."""
        if x.numel() == 0:
            return
        self._samples.append(_private_rows(x.detach(), "tensor", 0))

    def finalize(self) -> None:
        """Search η on every tensor observed since the last finalize, then release them."""
        if not self._samples:
            raise RuntimeError(f"{self.__class__.__name__} cannot finalize: it observed no data")
        rows = self._take_samples()
        eta, y_min, y_max = search_sulq_params(rows, self.bits, self.eta_grid)
        self.set_params(eta, y_min, y_max)

    def set_params(
        self, eta: torch.Tensor | float, y_min: torch.Tensor | float, y_max: torch.Tensor | float
    ) -> None:
        """Set η (> 0) and the exponent range ``y_min ≤ y_max`` directly."""
        values = [torch.as_tensor(v, dtype=torch.float32).detach().clone().reshape(-1) for v in (eta, y_min, y_max)]
        if any(v.numel() != 1 for v in values):
            raise ValueError("η, y_min and y_max must be one value each")
        if not float(values[0]) > 0 or not float(values[1]) <= float(values[2]):
            raise ValueError(f"need η > 0 and y_min ≤ y_max, got {[float(v) for v in values]}")
        device = self.eta.device
        self.eta, self.y_min, self.y_max = (v.to(device) for v in values)

    # -- quantization ------------------------------------------------------------------------

    def step(self) -> torch.Tensor:
        """The forward's exponent step: ``(y_max - y_min) / top_code`` (at least ``MIN_SCALE``)."""
        if not self.initialized:
            raise RuntimeError("SULQuantizer is not calibrated")
        return ((self.y_max - self.y_min) / self.top_code).clamp_min(MIN_SCALE).reshape(())

    def distinct_outputs(self) -> torch.Tensor:
        """Every value the forward can emit, ascending: ``2^round(q·Δ + y_min) - η`` over the codes.

        Its length is at most ``top_code + 1`` and at most the number of integers between
        ``round(y_min)`` and ``round(y_max)``; inputs below ``-η`` are not considered (they
        clamp to code 0 like any small probability).
        """
        step = self.step()
        codes = torch.arange(self.top_code + 1, dtype=step.dtype, device=step.device)
        values = codes.mul_(step).add_(self.y_min.reshape(())).round_().exp2_().sub_(self.eta.reshape(()))
        return values.unique()

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        compute = x if x.dtype in (torch.float32, torch.float64) else x.float()
        eta = self.eta.reshape(()).to(compute.dtype)
        y_min = self.y_min.reshape(()).to(compute.dtype)
        step = self.step().to(compute.dtype)
        if not needs_grad(x):
            return sulq_fake_quantize(compute, eta, y_min, step, self.top_code).to(x.dtype)
        y = torch.log2((compute + eta).clamp_min(torch.finfo(compute.dtype).tiny))
        codes = clamp_inclusive(round_ste((y - y_min) / step), 0, self.top_code)
        exponent = round_ste(codes * step + y_min)
        return (torch.exp2(exponent) - eta).to(x.dtype)

    # -- serialization -----------------------------------------------------------------------

    #: Tensors that take their shape at calibration (resized to the saved shapes on load).
    SHAPED_AT_CALIBRATION: ClassVar[tuple[str, ...]] = ("eta", "y_min", "y_max")

    def extra_repr(self) -> str:
        parts = [super().extra_repr(), f"mode={self.mode!r}"]
        if self.initialized:
            parts.append(f"eta={float(self.eta):g}, y_range=[{float(self.y_min):.4g}, {float(self.y_max):.4g}]")
        return ", ".join(parts)
