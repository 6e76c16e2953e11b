"""Plan the cross product, run each cell in isolation, resume, and keep finished work.

A cell's execution (:func:`execute_cell`) is a function of the cell and the run settings alone, so
another executor (a Ray task, a SLURM array job) can run it anywhere that sees the result folder.
The float baseline of a (task, model) is computed once, stored next to the cell results and
reused by every cell of that pair, including after a restart.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from benchsuite import registry
from benchsuite.api import Cell, Evaluation, Method, MethodConfig, Task, TaskOptions
from benchsuite.bits import BitSpec
from benchsuite.environment import (
    PeakMemory,
    describe_device,
    library_versions,
    seed_everything,
)
from benchsuite.errors import BenchsuiteError, ConfigError
from benchsuite.results import STATUS_ERROR, STATUS_OK, Result, ResultStore

OVERWRITE_MODES = ("only-missing", "never", "always")

#: Seed used for everything the float baseline does (it must not depend on a cell's seed).
FLOAT_BASELINE_SEED = 0


@dataclass(frozen=True)
class RunSettings:
    """Where results go and what every task needs from the user; shared by all cells."""

    out_dir: Path
    data_roots: tuple[tuple[str, Path], ...] = ()
    weights: tuple[tuple[str, Path], ...] = ()
    device: str = "cpu"
    overwrite: str = "only-missing"
    eval_limit: int | None = None
    eval_batch_size: int = 64

    def task_options(self, task: str) -> TaskOptions:
        return TaskOptions(
            data_root=_lookup(self.data_roots, task),
            weights=_lookup(self.weights, task),
            device=self.device,
            eval_batch_size=self.eval_batch_size,
            eval_limit=self.eval_limit,
        )


def _lookup(pairs: Iterable[tuple[str, Path]], task: str) -> Path | None:
    wanted = registry.normalize(task)
    for name, path in pairs:
        if registry.normalize(name) in (wanted, "*"):
            return path
    return None


@dataclass(frozen=True)
class PlanRequest:
    """What the user asked for; :func:`plan_cells` expands it into cells."""

    methods: Sequence[str]
    tasks: Sequence[str]
    bits: Sequence[BitSpec]
    seeds: Sequence[int] = (0,)
    models: Sequence[str] | None = None
    calib_size: int | None = None
    config_overrides: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    #: ``--task-option`` values by task name: ``{"coco": {"quantize_scope": "backbone"}}``.
    task_overrides: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


def make_task(name: str, settings: RunSettings, overrides: Iterable[tuple[str, str]] = ()) -> Task:
    """The task ``name`` with the run's data/weights options and its config overridden."""
    task_cls = registry.tasks.get(name)
    config = task_cls.config_class().with_overrides(dict(overrides))
    return task_cls(settings.task_options(task_cls.name), config)


def make_method(name: str) -> Method:
    return registry.methods.get(name)()


def plan_cells(request: PlanRequest, settings: RunSettings) -> list[Cell]:
    """Expand a request into cells, validating every name and override before any work starts.

    The float reference (a method with ``quantizes = False``) gives one cell per (task, model),
    run with the first seed: it does not depend on bit widths or seeds.
    """
    method_classes = [registry.methods.get(m) for m in _unique(request.methods)]
    task_names = [registry.tasks.entry(t).name for t in _unique(request.tasks)]
    task_overrides = _task_overrides(request, task_names)
    task_objects = [make_task(t, settings, task_overrides[t]) for t in task_names]
    _check_overrides(request, method_classes)
    if not request.seeds:
        raise BenchsuiteError("no seed given; use e.g. --seeds 0,1,2")
    if request.calib_size is not None and request.calib_size < 1:
        raise BenchsuiteError("--calib-size must be at least 1")

    cells: list[Cell] = []
    for task in task_objects:
        models = list(request.models) if request.models else task.default_models()
        for model in models:
            model_name = task.resolve_model(model).name
            for method_cls in method_classes:
                overrides = tuple(sorted(request.config_overrides.get(method_cls.name, {}).items()))
                if not method_cls.quantizes:
                    cells.append(
                        Cell(task.name, model_name, method_cls.name, BitSpec(None, None), request.seeds[0],
                             task_overrides=task.float_variant())
                    )
                    continue
                for bits in request.bits:
                    if bits.is_float:
                        continue
                    for seed in request.seeds:
                        cells.append(
                            Cell(
                                task.name,
                                model_name,
                                method_cls.name,
                                bits,
                                seed,
                                request.calib_size,
                                overrides,
                                task_overrides[task.name],
                            )
                        )
    return _unique(cells)


