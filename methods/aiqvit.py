"""AIQViT: architecture-informed low-rank compensation, dynamic focusing quantizer, curriculum.

R. Jiang et al., AAAI 2025 (arXiv 2502.04628). **No reference code is public**: this is the first
public implementation, written from ``specs/aiqvit.md``, whose sources are the abstract and
third-party summaries. Every choice the paper leaves open follows the spec's "(proposal)" and is
a config field (serialized into every result), so that each can be changed from the command line
(``--config aiqvit.FIELD=VALUE``) once the paper's PDF settles it. The pipeline:

1. **Activation quantizers** (spec §6), initialised by one no-grad forward over the first
   ``init_size`` calibration images with float weights (lazy init, in execution order, as
   I&S-ViT): post-LayerNorm inputs of qkv, fc1 and Swin's reduction per channel (``post_ln =
   reparam``) or per tensor (``per_tensor``); the post-softmax input of the attention-times-V
   product by ``softmax_quantizer``; every other input uniform asymmetric per tensor; the image
   entering the patch embedding float (``patch_embed_input_bits``). Uniform quantizers use the
   percentile/MSE search (I&S-ViT's three activation percentiles).
2. **Reparameterization** of the post-LN pairs (RepQ-ViT/I&S-ViT) while weights are still float,
   so it is lossless; their input quantizers become per tensor.
3. **Weight quantizers**: uniform asymmetric per output channel, I&S-ViT's nine-point
   percentile/MSE grid. Then every uniform step size (weights and activations) is made a
   Parameter (LSQ-style, zero points frozen) when ``learn_quant_params``; the DFQ interval is
   learnable by construction. W₀, biases and everything else of the network stay frozen.
4. **Reconstruction**, unit by unit in network order (block units; patch embedding, Swin
   reduction and head as single-layer units), each unit's input taken from the quantized model
   (earlier units already tuned), its target the float model's output, loss the engine's output
   MSE. In each unit:

   a. AILoC (:mod:`benchsuite.quant.lowrank`) is attached to the unit's Linears whose role is in
      ``ailoc_roles`` (B = 0, so nothing changes yet);
   b. rank search (``rank_mode=auto``) for ``⌊search_fraction · iters⌋`` steps, each one Adam
      step on A, B and the quantizer parameters on a batch of the training rows, then one Adam
      step on the architecture logits θ on a batch of the held-out rows (first-order DARTS);
   c. discretization to ``argmax θ`` (mask folded into B, see lowrank.py);
   d. fine-tuning of A, B and the quantizer parameters for the remaining steps, by the engine.

   With ``rank_mode=fixed`` (or no Linear with more than one candidate) the unit skips b/c and
   fine-tunes for all ``iters`` steps at rank ``fixed_rank`` (clipped to the layer).
   ``ailoc_form=merged`` folds ``B·A`` into the weight after the unit is tuned (the forward was
   already ``Q_w(W₀ + B·A)``, so nothing changes but the overhead); ``branch`` keeps the float
   branch beside the quantized weight.

Open choices and why (all (proposal) of the spec unless noted):

- *Budget*: 1000 steps per unit at ≤ 4 bits, 200 at 6 bits, 1024 images, batch 32 (I&S-ViT's
  README values, which the spec borrows; the calibration size is the summaries' Fig. 4b). The
  ``iters`` steps of a unit are *shared* between search and fine-tuning (search 50 %), so a unit
  costs about 1.5× a plain reconstruction of the same ``iters`` (a search step runs two
  forwards), and ``use_ailoc=False`` or ``rank_mode=fixed`` runs the same number of steps.
- *Learning rates and schedules*: Adam; A, B 1e-3; step sizes 1e-4; DFQ interval 1e-4 (on the
  unconstrained ``u1``, ``u2`` of :class:`~benchsuite.quant.dfq.DynamicFocusingQuantizer`: b₁
  starts at 1e-6 behind a saturated sigmoid and so barely moves, see dfq.py); θ 3e-4. Every
  group anneals by cosine to 0 *within each phase*: search and fine-tuning are two optimizations
  (discretization replaces A and B by new, truncated Parameters, so the Adam state could not
  carry over anyway).
- *Search split*: ``heldout`` shuffles the unit's calibration rows once (seeded) and gives half
  to the weights, half to θ (DARTS's train/validation split; the weights see only half the
  rows during the search, all of them while fine-tuning); ``same`` draws θ's batches from all
  rows, independently of the weights' batches. With one row only, ``heldout`` falls back to
  ``same``. θ's gradient is zero until B leaves 0, which the first weight step does.
- *Rank search objective*: output MSE, plus ``rank_penalty · Σ_k π_k·r_k·(d_in + d_out)`` summed
  over the unit's layers (default 0: "architecture-informed" is not known to mean a size term).
  Ties of θ (e.g. no search step ran) resolve to the smaller rank.
- *Curriculum* (``use_curriculum``): ``λ(t) = min(1, λ₀ + (1 − λ₀)·t/(τ·T))``, batches drawn from
  the ``⌈λ(t)·N⌉`` easiest rows, ease being a row's output MSE through the unit as a phase
  starts (search: the plain PTQ point, B = 0; fine-tuning: the discretized unit), with T the
  phase's steps; both the weights' and θ's pools follow it within their split. Optional
  re-ranking every ``curriculum_rerank_every`` steps. Off: uniform batches without repeats.
- *Branch input*: the branch reads the same quantized input as the Linear (``compensation(x̂)``),
  so a deployed branch needs no float copy of the activation; branch weights float unless
  ``ailoc_branch_bits`` (8-bit symmetric per row, dynamic absmax, STE).
- *Softmax quantizer*: ``dfq`` (default, the method); ``log2`` (:class:`Log2Quantizer`) and
  ``logsqrt2`` (RepQ-ViT's log√2) with a learnable Δ; ``uniform`` a per-tensor uniform one. The
  paper's "remove DFQ" replacement is not known; ``log2`` is the assumed one.
- *Quantizers not trained*: zero points. Biases and the float weights W₀ are
  frozen, as the summaries say of AILoC ("only the low-rank factors trained").
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from benchsuite.api import CalibrationSet, Method, MethodConfig
from benchsuite.bits import BitSpec
from benchsuite.errors import ConfigError
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
from benchsuite.quant.dfq import DynamicFocusingQuantizer
from benchsuite.quant.lowrank import LowRankCompensation, candidate_ranks
from benchsuite.quant.modules import QuantLinear
from benchsuite.quant.quantizers import Log2Quantizer, LogSqrt2Quantizer, Quantizer, UniformQuantizer
from benchsuite.quant.reconstruct import (
    CurriculumSampler,
    ParamGroup,
    PermutationSampler,
    Unit,
    UnitContext,
    UnitPlan,
    UnitSettings,
    float_copy,
    unit_output_mse,
    reconstruct,
    schedule_factor,
)
from benchsuite.quant.reparam import reparameterize_pair

ACTIVATION_PERCENTILES = (0.999, 0.9999, 0.99999)
WEIGHT_PERCENTILES = (0.97, 0.98, 0.99, 0.995, 0.9995, 0.9997, 0.9999, 0.99995, 0.99999)
RANK_CANDIDATES = (4, 8, 16, 32, 64, 100)
#: 1000 steps per unit at ≤ 4 bits, 200 at 6 bits, 1024 images (spec §6, borrowed from I&S-ViT).
PAPER_BUDGET = BudgetTable(iters_low_bits=1000, iters_high_bits=200, calib_size=1024, batch_size=32)
#: Roles a compensation may be attached to (Linear layers only).
AILOC_ROLES = ("qkv", "proj", "fc1", "fc2", "head", "reduction", "other")
#: Post-LayerNorm Linears calibrated per channel and reparameterized (spec §6).
REPARAM_ROLES = (Role.QKV, Role.FC1, Role.REDUCTION)


@dataclass(frozen=True)
class AIQViTConfig(ReconstructionConfig):
    """Defaults are the spec's proposals (aiqvit.md §8); the paper's values are unknown."""

    PAPER_BUDGET: ClassVar[BudgetTable] = PAPER_BUDGET

    #: Images of the one forward that initialises the activation quantizers.
    init_size: int = 64
    # -- AILoC -------------------------------------------------------------------------------
    use_ailoc: bool = True
    #: ``branch``: Q(W₀)x + BAx (float side branch); ``merged``: Q(W₀ + BA)x (no overhead).
    ailoc_form: Literal["branch", "merged"] = "branch"
    #: Roles of the Linears that get a compensation (also: head, reduction, other).
    ailoc_roles: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")
    #: Bits of A and B in branch form (symmetric per row); None: float.
    ailoc_branch_bits: int | None = None
    #: ``auto``: differentiable search over ``rank_candidates``; ``fixed``: ``fixed_rank``.
    rank_mode: Literal["auto", "fixed"] = "auto"
    fixed_rank: int = 20
    rank_candidates: tuple[int, ...] = RANK_CANDIDATES
    #: γ of the size penalty γ·Σ_k π_k·r_k·(d_in + d_out) on θ's loss.
    rank_penalty: float = 0.0
    #: Share of a unit's steps spent on the rank search (the rest fine-tunes).
    search_fraction: float = 0.5
    #: θ trained on a held-out half of the rows (``heldout``) or on all rows (``same``).
    search_split: Literal["heldout", "same"] = "heldout"
    #: Fold the mask m into B at discretization (else B, A truncated as they are).
    discretize_fold_mask: bool = True
    # -- quantizers --------------------------------------------------------------------------
    softmax_quantizer: Literal["dfq", "log2", "logsqrt2", "uniform"] = "dfq"
    dfq_below: Literal["clamp", "zero"] = "clamp"
    dfq_granularity: Literal["layer", "head"] = "layer"
    dfq_init: Literal["quantile", "mse"] = "quantile"
    dfq_quantile: float = 0.999
    #: ``reparam``: post-LN per channel folded to per tensor; ``per_tensor``: plain per tensor.
    post_ln: Literal["reparam", "per_tensor"] = "reparam"
    round_mean_zero_point: bool = False
    #: Learn the uniform step sizes (LSQ-style) and the log2 δ; the DFQ interval is learned anyway.
    learn_quant_params: bool = True
    activation_percentiles: tuple[float, ...] = ACTIVATION_PERCENTILES
    weight_percentiles: tuple[float, ...] = WEIGHT_PERCENTILES
    #: Bits of the image entering the patch embedding; None keeps it float (as I&S-ViT).
    patch_embed_input_bits: int | None = None
    # -- curriculum --------------------------------------------------------------------------
    use_curriculum: bool = True
    curriculum_lambda0: float = 0.3
    curriculum_tau: float = 0.8
    #: Re-rank the rows by loss every this many steps (0: rank once per phase).
    curriculum_rerank_every: int = 0
    # -- learning rates ----------------------------------------------------------------------
    lr_lowrank: float = 1e-3
    lr_quant: float = 1e-4
    lr_dfq: float = 1e-4
    lr_arch: float = 3e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        problems = []
        if self.init_size < 1:
            problems.append("init_size must be >= 1")
        bad_roles = [r for r in self.ailoc_roles if r not in AILOC_ROLES]
        if bad_roles:
            problems.append(f"ailoc_roles takes {', '.join(AILOC_ROLES)}, got {bad_roles}")
        if self.ailoc_branch_bits is not None:
            if not 2 <= self.ailoc_branch_bits <= 16:
                problems.append(f"ailoc_branch_bits must be in [2, 16], got {self.ailoc_branch_bits}")
            if self.ailoc_form != "branch":
                problems.append("ailoc_branch_bits needs ailoc_form=branch")
        if self.fixed_rank < 1:
            problems.append(f"fixed_rank must be >= 1, got {self.fixed_rank}")
        if not self.rank_candidates or any(int(r) < 1 for r in self.rank_candidates):
            problems.append(f"rank_candidates must be positive ranks, got {list(self.rank_candidates)}")
        if self.rank_penalty < 0:
            problems.append(f"rank_penalty must be >= 0, got {self.rank_penalty}")
        if not 0.0 <= self.search_fraction <= 1.0:
            problems.append(f"search_fraction must be in [0, 1], got {self.search_fraction}")
        if not 0.0 < self.dfq_quantile <= 1.0:
            problems.append(f"dfq_quantile must be in (0, 1], got {self.dfq_quantile}")
        if not 0.0 <= self.curriculum_lambda0 <= 1.0 or self.curriculum_tau <= 0:
            problems.append("curriculum_lambda0 must be in [0, 1] and curriculum_tau > 0")
        if self.curriculum_rerank_every < 0:
            problems.append("curriculum_rerank_every must be >= 0")
        if min(self.lr_lowrank, self.lr_quant, self.lr_dfq, self.lr_arch) < 0:
            problems.append("learning rates must be >= 0")
        if problems:
            raise ConfigError("AIQViTConfig: " + "; ".join(problems))


    def search_steps(self, iters: int) -> int:
        """Steps of the rank search out of a unit's ``iters`` (the rest fine-tunes)."""
        return int(math.floor(self.search_fraction * iters + 1e-9))


