"""ModelNet40 shape classification by Point-MAE: the point-cloud task of AIQViT's tables.

Data: a user-given root holding ``modelnet40_normal_resampled/`` (with or without the 8192-point
FPS caches) or ``modelnet40_ply_hdf5_2048/``, or pointing at one of those folders; layouts and
preprocessing are described in :mod:`benchsuite.tasks.modelnet40_data` (tasks spec §3.2-3.3).

Model: ``point-mae`` is Point-MAE's fine-tuned ModelNet40 classifier (``cfgs/finetune_modelnet.yaml``:
dim 384, depth 12, 6 heads, 64 groups × 32 neighbours, 1024 input points) with the released
``modelnet_1k.pth``, given as ``--weights modelnet40=modelnet_1k.pth``. benchsuite never downloads
it. Evaluation runs without voting, so the float accuracy may be below the README's 93.80 %.

Metrics (spec §3.5): overall accuracy ``oa`` (main) and mean class accuracy ``macc`` in %, plus
top-1 ``agreement`` with the float model and ``kl_to_float``. Calibration draws ``size`` train
shapes with a seeded permutation of the train list, preprocessed as for evaluation (spec §3.6).
``eval_limit`` takes a fixed-seed random subset of the test list, kept in list order.

:class:`ModelNet40Task` is written so that the demo twin (:mod:`benchsuite.tasks.modelnet40_demo`)
only swaps where the data and the weights come from.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from benchsuite.api import CalibrationSet, Evaluation, ModelSpec, Task, TaskInfo, sha256_of
from benchsuite.errors import DataError
from benchsuite.metrics.classification import (
    classification_metrics,
    evaluate_classifier,
    mean_class_accuracy,
    reference_logits,
    topk_accuracy,
)
from benchsuite.eval_subset import describe_subset, subset_indices
from benchsuite.pointcloud.point_mae import PointMAEClassifier, load_point_mae_checkpoint
from benchsuite.tasks.modelnet40_data import (
    SPLITS,
    ModelNetDataset,
    ModelNetSplit,
    check_files,
    find_dataset,
    load_points,
    preprocess_steps,
    read_split,
)
from benchsuite.weights import TORCH_SUFFIXES, file_sha256, load_weights_file

__all__ = ["CHECKPOINT_URL", "EVAL_SUBSET_SEED", "ModelNet40Task", "PointModel", "load_weights_from"]

#: Seed of the permutation that picks the ``eval_limit`` subset of the test split.
EVAL_SUBSET_SEED = 0

CHECKPOINT_URL = "https://github.com/Pang-Yatian/Point-MAE/releases/download/main/modelnet_1k.pth"
WEIGHTS_HELP = (
    "modelnet40's point-mae needs Point-MAE's fine-tuned ModelNet40 checkpoint modelnet_1k.pth, which "
    "benchsuite does not download: get it from the README of https://github.com/Pang-Yatian/Point-MAE "
    f"('Classification | ModelNet40(1k)', {CHECKPOINT_URL}) and pass --weights modelnet40=PATH/modelnet_1k.pth"
)


@dataclass(frozen=True)
class PointModel:
    """A classifier the task offers: its spec, constructor arguments and input point count."""

    spec: ModelSpec
    num_points: int
    architecture: Mapping[str, Any] = field(default_factory=dict)

    def build(self) -> PointMAEClassifier:
        """The untrained classifier, initialized from a fixed seed (the global RNG is untouched)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return PointMAEClassifier(**self.architecture)

    @property
    def num_classes(self) -> int:
        return int(self.architecture.get("num_classes", 40))


POINT_MAE = PointModel(
    ModelSpec(
        name="point-mae",
        source="Pang-Yatian/Point-MAE modelnet_1k.pth",
        family="point_mae",
        description="Point-MAE fine-tuned on ModelNet40 (dim 384, depth 12, 6 heads, 64 groups x 32, "
        "1024 points; README 93.80 %, voting status unverified), released checkpoint modelnet_1k.pth",
    ),
    num_points=1024,
    architecture={"num_classes": 40},
)