def _task_overrides(request: PlanRequest, task_names: Sequence[str]) -> dict[str, tuple[tuple[str, str], ...]]:
    """Each planned task's ``--task-option`` overrides, sorted; naming an unplanned task is an error."""
    by_task: dict[str, tuple[tuple[str, str], ...]] = {name: () for name in task_names}
    for task, overrides in request.task_overrides.items():
        name = registry.tasks.entry(task).name
        if name not in by_task:
            raise ConfigError(f"--task-option names task {task!r}, which is not in --tasks")
        by_task[name] = tuple(sorted(overrides.items()))
    return by_task


def _check_overrides(request: PlanRequest, method_classes: Sequence[type[Method]]) -> None:
    by_name = {registry.normalize(m.name): m for m in method_classes}
    for method, overrides in request.config_overrides.items():
        method_cls = by_name.get(registry.normalize(method))
        if method_cls is None:
            raise ConfigError(f"--config names method {method!r}, which is not in --methods")
        method_cls.config_class().with_overrides(dict(overrides))


@dataclass(frozen=True)
class Shard:
    """Part ``index`` of ``count`` (0-based) of a plan: ``--shard index/count``."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"i/n"`` with 0 ≤ i < n, e.g. ``$SLURM_ARRAY_TASK_ID/8``."""
        index_text, slash, count_text = text.partition("/")
        try:
            index, count = int(index_text), int(count_text)
        except ValueError:
            index, count = -1, 0
        if not slash or count < 1 or not 0 <= index < count:
            raise BenchsuiteError(f"--shard takes I/N with 0 <= I < N (e.g. 0/4), got {text!r}")
        return cls(index, count)

    def select(self, cells: Sequence[Cell]) -> list[Cell]:
        """This shard's cells: every ``count``-th cell of the plan, starting at ``index``.

        The split depends only on the plan, so shards given the same arguments partition it
        exactly (their union is the unsharded plan) and interleave cheap and costly cells.
        """
        return [cell for position, cell in enumerate(cells) if position % self.count == self.index]


def _unique(items: Iterable[Any]) -> list[Any]:
    seen: list[Any] = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen


def cell_config(method: Method, task: Task, cell: Cell) -> MethodConfig:
    """The method's paper defaults, with the cell's overrides and calibration size applied."""
    config = method.default_config().with_overrides(dict(cell.config_overrides)).resolve(cell.bits)
    calib_size = cell.calib_size or config.calib_size or task.info.default_calib_size
    return dataclasses.replace(config, calib_size=calib_size)


# --------------------------------------------------------------------------------------------
# Float baselines
# --------------------------------------------------------------------------------------------


@dataclass
class FloatBaseline:
    evaluation: Evaluation
    seconds: float
    data: dict[str, Any]


