"""Accuracy-versus-bit-width plots of a leaderboard, one PNG per task and model.

A paper's figure of a PTQ comparison is the main metric against the bit setting, one line per
method, with the float model as a reference line. The plots are drawn from the leaderboard's tidy
frame (:func:`benchsuite.leaderboard.leaderboard_tidy`), so they show exactly the numbers of the
tables: the mean over seeds, with the standard deviation as error bars where there are several.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from benchsuite.api import safe_name
from benchsuite.bits import BitSpec
from benchsuite.errors import BitSpecError

__all__ = ["PLOT_DIR", "BitPlot", "bit_order", "bit_plots", "plot_accuracy_vs_bits"]

#: Folder of the PNGs, relative to the report they belong to.
PLOT_DIR = "plots"


def bit_order(bits: str) -> tuple[float, str]:
    """Sort key: fewest bits (weights + activations) first, unknown labels last."""
    try:
        spec = BitSpec.parse(bits)
    except BitSpecError:
        return (math.inf, bits)
    if spec.w_bits is None or spec.a_bits is None:
        return (math.inf, bits)
    return (spec.w_bits + spec.a_bits, bits)


@dataclass
class BitPlot:
    """What one plot shows: per method, (bits, mean, std) points in bit order, and the float line."""

    task: str
    model: str
    metric: str
    settings: list[str]
    lines: dict[str, list[tuple[str, float, float]]]
    float_label: str | None = None
    float_value: float | None = None


def bit_plots(tidy: pd.DataFrame) -> list[BitPlot]:
    """The plots of a tidy leaderboard: the main metric of each task/model with quantized results."""
    main = tidy[tidy["main_metric"] & (tidy["n_seeds"] > 0)]
    plots: list[BitPlot] = []
    for (task, model), group in main.groupby(["task", "model"], sort=False):
        quantized = group[~group["is_float"]]
        if quantized.empty:
            continue
        lines: dict[str, list[tuple[str, float, float]]] = {}
        for method, rows in quantized.groupby("method", sort=False):
            points = [(str(r.bits), float(r.mean), 0.0 if pd.isna(r.std) else float(r.std)) for r in rows.itertuples()]
            lines[str(method)] = sorted(points, key=lambda point: bit_order(point[0]))
        floats = group[group["is_float"]]
        plots.append(BitPlot(
            str(task), str(model), str(group["metric"].iloc[0]),
            sorted(quantized["bits"].unique(), key=bit_order), lines,
            None if floats.empty else str(floats["method"].iloc[0]),
            None if floats.empty else float(floats["mean"].iloc[0]),
        ))
    return plots


def plot_accuracy_vs_bits(tidy: pd.DataFrame, out_dir: Path | str) -> list[Path]:
    """Write ``<task>__<model>.png`` into ``out_dir`` for each of :func:`bit_plots`; return the paths."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    written: list[Path] = []
    for plot in bit_plots(tidy):
        positions = {bits: i for i, bits in enumerate(plot.settings)}
        figure, axes = plt.subplots(figsize=(1.2 * len(plot.settings) + 6.5, 3.6), dpi=120)
        for method, points in plot.lines.items():
            std = [p[2] for p in points]
            axes.errorbar([positions[p[0]] for p in points], [p[1] for p in points],
                          yerr=std if any(std) else None, marker="o", capsize=3, label=method)
        if plot.float_value is not None:
            axes.axhline(plot.float_value, color="0.4", linestyle="--", linewidth=1, label=f"{plot.float_label} (float)")
        axes.set_xticks(range(len(plot.settings)), plot.settings)
        axes.set_xlabel("bits (weights / activations)")
        axes.set_ylabel(plot.metric)
        axes.set_title(f"{plot.task} · {plot.model}", fontsize=10)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # beside the lines
        figure.tight_layout()
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{safe_name(plot.task)}__{safe_name(plot.model)}.png"
        figure.savefig(path)
        plt.close(figure)
        written.append(path)
    return written
