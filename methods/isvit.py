"""I&S-ViT: shift-uniform-log2 post-softmax quantizer and a three-stage smooth optimisation.

Follows the reference code (zysxmu/IaS-ViT) as specified in ``specs/isvit.md``:

- what is quantized: every Linear/Conv weight per output channel (nine-point percentile grid,
  MSE), every input per tensor (three-point grid), except the post-LayerNorm inputs of qkv and fc1
  (per channel until stage 2), the post-softmax input of the attention-times-V product (SULQ, one
  η per layer) and the image entering the patch embedding (left in float);
- stage 1: activation quantizers initialised by one forward over the first ``init_size`` images
  with float weights, then every unit (transformer block, and patch embedding / Swin reduction /
  head as single layers) tuned on its *float-model* input against the float model's output;
- stage 2: the qkv/fc1 post-LayerNorm quantizers folded to per tensor by RepQ-ViT's
  reparameterization, on the stage-1-tuned float weights (lossless: no weights are quantized yet);
- stage 3: weight quantizers fitted on the rescaled weights, then every unit tuned again on its
  input in the fully quantized model (earlier units already re-tuned).

Only weights and biases are trained (Adam, lr 4e-5, cosine to 0; Swin's relative-position bias
table too); every quantizer's parameters stay as initialised. The loss is the squared error summed
over tokens. No AdaRound. Switches cover the paper's ablations (SULQ → log2, stages on/off).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from torch import nn

from benchsuite.api import CalibrationSet, Method, MethodConfig
from benchsuite.bits import BitSpec
from benchsuite.quant.budget import BudgetTable, ReconstructionConfig
from benchsuite.quant.calibration import (
    calibrate_activations,
    calibration_tensor,
    fit_weight_quantizers,
    iter_quantizers,
    model_device,
    pairs_with_roles,
    percentile_quantizer,
)
from benchsuite.quant.canonical import CanonicalModel, InputKind, Role
from benchsuite.quant.quantizers import Log2Quantizer, LogSqrt2Quantizer, Quantizer
from benchsuite.quant.reconstruct import (
    ParamGroup,
    Unit,
    UnitPlan,
    UnitReport,
    UnitSettings,
    float_copy,
    reconstruct,
    unit_parameters,
)
from benchsuite.quant.reparam import reparameterize_pair
from benchsuite.quant.sulq import SULQuantizer

ACTIVATION_PERCENTILES = (0.999, 0.9999, 0.99999)
WEIGHT_PERCENTILES = (0.97, 0.98, 0.99, 0.995, 0.9995, 0.9997, 0.9999, 0.99995, 0.99999)
ETA_GRID = (0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.1, 0.2, 0.5, 1.0)
#: 1000 steps per unit and stage at 3/4 bits, 200 at 6 bits (reference README); 1024 images.
PAPER_BUDGET = BudgetTable(iters_low_bits=1000, iters_high_bits=200, calib_size=1024, batch_size=64)


@dataclass(frozen=True)
class ISViTConfig(ReconstructionConfig):
    """Defaults are the reference code's (with ``--w_cw`` and the README's iteration counts)."""

    PAPER_BUDGET: ClassVar[BudgetTable] = PAPER_BUDGET

    #: Images of the one forward that initialises the quantizers (the first of the calibration set).
    init_size: int = 64
    lr: float = 4e-5
    #: ``sulq`` (the method); ``log2`` (the paper's ablation: a log2 quantizer instead of SULQ);
    #: ``log_sqrt2`` (RepQ-ViT's quantizer, for comparison).
    softmax_quantizer: Literal["sulq", "log2", "log_sqrt2"] = "sulq"
    #: ``reference``: the code's 2^b + 1 forward codes; ``strict``: exactly 2^b (see spec §4.2).
    sulq_mode: Literal["reference", "strict"] = "reference"
    eta_grid: tuple[float, ...] = ETA_GRID
    activation_percentiles: tuple[float, ...] = ACTIVATION_PERCENTILES
    weight_percentiles: tuple[float, ...] = WEIGHT_PERCENTILES
    #: Stage 1 (tune with quantized activations and float weights); off for the SOS ablation.
    stage1: bool = True
    #: Stage 3 (tune with everything quantized); off leaves plain calibrated weights.
    stage3: bool = True
    #: Stage-3 unit input: ``quant`` (reference) or ``float``.
    stage3_input: Literal["quant", "float"] = "quant"
    round_mean_zero_point: bool = False
    #: Bits of the image entering the patch embedding; None keeps it float (reference).
    patch_embed_input_bits: int | None = None



class ISViT(Method):
    name = "isvit"
    paper = (
        "Y. Zhong, J. Hu, M. Lin, M. Chen, R. Ji. I&S-ViT: An Inclusive & Stable Method for Pushing "
        "the Limit of Post-Training ViTs Quantization. arXiv 2311.10126 (2023); IEEE TPAMI 2025"
    )
    description = (
        "Shift-uniform-log2 post-softmax quantizer; three-stage smooth optimisation (per-channel "
        "post-LN with float weights, reparameterization, block tuning with quantized weights)."
    )
    config_class = ISViTConfig
    fidelity = (
        "follows the reference code (zysxmu/IaS-ViT) per specs/isvit.md; calibration images come "
        "from benchsuite's seeded sampler; a 'fast' budget runs fewer steps and images (recorded)"
    )

    def __init__(self) -> None:
        self._info: dict[str, Any] = {}

    def quantize(
        self, model: CanonicalModel, calibration: CalibrationSet, bits: BitSpec, config: MethodConfig
    ) -> nn.Module:
        assert isinstance(config, ISViTConfig)
        config = config.resolve(bits)
        assert bits.w_bits is not None and bits.a_bits is not None and config.iters is not None
        device = model_device(model)
        images = calibration_tensor(calibration, "cpu")
        reference = float_copy(model)
        reparam_pairs = pairs_with_roles(model, (Role.QKV, Role.FC1))
        # Activation quantizers (qkv/fc1 inputs per channel); weights stay float until stage 3.
        calibrate_activations(
            model,
            images[: config.init_size],
            lambda kind, per_channel: _activation_quantizer(kind, bits.a_bits, per_channel, config),
            [linear for pair in reparam_pairs for linear in pair.linears],
        )

        reports: dict[str, list[UnitReport]] = {}
        if config.stage1:
            reports["stage1"] = reconstruct(
                model, reference, images, _plan(config, "float", calibration.seed), device=device, description="I&S-ViT stage 1"
            )
        for pair in reparam_pairs:
            reparameterize_pair(pair, round_mean_zero_point=config.round_mean_zero_point)
        fit_weight_quantizers(model, bits.w_bits, config.weight_percentiles)
        if config.stage3:
            reports["stage3"] = reconstruct(
                model, reference, images, _plan(config, config.stage3_input, calibration.seed), device=device,
                description="I&S-ViT stage 3",
            )
        del reference
        self._info = {
            "iters_per_unit": config.iters,
            "calibration_images": len(images),
            "reparameterized_pairs": len(reparam_pairs),
            "sulq_eta": [
                float(q.eta) for q in iter_quantizers(model) if isinstance(q, SULQuantizer) and q.initialized
            ],
            "units": {stage: [r.to_dict() for r in rs] for stage, rs in reports.items()},
        }
        return model

    def run_info(self, model: CanonicalModel) -> dict[str, Any]:
        return dict(self._info)


def _activation_quantizer(kind: InputKind, a_bits: int, per_channel: bool, config: ISViTConfig) -> Quantizer | None:
    if kind is InputKind.IMAGE:
        bits = config.patch_embed_input_bits
        return None if bits is None else percentile_quantizer(bits, config.activation_percentiles)
    if kind is InputKind.POST_SOFTMAX:
        if config.softmax_quantizer == "sulq":
            return SULQuantizer(a_bits, mode=config.sulq_mode, eta_grid=config.eta_grid, lazy_init=True)
        log_quantizer = Log2Quantizer if config.softmax_quantizer == "log2" else LogSqrt2Quantizer
        return log_quantizer(a_bits, percentiles=config.activation_percentiles, lazy_init=True)
    return percentile_quantizer(a_bits, config.activation_percentiles, per_channel=per_channel)


def _plan(config: ISViTConfig, unit_input: Literal["float", "quant"], seed: int):
    assert config.iters is not None
    settings = UnitSettings(iters=config.iters, batch_size=config.batch_size, input=unit_input, seed=seed)

    def plan_for(unit: Unit) -> UnitPlan | None:
        if not unit.quantizers():
            return None  # e.g. the float patch embedding in stage 1: nothing to absorb
        return UnitPlan(
            settings=settings,
            param_groups=lambda ctx: [
                ParamGroup(
                    "weights",
                    unit_parameters(ctx.unit, extra=("relative_position_bias_table",)),
                    config.lr,
                    "cosine",
                )
            ],
        )

    return plan_for
