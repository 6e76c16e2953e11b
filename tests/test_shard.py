"""``--shard I/N``: a deterministic split of the plan whose union is the unsharded run."""

from __future__ import annotations

import pytest

from benchsuite.bits import parse_bits_list
from benchsuite.cli import main
from benchsuite.errors import BenchsuiteError
from benchsuite.results import ResultStore
from benchsuite.runner import PlanRequest, RunSettings, Shard, plan_cells, run_cells


def _cells(tmp_path):
    request = PlanRequest(methods=["fp32", "minmax", "repq-vit"], tasks=["toy"], bits=parse_bits_list("w8a8,w4a4"),
                          seeds=[0, 1])
    return plan_cells(request, RunSettings(out_dir=tmp_path))


def test_shards_partition_the_plan(toy_plugins, tmp_path):
    cells = _cells(tmp_path)
    for count in (1, 2, 3, len(cells), len(cells) + 2):
        parts = [Shard(i, count).select(cells) for i in range(count)]
        assert sorted(c.key for part in parts for c in part) == sorted(c.key for c in cells)
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert Shard.parse("2/5") == Shard(2, 5)
    for bad in ("5/5", "-1/3", "1", "a/b", "0/0"):
        with pytest.raises(BenchsuiteError, match="I/N"):
            Shard.parse(bad)


def test_union_of_shard_runs_equals_one_run(toy_plugins, tmp_path):
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    cells = _cells(tmp_path)
    run_cells(cells, RunSettings(out_dir=whole))
    for index in range(3):
        run_cells(Shard(index, 3).select(cells), RunSettings(out_dir=sharded))

    def metrics(folder):
        return {(r.method, r.bits, r.seed): r.metrics for r in ResultStore(folder).results() if r.ok}

    assert len(metrics(whole)) == len(cells)
    assert metrics(sharded) == metrics(whole)


def test_cli_shard(toy_plugins, tmp_path, capsys):
    argv = ["run", "--methods", "fp32,minmax", "--tasks", "toy", "--bits", "w8a8,w4a4", "--out", str(tmp_path),
            "--no-progress"]
    assert main(argv + ["--shard", "1/2"]) == 0
    assert "shard 1/2: 1 of 3 cells" in capsys.readouterr().err
    assert len(list(ResultStore(tmp_path).results())) == 1
    assert main(argv + ["--shard", "2/2"]) == 2
    assert "--shard takes I/N" in capsys.readouterr().err
