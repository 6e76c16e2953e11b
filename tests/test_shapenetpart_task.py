"""The ShapeNetPart task and its demo twin: layout reading, seeded resampling, metrics, models.

The real-layout tests write a handful of tiny shape files in the dataset's own format (16
categories in ``synsetoffset2category.txt``, JSON split lists, ``x y z nx ny nz label`` lines);
no real data or weights are needed. The demo tests shrink its recipes so training takes seconds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from benchsuite.api import TaskOptions
from benchsuite.errors import DataError
from benchsuite.metrics import segmentation as seg
from benchsuite.pointcloud import PointMAESegmenter
from benchsuite.pointcloud.data import normalize_unit_sphere, resample_indices, shape_rng
from benchsuite.tasks import shapenetpart as sp
from benchsuite.tasks.shapenetpart import SEG_CLASSES, ShapeNetPartTask
from benchsuite.tasks.shapenetpart_data import DATASET_FOLDER, load_clouds, read_categories, read_split

SYNSETS = {
    "Airplane": "02691156", "Bag": "02773838", "Cap": "02954340", "Car": "02958343", "Chair": "03001627",
    "Earphone": "03261776", "Guitar": "03467517", "Knife": "03624134", "Lamp": "03636649",
    "Laptop": "03642806", "Motorbike": "03790512", "Mug": "03797390", "Pistol": "03948459",
    "Rocket": "04099429", "Skateboard": "04225987", "Table": "04379243",
}

#: (category, shape id, split, points) of the tiny dataset.
SHAPES = [
    ("Airplane", "a2", "test", 40), ("Airplane", "a1", "test", 30), ("Airplane", "a3", "train", 25),
    ("Mug", "m1", "test", 20), ("Mug", "m2", "train", 35), ("Table", "t1", "train", 50),
    ("Table", "t2", "val", 10),
]


def write_tiny_dataset(root: Path) -> Path:
    """A ShapeNetPart folder with the real category file and a few random shapes; returns it."""
    folder = root / DATASET_FOLDER
    (folder / "train_test_split").mkdir(parents=True)
    (folder / "synsetoffset2category.txt").write_text("".join(f"{n}\t{s}\n" for n, s in SYNSETS.items()))
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    rng = np.random.default_rng(0)
    for category, shape, split, count in SHAPES:
        xyz = rng.normal(size=(count, 3)) * 3 + 5
        normals = rng.normal(size=(count, 3))
        labels = rng.choice(SEG_CLASSES[category], size=count)
        (folder / SYNSETS[category]).mkdir(exist_ok=True)
        lines = [" ".join(f"{v:.6f}" for v in (*p, *n, float(label))) for p, n, label in zip(xyz, normals, labels)]
        (folder / SYNSETS[category] / f"{shape}.txt").write_text("\n".join(lines) + "\n")
        splits[split].append(f"shape_data/{SYNSETS[category]}/{shape}")
    for split, entries in splits.items():
        (folder / "train_test_split" / f"shuffled_{split}_file_list.json").write_text(json.dumps(entries[::-1]))
    return folder


@pytest.fixture
def tiny_root(tmp_path) -> Path:
    write_tiny_dataset(tmp_path)
    return tmp_path


def small_segmenter(num_parts: int = 50, num_categories: int = 16) -> PointMAESegmenter:
    torch.manual_seed(0)
    return PointMAESegmenter(num_parts, num_categories, dim=32, depth=3, num_heads=2, num_groups=8, group_size=4,
                             label_channels=8, propagation_channels=(32, 16), head_channels=(16, 16))


# --------------------------------------------------------------------------------------------
# Layout reading
# --------------------------------------------------------------------------------------------


def test_registered_and_described():
    from benchsuite import registry

    assert registry.tasks.get("shapenetpart") is ShapeNetPartTask
    assert ShapeNetPartTask.info.main_metric == "instance_miou" and not ShapeNetPartTask.info.demo
    assert list(ShapeNetPartTask.models()) == ["point-mae"]
    assert len(SEG_CLASSES) == 16 and ShapeNetPartTask.num_parts() == 50
    assert sorted(p for parts in SEG_CLASSES.values() for p in parts) == list(range(50))


@pytest.mark.parametrize("nested", [True, False])
def test_loader_reads_the_real_layout(tiny_root, nested):
    root = tiny_root if nested else tiny_root / DATASET_FOLDER
    task = ShapeNetPartTask(TaskOptions(data_root=root))
    categories = task.categories()
    assert [c.name for c in categories] == list(SYNSETS)  # one-hot order = file order
    assert categories[11].name == "Mug" and categories[11].parts == (36, 37)
    test = task.split("test")
    # Category by category in file order, ids sorted, whatever the list order.
    assert test.ids == ("02691156/a1", "02691156/a2", "03797390/m1")
    assert test.categories == (0, 0, 11)
    assert task.split("train").ids == ("02691156/a3", "03797390/m2", "04379243/t1")
    assert task.split("val").ids == ("04379243/t2",)


def test_preprocessing_normalizes_over_all_points_then_resamples(tiny_root):
    folder = tiny_root / DATASET_FOLDER
    categories = read_categories(folder, SEG_CLASSES)
    split = read_split(folder, "test", categories)
    clouds = load_clouds(split, categories, [1], num_points=64, seed=3)
    raw = np.loadtxt(folder / "02691156" / "a2.txt")
    choice = resample_indices(len(raw), 64, 3, "02691156/a2")
    expected = raw[:, :3] - raw[:, :3].mean(axis=0)
    expected /= np.sqrt((expected**2).sum(axis=1)).max()
    assert clouds.points.shape == (1, 64, 3) and clouds.points.dtype == torch.float32
    np.testing.assert_allclose(clouds.points[0].numpy(), expected[choice], rtol=1e-6, atol=1e-6)
    assert clouds.labels[0].tolist() == raw[choice, 6].astype(int).tolist()
    assert clouds.categories.tolist() == [0]
    assert len(set(choice.tolist())) < 64  # 64 draws from 40 points: with replacement


def test_resampling_is_seeded_per_shape_and_independent_of_order(tiny_root):
    folder = tiny_root / DATASET_FOLDER
    categories = read_categories(folder, SEG_CLASSES)
    split = read_split(folder, "test", categories)
    forward = load_clouds(split, categories, [0, 1, 2], 32, seed=0)
    backward = load_clouds(split, categories, [2, 0], 32, seed=0)
    assert backward.ids == (split.ids[2], split.ids[0])
    assert torch.equal(backward.points[0], forward.points[2]) and torch.equal(backward.points[1], forward.points[0])
    assert torch.equal(backward.labels[0], forward.labels[2])
    other = load_clouds(split, categories, [0, 1, 2], 32, seed=1)
    assert not torch.equal(other.points, forward.points)
    a = resample_indices(100, 50, 7, "x/y")
    assert np.array_equal(a, resample_indices(100, 50, 7, "x/y"))
    assert not np.array_equal(a, resample_indices(100, 50, 7, "x/z"))
    assert not np.array_equal(a, resample_indices(100, 50, 8, "x/y"))
    assert shape_rng(0, "s").integers(0, 2**31) == shape_rng(0, "s").integers(0, 2**31)


def test_normalize_unit_sphere():
    points = np.array([[0.0, 0, 0], [2, 0, 0], [1, 3, 0]])
    out = normalize_unit_sphere(points)
    assert np.allclose(out.mean(axis=0), 0) and math.isclose(np.linalg.norm(out, axis=1).max(), 1.0)
    assert np.array_equal(normalize_unit_sphere(np.ones((3, 3))), np.zeros((3, 3)))


def test_wrong_roots_raise_clear_errors(tmp_path, tiny_root):
    with pytest.raises(DataError, match="needs a data root.*--data-root shapenetpart=PATH"):
        ShapeNetPartTask().validate()
    with pytest.raises(DataError, match="does not exist.*expected ShapeNetPart as <root>/shapenetcore_partanno"):
        ShapeNetPartTask(TaskOptions(data_root=tmp_path / "nowhere")).validate()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no synsetoffset2category.txt.*train_test_split"):
        ShapeNetPartTask(TaskOptions(data_root=tmp_path / "empty")).validate()
    with pytest.raises(DataError, match="needs the official Point-MAE checkpoint.*--weights shapenetpart="):
        ShapeNetPartTask(TaskOptions(data_root=tiny_root)).validate()


def test_inconsistent_data_is_refused(tiny_root):
    folder = tiny_root / DATASET_FOLDER
    task = ShapeNetPartTask(TaskOptions(data_root=tiny_root))
    shape = folder / "03797390" / "m1.txt"
    shape.write_text("0 0 0 0 0 1 12.000000\n1 0 0 0 0 1 36.000000\n")  # 12 is a Chair part
    with pytest.raises(DataError, match=r"part labels \[12\] outside Mug's parts \[36, 37\]"):
        task.evaluate(nn.Identity(), "point-mae")
    shape.write_text("0 0 0 1\n")
    with pytest.raises(DataError, match="4 columns per line, expected 7"):
        task.evaluate(nn.Identity(), "point-mae")
    shape.unlink()
    sp.clear_caches()
    with pytest.raises(DataError, match="1 shape file.*missing.*03797390/m1.txt"):
        ShapeNetPartTask(TaskOptions(data_root=tiny_root)).split("test")
    (folder / "synsetoffset2category.txt").write_text("Airplane\t02691156\nBlimp\t09999999\n")
    with pytest.raises(DataError, match="missing: Bag.*unknown: Blimp"):
        task.categories()


# --------------------------------------------------------------------------------------------
# Metrics, checked by hand
# --------------------------------------------------------------------------------------------

#: Two categories: 0 with parts (0, 1, 2), 1 with parts (3, 4).
TABLE = [(0, 1, 2), (3, 4)]


def test_prediction_is_restricted_to_the_category():
    logits = torch.zeros(1, 5, 3)
    logits[0, 4, :] = 10.0  # part 4 (another category) wins globally everywhere
    logits[0, 1, 0] = 1.0
    logits[0, 2, 1] = 1.0  # point 2: all of category 0's parts tie -> the first (part 0)
    restricted = seg.restrict_to_category(logits, torch.tensor([0]), TABLE)
    assert restricted.shape == (1, 3, 3)
    assert seg.predict_parts(restricted, torch.tensor([0]), TABLE).tolist() == [[1, 2, 0]]
    other = seg.restrict_to_category(logits, torch.tensor([1]), TABLE)
    assert torch.isinf(other[..., 2]).all()  # padding: category 1 has two parts
    assert seg.predict_parts(other, torch.tensor([1]), TABLE).tolist() == [[4, 4, 4]]


def test_shape_iou_counts_an_empty_union_as_one():
    labels = torch.tensor([[0, 0, 1, 1]])
    predictions = torch.tensor([[0, 1, 1, 1]])
    # part 0: 1/2, part 1: 2/3, part 2: in neither -> 1.0
    expected = (0.5 + 2 / 3 + 1.0) / 3
    assert math.isclose(seg.shape_ious(predictions, labels, torch.tensor([0]), TABLE).item(), expected)
    # Category 1 (parts 3, 4): no part present or predicted -> 1.0 each
    assert seg.shape_ious(torch.tensor([[0, 0]]), torch.tensor([[1, 1]]), torch.tensor([1]), TABLE).item() == 1.0


def test_instance_and_class_miou_differ_as_defined():
    ious = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    categories = torch.tensor([0, 0, 1])
    assert math.isclose(seg.instance_miou(ious), 50.0)
    assert math.isclose(seg.class_miou(ious, categories), 37.5)  # mean(0.75, 0.0)
    assert seg.category_mious(ious, categories) == {0: 75.0, 1: 0.0}
    assert math.isnan(seg.instance_miou(torch.tensor([])))


def test_segmentation_metrics_with_reference():
    logits = torch.zeros(1, 5, 2)  # (shapes, parts, points), a shape of category 0
    logits[0, 0, 0] = logits[0, 1, 1] = 2.0
    labels = torch.tensor([[0, 2]])
    restricted = seg.restrict_to_category(logits, torch.tensor([0]), TABLE)
    metrics = seg.segmentation_metrics(restricted, labels, torch.tensor([0]), TABLE, reference=restricted)
    # predictions [0, 1]: part 0 IoU 1, part 1 IoU 0 (pred only), part 2 IoU 0 (gt only)
    assert math.isclose(metrics["instance_miou"], 100 / 3)
    assert metrics["point_acc"] == 50.0 and metrics["agreement"] == 100.0 and metrics["kl_to_float"] == 0.0
    flipped = restricted.clone()
    flipped[0, 0] = torch.tensor([0.0, 0.0, 0.0])  # point 0 now uniform over 3 parts
    p = torch.softmax(restricted[0, 0].double(), 0)
    kl_point0 = float((p * (p.log() - math.log(1 / 3))).sum())
    assert math.isclose(seg.point_kl_to_reference(flipped, restricted), kl_point0 / 2, rel_tol=1e-9)
    assert seg.point_agreement(flipped, restricted) == 100.0  # uniform ties -> slot 0, as before
    padded = seg.restrict_to_category(logits.new_zeros(1, 5, 2), torch.tensor([1]), TABLE)
    assert seg.point_kl_to_reference(padded, padded) == 0.0  # -inf padding contributes nothing


# --------------------------------------------------------------------------------------------
# Evaluation, calibration and the model through the task
# --------------------------------------------------------------------------------------------


class XSign(nn.Module):
    """A fake segmenter: logit 1 for parts 1 and 36 where x > 0, for parts 0 and 37 elsewhere.

    Restricted to Airplane (0-3) that predicts 1 / 0, to Mug (36, 37) 36 / 37; part 49 (Table)
    gets logit 5 everywhere, which the restriction must ignore.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], 50, x.shape[1])
        positive = (x[..., 0] > 0).float()
        logits[:, 1] = logits[:, 36] = positive
        logits[:, 0] = logits[:, 37] = 1 - positive
        logits[:, 49] = 5.0
        return logits


