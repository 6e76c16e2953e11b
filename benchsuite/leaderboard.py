"""Leaderboard tables from cell results: pandas frames rendered to Markdown, CSV, LaTeX and HTML.

The table has one row per method and one column per (task, model, metric, bits). The float
reference (the method run at bits ``fp``, normally ``fp32``) comes first and fills the single
``fp`` column of each task/model/metric group; quantized methods fill the bit columns, ordered as
:data:`~benchsuite.bits.SUPPORTED_BITS`. A cell shows the mean over seeds, ``mean ± std`` (sample
std, ``ddof=1``) when there are several seeds, and the difference to the float value of the same
task/model/metric in parentheses. Failed results are kept out of the numbers and counted.

Numbers: 2 decimals (metrics in %), 4 decimals for metrics whose name contains ``kl``. A metric's
direction is the result's ``higher_is_better`` for the task's main metric; any other metric is
higher-is-better unless its name contains ``kl``, ``loss`` or ``error``.

Public functions:

- :func:`results_frame` — tidy table, one row per (result, metric).
- :func:`leaderboard_frames` — the numeric wide frames (mean, std, n, n_failed, delta, best ...).
- :func:`leaderboard_tidy` — one row per method/task/model/metric/bits (what the CSV holds).
- :func:`leaderboard_table` — the text table (methods × MultiIndex columns).
- :func:`render` — ``md`` / ``csv`` / ``tex`` / ``html`` as a string.
- :func:`write_reports` — all four files into a folder.
- :func:`console_table` — a :class:`rich.table.Table` for the terminal.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchsuite.bits import SUPPORTED_BITS, BitSpec
from benchsuite.errors import BenchsuiteError, BitSpecError
from benchsuite.results import STATUS_OK, Result

__all__ = [
    "FLOAT_METHOD",
    "FLOAT_REFERENCE_LABEL",
    "FORMATS",
    "Leaderboard",
    "LeaderboardError",
    "console_table",
    "leaderboard_frames",
    "leaderboard_table",
    "leaderboard_tidy",
    "metric_decimals",
    "metric_higher_is_better",
    "render",
    "results_frame",
    "write_reports",
]

#: The method that is the float reference when it is present.
FLOAT_METHOD = "fp32"
#: Row label of a float row built from the ``float_metrics`` results carry.
FLOAT_REFERENCE_LABEL = "fp32 (float reference)"
#: Output formats of :func:`render`, with the file name :func:`write_reports` gives each.
FORMATS: dict[str, str] = {
    "md": "leaderboard.md",
    "csv": "leaderboard.csv",
    "tex": "leaderboard.tex",
    "html": "leaderboard.html",
}

COLUMN_LEVELS = ["task", "model", "metric", "bits"]
FRAME_COLUMNS = [
    "task",
    "model",
    "method",
    "bits",
    "seed",
    "status",
    "metric",
    "value",
    "float_value",
    "main_metric",
    "higher_is_better",
    "is_float",
    "error",
]
TIDY_COLUMNS = [
    "method",
    "task",
    "model",
    "metric",
    "bits",
    "mean",
    "std",
    "n_seeds",
    "n_failed",
    "float",
    "delta",
    "higher_is_better",
    "main_metric",
    "is_float",
    "best",
]

CAPTION = (
    "Simulated (fake-quant) post-training quantization: weights and activations are quantized "
    "and dequantized in floating point, so the numbers measure accuracy, not speed."
)
_LOWER_IS_BETTER_MARKERS = ("kl", "loss", "error")


class LeaderboardError(BenchsuiteError, ValueError):
    """A leaderboard request that cannot be met (unknown format or metric selection)."""


# --------------------------------------------------------------------------------------------
# Metric conventions
# --------------------------------------------------------------------------------------------


def metric_decimals(metric: str) -> int:
    """Decimals a metric is shown with: 4 for KL divergences, 2 for everything else (%)."""
    return 4 if "kl" in str(metric).lower() else 2


def metric_higher_is_better(metric: str) -> bool:
    """Direction of a metric that is not a task's main metric, guessed from its name."""
    name = str(metric).lower()
    return not any(marker in name for marker in _LOWER_IS_BETTER_MARKERS)


