"""``benchsuite run``: plan, run with progress, print and write the leaderboard."""

from __future__ import annotations

import argparse
import dataclasses
import functools
from collections import defaultdict
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from benchsuite import registry
from benchsuite.api import Cell
from benchsuite.bits import parse_bits_list
from benchsuite.environment import resolve_device
from benchsuite.errors import BenchsuiteError, ConfigError
from benchsuite.results import Result, ResultStore
from benchsuite.runner import (
    PlanRequest,
    RunSettings,
    RunSummary,
    Shard,
    plan_cells,
    run_cells,
    should_run,
    validate_tasks,
)


def _demo_tasks() -> list[str]:
    names = []
    for name, reason in registry.tasks.availability().items():
        if reason is None and registry.tasks.get(name).info.demo:
            names.append(name)
    if not names:
        raise BenchsuiteError("no demo task is available; name tasks with --tasks")
    return names


def _default_methods(console: Console) -> list[str]:
    names = []
    for name, reason in registry.methods.availability().items():
        if reason is None:
            names.append(name)
        else:
            console.print(f"[yellow]skipping method {name}: {reason}[/]")
    return names


def _config_overrides(pairs: list[tuple[str, str]]) -> dict[str, dict[str, str]]:
    return _plugin_overrides(pairs, registry.methods, "--config", "METHOD")


def _task_overrides(pairs: list[tuple[str, str]]) -> dict[str, dict[str, str]]:
    return _plugin_overrides(pairs, registry.tasks, "--task-option", "TASK")


def _plugin_overrides(
    pairs: list[tuple[str, str]], plugins: registry.Registry, flag: str, owner: str
) -> dict[str, dict[str, str]]:
    """``OWNER.FIELD=VALUE`` pairs grouped by the plugin's canonical name."""
    overrides: dict[str, dict[str, str]] = defaultdict(dict)
    for key, value in pairs:
        name, dot, field = key.partition(".")
        if not dot or not field:
            raise ConfigError(f"{flag} takes {owner}.FIELD=VALUE, got {key}={value}")
        overrides[plugins.entry(name).name][field] = value
    return dict(overrides)


def _with_budget(
    overrides: dict[str, dict[str, str]], methods: list[str], budget: str | None
) -> dict[str, dict[str, str]]:
    """Add ``budget=<budget>`` for every method whose config has a budget field.

    An explicit ``--config METHOD.budget=...`` wins. Methods without the field are untouched, so
    the override (which becomes part of the cell key) appears only where it means something.
    """
    if budget is None:
        return overrides
    merged = {name: dict(values) for name, values in overrides.items()}
    for method in methods:
        entry = registry.methods.entry(method)
        if registry.methods.availability().get(entry.name) is not None:
            continue
        fields = {f.name for f in dataclasses.fields(registry.methods.get(entry.name).config_class)}
        if "budget" in fields:
            merged.setdefault(entry.name, {}).setdefault("budget", budget)
    return merged


def _describe(cell: Cell) -> str:
    extra = f" calib={cell.calib_size}" if cell.calib_size else ""
    extra += "".join(f" {k}={v}" for k, v in cell.config_overrides)
    extra += "".join(f" {cell.task}.{k}={v}" for k, v in cell.task_overrides)
    return f"{cell.task}/{cell.model} {cell.method} {cell.bits} seed={cell.seed}{extra}"


