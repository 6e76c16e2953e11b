"""Accuracy-versus-bits plots: the numbers of the tables, one PNG per task/model, in the HTML page."""

from __future__ import annotations

from PIL import Image

from benchsuite.bits import parse_bits_list
from benchsuite.commands.report import report
from benchsuite.leaderboard import leaderboard_tidy, write_reports
from benchsuite.plots import bit_order, bit_plots
from benchsuite.results import ResultStore
from benchsuite.runner import PlanRequest, RunSettings, plan_cells, run_cells


def test_bit_order_is_fewest_bits_first():
    assert sorted(["w8a8", "w4a8", "w3a3", "w6a6", "fp", "odd"], key=bit_order) == [
        "w3a3", "w4a8", "w6a6", "w8a8", "fp", "odd"]  # 12 bits each: ties by name


def test_plots_show_the_leaderboard_numbers_and_sit_in_the_html(toy_plugins, tmp_path):
    request = PlanRequest(methods=["fp32", "minmax", "repq-vit"], tasks=["toy"], bits=parse_bits_list("w8a8,w4a4"),
                          seeds=[0, 1])
    run_cells(plan_cells(request, RunSettings(out_dir=tmp_path)), RunSettings(out_dir=tmp_path))
    results = list(ResultStore(tmp_path).results())
    tidy = leaderboard_tidy(results)

    (plot,) = bit_plots(tidy)
    assert (plot.task, plot.model, plot.metric) == ("toy", "toy-vit", "top1")
    assert plot.settings == ["w4a4", "w8a8"] and set(plot.lines) == {"minmax", "repq-vit"}
    assert plot.float_label == "fp32" and plot.float_value == 100.0
    for method, points in plot.lines.items():
        for bits, mean, std in points:
            row = tidy[(tidy.method == method) & (tidy.bits == bits)].iloc[0]
            assert mean == row["mean"] and std == row["std"]

    write_reports(results, tmp_path)
    png = tmp_path / "plots" / "toy__toy-vit.png"
    assert Image.open(png).format == "PNG"
    assert '<img src="plots/toy__toy-vit.png"' in (tmp_path / "leaderboard.html").read_text()

    page = tmp_path / "elsewhere" / "board.html"
    assert report(tmp_path, "html", page, "main") == 0
    assert (page.parent / "plots" / "toy__toy-vit.png").is_file()


def test_float_only_results_give_no_plot(toy_plugins, tmp_path):
    request = PlanRequest(methods=["fp32"], tasks=["toy"], bits=parse_bits_list("w8a8"))
    run_cells(plan_cells(request, RunSettings(out_dir=tmp_path)), RunSettings(out_dir=tmp_path))
    assert bit_plots(leaderboard_tidy(list(ResultStore(tmp_path).results()))) == []
    write_reports(list(ResultStore(tmp_path).results()), tmp_path)
    assert "<img" not in (tmp_path / "leaderboard.html").read_text()
