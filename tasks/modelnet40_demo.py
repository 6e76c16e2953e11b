"""``modelnet40-demo``: the ModelNet40 task on procedural shapes with a tiny Point-MAE trained here.

The demo twin exercises every line of the real task except where data and weights come from:

- data: :data:`DATA_RECIPE` shapes of the classes in :mod:`benchsuite.tasks.class_shapes`, written
  once in the ``modelnet40_normal_resampled`` txt layout (shape-name and split lists,
  ``<class>/<class>_NNNN.txt`` files of ``x,y,z,nx,ny,nz`` lines) under the benchsuite cache, and
  read back through the real loader and preprocessing (normalize, drop normals, FPS);
- model: a :class:`~benchsuite.pointcloud.point_mae.PointMAEClassifier` with the real layer
  structure but small widths (:data:`MODEL_RECIPE`), trained by :func:`train_demo_model` on the
  train split and cached as safetensors.

Both cache names include a hash of their recipe (the model's includes the data's), so a recipe
change regenerates or retrains. It is a separate task, not a mode of ``modelnet40``, so its rows
can never be mistaken for ModelNet40 numbers and it needs no data root or weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchsuite.api import ModelSpec, TaskInfo
from benchsuite.errors import DataError
from benchsuite.pointcloud.data import shape_rng
from benchsuite.pointcloud.point_mae import PointMAEClassifier, load_point_mae_checkpoint
from benchsuite.tasks.class_shapes import CLASSES, generate_shape
from benchsuite.tasks.digits import cache_dir
from benchsuite.tasks.modelnet40 import ModelNet40Task, PointModel, load_weights_from
from benchsuite.tasks.modelnet40_data import (
    TXT_FOLDER,
    ModelNetDataset,
    load_points,
    read_split,
    write_lists,
    write_shape,
)
from benchsuite.weights import cached_trained_weights

__all__ = [
    "DATA_RECIPE",
    "MODEL_NAME",
    "MODEL_RECIPE",
    "ModelNet40DemoTask",
    "cached_weights_path",
    "data_hash",
    "demo_dataset",
    "generate_dataset",
    "model_hash",
    "train_demo_model",
    "training_runs",
]

log = logging.getLogger(__name__)

MODEL_NAME = "point-mae-tiny"

#: Everything that determines the generated shapes; its hash names the data folder.
DATA_RECIPE: dict[str, Any] = {
    "version": 1,
    "classes": list(CLASSES),
    "train_per_class": 32,
    "test_per_class": 16,
    "points_per_shape": 1024,
    "seed": 0,
    "shape": {"max_tilt": 0.25, "scale_range": [0.8, 1.2], "jitter": 0.01},
}

#: Everything that determines the trained weights (with the data's hash); its hash names the file.
MODEL_RECIPE: dict[str, Any] = {
    "version": 1,
    "architecture": {
        "num_classes": len(CLASSES),
        "dim": 64,
        "depth": 4,
        "num_heads": 4,
        "num_groups": 16,
        "group_size": 8,
        "mlp_ratio": 2.0,
        "head_hidden": 64,
        "drop_path_rate": 0.0,
    },
    "num_points": 256,
    "seed": 0,
    "epochs": 8,
    "batch_size": 16,
    "optimizer": "AdamW",
    "lr": 3e-3,
    "weight_decay": 0.05,
    "schedule": {"name": "OneCycleLR", "pct_start": 0.15},
    # Point-MAE's PointcloudScaleAndTranslate: per-axis scale in [2/3, 3/2], shift in [-0.2, 0.2].
    "augment": {"scale": [2 / 3, 3 / 2], "translate": 0.2},
}


def _hash(recipe: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def data_hash() -> str:
    """Short hash of :data:`DATA_RECIPE`."""
    return _hash(DATA_RECIPE)


def model_hash() -> str:
    """Short hash of :data:`MODEL_RECIPE` together with the data it is trained on."""
    return _hash({"model": MODEL_RECIPE, "data": data_hash()})


# --------------------------------------------------------------------------------------------
# Data: generated once into the cache, in the modelnet40_normal_resampled layout
# --------------------------------------------------------------------------------------------

_lock = threading.RLock()  # re-entered: training reads the dataset, which takes it too


def _shape_names(split: str) -> list[str]:
    """``<class>_<NNNN>`` per shape: train numbered from 1, test after train, class by class."""
    train, test = DATA_RECIPE["train_per_class"], DATA_RECIPE["test_per_class"]
    numbers = range(1, train + 1) if split == "train" else range(train + 1, train + test + 1)
    return [f"{name}_{k:04d}" for name in DATA_RECIPE["classes"] for k in numbers]


def generate_dataset(folder: Path) -> None:
    """Write the demo shapes and lists into ``folder`` (the ``modelnet40_normal_resampled`` layout).

    Each shape's random draw comes from ``(seed, shape name)`` alone, so any shape can be
    regenerated on its own and the order of generation does not matter.
    """
    spec = DATA_RECIPE["shape"]
    splits = {split: _shape_names(split) for split in ("train", "test")}
    for shapes in splits.values():
        for shape in shapes:
            name = "_".join(shape.split("_")[:-1])
            cloud = generate_shape(
                name,
                shape_rng(DATA_RECIPE["seed"], shape),
                DATA_RECIPE["points_per_shape"],
                max_tilt=spec["max_tilt"],
                scale_range=tuple(spec["scale_range"]),
                jitter=spec["jitter"],
            )
            write_shape(folder / name / f"{shape}.txt", cloud.points, cloud.normals)
    write_lists(folder, DATA_RECIPE["classes"], splits)


def demo_data_root() -> Path:
    return cache_dir() / f"modelnet40-demo-data-{data_hash()}"


def demo_dataset() -> ModelNetDataset:
    """The generated dataset, writing it first when the cache does not hold it."""
    root = demo_data_root()
    folder = root / TXT_FOLDER
    with _lock:
        if not (root / ".complete").is_file():
            started = time.perf_counter()
            root.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", suffix=".tmp", dir=root.parent))
            try:
                generate_dataset(tmp / TXT_FOLDER)
                (tmp / ".complete").write_text(json.dumps(DATA_RECIPE, sort_keys=True))
                if root.exists():  # an incomplete folder left by a killed run
                    shutil.rmtree(root, ignore_errors=True)
                try:
                    os.replace(tmp, root)
                except OSError:
                    if not (root / ".complete").is_file():
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            log.info("generated the modelnet40-demo shapes in %.1f s", time.perf_counter() - started)
    return ModelNetDataset(folder, "txt")


# --------------------------------------------------------------------------------------------
# Model: trained once on the generated train split, cached as safetensors
# --------------------------------------------------------------------------------------------

_training_runs = 0


def training_runs() -> int:
    """How many times this process has trained the demo model (0 when the cache was hit)."""
    return _training_runs


def cached_weights_path() -> Path:
    return cache_dir() / f"modelnet40-demo-{MODEL_NAME}-{model_hash()}.safetensors"


def _augment(points: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    spec = MODEL_RECIPE["augment"]
    low, high = spec["scale"]
    batch = points.shape[0]
    scale = torch.rand(batch, 1, 3, generator=generator) * (high - low) + low
    shift = (torch.rand(batch, 1, 3, generator=generator) * 2 - 1) * spec["translate"]
    return points * scale + shift


def train_demo_model() -> dict[str, torch.Tensor]:
    """Train :data:`MODEL_NAME` on the generated train split with :data:`MODEL_RECIPE` (CPU)."""
    global _training_runs
    train = read_split(demo_dataset(), "train")
    points = load_points(train, range(len(train)), MODEL_RECIPE["num_points"])
    labels = torch.tensor(train.labels, dtype=torch.long)
    model = _DEMO_MODEL.build()
    generator = torch.Generator().manual_seed(MODEL_RECIPE["seed"])
    batch_size, epochs = MODEL_RECIPE["batch_size"], MODEL_RECIPE["epochs"]
    steps = epochs * -(-len(train) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=MODEL_RECIPE["lr"], weight_decay=MODEL_RECIPE["weight_decay"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=MODEL_RECIPE["lr"], total_steps=steps, pct_start=MODEL_RECIPE["schedule"]["pct_start"]
    )
    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: more threads were slower on a shared CPU (as for digits)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(MODEL_RECIPE["seed"])
            model.train()
            for _ in range(epochs):
                order = torch.randperm(len(train), generator=generator)
                for start in range(0, len(order), batch_size):
                    batch = order[start : start + batch_size]
                    if len(batch) < 2:  # BatchNorm needs two samples
                        continue
                    loss = F.cross_entropy(model(_augment(points[batch], generator)), labels[batch])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
    finally:
        torch.set_num_threads(threads)
    _training_runs += 1
    log.info("trained %s in %.1f s", MODEL_NAME, time.perf_counter() - started)
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _cached_state() -> dict[str, torch.Tensor]:
    """The trained weights from the cache, training and caching them first when needed."""
    return cached_trained_weights(
        cached_weights_path(),
        lambda: train_demo_model(),
        label="modelnet40-demo",
        metadata={"recipe": json.dumps(MODEL_RECIPE, sort_keys=True), "data_sha256_12": data_hash()},
        lock=_lock,
    )


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------

_DEMO_MODEL = PointModel(
    ModelSpec(
        name=MODEL_NAME,
        source="benchsuite.pointcloud.PointMAEClassifier",
        family="point_mae",
        description="Point-MAE classifier with the real layer structure, dim 64, depth 4, 4 heads, "
        "16 groups x 8 neighbours, 256 points, trained on the demo shapes by benchsuite",
    ),
    num_points=MODEL_RECIPE["num_points"],
    architecture=MODEL_RECIPE["architecture"],
)

_INFO = TaskInfo(
    modality="point_cloud",
    metrics=("oa", "macc", "agreement", "kl_to_float"),
    main_metric="oa",
    higher_is_better=True,
    default_calib_size=32,
    description=(
        f"{len(CLASSES)} classes of procedural shapes written in the modelnet40_normal_resampled layout "
        "and read by the modelnet40 loader; a tiny Point-MAE trained by benchsuite; needs no data root"
    ),
    demo=True,
)


class ModelNet40DemoTask(ModelNet40Task):
    """The ModelNet40 task on generated shapes with a tiny Point-MAE trained by benchsuite."""

    name = "modelnet40-demo"
    info = _INFO
    MODELS = {MODEL_NAME: _DEMO_MODEL}

    def dataset(self) -> ModelNetDataset:
        return demo_dataset()

    def load_weights(self, net: PointMAEClassifier, model: PointModel) -> None:
        if self.options.weights is None:
            load_point_mae_checkpoint(net, _cached_state())
            return
        load_weights_from(net, Path(self.options.weights).expanduser(), label=self.name)

    def validate_weights(self) -> None:
        if self.options.weights is not None and not Path(self.options.weights).expanduser().is_file():
            raise DataError(f"{self.name} weights file {str(self.options.weights)!r} does not exist")

    def weights_manifest(self, model: PointModel) -> dict[str, Any]:
        if self.options.weights is not None:
            return super().weights_manifest(model)
        return {"source": "trained by benchsuite", "recipe": MODEL_RECIPE, "recipe_sha256_12": model_hash(),
                "cache_file": cached_weights_path().name}

    def data_manifest(self, model: str) -> dict[str, Any]:
        manifest = super().data_manifest(model)
        manifest["data_root"] = "generated into the benchsuite cache"
        manifest["generated"] = {"recipe": DATA_RECIPE, "recipe_sha256_12": data_hash(),
                                 "folder": demo_data_root().name}
        return manifest
