"""Reconstruction engine: optimise quantized units, one at a time, against the float model.

I&S-ViT, ADFQ-ViT and AIQViT all tune a quantized network unit by unit (a whole transformer
block, or its attention and MLP separately, plus single layers such as the patch embedding, the
head and Swin's ``reduction``) so that each unit's output matches the float model's. They differ
in what they train, the loss, the input the unit sees and how mini-batches are drawn; this module
holds what they share, and each method supplies a :class:`UnitPlan` per unit.

The pieces:

- :func:`build_units` lists the units of a canonical model in execution order. Calling it on the
  quantized model and on a deep copy of the float model gives two lists that correspond item by
  item (the copy has the same structure).
- :func:`capture_inputs` and :func:`compute_outputs` fill a :class:`UnitData` cache: the unit's
  input in the float model, its input in the quantized model (with every earlier unit already
  tuned) and the float unit's output (the target). Inputs are captured by running the model on
  chunks of images until the unit's entry point and stopping there, so memory is bounded by
  the chunk, and the cache is kept as :class:`ChunkedTensor` rows on a storage device (CPU when
  the GPU is short), from which each mini-batch is gathered.
- :func:`optimize_unit` runs the optimisation: per-parameter-group learning rates and schedules
  (one Adam over all groups, which is the same as one Adam per group), pluggable loss terms
  (:class:`OutputMSE`, :class:`AttentionKL`, :class:`RoundingRegularizer`), QDrop input mixing,
  and a sampler hook (:class:`PermutationSampler`, :class:`ReplacementSampler`,
  :class:`CurriculumSampler`). Everything random comes from one generator seeded per unit.
- :func:`reconstruct` walks the units in order and asks a method for each unit's plan.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from benchsuite.quant.canonical import CanonicalModel, Role
from benchsuite.quant.adaround import adaround_beta
from benchsuite.quant.modules import QuantConv2d, QuantModule
from benchsuite.quant.quantizers import Quantizer

__all__ = [
    "AttentionKL",
    "BatchSampler",
    "ChunkedTensor",
    "CurriculumSampler",
    "LossTerm",
    "OutputMSE",
    "ParamGroup",
    "PermutationSampler",
    "ReplacementSampler",
    "RoundingRegularizer",
    "StepState",
    "Unit",
    "UnitContext",
    "UnitData",
    "UnitPlan",
    "UnitReport",
    "UnitSettings",
    "build_units",
    "capture_inputs",
    "compute_outputs",
    "float_copy",
    "optimize_unit",
    "output_mse",
    "reconstruct",
    "roles_in",
    "schedule_factor",
    "unit_output_mse",
    "unit_parameters",
]

UnitKind = Literal["block", "attention", "mlp", "layer"]
Granularity = Literal["block", "module"]


# --------------------------------------------------------------------------------------------
# Units
# --------------------------------------------------------------------------------------------


@dataclass
class Unit:
    """One reconstruction unit of one model.

    ``owner`` holds the unit's parameters and quantizers; ``capture`` is the module at which the
    unit's input is read (its first positional input, or its output when ``capture_output``);
    ``call`` maps that input to the unit's output.
    """

    index: int
    name: str
    kind: UnitKind
    owner: nn.Module
    capture: nn.Module
    capture_output: bool
    call: Callable[[torch.Tensor], torch.Tensor]
    #: The output is (B, C, ...) (a conv): the loss sums over channels, not tokens.
    channels_first: bool = False
    #: Tokens per attention window (Swin): the loss sums over a window's tokens, not all of them.
    window_area: int | None = None
    #: False: calibrate only (see :attr:`benchsuite.quant.canonical.Site.tunable`).
    tunable: bool = True
    #: Positional inputs after the first, read at capture time and passed again on every call
    #: (mmdet's Swin blocks take ``hw_shape``); the same for every chunk of one calibration canvas.
    extra_args: tuple = ()

    def quant_modules(self) -> list[QuantModule]:
        """The fake-quant ops inside the unit, in module order."""
        return [m for m in self.owner.modules() if isinstance(m, QuantModule)]

    def quantizers(self) -> list[Quantizer]:
        """Every quantizer set on the unit's ops, each once."""
        seen: dict[int, Quantizer] = {}
        for module in self.quant_modules():
            for quantizer in module.quantizers():
                seen.setdefault(id(quantizer), quantizer)
        return list(seen.values())

    def softmax_modules(self) -> list[nn.Softmax]:
        """The attention softmaxes inside the unit (their outputs are the attention maps)."""
        return [m for m in self.owner.modules() if isinstance(m, nn.Softmax)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.call(x, *self.extra_args)


def build_units(model: CanonicalModel, granularity: Granularity = "block") -> list[Unit]:
    """The model's units in execution order.

    ``granularity="block"``: one unit per transformer block; ``"module"``: its attention and its
    MLP as two units. Ops outside blocks (patch embedding, head, Swin reduction, anything else an
    adapter exposes) are single-layer units, placed where they run.
    """
    if granularity not in ("block", "module"):
        raise ValueError(f"granularity must be 'block' or 'module', got {granularity!r}")
    blocks = {block.index: block for block in model.blocks()}
    units: list[Unit] = []
    emitted: set[int] = set()
    for site in model.sites():
        if site.block is None:
            module = site.module
            conv = isinstance(module, QuantConv2d)
            units.append(Unit(len(units), site.name, "layer", module, module, False, module, channels_first=conv,
                              tunable=site.tunable))
            continue
        if site.block in emitted:
            continue
        emitted.add(site.block)
        block = blocks[site.block]
        name = f"block{block.index}"
        if granularity == "block":
            units.append(Unit(len(units), name, "block", block.module, block.module, False, block.module))
            continue
        capture, capture_output = block.attention_entry or (block.attention, False)
        call = getattr(block.module, block.attention_call) if block.attention_call else block.attention
        # The window size may sit on a submodule (mmdet's ShiftWindowMSA wraps the window attention).
        window_area = next((m.window_area for m in block.attention.modules() if hasattr(m, "window_area")), None)
        units.append(
            Unit(len(units), f"{name}.attn", "attention", block.attention, capture, capture_output, call,
                 window_area=int(window_area) if window_area is not None else None)
        )
        units.append(Unit(len(units), f"{name}.mlp", "mlp", block.mlp, block.mlp, False, block.mlp))
    return units


def float_copy(model: CanonicalModel) -> CanonicalModel:
    """A frozen deep copy of ``model`` with every quantizer disabled: the reconstruction target.

    Taken before a method edits weights; the copy's sites, blocks and units mirror the original's.
    """
    clone = copy.deepcopy(model)
    for module in clone.modules():
        if isinstance(module, Quantizer):
            module.enabled = False
    for parameter in clone.parameters():
        parameter.requires_grad_(False)
    return clone.eval()


# --------------------------------------------------------------------------------------------
# Cached unit data
# --------------------------------------------------------------------------------------------


class ChunkedTensor:
    """Rows of one large tensor kept as a list of chunks (e.g. 64 images each).

    A single tensor of 1024 ViT-B block inputs is 620 MB, and the engine keeps two of those plus
    targets; chunks can live on the CPU while training runs on the GPU, and mini-batches are
    gathered row by row from them.
    """

    def __init__(self, chunks: Sequence[torch.Tensor]) -> None:
        if not chunks:
            raise ValueError("a ChunkedTensor needs at least one chunk")
        tail = chunks[0].shape[1:]
        if any(chunk.shape[1:] != tail for chunk in chunks):
            raise ValueError("chunks must agree in every dim but the first")
        self.chunks = list(chunks)
        sizes = torch.tensor([len(chunk) for chunk in self.chunks])
        self._starts = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor, chunk_size: int) -> ChunkedTensor:
        return cls(list(tensor.split(chunk_size)))

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.chunks[0].shape[1:])

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.chunks)

    def gather(self, rows: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """The rows ``rows`` (any order, repeats allowed) stacked on ``device``."""
        rows = rows.to("cpu", torch.long)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        which = torch.searchsorted(self._starts, rows, right=True) - 1
        device = device if device is not None else self.chunks[0].device
        out = torch.empty((len(rows), *self.shape[1:]), dtype=self.chunks[0].dtype, device=device)
        for chunk_index in which.unique().tolist():
            positions = (which == chunk_index).nonzero().squeeze(1)
            local = rows[positions] - self._starts[chunk_index]
            chunk = self.chunks[chunk_index]
            out[positions.to(device)] = chunk[local.to(chunk.device)].to(device)
        return out

    def full(self, device: torch.device | str | None = None) -> torch.Tensor:
        """All rows as one tensor (for small caches and tests)."""
        return torch.cat([chunk.to(device) if device is not None else chunk for chunk in self.chunks])


@dataclass
class UnitData:
    """What one unit trains on: float-model inputs, quantized-model inputs, float targets."""

    #: None for a unit that is only calibrated (``Unit.tunable`` False).
    targets: ChunkedTensor | None
    float_inputs: ChunkedTensor | None = None
    quant_inputs: ChunkedTensor | None = None

    def __len__(self) -> int:
        return len(_need(self.targets, "float targets"))


class _StopForward(Exception):
    """Raised by a capture hook once the unit's input is recorded: nothing after it is needed."""


def capture_inputs(
    model: nn.Module,
    unit: Unit,
    images: ChunkedTensor,
    *,
    device: torch.device | str,
    storage: torch.device | str = "cpu",
) -> ChunkedTensor:
    """The unit's input for every image, computed chunk by chunk with ``model`` (no grad).

    The forward stops at the unit's entry, so capturing unit k costs the model's first k units.
    Quantizers upstream behave as they are set (a method calibrates them before capturing).
    Further positional inputs of the unit (``hw_shape``) are stored on ``unit.extra_args``; they
    must not change from chunk to chunk.
    """
    captured: list[torch.Tensor] = []
    extras: list[tuple] = []

    def keep(value: object, extra: tuple = ()) -> None:
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"unit {unit.name}: captured input is {type(value).__name__}, not a tensor")
        if any(isinstance(arg, torch.Tensor) for arg in extra):
            raise TypeError(f"unit {unit.name}: takes a second tensor input, which the cache cannot hold")
        captured.append(value.detach().to(storage))
        extras.append(extra)
        raise _StopForward

    # Reading an input stops *before* the module runs (its lazy quantizers stay untouched).
    if unit.capture_output:
        handle = unit.capture.register_forward_hook(lambda _m, _args, output: keep(output))
    else:
        handle = unit.capture.register_forward_pre_hook(lambda _m, args: keep(args[0], tuple(args[1:])))
    try:
        with torch.no_grad():
            for chunk in images:
                before = len(captured)
                try:
                    model(chunk.to(device))
                except _StopForward:
                    pass
                if len(captured) != before + 1:
                    raise RuntimeError(f"the forward pass never reached unit {unit.name}")
    finally:
        handle.remove()
    if any(extra != extras[0] for extra in extras):
        raise ValueError(f"unit {unit.name}: its extra inputs differ between chunks ({extras[0]} vs others); "
                         "calibrate on one canvas size")
    unit.extra_args = extras[0] if extras else ()
    return ChunkedTensor(captured)


