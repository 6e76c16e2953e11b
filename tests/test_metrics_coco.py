"""COCO metrics on a hand-made three-image ground truth, against values worked out by hand."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest

pytestmark = pytest.mark.coco
pytest.importorskip("pycocotools")

from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402

from benchsuite.metrics.coco import (  # noqa: E402
    STAT_NAMES,
    Detection,
    evaluate_coco,
    ground_truth_as_results,
    named_stats,
    to_coco_results,
)

CAT, DOG = 1, 3  # non-contiguous COCO category ids

# COCOeval's grids: IoU thresholds 0.50:0.05:0.95 and 101 recall points 0.00:0.01:1.00.
IOU_THRESHOLDS = [0.5 + 0.05 * i for i in range(10)]


def _rect(x: float, y: float, w: float, h: float) -> list[float]:
    return [x, y, x + w, y, x + w, y + h, x, y + h]


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """Column-major run lengths, starting with a run of zeros (COCO's crowd format)."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return {"counts": counts, "size": list(mask.shape)}


def _ann(ann_id, image_id, category_id, bbox, segmentation, area, iscrowd=0):
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": bbox,
        "segmentation": segmentation,
        "area": area,
        "iscrowd": iscrowd,
    }


def _dataset() -> dict:
    crowd = np.zeros((60, 80), dtype=bool)
    crowd[30:50, 40:70] = True
    return {
        "images": [
            {"id": 1, "height": 100, "width": 100, "file_name": "1.jpg"},
            {"id": 2, "height": 60, "width": 80, "file_name": "2.jpg"},
            {"id": 3, "height": 60, "width": 60, "file_name": "3.jpg"},
        ],
        "categories": [{"id": CAT, "name": "cat"}, {"id": DOG, "name": "dog"}],
        "annotations": [
            # A: cat, medium (1600 px²)
            _ann(1, 1, CAT, [10, 10, 40, 40], [_rect(10, 10, 40, 40)], 1600.0),
            # B: dog, a triangle inside [50, 50, 30, 20], small
            _ann(2, 1, DOG, [50, 50, 30, 20], [[50, 50, 80, 50, 50, 70]], 300.0),
            # C: cat, small
            _ann(3, 2, CAT, [5, 5, 20, 20], [_rect(5, 5, 20, 20)], 400.0),
            # D: a crowd of dogs, never a result, ignored by COCOeval
            _ann(4, 2, DOG, [40, 30, 30, 20], _uncompressed_rle(crowd), float(crowd.sum()), iscrowd=1),
            # F: cat, small;  E: dog, medium
            _ann(5, 3, CAT, [2, 2, 20, 20], [_rect(2, 2, 20, 20)], 400.0),
            _ann(6, 3, DOG, [10, 25, 45, 30], [_rect(10, 25, 45, 30)], 1350.0),
        ],
    }


@pytest.fixture
def coco_gt() -> COCO:
    gt = COCO()
    gt.dataset = _dataset()
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def test_stat_names():
    assert len(STAT_NAMES) == 12 and len(set(STAT_NAMES)) == 12
    assert STAT_NAMES[0] == "ap" and STAT_NAMES[8] == "ar100"
    assert named_stats(list(range(12)))["ap_large"] == 5.0


def test_ground_truth_fed_back_scores_ap_one(coco_gt, capsys):
    results = ground_truth_as_results(coco_gt, [1, 2, 3], with_masks=True)
    assert len(results) == 5  # the crowd region is left out
    stats = evaluate_coco(coco_gt, results)
    for iou_type in ("bbox", "segm"):
        s = stats[iou_type]
        assert len(s) == 12
        assert s[0] == pytest.approx(1.0, abs=1e-9)
        assert s[1] == pytest.approx(1.0, abs=1e-9) and s[2] == pytest.approx(1.0, abs=1e-9)
        assert s[5] == -1.0 and s[11] == -1.0  # no large object in the ground truth
        assert s[8] == pytest.approx(1.0, abs=1e-9)
    assert capsys.readouterr().out == ""  # pycocotools' prints are swallowed
    # pycocotools edits the ground truth during a segm evaluation; a second run agrees.
    assert evaluate_coco(coco_gt, results) == stats


