"""The ShapeNetPart demo twin: procedural part-labelled shapes and a tiny Point-MAE, no download.

Why a task of its own (``shapenetpart-demo``) rather than a demo mode of ``shapenetpart``: its
categories, parts, point count and model differ from the real task, so its numbers must never be
filed under ``shapenetpart`` (the task name is part of every result's key and leaderboard row);
and a mode switched on by a missing ``--data-root`` would turn a forgotten flag into a silent demo.
What it shares with the real task is the code path: the data is *written to disk in the
ShapeNetPart layout* and read back through the same loader (:mod:`benchsuite.tasks.shapenetpart_data`),
and evaluation, calibration and metrics are those of :class:`~benchsuite.tasks.shapenetpart.PartSegmentationTask`.

Data (:data:`DATA_RECIPE`): four categories of its own, made of 10 parts in all (the table is
:data:`DEMO_SEG_CLASSES`), drawn by :mod:`benchsuite.tasks.part_shapes` with random proportions,
rotation about the up axis, tilt, scale and jitter. It is generated once into the benchsuite cache
folder (``$BENCHSUITE_CACHE``, see :func:`benchsuite.tasks.digits.cache_dir`), under a name that
includes a hash of the recipe.

Model (:data:`MODEL_RECIPE`): a small :class:`~benchsuite.pointcloud.PointMAESegmenter` (dim 64,
depth 3, 4 heads, 32 groups of 8 neighbours, 512 points), trained once on the train list by
:func:`train_demo_segmenter` and cached as safetensors under a name with the hash of both
recipes, so a change of either retrains. ``--weights shapenetpart-demo=FILE`` loads other weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchsuite.api import ModelSpec, TaskInfo
from benchsuite.pointcloud import PointMAESegmenter, pack_segmentation_input
from benchsuite.pointcloud.data import shape_rng
from benchsuite.tasks.digits import cache_dir
from benchsuite.tasks.part_shapes import generate_shape
from benchsuite.tasks.shapenetpart import PartSegmentationTask
from benchsuite.tasks.shapenetpart_data import (
    DATASET_FOLDER,
    atomic_folder,
    load_shape,
    publish_folder,
    read_categories,
    read_split,
    write_shape,
    write_split_lists,
)
from benchsuite.weights import cached_trained_weights, file_sha256, load_into, load_weights_file

__all__ = [
    "DATA_RECIPE",
    "DEMO_CATEGORIES",
    "DEMO_SEG_CLASSES",
    "MODEL_NAME",
    "MODEL_RECIPE",
    "ShapeNetPartDemoTask",
    "build_architecture",
    "cached_weights_path",
    "demo_data_folder",
    "generate_demo_dataset",
    "train_demo_segmenter",
    "training_runs",
]

log = logging.getLogger(__name__)

MODEL_NAME = "point-mae-tiny"

#: The demo's categories in one-hot order, with made-up synset folder names (real synsets are
#: 8-digit WordNet offsets starting with 0; these start with 9 so they can never be confused).
DEMO_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("Mug", "90000001"),
    ("Lamp", "90000002"),
    ("Table", "90000003"),
    ("Chair", "90000004"),
)

#: Category → global part ids of the demo (its own table, not ShapeNetPart's). Parts, in order:
#: Mug body, handle; Lamp shade, rod, base; Table top, legs; Chair seat, back, legs
#: (:data:`benchsuite.tasks.part_shapes.GENERATORS` names them).
DEMO_SEG_CLASSES: dict[str, tuple[int, ...]] = {
    "Mug": (0, 1),
    "Lamp": (2, 3, 4),
    "Table": (5, 6),
    "Chair": (7, 8, 9),
}

#: Everything that determines the generated files; its hash names the data folder.
DATA_RECIPE: dict[str, Any] = {
    "version": 1,
    "seed": 0,
    "raw_points": 1024,
    "shapes_per_category": {"train": 60, "val": 8, "test": 25},
    "categories": [list(c) for c in DEMO_CATEGORIES],
    "generator": "benchsuite.tasks.part_shapes v1 (min part share 0.12, yaw ±pi/6, tilt 0.1 rad, jitter 0.008)",
}

#: Everything that determines the trained weights (with :data:`DATA_RECIPE`).
MODEL_RECIPE: dict[str, Any] = {
    "version": 1,
    "num_points": 512,
    "architecture": {
        "dim": 64,
        "depth": 3,
        "num_heads": 4,
        "num_groups": 32,
        "group_size": 8,
        "mlp_ratio": 2.0,
        "label_channels": 16,
        "propagation_channels": [128, 64],
        "head_channels": [64, 32],
        "drop_path_rate": 0.0,
    },
    "seed": 0,
    "epochs": 8,
    "batch_size": 16,
    "optimizer": "AdamW",
    "lr": 3e-3,
    "weight_decay": 0.05,
    "schedule": {"name": "OneCycleLR", "pct_start": 0.15},
    # Each epoch resamples every training shape afresh (seed = epoch, with the shape id) and
    # scales it by a random factor per axis in this range.
    "scale_range": [0.85, 1.15],
    # Cross-entropy weighted per part by 1 / sqrt(share of training points), see _part_weights.
    "balanced_loss": True,
}

NUM_POINTS = MODEL_RECIPE["num_points"]


def _hash(*parts: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(list(parts), sort_keys=True).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# Data: generated once into the cache, in the ShapeNetPart layout
# --------------------------------------------------------------------------------------------


def demo_data_folder() -> Path:
    """Where the generated dataset lives (the folder holding ``synsetoffset2category.txt``)."""
    return cache_dir() / f"shapenetpart-demo-data-{_hash(DATA_RECIPE)}" / DATASET_FOLDER


def _shape_id(name: str, number: int) -> str:
    """A 32-hex shape id like ShapeNet's, derived from the recipe seed, category and number."""
    return hashlib.md5(f"{DATA_RECIPE['seed']}:{name}:{number}".encode()).hexdigest()


