"""``--executor ray --ray-address``: a driver joining a running two-node cluster.

``ray.cluster_utils.Cluster`` (Ray's own test utility) starts a head node and a worker node as
separate raylets on this machine, the closest thing to a multi-node cluster a CI machine has: the
driver connects by address as it would on a real cluster, cells are scheduled over both nodes, and
the workers import the plugins from their own path. Needs the ``ray`` extra; skips without it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")

from benchsuite.cli import main  # noqa: E402
from benchsuite.results import ResultStore  # noqa: E402

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def two_node_cluster():
    """A head and a worker node, one CPU each; workers see tests/ (the toy plugins) on their path."""
    if ray.is_initialized():
        ray.shutdown()
    saved = {name: os.environ.get(name) for name in ("PYTHONPATH", "OMP_NUM_THREADS")}
    os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), saved["PYTHONPATH"] or ""])
    os.environ["OMP_NUM_THREADS"] = "1"
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def test_cli_joins_a_running_cluster_by_address(two_node_cluster, toy_plugins, tmp_path):
    argv = ["run", "--methods", "fp32,minmax,repq-vit", "--tasks", "toy", "--bits", "w8a8,w4a4",
            "--out", str(tmp_path), "--no-progress", "--executor", "ray", "--ray-address", two_node_cluster.address]
    assert main(argv) == 0
    assert len(ray.nodes()) == 2 and all(node["Alive"] for node in ray.nodes())
    results = list(ResultStore(tmp_path).results())
    assert len(results) == 5 and all(r.ok for r in results)  # fp32 once, two bit-widths of the others
    # the same cells again: all found in the store, nothing reruns or rewrites a result
    saved = {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*.json")}
    assert main(argv) == 0
    assert {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*.json")} == saved