class AIQViT(Method):
    name = "aiqvit"
    paper = (
        "R. Jiang, Y. Zhang, L. Wang, P. Yu, Y. Guo. AIQViT: Architecture-Informed Post-Training "
        "Quantization for Vision Transformers. AAAI 2025; arXiv 2502.04628"
    )
    description = (
        "Low-rank weight compensation with a differentiable per-layer rank search (AILoC), a "
        "learnable-interval post-softmax quantizer (DFQ), curriculum-ordered block reconstruction."
    )
    config_class = AIQViTConfig
    fidelity = (
        "no reference code exists: follows specs/aiqvit.md, built from the abstract and third-party "
        "summaries; every open choice is a labelled config field (proposal); a 'fast' budget runs "
        "fewer steps and images (recorded)"
    )

    def __init__(self) -> None:
        self._info: dict[str, Any] = {}

    def quantize(
        self, model: CanonicalModel, calibration: CalibrationSet, bits: BitSpec, config: MethodConfig
    ) -> nn.Module:
        assert isinstance(config, AIQViTConfig)
        config = config.resolve(bits)
        assert bits.w_bits is not None and bits.a_bits is not None and config.iters is not None
        device = model_device(model)
        images = calibration_tensor(calibration, "cpu")
        reference = float_copy(model)
        model.requires_grad_(False)  # W₀, biases and norms stay frozen; the engine unfreezes what it trains
        reparam_pairs = pairs_with_roles(model, REPARAM_ROLES) if config.post_ln == "reparam" else []
        # (1) activation quantizers (post-LN per channel where reparameterized), weights still float
        calibrate_activations(
            model,
            images[: config.init_size],
            lambda kind, per_channel: _activation_quantizer(kind, bits.a_bits, per_channel, config),
            [linear for pair in reparam_pairs for linear in pair.linears],
        )
        # (2) reparameterization, lossless while weights are float
        for pair in reparam_pairs:
            reparameterize_pair(pair, round_mean_zero_point=config.round_mean_zero_point)
        # (3) weight quantizers; learnable step sizes
        fit_weight_quantizers(model, bits.w_bits, config.weight_percentiles)
        learnable = _make_quantizers_learnable(model, config.learn_quant_params)

        # (4) per unit: attach AILoC → rank search → discretize → fine-tune
        runner = _UnitRunner(model, config, calibration.seed)
        reports = reconstruct(
            model, reference, images, runner.plan_for, granularity="block", device=device,
            description="AIQViT",
        )
        del reference
        self._info = {
            "iters_per_unit": config.iters,
            "search_steps_per_unit": config.search_steps(config.iters) if runner.any_search else 0,
            "calibration_images": len(images),
            "reparameterized_pairs": len(reparam_pairs),
            "learnable_quantizer_parameters": learnable,
            "softmax_quantizer": config.softmax_quantizer,
            "ailoc": config.use_ailoc,
            "ailoc_form": config.ailoc_form,
            "rank_mode": config.rank_mode,
            "ranks": {layer["name"]: layer["rank"] for layer in runner.layers},
            "ailoc_layers": runner.layers,
            "ailoc_parameters": sum(layer["parameters"] for layer in runner.layers),
            "dfq_intervals": _dfq_intervals(model),
            "search": runner.searches,
            "units": [r.to_dict() for r in reports],
        }
        return model

    def run_info(self, model: CanonicalModel) -> dict[str, Any]:
        return dict(self._info)