def _normalize_bits(bits: Any) -> str:
    text = str(bits)
    try:
        return BitSpec.parse(text).name
    except BitSpecError:
        return text.strip().lower()


def _bits_key(bits: str) -> tuple[int, str]:
    try:
        return (SUPPORTED_BITS.index(bits), bits)
    except ValueError:
        return (len(SUPPORTED_BITS), bits)


def _to_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _error_text(error: Any) -> str:
    if not error:
        return ""
    if isinstance(error, dict):
        kind = error.get("type") or error.get("kind") or ""
        message = error.get("message") or error.get("msg") or ""
        if kind or message:
            return f"{kind}: {message}" if kind and message else str(kind or message)
        return "; ".join(f"{k}={v}" for k, v in error.items())
    return str(error)


# --------------------------------------------------------------------------------------------
# The tidy table of raw results
# --------------------------------------------------------------------------------------------


def _dedupe(results: list[Result]) -> list[Result]:
    """One result per (task, model, method variant, bits, seed): an ok one beats a failed one, else last."""
    chosen: dict[tuple[Any, ...], Result] = {}
    for result in results:
        key = (result.task_label, result.model, result.method_label, _normalize_bits(result.bits), result.seed)
        previous = chosen.get(key)
        if previous is not None and previous.ok and not result.ok:
            continue
        chosen[key] = result
    return list(chosen.values())


def _task_main_metrics(results: list[Result]) -> dict[str, str | None]:
    """The main metric of each task: the first one a result names, else its first metric."""
    main: dict[str, str | None] = {}
    for result in results:
        if result.main_metric and not main.get(result.task):
            main[result.task] = result.main_metric
    for result in results:
        if not main.get(result.task) and result.metrics:
            main[result.task] = next(iter(result.metrics))
    for result in results:
        main.setdefault(result.task, None)
    return main


def results_frame(results: Iterable[Result]) -> pd.DataFrame:
    """Tidy table with one row per (result, metric).

    Columns: task, model, method, bits (normalized, e.g. ``fp``/``w4a4``), seed, status, metric,
    value, float_value (the result's ``float_metrics`` entry), main_metric (bool: the task's main
    metric), higher_is_better, is_float (bits ``fp``) and error. A failed result (status other
    than ``ok``) gives one row for its task's main metric with ``value`` NaN, so it is counted but
    never enters a mean. If the same cell (task, model, method, bits, seed) appears twice, an ok
    result wins over a failed one, else the later one is kept.
    """
    items = _dedupe(list(results))
    main_of = _task_main_metrics(items)
    rows: list[dict[str, Any]] = []
    for result in items:
        bits = _normalize_bits(result.bits)
        main = main_of.get(result.task)
        base = {
            "task": result.task_label,
            "model": result.model,
            "method": result.method_label,
            "bits": bits,
            "seed": result.seed,
            "status": result.status,
            "is_float": bits == "fp",
            "error": "" if result.ok else _error_text(result.error) or "failed",
        }
        if result.ok:
            metric_names = list(result.metrics)
            values = result.metrics
        else:
            metric_names = [main] if main else []
            values = {}
        for metric in metric_names:
            is_main = metric == main
            rows.append(
                {
                    **base,
                    "metric": metric,
                    "value": _to_float(values.get(metric)) if result.ok else math.nan,
                    "float_value": _to_float(result.float_metrics.get(metric)),
                    "main_metric": is_main,
                    "higher_is_better": (
                        bool(result.higher_is_better) if is_main else metric_higher_is_better(metric)
                    ),
                }
            )
        if not metric_names:  # a failed result of a task whose metrics nobody reported
            rows.append(
                {
                    **base,
                    "metric": "",
                    "value": math.nan,
                    "float_value": math.nan,
                    "main_metric": True,
                    "higher_is_better": bool(result.higher_is_better),
                }
            )
    frame = pd.DataFrame(rows, columns=FRAME_COLUMNS)
    frame["value"] = frame["value"].astype(float)
    frame["float_value"] = frame["float_value"].astype(float)
    for column in ("main_metric", "higher_is_better", "is_float"):
        frame[column] = frame[column].astype(bool)
    return frame


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------


