"""Budgets of the reconstruction methods, generated from the registry: every method with a
``budget`` field resolves paper ≥ fast ≥ demo, keeps explicit numbers, and stores what ran."""

from __future__ import annotations

import pytest

from benchsuite import registry
from benchsuite.bits import BitSpec
from benchsuite.errors import ConfigError
from benchsuite.quant.budget import (
    BUDGETS,
    DEMO_BATCH_SIZE,
    DEMO_CALIB_SIZE,
    DEMO_ITERS,
    FAST_CALIB_SIZE,
    FAST_ITERS,
    ReconstructionConfig,
)

RECONSTRUCTION_METHODS = sorted(
    name
    for name, reason in registry.methods.availability().items()
    if reason is None and issubclass(registry.methods.get(name).config_class, ReconstructionConfig)
)


def config_class(name: str) -> type[ReconstructionConfig]:
    return registry.methods.get(name).config_class


def test_the_three_papers_methods_have_budgets():
    assert {"isvit", "adfq-vit", "aiqvit"} <= set(RECONSTRUCTION_METHODS)


@pytest.mark.parametrize("name", RECONSTRUCTION_METHODS)
@pytest.mark.parametrize("bits", [BitSpec(3, 3), BitSpec(4, 4), BitSpec(6, 6)], ids=str)
def test_budgets_shrink_from_paper_to_demo(name, bits):
    cls = config_class(name)
    paper, fast, demo = (cls(budget=b).resolve(bits) for b in BUDGETS)
    table = cls.PAPER_BUDGET
    assert (paper.calib_size, paper.batch_size) == (table.calib_size, table.batch_size)
    assert paper.iters in (table.iters_low_bits, table.iters_high_bits)
    assert (fast.iters, fast.calib_size, fast.batch_size) == (FAST_ITERS, FAST_CALIB_SIZE, table.batch_size)
    assert (demo.iters, demo.calib_size) == (DEMO_ITERS, DEMO_CALIB_SIZE)
    assert demo.batch_size == min(table.batch_size, DEMO_BATCH_SIZE)
    for field in ("iters", "calib_size", "batch_size"):
        assert getattr(paper, field) >= getattr(fast, field) >= getattr(demo, field) >= 1


@pytest.mark.parametrize("name", RECONSTRUCTION_METHODS)
def test_explicit_numbers_win_and_resolution_is_stored_once(name):
    cls = config_class(name)
    chosen = cls(budget="demo", iters=7, calib_size=5, batch_size=3).resolve(BitSpec(4, 4))
    assert (chosen.iters, chosen.calib_size, chosen.batch_size) == (7, 5, 3)
    resolved = cls(budget="fast").resolve(BitSpec(4, 4))
    assert resolved.resolve(BitSpec(6, 6)) == resolved  # a stored config names what ran
    assert cls.from_dict(resolved.to_dict()) == resolved


@pytest.mark.parametrize("name", RECONSTRUCTION_METHODS)
@pytest.mark.parametrize("field", ["iters", "calib_size", "batch_size"])
def test_impossible_numbers_are_config_errors(name, field):
    with pytest.raises(ConfigError, match=field):
        config_class(name)().with_overrides({field: "-1"})
