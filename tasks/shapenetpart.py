"""ShapeNetPart part segmentation with Point-MAE (tasks spec §3), and the base its demo twin shares.

Data: ``--data-root shapenetpart=PATH``, the folder holding
``shapenetcore_partanno_segmentation_benchmark_v0_normal/`` or that folder itself
(:mod:`benchsuite.tasks.shapenetpart_data` reads it). Evaluation runs the test list; calibration
draws from the train list.

Preprocessing (Point-MAE ``segmentation/``): xyz only (its ``--normal`` flag is off, so normals are
dropped), normalized into the unit sphere over all of a shape's points, then resampled *with
replacement* to 2048 points, at test time too. The reference resamples with an unseeded
``np.random.choice``; benchsuite draws shape ``s`` with a generator seeded from
``(seed, s's id)`` (spec §3.3 proposal), so results do not depend on iteration order. The
evaluation uses the fixed seed :data:`EVAL_RESAMPLE_SEED`, not the cell seed: every quantized cell
is compared point by point with one float evaluation per (task, model), so all of them must see
the same points. Calibration uses the cell seed, for the choice of shapes and for their resample.

Model ``point-mae``: :class:`~benchsuite.pointcloud.PointMAESegmenter` with the reference sizes,
weights from ``--weights shapenetpart=part_seg.pth`` (the official checkpoint, read with
``torch.load(weights_only=True)`` by :func:`~benchsuite.pointcloud.load_point_mae_checkpoint`).
There is no download: without the file the model cannot be built.

Metrics (§3.5, :mod:`benchsuite.metrics.segmentation`): ``instance_miou`` (main), ``class_miou``,
``point_acc``, plus per-point ``agreement`` with the float model and ``kl_to_float`` between the
per-point distributions over the shape's category's parts.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from benchsuite.api import CalibrationSet, Evaluation, ModelSpec, Task, TaskInfo, sha256_of
from benchsuite.errors import DataError
from benchsuite.metrics.segmentation import (
    category_mious,
    evaluate_segmenter,
    predict_parts,
    reference_part_logits,
    segmentation_metrics,
    shape_ious,
)
from benchsuite.pointcloud import PointMAESegmenter, load_point_mae_checkpoint, pack_segmentation_input
from benchsuite.eval_subset import describe_subset, subset_indices
from benchsuite.tasks.shapenetpart_data import (
    Category,
    Clouds,
    PartSplit,
    dataset_folder,
    load_clouds,
    read_categories,
    read_split,
)
from benchsuite.weights import file_sha256

__all__ = [
    "EVAL_RESAMPLE_SEED",
    "EVAL_SUBSET_SEED",
    "NUM_POINTS",
    "SEG_CLASSES",
    "PartSegmentationTask",
    "ShapeNetPartTask",
    "clear_caches",
    "eval_indices",
]

#: Category → global part ids, the 16 categories and 50 parts of ShapeNetPart. Source: the
#: ``seg_classes`` table of Point-MAE's ``segmentation/main.py`` and ``segmentation/dataset.py``
#: (the same table as PointNet++'s ShapeNetPart code); the category names are those of
#: ``synsetoffset2category.txt``.
SEG_CLASSES: dict[str, tuple[int, ...]] = {
    "Airplane": (0, 1, 2, 3),
    "Bag": (4, 5),
    "Cap": (6, 7),
    "Car": (8, 9, 10, 11),
    "Chair": (12, 13, 14, 15),
    "Earphone": (16, 17, 18),
    "Guitar": (19, 20, 21),
    "Knife": (22, 23),
    "Lamp": (24, 25, 26, 27),
    "Laptop": (28, 29),
    "Motorbike": (30, 31, 32, 33, 34, 35),
    "Mug": (36, 37),
    "Pistol": (38, 39, 40),
    "Rocket": (41, 42, 43),
    "Skateboard": (44, 45, 46),
    "Table": (47, 48, 49),
}

#: Points per shape at evaluation and calibration (Point-MAE ``--npoint 2048``).
NUM_POINTS = 2048
#: Seed of the per-shape evaluation resample (with the shape id); fixed, see the module doc.
EVAL_RESAMPLE_SEED = 0
#: Seed of the permutation that picks the ``eval_limit`` subset of the test list.
EVAL_SUBSET_SEED = 0

MODEL_NAME = "point-mae"


def eval_indices(total: int, limit: int | None) -> list[int]:
    """All test shapes, or the first ``limit`` of a fixed-seed permutation, kept in list order.

    A random subset spreads over the categories (the list is grouped by category), and a
    smaller limit's subset is contained in a larger one's (:func:`~benchsuite.eval_subset.subset_indices`).
    """
    return subset_indices(total, limit, EVAL_SUBSET_SEED)


@lru_cache(maxsize=2)
def _eval_clouds(
    split: PartSplit, categories: tuple[Category, ...], indices: tuple[int, ...], num_points: int, seed: int
) -> Clouds:
    """The evaluation shapes, parsed and resampled once per process (cells of a run share them)."""
    return load_clouds(split, categories, indices, num_points, seed)


def clear_caches() -> None:
    """Forget the remembered split lists and evaluation clouds (after data changed on disk)."""
    from benchsuite.tasks import shapenetpart_data

    shapenetpart_data.clear_caches()
    _eval_clouds.cache_clear()


class PartSegmentationTask(Task):
    """Part segmentation on a ShapeNetPart-layout folder: everything but the folder and the model.

    Subclasses set :attr:`part_table` and :attr:`num_points`, say where the folder is
    (:meth:`folder`), and build the model.
    """

    part_table: ClassVar[Mapping[str, tuple[int, ...]]]
    num_points: ClassVar[int]
    eval_split: ClassVar[str] = "test"
    calibration_split: ClassVar[str] = "train"

    @classmethod
    def num_parts(cls) -> int:
        return 1 + max(p for parts in cls.part_table.values() for p in parts)

    def folder(self) -> Path:
        """The dataset folder (holding ``synsetoffset2category.txt``)."""
        return dataset_folder(self.options.data_root, self.name)

    # ----------------------------------------------------------------------------------------

    def categories(self) -> tuple[Category, ...]:
        return read_categories(self.folder(), self.part_table)

    def split(self, name: str) -> PartSplit:
        return read_split(self.folder(), name, self.categories())

    def part_ids(self) -> list[tuple[int, ...]]:
        """The part table by category index (the order of ``synsetoffset2category.txt``)."""
        return [c.parts for c in self.categories()]

    def validate(self) -> None:
        self.categories()
        for split in (self.eval_split, self.calibration_split):
            if not len(self.split(split)):
                raise DataError(f"{self.name}: the {split} list of {str(self.folder())!r} is empty")

    def calibration_set(self, model: str, size: int, seed: int) -> CalibrationSet:
        self.resolve_model(model)
        split = self.split(self.calibration_split)
        if size < 1 or size > len(split):
            raise DataError(
                f"{self.name} calibration size must be between 1 and {len(split)} (the {split.split} list), got {size}"
            )
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(len(split), generator=generator)[:size].tolist()
        clouds = load_clouds(split, self.categories(), chosen, self.num_points, seed)
        inputs = pack_segmentation_input(clouds.points, clouds.categories, len(self.part_table))
        return CalibrationSet.from_tensor(
            inputs.to(self.options.device),
            clouds.ids,
            source=f"{self.name}:{split.split}",
            seed=seed,
            population_hash=split.ids_sha256,
        )

    def evaluate(self, model: nn.Module, model_name: str, reference: Evaluation | None = None) -> Evaluation:
        self.resolve_model(model_name)
        clouds = self._eval_clouds()
        parts = self.part_ids()
        restricted, labels, categories = evaluate_segmenter(model, self._batches(clouds), parts, self.options.device)
        metrics = segmentation_metrics(
            restricted, labels, categories, parts, reference_part_logits(reference, restricted, categories)
        )
        details = {
            "samples": len(clouds),
            "sample_ids_sha256": sha256_of(clouds.ids),
            "eval_subset": self._subset_rule(),
            "eval_batch_size": self._batch_size(),
            "category_miou": self._category_miou(restricted, labels, categories, parts),
        }
        return Evaluation(metrics, {"part_logits": restricted, "categories": categories}, details)

    def data_manifest(self, model: str) -> dict[str, Any]:
        self.resolve_model(model)
        folder = self.folder()
        evaluation, calibration = self.split(self.eval_split), self.split(self.calibration_split)
        chosen = eval_indices(len(evaluation), self.options.eval_limit)
        return {
            "dataset": self.dataset_name(),
            "layout": "ShapeNetPart (shapenetcore_partanno_segmentation_benchmark_v0_normal)",
            "data_folder": str(folder),
            "categories": [{"name": c.name, "synset": c.synset, "index": c.index, "parts": list(c.parts)}
                           for c in self.categories()],
            "num_parts": self.num_parts(),
            "eval_split": self.eval_split,
            "eval_split_size": len(evaluation),
            "eval_ids_sha256": evaluation.ids_sha256,
            "eval_size": len(chosen),
            "eval_subset": self._subset_rule(),
            "calibration_split": self.calibration_split,
            "calibration_split_size": len(calibration),
            "calibration_ids_sha256": calibration.ids_sha256,
            "calibration": "seeded torch.randperm over the train list (reference order); each shape resampled "
            "with (cell seed, shape id)",
            "preprocess": [
                "read x y z nx ny nz part_label; keep xyz (normals dropped, as Point-MAE without --normal)",
                "normalize xyz over all points: subtract the centroid, divide by the max radius",
                f"resample to {self.num_points} points with replacement: numpy PCG64 seeded with "
                "SeedSequence([seed, first four 32-bit little-endian words of sha256(shape id)])",
                f"evaluation resample seed {EVAL_RESAMPLE_SEED} (fixed, shared by every cell and the float "
                "reference); calibration uses the cell seed",
                "model input: xyz followed by the category one-hot on every point; prediction is the argmax "
                "over the category's parts",
            ],
            "model": self.model_manifest(model),
        }

    # ----------------------------------------------------------------------------------------

    def dataset_name(self) -> str:
        return "ShapeNetPart"

    def model_manifest(self, model: str) -> dict[str, Any]:
        return {"name": model}

    def _eval_clouds(self) -> Clouds:
        split = self.split(self.eval_split)
        indices = tuple(eval_indices(len(split), self.options.eval_limit))
        return _eval_clouds(split, self.categories(), indices, self.num_points, EVAL_RESAMPLE_SEED)

    def _batch_size(self) -> int:
        return max(1, int(self.options.eval_batch_size))

    def _batches(self, clouds: Clouds) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        size, num_categories = self._batch_size(), len(self.part_table)
        for start in range(0, len(clouds), size):
            stop = start + size
            categories = clouds.categories[start:stop]
            inputs = pack_segmentation_input(clouds.points[start:stop], categories, num_categories)
            yield inputs, clouds.labels[start:stop], categories

    def _subset_rule(self) -> str:
        return describe_subset(len(self.split(self.eval_split)), self.options.eval_limit, EVAL_SUBSET_SEED,
                               f"{self.eval_split} shapes", f"the {self.eval_split} list", "list order")

    def _category_miou(self, restricted, labels, categories, parts) -> dict[str, float]:
        ious = shape_ious(predict_parts(restricted, categories, parts), labels, categories, parts)
        names = {c.index: c.name for c in self.categories()}
        return {names[index]: value for index, value in category_mious(ious, categories).items()}


_INFO = TaskInfo(
    modality="point_cloud",
    metrics=("instance_miou", "class_miou", "point_acc", "agreement", "kl_to_float"),
    main_metric="instance_miou",
    higher_is_better=True,
    default_calib_size=32,
    description=(
        "ShapeNetPart part segmentation (16 categories, 50 parts; --data-root shapenetpart=PATH) with "
        "Point-MAE and its official part_seg.pth (--weights shapenetpart=FILE); 2048 points resampled "
        "with a per-shape seed, instance mIoU on the test list, calibration from the train list"
    ),
    demo=False,
)


class ShapeNetPartTask(PartSegmentationTask):
    """ShapeNetPart instance/class mIoU with Point-MAE, plus agreement and KL to the float model."""

    name = "shapenetpart"
    info = _INFO
    part_table = SEG_CLASSES
    num_points = NUM_POINTS

    @classmethod
    def models(cls) -> Mapping[str, ModelSpec]:
        return {
            MODEL_NAME: ModelSpec(
                name=MODEL_NAME,
                source="Point-MAE segmentation (Pang-Yatian/Point-MAE segmentation/models/pt.py), part_seg.pth",
                family="point_mae",
                description="Point-MAE part segmenter: dim 384, depth 12, 6 heads, 128 groups x 32 points, "
                "2048 input points; README instance mIoU 86.1",
            )
        }

    def validate(self) -> None:
        super().validate()
        self._weights_path()

    def build_model(self, model: str) -> nn.Module:
        self.resolve_model(model)
        path = self._weights_path()
        net = PointMAESegmenter(num_parts=self.num_parts(), num_categories=len(self.part_table))
        load_point_mae_checkpoint(net, path)
        return net.eval().to(self.options.device)

    def model_manifest(self, model: str) -> dict[str, Any]:
        manifest: dict[str, Any] = {"name": model, "class": "PointMAESegmenter", "defaults": "reference sizes"}
        if self.options.weights is not None:
            path = Path(self.options.weights).expanduser()
            manifest["weights"] = {"source": "file", "path": str(path)}
            if path.is_file():
                manifest["weights"]["sha256"] = file_sha256(path)
        return manifest

    def _weights_path(self) -> Path:
        if self.options.weights is None:
            raise DataError(
                "shapenetpart model 'point-mae' needs the official Point-MAE checkpoint: pass "
                "--weights shapenetpart=PATH/part_seg.pth (benchsuite downloads nothing)"
            )
        path = Path(self.options.weights).expanduser()
        if not path.is_file():
            raise DataError(f"shapenetpart weights file {str(path)!r} does not exist")
        return path