class FloatBaselines:
    """Float evaluations per (task, model), computed once and kept in memory and on disk."""

    def __init__(self, store: ResultStore) -> None:
        self.store = store
        self._memo: dict[tuple[str, str], FloatBaseline] = {}

    def get(self, task: Task, model: str) -> FloatBaseline:
        key = (task.name, model, task.float_variant())
        if key not in self._memo:
            self._memo[key] = self._load(task, model) or self._compute(task, model)
        return self._memo[key]

    def _outputs_path(self, task: Task, model: str) -> Path:
        return self.store.float_path(task.name, model, task.float_variant()).with_suffix(".pt")

    def _load(self, task: Task, model: str) -> FloatBaseline | None:
        record = self.store.load_float(task.name, model, task.float_variant())
        if record is None:
            return None
        outputs = None
        if record.get("outputs_saved", True):  # a task without comparable outputs (COCO) saves none
            outputs_path = self._outputs_path(task, model)
            if not outputs_path.exists():
                return None
            outputs = torch.load(outputs_path, weights_only=True)
        evaluation = Evaluation(record["metrics"], outputs, record.get("details", {}))
        return FloatBaseline(evaluation, record["evaluation_seconds"], record.get("data", {}))

    def _compute(self, task: Task, model: str) -> FloatBaseline:
        seed_everything(FLOAT_BASELINE_SEED)
        float_model = task.build_model(model)
        start = time.perf_counter()
        evaluation = task.evaluate(float_model, model, reference=None)
        seconds = time.perf_counter() - start
        data = task.data_manifest(model)
        if evaluation.outputs is not None:
            path = self._outputs_path(task, model)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".pt.tmp")
            torch.save(evaluation.outputs, tmp)
            tmp.replace(path)
        self.store.save_float(
            task.name,
            model,
            {
                "task": task.name,
                "model": model,
                "task_config": task.config.to_dict(),
                "outputs_saved": evaluation.outputs is not None,
                "metrics": evaluation.metrics,
                "details": evaluation.details,
                "evaluation_seconds": seconds,
                "data": data,
                "versions": library_versions(),
            },
            task.float_variant(),
        )
        return FloatBaseline(evaluation, seconds, data)


# --------------------------------------------------------------------------------------------
# One cell
# --------------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_result(cell: Cell, settings: RunSettings) -> Result:
    """A result record for ``cell`` in the error state, to be filled in (or kept as the failure)."""
    return Result(
        task=cell.task,
        model=cell.model,
        method=cell.method,
        bits=cell.bits.name,
        seed=cell.seed,
        status=STATUS_ERROR,
        versions=library_versions(),
        device=settings.device,
        started_at=_now(),
        cell=cell.to_dict(),
    )


def lost_cell_result(cell: Cell, settings: RunSettings, error_type: str, message: str) -> Result:
    """The failure record of a cell whose process died (no traceback from inside the cell)."""
    result = new_result(cell, settings)
    result.error = {"type": error_type, "message": message, "traceback": ""}
    result.finished_at = _now()
    return result


def execute_cell(cell: Cell, settings: RunSettings, baselines: FloatBaselines | None = None) -> Result:
    """Run one cell and return its result; an exception becomes an error record, never escapes.

    KeyboardInterrupt is not caught: the runner stops and every finished cell stays on disk.
    """
    baselines = baselines or FloatBaselines(ResultStore(settings.out_dir))
    result = new_result(cell, settings)
    try:
        task = make_task(cell.task, settings, cell.task_overrides)
        result.cell["float_task_overrides"] = dict(task.float_variant())
        method = make_method(cell.method)
        result.main_metric = task.info.main_metric
        result.higher_is_better = task.info.higher_is_better
        result.device = describe_device(settings.device)
        config = cell_config(method, task, cell)
        result.config = {"method": method.name, **config.to_dict(), "task": task.config.to_dict()}
        with PeakMemory(settings.device) as memory:
            baseline = baselines.get(task, cell.model)
            result.float_metrics = dict(baseline.evaluation.metrics)
            # The cell's own task config (calibration source, scope) may differ from the float's.
            result.data = task.data_manifest(cell.model) if method.quantizes else baseline.data
            if not method.quantizes:
                result.metrics = dict(baseline.evaluation.metrics)
                result.calibration_seconds = 0.0
                result.evaluation_seconds = baseline.seconds
            else:
                _quantize_and_evaluate(cell, task, method, config, baseline, result)
        result.peak_memory_mb = memory.megabytes()
        result.notes.append(f"peak memory is {memory.kind}")
        result.notes.append("simulated (fake-quant) quantization")
        result.status = STATUS_OK
    except Exception as exc:  # noqa: BLE001 - isolation is the point
        result.error = {
            "type": type(exc).__name__,
            "message": str(exc),
            "traceback": traceback.format_exc(),
        }
    result.finished_at = _now()
    return result


