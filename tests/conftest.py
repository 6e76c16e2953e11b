"""Shared fixtures: the toy plugins, a private cache folder, the real-assets location."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

# CI replays the same property examples on every run (one seed, no example database) so a red CI
# is always reproducible; local runs keep exploring fresh examples. Select with HYPOTHESIS_PROFILE.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

sys.path.insert(0, str(Path(__file__).parent))

REPO_ROOT = Path(__file__).resolve().parents[1]
ASSETS = REPO_ROOT.parent / "shared" / "assets"


@pytest.fixture
def toy_plugins():
    """Register the toy task and the exploding method for one test."""
    from benchsuite import registry
    from toy_plugins import Explode, ToyTask

    registry.tasks.register("toy", ToyTask)
    registry.methods.register("explode", Explode)
    ToyTask.builds = 0
    yield ToyTask
    registry.tasks.unregister("toy")
    registry.methods.unregister("explode")


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One benchsuite cache per test session, so the demo model is trained at most once."""
    existing = os.environ.get("BENCHSUITE_TEST_CACHE")
    path = Path(existing) if existing else tmp_path_factory.mktemp("benchsuite-cache")
    os.environ["BENCHSUITE_CACHE"] = str(path)
    return path


def cli_env(cache: Path, extra_path: Path | None = None) -> dict[str, str]:
    """Environment for running the CLI in a subprocess with the session cache."""
    env = dict(os.environ, BENCHSUITE_CACHE=str(cache), PYTHONUNBUFFERED="1")
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(extra_path), env.get("PYTHONPATH", "")) if p)
    return env