def test_detections_path_scores_ap_one(coco_gt):
    """GT boxes (as xyxy) and GT masks through Detection / to_coco_results give AP 1.0."""
    results = []
    for image_id in (1, 2, 3):
        anns = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[image_id], iscrowd=False))
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
        masks = np.stack([coco_gt.annToMask(a).astype(bool) for a in anns])
        det = Detection(boxes, [1.0] * len(anns), [a["category_id"] for a in anns], masks)
        results += to_coco_results(image_id, det, with_masks=True)
    stats = evaluate_coco(coco_gt, results)
    assert stats["bbox"][0] == pytest.approx(1.0, abs=1e-9)
    assert stats["segm"][0] == pytest.approx(1.0, abs=1e-9)


def test_shifted_box_by_hand(coco_gt):
    # Box A [10, 10, 40, 40] moved 8 px right: overlap 32*40 = 1280, union 2*1600 - 1280 = 1920,
    # IoU 2/3: a match at thresholds 0.50..0.65 (4 of 10), a false positive at 0.70..0.95.
    x, y, w, h = 10.0, 10.0, 40.0, 40.0
    shifted = [x + 8, y, w, h]
    inter = (x + w - shifted[0]) * h
    iou = inter / (w * h + w * h - inter)
    assert iou == pytest.approx(2 / 3)
    matched = sum(t <= iou for t in IOU_THRESHOLDS)
    assert matched == 4
    results = ground_truth_as_results(coco_gt, [1, 2, 3], with_masks=False)
    (a,) = [r for r in results if r["image_id"] == 1 and r["category_id"] == CAT]
    a["bbox"], a["score"] = shifted, 0.5
    # Where A' misses, the cat detections by score are C, F (hits), A' (miss): recall 1/3, 2/3,
    # precision 1 up to recall 2/3, so AP = 67/101 (recall points 0.00..0.66) at those thresholds.
    cat_miss = 67 / 101
    cat_ap = (matched * 1.0 + (10 - matched) * cat_miss) / 10
    s = evaluate_coco(coco_gt, results, iou_types=("bbox",))["bbox"]
    assert s[0] == pytest.approx((cat_ap + 1.0) / 2, abs=1e-9)  # dog AP stays 1
    assert s[1] == pytest.approx(1.0, abs=1e-9)  # IoU 2/3 > 0.5
    assert s[2] == pytest.approx((cat_miss + 1.0) / 2, abs=1e-9)  # IoU 2/3 < 0.75
    assert s[0] < 1.0


def test_wrong_category(coco_gt):
    # Image 3 only: F right (score 1), E (a dog) labelled cat (score 0.5). Cat: a hit then a
    # false positive, AP 1; dog: ground truth and no detection, AP 0. Mean 0.5.
    results = ground_truth_as_results(coco_gt, [3], with_masks=False)
    for r in results:
        if r["category_id"] == DOG:
            r["category_id"], r["score"] = CAT, 0.5
    s = evaluate_coco(coco_gt, results, iou_types=("bbox",), image_ids=[3])["bbox"]
    assert s[0] == pytest.approx(0.5, abs=1e-9)
    assert s[1] == pytest.approx(0.5, abs=1e-9)


def test_image_id_restriction(coco_gt):
    results = ground_truth_as_results(coco_gt, [1], with_masks=True)
    # A false positive on image 2 is ignored when only image 1 is evaluated.
    noise = to_coco_results(2, Detection([[0, 0, 3, 3]], [1.0], [CAT], np.ones((1, 60, 80), bool)), True)
    subset = evaluate_coco(coco_gt, results + noise, image_ids=[1])
    assert subset["bbox"][0] == pytest.approx(1.0, abs=1e-9)
    assert subset["segm"][0] == pytest.approx(1.0, abs=1e-9)
    everything = evaluate_coco(coco_gt, results + noise, iou_types=("bbox",))
    assert everything["bbox"][0] < 1.0


