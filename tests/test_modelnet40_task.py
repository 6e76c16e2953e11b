"""The modelnet40 task and its demo twin: layouts, preprocessing, metrics, weights, calibration.

Datasets are tiny folders written by the tests in both layouts (txt lists + files, the 8192-point
``.dat`` cache, HDF5 when h5py is installed). The real-assets test reads the 256 real shapes of
``../shared/assets/modelnet40_normal_resampled`` and is skipped without them. The demo model is
trained (or loaded from ``$BENCHSUITE_TEST_CACHE``) once per session.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ASSETS

from benchsuite.api import Evaluation, ModelSpec, TaskOptions, sha256_of
from benchsuite.errors import DataError
from benchsuite.metrics.classification import mean_class_accuracy, topk_accuracy
from benchsuite.pointcloud import PointMAEClassifier
from benchsuite.eval_subset import subset_indices
from benchsuite.pointcloud.data import fps_downsample
from benchsuite.pointcloud.ops import farthest_point_sample
from benchsuite.tasks import modelnet40_data as data
from benchsuite.tasks.class_shapes import CLASSES, generate_shape
from benchsuite.tasks.modelnet40 import ModelNet40Task, PointModel
from benchsuite.tasks.modelnet40_data import find_dataset, load_points, read_split

#: 40 class names, so a tiny dataset fits the 40-class models; shapes use the first three.
CLASS_NAMES = ["airplane", "flower_pot", "night_stand"] + [f"class{i:02d}" for i in range(37)]
TINY_ARCH = {"num_classes": 40, "dim": 32, "depth": 2, "num_heads": 2, "num_groups": 8, "group_size": 8,
             "head_hidden": 32, "drop_path_rate": 0.0}
POINTS = 96  # points per tiny shape file
NUM_POINTS = 48  # points the tiny model reads


@pytest.fixture(autouse=True)
def _fresh_cache():
    data.clear_cache()
    yield
    data.clear_cache()


def _cloud(seed: int, n: int = POINTS) -> np.ndarray:
    rng = np.random.default_rng(seed)
    xyz = rng.normal(size=(n, 3)) * [1.0, 2.0, 0.5] + [3.0, -1.0, 2.0]
    normals = rng.normal(size=(n, 3))
    return np.column_stack([xyz, normals / np.linalg.norm(normals, axis=1, keepdims=True)])


def _shapes() -> dict[str, list[str]]:
    return {
        "train": ["airplane_0001", "airplane_0002", "flower_pot_0001", "flower_pot_0002", "night_stand_0001",
                  "night_stand_0002"],
        "test": ["airplane_0003", "flower_pot_0003", "flower_pot_0004", "night_stand_0003"],
    }


def write_txt_dataset(root: Path, *, files: bool = True) -> Path:
    """A tiny ``modelnet40_normal_resampled`` folder under ``root``; returns the dataset folder."""
    folder = root / data.TXT_FOLDER
    splits = _shapes()
    data.write_lists(folder, CLASS_NAMES, splits)
    if files:
        for number, shape in enumerate(splits["train"] + splits["test"]):
            name = "_".join(shape.split("_")[:-1])
            cloud = _cloud(number)
            data.write_shape(folder / name / f"{shape}.txt", cloud[:, :3], cloud[:, 3:])
    return folder


def _parse_reference(path: Path, num_points: int) -> np.ndarray:
    """The preprocessing written out by hand: loadtxt, float32, pc_normalize, drop normals, FPS."""
    points = np.loadtxt(path, delimiter=",").astype(np.float32)
    xyz = points[:, :3]
    xyz = xyz - np.mean(xyz, axis=0)
    xyz = xyz / np.max(np.sqrt(np.sum(xyz**2, axis=1)))
    index = farthest_point_sample(torch.from_numpy(xyz)[None], num_points, pointnet2_ops_compat=True, backend="torch")
    return xyz[index[0].numpy()]


# --------------------------------------------------------------------------------------------
# Layouts and loaders
# --------------------------------------------------------------------------------------------


def test_txt_layout_lists_ids_labels_and_splits(tmp_path):
    folder = write_txt_dataset(tmp_path)
    for root in (tmp_path, folder):  # the parent of the dataset folder, or the folder itself
        dataset = find_dataset(root)
        assert dataset.folder == folder and dataset.kind == "txt"
    train, test = read_split(dataset, "train"), read_split(dataset, "test")
    assert train.ids == tuple(f"{'_'.join(s.split('_')[:-1])}/{s}.txt" for s in _shapes()["train"])
    assert test.ids[1] == "flower_pot/flower_pot_0003.txt"  # class names with '_' keep it
    assert train.labels == (0, 0, 1, 1, 2, 2) and test.labels == (0, 1, 1, 2)
    assert train.classes == tuple(CLASS_NAMES) and train.source == test.source == "txt"
    data.check_files(test)


def test_txt_points_are_normalized_fps_samples_and_deterministic(tmp_path):
    folder = write_txt_dataset(tmp_path)
    test = read_split(find_dataset(tmp_path), "test")
    points = load_points(test, [2, 0], NUM_POINTS)
    assert points.shape == (2, NUM_POINTS, 3) and points.dtype == torch.float32
    expected = _parse_reference(folder / test.ids[2], NUM_POINTS)
    np.testing.assert_allclose(points[0].numpy(), expected, rtol=0, atol=1e-6)
    # The first sample is point 0 of the file, and FPS keeps the farthest point: radius 1.
    assert points.norm(dim=-1).max(dim=1).values.sub(1).abs().max() < 1e-5
    data.clear_cache()
    again = load_points(test, [2, 0], NUM_POINTS)
    assert torch.equal(points, again)
    # The cache hands back the same clouds, whichever subset asks first.
    assert torch.equal(load_points(test, [0], NUM_POINTS)[0], points[1])


def test_normalization_is_centroid_and_max_radius_over_all_points(tmp_path):
    folder = write_txt_dataset(tmp_path)
    test = read_split(find_dataset(tmp_path), "test")
    full = load_points(test, [0], POINTS)[0].numpy()  # FPS of every point = a permutation
    raw = np.loadtxt(folder / test.ids[0], delimiter=",")[:, :3]
    np.testing.assert_allclose(np.sort(full, axis=0).mean(axis=0), 0.0, atol=1e-5)
    assert np.sqrt((full**2).sum(axis=1)).max() == pytest.approx(1.0, abs=1e-6)
    scale = np.sqrt(((raw - raw.mean(0)) ** 2).sum(1)).max()
    np.testing.assert_allclose(np.sort(full[:, 0]), np.sort((raw[:, 0] - raw[:, 0].mean()) / scale), atol=1e-5)


def test_fps_downsample_matches_the_op_and_respects_near_origin_rule():
    rng = np.random.default_rng(0)
    clouds = [rng.normal(size=(n, 3)).astype(np.float32) for n in (50, 50, 50, 70)]
    clouds[0][5] = 0.0  # at the origin: never chosen under pointnet2_ops conventions (except index 0)
    out = fps_downsample(clouds, 20, batch_size=2)
    for cloud, sampled in zip(clouds, out):
        index = farthest_point_sample(torch.from_numpy(cloud)[None], 20, pointnet2_ops_compat=True, backend="torch")
        np.testing.assert_array_equal(sampled, cloud[index[0].numpy()])
    assert not (out[0] == 0).all(axis=1).any()
    with pytest.raises(ValueError, match="fewer than"):
        fps_downsample(clouds, 60)


def test_eval_subset_is_seeded_sorted_and_nested():
    assert subset_indices(10, None) == list(range(10)) and subset_indices(10, 50) == list(range(10))
    small, large = subset_indices(100, 10), subset_indices(100, 30)
    assert small == sorted(small) and set(small) <= set(large) and small == subset_indices(100, 10)


def test_dat_cache_is_used_without_class_folders(tmp_path):
    folder = write_txt_dataset(tmp_path, files=False)
    test_shapes = _shapes()["test"]
    clouds = [_cloud(10 + i, 120).astype(np.float32) for i in range(len(test_shapes))]
    labels = [np.array([c]).astype(np.int32) for c in (0, 1, 1, 2)]
    with (folder / "modelnet40_test_8192pts_fps.dat").open("wb") as handle:
        pickle.dump([clouds, labels], handle)
    test = read_split(find_dataset(tmp_path), "test")
    assert test.source == "dat"
    data.check_files(test)  # the cache replaces the files
    points = load_points(test, [3], NUM_POINTS)[0].numpy()
    xyz = clouds[3][:, :3] - clouds[3][:, :3].mean(0)
    xyz = xyz / np.sqrt((xyz**2).sum(1)).max()
    index = farthest_point_sample(torch.from_numpy(xyz)[None], NUM_POINTS, pointnet2_ops_compat=True, backend="torch")
    np.testing.assert_allclose(points, xyz[index[0].numpy()], atol=1e-6)
    # The train split has neither files nor a cache.
    with pytest.raises(DataError, match="are missing under .*first: airplane/airplane_0001.txt"):
        data.check_files(read_split(find_dataset(tmp_path), "train"))


def test_dat_cache_with_wrong_labels_or_code_is_refused(tmp_path):
    folder = write_txt_dataset(tmp_path, files=False)
    cache = folder / "modelnet40_test_8192pts_fps.dat"
    clouds = [_cloud(i).astype(np.float32) for i in range(4)]
    with cache.open("wb") as handle:
        pickle.dump([clouds, [np.array([c]).astype(np.int32) for c in (0, 0, 1, 2)]], handle)
    with pytest.raises(DataError, match="labels entry 1"):
        load_points(read_split(find_dataset(tmp_path), "test"), [0], NUM_POINTS)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with cache.open("wb") as handle:
        pickle.dump([[Evil()], []], handle)
    with pytest.raises(DataError, match="is not allowed in a point cache"):
        load_points(read_split(find_dataset(tmp_path), "test"), [0], NUM_POINTS)


def test_h5_layout_takes_the_first_points_after_normalizing(tmp_path):
    h5py = pytest.importorskip("h5py")
    folder = tmp_path / data.H5_FOLDER
    folder.mkdir()
    rng = np.random.default_rng(1)
    arrays = {}
    for name, count in (("ply_data_train0.h5", 3), ("ply_data_train1.h5", 2), ("ply_data_test0.h5", 4)):
        clouds = rng.normal(size=(count, 80, 3)).astype(np.float32) + 2.0
        labels = rng.integers(0, 40, size=(count, 1)).astype(np.uint8)
        with h5py.File(folder / name, "w") as handle:
            handle["data"], handle["label"] = clouds, labels
        arrays[name] = (clouds, labels)
    for root in (tmp_path, folder):
        assert find_dataset(root) == data.ModelNetDataset(folder, "h5")
    train, test = read_split(find_dataset(tmp_path), "train"), read_split(find_dataset(tmp_path), "test")
    assert train.ids == ("ply_data_train0.h5:0", "ply_data_train0.h5:1", "ply_data_train0.h5:2",
                         "ply_data_train1.h5:0", "ply_data_train1.h5:1")
    assert train.labels[3] == int(arrays["ply_data_train1.h5"][1][0, 0]) and test.source == "h5"
    points = load_points(test, [2], 32)[0].numpy()
    raw = arrays["ply_data_test0.h5"][0][2]
    centred = raw - raw.mean(0)
    np.testing.assert_allclose(points, (centred / np.sqrt((centred**2).sum(1)).max())[:32], atol=1e-6)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "needs a data root: pass --data-root modelnet40=PATH"),
        (lambda p: p / "nowhere", "does not exist"),
        (lambda p: p, "holds no ModelNet40 dataset"),
        (lambda p: (p / data.TXT_FOLDER).mkdir() or p, "holds neither modelnet40_shape_names.txt"),
    ],
)
def test_wrong_root_names_the_expected_layout(tmp_path, make, message):
    with pytest.raises(DataError, match=message) as info:
        find_dataset(make(tmp_path))
    assert "modelnet40_normal_resampled" in str(info.value) and "ply_data_train" in str(info.value)


def test_list_naming_an_unknown_class_is_refused(tmp_path):
    folder = write_txt_dataset(tmp_path)
    (folder / "modelnet40_test.txt").write_text("spaceship_0001\n")
    with pytest.raises(DataError, match="'spaceship', which modelnet40_shape_names.txt does not name"):
        read_split(find_dataset(tmp_path), "test")


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def test_overall_and_mean_class_accuracy_by_hand():
    labels = torch.tensor([0, 0, 0, 1, 2])
    predictions = torch.tensor([0, 0, 1, 1, 0])
    logits = torch.nn.functional.one_hot(predictions, 3).float()
    assert topk_accuracy(logits, labels, 1) == pytest.approx(60.0)  # 3 of 5
    assert mean_class_accuracy(logits, labels) == pytest.approx(100 * (2 / 3 + 1 + 0) / 3)
    # A class absent from the labels (class 3 here) does not count.
    logits4 = torch.nn.functional.one_hot(predictions, 4).float()
    assert mean_class_accuracy(logits4, labels) == pytest.approx(100 * (2 / 3 + 1 + 0) / 3)


# --------------------------------------------------------------------------------------------
# The task: weights, calibration, evaluation
# --------------------------------------------------------------------------------------------


class TinyModelNet40(ModelNet40Task):
    """The real task with a tiny point-mae, so the test checkpoint is small."""

    MODELS = {"point-mae": PointModel(ModelSpec("point-mae", "test", "point_mae"), NUM_POINTS, TINY_ARCH)}


def _official_checkpoint(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny classifier saved as Point-MAE's training scripts save: ``base_model``, ``module.``."""
    torch.manual_seed(seed)
    net = PointMAEClassifier(**TINY_ARCH)
    for module in net.modules():  # non-trivial BN statistics, so a partial load would show
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    state = net.state_dict()
    torch.save({"base_model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3,
                "metrics": {"acc": 91.5}}, path)
    return state


