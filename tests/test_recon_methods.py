"""Every reconstruction method beats the min-max floor at w3a3 on a trained tiny model.

Generated from the registry: a method whose config has a ``budget`` field is a reconstruction
method, and installing one adds it here. The model is the digits demo ViT (trained once per test
session, see conftest.py); the measure is the mean KL divergence from the float model's logits on
the held-out split, the steadier of the task's metrics on 540 images.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest

from benchsuite import registry
from benchsuite.bits import BitSpec
from benchsuite.tasks.digits import MODEL_NAME, DigitsTask

BITS = BitSpec(3, 3)


def _reconstruction_methods() -> list[str]:
    names = []
    for name, reason in registry.methods.availability().items():
        if reason is None:
            fields = {f.name for f in dataclasses.fields(registry.methods.get(name).config_class)}
            if "budget" in fields:
                names.append(name)
    return names


@pytest.fixture(scope="module")
def digits(shared_cache):
    task = DigitsTask()
    model = task.build_model(MODEL_NAME)
    reference = task.evaluate(model, MODEL_NAME)
    calibration = task.calibration_set(MODEL_NAME, 128, seed=0)
    return task, model, reference, calibration


def _kl(digits, method_name: str, **overrides) -> float:
    task, model, reference, calibration = digits
    method = registry.methods.get(method_name)()
    config = dataclasses.replace(method.default_config(), **overrides).resolve(BITS)
    quantized = method.quantize(task.adapt(copy.deepcopy(model)), calibration, BITS, config)
    return task.evaluate(quantized, MODEL_NAME, reference).metrics["kl_to_float"]


@pytest.fixture(scope="module")
def minmax_kl(digits) -> float:
    return _kl(digits, "minmax")


@pytest.mark.slow
@pytest.mark.parametrize("method_name", _reconstruction_methods())
def test_reconstruction_method_beats_minmax_at_w3a3(digits, minmax_kl, method_name):
    kl = _kl(digits, method_name, budget="fast", iters=60)
    assert kl < 0.8 * minmax_kl, f"{method_name}: KL {kl:.4f} vs minmax {minmax_kl:.4f}"
