"""The result store: one JSON file per cell, written atomically, with a schema version.

A run folder holds ``cells/<cell key>.json`` (one per finished or failed cell) and
``float/<task>__<model>.json`` (the float baseline shared by a task's cells). Files are written to
a temporary name and renamed, so an interrupted run never leaves a half-written result, and a
rerun can trust every file it finds.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchsuite.api import Cell, overrides_hash, safe_name
from benchsuite.errors import ResultStoreError

SCHEMA_VERSION = 1

STATUS_OK = "ok"
STATUS_ERROR = "error"


@dataclass
class Result:
    """Everything known about one cell after it ran (or failed)."""

    task: str
    model: str
    method: str
    bits: str
    seed: int
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    float_metrics: dict[str, float] = field(default_factory=dict)
    main_metric: str | None = None
    higher_is_better: bool = True
    calibration_seconds: float | None = None
    evaluation_seconds: float | None = None
    peak_memory_mb: float | None = None
    config: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    method_info: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    device: str = "cpu"
    started_at: str | None = None
    finished_at: str | None = None
    cell: dict[str, Any] = field(default_factory=dict)
    error: dict[str, str] | None = None
    notes: list[str] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    @property
    def method_label(self) -> str:
        """The method's name, plus its config overrides when the cell ran a variant.

        ``isvit [budget=fast]`` and ``aiqvit [use_ailoc=false]`` are different rows of a
        leaderboard: an ablation or a reduced budget must never pass for the method's default.
        Task options that change how a model is quantized but not the float model (COCO's
        ``calib_source`` or ``quantize_scope``) are labelled here too; see :attr:`task_label`.
        """
        float_fields = set(self._float_task_overrides())
        items = _override_items(self.cell.get("config_overrides"))
        items += [(k, v) for k, v in _override_items(self.cell.get("task_overrides")) if k not in float_fields]
        if not items:
            return self.method
        return f"{self.method} [{', '.join(f'{key}={value}' for key, value in sorted(items))}]"

    @property
    def task_label(self) -> str:
        """The task's name, plus the task options that change its float model (random weights)."""
        items = sorted(self._float_task_overrides().items())
        if not items:
            return self.task
        return f"{self.task} [{', '.join(f'{key}={value}' for key, value in items)}]"

    def _float_task_overrides(self) -> dict[str, str]:
        return dict(_override_items(self.cell.get("float_task_overrides")))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Result:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ResultStoreError(
                f"result schema version {version!r} is not {SCHEMA_VERSION}; "
                "rerun with --overwrite always or report it with the benchsuite that wrote it"
            )
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ResultStoreError(f"result has unknown fields: {', '.join(sorted(unknown))}")
        return cls(**data)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=False, default=_json_default)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in a result")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ResultStoreError(f"cannot read {path}: {exc}") from None


def _override_items(overrides: Any) -> list[tuple[str, str]]:
    """``FIELD=VALUE`` pairs of a recorded override mapping (or legacy list of pairs)."""
    if not overrides:
        return []
    return [tuple(p) for p in (overrides.items() if isinstance(overrides, dict) else overrides)]


class ResultStore:
    """A run folder of result files."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def cells_dir(self) -> Path:
        return self.root / "cells"

    @property
    def float_dir(self) -> Path:
        return self.root / "float"

    def cell_path(self, cell: Cell) -> Path:
        return self.cells_dir / f"{cell.key}.json"

    def float_path(self, task: str, model: str, variant: Sequence[tuple[str, str]] = ()) -> Path:
        """The float baseline of (task, model); a task config that changes the float model
        (``variant``, e.g. random weights) has its own file."""
        suffix = f"__task{overrides_hash(variant)}" if variant else ""
        return self.float_dir / f"{safe_name(task)}__{safe_name(model)}{suffix}.json"

    def save(self, cell: Cell, result: Result) -> Path:
        path = self.cell_path(cell)
        write_json_atomic(path, result.to_dict())
        return path

    def load(self, cell: Cell) -> Result | None:
        path = self.cell_path(cell)
        if not path.exists():
            return None
        return Result.from_dict(read_json(path))

    def has_ok(self, cell: Cell) -> bool:
        """A finished, successful result exists (what resume skips)."""
        path = self.cell_path(cell)
        if not path.exists():
            return False
        try:
            return self.load(cell).ok  # type: ignore[union-attr]
        except ResultStoreError:
            return False

    def results(self) -> Iterator[Result]:
        """Every cell result in the folder, sorted by file name."""
        for path in sorted(self.cells_dir.glob("*.json")):
            yield Result.from_dict(read_json(path))

    def save_float(
        self, task: str, model: str, record: dict[str, Any], variant: Sequence[tuple[str, str]] = ()
    ) -> None:
        write_json_atomic(self.float_path(task, model, variant), {"schema_version": SCHEMA_VERSION, **record})

    def load_float(self, task: str, model: str, variant: Sequence[tuple[str, str]] = ()) -> dict[str, Any] | None:
        path = self.float_path(task, model, variant)
        if not path.exists():
            return None
        record = read_json(path)
        if record.get("schema_version") != SCHEMA_VERSION:
            return None
        return record