def _check_metrics(metrics: str) -> str:
    if metrics not in ("main", "all"):
        raise LeaderboardError(f"metrics must be 'main' or 'all', not {metrics!r}")
    return metrics


def _round_equal(a: float, b: float, decimals: int) -> bool:
    return round(a, decimals) == round(b, decimals)


def leaderboard_tidy(results: Iterable[Result], metrics: str = "main") -> pd.DataFrame:
    """One row per method/task/model/metric/bits: mean, std, n_seeds, n_failed, float, delta.

    ``float`` is the float value of the same task/model/metric (the float row's mean), ``delta``
    is ``mean - float`` for quantized cells (NaN for float rows), ``best`` marks the best
    quantized mean of its bit column (ties at display precision all count; only when at least
    two methods compete). Rows are in leaderboard order. This is what the CSV holds.
    """
    _check_metrics(metrics)
    frame = results_frame(results)
    if metrics == "main":
        frame = frame[frame["main_metric"]]
    # Failed results of a task that never named a metric have metric "": they only get a column
    # when nothing else is known (they always appear in the failed-cells footer).
    frame = frame[frame["metric"] != ""] if (frame["metric"] != "").any() else frame
    if frame.empty:
        return pd.DataFrame(columns=TIDY_COLUMNS)

    ok = frame[(frame["status"] == STATUS_OK) & frame["value"].notna()]
    keys = ["method", "task", "model", "metric", "bits"]
    stats = (
        ok.groupby(keys, sort=False)["value"]
        .agg(mean="mean", std=lambda v: v.std(ddof=1), n_seeds="count")
        .reset_index()
    )

    # Failed cells count for every shown metric of their task/model.
    failed = frame[frame["status"] != STATUS_OK]
    failed_counts = (
        failed.groupby(["method", "task", "model", "bits"], sort=False)["seed"]
        .nunique()
        .rename("n_failed")
        .reset_index()
    )
    shown = frame[frame["status"] == STATUS_OK][["task", "model", "metric"]].drop_duplicates()
    fallback = failed[["task", "model", "metric"]].drop_duplicates()
    shown = pd.concat([shown, fallback]).drop_duplicates()
    failed_cells = failed_counts.merge(shown, on=["task", "model"], how="inner")
    tidy = stats.merge(failed_cells, on=keys, how="outer")
    tidy["n_seeds"] = tidy["n_seeds"].fillna(0).astype(int)
    tidy["n_failed"] = tidy["n_failed"].fillna(0).astype(int)

    # Direction and main flag per task/metric (from the raw rows).
    meta = frame.groupby(["task", "metric"], sort=False).agg(
        higher_is_better=("higher_is_better", "first"), main_metric=("main_metric", "first")
    )
    tidy = tidy.merge(meta.reset_index(), on=["task", "metric"], how="left")
    tidy["is_float"] = False

    # Float rows: methods whose every result ran at bits "fp" (fp32 first).
    by_method = frame.groupby("method", sort=False)["is_float"].all()
    float_methods = sorted(
        (m for m, only_fp in by_method.items() if only_fp),
        key=lambda m: (m != FLOAT_METHOD, str(m).lower()),
    )
    tidy.loc[tidy["method"].isin(float_methods), "is_float"] = True

    # The float value of each task/model/metric: the first float method that has it, ...
    reference: dict[tuple[str, str, str], float] = {}
    for method in float_methods:
        rows = tidy[(tidy["method"] == method) & (tidy["n_seeds"] > 0)]
        for row in rows.itertuples(index=False):
            reference.setdefault((row.task, row.model, row.metric), row.mean)

    # ... else the float_metrics the results carry (a float row labelled as a reference).
    groups = tidy[["task", "model", "metric"]].drop_duplicates()
    missing = [g for g in groups.itertuples(index=False, name=None) if g not in reference]
    carried = frame[frame["float_value"].notna()]
    extra_rows: list[dict[str, Any]] = []
    for task, model, metric in missing:
        sub = carried[
            (carried["task"] == task) & (carried["model"] == model) & (carried["metric"] == metric)
        ]
        if sub.empty:
            continue
        per_seed = sub.groupby("seed", sort=True)["float_value"].first()
        if per_seed.nunique() <= 1:  # one shared float baseline, not a seeded measurement
            mean, std, n = float(per_seed.iloc[0]), math.nan, 1
        else:
            mean, std, n = float(per_seed.mean()), float(per_seed.std(ddof=1)), len(per_seed)
        reference[(task, model, metric)] = mean
        meta_row = meta.loc[(task, metric)]
        extra_rows.append(
            {
                "method": FLOAT_REFERENCE_LABEL,
                "task": task,
                "model": model,
                "metric": metric,
                "bits": "fp",
                "mean": mean,
                "std": std,
                "n_seeds": n,
                "n_failed": 0,
                "higher_is_better": bool(meta_row["higher_is_better"]),
                "main_metric": bool(meta_row["main_metric"]),
                "is_float": True,
            }
        )
    if extra_rows:
        float_methods.append(FLOAT_REFERENCE_LABEL)
        tidy = pd.concat([tidy, pd.DataFrame(extra_rows)], ignore_index=True)

    tidy["float"] = [
        reference.get((t, m, k), math.nan)
        for t, m, k in zip(tidy["task"], tidy["model"], tidy["metric"], strict=True)
    ]
    tidy["delta"] = (tidy["mean"] - tidy["float"]).where(~tidy["is_float"])

    # Best quantized value of each column.
    tidy["best"] = False
    candidates = tidy[~tidy["is_float"] & (tidy["bits"] != "fp") & tidy["mean"].notna()]
    for _, group in candidates.groupby(["task", "model", "metric", "bits"], sort=False):
        if len(group) < 2:
            continue
        higher = bool(group["higher_is_better"].iloc[0])
        best = group["mean"].max() if higher else group["mean"].min()
        decimals = metric_decimals(group["metric"].iloc[0])
        winners = group.index[[_round_equal(v, best, decimals) for v in group["mean"]]]
        tidy.loc[winners, "best"] = True

    # Leaderboard order: float rows first, then methods; tasks, models; main metric first; bits.
    quantized = sorted(
        (m for m in tidy["method"].unique() if m not in float_methods), key=lambda m: str(m).lower()
    )
    method_rank = {m: i for i, m in enumerate([*float_methods, *quantized])}
    tidy = tidy.assign(
        _m=tidy["method"].map(method_rank),
        _main=~tidy["main_metric"].astype(bool),
        _b=[_bits_key(b)[0] for b in tidy["bits"]],
    )
    tidy = tidy.sort_values(
        ["_m", "task", "model", "_main", "metric", "_b", "bits"], key=_sort_key, kind="stable"
    )
    tidy = tidy.drop(columns=["_m", "_main", "_b"]).reset_index(drop=True)
    for column in ("higher_is_better", "main_metric", "is_float", "best"):
        tidy[column] = tidy[column].astype(bool)
    return tidy[TIDY_COLUMNS]