def compute_outputs(
    unit: Unit, inputs: ChunkedTensor, *, device: torch.device | str, storage: torch.device | str = "cpu"
) -> ChunkedTensor:
    """``unit(x)`` for every cached input row, chunk by chunk, without gradients."""
    with torch.no_grad():
        return ChunkedTensor([unit(chunk.to(device)).detach().to(storage) for chunk in inputs])


# --------------------------------------------------------------------------------------------
# Optimisation settings, parameter groups, samplers, loss terms
# --------------------------------------------------------------------------------------------

InputMode = Literal["float", "quant", "qdrop"]
Schedule = Literal["constant", "cosine"]


@dataclass(frozen=True)
class UnitSettings:
    """How one unit is optimised.

    ``input``: the unit sees its float-model input (``float``: units tuned independently, I&S-ViT
    stage 1), its quantized-model input (``quant``) or QDrop's element-wise mix of both
    (``qdrop``): ``x = where(U < qdrop_prob, x_quant, x_float)`` with ``U ~ Uniform(0, 1)`` drawn
    per element and step (ADFQ-ViT's convention; ``qdrop_prob = 1`` means quantized input only).
    ``append_quant_half``: run the unit on ``cat(x, x_quant)`` and compute the loss on the first
    half only, as ADFQ-ViT's reference does (it matters when a quantizer reduces over the batch,
    e.g. a dynamic minimum).
    """

    iters: int
    batch_size: int
    input: InputMode = "quant"
    qdrop_prob: float = 0.5
    append_quant_half: bool = False
    seed: int = 0
    #: Put the unit in train mode while optimising (dropout/drop-path are 0 in these models).
    train_mode: bool = True

    def __post_init__(self) -> None:
        if self.iters < 0 or self.batch_size < 1:
            raise ValueError(f"iters must be >= 0 and batch_size >= 1, got {self.iters}, {self.batch_size}")
        if self.input not in ("float", "quant", "qdrop"):
            raise ValueError(f"input must be float, quant or qdrop, got {self.input!r}")
        if not 0.0 <= self.qdrop_prob <= 1.0:
            raise ValueError(f"qdrop_prob must be in [0, 1], got {self.qdrop_prob}")


