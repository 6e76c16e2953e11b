"""``--executor ray``: every cell a Ray task, results saved by the driver into the same store.

The unit of work is :func:`benchsuite.runner.execute_cell`, which depends on the cell and the run
settings alone, so a Ray worker runs exactly what the local runner runs. What this module adds:

- **Resources**: a cell asks for one GPU when the run's device is CUDA, else ``cpus_per_cell``
  CPUs (Ray then sets the worker's thread count to match).
- **Float baselines first**: each (task, model, float variant) that a pending cell needs is
  evaluated once, as its own Ray task, before the cells are dispatched; the cells then load it from
  the result folder instead of each recomputing it. The result folder must therefore be on a
  filesystem every worker sees (a cluster's shared disk, or the local disk of a local cluster),
  as for SLURM array jobs.
- **Saving and resume**: the driver saves each result as soon as its task finishes, with the same
  resume rule as the local runner (``should_run``), so an interrupted Ray run resumes locally or
  on Ray alike.
- **Lost workers**: a worker that dies (out of memory, a segfault in a compiled op, a killed
  node) becomes a failed cell with the Ray error as its message; Ray does not retry it
  (``max_retries=0``: a cell that crashed once will crash again, and a retry would hide it).
  The other cells go on.

Plugins reach the workers as classes: the driver sends each cell's task and method class along,
and a worker registers any class its own registry lacks, so a plugin registered at run time (or
installed only on the driver's path) still runs, provided its module is importable there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from benchsuite import registry
from benchsuite.api import Cell
from benchsuite.errors import BenchsuiteError
from benchsuite.results import Result, ResultStore
from benchsuite.runner import (
    CellCallback,
    FloatBaselines,
    RunSettings,
    RunSummary,
    execute_cell,
    lost_cell_result,
    make_task,
    should_run,
)

__all__ = ["run_cells_on_ray"]


def _ensure_registered(plugins: Sequence[tuple[str, str, type]]) -> None:
    """Register the driver's plugin classes in this worker if its registry lacks them."""
    for kind, name, cls in plugins:
        target = registry.tasks if kind == "task" else registry.methods
        if name not in target.availability():
            target.register(name, cls)


def _warm_baseline(settings: RunSettings, task: str, overrides: tuple, model: str, plugins: list) -> str | None:
    """Compute and store one float baseline; returns an error message instead of raising."""
    _ensure_registered(plugins)
    try:
        FloatBaselines(ResultStore(settings.out_dir)).get(make_task(task, settings, overrides), model)
    except Exception as exc:  # noqa: BLE001 - the cells that need it report the error themselves
        return f"{type(exc).__name__}: {exc}"
    return None


def _run_cell(cell: Cell, settings: RunSettings, plugins: list) -> Result:
    _ensure_registered(plugins)
    return execute_cell(cell, settings)


def _plugins_of(cell: Cell) -> list[tuple[str, str, type]]:
    return [("task", cell.task, registry.tasks.get(cell.task)), ("method", cell.method, registry.methods.get(cell.method))]


def run_cells_on_ray(
    cells: Sequence[Cell],
    settings: RunSettings,
    *,
    address: str | None = None,
    cpus_per_cell: float = 1.0,
    on_start: Callable[[Cell], None] | None = None,
    on_done: CellCallback | None = None,
) -> RunSummary:
    """Run the cells the overwrite rule selects as Ray tasks; same summary as the local runner.

    Joins the cluster at ``address`` (``"auto"``, ``"ray://host:port"``), or starts a local one
    when none is given and Ray is not initialised yet (a caller may initialise Ray itself).
    """
    try:
        import ray
    except ImportError:
        raise BenchsuiteError("--executor ray needs Ray: pip install 'benchsuite[ray]'") from None

    store = ResultStore(settings.out_dir)
    summary = RunSummary(planned=len(cells))
    pending: list[Cell] = []
    for cell in cells:
        if should_run(cell, store, settings.overwrite):
            pending.append(cell)
        else:
            summary.skipped.append(cell)
            if on_done:
                on_done(cell, None)
    if not pending:
        return summary

    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise BenchsuiteError(f"cannot reach a Ray cluster at {address!r}: {exc}") from None
    resources: dict[str, Any] = {"max_retries": 0}
    if settings.device.startswith("cuda"):
        resources["num_gpus"] = 1
    else:
        resources["num_cpus"] = cpus_per_cell
    warm = ray.remote(_warm_baseline).options(**resources)
    run_cell = ray.remote(_run_cell).options(**resources)

    refs: dict[Any, Cell] = {}
    try:
        _warm_baselines(ray, warm, pending, settings)
        for cell in pending:
            if on_start:
                on_start(cell)
            refs[run_cell.remote(cell, settings, _plugins_of(cell))] = cell
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            cell = refs.pop(done[0])
            result = _result_of(ray, done[0], cell, settings)
            store.save(cell, result)
            summary.ran.append(result)
            if on_done:
                on_done(cell, result)
    except KeyboardInterrupt:  # finished cells are saved; the rest are cancelled
        for ref in refs:
            ray.cancel(ref, force=True)
        summary.interrupted = True
    return summary


def _warm_baselines(ray: Any, warm: Any, cells: Sequence[Cell], settings: RunSettings) -> None:
    """One float evaluation per (task, model, float variant) the cells need, run in parallel."""
    wanted: dict[tuple, Cell] = {}
    for cell in cells:
        task = make_task(cell.task, settings, cell.task_overrides)
        wanted.setdefault((cell.task, cell.model, task.float_variant()), cell)
    refs = [
        warm.remote(settings, cell.task, cell.task_overrides, cell.model, _plugins_of(cell))
        for cell in wanted.values()
    ]
    for ref in refs:
        try:
            ray.get(ref)
        except ray.exceptions.RayError:
            pass  # a crashed baseline is recomputed, and reported, by the cells that need it


def _result_of(ray: Any, ref: Any, cell: Cell, settings: RunSettings) -> Result:
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:  # the worker died: the cell failed, the run goes on
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return lost_cell_result(cell, settings, type(exc).__name__, f"the Ray worker running this cell died: {message}")