def _sort_key(column: pd.Series) -> pd.Series:
    """Sort strings case-insensitively, everything else as is."""
    if pd.api.types.is_string_dtype(column) or column.dtype == object:
        return column.astype(str).str.lower()
    return column


@dataclass
class Leaderboard:
    """Numeric wide frames: rows are methods, columns a MultiIndex (task, model, metric, bits)."""

    mean: pd.DataFrame
    std: pd.DataFrame
    n: pd.DataFrame
    n_failed: pd.DataFrame
    float: pd.DataFrame
    delta: pd.DataFrame
    best: pd.DataFrame
    #: Direction of each column (indexed like the frames' columns).
    higher_is_better: pd.Series
    #: Row labels of the float rows (they come first).
    float_rows: list[str]
    #: The failed cells: task, model, method, bits, seed, error.
    failed: pd.DataFrame
    #: The long form (see :func:`leaderboard_tidy`).
    tidy: pd.DataFrame
    metrics: str = "main"

    @property
    def empty(self) -> bool:
        return self.mean.empty

    @property
    def methods(self) -> list[str]:
        return list(self.mean.index)

    @property
    def columns(self) -> pd.MultiIndex:
        return self.mean.columns  # type: ignore[return-value]

    def decimals(self, column: tuple[str, str, str, str]) -> int:
        return metric_decimals(column[2])


