"""The leaderboard: aggregation over seeds, delta to float, and the four output formats."""

from __future__ import annotations

import io
import math
import re
import statistics

import pandas as pd
import pytest

from benchsuite.bits import SUPPORTED_BITS
from benchsuite.errors import BenchsuiteError
from benchsuite.leaderboard import (
    FLOAT_REFERENCE_LABEL,
    TIDY_COLUMNS,
    console_table,
    leaderboard_frames,
    leaderboard_table,
    leaderboard_tidy,
    render,
    results_frame,
    write_reports,
)
from benchsuite.results import Result

FLOAT_TOP1 = 79.85
# repq_vit on imagenet/deit_s at w4a4, seeds 0, 1, 2 (the hand-checked cell).
REPQ_W4A4 = [70.1, 70.5, 71.0]
# mean 70.5333..., sample std sqrt(((-.4333)^2 + (-.0333)^2 + .4667^2) / 2) = 0.4509
REPQ_W4A4_MEAN = 70.53333333333333
REPQ_W4A4_STD = 0.45092497528228936


def make(task, model, method, bits, seed, metrics, *, status="ok", main="top1", hib=True, **kw):
    return Result(
        task=task,
        model=model,
        method=method,
        bits=bits,
        seed=seed,
        status=status,
        metrics=metrics,
        main_metric=main,
        higher_is_better=hib,
        **kw,
    )


def suite(*, with_fp32: bool = True, seeds=(0, 1, 2)) -> list[Result]:
    """Two tasks, three models, fp32 + two methods, two bit settings, one failed cell."""
    out: list[Result] = []
    float_metrics = {"top1": FLOAT_TOP1, "top5": 95.0, "kl_to_float": 0.0}
    for i, seed in enumerate(seeds):
        kw = {"float_metrics": float_metrics}
        # imagenet / deit_s: w4a4 given before w6a6 on purpose (columns must still be ordered).
        out.append(make("imagenet", "deit_s", "repq_vit", "w4a4", seed,
                        {"top1": REPQ_W4A4[i], "top5": 90.0 + i, "kl_to_float": 0.02 + 0.01 * i}, **kw))
        out.append(make("imagenet", "deit_s", "repq_vit", "w6a6", seed,
                        {"top1": 78.0 + 0.2 * i, "top5": 94.0, "kl_to_float": 0.002}, **kw))
        out.append(make("imagenet", "deit_s", "min_max", "w6a6", seed,
                        {"top1": 75.0 + 0.1 * i, "top5": 93.0, "kl_to_float": 0.005}, **kw))
        if seed == seeds[0]:
            out.append(make("imagenet", "deit_s", "min_max", "w4a4", seed,
                            {"top1": 12.0, "top5": 30.0, "kl_to_float": 0.9}, **kw))
        elif seed == seeds[1]:
            out.append(make("imagenet", "deit_s", "min_max", "w4a4", seed, {}, status="error",
                            error={"type": "RuntimeError", "message": "NaN in scale"}, **kw))
        # imagenet / vit_b: one quantized method only.
        out.append(make("imagenet", "vit_b", "repq_vit", "w4a4", seed, {"top1": 60.0 + i}))
        # digits / tiny_vit: the main metric is lower-is-better.
        for method, kl in (("repq_vit", 0.0101), ("min_max", 0.0123)):
            out.append(make("digits", "tiny_vit", method, "w8a8", seed,
                            {"kl_to_float": kl, "acc": 97.0}, main="kl_to_float", hib=False))
    if with_fp32:
        out.append(make("imagenet", "deit_s", "fp32", "fp", seeds[0],
                        {"top1": FLOAT_TOP1, "top5": 95.0, "kl_to_float": 0.0}))
        out.append(make("imagenet", "vit_b", "fp32", "fp", seeds[0], {"top1": 84.54}))
        out.append(make("digits", "tiny_vit", "fp32", "fp", seeds[0],
                        {"kl_to_float": 0.0, "acc": 98.0}, main="kl_to_float", hib=False))
    return out