def test_missing_weights_say_where_to_get_them(tmp_path):
    write_txt_dataset(tmp_path)
    task = ModelNet40Task(TaskOptions(data_root=tmp_path))
    with pytest.raises(DataError, match=r"modelnet_1k\.pth.*Pang-Yatian/Point-MAE.*--weights modelnet40="):
        task.validate()
    with pytest.raises(DataError, match="does not exist"):
        ModelNet40Task(TaskOptions(data_root=tmp_path, weights=tmp_path / "nope.pth")).validate()


def test_checkpoint_in_the_official_layout_builds_the_model(tmp_path):
    write_txt_dataset(tmp_path)
    checkpoint = tmp_path / "modelnet_1k.pth"
    state = _official_checkpoint(checkpoint)
    task = TinyModelNet40(TaskOptions(data_root=tmp_path, weights=checkpoint))
    task.validate()
    model = task.build_model("point-mae")
    assert isinstance(model, PointMAEClassifier) and not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    # The full-size model refuses the tiny checkpoint with a clear error.
    with pytest.raises(DataError, match="shape mismatch|does not fit"):
        ModelNet40Task(TaskOptions(data_root=tmp_path, weights=checkpoint)).build_model("point-mae")
    # A safetensors state dict loads too.
    from safetensors.torch import save_file

    save_file(state, tmp_path / "tiny.safetensors")
    other_task = TinyModelNet40(TaskOptions(data_root=tmp_path, weights=tmp_path / "tiny.safetensors"))
    other = other_task.build_model("point-mae")
    assert torch.equal(other.state_dict()["cls_token"], state["cls_token"])


