"""``benchsuite bench``: what each method costs, as ratios to the float model measured in the same run.

For one timm model (random weights: timing does not depend on them) and each method:

- **calibration**: wall time of ``method.quantize`` on N images, and its ratio to one float
  forward over the same N images;
- **reconstruction steps**: the time spent inside the engine's optimisation loops
  (:func:`benchsuite.quant.reconstruct.optimize_unit`), the number of steps, the time per step;
- **achieved FLOP/s** in those loops: their matmul/conv FLOPs (counted by
  ``torch.utils.flop_counter`` in a second, identical quantization) over their time, and that as
  a share of a matmul peak measured on the spot (a large square ``torch.mm``, best of several);
- **peak memory**: the CUDA allocator's peak, or on CPU the process's max RSS (a high-water mark
  of the whole process, so methods are measured in order and the value only grows);
- **fake-quant evaluation**: the quantized model over M images against the float model over the
  same M images, alternated and the median of ``repeats`` taken, because shared machines are noisy.

Goals (issue 8): evaluation at most 1.5x float; at least 40 % of matmul peak in reconstruction steps.

    benchsuite bench --methods repq-vit,isvit --model deit_small_patch16_224 --iters 10
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchsuite import registry
from benchsuite.api import CalibrationSet
from benchsuite.bits import BitSpec
from benchsuite.environment import PeakMemory

__all__ = ["BenchRow", "EVAL_GOAL", "PEAK_SHARE_GOAL", "bench_method", "matmul_peak_flops", "run_bench"]

EVAL_GOAL = 1.5
PEAK_SHARE_GOAL = 0.40


@dataclass
class BenchRow:
    """One method's figures (seconds, FLOP/s, MiB); ratios are to the float model, same run."""

    method: str
    calibration_seconds: float
    float_forward_seconds: float
    calibration_ratio: float
    steps: int
    step_seconds: float
    step_flops: float
    achieved_flops_per_second: float | None
    peak_share: float | None
    eval_seconds: float
    float_eval_seconds: float
    eval_ratio: float
    peak_memory_mb: float
    memory_kind: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def matmul_peak_flops(device: str = "cpu", size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` square float32 matmuls: the on-the-spot peak."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


@contextlib.contextmanager
def _watch_optimize_unit(count_flops: bool) -> Iterator[dict[str, float]]:
    """Time (or count the FLOPs of) every ``optimize_unit`` call made inside the block."""
    from benchsuite.quant import reconstruct as engine

    totals = {"seconds": 0.0, "steps": 0, "flops": 0.0}
    original = engine.optimize_unit

    def watched(context, plan, **kwargs):
        if count_flops:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                report = original(context, plan, **kwargs)
            totals["flops"] += counter.get_total_flops()
        else:
            start = time.perf_counter()
            report = original(context, plan, **kwargs)
            totals["seconds"] += time.perf_counter() - start
        totals["steps"] += report.iters
        return report

    engine.optimize_unit = watched
    try:
        yield totals
    finally:
        engine.optimize_unit = original


def _forward_all(model: nn.Module, images: torch.Tensor, batch_size: int) -> None:
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            model(images[start : start + batch_size])


def _timed(fn: Callable[[], Any], device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def bench_method(
    method_name: str,
    make_model: Callable[[], nn.Module],
    calib: torch.Tensor,
    evaluation: torch.Tensor,
    bits: BitSpec,
    *,
    overrides: dict[str, str] | None = None,
    batch_size: int = 32,
    repeats: int = 3,
    device: str = "cpu",
    peak: float | None = None,
) -> BenchRow:
    """Measure one method; ``make_model`` returns a fresh float model on ``device``."""
    from benchsuite.quant.adapters import adapt

    method = registry.methods.get(method_name)()
    config = method.default_config().with_overrides(dict(overrides or {})).resolve(bits)
    ids = [str(i) for i in range(len(calib))]
    float_model = make_model()
    _forward_all(float_model, calib[:2], 2)  # warm-up
    float_forward = statistics.median(_timed(lambda: _forward_all(float_model, calib, len(calib)), device)
                                      for _ in range(repeats))

    canonical = adapt(make_model())
    with PeakMemory(device) as memory, _watch_optimize_unit(count_flops=False) as timing:
        calibration = CalibrationSet.from_tensor(calib, ids, "random", 0)
        seconds = _timed(lambda: method.quantize(canonical, calibration, bits, config), device)
    steps = int(timing["steps"])
    flops = 0.0
    if steps:  # the same quantization again, counting FLOPs (the counter's overhead spoils timing)
        with _watch_optimize_unit(count_flops=True) as counting:
            method.quantize(adapt(make_model()), CalibrationSet.from_tensor(calib, ids, "random", 0), bits, config)
        flops = counting["flops"]

    eval_quant, eval_float = [], []
    for _ in range(repeats):
        eval_float.append(_timed(lambda: _forward_all(float_model, evaluation, batch_size), device))
        eval_quant.append(_timed(lambda: _forward_all(canonical, evaluation, batch_size), device))
    achieved = flops / timing["seconds"] if steps and timing["seconds"] > 0 else None
    return BenchRow(
        method=method.name,
        calibration_seconds=seconds,
        float_forward_seconds=float_forward,
        calibration_ratio=seconds / float_forward,
        steps=steps,
        step_seconds=timing["seconds"] / steps if steps else 0.0,
        step_flops=flops / steps if steps else 0.0,
        achieved_flops_per_second=achieved,
        peak_share=achieved / peak if achieved is not None and peak else None,
        eval_seconds=statistics.median(eval_quant),
        float_eval_seconds=statistics.median(eval_float),
        eval_ratio=statistics.median(q / f for q, f in zip(eval_quant, eval_float)),
        peak_memory_mb=memory.megabytes(),
        memory_kind=memory.kind,
    )


def run_bench(
    methods: Sequence[str],
    model: str,
    bits: BitSpec,
    *,
    calib_size: int = 32,
    eval_images: int = 64,
    batch_size: int = 32,
    iters: int | None = 10,
    budget: str | None = "fast",
    repeats: int = 3,
    device: str = "cpu",
    image_size: int = 224,
) -> tuple[float, list[BenchRow]]:
    """The matmul peak and one :class:`BenchRow` per method, in order."""
    import timm

    generator = torch.Generator().manual_seed(0)
    calib = torch.randn(calib_size, 3, image_size, image_size, generator=generator).to(device)
    evaluation = torch.randn(eval_images, 3, image_size, image_size, generator=generator).to(device)

    def make_model() -> nn.Module:
        torch.manual_seed(0)
        return timm.create_model(model, pretrained=False).eval().to(device)

    peak = matmul_peak_flops(device)
    rows = []
    for name in methods:
        fields = {f.name for f in dataclasses.fields(registry.methods.get(name).config_class)}
        overrides = {"calib_size": str(calib_size)}
        if iters is not None and "iters" in fields:
            overrides["iters"] = str(iters)
        if budget is not None and "budget" in fields:
            overrides["budget"] = budget
        if "batch_size" in fields:
            overrides["batch_size"] = str(min(batch_size, calib_size))
        rows.append(bench_method(name, make_model, calib, evaluation, bits, overrides=overrides,
                                 batch_size=batch_size, repeats=repeats, device=device, peak=peak))
    return peak, rows


def print_bench(peak: float, rows: Sequence[BenchRow], header: str) -> None:
    """A rich table of the rows, with the goals' verdicts."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{header}; matmul peak {peak / 1e9:.1f} GFLOP/s", title_justify="left")
    for column in ("method", "calib s", "calib/float fwd", "steps", "ms/step", "GFLOP/s", "% peak",
                   "eval/float", "peak MiB"):
        table.add_column(column, justify="right" if column != "method" else "left", no_wrap=column == "method")
    for row in rows:
        share = "-" if row.peak_share is None else f"{100 * row.peak_share:.0f}%"
        table.add_row(
            row.method,
            f"{row.calibration_seconds:.2f}",
            f"{row.calibration_ratio:.1f}x",
            str(row.steps),
            f"{1000 * row.step_seconds:.1f}" if row.steps else "-",
            f"{row.achieved_flops_per_second / 1e9:.1f}" if row.achieved_flops_per_second else "-",
            share,
            f"{row.eval_ratio:.2f}x" + ("" if row.eval_ratio <= EVAL_GOAL else " !"),
            f"{row.peak_memory_mb:.0f}",
        )
    console = Console()
    console.print(table)
    console.print(f"goals: eval/float <= {EVAL_GOAL}x ('!' marks a miss); reconstruction steps >= "
                  f"{100 * PEAK_SHARE_GOAL:.0f}% of matmul peak. Peak memory: {rows[0].memory_kind if rows else ''}.",
                  highlight=False)


def write_json(path: Path, peak: float, rows: Sequence[BenchRow], settings: dict[str, Any]) -> None:
    from benchsuite.environment import library_versions

    path.write_text(json.dumps({"settings": settings, "matmul_peak_flops": peak, "versions": library_versions(),
                                "rows": [row.to_dict() for row in rows]}, indent=2))
