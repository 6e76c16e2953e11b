"""The ``benchsuite`` command: ``run``, ``list`` and ``report``.

User errors (a :class:`BenchsuiteError`, or a bad argument) print one line on stderr and exit 2;
nothing finished is lost. Exit 1 means some cells failed (their error records are stored),
130 means the run was interrupted (finished cells are kept; rerun to resume).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from benchsuite.errors import BenchsuiteError
from benchsuite.quant.budget import BUDGETS

EXIT_OK = 0
EXIT_CELLS_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

DEFAULT_DEMO_BITS = "w4a4,w3a3"
DEFAULT_BITS = "w4a4,w6a6"
DEFAULT_OUT = Path("results") / "default"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit 2, like every other user error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _assignment(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return key.strip(), value.strip()


def _path_assignment(text: str) -> tuple[str, Path]:
    """``TASK=PATH``, or a bare PATH meaning every task."""
    if "=" not in text:
        return "*", Path(text).expanduser()
    key, value = _assignment(text)
    return key, Path(value).expanduser()


def _seeds(text: str) -> list[int]:
    try:
        return [int(part) for part in _comma_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds are integers, e.g. 0,1,2; got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="benchsuite", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", parser_class=_Parser)

    run = commands.add_parser("run", help="run methods x tasks x models x bits x seeds")
    run.add_argument("--methods", type=_comma_list, help="comma-separated; default: every available method")
    run.add_argument("--tasks", type=_comma_list, help="comma-separated; default: the demo tasks")
    run.add_argument("--models", type=_comma_list, help="comma-separated model names; default: each task's default")
    run.add_argument("--bits", help=f"comma-separated, e.g. w4a4,w6a6 (default {DEFAULT_BITS}; demo {DEFAULT_DEMO_BITS})")
    run.add_argument("--seeds", type=_seeds, default=[0], help="comma-separated integers (default 0)")
    run.add_argument("--calib-size", type=int, help="calibration samples (default: each method's paper value)")
    run.add_argument("--data-root", type=_path_assignment, action="append", default=[], metavar="TASK=PATH")
    run.add_argument("--weights", type=_path_assignment, action="append", default=[], metavar="TASK=FILE",
                     help="float weights file (safetensors or a weights-only torch checkpoint)")
    run.add_argument("--config", type=_assignment, action="append", default=[], metavar="METHOD.FIELD=VALUE",
                     help="override a method config field, e.g. minmax.calib_size=64")
    run.add_argument("--task-option", type=_assignment, action="append", default=[], metavar="TASK.FIELD=VALUE",
                     help="set a task option that changes results, e.g. coco.quantize_scope=backbone "
                          "(benchsuite list tasks shows them); part of the cell and its label")
    run.add_argument("--budget", choices=BUDGETS,
                     help="reconstruction methods: the paper's steps and images, a reduced budget for "
                          "CPUs (fast), or the smallest that runs every step (demo); recorded in every "
                          "result (default paper; the demo uses demo)")
    run.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"result folder (default {DEFAULT_OUT})")
    run.add_argument("--overwrite", choices=("only-missing", "never", "always"), default="only-missing",
                     help="only-missing: rerun missing and failed cells (default); never; always")
    run.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    run.add_argument("--eval-limit", type=int, help="evaluate on at most N samples (quick checks; recorded)")
    run.add_argument("--eval-batch-size", type=int, default=64)
    run.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    run.add_argument("--shard", metavar="I/N",
                     help="run only part I of N (0-based) of the plan, e.g. $SLURM_ARRAY_TASK_ID/8; "
                          "shards given the same arguments and --out split the plan exactly")
    run.add_argument("--executor", choices=("local", "ray"), default="local",
                     help="run cells one after another here (default), or as Ray tasks (extra ray)")
    run.add_argument("--ray-address", metavar="ADDRESS",
                     help="Ray cluster to join (e.g. auto or ray://host:10001); default: start a local one")
    run.add_argument("--metrics", choices=("main", "all"), default="main", help="leaderboard columns")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bar (default: only on a terminal)")

    listing = commands.add_parser("list", help="list methods and tasks")
    listing.add_argument("what", nargs="?", choices=("methods", "tasks", "all"), default="all")

    report = commands.add_parser("report", help="render the leaderboard of a result folder")
    report.add_argument("directory", type=Path)
    report.add_argument("--format", choices=("md", "csv", "tex", "html"), default="md")
    report.add_argument("--output", type=Path, help="write to this file instead of stdout")
    report.add_argument("--metrics", choices=("main", "all"), default="main")

    bench = commands.add_parser("bench", help="time each method against the float model (ratios, FLOP/s, memory)")
    bench.add_argument("--methods", type=_comma_list, help="comma-separated; default: every available quantizing method")
    bench.add_argument("--model", default="deit_small_patch16_224", help="a timm model name (random weights)")
    bench.add_argument("--bits", default="w4a4")
    bench.add_argument("--calib-size", type=int, default=32)
    bench.add_argument("--eval-images", type=int, default=64)
    bench.add_argument("--batch-size", type=int, default=32)
    bench.add_argument("--iters", type=int, default=10, help="reconstruction steps per unit (recorded)")
    bench.add_argument("--budget", choices=BUDGETS, default="fast")
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    bench.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["run", *argv]  # `benchsuite` alone, or with run options, means `benchsuite run`
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors and --help: return the code instead of exiting
        return int(exc.code or 0)
    if args.version:
        from benchsuite import __version__

        print(f"benchsuite {__version__}")
        return EXIT_OK
    command = args.command
    try:
        if command == "list":
            from benchsuite.commands.listing import list_plugins

            return list_plugins(args.what)
        if command == "report":
            from benchsuite.commands.report import report

            return report(args.directory, args.format, args.output, args.metrics)
        if command == "bench":
            from benchsuite.commands.bench import bench

            return bench(args)
        from benchsuite.commands.run import run

        return run(args)
    except BenchsuiteError as exc:
        print(f"benchsuite: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