def _quantize_and_evaluate(
    cell: Cell,
    task: Task,
    method: Method,
    config: MethodConfig,
    baseline: FloatBaseline,
    result: Result,
) -> None:
    seed_everything(cell.seed)
    model = task.build_model(cell.model)
    canonical = task.adapt(model)
    assert config.calib_size is not None
    calibration = task.calibration_set(cell.model, config.calib_size, cell.seed)
    result.calibration = calibration.manifest()
    start = time.perf_counter()
    quantized = method.quantize(canonical, calibration, cell.bits, config)
    result.calibration_seconds = time.perf_counter() - start
    result.method_info = method.run_info(canonical)
    start = time.perf_counter()
    evaluation = task.evaluate(quantized, cell.model, reference=baseline.evaluation)
    result.evaluation_seconds = time.perf_counter() - start
    result.metrics = dict(evaluation.metrics)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclass
class RunSummary:
    planned: int
    ran: list[Result] = field(default_factory=list)
    skipped: list[Cell] = field(default_factory=list)
    interrupted: bool = False

    @property
    def failed(self) -> list[Result]:
        return [r for r in self.ran if not r.ok]


def should_run(cell: Cell, store: ResultStore, overwrite: str) -> bool:
    """Resume rule: ``only-missing`` reruns missing and failed cells, ``never`` only missing ones."""
    if overwrite == "always":
        return True
    path = store.cell_path(cell)
    if not path.exists():
        return True
    if overwrite == "never":
        return False
    return not store.has_ok(cell)


CellCallback = Callable[[Cell, Result | None], None]


def run_cells(
    cells: Sequence[Cell],
    settings: RunSettings,
    on_start: Callable[[Cell], None] | None = None,
    on_done: CellCallback | None = None,
) -> RunSummary:
    """Run every cell that the overwrite rule selects, saving each result as soon as it exists.

    On Ctrl-C the summary is returned with ``interrupted=True``; all finished cells are on disk.
    """
    if settings.overwrite not in OVERWRITE_MODES:
        raise BenchsuiteError(
            f"unknown --overwrite {settings.overwrite!r}; use {', '.join(OVERWRITE_MODES)}"
        )
    store = ResultStore(settings.out_dir)
    baselines = FloatBaselines(store)
    summary = RunSummary(planned=len(cells))
    try:
        for cell in cells:
            if not should_run(cell, store, settings.overwrite):
                summary.skipped.append(cell)
                if on_done:
                    on_done(cell, None)
                continue
            if on_start:
                on_start(cell)
            result = execute_cell(cell, settings, baselines)
            store.save(cell, result)
            summary.ran.append(result)
            if on_done:
                on_done(cell, result)
    except KeyboardInterrupt:
        summary.interrupted = True
    return summary


def validate_tasks(
    task_names: Iterable[str],
    settings: RunSettings,
    task_overrides: Mapping[str, Mapping[str, str]] | None = None,
) -> None:
    """Let each task check its data before any cell runs, so bad paths fail fast with exit 2."""
    overrides = {registry.tasks.entry(t).name: dict(v) for t, v in (task_overrides or {}).items()}
    for name in _unique(registry.tasks.entry(t).name for t in task_names):
        make_task(name, settings, overrides.get(name, {}).items()).validate()