def test_evaluate_matches_a_hand_computation(tiny_root):
    task = ShapeNetPartTask(TaskOptions(data_root=tiny_root, eval_batch_size=2))
    evaluation = task.evaluate(XSign(), "point-mae")
    clouds = task._eval_clouds()
    assert clouds.points.shape == (3, 2048, 3)
    positive = clouds.points[..., 0] > 0
    predictions = torch.where(clouds.categories[:, None] == 0, torch.where(positive, 1, 0),
                              torch.where(positive, 36, 37))
    ious = []
    for row, category in enumerate(clouds.categories.tolist()):
        parts = SEG_CLASSES["Airplane" if category == 0 else "Mug"]
        per_part = []
        for part in parts:
            pred, gt = predictions[row] == part, clouds.labels[row] == part
            union = (pred | gt).sum().item()
            per_part.append(1.0 if union == 0 else (pred & gt).sum().item() / union)
        ious.append(sum(per_part) / len(per_part))
    assert math.isclose(evaluation.metrics["instance_miou"], 100 * sum(ious) / 3, rel_tol=1e-9)
    assert math.isclose(evaluation.metrics["class_miou"], 100 * ((ious[0] + ious[1]) / 2 + ious[2]) / 2, rel_tol=1e-9)
    assert math.isclose(evaluation.metrics["point_acc"], 100 * (predictions == clouds.labels).double().mean().item())
    assert evaluation.outputs["part_logits"].shape == (3, 2048, 6)
    assert set(evaluation.details["category_miou"]) == {"Airplane", "Mug"}
    again = task.evaluate(XSign(), "point-mae", reference=evaluation)
    assert again.metrics["agreement"] == 100.0 and again.metrics["kl_to_float"] == 0.0
    limited = ShapeNetPartTask(TaskOptions(data_root=tiny_root, eval_limit=2))
    with pytest.raises(DataError, match="same eval limit"):
        limited.evaluate(XSign(), "point-mae", reference=evaluation)


