"""AdaRound learned rounding for weights (the BRECQ / QDrop lineage ADFQ-ViT builds on).

A fitted uniform weight quantizer fixes the grid (Δ, z); AdaRound only decides, per weight,
whether to round down or up. Each weight gets a logit ``V`` and a rectified sigmoid

    h(V) = clamp(sigmoid(V)·(ζ - γ) + γ, 0, 1),    ζ = 1.1, γ = -0.1

- soft forward (training): ``Ŵ = Δ·(clamp(floor(W/Δ) + h(V) + z, 0, 2**b - 1) - z)``;
- hard forward (after :meth:`AdaRoundQuantizer.harden`): ``floor(W/Δ) + [V ≥ 0]`` in place of
  ``floor(W/Δ) + h(V)``, no soft values at all;
- regularizer ``Σ (1 - |2h(V) - 1|^β)`` pushes every ``h`` to 0 or 1, with β annealed by
  :func:`adaround_beta` (off during a warmup, then linear from 20 to 2).

``V`` starts where ``h(V)`` equals the fractional part of ``W/Δ``, so the soft weight starts at
``W`` (inside the grid) and the hard weight at round-to-nearest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from benchsuite.quant.quantizers import Quantizer, UniformQuantizer

__all__ = ["GAMMA", "ZETA", "AdaRoundQuantizer", "RoundingSchedule", "adaround_beta"]

#: Stretch of the rectified sigmoid: h = clamp(sigmoid(V)·(ZETA - GAMMA) + GAMMA, 0, 1).
ZETA = 1.1
GAMMA = -0.1


def adaround_beta(
    step: int, total: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0
) -> float | None:
    """β of the rounding regularizer at optimizer step ``step`` (0-based) of ``total``.

    ``None`` while the regularizer is off (the first ``warmup`` share of the steps), then a linear
    decay from ``start`` to ``end``, reaching ``end`` on the last step. This is the reference's
    ``LinearTempDecay`` with its 1-based counter ``t = step + 1``: off while
    ``t < warmup·total``, else ``end + (start - end)·max(0, 1 - (t - warmup·total) / (total - warmup·total))``.
    """
    if total < 1:
        raise ValueError(f"total must be at least 1, got {total!r}")
    if not 0.0 <= warmup <= 1.0:
        raise ValueError(f"warmup must lie in [0, 1], got {warmup!r}")
    count = step + 1
    start_decay = warmup * total
    if count < start_decay:
        return None
    span = total - start_decay
    progress = (count - start_decay) / span if span > 0 else 1.0
    return end + (start - end) * max(0.0, 1.0 - progress)


@dataclass(frozen=True)
class RoundingSchedule:
    """:func:`adaround_beta` with its settings bound: ``schedule(step)`` gives β or None."""

    total: int
    warmup: float = 0.2
    start: float = 20.0
    end: float = 2.0

    def __call__(self, step: int) -> float | None:
        return adaround_beta(step, self.total, self.warmup, self.start, self.end)


class AdaRoundQuantizer(Quantizer):
    """Learned up/down rounding of one weight tensor on a frozen uniform grid.

    Build it with :meth:`from_uniform` from a fitted :class:`UniformQuantizer` (per channel or per
    tensor) and the weight it will quantize. It keeps frozen copies of Δ and z (broadcast to the
    weight's rank) and of ``floor(W/Δ)``, computed once at build time, as the BRECQ lineage's
    ``floor(x/Δ)`` on a weight that never changes during reconstruction; only ``V`` (the
    Parameter ``v``) is trained. :meth:`fake_quantize` therefore checks the input's shape but not
    its values: it returns the quantized *build-time* weight, and a weight edited afterwards
    (e.g. by reparameterization) needs a new quantizer. No gradient reaches the weight.

    :meth:`harden` switches to the hard forward for good (the flag is the buffer ``hardened`` and
    travels with the state_dict). :meth:`regularizer` is the summed rounding loss.

    AdaRound has no calibration of its own: :meth:`observe` records nothing and :meth:`finalize`
    only checks that the quantizer was built (so it can sit in a generic calibration loop).
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    weight_floor: torch.Tensor
    hardened: torch.Tensor
    v: nn.Parameter

    def __init__(self, bits: int, enabled: bool = True, *, lazy_init: bool = False) -> None:
        super().__init__(bits, enabled, lazy_init=lazy_init)
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0))
        self.register_buffer("weight_floor", torch.empty(0))
        self.register_buffer("hardened", torch.zeros((), dtype=torch.bool))
        self.v = nn.Parameter(torch.empty(0))

    @classmethod
    def from_uniform(cls, quantizer: UniformQuantizer, weight: torch.Tensor) -> AdaRoundQuantizer:
        """An AdaRound quantizer on ``quantizer``'s grid for ``weight``, with ``h(V) = frac(W/Δ)``."""
        if not quantizer.initialized:
            raise RuntimeError("AdaRound needs a calibrated UniformQuantizer (call finalize or set_params first)")
        with torch.no_grad():
            w = weight.detach().float()
            scale, zero_point = quantizer.quant_params(w)
            shape = scale.shape if scale.ndim == w.ndim else (1,) * w.ndim
            scale = scale.detach().float().reshape(shape).clone()
            zero_point = zero_point.detach().float().reshape(shape).clone()
            ratio = w / scale
            floor = torch.floor(ratio)
            rest = ratio - floor  # in [0, 1): h(V) starts here
            v = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)
        built = cls(quantizer.bits, quantizer.enabled)
        built.to(weight.device)
        built.scale, built.zero_point, built.weight_floor = scale, zero_point, floor
        built._set_tensor("v", v)
        return built

    # -- state -------------------------------------------------------------------------------

    @property
    def initialized(self) -> bool:
        return self.scale.numel() > 0

    @property
    def is_hard(self) -> bool:
        return bool(self.hardened)

    def reset(self) -> None:
        """Forget the grid, the floor and ``V`` (rebuild with :meth:`from_uniform`)."""
        for name in ("scale", "zero_point", "weight_floor"):
            setattr(self, name, torch.empty(0, device=getattr(self, name).device))
        self._set_tensor("v", torch.empty(0, device=self.v.device))
        self.hardened = torch.zeros((), dtype=torch.bool, device=self.hardened.device)

    def observe(self, x: torch.Tensor) -> None:
        """Nothing to record: the grid comes from the UniformQuantizer given to :meth:`from_uniform`."""

    def finalize(self) -> None:
        if not self.initialized:
            raise RuntimeError("AdaRoundQuantizer has no grid: build it with AdaRoundQuantizer.from_uniform")

    def harden(self) -> None:
        """Use ``floor(W/Δ) + [V ≥ 0]`` from now on (after training)."""
        self.hardened = torch.ones((), dtype=torch.bool, device=self.hardened.device)

    # -- rounding ----------------------------------------------------------------------------

    def rectified_sigmoid(self) -> torch.Tensor:
        """``h(V) = clamp(sigmoid(V)·(ζ - γ) + γ, 0, 1)``, differentiable in ``V``."""
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def hard_rounding(self) -> torch.Tensor:
        """``[V ≥ 0]`` as 0/1 floats: whether each weight rounds up."""
        return (self.v.detach() >= 0).to(self.weight_floor.dtype)

    def regularizer(self, beta: float) -> torch.Tensor:
        """``Σ (1 - |2h(V) - 1|^β)``, summed over all weights (zero when every h is 0 or 1)."""
        h = self.rectified_sigmoid()
        return (1 - (2 * h - 1).abs().pow(beta)).sum()

    def integer_weight(self) -> torch.Tensor:
        """The hard integer codes ``clamp(floor(W/Δ) + [V ≥ 0] + z, 0, 2**b - 1)``."""
        return torch.clamp(self.weight_floor + self.hard_rounding() + self.zero_point, 0, self.qmax)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape) != tuple(self.weight_floor.shape):
            raise ValueError(
                f"AdaRoundQuantizer was built for a weight of shape {tuple(self.weight_floor.shape)}, "
                f"got {tuple(x.shape)}"
            )
        if self.is_hard:
            codes = self.integer_weight()
        else:
            codes = torch.clamp(self.weight_floor + self.rectified_sigmoid() + self.zero_point, 0, self.qmax)
        return ((codes - self.zero_point) * self.scale).to(x.dtype)

    # -- serialization -----------------------------------------------------------------------

    #: Tensors that take their shape at calibration (resized to the saved shapes on load).
    SHAPED_AT_CALIBRATION: ClassVar[tuple[str, ...]] = ("scale", "zero_point", "weight_floor", "v")

    def extra_repr(self) -> str:
        parts = [super().extra_repr(), "hard" if self.is_hard else "soft"]
        if self.initialized:
            parts.append(f"weight_shape={tuple(self.weight_floor.shape)}")
        return ", ".join(parts)