@dataclass
class ParamGroup:
    """Parameters sharing a learning rate and schedule (``cosine``: to 0 over the iterations)."""

    name: str
    params: list[nn.Parameter]
    lr: float
    schedule: Schedule = "constant"

    def __post_init__(self) -> None:
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be constant or cosine, got {self.schedule!r}")


def schedule_factor(schedule: Schedule, step: int, iters: int) -> float:
    """Multiplier of a group's lr at ``step`` (cosine annealing to 0 at ``iters``, as PyTorch's)."""
    if schedule == "constant" or iters <= 0:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(step, iters) / iters))


@dataclass
class StepState:
    """What a loss term sees at one step.

    ``quant_maps`` are the unit's attention maps (softmax outputs) in this forward, restricted to
    the loss half of the batch; ``float_maps()`` runs the float unit on the same rows' float input
    to produce the matching float maps (computed on demand and once per step).
    """

    unit: Unit
    step: int
    iters: int
    pred: torch.Tensor
    target: torch.Tensor
    quant_maps: list[torch.Tensor]
    _float_maps: Callable[[], list[torch.Tensor]]
    _float_cache: list[torch.Tensor] | None = None

    def float_maps(self) -> list[torch.Tensor]:
        if self._float_cache is None:
            self._float_cache = self._float_maps()
        return self._float_cache


