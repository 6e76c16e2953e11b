"""Weight-only round-to-nearest: an outside method plugin for benchsuite."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from benchsuite.api import CalibrationSet, Method, MethodConfig
from benchsuite.bits import BitSpec
from benchsuite.quant.canonical import CanonicalModel
from benchsuite.quant.quantizers import UniformQuantizer


@dataclass(frozen=True)
class WeightOnlyRTNConfig(MethodConfig):
    """Needs no calibration data; weights are quantized from their own ranges."""

    calib_size: int | None = 1


class WeightOnlyRTN(Method):
    name = "weight-only-rtn"
    description = "Per-channel min-max round-to-nearest weights; activations stay float."
    config_class = WeightOnlyRTNConfig
    fidelity = "example plugin; activations are not quantized whatever the bit setting says"

    def quantize(
        self, model: CanonicalModel, calibration: CalibrationSet, bits: BitSpec, config: MethodConfig
    ) -> nn.Module:
        assert bits.w_bits is not None
        with torch.no_grad():
            for site in model.sites():
                weight = getattr(site.module, "weight", None)
                if weight is None:
                    continue
                quantizer = UniformQuantizer(bits.w_bits, granularity="channel", channel_dim=0)
                quantizer.observe(weight)
                quantizer.finalize()
                site.module.set_weight_quantizer(quantizer)
        return model