def generate_demo_dataset(root: Path) -> Path:
    """Write the demo dataset under ``root`` (``root/DATASET_FOLDER/...``); return that folder."""
    folder = root / DATASET_FOLDER
    counts = DATA_RECIPE["shapes_per_category"]
    splits: dict[str, list[str]] = {split: [] for split in counts}
    for name, synset in DEMO_CATEGORIES:
        first_part = DEMO_SEG_CLASSES[name][0]
        number = 0
        for split, count in counts.items():
            for _ in range(count):
                shape = _shape_id(name, number)
                cloud = generate_shape(name, shape_rng(DATA_RECIPE["seed"], f"{name}/{number}"),
                                       DATA_RECIPE["raw_points"])
                write_shape(folder / synset / f"{shape}.txt", cloud.points, cloud.normals, cloud.parts + first_part)
                splits[split].append(f"{synset}/{shape}")
                number += 1
    # Shuffled, as the real lists are; the loader orders shapes itself.
    order = np.random.default_rng(DATA_RECIPE["seed"])
    write_split_lists(folder, {s: [ids[i] for i in order.permutation(len(ids))] for s, ids in splits.items()},
                      DEMO_CATEGORIES)
    return folder


_lock = threading.RLock()


def ensure_demo_data() -> Path:
    """The demo data folder, generating it first when absent (atomically: a folder rename)."""
    folder = demo_data_folder()
    with _lock:
        if not (folder / "synsetoffset2category.txt").is_file():
            started = time.perf_counter()
            final = folder.parent
            tmp = atomic_folder(final)
            try:
                generate_demo_dataset(tmp)
                publish_folder(tmp, final)
            except BaseException:
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
                raise
            log.info("generated the shapenetpart demo data in %.1f s", time.perf_counter() - started)
    return folder


# --------------------------------------------------------------------------------------------
# Model, training and the weights cache
# --------------------------------------------------------------------------------------------


