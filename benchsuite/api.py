"""The public plugin surface: what a task and a method provide, and what a cell is.

A third-party package implements :class:`Task` or :class:`Method` and registers the class in the
``benchsuite.tasks`` or ``benchsuite.methods`` entry-point group. Nothing else in benchsuite is
needed to take part in a run. Methods never look at layer names: they receive a
:class:`~benchsuite.quant.canonical.CanonicalModel` whose sites carry roles and input kinds.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from benchsuite.bits import BitSpec
from benchsuite.config import MethodConfig, TaskConfig
from benchsuite.errors import BitSpecError, BenchsuiteError, UnknownNameError

if TYPE_CHECKING:  # torch stays out of the import path of `benchsuite list`
    import torch
    from torch import nn

    from benchsuite.quant.canonical import CanonicalModel

__all__ = [
    "BitSpec",
    "CalibrationSet",
    "Cell",
    "Evaluation",
    "Method",
    "MethodConfig",
    "TaskConfig",
    "ModelSpec",
    "Task",
    "TaskInfo",
    "TaskOptions",
]


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskInfo:
    """What a task measures; the leaderboard reads ``main_metric`` and ``higher_is_better``."""

    modality: str
    metrics: tuple[str, ...]
    main_metric: str
    higher_is_better: bool = True
    default_calib_size: int = 32
    description: str = ""
    #: Part of `benchsuite run` with no arguments (needs no data root, runs in minutes on a CPU).
    demo: bool = False
    #: Why a task that needs no download is still not in the demo (shown by `benchsuite list`).
    not_in_demo: str = ""


@dataclass(frozen=True)
class ModelSpec:
    """A model a task offers under a short (paper) name."""

    name: str
    source: str
    family: str
    description: str = ""


@dataclass(frozen=True)
class TaskOptions:
    """Per-run inputs a task needs from the user: where its data and weights are."""

    data_root: Path | None = None
    weights: Path | None = None
    device: str = "cpu"
    eval_batch_size: int = 64
    #: Evaluate on at most this many samples (None = the full evaluation split).
    eval_limit: int | None = None


@dataclass
class CalibrationSet:
    """Seeded calibration inputs plus the manifest that identifies them.

    ``batches`` are ready to feed to the model (``model(batch)``). The sample ids and their hash
    go into every result, so two results can be checked for having seen the same images.
    """

    batches: list[Any]
    sample_ids: tuple[str, ...]
    source: str
    seed: int
    #: sha256 of the whole population the sample was drawn from (e.g. the sorted file list).
    population_hash: str | None = None

    def __iter__(self) -> Iterator[Any]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.sample_ids)

    @classmethod
    def from_tensor(
        cls,
        inputs: torch.Tensor,
        sample_ids: Sequence[str],
        source: str,
        seed: int,
        batch_size: int = 32,
        population_hash: str | None = None,
    ) -> CalibrationSet:
        batches = [inputs[i : i + batch_size] for i in range(0, len(inputs), batch_size)]
        return cls(batches, tuple(sample_ids), source, seed, population_hash)

    def manifest(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "seed": self.seed,
            "size": len(self.sample_ids),
            "sample_ids": list(self.sample_ids),
            "sample_ids_sha256": sha256_of(self.sample_ids),
            "population_sha256": self.population_hash,
        }


def overrides_hash(overrides: Sequence[tuple[str, str]]) -> str:
    """Eight hex digits naming a set of ``FIELD=VALUE`` overrides in a file name."""
    return sha256_of([f"{k}={v}" for k, v in overrides])[:8]


def sha256_of(items: Sequence[str]) -> str:
    """Stable hash of a list of strings (order matters)."""
    return hashlib.sha256(json.dumps(list(items)).encode()).hexdigest()


@dataclass
class Evaluation:
    """A task's verdict on a model: metrics, plus raw outputs for comparison with float.

    ``outputs`` is task-specific (logits for classification); the runner keeps the float model's
    outputs and passes them back as ``reference`` so tasks can report agreement and divergence.
    """

    metrics: dict[str, float]
    outputs: Any = None
    details: dict[str, Any] = field(default_factory=dict)


class Task(ABC):
    """A dataset, the models evaluated on it and its metric."""

    name: ClassVar[str]
    info: ClassVar[TaskInfo]
    #: The task's result-changing options (``--task-option TASK.FIELD=VALUE``); none by default.
    config_class: ClassVar[type[TaskConfig]] = TaskConfig

    def __init__(self, options: TaskOptions | None = None, config: TaskConfig | None = None) -> None:
        self.options = options or TaskOptions()
        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, self.config_class):
            raise TypeError(f"task {self.name!r} takes a {self.config_class.__name__}, got {type(self.config).__name__}")

    def float_variant(self) -> tuple[tuple[str, str], ...]:
        """The overrides of this task's config that change the float model or its evaluation."""
        default = self.config_class()
        return tuple(
            (name, str(getattr(self.config, name)))
            for name in sorted(self.config_class.FLOAT_FIELDS)
            if getattr(self.config, name) != getattr(default, name)
        )

    @classmethod
    @abstractmethod
    def models(cls) -> Mapping[str, ModelSpec]:
        """Models offered by short name, in leaderboard order."""

    @classmethod
    def default_models(cls) -> list[str]:
        """Models run when the user names none: the first offered."""
        return [next(iter(cls.models()))]

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this task cannot run here (a missing optional dependency), or None."""
        return None

    def validate(self) -> None:
        """Check the data root and weights before any cell runs; raise DataError if wrong."""

    def resolve_model(self, name: str) -> ModelSpec:
        """The spec for a model name; subclasses may accept names outside :meth:`models`."""
        offered = self.models()
        if name in offered:
            return offered[name]
        from benchsuite.registry import suggestion

        raise UnknownNameError(
            f"task {self.name!r} has no model {name!r}{suggestion(name, offered)}; "
            f"models: {', '.join(offered)}"
        )

    @abstractmethod
    def build_model(self, model: str) -> nn.Module:
        """The float model with its weights, in eval mode, on ``options.device``."""

    @abstractmethod
    def calibration_set(self, model: str, size: int, seed: int) -> CalibrationSet:
        """``size`` training samples drawn with ``seed``, preprocessed as at evaluation."""

    @abstractmethod
    def evaluate(self, model: nn.Module, model_name: str, reference: Evaluation | None = None) -> Evaluation:
        """Run the evaluation split; ``reference`` is the float model's evaluation, if known."""

    def adapt(self, model: nn.Module) -> CanonicalModel:
        """Rewrite ``model`` into canonical sites; the default finds the adapter by model type."""
        from benchsuite.quant.adapters import adapt

        return adapt(model)

    def data_manifest(self, model: str) -> dict[str, Any]:
        """What identifies the data and preprocessing of a result (paths, transforms, sizes)."""
        return {}


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------


