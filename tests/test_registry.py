"""Entry-point discovery: built-ins, typos, collisions, missing optional dependencies."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from benchsuite import registry
from benchsuite.errors import PluginConflictError, PluginUnavailableError, UnknownNameError


def make_distribution(root: Path, name: str, group: str, entries: dict[str, str], modules: dict[str, str] = {}) -> None:
    """A minimal installed distribution (dist-info with entry points) in ``root``."""
    info = root / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = [f"[{group}]"] + [f"{k} = {v}" for k, v in entries.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for module, source in modules.items():
        (root / f"{module}.py").write_text(source)


def test_builtins_register_through_entry_points():
    methods = registry.Registry(registry.METHODS_GROUP, "method")
    tasks = registry.Registry(registry.TASKS_GROUP, "task")
    assert {"fp32", "minmax"} <= set(methods.names())
    assert "digits" in tasks.names()
    assert methods.entry("minmax").distribution == "benchsuite"
    assert methods.get("minmax").name == "minmax"


def test_lookup_is_case_and_dash_insensitive():
    methods = registry.Registry(registry.METHODS_GROUP, "method")
    assert methods.get("FP32") is methods.get("fp32")
    assert registry.normalize("repq-vit") == registry.normalize("RepQ_ViT")


def test_unknown_name_suggests_the_closest():
    with pytest.raises(UnknownNameError, match=r"did you mean 'minmax'\?"):
        registry.methods.get("minmx")
    with pytest.raises(UnknownNameError, match="known methods: .*fp32"):
        registry.methods.get("zzzzzz")


def test_name_claimed_by_two_distributions_is_loud(tmp_path, monkeypatch):
    make_distribution(tmp_path, "fake-collider", registry.METHODS_GROUP, {"minmax": "fake_collider:Thing"})
    monkeypatch.syspath_prepend(str(tmp_path))
    fresh = registry.Registry(registry.METHODS_GROUP, "method")
    with pytest.raises(PluginConflictError) as info:
        fresh.names()
    message = str(info.value)
    assert "benchsuite" in message and "fake-collider" in message and "'minmax'" in message


def test_missing_optional_dependency_is_listed_not_fatal(tmp_path, monkeypatch):
    make_distribution(
        tmp_path,
        "fake-detector",
        registry.TASKS_GROUP,
        {"fake-coco": "fake_coco_task:FakeCoco"},
        {"fake_coco_task": "import mmdet  # not installed\nclass FakeCoco: pass\n"},
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "mmdet", None)  # not installed, even where the extra is
    fresh = registry.Registry(registry.TASKS_GROUP, "task")
    status = fresh.availability()
    assert status["digits"] is None
    assert status["fake-coco"] == "needs mmdet (scripts/build_mmcv.sh, then pip install 'benchsuite[coco]')"
    with pytest.raises(PluginUnavailableError, match="fake-coco is unavailable: needs mmdet"):
        fresh.get("fake-coco")


def test_runtime_registration_collides_like_entry_points():
    with pytest.raises(PluginConflictError, match="already registered by benchsuite"):
        registry.methods.register("minmax", object)