class LossTerm(Protocol):
    """One additive term of a unit's loss; ``None`` means "not active at this step"."""

    name: str

    def __call__(self, state: StepState) -> torch.Tensor | None: ...


def output_mse(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    channels_first: bool = False,
    window_area: int | None = None,
    per_sample: bool = False,
) -> torch.Tensor:
    """Squared error summed over tokens, averaged over batch and channels.

    The loss of the BRECQ code lineage that I&S-ViT and ADFQ-ViT inherit (``sum(dim=1).mean()``
    on ``(B, N, C)`` block outputs, ``(B, K)`` logits or ``(B, C, H, W)`` conv outputs), written for
    the layouts timm 1.x produces: a channels-last ``(B, H, W, C)`` output (Swin blocks and
    reductions) has ``H·W`` tokens, as the reference's ``(B, L, C)`` had; ``window_area`` (Swin
    window attention) sums over the tokens of one window and averages over windows, as the
    reference reconstructs window attention on ``(B·windows, N, C)``; ``channels_first`` (a conv's
    output) sums over channels. ``per_sample`` returns one value per batch row.
    """
    error = (pred - target).pow(2)
    if error.ndim == 1:
        return error if per_sample else error.mean()
    if channels_first or error.ndim == 2:
        summed = error.sum(dim=1)
        return summed.reshape(len(summed), -1).mean(dim=1) if per_sample else summed.mean()
    tokens = window_area if window_area is not None else math.prod(error.shape[1:-1])
    if per_sample:
        return error.flatten(1).mean(dim=1) * tokens
    return error.mean() * tokens


def unit_output_mse(unit: Unit, pred: torch.Tensor, target: torch.Tensor, *, per_sample: bool = False) -> torch.Tensor:
    """:func:`output_mse` with the unit's own output layout."""
    return output_mse(pred, target, channels_first=unit.channels_first, window_area=unit.window_area,
                      per_sample=per_sample)


@dataclass
class OutputMSE:
    """The unit output's :func:`output_mse` against the float target."""

    weight: float = 1.0
    name: str = "output_mse"

    def __call__(self, state: StepState) -> torch.Tensor:
        return self.weight * unit_output_mse(state.unit, state.pred, state.target)