def test_calibration_is_seeded_and_records_ids(tiny_root):
    task = ShapeNetPartTask(TaskOptions(data_root=tiny_root))
    first = task.calibration_set("point-mae", 2, seed=5)
    again = task.calibration_set("point-mae", 2, seed=5)
    assert first.sample_ids == again.sample_ids and torch.equal(first.batches[0], again.batches[0])
    assert set(first.sample_ids) <= {"02691156/a3", "03797390/m2", "04379243/t1"}
    batch = first.batches[0]
    assert batch.shape == (2, 2048, 3 + 16)
    train = task.split("train")
    for row, sample_id in enumerate(first.sample_ids):
        category = train.categories[train.ids.index(sample_id)]
        assert torch.equal(batch[row, :, 3:], nn.functional.one_hot(torch.tensor(category), 16).float().expand(2048, 16))
    manifest = first.manifest()
    assert manifest["source"] == "shapenetpart:train" and manifest["seed"] == 5
    assert manifest["sample_ids"] == list(first.sample_ids) and manifest["population_sha256"] == train.ids_sha256
    others = {task.calibration_set("point-mae", 3, seed=s).batches[0].sum().item() for s in range(3)}
    assert len(others) == 3  # all three shapes each time, resampled with each seed
    with pytest.raises(DataError, match="between 1 and 3"):
        task.calibration_set("point-mae", 4, seed=0)