def leaderboard_frames(results: Iterable[Result], metrics: str = "main") -> Leaderboard:
    """The numeric frames behind every format (mean, std, n, n_failed, float, delta, best)."""
    items = list(results)
    tidy = leaderboard_tidy(items, metrics)
    raw = results_frame(items)
    failed = (
        raw[raw["status"] != STATUS_OK][["task", "model", "method", "bits", "seed", "error"]]
        .drop_duplicates()
        .assign(_b=lambda f: [_bits_key(b)[0] for b in f["bits"]])
        .sort_values(["task", "model", "method", "_b", "bits", "seed"], key=_sort_key, kind="stable")
        .drop(columns="_b")
        .reset_index(drop=True)
    )

    methods = list(dict.fromkeys(tidy["method"]))
    float_rows = list(dict.fromkeys(tidy.loc[tidy["is_float"], "method"]))
    # Column order: tasks, models, main metric first, bits in SUPPORTED_BITS order.
    col_frame = tidy[["task", "model", "metric", "bits", "main_metric"]].drop_duplicates(
        subset=COLUMN_LEVELS
    )
    col_frame = col_frame.assign(
        _main=~col_frame["main_metric"], _b=[_bits_key(b)[0] for b in col_frame["bits"]]
    )
    col_frame = col_frame.sort_values(
        ["task", "model", "_main", "metric", "_b", "bits"], key=_sort_key, kind="stable"
    )
    columns = pd.MultiIndex.from_frame(col_frame[COLUMN_LEVELS], names=COLUMN_LEVELS)
    index = pd.Index(methods, name="method")

    def wide(value: str, fill: Any = None) -> pd.DataFrame:
        if tidy.empty:
            return pd.DataFrame(index=index, columns=columns, dtype=float)
        table = tidy.pivot(index="method", columns=COLUMN_LEVELS, values=value)
        table = table.reindex(index=index, columns=columns)
        return table if fill is None else table.astype(object).where(table.notna(), fill)

    mean = wide("mean", None).astype(float)
    std = wide("std", None).astype(float)
    n = wide("n_seeds", 0).astype(int)
    n_failed = wide("n_failed", 0).astype(int)
    float_ = wide("float", None).astype(float)
    delta = wide("delta", None).astype(float)
    best = wide("best", False).astype(bool)
    direction = (
        tidy.drop_duplicates(subset=COLUMN_LEVELS)
        .set_index(COLUMN_LEVELS)["higher_is_better"]
        .reindex(columns)
        .astype(bool)
        if not tidy.empty
        else pd.Series(dtype=bool)
    )
    return Leaderboard(
        mean=mean,
        std=std,
        n=n,
        n_failed=n_failed,
        float=float_,
        delta=delta,
        best=best,
        higher_is_better=direction,
        float_rows=float_rows,
        failed=failed,
        tidy=tidy,
        metrics=metrics,
    )


# --------------------------------------------------------------------------------------------
# Cell text
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Style:
    """How one output format writes the pieces of a cell."""

    pm: str = " ± "
    minus: str = "\u2212"
    missing: str = "\u2013"
    bold: Callable[[str], str] = staticmethod(lambda text: text)  # type: ignore[assignment]
    failed: Callable[[int], str] = staticmethod(lambda k: f"{k} failed")  # type: ignore[assignment]


_PLAIN = _Style()
_MARKDOWN = _Style(bold=lambda text: f"**{text}**")
_LATEX = _Style(
    pm=r" $\pm$ ",
    minus="$-$",
    missing="--",
    bold=lambda text: rf"\textbf{{{text}}}",
)


def _number(value: float, decimals: int, minus: str) -> str:
    text = f"{value:.{decimals}f}"
    if text.startswith("-"):
        text = text[1:]
        if float(text) == 0:
            return text
        return minus + text
    return text


