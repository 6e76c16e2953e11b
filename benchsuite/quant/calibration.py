"""Calibration helpers every method shares: find quantizers, observe ranges, switch them on/off."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from benchsuite.quant.canonical import CanonicalModel, InputKind, LayerNormPair, Role
from benchsuite.quant.quantizers import Quantizer, UniformQuantizer

__all__ = [
    "calibration_tensor",
    "calibrate_activations",
    "check_initialized",
    "fit",
    "fit_weight_quantizer",
    "fit_weight_quantizers",
    "iter_quantizers",
    "model_device",
    "observe",
    "observing",
    "pairs_with_roles",
    "percentile_quantizer",
    "set_enabled",
]


def iter_quantizers(model: CanonicalModel) -> Iterator[Quantizer]:
    """Every quantizer set on the model's sites, in site order, each once.

    A method may share one quantizer between sites; yielding it once keeps observation and
    finalization from running twice on it.
    """
    seen: set[int] = set()
    for site in model.sites():
        for quantizer in site.module.quantizers():
            if id(quantizer) not in seen:
                seen.add(id(quantizer))
                yield quantizer


@contextmanager
def observing(quantizers: Iterable[Quantizer]) -> Iterator[list[Quantizer]]:
    """Put ``quantizers`` in observing mode for the block; restore their previous mode after.

    The restore runs even when the block raises, so a failed calibration never leaves a model
    silently recording statistics (and passing inputs through in float) during evaluation.
    """
    chosen = list(quantizers)
    previous = [q.observing for q in chosen]
    for q in chosen:
        q.observing = True
    try:
        yield chosen
    finally:
        for q, was in zip(chosen, previous):
            q.observing = was


def observe(
    model: nn.Module | Callable[[Any], object] | None,
    quantizers: Iterable[Quantizer],
    batches: Iterable[Any],
) -> None:
    """Record ranges of ``quantizers`` over ``batches`` and finalize them.

    With a model (or any callable), each batch is fed as ``model(batch)`` under
    ``torch.no_grad()`` while only the given quantizers observe (others keep their current
    behaviour, so a method can observe activations with weights already quantized, or not).
    With ``model=None`` each batch is handed straight to every quantizer, which is how a weight
    tensor is observed.

    Observing mode is switched off even if a forward raises; quantizers are finalized only after
    every batch ran, since a range from a partial pass would be wrong without saying so.
    ``finalize`` raises for a quantizer that saw nothing (e.g. a site the batches never reach).
    The caller owns the model's train/eval mode and the batches' device.
    """
    chosen = list(quantizers)
    with observing(chosen), torch.no_grad():
        for batch in batches:
            if model is None:
                for q in chosen:
                    q(batch)
            else:
                model(batch)
    for q in chosen:
        q.finalize()


def set_enabled(quantizers: Iterable[Quantizer], flag: bool) -> None:
    """Enable (fake-quantize) or disable (identity) every quantizer in ``quantizers``."""
    for q in quantizers:
        q.enabled = flag


def fit(quantizer: Quantizer, tensor: torch.Tensor) -> Quantizer:
    """Calibrate ``quantizer`` on ``tensor`` alone (forgetting anything seen before)."""
    quantizer.reset()
    quantizer.observe(tensor.detach())
    quantizer.finalize()
    return quantizer


def fit_weight_quantizer(module: nn.Module, bits: int, percentiles: Sequence[float]) -> UniformQuantizer:
    """A per-output-channel weight quantizer fitted by the percentile / MSE search.

    RepQ-ViT uses the three activation percentiles here (near min-max); I&S-ViT and its
    successors a nine-point grid that allows real clipping.
    """
    quantizer = UniformQuantizer(
        bits,
        granularity="channel",
        channel_dim=getattr(module, "weight_channel_dim", 0),
        init="percentile_mse",
        percentiles=percentiles,
    )
    fit(quantizer, getattr(module, "weight"))
    return quantizer


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters live (CPU for a model without parameters)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def calibration_tensor(batches: Iterable[Any], device: torch.device | str | None = None) -> torch.Tensor:
    """All calibration batches as one tensor (reconstruction methods index rows of it)."""
    tensors = [batch if isinstance(batch, torch.Tensor) else torch.as_tensor(batch) for batch in batches]
    if not tensors:
        raise ValueError("the calibration set is empty")
    joined = torch.cat(tensors)
    return joined.to(device) if device is not None else joined


def check_initialized(model: CanonicalModel, step: str = "calibration") -> None:
    """Refuse a model with a quantizer that ``step`` never reached.

    A lazily initialised quantizer that no calibration input reached stays uncalibrated and
    passes its input through in float, which would overstate a method's accuracy silently.
    """
    for site in model.sites():
        for quantizer in site.module.quantizers():
            if not quantizer.initialized:
                raise RuntimeError(f"{step} never reached {site.name} ({site.role.value})")


def percentile_quantizer(bits: int, percentiles: Sequence[float], *, per_channel: bool = False) -> UniformQuantizer:
    """The RepQ-ViT-lineage activation quantizer: asymmetric uniform, percentile/MSE-initialised
    on its first input (lazy), per tensor or per channel along the last dim."""
    return UniformQuantizer(
        bits,
        granularity="channel" if per_channel else "tensor",
        channel_dim=-1,
        init="percentile_mse",
        percentiles=percentiles,
        lazy_init=True,
    )


def pairs_with_roles(model: CanonicalModel, roles: Iterable[Role]) -> list[LayerNormPair]:
    """The model's LayerNorm pairs whose Linears all have one of ``roles`` (those a method
    reparameterizes: I&S-ViT leaves Swin's reduction out, AIQViT takes it)."""
    wanted = set(roles)
    return [
        pair for pair in model.layernorm_pairs()
        if all(getattr(linear, "role", None) in wanted for linear in pair.linears)
    ]


def calibrate_activations(
    model: CanonicalModel,
    images: torch.Tensor,
    quantizer_for: Callable[[InputKind, bool], Quantizer | None],
    per_channel: Iterable[nn.Module] = (),
) -> None:
    """Put ``quantizer_for(kind, per_channel)`` on every input and initialise them in one pass.

    The quantizers must be lazy: one no-grad forward over ``images`` initialises each on its
    first input, in execution order, so each sees inputs that already passed the quantized ops
    upstream (the reference codes' sequential calibration). ``per_channel`` names the modules
    whose inputs are calibrated per channel (post-LayerNorm inputs before reparameterization).
    """
    channel_wise = {id(module) for module in per_channel}
    for site in model.sites():
        for index, kind in enumerate(site.input_kinds):
            site.module.set_input_quantizer(index, quantizer_for(kind, id(site.module) in channel_wise))
    with torch.no_grad():
        model(images.to(model_device(model)))
    check_initialized(model, "initialisation")


def fit_weight_quantizers(model: CanonicalModel, bits: int, percentiles: Sequence[float]) -> None:
    """A per-output-channel weight quantizer, fitted on the current weight, on every weighted op."""
    with torch.no_grad():
        for site in model.sites():
            if site.module.has_weight:
                site.module.set_weight_quantizer(fit_weight_quantizer(site.module, bits, percentiles))
