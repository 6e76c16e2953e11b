"""ADFQ-ViT: per-patch outlier-aware and shift-log quantizers, module-wise reconstruction.

Y. Jiang, N. Sun, X. Xie, F. Yang, T. Li, arXiv 2407.02763 (2024); Neural Networks 186:107289
(2025). Follows the reference code (``llwx593/adfq-vit``) as specified in ``specs/adfq_vit.md``;
defaults are the reference code's, and every component is a config field so the paper's
ablations run from the command line (``--config adfq-vit.FIELD=VALUE``).

**What is quantized** (spec §2), every input at the same ``a_bits`` (no 8-bit first/last layer),
every weight at ``w_bits``:

- ``qkv`` and ``fc1`` inputs (post-LayerNorm): :class:`~benchsuite.quant.outlier.PerPatchOutlierQuantizer`,
  one (Δ, z) per token position, values with ``|x| > α`` kept in float (α = ``qkv_outlier_alpha``,
  ``fc1_outlier_alpha``, both 5; the README uses 10 for fc1 of DeiT-S, treat it as per-model).
  Token axis −2: ViT (B, N, C); Swin windows (B·nW, 49, C) for qkv, (B, H·W, C) for fc1.
- ``fc2`` input (post-GELU): :class:`~benchsuite.quant.shift_log.ShiftLogQuantizer` (base √2,
  dynamic minimum: the code's; ``shift_log_base``, ``shift_mode``, ``shift_static_min``).
- post-softmax input of ``matmul_av``: log√2 (percentile search), never trained.
- Q, K (``matmul_qk`` inputs) and V (second ``matmul_av`` input): uniform per tensor, L_2.4 grid
  search (``qkv_lp_norm``), straight-through rounding in both gradient modes, never trained.
- every other input (``proj``, the image entering the patch embedding, ``head``, Swin
  ``reduction``, anything else an adapter exposes): uniform per tensor, percentile/MSE search.
- weights: uniform asymmetric per output channel (percentile/MSE search on the weight,
  ``weight_percentiles``), then AdaRound.

**Reconstruction** (spec §7), one unit at a time in execution order (``unit_granularity=module``:
every attention and every MLP separately; patch embedding, head and Swin reductions as single
layers), by the shared engine (:mod:`benchsuite.quant.reconstruct`). All quantizers start
disabled, so a unit's cached quantized-model input has every earlier unit quantized and tuned
and nothing after it. For each unit:

1. ``before``: the unit's quantizers are switched on and its activation quantizers initialised by
   one no-grad forward of the unit (lazy init, execution order, weights rounded to nearest) on
   its first ``act_init_size`` (256) cached quantized-model inputs; then its weight quantizers are
   wrapped into AdaRound (h(V) = frac(W/Δ)) and the step sizes of its Linear/Conv input
   quantizers become Parameters.
2. training, ``iters`` steps: Adam on the AdaRound logits V (lr 3e-3, constant) and the input
   step sizes of the unit's Linear/Conv ops (per-patch Δ of qkv/fc1, the proj-input Δ, the
   shift-log δ of fc2, and the input Δ of a single-layer unit; lr 4e-5, cosine to 0); zero
   points, Q/K/V and softmax quantizers, weights, biases and norms frozen. Mini-batches of 32
   drawn with replacement; QDrop element-wise mixing with p = 0.5 and the quantized-only half
   appended to the same forward (loss on the mixed half only; p = 1 means quantized input only).
   Loss: output MSE (squared error summed over tokens, averaged over batch and channels) +
   AdaRound regularizer (0.01 · Σ(1 − |2h(V) − 1|^β), off for the first 20 % of the steps, then
   β linear 20 → 2, on the reference's 1-based step counter) + for attention units
   10 · KL_batchmean(softmax(Â/4) ‖ softmax(A/4)) over the head axis (``attention_kl``,
   ``kl_temperature``, ``kl_weight``, ``kl_axis``), Â the quantized unit's post-softmax map
   before its quantizer.
3. ``after``: AdaRound is hardened (``floor(W/Δ) + [V ≥ 0]``), so evaluation uses hard rounding.

**Gradient mode** (spec §8, ``gradient_mode``, stored in every result's config):

- ``reference`` (default): the reference code's gradients. The uniform (proj, image, head,
  reduction), log√2, per-patch and shift-log quantizers round with plain ``torch.round`` (no
  STE) and the per-patch quantizer detaches its input; only Q/K/V use an STE. So in an
  attention unit the MSE term reaches only proj (its non-STE input quantizer blocks the path to
  qkv) and the KL term is the only signal for the Q/K rows of the qkv weight; in an MLP unit fc1's
  rounding is driven almost only by the regularizer.
- ``ste``: straight-through rounding in every quantizer (LSQ-style step-size gradients). A
  labelled variant, never to be mixed with ``reference`` rows.

**Ablation switches** (proposal): ``post_layernorm_quantizer=per_tensor`` (plain uniform instead
of per-patch for qkv/fc1), ``outlier_aware=false`` (per-patch without outlier retention),
``post_gelu_quantizer=uniform`` (no shift-log), ``attention_kl=false``, ``learn_act_scale=false``,
``reconstruction=false`` (calibration only: same per-unit initialisation, round-to-nearest
weights), ``unit_granularity=block`` (BRECQ-style block units).

**Budget**: 3000 steps per unit (the reference README's command for DeiT-S W4A4; the script's
default is 5000 — ``--config adfq-vit.iters=5000``) on 1024 calibration images; ``budget=fast``
runs :data:`~benchsuite.quant.budget.FAST_ITERS` steps on fewer images (recorded).

**Choices where the spec leaves room** (proposal):

- Output MSE layout: the engine's :func:`~benchsuite.quant.reconstruct.output_mse` reproduces the
  reference's scale for every unit (for Swin's window attention: squared error summed over the 49
  tokens of a window, averaged over windows, batch and channels).
- The outlier ratio in ``run_info`` is measured in each unit's initialisation forward (its
  first ``act_init_size`` quantized-model calibration inputs); outlier counters are reset after
  quantization.
- Batches, QDrop noise and everything random in a unit are seeded from the calibration seed
  (the reference's global seed is 1005; benchsuite's seed belongs to the runner).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from benchsuite.api import CalibrationSet, Method, MethodConfig
from benchsuite.bits import BitSpec
from benchsuite.errors import ConfigError
from benchsuite.quant.adaround import AdaRoundQuantizer
from benchsuite.quant.budget import BudgetTable, ReconstructionConfig
from benchsuite.quant.calibration import (
    calibration_tensor,
    fit_weight_quantizer,
    iter_quantizers,
    model_device,
    set_enabled,
)
from benchsuite.quant.canonical import CanonicalModel, InputKind, Role
from benchsuite.quant.modules import QuantModule
from benchsuite.quant.outlier import GradientMode, PerPatchOutlierQuantizer
from benchsuite.quant.quantizers import LogSqrt2Quantizer, Quantizer, UniformQuantizer
from benchsuite.quant.reconstruct import (
    AttentionKL,
    OutputMSE,
    ParamGroup,
    ReplacementSampler,
    RoundingRegularizer,
    Unit,
    UnitContext,
    UnitPlan,
    UnitReport,
    UnitSettings,
    float_copy,
    reconstruct,
)
from benchsuite.quant.shift_log import LogBase, ShiftLogQuantizer, ShiftMode

__all__ = ["ADFQViT", "ADFQViTConfig", "PAPER_BUDGET"]

PERCENTILES = (0.999, 0.9999, 0.99999)
#: 3000 steps per unit at every bit width (reference README; script default 5000); 1024 images.
#: Mini-batches of 32 rows per step (plus as many quantized-only rows in the same forward).
PAPER_BUDGET = BudgetTable(iters_low_bits=3000, iters_high_bits=3000, calib_size=1024, batch_size=32)


@dataclass(frozen=True)
class ADFQViTConfig(ReconstructionConfig):
    """Defaults are the reference code's (spec §9); the rest are labelled variants/ablations."""

    PAPER_BUDGET: ClassVar[BudgetTable] = PAPER_BUDGET

    #: Cached quantized-model inputs of a unit that initialise its activation quantizers.
    act_init_size: int = 256
    # -- quantizers ------------------------------------------------------------------------------
    #: ``per_patch`` (the method) or ``per_tensor`` (ablation) for the qkv/fc1 post-LN inputs.
    post_layernorm_quantizer: Literal["per_patch", "per_tensor"] = "per_patch"
    #: Keep |x| > α in float in the per-patch quantizer (false: α = ∞, ablation).
    outlier_aware: bool = True
    qkv_outlier_alpha: float = 5.0
    #: 5 in the reference code; its README uses 10 for DeiT-S (per-model).
    fc1_outlier_alpha: float = 5.0
    #: ``shift_log`` (the method) or ``uniform`` (ablation: per-tensor uniform) for fc2's input.
    post_gelu_quantizer: Literal["shift_log", "uniform"] = "shift_log"
    #: ``sqrt2`` (reference code) or ``2`` (the paper's wording "log2").
    shift_log_base: LogBase = "sqrt2"
    #: ``dynamic``: minimum of each tensor at every forward (reference); ``static``: a constant.
    shift_mode: ShiftMode = "dynamic"
    #: Static shift; None: the calibrated minimum (e.g. -0.17, the GELU bound). Static mode only.
    shift_static_min: float | None = None
    #: Candidates of the percentile/MSE search of activation quantizers.
    percentiles: tuple[float, ...] = PERCENTILES
    #: Candidates of the per-output-channel weight search (before AdaRound).
    weight_percentiles: tuple[float, ...] = PERCENTILES
    #: Error norm of the Q/K/V grid search.
    qkv_lp_norm: float = 2.4
    # -- reconstruction --------------------------------------------------------------------------
    #: False: calibration only (per-unit initialisation, round-to-nearest weights).
    reconstruction: bool = True
    #: ``module``: attention and MLP units (reference); ``block``: whole blocks (ablation).
    unit_granularity: Literal["module", "block"] = "module"
    lr_rounding: float = 3e-3
    #: Train the input step sizes of the unit's Linear/Conv ops (false: AdaRound only).
    learn_act_scale: bool = True
    lr_act_scale: float = 4e-5
    round_reg_weight: float = 0.01
    round_warmup: float = 0.2
    #: β of the rounding regularizer, linear from the first to the second value.
    beta_range: tuple[float, float] = (20.0, 2.0)
    attention_kl: bool = True
    kl_temperature: float = 4.0
    #: 1/λ_kl with λ_kl = 0.1.
    kl_weight: float = 10.0
    #: Softmax axis of the KL term: ``heads`` (dim 1, reference) or ``keys``.
    kl_axis: Literal["heads", "keys"] = "heads"
    #: QDrop: probability that an element of the unit's input is the quantized one (1: no mixing).
    qdrop_prob: float = 0.5
    #: ``reference``: the code's gradients (plain rounding, detached per-patch input); ``ste``.
    gradient_mode: GradientMode = "reference"