@dataclass
class AttentionKL:
    """ADFQ-ViT's attention-score term on post-softmax maps shaped ``(B, H, N, N)``.

    ``weight · KL_batchmean(P_quant ‖ P_float)`` with ``P = softmax(A / T)`` over ``axis``:
    ``heads`` (dim 1, the reference code's choice) or ``keys`` (the last dim). As in the
    reference, the float map enters as ``log_softmax`` (the "input" of ``F.kl_div``) and the
    quantized map as the target distribution, and "batchmean" divides by the first dim.
    """

    temperature: float = 4.0
    weight: float = 10.0
    axis: Literal["heads", "keys"] = "heads"
    name: str = "attention_kl"

    def __call__(self, state: StepState) -> torch.Tensor | None:
        if not state.quant_maps:
            return None
        dim = 1 if self.axis == "heads" else -1
        total = state.pred.new_zeros(())
        for quant, float_ in zip(state.quant_maps, state.float_maps()):
            log_p_float = F.log_softmax(float_ / self.temperature, dim=dim)
            p_quant = F.softmax(quant / self.temperature, dim=dim)
            total = total + F.kl_div(log_p_float, p_quant, reduction="batchmean")
        return self.weight * total


class _Regularized(Protocol):
    def regularizer(self, beta: float) -> torch.Tensor: ...


@dataclass
class RoundingRegularizer:
    """AdaRound's rounding regulariser, summed over every quantizer of the unit that has one.

    Off during the first ``warmup`` fraction of the iterations; then β decays linearly from
    ``beta_start`` to ``beta_end`` (BRECQ's schedule), pushing the soft rounding to 0 or 1.
    """

    weight: float = 0.01
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    name: str = "rounding"

    def beta(self, step: int, iters: int) -> float | None:
        """β at 0-based ``step``, counted as the reference's ``LinearTempDecay`` counts."""
        return adaround_beta(step, max(1, iters), self.warmup, self.beta_start, self.beta_end)

    def __call__(self, state: StepState) -> torch.Tensor | None:
        beta = self.beta(state.step, state.iters)
        if beta is None:
            return None
        terms = [q.regularizer(beta) for q in state.unit.quantizers() if callable(getattr(q, "regularizer", None))]
        if not terms:
            return None
        return self.weight * torch.stack(terms).sum()


class BatchSampler(Protocol):
    """Chooses the cached rows of each mini-batch (a hook for e.g. curriculum ordering)."""

    def prepare(self, context: UnitContext) -> None: ...

    def indices(self, step: int, batch_size: int, generator: torch.Generator) -> torch.Tensor: ...