COL = ("imagenet", "deit_s", "top1", "w4a4")


# --------------------------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------------------------


def test_results_frame_is_tidy_and_keeps_failures_out_of_the_numbers():
    frame = results_frame(suite())
    for column in ("task", "model", "method", "bits", "seed", "status", "metric", "value",
                   "float_value", "main_metric", "higher_is_better"):
        assert column in frame.columns
    failed = frame[frame["status"] == "error"]
    assert len(failed) == 1
    assert failed["metric"].tolist() == ["top1"] and failed["value"].isna().all()
    kl = frame[(frame["task"] == "digits") & (frame["metric"] == "kl_to_float")]
    assert kl["main_metric"].all() and not kl["higher_is_better"].any()
    other_kl = frame[(frame["task"] == "imagenet") & (frame["metric"] == "kl_to_float")]
    assert not other_kl["main_metric"].any() and not other_kl["higher_is_better"].any()
    top5 = frame[frame["metric"] == "top5"]
    assert top5["higher_is_better"].all()
    assert (frame.loc[frame["method"] == "fp32", "bits"] == "fp").all()


def test_mean_std_n_and_failed_count():
    lb = leaderboard_frames(suite())
    assert lb.mean.at["repq_vit", COL] == pytest.approx(REPQ_W4A4_MEAN)
    assert lb.std.at["repq_vit", COL] == pytest.approx(REPQ_W4A4_STD)
    assert lb.std.at["repq_vit", COL] == pytest.approx(statistics.stdev(REPQ_W4A4))
    assert lb.n.at["repq_vit", COL] == 3
    # min_max w4a4: one ok seed, one failed seed, one never run.
    assert lb.mean.at["min_max", COL] == pytest.approx(12.0)
    assert lb.n.at["min_max", COL] == 1 and lb.n_failed.at["min_max", COL] == 1
    assert math.isnan(lb.std.at["min_max", COL])
    table = leaderboard_table(suite())
    assert table.at["repq_vit", COL].startswith("70.53 ± 0.45 ")
    assert table.at["min_max", COL] == "12.00 (\u221267.85) [1 failed]"


def test_delta_to_float():
    lb = leaderboard_frames(suite())
    assert lb.delta.at["repq_vit", COL] == pytest.approx(REPQ_W4A4_MEAN - FLOAT_TOP1)
    assert lb.float.at["repq_vit", COL] == pytest.approx(FLOAT_TOP1)
    vit_b = ("imagenet", "vit_b", "top1", "w4a4")
    assert lb.delta.at["repq_vit", vit_b] == pytest.approx(61.0 - 84.54)
    table = leaderboard_table(suite())
    assert table.at["repq_vit", COL] == "70.53 ± 0.45 (\u22129.32)"
    assert table.at["repq_vit", ("digits", "tiny_vit", "kl_to_float", "w8a8")] == (
        "0.0101 ± 0.0000 (+0.0101)"
    )


def test_float_row_first_and_only_in_fp_columns():
    table = leaderboard_table(suite())
    assert table.index[0] == "fp32"
    assert list(table.index) == ["fp32", "min_max", "repq_vit"]
    fp_cols = [c for c in table.columns if c[3] == "fp"]
    quant_cols = [c for c in table.columns if c[3] != "fp"]
    # One fp column per task/model/metric group.
    groups = {c[:3] for c in table.columns}
    assert len(fp_cols) == len(groups)
    assert table.at["fp32", ("imagenet", "deit_s", "top1", "fp")] == "79.85"
    assert all(table.at["fp32", c] == "" for c in quant_cols)
    assert all(table.at[m, c] == "" for m in ("min_max", "repq_vit") for c in fp_cols)
    # min_max never ran on vit_b: a dash, not a blank.
    assert table.at["min_max", ("imagenet", "vit_b", "top1", "w4a4")] == "\u2013"