class Method(ABC):
    """A post-training quantization method."""

    name: ClassVar[str]
    #: Citation of the paper the method follows ("" for benchsuite's own floors).
    paper: ClassVar[str] = ""
    description: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    #: False for the float reference: it runs once per (task, model), not per bit setting.
    quantizes: ClassVar[bool] = True
    #: How closely this implementation follows the paper / reference code, stated plainly.
    fidelity: ClassVar[str] = ""

    def default_config(self) -> MethodConfig:
        return self.config_class()

    @abstractmethod
    def quantize(
        self,
        model: CanonicalModel,
        calibration: CalibrationSet,
        bits: BitSpec,
        config: MethodConfig,
    ) -> nn.Module:
        """Quantize ``model`` (already adapted) and return the module to evaluate."""

    def run_info(self, model: CanonicalModel) -> dict[str, Any]:
        """Extra facts a method wants recorded after quantizing (e.g. outlier ratios)."""
        return {}


# --------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One point of the cross product; everything needed to run it is in here."""

    task: str
    model: str
    method: str
    bits: BitSpec
    seed: int
    calib_size: int | None = None
    config_overrides: tuple[tuple[str, str], ...] = ()
    #: ``--task-option`` overrides of the task's config, sorted (float cells: only float fields).
    task_overrides: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> str:
        """File-name-safe identity, stable across runs; used for resume."""
        parts = [self.task, self.model, self.method, self.bits.name, f"seed{self.seed}"]
        if self.calib_size is not None:
            parts.append(f"calib{self.calib_size}")
        if self.config_overrides:
            parts.append("cfg" + overrides_hash(self.config_overrides))
        if self.task_overrides:
            parts.append("task" + overrides_hash(self.task_overrides))
        return "__".join(safe_name(p) for p in parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "model": self.model,
            "method": self.method,
            "bits": self.bits.name,
            "seed": self.seed,
            "calib_size": self.calib_size,
            "config_overrides": dict(self.config_overrides),
            "task_overrides": dict(self.task_overrides),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Cell:
        try:
            bits = BitSpec.parse(data["bits"])
        except BitSpecError as exc:
            raise BenchsuiteError(f"cell with bad bits: {exc}") from None
        return cls(
            task=data["task"],
            model=data["model"],
            method=data["method"],
            bits=bits,
            seed=int(data["seed"]),
            calib_size=data.get("calib_size"),
            config_overrides=tuple(sorted((data.get("config_overrides") or {}).items())),
            task_overrides=tuple(sorted((data.get("task_overrides") or {}).items())),
        )


def safe_name(text: str) -> str:
    """``text`` with every character unsafe in a file name replaced by '-'."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)
