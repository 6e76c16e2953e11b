"""Naive min-max PTQ: the floor every paper method must beat.

Every quantizable input gets a per-tensor asymmetric quantizer whose range is the min and max
seen on the calibration set; every weight gets a per-output-channel asymmetric quantizer from its
own min and max. Activation ranges are observed on the float model (all quantizers off), so the
floor does not depend on calibration order. No special quantizer for any input kind.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from benchsuite.api import CalibrationSet, Method, MethodConfig
from benchsuite.bits import BitSpec
from benchsuite.quant.calibration import observe, set_enabled
from benchsuite.quant.canonical import CanonicalModel, InputKind
from benchsuite.quant.quantizers import UniformQuantizer


@dataclass(frozen=True)
class MinMaxConfig(MethodConfig):
    """32 calibration samples, as in the RepQ-ViT protocol."""

    calib_size: int | None = 32
    #: Quantize the image input of the patch embedding at 8 bits instead of the activation bits.
    image_input_8bit: bool = False


class MinMax(Method):
    name = "minmax"
    description = (
        "Per-tensor min/max activations, per-channel min/max weights, every quantizable op; "
        "a floor, not a paper method."
    )
    config_class = MinMaxConfig
    fidelity = "benchsuite's own baseline; no paper to follow"

    def quantize(
        self, model: CanonicalModel, calibration: CalibrationSet, bits: BitSpec, config: MethodConfig
    ) -> nn.Module:
        assert isinstance(config, MinMaxConfig)
        assert bits.w_bits is not None and bits.a_bits is not None
        activation_quantizers: list[UniformQuantizer] = []
        weight_quantizers: list[UniformQuantizer] = []
        with torch.no_grad():
            for site in model.sites():
                for index, kind in enumerate(site.input_kinds):
                    image_8bit = config.image_input_8bit and kind is InputKind.IMAGE
                    quantizer = UniformQuantizer(8 if image_8bit else bits.a_bits, granularity="tensor")
                    site.module.set_input_quantizer(index, quantizer)
                    activation_quantizers.append(quantizer)
                if site.module.has_weight:
                    quantizer = UniformQuantizer(bits.w_bits, granularity="channel", channel_dim=0)
                    quantizer.observe(site.module.weight)
                    quantizer.finalize()
                    site.module.set_weight_quantizer(quantizer)
                    weight_quantizers.append(quantizer)
        device = next(model.parameters()).device
        # ranges come from the float model: weight quantization is off while activations are observed
        set_enabled(weight_quantizers, False)
        observe(model, activation_quantizers, (batch.to(device) for batch in calibration))
        set_enabled(weight_quantizers, True)
        return model