class ADFQViT(Method):
    name = "adfq-vit"
    paper = (
        "Y. Jiang, N. Sun, X. Xie, F. Yang, T. Li. ADFQ-ViT: Activation-Distribution-Friendly "
        "Post-Training Quantization for Vision Transformers. arXiv 2407.02763 (2024); Neural "
        "Networks 186:107289 (2025)"
    )
    description = (
        "Per-patch outlier-aware post-LayerNorm quantizer, shift-log post-GELU quantizer, "
        "module-wise AdaRound reconstruction with an attention-score KL term."
    )
    config_class = ADFQViTConfig
    fidelity = (
        "follows the reference code (llwx593/adfq-vit) per specs/adfq_vit.md, gradient_mode "
        "recorded; calibration images come from benchsuite's seeded sampler; a 'fast' budget "
        "runs fewer steps and images (recorded)"
    )

    def __init__(self) -> None:
        self._info: dict[str, Any] = {}

    def quantize(
        self, model: CanonicalModel, calibration: CalibrationSet, bits: BitSpec, config: MethodConfig
    ) -> nn.Module:
        assert isinstance(config, ADFQViTConfig)
        config = config.resolve(bits)
        assert bits.w_bits is not None and bits.a_bits is not None and config.iters is not None
        _check_config(config)
        if config.post_layernorm_quantizer == "per_patch" and not model.fixed_token_count:
            raise ConfigError(
                "adfq-vit's per-patch quantizer keeps one scale per token position, so it needs one input "
                f"size, and {model.family} inputs vary in size (detection images keep their aspect ratio); "
                "run the labelled variant --config adfq-vit.post_layernorm_quantizer=per_tensor"
            )
        images = calibration_tensor(calibration, "cpu")
        reference = float_copy(model)
        # Nothing of the network trains but what the plans hand to the optimiser.
        trainable = [p for p in model.parameters() if p.requires_grad]
        for p in trainable:
            p.requires_grad_(False)
        try:
            reports, outlier_ratios = self._run(model, reference, images, bits, config, calibration.seed)
        finally:
            del reference
            for p in trainable:  # weights and biases as they came (none of them was trained)
                p.requires_grad_(True)
        self._info = {
            "iters_per_unit": config.iters,
            "calibration_images": len(images),
            "gradient_mode": config.gradient_mode,
            "outlier_ratios": outlier_ratios,
            "units": [r.to_dict() for r in reports],
        }
        return model

    def _run(
        self,
        model: CanonicalModel,
        reference: CanonicalModel,
        images: torch.Tensor,
        bits: BitSpec,
        config: ADFQViTConfig,
        seed: int,
    ) -> tuple[list[UnitReport], dict[str, float]]:
        assert bits.w_bits is not None and bits.a_bits is not None
        names: dict[int, str] = {}
        with torch.no_grad():
            for site in model.sites():
                names[id(site.module)] = site.name
                for index, kind in enumerate(site.input_kinds):
                    quantizer = _activation_quantizer(site.role, kind, bits.a_bits, config)
                    site.module.set_input_quantizer(index, quantizer)
                if site.module.has_weight:
                    site.module.set_weight_quantizer(
                        fit_weight_quantizer(site.module, bits.w_bits, config.weight_percentiles)
                    )
        # Off until their unit comes: a unit's cached input then has every earlier unit quantized
        # (and tuned) and nothing after it, and no lazy quantizer initialises during a capture.
        set_enabled(iter_quantizers(model), False)

        outlier_ratios: dict[str, float] = {}
        reports = reconstruct(
            model,
            reference,
            images,
            _Planner(config, seed, names, outlier_ratios),
            granularity=config.unit_granularity,
            device=model_device(model),
            description="ADFQ-ViT",
        )
        _check_done(model)
        for quantizer in iter_quantizers(model):
            if isinstance(quantizer, PerPatchOutlierQuantizer):
                quantizer.reset_outlier_stats()  # the logged ratios are the initialisation's
        return reports, outlier_ratios

    def run_info(self, model: CanonicalModel) -> dict[str, Any]:
        return dict(self._info)