def test_model_builds_from_an_official_layout_checkpoint(tiny_root, tmp_path, monkeypatch):
    monkeypatch.setattr(sp, "PointMAESegmenter", small_segmenter)
    trained = small_segmenter()
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.add_(0.01)
    checkpoint = {  # what segmentation/main.py saves
        "epoch": 7,
        "train_acc": np.float64(0.9),
        "inctance_avg_iou": np.float64(0.86),
        "model_state_dict": trained.state_dict(),
    }
    path = tmp_path / "part_seg.pth"
    torch.save(checkpoint, path)
    task = ShapeNetPartTask(TaskOptions(data_root=tiny_root, weights=path))
    task.validate()
    model = task.build_model("point-mae")
    assert not model.training
    for key, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    evaluation = task.evaluate(model, "point-mae")
    assert 0.0 <= evaluation.metrics["instance_miou"] <= 100.0
    manifest = task.data_manifest("point-mae")
    assert manifest["model"]["weights"]["path"] == str(path) and len(manifest["model"]["weights"]["sha256"]) == 64
    assert manifest["eval_split_size"] == 3 and manifest["categories"][11]["parts"] == [36, 37]
    torch.save({"model_state_dict": {"encoder.bogus": torch.zeros(1)}}, path)
    with pytest.raises(DataError, match="does not fit PointMAESegmenter"):
        task.build_model("point-mae")
    with pytest.raises(DataError, match="does not exist"):
        ShapeNetPartTask(TaskOptions(data_root=tiny_root, weights=tmp_path / "none.pth")).build_model("point-mae")


