"""``benchsuite report DIR``: render a result folder's leaderboard in one format."""

from __future__ import annotations

import sys
from pathlib import Path

from benchsuite.errors import ResultStoreError
from benchsuite.results import ResultStore


def report(directory: Path, fmt: str, output: Path | None, metrics: str) -> int:
    from benchsuite.leaderboard import render

    store = ResultStore(directory)
    if not store.cells_dir.is_dir():
        raise ResultStoreError(f"{directory} holds no benchsuite results (no cells/ folder)")
    results = list(store.results())
    if not any(r.ok for r in results):
        raise ResultStoreError(f"{directory} holds no finished cell")
    if fmt == "html" and output is not None:  # a page on disk gets its plots beside it
        from benchsuite.leaderboard import leaderboard_frames, write_html_with_plots

        text = write_html_with_plots(leaderboard_frames(results, metrics), output)
    else:
        text = render(results, fmt, metrics=metrics)
    if output is None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
    return 0