@dataclass
class PermutationSampler:
    """A fresh random permutation each step, first ``batch_size`` rows (no repeats in a batch)."""

    rows: int = 0

    def prepare(self, context: UnitContext) -> None:
        self.rows = len(context.data)

    def indices(self, step: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randperm(self.rows, generator=generator)[:batch_size]


@dataclass
class ReplacementSampler:
    """Rows drawn uniformly with replacement (the BRECQ/QDrop code's ``randint``)."""

    rows: int = 0

    def prepare(self, context: UnitContext) -> None:
        self.rows = len(context.data)

    def indices(self, step: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(self.rows, (batch_size,), generator=generator)


@dataclass
class CurriculumSampler:
    """Easy samples first: rank rows by their loss through the initial quantized unit.

    At step ``t`` of ``T`` the batch is drawn uniformly from the ``ceil(λ(t) · rows)`` easiest
    rows, ``λ(t) = min(1, λ₀ + (1 − λ₀) · t / (τ · T))`` (AIQViT's curriculum, in the form of
    benchsuite's proposal: the paper gives the idea, not the constants). ``rerank_every`` > 0
    recomputes the ranking every that many steps.
    """

    lambda0: float = 0.3
    tau: float = 0.8
    rerank_every: int = 0
    order: torch.Tensor | None = None
    iters: int = 1
    _context: UnitContext | None = None

    def prepare(self, context: UnitContext) -> None:
        self._context = context
        self.iters = context.settings.iters
        self.order = context.per_sample_loss().argsort(stable=True)

    def fraction(self, step: int) -> float:
        ramp = self.tau * max(1, self.iters)
        return min(1.0, self.lambda0 + (1.0 - self.lambda0) * step / ramp)

    def indices(self, step: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        assert self.order is not None and self._context is not None, "prepare() was not called"
        if self.rerank_every and step and step % self.rerank_every == 0:
            self.order = self._context.per_sample_loss().argsort(stable=True)
        pool = max(1, math.ceil(self.fraction(step) * len(self.order)))
        chosen = torch.randperm(pool, generator=generator)[:batch_size]
        if len(chosen) < batch_size:  # a pool smaller than a batch: fill with repeats
            chosen = torch.randint(pool, (batch_size,), generator=generator)
        return self.order[chosen]


# --------------------------------------------------------------------------------------------
# One unit
# --------------------------------------------------------------------------------------------


@dataclass
class UnitContext:
    """A unit, its float twin, its cached data and settings: what plans and hooks work with."""

    unit: Unit
    float_unit: Unit
    data: UnitData
    settings: UnitSettings
    device: torch.device

    def inputs(self, rows: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The unit's input rows under the settings' input mode (QDrop mixing drawn from ``generator``)."""
        mode = self.settings.input
        if mode == "float":
            return _need(self.data.float_inputs, "float inputs").gather(rows, self.device)
        quant = _need(self.data.quant_inputs, "quantized inputs").gather(rows, self.device)
        if mode == "quant" or self.settings.qdrop_prob >= 1.0:
            return quant
        float_ = _need(self.data.float_inputs, "float inputs").gather(rows, self.device)
        if self.settings.qdrop_prob <= 0.0:
            return float_
        noise = torch.rand(quant.shape, generator=generator, device="cpu").to(self.device)
        return torch.where(noise < self.settings.qdrop_prob, quant, float_)

    def per_sample_loss(self, chunk_size: int = 64) -> torch.Tensor:
        """Each row's :func:`output_mse` through the unit as it is now (no grad; quantized input,
        or float input when the unit trains on float input)."""
        source = self.data.float_inputs if self.settings.input == "float" else self.data.quant_inputs
        source = _need(source, "inputs")
        losses = []
        with torch.no_grad():
            for start in range(0, len(self.data), chunk_size):
                rows = torch.arange(start, min(start + chunk_size, len(self.data)))
                pred = self.unit(source.gather(rows, self.device))
                target = self.data.targets.gather(rows, self.device)
                losses.append(unit_output_mse(self.unit, pred, target, per_sample=True).cpu())
        return torch.cat(losses)


def _need(value: ChunkedTensor | None, what: str) -> ChunkedTensor:
    if value is None:
        raise RuntimeError(f"the unit cache has no {what}; the plan's input mode needs them")
    return value


@dataclass
class UnitPlan:
    """A method's instructions for one unit.

    ``param_groups`` is called after ``before`` (so a hook may create the parameters it trains,
    e.g. AdaRound variables); ``after`` runs when optimisation ends (e.g. to harden rounding).
    """

    settings: UnitSettings
    param_groups: Callable[[UnitContext], list[ParamGroup]]
    losses: Sequence[LossTerm] = (OutputMSE(),)
    sampler: BatchSampler | None = None
    before: Callable[[UnitContext], None] | None = None
    after: Callable[[UnitContext], None] | None = None
    need_float_inputs: bool | None = None
    need_quant_inputs: bool | None = None

    def needs(self) -> tuple[bool, bool]:
        """(float inputs, quantized inputs) the cache must hold."""
        mode = self.settings.input
        need_float = mode in ("float", "qdrop") or any(isinstance(t, AttentionKL) for t in self.losses)
        need_quant = mode in ("quant", "qdrop")
        if self.need_float_inputs is not None:
            need_float = self.need_float_inputs
        if self.need_quant_inputs is not None:
            need_quant = self.need_quant_inputs
        return need_float, need_quant


@dataclass
class UnitReport:
    """What happened to one unit (stored in the method's run info)."""

    name: str
    kind: str
    iters: int
    trained_parameters: int
    first_loss: float | None
    last_loss: float | None
    seconds: float
    loss_terms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "kind": self.kind,
            "iters": self.iters,
            "trained_parameters": self.trained_parameters,
            "first_loss": self.first_loss,
            "last_loss": self.last_loss,
            "seconds": round(self.seconds, 3),
            "last_loss_terms": self.loss_terms,
        }


class _MapRecorder:
    """Records the outputs of the given softmax modules during a forward."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.maps: list[torch.Tensor] = []
        self._handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, _module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
        self.maps.append(output)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def optimize_unit(
    context: UnitContext,
    plan: UnitPlan,
    *,
    progress: Callable[[int], None] | None = None,
) -> UnitReport:
    """Optimise one unit by ``plan``; returns its report. The unit's modules are edited in place."""
    settings = plan.settings
    unit = context.unit
    # One stream per unit: units draw different batches, and a rerun draws the same ones.
    generator = torch.Generator().manual_seed(settings.seed * 100_003 + unit.index)
    groups = [g for g in plan.param_groups(context) if g.params]
    params = [p for g in groups for p in g.params]
    if len({id(p) for p in params}) != len(params):
        raise ValueError(f"unit {unit.name}: a parameter appears in two groups")
    sampler = plan.sampler if plan.sampler is not None else PermutationSampler()
    sampler.prepare(context)
    wants_maps = any(isinstance(term, AttentionKL) for term in plan.losses)
    started = time.perf_counter()
    first_loss: float | None = None
    last_loss: float | None = None
    last_terms: dict[str, float] = {}
    if not params or settings.iters == 0:
        return UnitReport(unit.name, unit.kind, 0, 0, None, None, time.perf_counter() - started)

    trained = {id(p) for p in params}
    # Everything else in the unit is frozen while it trains (no stray .grad on norms, biases...).
    frozen = [p for p in unit.owner.parameters() if id(p) not in trained and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam([{"params": g.params, "lr": g.lr} for g in groups])
    schedules = [g.schedule for g in groups]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [lambda step, s=s: schedule_factor(s, step, settings.iters) for s in schedules]
    )
    was_training = unit.owner.training
    unit.owner.train(settings.train_mode)
    recorder = _MapRecorder(unit.softmax_modules()) if wants_maps else None
    try:
        for step in range(settings.iters):
            rows = sampler.indices(step, settings.batch_size, generator)
            x = context.inputs(rows, generator)
            target = context.data.targets.gather(rows, context.device)
            batch = len(rows)
            if settings.append_quant_half:
                x = torch.cat([x, _need(context.data.quant_inputs, "quantized inputs").gather(rows, context.device)])
            if recorder is not None:
                recorder.maps.clear()
            out = unit(x)
            pred = out[:batch] if settings.append_quant_half else out
            quant_maps = []
            if recorder is not None:
                quant_maps = [m[: m.shape[0] // 2] if settings.append_quant_half else m for m in recorder.maps]
            state = StepState(
                unit,
                step,
                settings.iters,
                pred,
                target,
                quant_maps,
                lambda rows=rows: _float_maps(context, rows),
            )
            total = pred.new_zeros(())
            terms: dict[str, float] = {}
            for term in plan.losses:
                value = term(state)
                if value is not None:
                    total = total + value
                    terms[term.name] = float(value.detach())
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            scheduler.step()
            loss_value = float(total.detach())
            if first_loss is None:
                first_loss = loss_value
            last_loss, last_terms = loss_value, terms
            if progress is not None:
                progress(1)
    finally:
        if recorder is not None:
            recorder.close()
        unit.owner.train(was_training)
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for p in frozen:
            p.requires_grad_(True)
    return UnitReport(
        unit.name,
        unit.kind,
        settings.iters,
        sum(p.numel() for p in params),
        first_loss,
        last_loss,
        time.perf_counter() - started,
        last_terms,
    )


def _float_maps(context: UnitContext, rows: torch.Tensor) -> list[torch.Tensor]:
    """Attention maps of the float unit on the rows' float inputs (the AttentionKL targets)."""
    recorder = _MapRecorder(context.float_unit.softmax_modules())
    try:
        with torch.no_grad():
            context.float_unit(_need(context.data.float_inputs, "float inputs").gather(rows, context.device))
        return [m.detach() for m in recorder.maps]
    finally:
        recorder.close()


# --------------------------------------------------------------------------------------------
# The whole model
# --------------------------------------------------------------------------------------------


def reconstruct(
    model: CanonicalModel,
    float_model: CanonicalModel,
    images: torch.Tensor | ChunkedTensor,
    plan_for: Callable[[Unit], UnitPlan | None],
    *,
    granularity: Granularity = "block",
    device: torch.device | str = "cpu",
    storage: torch.device | str = "cpu",
    chunk_size: int = 64,
    progress: bool = False,
    description: str = "reconstruction",
) -> list[UnitReport]:
    """Reconstruct every unit of ``model`` in execution order against ``float_model``.

    ``plan_for(unit)`` returns the unit's plan, or None to leave it as it is. Each unit's cache
    is built just before it is optimised, so quantized inputs include every earlier unit's
    tuning, and freed after.
    """
    device = torch.device(device)
    if isinstance(images, torch.Tensor):
        images = ChunkedTensor.from_tensor(images, chunk_size)
    units = build_units(model, granularity)
    float_units = build_units(float_model, granularity)
    if [(u.name, u.kind) for u in units] != [(u.name, u.kind) for u in float_units]:
        raise ValueError("the float model's units do not match the quantized model's")
    plans = [(u, f, plan_for(u)) for u, f in zip(units, float_units)]
    total_steps = sum(p.settings.iters for u, _, p in plans if p is not None and u.tunable)
    reports: list[UnitReport] = []
    with _progress_bar(progress, description, total_steps) as advance:
        for unit, float_unit, plan in plans:
            if plan is None:
                continue
            if not unit.tunable:
                reports.append(_calibrate_only(model, unit, float_unit, images, plan, device, storage))
                continue
            need_float, need_quant = plan.needs()
            float_inputs = capture_inputs(float_model, float_unit, images, device=device, storage=storage)
            unit.extra_args = float_unit.extra_args  # the same canvas gives the same extra inputs
            data = UnitData(
                targets=compute_outputs(float_unit, float_inputs, device=device, storage=storage),
                float_inputs=float_inputs if need_float else None,
                quant_inputs=capture_inputs(model, unit, images, device=device, storage=storage) if need_quant else None,
            )
            context = UnitContext(unit, float_unit, data, plan.settings, device)
            if plan.before is not None:
                plan.before(context)
            report = optimize_unit(context, plan, progress=advance)
            if plan.after is not None:
                plan.after(context)
            reports.append(report)
            del data, context
    return reports


def _calibrate_only(
    model: CanonicalModel,
    unit: Unit,
    float_unit: Unit,
    images: ChunkedTensor,
    plan: UnitPlan,
    device: torch.device,
    storage: torch.device | str,
) -> UnitReport:
    """Run a plan's ``before`` and ``after`` on a non-tunable unit, with no optimisation step.

    The hooks see the unit's quantized-model inputs only (for initialising its quantizers);
    there are no float targets, since the unit's input rows have no float counterpart.
    """
    start = time.perf_counter()
    if plan.before is not None or plan.after is not None:
        data = UnitData(targets=None, quant_inputs=capture_inputs(model, unit, images, device=device, storage=storage))
        context = UnitContext(unit, float_unit, data, plan.settings, device)
        if plan.before is not None:
            plan.before(context)
        if plan.after is not None:
            plan.after(context)
    return UnitReport(unit.name, unit.kind, 0, 0, None, None, time.perf_counter() - start,
                      {"calibration_only": 1.0})


class _progress_bar:
    """A rich progress bar over optimisation steps, or a no-op."""

    def __init__(self, enabled: bool, description: str, total: int) -> None:
        self.enabled = enabled and total > 0
        self.description = description
        self.total = total
        self._progress = None

    def __enter__(self) -> Callable[[int], None] | None:
        if not self.enabled:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        self._progress = Progress(
            "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
        )
        self._progress.__enter__()
        task = self._progress.add_task(self.description, total=self.total)
        return lambda n: self._progress.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


def unit_parameters(unit: Unit, *, weights: bool = True, biases: bool = True, extra: Sequence[str] = ()) -> list[nn.Parameter]:
    """Weights and/or biases of the unit's quantized ops, plus parameters named in ``extra``.

    ``extra`` names parameters by attribute (e.g. ``relative_position_bias_table``) anywhere in
    the unit: I&S-ViT trains Swin's bias table along with the weights.
    """
    params: list[nn.Parameter] = []
    seen: set[int] = set()

    def add(p: object) -> None:
        if isinstance(p, nn.Parameter) and id(p) not in seen:
            seen.add(id(p))
            params.append(p)

    for module in unit.quant_modules():
        if weights and module.has_weight:
            add(getattr(module, "weight"))
        if biases:
            add(getattr(module, "bias", None))
    for module in unit.owner.modules():
        for name in extra:
            add(getattr(module, name, None))
    return params


def roles_in(unit: Unit) -> set[Role]:
    """Roles of the unit's ops (a plan may treat e.g. the head differently)."""
    return {module.role for module in unit.quant_modules()}