# --------------------------------------------------------------------------------------------
# Quantizers
# --------------------------------------------------------------------------------------------


def _activation_quantizer(role: Role, kind: InputKind, a_bits: int, config: ADFQViTConfig) -> Quantizer:
    """The quantizer of an input of ``kind`` to an op with ``role`` (spec §2)."""
    ste = config.gradient_mode == "ste"
    if role is Role.MATMUL_QK or (role is Role.MATMUL_AV and kind is not InputKind.POST_SOFTMAX):
        # Q, K, V: STE in both modes (the reference's only STE quantizers), never trained.
        return UniformQuantizer(a_bits, init="lp_search", lp_norm=config.qkv_lp_norm, lazy_init=True,
                                straight_through=True)
    if kind is InputKind.POST_SOFTMAX:
        return LogSqrt2Quantizer(a_bits, percentiles=config.percentiles, lazy_init=True, straight_through=ste)
    if (
        kind is InputKind.POST_LAYERNORM
        and role in (Role.QKV, Role.FC1)
        and config.post_layernorm_quantizer == "per_patch"
    ):
        alpha = config.qkv_outlier_alpha if role is Role.QKV else config.fc1_outlier_alpha
        return PerPatchOutlierQuantizer(
            a_bits,
            alpha if config.outlier_aware else math.inf,
            token_dims=(-2,),
            percentiles=config.percentiles,
            gradient_mode=config.gradient_mode,
            lazy_init=True,
        )
    if kind is InputKind.POST_GELU and config.post_gelu_quantizer == "shift_log":
        return ShiftLogQuantizer(
            a_bits,
            base=config.shift_log_base,
            shift_mode=config.shift_mode,
            static_min=config.shift_static_min if config.shift_mode == "static" else None,
            percentiles=config.percentiles,
            gradient_mode=config.gradient_mode,
            lazy_init=True,
        )
    return UniformQuantizer(a_bits, init="percentile_mse", percentiles=config.percentiles, lazy_init=True,
                            straight_through=ste)



