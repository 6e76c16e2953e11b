"""COCO detection and instance-segmentation metrics (tasks spec §2.4), on pycocotools alone.

The papers' numbers come from pycocotools' ``COCOeval``; mmdet's ``CocoMetric`` only wraps it and
exposes the AP half of ``stats`` under its own keys. Calling ``COCOeval`` directly keeps the full
12-number ``stats`` vector for ``bbox`` and ``segm``, works without mmdet (so the metric can be
tested and reused apart from the detector stack), and lets this module fix pycocotools' rough
edges in one place:

- ``COCO.loadRes`` crashes on an empty result list; :func:`evaluate_coco` builds the empty result
  set itself, so a model that detects nothing scores what ``COCOeval`` gives for no detections;
- ``loadRes`` turns a result with a ``bbox`` and no ``segmentation`` into a box-shaped polygon, so
  a ``segm`` evaluation of box-only results would silently score boxes as masks; this is an error
  here;
- for ``segm``, a result's ``bbox`` would make ``loadRes`` take the box area as the detection's
  area (used by the small/medium/large ranges); it is dropped so the area is the mask's, as in
  mmdet and detectron2;
- pycocotools prints progress; all of it is swallowed, since benchsuite prints nothing unless asked.

Detections are given per image, in pixels of the original image, with *COCO category ids* (not
contiguous class indices): mapping a detector's class index to the dataset's ids is the task's job.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = [
    "IOU_TYPES",
    "STAT_NAMES",
    "Detection",
    "evaluate_coco",
    "ground_truth_as_results",
    "named_stats",
    "to_coco_results",
]

#: Names of ``COCOeval.stats`` entries, in order: AP over IoU 0.50:0.95 (main), at 0.50, at 0.75,
#: for small / medium / large objects; AR at 1 / 10 / 100 detections, and for small / medium / large.
STAT_NAMES: tuple[str, ...] = (
    "ap",
    "ap50",
    "ap75",
    "ap_small",
    "ap_medium",
    "ap_large",
    "ar1",
    "ar10",
    "ar100",
    "ar_small",
    "ar_medium",
    "ar_large",
)

#: The ``iouType`` values this module evaluates.
IOU_TYPES: tuple[str, ...] = ("bbox", "segm")


@dataclass(frozen=True)
class Detection:
    """One image's predictions, in pixels of the original image.

    ``boxes`` ``(N, 4)`` are ``x1, y1, x2, y2``; ``scores`` ``(N,)``; ``category_ids`` ``(N,)`` are
    COCO category ids; ``masks``, when given, are ``(N, H, W)`` booleans at the original image
    size. Array-likes (lists, CPU tensors) are converted to NumPy arrays on construction.
    """

    boxes: np.ndarray
    scores: np.ndarray
    category_ids: np.ndarray
    masks: np.ndarray | None = None

    def __post_init__(self) -> None:
        boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        category_ids = np.asarray(self.category_ids).reshape(-1)
        n = boxes.shape[0]
        if scores.shape[0] != n or category_ids.shape[0] != n:
            raise ValueError(f"{n} boxes, {scores.shape[0]} scores and {category_ids.shape[0]} category ids")
        if category_ids.size and not np.all(category_ids == np.round(category_ids)):
            raise ValueError("category ids must be integers")
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "category_ids", category_ids.astype(np.int64))
        if self.masks is not None:
            masks = np.asarray(self.masks).astype(bool)
            if masks.ndim != 3 or masks.shape[0] != n:
                raise ValueError(f"masks must be (N={n}, H, W), got shape {masks.shape}")
            object.__setattr__(self, "masks", masks)

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


def to_coco_results(image_id: int, detections: Detection, with_masks: bool) -> list[dict[str, Any]]:
    """COCO result dicts for one image: ``image_id``, ``category_id``, ``bbox`` (xywh), ``score``.

    With ``with_masks``, each dict also gets ``segmentation``: the mask as compressed RLE with
    ``counts`` as ``str``, so the list is JSON-serializable. Every number is a plain Python
    ``int``/``float``.
    """
    if with_masks and detections.masks is None:
        raise ValueError("with_masks=True but the detections carry no masks")
    rles: list[dict[str, Any]] = []
    if with_masks and len(detections):
        assert detections.masks is not None
        stacked = np.asfortranarray(detections.masks.transpose(1, 2, 0).astype(np.uint8))
        rles = [_jsonable_rle(rle) for rle in mask_utils.encode(stacked)]
    results = []
    for i in range(len(detections)):
        x1, y1, x2, y2 = (float(v) for v in detections.boxes[i])
        result: dict[str, Any] = {
            "image_id": int(image_id),
            "category_id": int(detections.category_ids[i]),
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "score": float(detections.scores[i]),
        }
        if with_masks:
            result["segmentation"] = rles[i]
        results.append(result)
    return results


def evaluate_coco(
    coco_gt: COCO,
    results: Sequence[dict[str, Any]],
    iou_types: Sequence[str] = IOU_TYPES,
    image_ids: Iterable[int] | None = None,
) -> dict[str, list[float]]:
    """The 12-number ``COCOeval.stats`` vector (order: :data:`STAT_NAMES`) for each IoU type.

    ``image_ids`` restricts the evaluation to those images (an evaluation subset); results on
    other images are then ignored. Without it every image of ``coco_gt`` is evaluated, so images
    without results count as missed detections. With no results at all, the vector is what
    ``COCOeval`` gives for zero detections: ``0.0`` for each entry whose area range holds
    (non-crowd) ground truth, ``-1.0`` where it holds none; an empty ``image_ids`` gives all ``-1.0``.

    A ``segm`` evaluation needs a ``segmentation`` in every result. Nothing is printed. Note
    that pycocotools edits ``coco_gt``'s annotations in place during a ``segm`` evaluation
    (polygons become RLE, an ``ignore`` flag is added); the scores are unaffected.
    """
    results = list(results)
    unknown = [t for t in iou_types if t not in IOU_TYPES]
    if unknown:
        raise ValueError(f"unsupported iou types {unknown}; choose from {IOU_TYPES}")
    known_images = set(coco_gt.getImgIds())
    stray = {r["image_id"] for r in results} - known_images
    if stray:
        raise ValueError(f"results name images absent from the ground truth: {sorted(stray)[:10]}")
    selected = None if image_ids is None else sorted({int(i) for i in image_ids})
    if selected is not None and not set(selected) <= known_images:
        raise ValueError(f"image ids absent from the ground truth: {sorted(set(selected) - known_images)[:10]}")

    out: dict[str, list[float]] = {}
    for iou_type in iou_types:
        if iou_type == "segm":
            if any("segmentation" not in r for r in results):
                raise ValueError("a segm evaluation needs a 'segmentation' in every result")
            # Without a bbox, loadRes takes the detection's area from the mask (its segm branch).
            typed = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
        else:
            typed = [dict(r) for r in results]  # loadRes adds keys to the dicts it gets
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(typed) if typed else _empty_results(coco_gt)
            evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
            if selected is not None:
                evaluator.params.imgIds = selected
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        out[iou_type] = [float(v) for v in evaluator.stats]
    return out


def ground_truth_as_results(
    coco_gt: COCO, image_ids: Iterable[int], with_masks: bool
) -> list[dict[str, Any]]:
    """The non-crowd annotations of ``image_ids`` as result dicts with score 1.0.

    Fed back to :func:`evaluate_coco` (restricted to the same images) they score AP 1.0 for
    ``bbox`` and, with ``with_masks``, for ``segm``: the end-to-end check of the evaluation path.
    Masks are the annotations' own rasterisation (``COCO.annToRLE``), as compressed RLE with
    ``str`` counts.
    """
    ann_ids = coco_gt.getAnnIds(imgIds=[int(i) for i in image_ids], iscrowd=False)
    results = []
    for ann in coco_gt.loadAnns(ann_ids):
        result: dict[str, Any] = {
            "image_id": int(ann["image_id"]),
            "category_id": int(ann["category_id"]),
            "bbox": [float(v) for v in ann["bbox"]],
            "score": 1.0,
        }
        if with_masks:
            result["segmentation"] = _jsonable_rle(coco_gt.annToRLE(ann))
        results.append(result)
    return results


def named_stats(stats: Sequence[float]) -> dict[str, float]:
    """A ``stats`` vector as ``{name: value}`` with the names of :data:`STAT_NAMES`."""
    if len(stats) != len(STAT_NAMES):
        raise ValueError(f"expected {len(STAT_NAMES)} stats, got {len(stats)}")
    return {name: float(v) for name, v in zip(STAT_NAMES, stats)}


def _jsonable_rle(rle: dict[str, Any]) -> dict[str, Any]:
    """Compressed RLE with ``counts`` as ``str`` and ``size`` as plain ints."""
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(s) for s in rle["size"]], "counts": counts}


def _empty_results(coco_gt: COCO) -> COCO:
    """A result set with no detections (``loadRes([])`` raises IndexError on ``anns[0]``)."""
    empty = COCO()
    empty.dataset = {
        "images": list(coco_gt.dataset.get("images", [])),
        "categories": [dict(c) for c in coco_gt.dataset.get("categories", [])],
        "annotations": [],
    }
    empty.createIndex()
    return empty
