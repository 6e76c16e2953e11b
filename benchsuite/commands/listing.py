"""``benchsuite list``: every registered method and task, usable or not, and why not."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from benchsuite import registry


def _status(reason: str | None) -> str:
    return "[green]available[/]" if reason is None else f"[red]unavailable[/]: {reason}"


def methods_table() -> Table:
    table = Table(title="Methods", title_justify="left", show_lines=True)
    for column in ("name", "paper", "default config", "status"):
        table.add_column(column, overflow="fold")
    for name, reason in registry.methods.availability().items():
        if reason is None:
            method = registry.methods.get(name)
            config = method.config_class().describe()
            paper = method.paper or "-"
            description = f"{method.description}\n[dim]{method.fidelity}[/]" if method.fidelity else method.description
            table.add_row(f"[bold]{name}[/]\n{description}", paper, config, _status(None))
        else:
            table.add_row(f"[bold]{name}[/]", "-", "-", _status(reason))
    return table


def tasks_table() -> Table:
    table = Table(title="Tasks", title_justify="left", show_lines=True)
    for column in ("name", "models", "metrics (main first)", "demo", "status"):
        table.add_column(column, overflow="fold")
    for name, reason in registry.tasks.availability().items():
        entry = registry.tasks.entry(name)
        task = entry.loaded
        if task is None:
            table.add_row(f"[bold]{name}[/]", "-", "-", "-", _status(reason))
            continue
        info = task.info
        models = ", ".join(task.models())
        metrics = ", ".join([info.main_metric, *[m for m in info.metrics if m != info.main_metric]])
        direction = "higher is better" if info.higher_is_better else "lower is better"
        options = task.config_class().describe()
        options_line = f"\n[dim]--task-option {name}.FIELD=VALUE: {options}[/]" if options else ""
        if info.not_in_demo and not info.demo:
            options_line += f"\n[dim]not in the demo: {info.not_in_demo}[/]"
        table.add_row(
            f"[bold]{name}[/]\n{info.description}{options_line}",
            models,
            f"{metrics}\n[dim]{direction}; calibration {info.default_calib_size}[/]",
            "yes" if info.demo else "no",
            _status(reason),
        )
    return table


def list_plugins(what: str) -> int:
    console = Console()
    if what in ("methods", "all"):
        console.print(methods_table())
    if what in ("tasks", "all"):
        console.print(tasks_table())
    return 0