def test_bit_columns_follow_supported_bits_order():
    table = leaderboard_table(suite())
    for group in {c[:3] for c in table.columns}:
        bits = [c[3] for c in table.columns if c[:3] == group]
        assert bits[0] == "fp"
        assert bits == sorted(bits, key=SUPPORTED_BITS.index)
    assert [c[3] for c in table.columns if c[:3] == COL[:3]] == ["fp", "w6a6", "w4a4"]
    assert table.columns.names == ["task", "model", "metric", "bits"]

    shuffled = ["w3a3", "w4a4", "w8a8", "w4a8", "w6a6"]
    results = [make("t", "m", "q", b, 0, {"top1": 50.0}) for b in shuffled]
    results.append(make("t", "m", "fp32", "fp", 0, {"top1": 80.0}))
    cols = leaderboard_table(results).columns
    assert [c[3] for c in cols] == list(SUPPORTED_BITS)


def test_main_metric_only_by_default_and_all_metrics_on_request():
    main = leaderboard_table(suite())
    assert {c[2] for c in main.columns if c[0] == "imagenet"} == {"top1"}
    assert {c[2] for c in main.columns if c[0] == "digits"} == {"kl_to_float"}
    every = leaderboard_table(suite(), metrics="all")
    assert {c[2] for c in every.columns if c[1] == "deit_s"} == {"top1", "top5", "kl_to_float"}
    # The main metric's group comes first within a task/model.
    assert [c[2] for c in every.columns if c[1] == "deit_s"][0] == "top1"
    # KL gets 4 decimals, accuracies 2.
    assert every.at["fp32", ("imagenet", "deit_s", "kl_to_float", "fp")] == "0.0000"
    assert every.at["fp32", ("imagenet", "deit_s", "top5", "fp")] == "95.00"
    # The failure counts for every metric of its cell.
    lb = leaderboard_frames(suite(), metrics="all")
    assert lb.n_failed.at["min_max", ("imagenet", "deit_s", "top5", "w4a4")] == 1
    with pytest.raises(BenchsuiteError):
        leaderboard_table(suite(), metrics="some")


def test_best_respects_direction():
    lb = leaderboard_frames(suite())
    assert lb.best.at["repq_vit", COL] and not lb.best.at["min_max", COL]
    kl = ("digits", "tiny_vit", "kl_to_float", "w8a8")
    assert lb.best.at["repq_vit", kl] and not lb.best.at["min_max", kl]  # lower is better
    # A column with a single competitor marks nothing; float rows are never marked.
    assert not lb.best[("imagenet", "vit_b", "top1", "w4a4")].any()
    assert not lb.best.loc["fp32"].any()


def test_float_row_from_float_metrics_when_no_fp32_ran():
    table = leaderboard_table(suite(with_fp32=False))
    assert table.index[0] == FLOAT_REFERENCE_LABEL
    assert table.at[FLOAT_REFERENCE_LABEL, ("imagenet", "deit_s", "top1", "fp")] == "79.85"
    lb = leaderboard_frames(suite(with_fp32=False))
    assert lb.delta.at["repq_vit", COL] == pytest.approx(REPQ_W4A4_MEAN - FLOAT_TOP1)
    # vit_b results carry no float metrics: no float value, no delta.
    vit_b = ("imagenet", "vit_b", "top1", "w4a4")
    assert math.isnan(lb.delta.at["repq_vit", vit_b])
    assert table.at["repq_vit", vit_b] == "61.00 ± 1.00"


def test_one_seed_shows_no_plus_minus():
    results = suite(seeds=(0,))
    for fmt in ("md", "html", "tex"):
        text = render(results, fmt)
        assert "±" not in text and r"\pm" not in text
    table = leaderboard_table(results)
    assert not any("±" in cell for cell in table.to_numpy().ravel())
    assert table.at["repq_vit", COL] == "70.10 (\u22129.75)"