_INFO = TaskInfo(
    modality="point_cloud",
    metrics=("oa", "macc", "agreement", "kl_to_float"),
    main_metric="oa",
    higher_is_better=True,
    default_calib_size=32,
    description="ModelNet40 shape classification (2468 test shapes, 1024 points, no voting) by Point-MAE; "
    "overall accuracy; needs --data-root modelnet40=PATH and --weights modelnet40=modelnet_1k.pth",
)


class ModelNet40Task(Task):
    """ModelNet40 classification: overall and mean class accuracy, agreement and KL to float."""

    name = "modelnet40"
    info = _INFO
    #: The models offered, by name, in leaderboard order.
    MODELS: ClassVar[Mapping[str, PointModel]] = {POINT_MAE.spec.name: POINT_MAE}

    @classmethod
    def models(cls) -> Mapping[str, ModelSpec]:
        return {name: model.spec for name, model in cls.MODELS.items()}

    # -- where data and weights come from (the demo twin overrides these) ----------------------

    def dataset(self) -> ModelNetDataset:
        """The dataset folder of the user's data root."""
        return find_dataset(self.options.data_root, self.name)

    def load_weights(self, net: PointMAEClassifier, model: PointModel) -> None:
        """Load ``--weights`` (an official Point-MAE checkpoint, or a safetensors state dict)."""
        load_weights_from(net, self._weights_path(), label=self.name)

    def weights_manifest(self, model: PointModel) -> dict[str, Any]:
        """What identifies the weights of a result."""
        if self.options.weights is None:
            return {"source": "missing", "expected": "modelnet_1k.pth", "url": CHECKPOINT_URL}
        return _file_manifest(Path(self.options.weights).expanduser())

    def validate_weights(self) -> None:
        self._weights_path()

    # -- the Task interface ----------------------------------------------------------------------

    def validate(self) -> None:
        dataset = self.dataset()
        for split in SPLITS:
            listed = read_split(dataset, split)
            check_files(listed)
            for model in self.MODELS.values():
                self._check_classes(listed, model)
        self.validate_weights()

    def build_model(self, model: str) -> nn.Module:
        point_model = self._point_model(model)
        net = point_model.build()
        self.load_weights(net, point_model)
        return net.eval().to(self.options.device)

    def calibration_set(self, model: str, size: int, seed: int) -> CalibrationSet:
        point_model = self._point_model(model)
        train = self._split("train", point_model)
        if size < 1 or size > len(train):
            raise DataError(
                f"{self.name} calibration size must be between 1 and {len(train)} (the train split), got {size}"
            )
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(len(train), generator=generator)[:size].tolist()
        points = load_points(train, chosen, point_model.num_points, self.options.device)
        return CalibrationSet.from_tensor(
            points.to(self.options.device),
            [train.ids[i] for i in chosen],
            source=f"{self.name}:train",
            seed=seed,
            population_hash=train.files_sha256,
        )

    def evaluate(self, model: nn.Module, model_name: str, reference: Evaluation | None = None) -> Evaluation:
        point_model = self._point_model(model_name)
        test = self._split("test", point_model)
        chosen = subset_indices(len(test), self.options.eval_limit, EVAL_SUBSET_SEED)
        batch_size = max(1, int(self.options.eval_batch_size))
        logits, labels = evaluate_classifier(
            model, self._batches(test, chosen, point_model, batch_size), self.options.device
        )
        if logits.numel() and logits.shape[1] != point_model.num_classes:
            raise DataError(
                f"model {model_name!r} outputs {logits.shape[1]} classes; {self.name} has {point_model.num_classes}"
            )
        metrics = {"oa": topk_accuracy(logits, labels, 1), "macc": mean_class_accuracy(logits, labels)}
        metrics.update(classification_metrics(logits, labels, reference_logits(reference, logits), topk=()))
        details = {
            "samples": len(chosen),
            "sample_ids_sha256": sha256_of([test.ids[i] for i in chosen]),
            "eval_subset": _subset_rule(len(test), self.options.eval_limit),
            "eval_batch_size": batch_size,
        }
        return Evaluation(metrics=metrics, outputs=logits, details=details)

    def data_manifest(self, model: str) -> dict[str, Any]:
        point_model = self._point_model(model)
        train, test = self._split("train", point_model), self._split("test", point_model)
        chosen = subset_indices(len(test), self.options.eval_limit, EVAL_SUBSET_SEED)
        return {
            "dataset": "ModelNet40" if self.name == "modelnet40" else self.name,
            "layout": test.dataset.kind,
            "data_root": str(test.dataset.folder.resolve()),
            "classes": len(test.classes) or test.num_classes,
            "classes_sha256": sha256_of(test.classes) if test.classes else None,
            "label_order": "line index in modelnet40_shape_names.txt" if test.dataset.kind == "txt"
            else "the h5 'label' values",
            "train_size": len(train),
            "train_source": train.source,
            "train_files_sha256": train.files_sha256,
            "test_size": len(test),
            "test_source": test.source,
            "test_files_sha256": test.files_sha256,
            "eval_split": "test",
            "eval_size": len(chosen),
            "eval_subset": _subset_rule(len(test), self.options.eval_limit),
            "eval_ids_sha256": sha256_of([test.ids[i] for i in chosen]),
            "eval_batch_size": int(self.options.eval_batch_size),
            "calibration": "seeded torch.randperm over the train list order, evaluation preprocessing, no labels",
            "num_points": point_model.num_points,
            "preprocess": preprocess_steps(test.source, point_model.num_points),
            "model": {"name": model, "architecture": dict(point_model.architecture)},
            "weights": self.weights_manifest(point_model),
        }

    # ----------------------------------------------------------------------------------------

    def _point_model(self, name: str) -> PointModel:
        return self.MODELS[self.resolve_model(name).name]

    def _split(self, split: str, model: PointModel) -> ModelNetSplit:
        listed = read_split(self.dataset(), split)
        self._check_classes(listed, model)
        return listed

    def _check_classes(self, split: ModelNetSplit, model: PointModel) -> None:
        if split.num_classes > model.num_classes or (split.classes and len(split.classes) != model.num_classes):
            raise DataError(
                f"{self.name}: the dataset at {str(split.dataset.folder)!r} has {split.num_classes} classes, "
                f"model {model.spec.name!r} classifies {model.num_classes}"
            )

    def _weights_path(self) -> Path:
        if self.options.weights is None:
            raise DataError(WEIGHTS_HELP)
        path = Path(self.options.weights).expanduser()
        if not path.is_file():
            raise DataError(f"{self.name} weights file {str(path)!r} does not exist; {WEIGHTS_HELP}")
        return path

    def _batches(
        self, split: ModelNetSplit, chosen: list[int], model: PointModel, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        points = load_points(split, chosen, model.num_points, self.options.device)
        labels = torch.tensor([split.labels[i] for i in chosen], dtype=torch.long)
        for start in range(0, len(chosen), batch_size):
            yield points[start : start + batch_size], labels[start : start + batch_size]


def load_weights_from(net: PointMAEClassifier, path: Path, label: str) -> None:
    """Load a weights file strictly: a Point-MAE checkpoint (.pth/.pt/.bin) or a safetensors state dict.

    Both go through :func:`load_point_mae_checkpoint`, which unwraps ``base_model`` and strips the
    training prefixes, so an official checkpoint and a plain ``state_dict()`` both load.
    """
    if path.suffix.lower() in TORCH_SUFFIXES:
        load_point_mae_checkpoint(net, path)
    else:
        load_point_mae_checkpoint(net, load_weights_file(path, label=label))


def _file_manifest(path: Path) -> dict[str, Any]:
    weights: dict[str, Any] = {"source": "file", "path": str(path)}
    if path.is_file():
        weights["sha256"] = file_sha256(path)
    return weights


def _subset_rule(total: int, limit: int | None) -> str:
    return describe_subset(total, limit, EVAL_SUBSET_SEED, "test shapes", "the test list", "list order")
