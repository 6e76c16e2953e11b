"""Compute budgets for reconstruction methods: the paper's, or a reduced one that is recorded.

The reconstruction papers tune every unit for 200 to 5000 steps on 1024 images, which takes tens
of minutes on a GPU and many hours on a CPU. ``budget="fast"`` runs the same algorithm with fewer
steps and images so that it fits a CPU; ``budget="demo"`` cuts further (steps, images and the
mini-batch) so that every method runs on every demo task within the demo's few minutes: its rows
show that a method runs end to end, not how well it does. A reduced result is not the paper's
number: the budget, the resolved iteration count, calibration size and batch size are fields of
the config that every result stores, and the cell key includes the override, so rows of
different budgets never mix silently.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal, TypeVar

from benchsuite.bits import BitSpec
from benchsuite.config import MethodConfig
from benchsuite.errors import ConfigError

__all__ = [
    "BUDGETS", "Budget", "BudgetTable", "DEMO_BATCH_SIZE", "DEMO_CALIB_SIZE", "DEMO_ITERS",
    "FAST_CALIB_SIZE", "FAST_ITERS", "ReconstructionConfig",
]

R = TypeVar("R", bound="ReconstructionConfig")

Budget = Literal["paper", "fast", "demo"]
#: The budgets, largest first (the ``--budget`` choices).
BUDGETS: tuple[str, ...] = ("paper", "fast", "demo")

#: Steps per unit (and per stage) under the fast budget.
FAST_ITERS = 100
#: Calibration images under the fast budget.
FAST_CALIB_SIZE = 128
#: Steps per unit under the demo budget.
DEMO_ITERS = 20
#: Calibration images under the demo budget.
DEMO_CALIB_SIZE = 32
#: Largest mini-batch under the demo budget (the point-cloud layers see every point of a cloud,
#: so their per-step cost grows with the batch far more than a ViT block's).
DEMO_BATCH_SIZE = 8


@dataclass(frozen=True)
class BudgetTable:
    """A method's paper budget: steps per unit by bit width, calibration images, mini-batch.

    ``iters_low_bits`` applies at or below ``low_bits_max`` activation/weight bits (the papers'
    3- and 4-bit rows), ``iters_high_bits`` above (the 6-bit rows).
    """

    iters_low_bits: int
    iters_high_bits: int
    calib_size: int
    batch_size: int
    low_bits_max: int = 4

    def iters(self, budget: Budget, bits: BitSpec) -> int:
        if budget == "fast":
            return FAST_ITERS
        if budget == "demo":
            return DEMO_ITERS
        widest = max(b for b in (bits.w_bits, bits.a_bits) if b is not None) if not bits.is_float else 32
        return self.iters_low_bits if widest <= self.low_bits_max else self.iters_high_bits

    def calib(self, budget: Budget) -> int:
        return {"fast": FAST_CALIB_SIZE, "demo": DEMO_CALIB_SIZE}.get(budget, self.calib_size)

    def batch(self, budget: Budget) -> int:
        return min(self.batch_size, DEMO_BATCH_SIZE) if budget == "demo" else self.batch_size


@dataclass(frozen=True)
class ReconstructionConfig(MethodConfig):
    """Base of the reconstruction methods' configs: the budget and what it resolves.

    A subclass sets ``PAPER_BUDGET``; ``calib_size`` and ``iters`` left at None are filled in by
    :meth:`resolve` from the budget and the cell's bit widths, so a stored result names the
    numbers that ran. The runner finds reconstruction methods by the ``budget`` field
    (``--budget``).
    """

    PAPER_BUDGET: ClassVar[BudgetTable]

    #: Calibration images; None: by budget (the paper's count, FAST_CALIB_SIZE, DEMO_CALIB_SIZE).
    calib_size: int | None = None
    budget: Budget = "paper"
    #: Steps per unit (per stage, for staged methods); None: by budget and bit widths.
    iters: int | None = None
    #: Rows per optimisation step; None: the paper's, capped at DEMO_BATCH_SIZE by the demo budget.
    batch_size: int | None = None

    def __post_init__(self) -> None:
        for name, least in (("calib_size", 1), ("iters", 0), ("batch_size", 1)):
            value = getattr(self, name)
            if value is not None and value < least:
                raise ConfigError(f"{type(self).__name__}: {name} must be >= {least}, got {value}")

    def resolve(self: R, bits: BitSpec) -> R:
        table = self.PAPER_BUDGET
        return dataclasses.replace(
            self,
            iters=self.iters if self.iters is not None else table.iters(self.budget, bits),
            calib_size=self.calib_size if self.calib_size is not None else table.calib(self.budget),
            batch_size=self.batch_size if self.batch_size is not None else table.batch(self.budget),
        )