# --------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------


def test_markdown_marks_best_and_lists_failures():
    md = render(suite(), "md")
    lines = md.splitlines()
    assert lines[0].startswith("| method")
    assert lines[2].startswith("| fp32 ")  # float row first
    assert "**70.53 ± 0.45** (\u22129.32)" in md
    assert "**75.10" not in md  # min_max w6a6 is not the best
    assert "**0.0101 ± 0.0000** (+0.0101)" in md
    assert "imagenet · deit_s · top1 · w6a6" in md
    header = lines[0]
    assert header.index("top1 · fp") < header.index("top1 · w6a6") < header.index("top1 · w4a4")
    assert "Failed cells (1)" in md and "RuntimeError: NaN in scale" in md
    assert "simulated (fake-quant)" in md.lower()
    assert "79.85" in md and "0.0000" in md  # numbers are not re-parsed by tabulate


def test_latex_booktabs_escaped_and_bold():
    tex = render(suite(), "tex")
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert rule in tex
    assert r"repq\_vit" in tex and r"min\_max" in tex and r"deit\_s" in tex
    assert re.search(r"(?<!\\)_", tex) is None  # every underscore is escaped
    assert r"\multicolumn{" in tex and "{c}{imagenet}" in tex
    assert r"\textbf{70.53 $\pm$ 0.45} ($-$9.32)" in tex
    assert r"\textbf{0.0101 $\pm$ 0.0000}" in tex
    assert tex.isascii()  # no ± or − that pdflatex would choke on
    assert tex.count(r"\begin{tabular}") == 1 and tex.count(r"\end{tabular}") == 1
    body = tex.split(r"\midrule")[1]
    assert body.strip().startswith("fp32 &")  # float row first, then a rule
    tex_all = render(suite(), "tex", metrics="all")
    assert r"kl\_to\_float" in tex_all


def test_csv_is_tidy_and_parses_back():
    csv = render(suite(), "csv")
    frame = pd.read_csv(io.StringIO(csv))
    assert list(frame.columns) == TIDY_COLUMNS
    for column in ("method", "task", "model", "metric", "bits", "mean", "std", "n_seeds",
                   "float", "delta"):
        assert column in frame.columns
    row = frame[(frame["method"] == "repq_vit") & (frame["task"] == "imagenet")
                & (frame["model"] == "deit_s") & (frame["bits"] == "w4a4")]
    assert len(row) == 1
    row = row.iloc[0]
    assert row["metric"] == "top1"
    assert row["mean"] == pytest.approx(REPQ_W4A4_MEAN)
    assert row["std"] == pytest.approx(REPQ_W4A4_STD)
    assert row["n_seeds"] == 3 and row["n_failed"] == 0
    assert row["float"] == pytest.approx(FLOAT_TOP1)
    assert row["delta"] == pytest.approx(REPQ_W4A4_MEAN - FLOAT_TOP1)
    assert bool(row["best"])
    failed = frame[(frame["method"] == "min_max") & (frame["bits"] == "w4a4")].iloc[0]
    assert failed["n_seeds"] == 1 and failed["n_failed"] == 1
    fp = frame[frame["method"] == "fp32"]
    assert (fp["bits"] == "fp").all() and fp["delta"].isna().all()
    assert frame.iloc[0]["method"] == "fp32"
    assert leaderboard_tidy(suite()).shape[0] == len(frame)