def build_architecture() -> PointMAESegmenter:
    """The untrained demo segmenter (initialized from a fixed seed, global RNG untouched)."""
    arch = dict(MODEL_RECIPE["architecture"])
    arch["propagation_channels"] = tuple(arch["propagation_channels"])
    arch["head_channels"] = tuple(arch["head_channels"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(MODEL_RECIPE["seed"])
        return PointMAESegmenter(num_parts=_num_parts(), num_categories=len(DEMO_CATEGORIES), **arch)


def _num_parts() -> int:
    return 1 + max(p for parts in DEMO_SEG_CLASSES.values() for p in parts)


def cached_weights_path() -> Path:
    return cache_dir() / f"shapenetpart-demo-{MODEL_NAME}-{_hash(DATA_RECIPE, MODEL_RECIPE)}.safetensors"


_training_runs = 0


def training_runs() -> int:
    """How many times this process has trained the demo model (0 when the cache was hit)."""
    return _training_runs


def _training_shapes(folder: Path) -> tuple[list[str], list[np.ndarray], list[np.ndarray], torch.Tensor]:
    categories = read_categories(folder, DEMO_SEG_CLASSES)
    split = read_split(folder, "train", categories)
    xyz, labels = [], []
    for sample_id, category in zip(split.ids, split.categories):
        points, parts = load_shape(folder, sample_id, categories[category])
        xyz.append(points)
        labels.append(parts)
    return list(split.ids), xyz, labels, torch.tensor(split.categories, dtype=torch.long)


def train_demo_segmenter(folder: Path | None = None) -> dict[str, torch.Tensor]:
    """Train the demo segmenter on the train list with :data:`MODEL_RECIPE`; return its state dict."""
    global _training_runs
    folder = folder or ensure_demo_data()
    ids, xyz, labels, categories = _training_shapes(folder)
    model = build_architecture()
    generator = torch.Generator().manual_seed(MODEL_RECIPE["seed"])
    batch_size, epochs = MODEL_RECIPE["batch_size"], MODEL_RECIPE["epochs"]
    steps = epochs * -(-len(ids) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=MODEL_RECIPE["lr"], weight_decay=MODEL_RECIPE["weight_decay"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=MODEL_RECIPE["lr"], total_steps=steps, pct_start=MODEL_RECIPE["schedule"]["pct_start"]
    )
    weights = _part_weights(labels) if MODEL_RECIPE["balanced_loss"] else None
    started = time.perf_counter()
    threads = torch.get_num_threads()
    # One thread: on a shared 2-core machine it was faster than two (0.55 s vs 1.1 s per batch of 32).
    torch.set_num_threads(1)
    model.train()
    try:
        for epoch in range(epochs):
            points, targets = _resample_all(ids, xyz, labels, epoch)
            low, high = MODEL_RECIPE["scale_range"]
            order = torch.randperm(len(ids), generator=generator)
            for start in range(0, len(ids), batch_size):
                batch = order[start : start + batch_size]
                scale = low + (high - low) * torch.rand(len(batch), 1, 3, generator=generator)
                inputs = pack_segmentation_input(points[batch] * scale, categories[batch], len(DEMO_CATEGORIES))
                loss = F.cross_entropy(model(inputs), targets[batch], weight=weights)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    finally:
        torch.set_num_threads(threads)
    _training_runs += 1
    log.info("trained %s in %.1f s", MODEL_NAME, time.perf_counter() - started)
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _part_weights(labels: list[np.ndarray]) -> torch.Tensor:
    """Loss weight per part ∝ 1 / sqrt(its share of the training points), mean 1 over the parts.

    Small parts (a mug's handle) are otherwise learned only after many epochs: the body
    dominates the loss, and the demo's training budget is a few CPU seconds.
    """
    counts = np.bincount(np.concatenate(labels), minlength=_num_parts()).astype(np.float64)
    weights = 1.0 / np.sqrt(np.maximum(counts, 1.0) / counts.sum())
    return torch.tensor(weights / weights.mean(), dtype=torch.float32)


def _resample_all(ids, xyz, labels, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    from benchsuite.pointcloud.data import resample_indices

    points = np.empty((len(ids), NUM_POINTS, 3), dtype=np.float32)
    targets = np.empty((len(ids), NUM_POINTS), dtype=np.int64)
    for row, (sample_id, cloud, parts) in enumerate(zip(ids, xyz, labels)):
        choice = resample_indices(len(cloud), NUM_POINTS, 1000 + epoch, sample_id)
        points[row], targets[row] = cloud[choice], parts[choice]
    return torch.from_numpy(points), torch.from_numpy(targets)


def _cached_state() -> dict[str, torch.Tensor]:
    """The trained weights from the cache, training and caching them first when needed."""
    return cached_trained_weights(
        cached_weights_path(),
        lambda: train_demo_segmenter(ensure_demo_data()),
        label="shapenetpart-demo",
        metadata={
            "data_recipe": json.dumps(DATA_RECIPE, sort_keys=True),
            "model_recipe": json.dumps(MODEL_RECIPE, sort_keys=True),
        },
        lock=_lock,
    )


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------

_INFO = TaskInfo(
    modality="point_cloud",
    metrics=("instance_miou", "class_miou", "point_acc", "agreement", "kl_to_float"),
    main_metric="instance_miou",
    higher_is_better=True,
    default_calib_size=32,
    description=(
        "ShapeNetPart's demo twin: 372 generated mugs, lamps, tables and chairs (10 parts) in the "
        "ShapeNetPart layout, read by the same loader; a tiny Point-MAE trained by benchsuite; no data root"
    ),
    demo=True,
)


class ShapeNetPartDemoTask(PartSegmentationTask):
    """Part segmentation of generated shapes, through the ShapeNetPart loader, metrics and protocol."""

    name = "shapenetpart-demo"
    info = _INFO
    part_table = DEMO_SEG_CLASSES
    num_points = NUM_POINTS

    @classmethod
    def models(cls) -> Mapping[str, ModelSpec]:
        arch = MODEL_RECIPE["architecture"]
        return {
            MODEL_NAME: ModelSpec(
                name=MODEL_NAME,
                source="benchsuite.pointcloud.PointMAESegmenter",
                family="point_mae",
                description=(
                    f"Point-MAE part segmenter, dim {arch['dim']}, depth {arch['depth']}, {arch['num_heads']} heads, "
                    f"{arch['num_groups']} groups x {arch['group_size']} points, {NUM_POINTS} input points, "
                    "trained on the demo train list by benchsuite"
                ),
            )
        }

    def folder(self) -> Path:
        """The generated data (the data root is not used: the demo makes its own)."""
        return ensure_demo_data()

    def dataset_name(self) -> str:
        return f"benchsuite procedural part shapes ({_hash(DATA_RECIPE)}), ShapeNetPart layout"

    def build_model(self, model: str) -> nn.Module:
        self.resolve_model(model)
        net = build_architecture()
        if self.options.weights is not None:
            path = Path(self.options.weights).expanduser()
            load_into(net, load_weights_file(path, label="shapenetpart-demo"), path, MODEL_NAME,
                      label="shapenetpart-demo")
        else:
            load_into(net, _cached_state(), cached_weights_path(), MODEL_NAME, label="shapenetpart-demo")
        return net.eval().to(self.options.device)

    def model_manifest(self, model: str) -> dict[str, Any]:
        manifest: dict[str, Any] = {"name": model, "architecture": dict(MODEL_RECIPE["architecture"]),
                                    "data_recipe": dict(DATA_RECIPE)}
        if self.options.weights is not None:
            path = Path(self.options.weights).expanduser()
            manifest["weights"] = {"source": "file", "path": str(path)}
            if path.is_file():
                manifest["weights"]["sha256"] = file_sha256(path)
        else:
            manifest["weights"] = {"source": "trained by benchsuite", "model_recipe": dict(MODEL_RECIPE),
                                   "cache_file": cached_weights_path().name}
        return manifest