def test_calibration_is_seeded_from_train_with_file_ids(tmp_path):
    write_txt_dataset(tmp_path)
    task = TinyModelNet40(TaskOptions(data_root=tmp_path))
    first, again = task.calibration_set("point-mae", 4, seed=3), task.calibration_set("point-mae", 4, seed=3)
    other = task.calibration_set("point-mae", 4, seed=4)
    train = read_split(find_dataset(tmp_path), "train")
    assert first.sample_ids == again.sample_ids and set(first.sample_ids) <= set(train.ids)
    assert len(set(first.sample_ids)) == 4 and first.sample_ids != other.sample_ids
    assert torch.equal(torch.cat(list(first)), torch.cat(list(again)))
    assert torch.cat(list(first)).shape == (4, NUM_POINTS, 3)
    expected = torch.randperm(len(train), generator=torch.Generator().manual_seed(3))[:4].tolist()
    assert first.sample_ids == tuple(train.ids[i] for i in expected)
    manifest = first.manifest()
    assert manifest["source"] == "modelnet40:train" and manifest["population_sha256"] == sha256_of(train.ids)
    with pytest.raises(DataError, match="between 1 and 6"):
        task.calibration_set("point-mae", 7, seed=0)


def test_evaluate_reports_oa_macc_agreement_and_kl(tmp_path):
    write_txt_dataset(tmp_path)
    checkpoint = tmp_path / "modelnet_1k.pth"
    _official_checkpoint(checkpoint)
    task = TinyModelNet40(TaskOptions(data_root=tmp_path, weights=checkpoint, eval_batch_size=3))
    model = task.build_model("point-mae")
    evaluation = task.evaluate(model, "point-mae")
    assert set(evaluation.metrics) == {"oa", "macc"} and evaluation.outputs.shape == (4, 40)
    predictions = evaluation.outputs.argmax(1)
    labels = torch.tensor([0, 1, 1, 2])
    assert evaluation.metrics["oa"] == pytest.approx(100 * (predictions == labels).double().mean().item())
    again = task.evaluate(model, "point-mae", reference=evaluation)
    assert again.metrics["agreement"] == 100.0 and again.metrics["kl_to_float"] == pytest.approx(0.0, abs=1e-9)
    limited = TinyModelNet40(TaskOptions(data_root=tmp_path, weights=checkpoint, eval_limit=2))
    assert limited.evaluate(model, "point-mae").details["samples"] == 2
    with pytest.raises(DataError, match="same eval limit"):
        limited.evaluate(model, "point-mae", reference=Evaluation({}, evaluation.outputs))
    manifest = task.data_manifest("point-mae")
    assert manifest["test_size"] == 4 and manifest["train_source"] == "txt" and manifest["num_points"] == NUM_POINTS
    assert manifest["weights"]["sha256"] and manifest["classes"] == 40


