"""The float reference: no quantization; its row is what every quantized row is compared to."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from benchsuite.api import CalibrationSet, Method, MethodConfig
from benchsuite.bits import BitSpec
from benchsuite.quant.canonical import CanonicalModel


@dataclass(frozen=True)
class FP32Config(MethodConfig):
    """The float reference has nothing to configure and calibrates on nothing."""

    calib_size: int | None = 0


class FP32(Method):
    name = "fp32"
    description = "Float reference: the task's model evaluated unquantized, once per task and model."
    config_class = FP32Config
    quantizes = False
    fidelity = "exact: the model is evaluated as loaded"

    def quantize(
        self, model: CanonicalModel, calibration: CalibrationSet, bits: BitSpec, config: MethodConfig
    ) -> nn.Module:
        return model