# --------------------------------------------------------------------------------------------
# Quantizers
# --------------------------------------------------------------------------------------------


def _activation_quantizer(kind: InputKind, a_bits: int, per_channel: bool, config: AIQViTConfig) -> Quantizer | None:
    if kind is InputKind.IMAGE:
        bits = config.patch_embed_input_bits
        return None if bits is None else percentile_quantizer(bits, config.activation_percentiles)
    if kind is InputKind.POST_SOFTMAX:
        if config.softmax_quantizer == "dfq":
            return DynamicFocusingQuantizer(
                a_bits, below=config.dfq_below, granularity=config.dfq_granularity, init=config.dfq_init,
                quantile=config.dfq_quantile, lazy_init=True,
            )
        if config.softmax_quantizer in ("log2", "logsqrt2"):
            log_quantizer = Log2Quantizer if config.softmax_quantizer == "log2" else LogSqrt2Quantizer
            return log_quantizer(a_bits, percentiles=config.activation_percentiles, lazy_init=True)
    return percentile_quantizer(a_bits, config.activation_percentiles, per_channel=per_channel)


def _make_quantizers_learnable(model: CanonicalModel, learn: bool) -> int:
    """Step sizes → Parameters (when ``learn``); every quantizer Parameter frozen until trained."""
    count = 0
    for quantizer in iter_quantizers(model):
        if learn and isinstance(quantizer, (UniformQuantizer, LogSqrt2Quantizer)):
            quantizer.make_scale_learnable()
        for parameter in quantizer.parameters():
            parameter.requires_grad_(False)
            count += parameter.numel()
    return count