def _signed(value: float, decimals: int, minus: str) -> str:
    text = _number(value, decimals, minus)
    if float(f"{abs(value):.{decimals}f}") == 0:
        return f"{0:.{decimals}f}"
    return text if value < 0 else f"+{text}"


def _cell_text(lb: Leaderboard, method: str, column: tuple[str, ...], style: _Style) -> str:
    """The text of one cell, or "" where the row has no entry by construction."""
    is_float_row = method in lb.float_rows
    is_fp_column = column[3] == "fp"
    n = int(lb.n.at[method, column])
    k = int(lb.n_failed.at[method, column])
    if n == 0 and k == 0:
        if is_float_row != is_fp_column:
            return ""  # float rows have only fp columns, quantized rows only bit columns
        return style.missing
    if n == 0:
        return style.failed(k)
    decimals = metric_decimals(column[2])
    text = _number(float(lb.mean.at[method, column]), decimals, style.minus)
    std = lb.std.at[method, column]
    if n > 1 and pd.notna(std):
        text += style.pm + _number(float(std), decimals, style.minus)
    if bool(lb.best.at[method, column]):
        text = style.bold(text)
    delta = lb.delta.at[method, column]
    if not is_float_row and pd.notna(delta):
        text += f" ({_signed(float(delta), decimals, style.minus)})"
    if k:
        text += f" [{style.failed(k)}]"
    return text


def _text_frame(lb: Leaderboard, style: _Style) -> pd.DataFrame:
    data = {
        column: [_cell_text(lb, method, column, style) for method in lb.methods]
        for column in lb.columns
    }
    frame = pd.DataFrame(data, index=lb.mean.index, columns=lb.columns, dtype=object)
    return frame


def leaderboard_table(results: Iterable[Result], metrics: str = "main") -> pd.DataFrame:
    """Text table: methods as rows (float first), columns (task, model, metric, bits).

    Cells read ``mean`` (one seed) or ``mean ± std`` (several), then the difference to float in
    parentheses, e.g. ``71.23 ± 0.10 (−1.05)``; ``k failed`` counts failed seeds; ``–`` marks a
    cell that did not run. The numeric frames are in :func:`leaderboard_frames`.
    """
    return _text_frame(leaderboard_frames(results, metrics), _PLAIN)


# --------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------


def _legend(lb: Leaderboard) -> str:
    several = (lb.n > 1).to_numpy().any()
    seeds = "mean ± std over seeds (sample std)" if several else "the value of one seed"
    return (
        f"{CAPTION} Cells: {seeds}; in parentheses the difference to the float model of the same "
        "task/model/metric; best quantized value per column in bold."
    )


def _failed_lines(lb: Leaderboard) -> list[str]:
    lines = []
    for row in lb.failed.itertuples(index=False):
        line = f"{row.task} / {row.model} / {row.method} / {row.bits} / seed {row.seed}"
        if row.error:
            line += f": {row.error}"
        lines.append(line)
    return lines


def _flat_header(column: tuple[str, ...], sep: str = " · ") -> str:
    return sep.join(str(part) for part in column)


def _md_escape(text: str) -> str:
    return str(text).replace("|", r"\|").replace("\n", " ")


def _render_markdown(lb: Leaderboard) -> str:
    if lb.empty:
        return "_No results._\n"
    frame = _text_frame(lb, _MARKDOWN)
    frame.columns = [_md_escape(_flat_header(c)) for c in frame.columns]
    frame.index = [_md_escape(m) for m in frame.index]
    frame.index.name = "method"
    frame = frame.map(_md_escape)
    align = ["left"] + ["right"] * len(frame.columns)
    table = frame.to_markdown(colalign=align, disable_numparse=True)
    parts = [table, "", _legend(lb)]
    failed = _failed_lines(lb)
    if failed:
        parts += ["", f"Failed cells ({len(failed)}):", ""]
        parts += [f"- {_md_escape(line)}" for line in failed]
    return "\n".join(parts) + "\n"


