"""LayerNorm scale reparameterization (RepQ-ViT §4; reused by I&S-ViT).

A post-LayerNorm activation X ∈ R^{N×C} calibrated with a per-channel uniform quantizer (scales
s ∈ R^C, zero points z ∈ R^C) is turned into one that a per-tensor quantizer (s̃, z̃) fits, by
editing the LayerNorm's affine parameters and compensating in every Linear that reads X:

    s̃ = mean(s)      z̃ = mean(z)  (rounded only with ``round_mean_zero_point=True``)
    r1 = s / s̃       r2 = z − z̃
    γ̃ = γ / r1       β̃ = (β + s ⊙ r2) / r1             so  X̃ = X / r1 + s̃ · r2
    W̃[:, c] = r1[c] · W[:, c]     b̃ = b − W · (s ⊙ r2)   so  W̃ X̃ + b̃ = W X + b

The float function of LayerNorm → Linear is unchanged. With z̃ rounded (and integer z), the
per-tensor quantization of X̃ followed by W̃ equals the per-channel quantization of X followed
by W exactly (up to float rounding): every channel keeps its integer codes, shifted by the
integer r2. The reference code leaves z̃ unrounded, which shifts the grid by frac(z̃): not
identical, but as accurate on average; that is the default here, for parity.

Parameters are edited in place (under ``no_grad``), so a canonical model whose wrappers share
Parameters with the original model is edited too. After the edit the Linears' weights differ,
so a weight quantizer calibrated before must be re-fitted (RepQ-ViT resets and re-calibrates it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from benchsuite.quant.canonical import LayerNormPair
from benchsuite.quant.modules import QuantModule
from benchsuite.quant.quantizers import UniformQuantizer

__all__ = ["reparameterize_layernorm", "reparameterize_pair"]


def _check_norm(norm: nn.Module, channels: int) -> None:
    if not isinstance(norm, nn.LayerNorm):
        raise TypeError(f"reparameterization needs an nn.LayerNorm, got {type(norm).__name__}")
    if norm.weight is None:
        raise ValueError("reparameterization needs a LayerNorm with an elementwise affine weight")
    if tuple(norm.normalized_shape) != (channels,):
        raise ValueError(
            f"LayerNorm normalizes over {tuple(norm.normalized_shape)}, the quantizer has {channels} channels"
        )


def _check_linear(linear: nn.Module, channels: int) -> None:
    weight = getattr(linear, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or weight.shape[1] != channels:
        shape = None if not isinstance(weight, torch.Tensor) else tuple(weight.shape)
        raise ValueError(
            f"{type(linear).__name__} must have an (out, {channels}) weight to follow the "
            f"LayerNorm, got {shape}"
        )
    if not hasattr(linear, "bias"):
        raise ValueError(f"{type(linear).__name__} has no bias attribute")


@torch.no_grad()
def reparameterize_layernorm(
    norm: nn.LayerNorm,
    linears: Sequence[nn.Module],
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    *,
    round_mean_zero_point: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold per-channel quantizer scales into ``norm`` and the ``linears`` that read it.

    ``scale`` and ``zero_point`` are the per-channel s and z of the quantizer on the LayerNorm's
    output (any shape with C elements, e.g. a quantizer's (1, 1, C) buffers). Every Linear in
    ``linears`` (``nn.Linear`` or :class:`~benchsuite.quant.modules.QuantLinear`; weight
    (O, C)) is compensated; one without a bias gets one. Arithmetic runs in the LayerNorm's
    dtype. Returns the per-tensor ``(s̃, z̃)`` (0-d tensors) that the caller puts on the input
    quantizer(s) of the Linears.
    """
    channels = scale.numel()
    _check_norm(norm, channels)
    if not linears:
        raise ValueError("reparameterization needs at least one Linear reading the LayerNorm")
    for linear in linears:
        _check_linear(linear, channels)
    if zero_point.numel() != channels:
        raise ValueError(f"scale has {channels} elements, zero_point {zero_point.numel()}")

    gamma = norm.weight
    dtype, device = gamma.dtype, gamma.device
    s = scale.detach().reshape(-1).to(dtype=dtype, device=device)
    z = zero_point.detach().reshape(-1).to(dtype=dtype, device=device)
    if not bool((s > 0).all()):
        raise ValueError("per-channel scales must be strictly positive")

    s_mean = s.mean()
    z_mean = z.mean()
    if round_mean_zero_point:
        z_mean = torch.round(z_mean)
    r1 = s / s_mean
    shift = s * (z - z_mean)  # s ⊙ r2: what the LayerNorm output moves by, per channel

    for linear in linears:
        weight = linear.weight
        correction = weight @ shift.to(weight.dtype)  # W · (s ⊙ r2), with the original W
        weight.mul_(r1.to(weight.dtype))  # W̃[:, c] = r1[c] · W[:, c]
        if linear.bias is None:
            linear.bias = nn.Parameter(-correction, requires_grad=weight.requires_grad)
        else:
            linear.bias.sub_(correction.to(linear.bias.dtype))

    if norm.bias is None:  # LayerNorm(bias=False): β = 0, but β̃ is not
        norm.bias = nn.Parameter(torch.zeros_like(gamma), requires_grad=gamma.requires_grad)
    norm.bias.add_(shift).div_(r1)
    gamma.div_(r1)
    return s_mean, z_mean


def _input_quantizer(linear: nn.Module) -> UniformQuantizer:
    quantizer = linear.input_quantizer(0) if isinstance(linear, QuantModule) else None
    if not isinstance(quantizer, UniformQuantizer) or not quantizer.per_channel or not quantizer.initialized:
        raise ValueError(
            f"{type(linear).__name__} needs a calibrated per-channel UniformQuantizer on its input "
            f"to be reparameterized, got {type(quantizer).__name__}"
        )
    return quantizer


@torch.no_grad()
def reparameterize_pair(
    pair: LayerNormPair,
    *,
    round_mean_zero_point: bool = False,
    reset_weight_quantizers: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reparameterize one adapter pair from its calibrated per-channel input quantizer(s).

    Every Linear of ``pair`` must be a QuantModule whose input quantizer is a calibrated
    per-channel :class:`UniformQuantizer`; they read the same LayerNorm output, so their
    parameters must agree. The LayerNorm and Linears are edited by
    :func:`reparameterize_layernorm`, each input quantizer becomes per tensor with (s̃, z̃), and
    (by default) each Linear's weight quantizer is reset, so that it re-fits on W̃ at its next
    calibration (RepQ-ViT's step 4). Returns (s̃, z̃).
    """
    quantizers = [_input_quantizer(linear) for linear in pair.linears]
    first = quantizers[0]
    for other in quantizers[1:]:
        if other is not first and not (
            torch.equal(other.scale.reshape(-1), first.scale.reshape(-1))
            and torch.equal(other.zero_point.reshape(-1), first.zero_point.reshape(-1))
        ):
            raise ValueError(
                "the Linears reading one LayerNorm have input quantizers with different parameters"
            )
    s_mean, z_mean = reparameterize_layernorm(
        pair.norm,
        pair.linears,
        first.scale,
        first.zero_point,
        round_mean_zero_point=round_mean_zero_point,
    )
    for quantizer in {id(q): q for q in quantizers}.values():
        quantizer.set_per_tensor(s_mean, z_mean)
    if reset_weight_quantizers:
        for linear in pair.linears:
            if linear.weight_quantizer is not None:
                linear.weight_quantizer.reset()
    return s_mean, z_mean