def _trainable_quantizer_params(unit: Unit, config: AIQViTConfig) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(step sizes, DFQ interval parameters) of the unit's quantizers."""
    steps: list[nn.Parameter] = []
    dfq: list[nn.Parameter] = []
    for quantizer in unit.quantizers():
        if isinstance(quantizer, DynamicFocusingQuantizer):
            dfq.extend(quantizer.parameters())
        elif config.learn_quant_params:
            steps.extend(quantizer.parameters())
    return steps, dfq




def _dfq_intervals(model: CanonicalModel) -> dict[str, list[list[float]]]:
    intervals = {}
    with torch.no_grad():
        for site in model.sites():
            for quantizer in site.module.quantizers():
                if isinstance(quantizer, DynamicFocusingQuantizer) and quantizer.initialized:
                    b1, b2 = quantizer.interval()
                    intervals[site.name] = [b1.tolist(), b2.tolist()]
    return intervals


# --------------------------------------------------------------------------------------------
# Units
# --------------------------------------------------------------------------------------------


class _Pool:
    """Rows one optimizer draws from: curriculum-ordered (easiest first) or uniform."""

    def __init__(self, rows: torch.Tensor, steps: int, config: AIQViTConfig) -> None:
        self.rows = rows
        self.order = rows
        self.curriculum = config.use_curriculum
        self._schedule = CurriculumSampler(config.curriculum_lambda0, config.curriculum_tau, iters=steps)

    def rank(self, losses: torch.Tensor) -> None:
        self.order = self.rows[losses[self.rows].argsort(stable=True)]

    def draw(self, step: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        if not self.curriculum:
            return self.order[torch.randperm(len(self.order), generator=generator)[:batch_size]]
        # the engine's CurriculumSampler, restricted to this pool's rows
        pool = max(1, math.ceil(self._schedule.fraction(step) * len(self.order)))
        chosen = torch.randperm(pool, generator=generator)[:batch_size]
        if len(chosen) < batch_size:
            chosen = torch.randint(pool, (batch_size,), generator=generator)
        return self.order[chosen]


class _UnitRunner:
    """Builds each unit's plan and runs its AILoC setup and rank search (the plan's ``before``)."""

    def __init__(self, model: CanonicalModel, config: AIQViTConfig, seed: int) -> None:
        assert config.iters is not None
        self.config = config
        self.seed = seed
        self.roles = {Role(r) for r in config.ailoc_roles}
        self.names = {id(site.module): site.name for site in model.sites()}
        self.layers: list[dict[str, Any]] = []
        self.searches: list[dict[str, Any]] = []
        self.any_search = False

    # -- plan --------------------------------------------------------------------------------

    def _ailoc_layers(self, unit: Unit) -> list[QuantLinear]:
        if not self.config.use_ailoc:
            return []
        return [m for m in unit.quant_modules() if isinstance(m, QuantLinear) and m.role in self.roles]

    def _candidates(self, layer: QuantLinear) -> tuple[int, ...]:
        wanted = self.config.rank_candidates if self.config.rank_mode == "auto" else (self.config.fixed_rank,)
        return candidate_ranks(wanted, layer.in_features, layer.out_features)

    def plan_for(self, unit: Unit) -> UnitPlan | None:
        config = self.config
        assert config.iters is not None
        layers = self._ailoc_layers(unit)
        steps, dfq = _trainable_quantizer_params(unit, config)
        if not layers and not steps and not dfq:
            return None
        searching = any(len(self._candidates(layer)) > 1 for layer in layers)
        search_steps = config.search_steps(config.iters) if searching else 0
        self.any_search = self.any_search or searching
        settings = UnitSettings(
            iters=config.iters - search_steps, batch_size=config.batch_size, input="quant", seed=self.seed
        )
        compensations: list[tuple[QuantLinear, LowRankCompensation]] = []

        def before(ctx: UnitContext) -> None:
            compensations.extend(self._attach(ctx, layers))
            if search_steps:
                self._search(ctx, compensations, steps, dfq, search_steps)
            for layer, compensation in compensations:
                searched = compensation.searching
                probabilities = compensation.probabilities().detach().cpu().tolist()
                candidates = list(compensation.ranks)
                rank = compensation.discretize(fold_mask=config.discretize_fold_mask)
                self.layers.append({
                    "name": self.names.get(id(layer), layer.role.value),
                    "role": layer.role.value,
                    "candidates": candidates,
                    "probabilities": [round(p, 6) for p in probabilities] if searched else None,
                    "rank": rank,
                    "parameters": compensation.A.numel() + compensation.B.numel(),
                })

        def param_groups(ctx: UnitContext) -> list[ParamGroup]:
            lowrank = [p for _, c in compensations for p in (c.A, c.B)]
            return [
                ParamGroup("lowrank", lowrank, config.lr_lowrank, "cosine"),
                ParamGroup("step_sizes", steps, config.lr_quant, "cosine"),
                ParamGroup("dfq_interval", dfq, config.lr_dfq, "cosine"),
            ]

        def after(ctx: UnitContext) -> None:
            if config.ailoc_form != "merged":
                return
            with torch.no_grad():  # deploy: W ← W₀ + B·A, the forward was Q_w(W₀ + B·A) already
                for layer, compensation in compensations:
                    layer.weight.add_(compensation.delta().to(layer.weight.dtype))
                    layer.set_compensation(None)

        sampler = (
            CurriculumSampler(config.curriculum_lambda0, config.curriculum_tau, config.curriculum_rerank_every)
            if config.use_curriculum
            else PermutationSampler()
        )
        return UnitPlan(settings=settings, param_groups=param_groups, sampler=sampler, before=before, after=after)

    # -- AILoC -------------------------------------------------------------------------------

    def _attach(self, ctx: UnitContext, layers: list[QuantLinear]) -> list[tuple[QuantLinear, LowRankCompensation]]:
        attached = []
        for position, layer in enumerate(layers):
            generator = torch.Generator().manual_seed((self.seed * 100_003 + ctx.unit.index) * 1_009 + position)
            compensation = LowRankCompensation(
                layer.in_features,
                layer.out_features,
                self._candidates(layer),
                form=self.config.ailoc_form,
                branch_bits=self.config.ailoc_branch_bits,
                generator=generator,
                device=layer.weight.device,
                dtype=layer.weight.dtype,
            )
            compensation.requires_grad_(False)
            layer.set_compensation(compensation)
            attached.append((layer, compensation))
        return attached

    # -- rank search -------------------------------------------------------------------------

    def _search(
        self,
        ctx: UnitContext,
        compensations: list[tuple[QuantLinear, LowRankCompensation]],
        step_sizes: list[nn.Parameter],
        dfq: list[nn.Parameter],
        iters: int,
    ) -> None:
        """First-order DARTS: alternate a weight step (A, B, quantizers) and a θ step."""
        config = self.config
        unit = ctx.unit
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(self.seed * 100_003 + unit.index + 500_009)
        rows = len(ctx.data)
        if config.search_split == "heldout" and rows >= 2:
            permutation = torch.randperm(rows, generator=generator)
            half = rows - rows // 2
            weight_pool = _Pool(permutation[:half], iters, config)
            arch_pool = _Pool(permutation[half:], iters, config)
        else:
            weight_pool = _Pool(torch.arange(rows), iters, config)
            arch_pool = _Pool(torch.arange(rows), iters, config)

        def rank_pools() -> None:
            losses = ctx.per_sample_loss()
            weight_pool.rank(losses)
            arch_pool.rank(losses)

        if config.use_curriculum:
            rank_pools()
        groups = [
            ([p for _, c in compensations for p in (c.A, c.B)], config.lr_lowrank),
            (step_sizes, config.lr_quant),
            (dfq, config.lr_dfq),
        ]
        groups = [(params, lr) for params, lr in groups if params]
        weights = [p for params, _ in groups for p in params]
        arch = [c.theta for _, c in compensations if c.theta is not None]
        penalized = [c for _, c in compensations if c.theta is not None]
        weight_opt = torch.optim.Adam([{"params": params, "lr": lr} for params, lr in groups])
        arch_opt = torch.optim.Adam(arch, lr=config.lr_arch)
        cosine: Callable[[int], float] = lambda step: schedule_factor("cosine", step, iters)  # noqa: E731
        weight_schedule = torch.optim.lr_scheduler.LambdaLR(weight_opt, cosine)
        arch_schedule = torch.optim.lr_scheduler.LambdaLR(arch_opt, cosine)

        def loss_on(pool: _Pool, step: int) -> torch.Tensor:
            batch = pool.draw(step, config.batch_size, generator)
            pred = unit(ctx.inputs(batch, generator))
            return unit_output_mse(ctx.unit, pred, ctx.data.targets.gather(batch, ctx.device))

        def trainable(params: list[nn.Parameter], flag: bool) -> None:
            for p in params:
                p.requires_grad_(flag)

        first: list[float] = []
        last: dict[str, float] = {}
        was_training = unit.owner.training
        unit.owner.train(ctx.settings.train_mode)
        try:
            for step in range(iters):
                every = config.curriculum_rerank_every
                if config.use_curriculum and every and step and step % every == 0:
                    rank_pools()
                # weights (A, B, step sizes, DFQ) on their split; θ fixed
                trainable(weights, True)
                loss = loss_on(weight_pool, step)
                weight_opt.zero_grad(set_to_none=True)
                loss.backward()
                weight_opt.step()
                weight_schedule.step()
                trainable(weights, False)
                # θ on its split; the weights fixed (no gradient computed for them)
                trainable(arch, True)
                arch_loss = loss_on(arch_pool, step)
                total = arch_loss
                if config.rank_penalty and penalized:
                    total = total + config.rank_penalty * torch.stack([c.expected_size() for c in penalized]).sum()
                arch_opt.zero_grad(set_to_none=True)
                total.backward()
                arch_opt.step()
                arch_schedule.step()
                trainable(arch, False)
                if not first:
                    first = [float(loss.detach()), float(arch_loss.detach())]
                last = {"weight_loss": float(loss.detach()), "arch_loss": float(arch_loss.detach())}
        finally:
            unit.owner.train(was_training)
            for p in weights + arch:
                p.requires_grad_(False)
                p.grad = None
        self.searches.append({
            "unit": unit.name,
            "steps": iters,
            "split": config.search_split if rows >= 2 else "same",
            "first_weight_loss": first[0] if first else None,
            "first_arch_loss": first[1] if first else None,
            "last_weight_loss": last.get("weight_loss"),
            "last_arch_loss": last.get("arch_loss"),
            "seconds": round(time.perf_counter() - started, 3),
        })


__all__ = ["AIQViT", "AIQViTConfig"]