def run(args: argparse.Namespace) -> int:
    from benchsuite.cli import DEFAULT_BITS, DEFAULT_DEMO_BITS, EXIT_CELLS_FAILED, EXIT_INTERRUPTED, EXIT_OK

    console = Console()
    err = Console(stderr=True)
    demo = args.tasks is None
    tasks = args.tasks or _demo_tasks()
    methods = args.methods or _default_methods(err)
    bits = parse_bits_list(args.bits or (DEFAULT_DEMO_BITS if demo else DEFAULT_BITS))
    for name, value in (("--calib-size", args.calib_size), ("--eval-limit", args.eval_limit)):
        if value is not None and value < 1:
            raise BenchsuiteError(f"{name} must be at least 1, got {value}")
    settings = RunSettings(
        out_dir=args.out,
        data_roots=tuple(args.data_root),
        weights=tuple(args.weights),
        device=resolve_device(args.device),
        overwrite=args.overwrite,
        eval_limit=args.eval_limit,
        eval_batch_size=args.eval_batch_size,
    )
    request = PlanRequest(
        methods=methods,
        tasks=tasks,
        bits=bits,
        seeds=args.seeds,
        models=args.models,
        calib_size=args.calib_size,
        config_overrides=_with_budget(
            _config_overrides(args.config), methods, args.budget or ("demo" if demo else None)
        ),
        task_overrides=_task_overrides(args.task_option),
    )
    cells = plan_cells(request, settings)
    if args.shard is not None:
        shard = Shard.parse(args.shard)
        planned = len(cells)
        cells = shard.select(cells)
        err.print(f"shard {shard.index}/{shard.count}: {len(cells)} of {planned} cells", highlight=False)
    if args.executor != "ray" and args.ray_address is not None:
        raise BenchsuiteError("--ray-address needs --executor ray")
    if args.dry_run:
        store = ResultStore(settings.out_dir)
        for cell in cells:
            state = "run " if should_run(cell, store, settings.overwrite) else "skip"
            console.print(f"{state} {_describe(cell)}", highlight=False)
        console.print(f"{len(cells)} cells planned into {settings.out_dir}", highlight=False)
        return EXIT_OK
    validate_tasks(tasks, settings, request.task_overrides)

    show_progress = args.progress if args.progress is not None else console.is_terminal
    summary = _run_with_progress(cells, settings, show_progress, err, _executor(args))

    results = list(ResultStore(settings.out_dir).results())
    _print_leaderboard(console, results, settings, args.metrics)
    for failed in summary.failed:
        err.print(
            f"[red]failed[/] {failed.task}/{failed.model} {failed.method} {failed.bits} "
            f"seed={failed.seed}: {failed.error['type'] if failed.error else '?'}: "
            f"{failed.error['message'] if failed.error else ''}",
            highlight=False,
        )
    err.print(
        f"{len(summary.ran)} cells ran, {len(summary.skipped)} already done, "
        f"{len(summary.failed)} failed; results in {settings.out_dir}",
        highlight=False,
    )
    if summary.interrupted:
        err.print("interrupted: finished cells are kept; run the same command again to resume")
        return EXIT_INTERRUPTED
    return EXIT_CELLS_FAILED if summary.failed else EXIT_OK


def _executor(args: argparse.Namespace) -> Callable[..., RunSummary]:
    """The function that runs the cells: the local runner, or Ray's."""
    if args.executor == "ray":
        from benchsuite.ray_executor import run_cells_on_ray

        return functools.partial(run_cells_on_ray, address=args.ray_address)
    return run_cells


def _run_with_progress(cells, settings: RunSettings, show: bool, err: Console, execute=run_cells) -> RunSummary:
    if not show:
        return execute(cells, settings)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, transient=False) as progress:
        bar = progress.add_task("starting", total=len(cells))

        def on_start(cell: Cell) -> None:
            progress.update(bar, description=_describe(cell))

        def on_done(cell: Cell, result: Result | None) -> None:
            progress.advance(bar)

        return execute(cells, settings, on_start=on_start, on_done=on_done)


def _print_leaderboard(console: Console, results: list[Result], settings: RunSettings, metrics: str) -> None:
    from benchsuite.leaderboard import console_table, write_reports

    if not any(r.ok for r in results):
        console.print("no finished cells to show")
        return
    written = write_reports(results, settings.out_dir, metrics=metrics)
    console.print(console_table(results, metrics=metrics))
    console.print(f"leaderboard written to {', '.join(str(p) for p in written.values())}", highlight=False)

