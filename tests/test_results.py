"""The result record and store: schema round trip, atomic writes, refusal of other schemas."""

from __future__ import annotations

import json

import pytest

from benchsuite.api import Cell
from benchsuite.bits import BitSpec
from benchsuite.errors import ResultStoreError
from benchsuite.results import SCHEMA_VERSION, Result, ResultStore, write_json_atomic


def sample_result(**overrides) -> Result:
    values = dict(
        task="toy", model="toy-vit", method="minmax", bits="w4a4", seed=1, status="ok",
        metrics={"top1": 50.0}, float_metrics={"top1": 100.0}, main_metric="top1",
        calibration_seconds=0.5, evaluation_seconds=0.25, peak_memory_mb=123.0,
        config={"method": "minmax", "type": "MinMaxConfig", "version": 1, "fields": {"calib_size": 32}},
        calibration={"sample_ids": ["a", "b"], "sample_ids_sha256": "x"},
        versions={"torch": "2"}, device="cpu", started_at="t0", finished_at="t1",
        cell=Cell("toy", "toy-vit", "minmax", BitSpec(4, 4), 1).to_dict(),
    )
    values.update(overrides)
    return Result(**values)


def test_round_trip_through_json(tmp_path):
    store = ResultStore(tmp_path)
    cell = Cell("toy", "toy-vit", "minmax", BitSpec(4, 4), 1)
    result = sample_result()
    path = store.save(cell, result)
    assert path.name == f"{cell.key}.json"
    assert json.loads(path.read_text())["schema_version"] == SCHEMA_VERSION
    assert store.load(cell) == result
    assert list(store.results()) == [result]
    assert Cell.from_dict(result.cell) == cell
    assert store.has_ok(cell)


def test_failed_result_is_not_ok(tmp_path):
    store = ResultStore(tmp_path)
    cell = Cell("toy", "toy-vit", "minmax", BitSpec(4, 4), 1)
    store.save(cell, sample_result(status="error", error={"type": "RuntimeError", "message": "x", "traceback": ""}))
    assert not store.has_ok(cell)


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    write_json_atomic(tmp_path / "a" / "b.json", {"x": 1})
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "a" / "c.json", {"x": object()})
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.json"]


def test_other_schema_versions_and_fields_are_refused():
    data = sample_result().to_dict()
    with pytest.raises(ResultStoreError, match="schema version"):
        Result.from_dict({**data, "schema_version": SCHEMA_VERSION + 1})
    with pytest.raises(ResultStoreError, match="unknown fields: surprise"):
        Result.from_dict({**data, "surprise": 1})


def test_corrupt_file_is_a_clear_error(tmp_path):
    store = ResultStore(tmp_path)
    store.cells_dir.mkdir(parents=True)
    (store.cells_dir / "bad.json").write_text("{not json")
    with pytest.raises(ResultStoreError, match="cannot read"):
        list(store.results())


def test_cell_key_depends_on_everything_that_changes_numbers():
    base = Cell("toy", "toy-vit", "minmax", BitSpec(4, 4), 0)
    variants = [
        Cell("toy", "toy-vit", "minmax", BitSpec(4, 4), 1),
        Cell("toy", "toy-vit", "minmax", BitSpec(3, 3), 0),
        Cell("toy", "toy-vit", "minmax", BitSpec(4, 4), 0, calib_size=64),
        Cell("toy", "toy-vit", "minmax", BitSpec(4, 4), 0, config_overrides=(("calib_size", "8"),)),
    ]
    keys = {base.key, *(v.key for v in variants)}
    assert len(keys) == 5
    assert all("/" not in k for k in keys)
