"""The coco task on a tiny synthetic COCO folder and a tiny Mask R-CNN (random weights).

Needs the ``coco`` extra (mmdet, mmcv with its ops, pycocotools); skips without it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.coco
mmdet = pytest.importorskip("mmdet")
pytest.importorskip("mmcv.ops")
pytest.importorskip("pycocotools")

from benchsuite import registry  # noqa: E402
from benchsuite.api import TaskOptions  # noqa: E402
from benchsuite.errors import DataError  # noqa: E402
from benchsuite.metrics.coco import STAT_NAMES  # noqa: E402
from benchsuite.quant.adapters import adapt  # noqa: E402
from benchsuite.quant.canonical import Role  # noqa: E402
from benchsuite.tasks.coco import METRICS, CocoConfig, CocoTask, DetectorRunner  # noqa: E402

MODEL = "mask-rcnn-swin-t"
from tiny_detectors import shrink_to_tiny_swin  # noqa: E402
SIZES = {"train2017": [(64, 48), (48, 64), (56, 56), (64, 40)], "val2017": [(64, 48), (48, 64), (60, 44)]}


class TinyCocoTask(CocoTask):
    """The coco task with a shrunk Mask R-CNN Swin and a small Resize, so a test takes seconds."""

    def build_detector(self, model):
        from mmdet.registry import MODELS

        from benchsuite.detection.models import register_mmdet_modules, detector_config

        register_mmdet_modules()
        cfg = detector_config(model).model
        shrink_to_tiny_swin(cfg)
        cfg.test_cfg.rcnn.score_thr = 0.0  # random weights: keep every detection, so masks are scored
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            detector = MODELS.build(cfg)
            detector.init_weights()
        detector.eval()
        return detector

    def test_pipeline(self, model):
        steps = super().test_pipeline(model)
        for step in steps:
            if step["type"] == "Resize":
                step["scale"] = (96, 64)
        return steps


def _write_split(root: Path, split: str, names: list[str]) -> None:
    from PIL import Image

    folder = root / split
    folder.mkdir(parents=True)
    rng = np.random.default_rng(len(split))
    images, annotations = [], []
    for index, (width, height) in enumerate(SIZES[split]):
        image_id = 100 * (index + 1) + len(split)
        file_name = f"{image_id:012d}.jpg"
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / file_name)
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for k in range(2):
            x, y, w, h = 4.0 + 10 * k, 6.0 + 8 * k, 20.0, 16.0
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": 1 + (index + k) % 3,
                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
                "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
            })
    # COCO's own category ids skip some numbers; use sparse ids so the name -> id mapping is exercised
    categories = [{"id": i + 1 + i // 10, "name": name, "supercategory": "x"} for i, name in enumerate(names)]
    for ann in annotations:
        ann["category_id"] = categories[ann["category_id"] - 1]["id"]
    (root / "annotations").mkdir(exist_ok=True)
    data = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    from mmdet.datasets import CocoDataset

    root = tmp_path_factory.mktemp("coco")
    names = list(CocoDataset.METAINFO["classes"])
    for split in SIZES:
        _write_split(root, split, names)
    return root


def _task(root, **kwargs) -> TinyCocoTask:
    return TinyCocoTask(TaskOptions(data_root=root), CocoConfig(random_weights=True, **kwargs))


def test_models_are_the_four_detectors():
    from benchsuite.detection.models import DETECTORS

    assert list(CocoTask.models()) == list(DETECTORS)
    assert CocoTask.info.main_metric == "box_ap" and CocoTask.unavailable_reason() is None


def test_layout_errors_name_the_expected_layout(tmp_path, coco_root):
    with pytest.raises(DataError, match="instances_train2017.json"):
        _task(None).validate()
    with pytest.raises(DataError, match="annotations/instances_val2017.json"):
        _task(tmp_path).validate()
    (tmp_path / "annotations").mkdir()
    for split in SIZES:
        (tmp_path / "annotations" / f"instances_{split}.json").write_text(
            (coco_root / "annotations" / f"instances_{split}.json").read_text())
    with pytest.raises(DataError, match="image folder .*train2017.* is missing"):
        _task(tmp_path).validate()
    _task(coco_root).validate()


def test_missing_weights_name_the_official_checkpoint(coco_root):
    task = TinyCocoTask(TaskOptions(data_root=coco_root))
    with pytest.raises(DataError, match="mask_rcnn_swin_tiny_patch4_window7.pth"):
        task.build_model(MODEL)
    with pytest.raises(DataError, match="--weights coco="):
        task.validate()


def test_weights_load_strictly(tmp_path, coco_root):
    from safetensors.torch import save_file

    reference = _task(coco_root).build_model(MODEL)
    state = {k: v.clone() + 0.5 if v.is_floating_point() else v.clone()
             for k, v in reference.detector.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    loaded = TinyCocoTask(TaskOptions(data_root=coco_root, weights=tmp_path / "w.safetensors")).build_model(MODEL)
    for key, value in loaded.detector.state_dict().items():
        torch.testing.assert_close(value, state[key])
    del state[next(iter(state))]
    save_file(state, str(tmp_path / "short.safetensors"))
    with pytest.raises(DataError):
        TinyCocoTask(TaskOptions(data_root=coco_root, weights=tmp_path / "short.safetensors")).build_model(MODEL)


def test_calibration_is_seeded_and_recorded(coco_root):
    task = _task(coco_root)
    first = task.calibration_set(MODEL, 2, seed=3)
    again = _task(coco_root).calibration_set(MODEL, 2, seed=3)
    other = task.calibration_set(MODEL, 3, seed=4)
    assert first.sample_ids == again.sample_ids
    assert len(first) == 2 and first.source == "coco:train2017"
    train_ids = {str(100 * (i + 1) + len("train2017")) for i in range(len(SIZES["train2017"]))}
    assert set(first.sample_ids) <= train_ids and set(other.sample_ids) <= train_ids
    manifest = first.manifest()
    assert manifest["sample_ids"] == list(first.sample_ids) and manifest["seed"] == 3
    assert manifest["population_sha256"]
    (batch,) = first.batches
    assert isinstance(batch, torch.Tensor) and batch.shape[:2] == (2, 3)
    assert batch.shape[-2] % 32 == 0 and batch.shape[-1] % 32 == 0
    torch.testing.assert_close(batch, again.batches[0])
    with pytest.raises(DataError, match="between 1 and 4"):
        task.calibration_set(MODEL, 5, seed=0)


def test_val_first_k_is_the_repq_vit_protocol(coco_root):
    calib = _task(coco_root, calib_source="val_first_k").calibration_set(MODEL, 1, seed=0)
    assert calib.source == "coco:val_first_k"
    assert calib.sample_ids == (str(100 + len("val2017")),)
    with pytest.raises(DataError, match="calib_source"):
        _task(coco_root, calib_source="val")


def test_calibration_batch_runs_through_the_adapted_model(coco_root):
    task = _task(coco_root)
    model = task.build_model(MODEL)
    assert isinstance(model, DetectorRunner)
    canonical = adapt(model)
    assert canonical.family == "mmdet_swin"
    assert canonical.sites()[0].role is Role.PATCH_EMBED
    assert canonical.sites_by_role(Role.OTHER)  # the whole detector is wrapped
    calibration = task.calibration_set(MODEL, 3, seed=0)
    with torch.no_grad():
        out = canonical(torch.cat([batch for batch in calibration]))
    assert len(out) == 3


def test_evaluate_end_to_end(coco_root):
    task = _task(coco_root)
    model = task.build_model(MODEL)
    evaluation = task.evaluate(model, MODEL)
    assert set(evaluation.metrics) == set(METRICS)
    assert {"box_ap", "mask_ap"} <= set(evaluation.metrics)
    for name, value in evaluation.metrics.items():
        assert math.isfinite(value) and (value == -1.0 or 0.0 <= value <= 100.0), (name, value)
    stats = evaluation.details["stats"]
    assert len(stats["bbox"]) == len(stats["segm"]) == len(STAT_NAMES)
    assert evaluation.metrics["box_ap"] == pytest.approx(max(stats["bbox"][0] * 100, -1.0))
    assert evaluation.details["samples"] == 3 and evaluation.details["detections"] > 0

    # the adapted (float) model evaluates the same, and eval_limit takes a subset
    limited = TinyCocoTask(TaskOptions(data_root=coco_root, eval_limit=2), CocoConfig(random_weights=True))
    canonical = adapt(limited.build_model(MODEL))
    assert limited.evaluate(canonical, MODEL).details["samples"] == 2
    manifest = limited.data_manifest(MODEL)
    assert manifest["eval_size"] == 2 and manifest["weights"] == {"source": "random", "seed": 0}


def test_quantize_backbone_leaves_neck_and_heads_float(coco_root):
    whole = _task(coco_root)
    backbone = _task(coco_root, quantize_scope="backbone")
    whole_sites = whole.adapt(whole.build_model(MODEL)).sites()
    backbone_sites = backbone.adapt(backbone.build_model(MODEL)).sites()
    assert any(site.role is Role.OTHER for site in whole_sites)
    assert not any(site.role is Role.OTHER for site in backbone_sites)
    assert backbone.data_manifest(MODEL)["quantize_scope"] == "backbone"


class NamedTinyCocoTask(TinyCocoTask):
    name = "tinycoco"


@pytest.fixture
def tiny_coco_plugin():
    registry.tasks.register("tinycoco", NamedTinyCocoTask)
    yield
    registry.tasks.unregister("tinycoco")


def test_cli_routes_every_coco_option(tiny_coco_plugin, coco_root, tmp_path, capsys):
    """The options a user gives on the command line reach the task and are recorded in the cell."""
    from benchsuite.cli import main
    from benchsuite.results import ResultStore

    out = tmp_path / "out"
    argv = ["run", "--methods", "fp32,minmax", "--tasks", "tinycoco", "--bits", "w8a8", "--out", str(out),
            "--no-progress", "--data-root", f"tinycoco={coco_root}", "--eval-limit", "2", "--calib-size", "1",
            "--task-option", "tinycoco.random_weights=true", "--task-option", "tinycoco.quantize_scope=backbone",
            "--task-option", "tinycoco.calib_source=val_first_k"]
    assert main(argv) == 0, capsys.readouterr().err
    results = {r.method: r for r in ResultStore(out).results()}
    assert all(r.ok for r in results.values())
    minmax = results["minmax"]
    assert minmax.task_label == results["fp32"].task_label == "tinycoco [random_weights=True]"
    assert minmax.method_label == "minmax [calib_source=val_first_k, quantize_scope=backbone]"
    assert minmax.calibration["source"] == "tinycoco:val_first_k"
    assert minmax.data["quantize_scope"] == "backbone" and minmax.data["weights"]["source"] == "random"
    assert minmax.config["task"]["fields"] == {
        "calib_source": "val_first_k", "quantize_scope": "backbone", "random_weights": True}
    printed = capsys.readouterr().out
    assert "minmax [calib_source=val_first_k, quantize_scope=backbone]" in printed

    # without random weights and without --weights, the run stops before any cell with one line
    bad = [a for a in argv if a != "tinycoco.random_weights=true"]
    bad.remove("--task-option")
    assert main(bad) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--weights" in err


def test_calibration_canvas_keeps_each_images_own_shape(coco_root):
    """The RPN must clip proposals to each image, not to the padded canvas (mmdet's batch rule)."""
    from benchsuite.tasks.coco import canvas_samples

    task = _task(coco_root)
    calibration = task.calibration_set(MODEL, 4, seed=0)
    (canvas,) = calibration.batches
    split = task._split("train2017")
    by_id = {str(image[0]): index for index, image in enumerate(split.images)}
    preprocessor = task._data_preprocessor(MODEL)
    samples = canvas_samples(canvas)
    shapes = set()
    for sample_id, sample in zip(calibration.sample_ids, samples):
        _, (own,) = task._preprocess(MODEL, split, by_id[sample_id], preprocessor)
        assert sample.img_shape == own.img_shape
        assert sample.batch_input_shape == tuple(canvas.shape[-2:])
        shapes.add(own.img_shape)
    assert len(shapes) > 1  # the images differ in size, so some are padded on the canvas
    # an all-zero image keeps the whole canvas
    assert canvas_samples(torch.zeros(1, 3, 64, 96))[0].img_shape == (64, 96)


QUANTIZING_METHODS = [name for name, reason in registry.methods.availability().items()
                      if reason is None and registry.methods.get(name).quantizes]


@pytest.mark.parametrize("method_name", QUANTIZING_METHODS)
def test_every_method_quantizes_the_whole_detector(coco_root, method_name):
    """Generated from the registry: each method calibrates backbone, neck and heads of a detector;
    reconstruction methods tune the backbone units and only calibrate the neck and heads."""
    import dataclasses

    from benchsuite.bits import BitSpec
    from benchsuite.errors import ConfigError

    task = _task(coco_root)
    method = registry.methods.get(method_name)()
    config = method.default_config()
    fields = {f.name for f in dataclasses.fields(config)}
    config = dataclasses.replace(config, **{k: v for k, v in (("budget", "demo"), ("iters", 2)) if k in fields})
    calibration = task.calibration_set(MODEL, 2, seed=0)
    canonical = task.adapt(task.build_model(MODEL))
    if "post_layernorm_quantizer" in fields:  # adfq-vit: per-patch scales need one input size
        with pytest.raises(ConfigError, match="per_tensor"):
            method.quantize(canonical, calibration, BitSpec(4, 4), config)
        canonical = task.adapt(task.build_model(MODEL))
        config = dataclasses.replace(config, post_layernorm_quantizer="per_tensor")
    quantized = method.quantize(canonical, calibration, BitSpec(4, 4), config)

    outside = [site for site in canonical.sites() if not site.tunable]
    assert outside and all(site.role is Role.OTHER for site in outside)
    for site in canonical.sites():
        for quantizer in site.module.quantizers():
            assert quantizer.enabled and quantizer.initialized, (method_name, site.name)
    units = method.run_info(canonical).get("units")
    if units is not None:  # a reconstruction method
        reports = [u for stage in units.values() for u in stage] if isinstance(units, dict) else units
        outside_names = {site.name for site in outside}
        assert any(u["iters"] > 0 for u in reports if u["name"] not in outside_names)
        assert all(u["iters"] == 0 for u in reports if u["name"] in outside_names)
    limited = TinyCocoTask(TaskOptions(data_root=coco_root, eval_limit=1), CocoConfig(random_weights=True))
    evaluation = limited.evaluate(quantized, MODEL)
    assert evaluation.details["samples"] == 1