def _input_quantizers(module: QuantModule) -> list[Quantizer]:
    return [q for q in (module.input_quantizer(i) for i in range(len(module.input_kinds))) if q is not None]


def _check_config(config: ADFQViTConfig) -> None:
    if config.act_init_size < 1:
        raise ValueError(f"act_init_size must be at least 1, got {config.act_init_size}")
    if len(config.beta_range) != 2:
        raise ValueError(f"beta_range takes two values (start, end), got {config.beta_range!r}")
    if config.shift_static_min is not None and config.shift_mode != "static":
        raise ValueError("shift_static_min is used with shift_mode=static only")


def _check_done(model: CanonicalModel) -> None:
    """Every quantizer on, calibrated, and every AdaRound hard: nothing left half-done."""
    for site in model.sites():
        for quantizer in site.module.quantizers():
            if not (quantizer.enabled and quantizer.initialized):
                raise RuntimeError(f"reconstruction never reached {site.name} ({site.role.value})")
            if isinstance(quantizer, AdaRoundQuantizer) and not quantizer.is_hard:
                raise RuntimeError(f"AdaRound of {site.name} was not hardened")


# --------------------------------------------------------------------------------------------
# Loss terms
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Per-unit plans
# --------------------------------------------------------------------------------------------


class _Planner:
    """``plan_for`` of :func:`reconstruct`: one :class:`UnitPlan` per unit (see the module doc)."""

    def __init__(
        self, config: ADFQViTConfig, seed: int, names: dict[int, str], outlier_ratios: dict[str, float]
    ) -> None:
        assert config.iters is not None
        self.config = config
        self.names = names
        self.outlier_ratios = outlier_ratios
        self.settings = UnitSettings(
            iters=config.iters if config.reconstruction else 0,
            batch_size=config.batch_size,
            input="qdrop",
            qdrop_prob=config.qdrop_prob,
            append_quant_half=True,
            seed=seed,
        )

    def __call__(self, unit: Unit) -> UnitPlan | None:
        if not unit.quant_modules():
            return None
        config = self.config
        losses: list = [OutputMSE(), RoundingRegularizer(
            weight=config.round_reg_weight,
            warmup=config.round_warmup,
            beta_start=float(config.beta_range[0]),
            beta_end=float(config.beta_range[1]),
        )]
        if config.attention_kl and unit.softmax_modules():
            losses.append(AttentionKL(config.kl_temperature, config.kl_weight, config.kl_axis))
        return UnitPlan(
            settings=self.settings,
            param_groups=self._param_groups,
            losses=tuple(losses),
            sampler=ReplacementSampler(),
            before=self._before,
            after=self._after,
        )

    def _before(self, ctx: UnitContext) -> None:
        unit = ctx.unit
        set_enabled(unit.quantizers(), True)
        source = ctx.data.quant_inputs if ctx.data.quant_inputs is not None else ctx.data.float_inputs
        assert source is not None
        rows = torch.arange(min(self.config.act_init_size, len(source)))
        was_training = unit.owner.training
        unit.owner.eval()
        try:
            with torch.no_grad():
                unit(source.gather(rows, ctx.device))  # lazy init of every quantizer, in order
        finally:
            unit.owner.train(was_training)
        for module in unit.quant_modules():
            for quantizer in module.quantizers():
                if not quantizer.initialized:
                    raise RuntimeError(f"initialisation never reached {self.names.get(id(module), module.role.value)}")
                if isinstance(quantizer, PerPatchOutlierQuantizer):
                    self.outlier_ratios[self.names.get(id(module), module.role.value)] = quantizer.last_outlier_ratio
        for module in unit.quant_modules():
            if not module.has_weight:
                continue
            weight_quantizer = module.weight_quantizer
            if isinstance(weight_quantizer, UniformQuantizer):
                module.set_weight_quantizer(AdaRoundQuantizer.from_uniform(weight_quantizer, getattr(module, "weight")))
            if self.config.learn_act_scale and self.config.reconstruction:
                for quantizer in _input_quantizers(module):
                    make_learnable = getattr(quantizer, "make_scale_learnable", None)
                    if make_learnable is not None:
                        make_learnable()

    def _param_groups(self, ctx: UnitContext) -> list[ParamGroup]:
        rounding: list[nn.Parameter] = []
        scales: list[nn.Parameter] = []
        for module in ctx.unit.quant_modules():
            if not module.has_weight:
                continue
            if isinstance(module.weight_quantizer, AdaRoundQuantizer):
                rounding.append(module.weight_quantizer.v)
            if self.config.learn_act_scale:
                for quantizer in _input_quantizers(module):
                    scale = getattr(quantizer, "scale", None)
                    if isinstance(scale, nn.Parameter):
                        scales.append(scale)
        return [
            ParamGroup("rounding", rounding, self.config.lr_rounding, "constant"),
            ParamGroup("act_scale", scales, self.config.lr_act_scale, "cosine"),
        ]

    @staticmethod
    def _after(ctx: UnitContext) -> None:
        for quantizer in ctx.unit.quantizers():
            if isinstance(quantizer, AdaRoundQuantizer):
                quantizer.harden()