def _latex_escape(text: str) -> str:
    replacements = {
        "\\": r"\textbackslash{}",
        "&": r"\&",
        "%": r"\%",
        "$": r"\$",
        "#": r"\#",
        "_": r"\_",
        "{": r"\{",
        "}": r"\}",
        "~": r"\textasciitilde{}",
        "^": r"\textasciicircum{}",
    }
    return "".join(replacements.get(ch, ch) for ch in str(text))


def _render_latex(lb: Leaderboard) -> str:
    if lb.empty:
        return "% benchsuite leaderboard: no results\n"
    frame = _text_frame(lb, _LATEX)
    # Escape labels ourselves (cells are already LaTeX); name the bits level "Method" so the
    # last header row labels the row index.
    frame.index = pd.Index([_latex_escape(m) for m in frame.index])
    frame.columns = pd.MultiIndex.from_tuples(
        [tuple(_latex_escape(p) for p in c) for c in frame.columns],
        names=[None, None, None, "Method"],
    )
    styler = frame.style
    caption = _latex_escape(_legend(lb)).replace("±", r"$\pm$")
    latex = styler.to_latex(
        hrules=True,
        multicol_align="c",
        column_format="l" + "r" * len(frame.columns),
        caption=caption,
        label="tab:leaderboard",
        position_float="centering",
    )
    lines = latex.splitlines()
    # A rule between the float rows and the quantized methods.
    n_float = len(lb.float_rows)
    if 0 < n_float < len(lb.methods):
        mid = lines.index(r"\midrule")
        lines.insert(mid + 1 + n_float, r"\midrule")
    failed = _failed_lines(lb)
    if failed:
        note = r"\par\smallskip\footnotesize Failed cells: " + "; ".join(
            _latex_escape(line) for line in failed
        ) + "."
        end = max(i for i, line in enumerate(lines) if line.startswith(r"\end{table}"))
        lines.insert(end, note)
    header = [
        "% benchsuite leaderboard (needs \\usepackage{booktabs})",
    ]
    return "\n".join(header + lines) + "\n"