def test_html_caption_best_and_failed_footer():
    page = render(suite(), "html")
    assert page.startswith("<!DOCTYPE html>")
    assert "<style" in page and "<caption>" in page
    caption = page.split("<caption>")[1].split("</caption>")[0]
    assert "Simulated (fake-quant)" in caption
    assert "Failed cells (1)" in page
    assert "imagenet / deit_s / min_max / w4a4 / seed 1: RuntimeError: NaN in scale" in page
    assert "font-weight: bold" in page
    # The best cell is the one styled bold.
    cell_id = re.search(r'id="(T_leaderboard_row\d+_col\d+)"[^>]*>70\.53 ± 0\.45', page).group(1)
    bold_rule = page.split("font-weight: bold")[0].rsplit("}", 1)[-1]
    assert cell_id in bold_rule
    assert "repq_vit" in page
    no_failures = [r for r in suite() if r.ok]
    assert "Failed cells" not in render(no_failures, "html")


def test_html_escapes_names():
    results = [make("t", "m", "<b>x</b>", "w4a4", 0, {"top1": 1.0})]
    page = render(results, "html")
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page


def test_unknown_format_is_a_user_error():
    with pytest.raises(BenchsuiteError):
        render(suite(), "xlsx")


def test_write_reports_writes_four_files(tmp_path):
    paths = write_reports(suite(), tmp_path / "out")
    assert set(paths) == {"md", "csv", "tex", "html"}
    names = sorted(p.name for p in paths.values())
    assert names == ["leaderboard.csv", "leaderboard.html", "leaderboard.md", "leaderboard.tex"]
    for fmt, path in paths.items():
        text = path.read_text(encoding="utf-8")
        if fmt == "html":  # the page also embeds the plots written beside it
            plots = sorted((tmp_path / "out" / "plots").glob("*.png"))
            assert plots and all(f'<img src="plots/{plot.name}"' in text for plot in plots)
            page = render(suite(), fmt)
            assert text.startswith(page[: page.index("</body>")])
        else:
            assert text == render(suite(), fmt)


def test_console_tables_stack_one_group_per_task_model_metric():
    from rich.console import Console, Group
    from rich.table import Table

    rendered = console_table(suite())
    assert isinstance(rendered, Group)
    tables = [r for r in rendered.renderables if isinstance(r, Table)]
    groups = {column[:-1] for column in leaderboard_table(suite()).columns}
    assert len(tables) == len(groups)
    assert sum(len(t.columns) - 1 for t in tables) == len(leaderboard_table(suite()).columns)
    console = Console(width=120, record=True, color_system=None)
    console.print(rendered)
    text = console.export_text()
    assert "70.53 ± 0.45 (\u22129.32)" in text and "[1 failed]" in text


def test_generator_input_and_empty_results():
    assert "fp32" in render(iter(suite()), "md")
    assert leaderboard_table([]).empty
    assert "No results" in render([], "md")
    assert list(pd.read_csv(io.StringIO(render([], "csv"))).columns) == TIDY_COLUMNS


def test_all_seeds_failed_cell_and_rerun_wins():
    results = [
        make("t", "m", "fp32", "fp", 0, {"top1": 80.0}),
        make("t", "m", "q", "w4a4", 0, {}, status="error", error={"type": "E", "message": "x"}),
        make("t", "m", "q", "w4a4", 1, {}, status="error", error={"type": "E", "message": "y"}),
        make("t", "m", "r", "w4a4", 0, {}, status="error"),
        make("t", "m", "r", "w4a4", 0, {"top1": 70.0}),  # a rerun of the same cell succeeded
    ]
    table = leaderboard_table(results)
    assert table.at["q", ("t", "m", "top1", "w4a4")] == "2 failed"
    assert table.at["r", ("t", "m", "top1", "w4a4")] == "70.00 (\u221210.00)"


def test_a_variant_is_its_own_row_and_never_replaces_the_default():
    default = make("t", "m", "isvit", "w4a4", 0, {"top1": 50.0})
    fast = make("t", "m", "isvit", "w4a4", 0, {"top1": 40.0},
                cell={"config_overrides": {"budget": "fast"}})
    frame = results_frame([default, fast])
    assert sorted(frame["method"].unique()) == ["isvit", "isvit [budget=fast]"]
    assert sorted(frame["value"]) == [40.0, 50.0]
