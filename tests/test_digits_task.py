"""The built-in digits demo task: data split, trained model and its cache, calibration, evaluation.

The model is trained (or loaded from ``$BENCHSUITE_TEST_CACHE``) once per test session through
the ``shared_cache`` fixture of conftest.py; everything else reuses it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from benchsuite.api import CalibrationSet, Evaluation, TaskOptions, sha256_of
from benchsuite.errors import DataError, UnknownNameError
from benchsuite.tasks import digits
from benchsuite.tasks.digits import MODEL_NAME, DigitsTask


@pytest.fixture(scope="session")
def trained(shared_cache):
    """(task, float model, its full evaluation), built once with the session cache."""
    task = DigitsTask()
    model = task.build_model(MODEL_NAME)
    return task, model, task.evaluate(model, MODEL_NAME)


def test_info_and_models():
    assert DigitsTask.name == "digits"
    assert DigitsTask.info.main_metric == "top1" and DigitsTask.info.demo
    assert DigitsTask.default_models() == [MODEL_NAME]
    spec = DigitsTask.models()[MODEL_NAME]
    assert spec.family == "timm_vit" and spec.source == "timm.VisionTransformer"
    with pytest.raises(UnknownNameError, match="has no model 'vit-huge'"):
        DigitsTask().build_model("vit-huge")


def test_split_is_fixed_stratified_and_disjoint():
    train, test = digits.digits_split("train"), digits.digits_split("test")
    assert len(train) + len(test) == 1797
    assert len(test) == 540
    assert not set(train.ids) & set(test.ids)
    assert list(train.ids) == sorted(train.ids) and train.ids[0].startswith("digits:train:")
    # Stratified: every class is present in both splits in about the same share.
    assert torch.bincount(test.labels, minlength=10).min() >= 50
    assert train.images.shape == (len(train), 3, 32, 32)
    assert train.images.min() == -1.0 and train.images.max() <= 1.0


def test_float_model_is_a_small_vit_and_accurate(trained):
    from timm.models.vision_transformer import VisionTransformer

    task, model, evaluation = trained
    assert isinstance(model, VisionTransformer) and not model.training
    assert any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    assert any(isinstance(m, torch.nn.GELU) for m in model.modules())
    assert set(evaluation.metrics) == {"top1", "top5"}
    assert evaluation.metrics["top1"] >= 90.0
    assert evaluation.metrics["top5"] >= evaluation.metrics["top1"]
    assert evaluation.outputs.shape == (540, 10) and evaluation.outputs.dtype == torch.float32


def test_evaluation_is_deterministic_and_compares_to_reference(trained):
    task, model, first = trained
    again = task.evaluate(model, MODEL_NAME, reference=first)
    assert torch.equal(again.outputs, first.outputs)
    assert again.metrics["top1"] == first.metrics["top1"]
    assert again.metrics["agreement"] == 100.0
    assert again.metrics["kl_to_float"] == 0.0


def test_eval_limit_and_batch_size(trained):
    _, model, full = trained
    task = DigitsTask(TaskOptions(eval_limit=100, eval_batch_size=7))
    limited = task.evaluate(model, MODEL_NAME)
    assert limited.outputs.shape == (100, 10)
    assert limited.details["samples"] == 100
    torch.testing.assert_close(limited.outputs, full.outputs[:100], atol=1e-4, rtol=1e-4)
    with pytest.raises(DataError, match="same eval limit"):
        task.evaluate(model, MODEL_NAME, reference=full)
    assert task.data_manifest(MODEL_NAME)["eval_size"] == 100


def test_calibration_sets_are_seeded():
    task = DigitsTask()
    train = digits.digits_split("train")
    a = task.calibration_set(MODEL_NAME, 40, seed=0)
    b = task.calibration_set(MODEL_NAME, 40, seed=0)
    c = task.calibration_set(MODEL_NAME, 40, seed=1)
    assert isinstance(a, CalibrationSet) and len(a) == 40
    assert a.sample_ids == b.sample_ids and a.sample_ids != c.sample_ids
    assert len(set(a.sample_ids)) == 40 and set(a.sample_ids) <= set(train.ids)
    assert a.population_hash == sha256_of(train.ids) == c.population_hash
    assert [x.shape[0] for x in a] == [32, 8]  # CalibrationSet.from_tensor's batches of 32
    # The inputs are the preprocessed training images of exactly those ids, in that order.
    position = {sample_id: i for i, sample_id in enumerate(train.ids)}
    expected = train.images[[position[i] for i in a.sample_ids]]
    assert torch.equal(torch.cat(a.batches), expected)
    manifest = a.manifest()
    assert manifest["seed"] == 0 and manifest["size"] == 40 and manifest["population_sha256"]


def test_calibration_size_out_of_range_is_a_data_error():
    task = DigitsTask()
    with pytest.raises(DataError, match="between 1 and 1257"):
        task.calibration_set(MODEL_NAME, 5000, seed=0)
    with pytest.raises(DataError):
        task.calibration_set(MODEL_NAME, 0, seed=0)


def test_manifest_is_filled():
    manifest = DigitsTask().data_manifest(MODEL_NAME)
    assert manifest["dataset"] == "sklearn.datasets.load_digits"
    assert manifest["train_size"] == 1257 and manifest["test_size"] == 540 and manifest["eval_size"] == 540
    assert manifest["train_ids_sha256"] == sha256_of(digits.digits_split("train").ids)
    assert any("bilinear" in step for step in manifest["preprocess"])
    assert manifest["weights"]["recipe_sha256_12"] == digits.recipe_hash()


def test_cache_is_reused(trained, shared_cache):
    path = digits.cached_weights_path()
    assert path.parent == shared_cache and path.is_file()
    assert digits.recipe_hash() in path.name
    mtime, runs = path.stat().st_mtime_ns, digits.training_runs()
    model = DigitsTask().build_model(MODEL_NAME)
    assert digits.training_runs() == runs
    assert path.stat().st_mtime_ns == mtime
    for (name, mine), theirs in zip(model.state_dict().items(), trained[1].state_dict().values()):
        assert torch.equal(mine, theirs), name
    assert not [p for p in shared_cache.iterdir() if p.name.endswith(".tmp")]  # no temp files left


def test_recipe_change_changes_the_cache_file(monkeypatch):
    before = digits.cached_weights_path()
    monkeypatch.setitem(digits.RECIPE, "epochs", digits.RECIPE["epochs"] + 1)
    assert digits.cached_weights_path() != before


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("BENCHSUITE_CACHE", str(tmp_path / "explicit"))
    assert digits.cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("BENCHSUITE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert digits.cache_dir() == tmp_path / "xdg" / "benchsuite"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert digits.cache_dir() == Path.home() / ".cache" / "benchsuite"


def test_damaged_cache_is_retrained(trained, monkeypatch, tmp_path):
    state = trained[1].state_dict()
    monkeypatch.setenv("BENCHSUITE_CACHE", str(tmp_path))
    monkeypatch.setattr(digits, "train_digits_vit", lambda progress=None: dict(state))  # no real training
    path = digits.cached_weights_path()
    path.write_bytes(b"not a safetensors file")
    model = DigitsTask().build_model(MODEL_NAME)
    assert torch.equal(model.head.weight, state["head.weight"])
    assert digits.load_weights_file(path).keys() == state.keys()  # rewritten whole


def test_explicit_weights(trained, tmp_path):
    _, model, full = trained
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(DataError, match="does not exist"):
        DigitsTask(TaskOptions(weights=missing)).build_model(MODEL_NAME)

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(os.urandom(64))
    with pytest.raises(DataError, match="cannot read"):
        DigitsTask(TaskOptions(weights=corrupt)).build_model(MODEL_NAME)

    checkpoint = tmp_path / "digits.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    task = DigitsTask(TaskOptions(weights=checkpoint))
    loaded = task.build_model(MODEL_NAME)
    assert torch.equal(task.evaluate(loaded, MODEL_NAME).outputs, full.outputs)
    assert task.data_manifest(MODEL_NAME)["weights"]["sha256"]

    wrong = tmp_path / "wrong.pt"
    torch.save({"head.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(DataError, match="do not fit"):
        DigitsTask(TaskOptions(weights=wrong)).build_model(MODEL_NAME)


def test_shift_augmentation_translates():
    image = torch.full((1, 1, 4, 4), -1.0)
    image[0, 0, 1, 2] = 1.0
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        shifted = digits._shift(image, 1, generator)
        assert shifted.shape == image.shape
        assert (shifted == 1.0).sum() == 1 and (shifted == -1.0).sum() == 15
        row, col = (shifted[0, 0] == 1.0).nonzero()[0].tolist()
        assert abs(row - 1) <= 1 and abs(col - 2) <= 1
