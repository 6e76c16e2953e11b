"""End to end through a real subprocess: the demo task, a run killed mid-way, the outside plugin."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, cli_env

BENCHSUITE = [sys.executable, "-m", "benchsuite.cli"]


@pytest.fixture(scope="module")
def trained_cache(shared_cache):
    """Train (or load) the demo model once, in-process, before subprocesses use the cache."""
    from benchsuite.tasks.digits import DigitsTask

    DigitsTask().build_model("vit-tiny-digits")
    return shared_cache


def test_killed_run_resumes_without_redoing_finished_cells(trained_cache, tmp_path):
    out = tmp_path / "run"
    argv = [*BENCHSUITE, "run", "--tasks", "digits", "--methods", "fp32,minmax", "--bits", "w8a8,w6a6,w4a4,w3a3",
            "--eval-limit", "200", "--out", str(out)]
    process = subprocess.Popen(argv, env=cli_env(trained_cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and len(list((out / "cells").glob("*.json"))) < 2:
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    assert 2 <= len(finished) <= 5
    assert not list((out / "cells").glob(".*tmp"))  # no half-written result survives a kill

    rerun = subprocess.run(argv, env=cli_env(trained_cache), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(finished)} already done" in rerun.stderr
    after = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    assert len(after) == 5
    assert all(after[name] == mtime for name, mtime in finished.items())  # untouched


def test_outside_plugin_installs_and_runs_through_the_cli(trained_cache, tmp_path):
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(REPO_ROOT / "examples" / "benchsuite-example-plugin")],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stderr
    env = cli_env(trained_cache, extra_path=target)
    listing = subprocess.run([*BENCHSUITE, "list", "methods"], env=env, capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0 and "weight-only-rtn" in listing.stdout
    out = tmp_path / "run"
    run = subprocess.run(
        [*BENCHSUITE, "run", "--tasks", "digits", "--methods", "fp32,weight-only-rtn", "--bits", "w4a4",
         "--eval-limit", "200", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "weight-only-rtn" in run.stdout
    assert len(list((out / "cells").glob("*weight-only-rtn*.json"))) == 1


def test_no_arguments_runs_the_demo(trained_cache, tmp_path):
    """`benchsuite` alone = every available method on every demo task at w4a4 and w3a3."""
    run = subprocess.run([*BENCHSUITE, "--eval-limit", "100", "--out", str(tmp_path)], env=cli_env(trained_cache),
                         capture_output=True, text=True, timeout=1800, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    names = sorted(p.name for p in (tmp_path / "cells").glob("*.json"))
    assert any("__fp32__fp__" in n for n in names)
    assert {n.split("__")[3] for n in names if "__minmax__" in n} == {"w4a4", "w3a3"}
    from benchsuite import registry

    demo_tasks = {name for name, reason in registry.tasks.availability().items()
                  if reason is None and registry.tasks.get(name).info.demo}
    assert {"digits", "modelnet40-demo", "shapenetpart-demo"} <= demo_tasks
    assert {n.split("__")[0] for n in names} == demo_tasks
    methods = {name for name, reason in registry.methods.availability().items() if reason is None}
    assert {n.split("__")[2] for n in names} == methods
    assert all("__cfg" in n for n in names if n.split("__")[2] in {"isvit", "adfq-vit", "aiqvit"})  # [budget=demo]
    assert "top1" in run.stdout and "[budget=demo]" in run.stdout