# --------------------------------------------------------------------------------------------
# The demo twin (recipes shrunk so that training takes seconds)
# --------------------------------------------------------------------------------------------


def test_procedural_shapes_have_every_part():
    from benchsuite.tasks.part_shapes import GENERATORS, generate_shape

    for name, (_, parts) in GENERATORS.items():
        cloud = generate_shape(name, shape_rng(0, name), 300)
        assert cloud.points.shape == (300, 3) and cloud.normals.shape == (300, 3)
        assert np.allclose(np.linalg.norm(cloud.normals, axis=1), 1.0)
        assert sorted(set(cloud.parts.tolist())) == list(range(len(parts)))
        again = generate_shape(name, shape_rng(0, name), 300)
        assert np.array_equal(cloud.points, again.points)


@pytest.fixture
def small_demo(tmp_path, monkeypatch):
    from benchsuite.tasks import shapenetpart_demo as demo

    monkeypatch.setenv("BENCHSUITE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(demo.DATA_RECIPE, "shapes_per_category", {"train": 4, "val": 1, "test": 2})
    monkeypatch.setitem(demo.DATA_RECIPE, "raw_points", 200)
    monkeypatch.setitem(demo.MODEL_RECIPE, "epochs", 1)
    return demo


def test_demo_data_is_written_in_the_layout_and_read_back(small_demo):
    demo = small_demo
    task = demo.ShapeNetPartDemoTask()
    folder = task.folder()
    assert folder.name == DATASET_FOLDER and str(folder).startswith(str(demo.cache_dir()))
    assert (folder / "synsetoffset2category.txt").read_text().splitlines()[0] == "Mug\t90000001"
    task.validate()
    assert [c.name for c in task.categories()] == ["Mug", "Lamp", "Table", "Chair"]
    assert len(task.split("train")) == 16 and len(task.split("test")) == 8
    entry = json.loads((folder / "train_test_split" / "shuffled_test_file_list.json").read_text())[0]
    assert entry.startswith("shape_data/9000000")
    first = np.loadtxt(folder / f"{task.split('test').ids[0]}.txt")
    assert first.shape == (200, 7) and set(first[:, 6]) <= {0.0, 1.0}  # a Mug: parts 0, 1


def test_demo_model_trains_once_and_is_cached(small_demo):
    demo = small_demo
    task = demo.ShapeNetPartDemoTask(TaskOptions(eval_batch_size=4))
    runs = demo.training_runs()
    model = task.build_model(demo.MODEL_NAME)
    assert demo.training_runs() == runs + 1 and demo.cached_weights_path().is_file()
    task.build_model(demo.MODEL_NAME)
    assert demo.training_runs() == runs + 1  # second build: from the safetensors cache
    evaluation = task.evaluate(model, demo.MODEL_NAME)
    assert set(evaluation.metrics) == {"instance_miou", "class_miou", "point_acc"}
    assert evaluation.outputs["part_logits"].shape == (8, 512, 3)
    calibration = task.calibration_set(demo.MODEL_NAME, 4, seed=0)
    assert calibration.batches[0].shape == (4, 512, 3 + 4)
    with torch.no_grad():
        assert model(calibration.batches[0]).shape == (4, 10, 512)
    manifest = task.data_manifest(demo.MODEL_NAME)
    assert manifest["model"]["weights"]["source"] == "trained by benchsuite"