_HTML_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em; }
table.leaderboard { border-collapse: collapse; font-size: 0.9em; }
table.leaderboard caption { caption-side: top; text-align: left; margin-bottom: 0.5em; }
table.leaderboard th, table.leaderboard td { padding: 0.25em 0.6em; border-bottom: 1px solid #ddd; }
table.leaderboard td { text-align: right; font-variant-numeric: tabular-nums; }
table.leaderboard th { text-align: center; }
table.leaderboard tbody th { text-align: left; }
.failed { color: #a00; font-size: 0.9em; }
""".strip()


def _render_html(lb: Leaderboard, images: Sequence[str] = ()) -> str:
    """The styled table, its failed cells and, when given, the plots (paths relative to the page)."""
    title = "benchsuite leaderboard"
    head_css = ""
    if lb.empty:
        body = "<p>No results.</p>"
    else:
        frame = _text_frame(lb, _PLAIN)
        frame.columns = frame.columns.set_names(COLUMN_LEVELS)
        cell_css = pd.DataFrame(
            np.where(lb.best.to_numpy(), "font-weight: bold", ""),
            index=frame.index,
            columns=frame.columns,
        )
        cell_css.loc[cell_css.index.isin(lb.float_rows)] = "background-color: #f4f4f4"
        styler = (
            frame.style.set_uuid("leaderboard")
            .format(escape="html")
            .format_index(escape="html", axis=0)
            .format_index(escape="html", axis=1)
            .set_caption(html.escape(_legend(lb)))
            .set_table_attributes('class="leaderboard"')
            .apply(lambda _: cell_css, axis=None)
        )
        body = styler.to_html()
        if body.lstrip().startswith("<style"):  # the Styler's cell styles belong in <head>
            end = body.index("</style>") + len("</style>")
            head_css, body = body[:end].strip() + "\n", body[end:].lstrip()
        failed = _failed_lines(lb)
        if failed:
            items = "\n".join(f"  <li>{html.escape(line)}</li>" for line in failed)
            body += (
                f'\n<div class="failed"><p>Failed cells ({len(failed)}), kept out of the numbers:'
                f"</p>\n<ul>\n{items}\n</ul></div>"
            )
        if images:
            figures = "\n".join(
                f'<figure><img src="{html.escape(src)}" alt="{html.escape(Path(src).stem)}"></figure>' for src in images
            )
            body += f"\n<h2>Main metric versus bit width</h2>\n{figures}"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{title}</title>\n<style>\n{_HTML_STYLE}\n</style>\n{head_css}</head>\n<body>\n"
        f"<h1>{title}</h1>\n{body}\n</body>\n</html>\n"
    )


def _render_csv(lb: Leaderboard) -> str:
    # 10 significant digits: full precision for any metric, without binary noise (75.1, not
    # 75.10000000000001).
    return lb.tidy.to_csv(index=False, float_format="%.10g")


_RENDERERS: dict[str, Callable[[Leaderboard], str]] = {
    "md": _render_markdown,
    "csv": _render_csv,
    "tex": _render_latex,
    "html": _render_html,
}


def render(results: Iterable[Result], fmt: str, metrics: str = "main") -> str:
    """The leaderboard as ``md`` (Markdown), ``csv`` (tidy), ``tex`` (booktabs) or ``html``."""
    renderer = _RENDERERS.get(fmt)
    if renderer is None:
        raise LeaderboardError(f"unknown format {fmt!r}; choose from {', '.join(_RENDERERS)}")
    return renderer(leaderboard_frames(results, metrics))


def write_reports(
    results: Iterable[Result], out_dir: Path | str, metrics: str = "main"
) -> dict[str, Path]:
    """Write leaderboard.{md,csv,tex,html} and the plots into ``out_dir``; return {format: path}.

    The plots (main metric versus bit width, one PNG per task/model under ``plots/``) are embedded
    in the HTML page.
    """
    lb = leaderboard_frames(list(results), metrics)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for fmt, name in FORMATS.items():
        path = out / name
        text = write_html_with_plots(lb, path) if fmt == "html" else _RENDERERS[fmt](lb)
        path.write_text(text, encoding="utf-8")
        paths[fmt] = path
    return paths


def write_html_with_plots(lb: Leaderboard, page: Path) -> str:
    """The HTML page for ``page``, its plots written to ``plots/`` beside it."""
    from benchsuite.plots import PLOT_DIR, plot_accuracy_vs_bits

    if lb.empty:
        return _render_html(lb)
    plots = plot_accuracy_vs_bits(lb.tidy, page.parent / PLOT_DIR)
    return _render_html(lb, [plot.relative_to(page.parent).as_posix() for plot in plots])


def console_table(results: Iterable[Result], metrics: str = "main") -> Any:
    """Rich tables for the terminal: one per task / model / metric, methods as rows, bits as columns.

    The Markdown layout puts every group side by side, which a terminal cannot show; stacking the
    groups keeps each table narrow enough to read at 80 columns.
    """
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    lb = leaderboard_frames(results, metrics)
    plain = _text_frame(lb, _PLAIN) if not lb.empty else None
    groups: dict[tuple, list] = {}
    for column in lb.columns:
        groups.setdefault(tuple(column[:-1]), []).append(column)
    tables = []
    for group, columns in groups.items():
        table = Table(title=" · ".join(str(part) for part in group), title_justify="left")
        table.add_column("method", justify="left", no_wrap=True)
        for column in columns:
            table.add_column(str(column[-1]), justify="right")
        for i, method in enumerate(lb.methods):
            cells = [
                Text(plain.at[method, column] if plain is not None else "",
                     style="bold" if bool(lb.best.at[method, column]) else "")
                for column in columns
            ]
            if not any(cell.plain for cell in cells):
                continue
            last_float = i == len(lb.float_rows) - 1 and len(lb.float_rows) < len(lb.methods)
            table.add_row(Text(str(method)), *cells, end_section=last_float)
        tables.append(table)
    footer = _legend(lb)
    for line in _failed_lines(lb):
        footer = f"{footer}\nfailed: {line}"
    return Group(*tables, Text(footer))