def test_empty_results(coco_gt):
    # 0 where the area range has ground truth (all, small, medium), -1 where none (large).
    expected = [0.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0]
    stats = evaluate_coco(coco_gt, [])
    assert stats == {"bbox": expected, "segm": expected}
    assert evaluate_coco(coco_gt, [], image_ids=[])["bbox"] == [-1.0] * 12


def test_errors(coco_gt):
    boxes_only = ground_truth_as_results(coco_gt, [1], with_masks=False)
    with pytest.raises(ValueError, match="segmentation"):
        evaluate_coco(coco_gt, boxes_only, iou_types=("segm",))
    with pytest.raises(ValueError, match="absent"):
        evaluate_coco(coco_gt, [dict(boxes_only[0], image_id=99)], iou_types=("bbox",))
    with pytest.raises(ValueError, match="unsupported"):
        evaluate_coco(coco_gt, boxes_only, iou_types=("keypoints",))
    with pytest.raises(ValueError):
        Detection([[0, 0, 1, 1]], [1.0, 0.5], [1])
    with pytest.raises(ValueError, match="no masks"):
        to_coco_results(1, Detection([[0, 0, 1, 1]], [1.0], [1]), with_masks=True)


def test_to_coco_results_conversion_and_json():
    rng = np.random.default_rng(0)
    masks = rng.random((2, 7, 9)) > 0.5
    det = Detection(
        boxes=np.array([[1.5, 2.25, 11.5, 7.75], [0.0, 0.0, 9.0, 7.0]], dtype=np.float32),
        scores=np.array([0.9, 0.25], dtype=np.float32),
        category_ids=np.array([3, 1]),
        masks=masks,
    )
    results = to_coco_results(42, det, with_masks=True)
    assert [r["bbox"] for r in results] == [[1.5, 2.25, 10.0, 5.5], [0.0, 0.0, 9.0, 7.0]]
    assert [r["category_id"] for r in results] == [3, 1]
    assert [r["image_id"] for r in results] == [42, 42]
    assert results[0]["score"] == pytest.approx(0.9)
    for r, m in zip(results, masks):
        assert isinstance(r["segmentation"]["counts"], str)
        assert r["segmentation"]["size"] == [7, 9]
        np.testing.assert_array_equal(mask_utils.decode(copy.deepcopy(r["segmentation"])).astype(bool), m)
    assert json.loads(json.dumps(results)) == results
    assert all("segmentation" not in r for r in to_coco_results(42, det, with_masks=False))
    assert to_coco_results(1, Detection(np.zeros((0, 4)), [], [], np.zeros((0, 5, 5), bool)), True) == []


@pytest.mark.real_assets
def test_real_val2017_ground_truth_fed_back_scores_ap_one():
    """The real-data check of the COCO issue: the 158 real val2017 images' official annotations."""
    from conftest import ASSETS

    annotations = ASSETS / "coco" / "annotations" / "instances_val2017.json"
    if not annotations.is_file():
        pytest.skip(f"{annotations} is absent")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(annotations))
    image_ids = sorted(coco_gt.getImgIds())
    assert len(image_ids) == 158
    results = ground_truth_as_results(coco_gt, image_ids, with_masks=True)
    stats = evaluate_coco(coco_gt, results, image_ids=image_ids)
    for iou_type in ("bbox", "segm"):
        assert stats[iou_type][0] == pytest.approx(1.0, abs=1e-9), iou_type
        assert stats[iou_type][1] == pytest.approx(1.0, abs=1e-9), iou_type
