"""RepQ-ViT: scale reparameterization for post-training quantization of vision transformers.

Follows the reference code (zkkli/RepQ-ViT, ``classification/test_quant.py``) as specified in
``specs/repq_vit.md``: calibration only, no gradients.

1. Wrap: weights per output channel at W bits; inputs per tensor at A bits, except the
   post-LayerNorm inputs of the Linears that a LayerNorm feeds directly (qkv, fc1, Swin
   reduction: the adapter's ``layernorm_pairs``), which are calibrated per channel; the
   post-softmax input of ``matmul_av`` gets the log√2 quantizer; the image input 8 bits. Every
   uniform quantizer is initialized by the percentile / MSE search.
2. Calibrate: one no-grad forward over the calibration images with every quantizer enabled; each
   activation quantizer initializes on its first input, which already passed through the
   quantized layers upstream (sequential, error-aware calibration).
3. Reparameterize every LayerNorm pair: per-channel scales fold into the LayerNorm affine and the
   next Linear, whose input quantizer becomes per tensor (s̃, z̃).
4. Re-calibrate the weight quantizers of the reparameterized Linears on the new weights W̃ (the
   reference's second forward re-fits only those, which depend on nothing but W̃).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from benchsuite.api import CalibrationSet, Method, MethodConfig
from benchsuite.bits import BitSpec
from benchsuite.quant.calibration import check_initialized, fit, fit_weight_quantizer, percentile_quantizer
from benchsuite.quant.canonical import CanonicalModel, InputKind
from benchsuite.quant.quantizers import LogSqrt2Quantizer, Quantizer
from benchsuite.quant.reparam import reparameterize_pair

PostLayerNormMode = Literal["reparam", "per_channel", "per_tensor"]


@dataclass(frozen=True)
class RepQViTConfig(MethodConfig):
    """Defaults are the reference code's; every other value is a labelled variant or ablation."""

    calib_size: int | None = 32
    percentiles: tuple[float, ...] = (0.999, 0.9999, 0.99999)
    #: Bits of the normalized image entering the patch embedding (the only 8-bit exception).
    patch_embed_input_bits: int = 8
    #: ``reparam``: per-channel calibration, then folded to per tensor (the method).
    #: ``per_channel``: keep per-channel post-LN quantizers (accuracy upper bound, not deployable).
    #: ``per_tensor``: plain per-tensor post-LN quantizers (the paper's "without reparam" ablation).
    post_layernorm: PostLayerNormMode = "reparam"
    #: Round the mean zero point z̃: an exact, integer-deployable transform (reference: False).
    round_mean_zero_point: bool = False
    #: Re-fit the weight quantizers of reparameterized Linears on W̃ (reference: True).
    recalibrate_after_reparam: bool = True
    #: ``log_sqrt2`` for post-softmax inputs (reference), or ``uniform`` (ablation).
    softmax_quantizer: Literal["log_sqrt2", "uniform"] = "log_sqrt2"


class RepQViT(Method):
    name = "repq-vit"
    paper = (
        "Z. Li, J. Xiao, L. Yang, Q. Gu. RepQ-ViT: Scale Reparameterization for Post-Training "
        "Quantization of Vision Transformers. ICCV 2023"
    )
    description = (
        "Per-channel post-LayerNorm calibration folded into LayerNorm affine parameters, log√2 "
        "post-softmax quantizer; calibration only (two no-grad passes' worth of work)."
    )
    config_class = RepQViTConfig
    fidelity = (
        "follows the reference code (zkkli/RepQ-ViT); calibration images are drawn by benchsuite's "
        "seeded sampler, so they differ from the reference loader's"
    )

    def __init__(self) -> None:
        self._info: dict[str, Any] = {}

    def quantize(
        self, model: CanonicalModel, calibration: CalibrationSet, bits: BitSpec, config: MethodConfig
    ) -> nn.Module:
        assert isinstance(config, RepQViTConfig)
        assert bits.w_bits is not None and bits.a_bits is not None
        pairs = list(model.layernorm_pairs())
        fed_by_layernorm = {id(linear) for pair in pairs for linear in pair.linears}

        with torch.no_grad():
            for site in model.sites():
                for index, kind in enumerate(site.input_kinds):
                    per_channel = id(site.module) in fed_by_layernorm and config.post_layernorm != "per_tensor"
                    quantizer = _activation_quantizer(kind, bits.a_bits, per_channel, config)
                    site.module.set_input_quantizer(index, quantizer)
                if site.module.has_weight:
                    site.module.set_weight_quantizer(fit_weight_quantizer(site.module, bits.w_bits, config.percentiles))

            device = next(model.parameters()).device
            model(torch.cat([batch.to(device) for batch in calibration]))  # lazy init, in order
            check_initialized(model)

            if config.post_layernorm == "reparam":
                for pair in pairs:
                    reparameterize_pair(
                        pair,
                        round_mean_zero_point=config.round_mean_zero_point,
                        reset_weight_quantizers=config.recalibrate_after_reparam,
                    )
                    if config.recalibrate_after_reparam:
                        for linear in pair.linears:
                            fit(linear.weight_quantizer, linear.weight)
        self._info = {
            "layernorm_pairs": len(pairs),
            "reparameterized": config.post_layernorm == "reparam",
            "calibration_images_in_one_forward": len(calibration),
        }
        return model

    def run_info(self, model: CanonicalModel) -> dict[str, Any]:
        return dict(self._info)


def _activation_quantizer(kind: InputKind, a_bits: int, per_channel: bool, config: RepQViTConfig) -> Quantizer:
    if kind is InputKind.POST_SOFTMAX and config.softmax_quantizer == "log_sqrt2":
        return LogSqrt2Quantizer(a_bits, percentiles=config.percentiles, lazy_init=True)
    bits = config.patch_embed_input_bits if kind is InputKind.IMAGE else a_bits
    return percentile_quantizer(bits, config.percentiles, per_channel=per_channel)