def test_dataset_with_another_class_count_is_refused(tmp_path):
    folder = write_txt_dataset(tmp_path)
    (folder / data.SHAPE_NAMES).write_text("airplane\nflower_pot\nnight_stand\n")
    with pytest.raises(DataError, match="has 3 classes, model 'point-mae' classifies 40"):
        TinyModelNet40(TaskOptions(data_root=tmp_path)).calibration_set("point-mae", 2, 0)


# --------------------------------------------------------------------------------------------
# Real assets
# --------------------------------------------------------------------------------------------


@pytest.mark.real_assets
def test_real_modelnet40_assets_load_as_listed():
    folder = ASSETS / "modelnet40_normal_resampled"
    if not folder.is_dir():
        pytest.skip("../shared/assets is absent")
    dataset = find_dataset(ASSETS)
    assert dataset == data.ModelNetDataset(folder, "txt")
    names = [line.strip() for line in (folder / "modelnet40_shape_names.txt").read_text().splitlines() if line.strip()]
    assert len(names) == 40
    for split in ("train", "test"):
        lines = (folder / f"modelnet40_{split}.txt").read_text().splitlines()
        listed = [line.strip() for line in lines if line.strip()]
        loaded = read_split(dataset, split)
        assert loaded.ids == tuple(f"{'_'.join(s.split('_')[:-1])}/{s}.txt" for s in listed)
        assert loaded.labels == tuple(names.index("_".join(s.split("_")[:-1])) for s in listed)
        assert loaded.source == "txt"
        data.check_files(loaded)
        picks = [0, len(loaded) // 2, len(loaded) - 1]
        points = load_points(loaded, picks, 1024)
        for row, index in enumerate(picks):
            expected = _parse_reference(folder / loaded.ids[index], 1024)
            np.testing.assert_allclose(points[row].numpy(), expected, rtol=0, atol=1e-6)
    test, train = read_split(dataset, "test"), read_split(dataset, "train")
    assert sum(label == names.index("airplane") for label in test.labels) == 100  # every test airplane
    assert not set(test.ids) & set(train.ids)
    on_disk = {path.relative_to(folder).as_posix() for path in folder.glob("*/*.txt")}
    assert on_disk == set(test.ids) | set(train.ids)  # the lists name exactly the shape files


# --------------------------------------------------------------------------------------------
# The demo twin
# --------------------------------------------------------------------------------------------


def test_procedural_shapes_are_seeded_and_sane():
    for name in CLASSES:
        a = generate_shape(name, np.random.default_rng(5), 300)
        b = generate_shape(name, np.random.default_rng(5), 300)
        assert a.points.shape == a.normals.shape == (300, 3)
        np.testing.assert_array_equal(a.points, b.points)
        assert np.isfinite(a.points).all()
        np.testing.assert_allclose(np.linalg.norm(a.normals, axis=1), 1.0, atol=1e-6)


@pytest.fixture(scope="session")
def demo(shared_cache):
    """(task, float model, its evaluation) of the demo twin, trained or loaded once."""
    from benchsuite.tasks.modelnet40_demo import MODEL_NAME, ModelNet40DemoTask

    task = ModelNet40DemoTask()
    model = task.build_model(MODEL_NAME)
    return task, model, task.evaluate(model, MODEL_NAME)


@pytest.mark.slow
def test_demo_data_is_written_in_the_txt_layout_and_the_model_learns_it(demo, shared_cache):
    from benchsuite.tasks import modelnet40_demo

    task, model, evaluation = demo
    folder = modelnet40_demo.demo_data_root() / data.TXT_FOLDER
    assert folder.is_relative_to(shared_cache)
    dataset = find_dataset(folder.parent)  # the generated folder reads as a user's data root would
    train, test = read_split(dataset, "train"), read_split(dataset, "test")
    recipe = modelnet40_demo.DATA_RECIPE
    assert len(train) == len(CLASSES) * recipe["train_per_class"]
    assert len(test) == len(CLASSES) * recipe["test_per_class"]
    assert train.classes == CLASSES and (folder / train.ids[0]).is_file()
    assert np.loadtxt(folder / test.ids[0], delimiter=",").shape == (recipe["points_per_shape"], 6)
    assert modelnet40_demo.cached_weights_path().is_file()
    assert isinstance(model, PointMAEClassifier) and model.num_classes == len(CLASSES)
    assert evaluation.metrics["oa"] >= 60.0  # chance is 10 %
    calibration = task.calibration_set(modelnet40_demo.MODEL_NAME, 8, seed=0)
    assert calibration.sample_ids[0].endswith(".txt") and torch.cat(list(calibration)).shape[1:] == (256, 3)
    generated = task.data_manifest(modelnet40_demo.MODEL_NAME)["generated"]
    assert generated["recipe_sha256_12"] == modelnet40_demo.data_hash()
