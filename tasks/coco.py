"""COCO detection and instance segmentation with Swin detectors (tasks spec §2).

Data: ``--data-root coco=PATH`` in COCO's standard layout::

    PATH/annotations/instances_train2017.json
    PATH/annotations/instances_val2017.json
    PATH/train2017/*.jpg
    PATH/val2017/*.jpg

Models: the four detectors of :data:`benchsuite.detection.models.DETECTORS` (Mask R-CNN and
Cascade Mask R-CNN, Swin-T and Swin-S, 3x), built in mmdet 3.3 and loaded strictly from
``--weights coco=FILE`` (the Swin fork's official checkpoint, converted by
:func:`benchsuite.detection.checkpoint.load_detection_checkpoint`). benchsuite never downloads
them. ``--task-option coco.random_weights=true`` builds a randomly initialised detector instead
(seed 0), for pipeline smoke runs; its results are labelled and its float baseline is its own.

Preprocessing: mmdet's COCO test pipeline from :func:`~benchsuite.detection.models.detector_config`
(``LoadImageFromFile``, ``Resize`` to (1333, 800) keeping the aspect ratio, ``PackDetInputs``;
its ``LoadAnnotations`` step is dropped, ground truth is read by pycocotools) run through
mmengine's ``Compose``, then the detector's own ``DetDataPreprocessor`` (ImageNet mean/std,
BGR -> RGB, zero padding to a multiple of 32).

The model the methods see is a :class:`DetectorRunner`: it holds the mmdet detector as
``detector`` and exposes its ``backbone`` so the ``mmdet_swin`` adapter accepts it. Called with a
bare image tensor (a calibration batch: preprocessed images zero-padded to one canvas) it runs the
whole detector (backbone, neck, RPN, RoI box and mask heads) with metainfo describing that canvas;
called with ``(inputs, data_samples)`` it returns ``detector.predict(..., rescale=True)``.

Options (:class:`CocoConfig`, ``--task-option coco.FIELD=VALUE``; part of the cell key and the
leaderboard label): ``calib_source``, ``quantize_scope`` (``whole`` or ``backbone``) and
``random_weights``.

Calibration (spec §2.3): ``calib_source="train2017"`` (default) draws ``size`` train images with a
seeded ``torch.randperm`` over the train image list (sorted by id); ``calib_source="val_first_k"``
takes the first ``size`` val images in annotation-file order (``size=1`` is the RepQ-ViT
protocol). Source, seed and image ids go into the manifest.

Metrics (spec §2.4): pycocotools ``COCOeval`` for ``bbox`` and ``segm``, in percent (-1 where an
area range holds no ground truth): ``box_ap`` (main) and ``mask_ap``, and each of the 12 stats as
``box_<name>`` / ``mask_<name>`` (names from :data:`benchsuite.metrics.coco.STAT_NAMES`); the raw
vectors are in ``details``. ``eval_limit`` takes a fixed-seed random subset of the val images.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from benchsuite.api import CalibrationSet, Evaluation, ModelSpec, Task, TaskInfo, sha256_of
from benchsuite.config import TaskConfig
from benchsuite.eval_subset import describe_subset, subset_indices
from benchsuite.errors import DataError

__all__ = [
    "CALIB_SOURCES",
    "CocoConfig",
    "CocoSplit",
    "CocoTask",
    "DetectorRunner",
    "EVAL_SUBSET_SEED",
    "METRICS",
    "coco_metrics",
]

#: Seed of the permutation that picks the ``eval_limit`` subset of val2017.
EVAL_SUBSET_SEED = 0
CALIB_SOURCES = ("train2017", "val_first_k")
SPLITS = ("train2017", "val2017")

LAYOUT_HELP = (
    "expected COCO's standard layout under --data-root coco=PATH: PATH/annotations/instances_train2017.json, "
    "PATH/annotations/instances_val2017.json, PATH/train2017/ and PATH/val2017/ (the image folders)"
)

_STAT_NAMES = (
    "ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large",
    "ar1", "ar10", "ar100", "ar_small", "ar_medium", "ar_large",
)  # = benchsuite.metrics.coco.STAT_NAMES (not imported here: it needs pycocotools)

#: Metric names, main first.
METRICS: tuple[str, ...] = ("box_ap", "mask_ap") + tuple(
    f"{kind}_{name}" for kind in ("box", "mask") for name in _STAT_NAMES if name != "ap"
)

_INFO = TaskInfo(
    modality="detection",
    metrics=METRICS,
    main_metric="box_ap",
    higher_is_better=True,
    default_calib_size=32,
    description="COCO val2017 detection and instance segmentation (box / mask AP, %) with Mask R-CNN and "
    "Cascade Mask R-CNN on Swin-T/S; needs the coco extra, --data-root coco=PATH and --weights coco=FILE",
    not_in_demo="it needs COCO images and an official checkpoint, which benchsuite never downloads, and a "
    "stand-in detector trained on the spot would not fit the demo's 5 minutes: even a shrunk Mask R-CNN "
    "takes 15-30 s per reconstruction method with 2 steps per unit on a 2-core CPU, before any training",
)


def _weights_help(model: str) -> str:
    from benchsuite.detection.models import detector_spec

    spec = detector_spec(model)
    return (
        f"coco's {spec.name} needs the official checkpoint {spec.checkpoint} of {spec.source_repo} "
        f"(trained with {spec.official_config}), which benchsuite does not download: get it from "
        f"{spec.checkpoint_url} and pass --weights coco=PATH/{spec.checkpoint}"
    )


@dataclass(frozen=True)
class CocoConfig(TaskConfig):
    """What changes a COCO cell's numbers besides the method (``--task-option coco.FIELD=VALUE``)."""

    FLOAT_FIELDS: ClassVar[frozenset[str]] = frozenset({"random_weights"})

    #: ``train2017``: seeded draw (default); ``val_first_k``: the first k val images (RepQ-ViT's code).
    calib_source: Literal["train2017", "val_first_k"] = "train2017"
    #: ``whole``: backbone, neck and heads (RepQ-ViT's code); ``backbone``: neck and heads stay float.
    quantize_scope: Literal["whole", "backbone"] = "whole"
    #: A randomly initialised detector (seed 0) instead of ``--weights``: pipeline smoke runs only,
    #: its AP is meaningless.
    random_weights: bool = False


@dataclass
class CocoSplit:
    """One split's annotation file and image folder, with its image list."""

    name: str
    annotation_file: Path
    image_dir: Path
    #: ``[(image_id, file_name, height, width)]`` in annotation-file order.
    images: list[tuple[int, str, int, int]]
    annotation_sha256: str | None = None

    @property
    def ids(self) -> list[int]:
        return [image[0] for image in self.images]


class DetectorRunner(nn.Module):
    """The module the methods quantize: an mmdet detector behind a tensor-in forward.

    ``backbone`` is the detector's (a property, so the module tree has it once, under
    ``detector.backbone``); the ``mmdet_swin`` adapter then rewrites the backbone, neck and heads
    of ``detector`` in place.
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    @property
    def backbone(self) -> nn.Module:
        return self.detector.backbone

    @property
    def data_preprocessor(self) -> nn.Module:
        return self.detector.data_preprocessor

    def forward(self, inputs: torch.Tensor, data_samples: list | None = None) -> Any:
        if data_samples is not None:
            return self.detector.predict(inputs, data_samples, rescale=True)
        return self.detector.predict(inputs, canvas_samples(inputs), rescale=False)


def canvas_samples(inputs: torch.Tensor) -> list:
    """One ``DetDataSample`` per image of a zero-padded batch, as mmdet describes a padded batch.

    Each image's ``img_shape`` is its own extent on the canvas, so the RPN clips proposals to the
    image and not to the padding, as in mmdet's own batches. The extent is read off the tensor:
    after the preprocessor's mean subtraction no real pixel is exactly 0 in all three channels
    (the means 123.675, 116.28, 103.53 are not integers), so the trailing all-zero rows and
    columns are the padding. An image that is zero everywhere keeps the whole canvas.
    """
    from mmdet.structures import DetDataSample

    height, width = (int(s) for s in inputs.shape[-2:])
    samples = []
    for image in inputs:
        image_height, image_width = content_extent(image)
        sample = DetDataSample()
        sample.set_metainfo(dict(img_shape=(image_height, image_width), ori_shape=(image_height, image_width),
                                 scale_factor=(1.0, 1.0), pad_shape=(height, width),
                                 batch_input_shape=(height, width)))
        samples.append(sample)
    return samples


def content_extent(image: torch.Tensor) -> tuple[int, int]:
    """Height and width of ``image`` (C, H, W) up to its last row and column that are not all zero."""
    nonzero = image.detach().ne(0).any(dim=0)
    rows = torch.nonzero(nonzero.any(dim=1)).flatten()
    cols = torch.nonzero(nonzero.any(dim=0)).flatten()
    if rows.numel() == 0:
        return int(image.shape[-2]), int(image.shape[-1])
    return int(rows[-1]) + 1, int(cols[-1]) + 1


class CocoTask(Task):
    """COCO val2017 box and mask AP of the Swin detectors."""

    name = "coco"
    info = _INFO
    #: Class index i of the detectors is the i-th of mmdet's COCO class names.
    NUM_CLASSES: ClassVar[int] = 80

    config_class = CocoConfig

    def __init__(self, options=None, config: CocoConfig | None = None) -> None:
        super().__init__(options, config)
        if self.config.calib_source not in CALIB_SOURCES:
            raise DataError(f"coco calib_source must be one of {', '.join(CALIB_SOURCES)}, "
                            f"got {self.config.calib_source!r}")
        self.calib_source = self.config.calib_source
        self.random_weights = self.config.random_weights
        self._splits: dict[str, CocoSplit] = {}
        self._pipelines: dict[str, Any] = {}

    @classmethod
    def models(cls) -> Mapping[str, ModelSpec]:
        from benchsuite.detection.models import DETECTORS

        return {
            name: ModelSpec(name=name, source=f"{spec.source_repo} {spec.checkpoint}", family="mmdet_swin",
                            description=spec.description)
            for name, spec in DETECTORS.items()
        }

    @classmethod
    def unavailable_reason(cls) -> str | None:
        missing = [name for name in ("mmdet", "mmengine", "mmcv", "pycocotools", "ijson") if importlib.util.find_spec(name) is None]
        if missing:
            return (f"needs {', '.join(missing)} (scripts/build_mmcv.sh, then pip install 'benchsuite[coco]')")
        if importlib.util.find_spec("mmcv._ext") is None:
            return "coco needs mmcv with its compiled ops (mmcv._ext; mmcv-lite cannot run Mask R-CNN)"
        return None

    # -- hooks a test or demo twin may override ------------------------------------------------

    def build_detector(self, model: str) -> nn.Module:
        """The mmdet detector ``model`` with random weights, in eval mode."""
        from benchsuite.detection.models import build_detector

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return build_detector(model)

    def test_pipeline(self, model: str) -> list[dict[str, Any]]:
        """mmdet's test pipeline of ``model`` without its ``LoadAnnotations`` step."""
        from benchsuite.detection.models import detector_config

        steps = copy.deepcopy(detector_config(model).test_pipeline)
        return [dict(step) for step in steps if step["type"] != "LoadAnnotations"]

    def class_names(self) -> tuple[str, ...]:
        """The detectors' class names, by class index."""
        from mmdet.datasets import CocoDataset

        return tuple(CocoDataset.METAINFO["classes"])

    # -- the Task interface ----------------------------------------------------------------------

    def validate(self) -> None:
        for split in SPLITS:
            self._split(split)
        self._category_ids(self._split("val2017"))
        if not self.random_weights:
            self._weights_path(next(iter(self.models())))

    def build_model(self, model: str) -> nn.Module:
        name = self.resolve_model(model).name
        detector = self.build_detector(name)
        if not self.random_weights:
            from benchsuite.detection.checkpoint import load_detection_checkpoint
            from benchsuite.weights import load_into

            path = self._weights_path(name)
            load_into(detector, load_detection_checkpoint(path), path, name, label=self.name)
        detector.eval()  # mmdet's SwinTransformer.train() returns None: no chaining
        runner = DetectorRunner(detector).to(self.options.device)
        runner.eval()
        return runner

    def calibration_set(self, model: str, size: int, seed: int) -> CalibrationSet:
        name = self.resolve_model(model).name
        split = self._split("train2017" if self.calib_source == "train2017" else "val2017")
        if size < 1 or size > len(split.images):
            raise DataError(f"{self.name} calibration size must be between 1 and {len(split.images)} "
                            f"({split.name}), got {size}")
        if self.calib_source == "train2017":
            order = sorted(range(len(split.images)), key=lambda i: split.images[i][0])
            generator = torch.Generator().manual_seed(seed)
            chosen = [order[i] for i in torch.randperm(len(order), generator=generator)[:size].tolist()]
            population = [str(split.images[i][0]) for i in order]
        else:
            chosen = list(range(size))
            population = [str(i) for i in split.ids]
        preprocessor = self._data_preprocessor(name)
        images = [self._preprocess(name, split, i, preprocessor)[0][0] for i in chosen]
        batch = pad_to_canvas(images)
        return CalibrationSet(
            batches=[batch],
            sample_ids=tuple(str(split.images[i][0]) for i in chosen),
            source=f"{self.name}:{self.calib_source}",
            seed=seed,
            population_hash=sha256_of(population),
        )

    def evaluate(self, model: nn.Module, model_name: str, reference: Evaluation | None = None) -> Evaluation:
        from benchsuite.metrics.coco import Detection, evaluate_coco, to_coco_results

        name = self.resolve_model(model_name).name
        split = self._split("val2017")
        category_ids = self._category_ids(split)
        runner = _find_runner(model)
        chosen = subset_indices(len(split.images), self.options.eval_limit, EVAL_SUBSET_SEED)
        results: list[dict[str, Any]] = []
        with torch.no_grad():
            for index in chosen:
                inputs, samples = self._preprocess(name, split, index, runner.data_preprocessor)
                prediction = model(inputs, samples)[0].pred_instances
                labels = prediction.labels.cpu().numpy()
                if len(labels) and labels.max() >= len(category_ids):
                    raise DataError(f"model {model_name!r} predicts class {int(labels.max())}; {self.name} has "
                                    f"{len(category_ids)} categories")
                masks = prediction.masks.cpu().numpy() if "masks" in prediction else None
                detection = Detection(prediction.bboxes.cpu().numpy(), prediction.scores.cpu().numpy(),
                                      [category_ids[int(c)] for c in labels], masks)
                if detection.masks is None:
                    raise DataError(f"model {model_name!r} returned no masks; {self.name} scores box and mask AP")
                results += to_coco_results(split.images[index][0], detection, with_masks=True)
        image_ids = [split.images[i][0] for i in chosen]
        stats = evaluate_coco(self._coco(split), results, ("bbox", "segm"), image_ids=image_ids)
        metrics = coco_metrics(stats)
        details = {
            "samples": len(chosen),
            "detections": len(results),
            "sample_ids_sha256": sha256_of([str(i) for i in image_ids]),
            "eval_subset": _subset_rule(len(split.images), self.options.eval_limit),
            "stats": {"bbox": stats["bbox"], "segm": stats["segm"]},
            "stat_names": list(_STAT_NAMES),
        }
        return Evaluation(metrics=metrics, outputs=None, details=details)

    def adapt(self, model: nn.Module):
        """The ``mmdet_swin`` adapter; ``quantize_scope=backbone`` leaves the neck and heads float."""
        from benchsuite.quant.adapters.mmdet_swin import adapt_mmdet_swin

        return adapt_mmdet_swin(model, backbone_only=self.config.quantize_scope == "backbone")

    def data_manifest(self, model: str) -> dict[str, Any]:
        name = self.resolve_model(model).name
        val = self._split("val2017")
        chosen = subset_indices(len(val.images), self.options.eval_limit, EVAL_SUBSET_SEED)
        manifest: dict[str, Any] = {
            "dataset": "COCO 2017",
            "data_root": str(Path(self.options.data_root).expanduser().resolve()) if self.options.data_root else None,
            "val_annotations_sha256": val.annotation_sha256,
            "val_size": len(val.images),
            "eval_split": "val2017",
            "eval_size": len(chosen),
            "eval_subset": _subset_rule(len(val.images), self.options.eval_limit),
            "eval_ids_sha256": sha256_of([str(val.images[i][0]) for i in chosen]),
            "calib_source": self.calib_source,
            "quantize_scope": self.config.quantize_scope,
            "calibration": "seeded torch.randperm over train2017 sorted by image id" if self.calib_source == "train2017"
            else "the first k val2017 images in annotation-file order (RepQ-ViT protocol for k = 1)",
            "preprocess": self.test_pipeline(name) + ["detector.data_preprocessor (mean/std, bgr_to_rgb, pad 32)"],
            "model": {"name": name},
            "weights": self._weights_manifest(name),
        }
        return manifest

    # ----------------------------------------------------------------------------------------

    def _root(self) -> Path:
        if self.options.data_root is None:
            raise DataError(f"{self.name} needs --data-root {self.name}=PATH; {LAYOUT_HELP}")
        root = Path(self.options.data_root).expanduser()
        if not root.is_dir():
            raise DataError(f"{self.name} data root {str(root)!r} is not a folder; {LAYOUT_HELP}")
        return root

    def _split(self, name: str) -> CocoSplit:
        if name in self._splits:
            return self._splits[name]
        root = self._root()
        annotation_file = root / "annotations" / f"instances_{name}.json"
        image_dir = root / name
        if not annotation_file.is_file():
            raise DataError(f"{self.name}: {str(annotation_file)!r} is missing; {LAYOUT_HELP}")
        if not image_dir.is_dir():
            raise DataError(f"{self.name}: image folder {str(image_dir)!r} is missing; {LAYOUT_HELP}")
        from benchsuite.detection.annotation_index import image_records

        images = [tuple(record) for record in image_records(annotation_file)]
        if not images:
            raise DataError(f"{self.name}: {str(annotation_file)!r} lists no images")
        split = CocoSplit(name, annotation_file, image_dir, images, None)
        if name == "val2017":
            from benchsuite.weights import file_sha256

            split.annotation_sha256 = file_sha256(annotation_file)
        self._splits[name] = split
        return split

    def _coco(self, split: CocoSplit):
        import contextlib
        import io

        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(split.annotation_file))

    def _category_ids(self, split: CocoSplit) -> list[int]:
        """COCO category id of each detector class index, matched by class name."""
        from benchsuite.detection.annotation_index import categories

        by_name = categories(split.annotation_file)
        names = self.class_names()
        missing = [n for n in names if n not in by_name]
        if missing:
            raise DataError(f"{self.name}: {str(split.annotation_file)!r} lacks the COCO categories "
                            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}; the detectors predict COCO's 80 classes")
        return [by_name[n] for n in names]

    def _weights_path(self, model: str) -> Path:
        if self.options.weights is None:
            raise DataError(_weights_help(model))
        path = Path(self.options.weights).expanduser()
        if not path.is_file():
            raise DataError(f"{self.name} weights file {str(path)!r} does not exist; {_weights_help(model)}")
        return path

    def _weights_manifest(self, model: str) -> dict[str, Any]:
        if self.random_weights:
            return {"source": "random", "seed": 0}
        if self.options.weights is None:
            from benchsuite.detection.models import detector_spec

            spec = detector_spec(model)
            return {"source": "missing", "expected": spec.checkpoint, "url": spec.checkpoint_url}
        from benchsuite.weights import file_sha256

        path = Path(self.options.weights).expanduser()
        weights: dict[str, Any] = {"source": "file", "path": str(path)}
        if path.is_file():
            weights["sha256"] = file_sha256(path)
        return weights

    def _pipeline(self, model: str):
        if model not in self._pipelines:
            from mmengine.dataset import Compose

            from benchsuite.detection.models import register_mmdet_modules

            register_mmdet_modules()
            self._pipelines[model] = Compose(self.test_pipeline(model))
        return self._pipelines[model]

    def _data_preprocessor(self, model: str) -> nn.Module:
        """A standalone copy of the detector's ``DetDataPreprocessor`` (for calibration)."""
        from benchsuite.detection.models import register_mmdet_modules, detector_config

        register_mmdet_modules()
        from mmdet.registry import MODELS

        return MODELS.build(copy.deepcopy(detector_config(model).model.data_preprocessor)).to(self.options.device)

    def _preprocess(self, model: str, split: CocoSplit, index: int, preprocessor: nn.Module) -> tuple[torch.Tensor, list]:
        """One image through the test pipeline and ``preprocessor``: ``(1, 3, H, W)`` and its samples."""
        image_id, file_name, _, _ = split.images[index]
        path = split.image_dir / file_name
        if not path.is_file():
            raise DataError(f"{self.name}: image {str(path)!r} (id {image_id}) listed in "
                            f"{split.annotation_file.name} is missing")
        try:
            packed = self._pipeline(model)(dict(img_path=str(path), img_id=image_id))
        except Exception as exc:  # noqa: BLE001 - mmcv raises many kinds for unreadable images
            raise DataError(f"{self.name}: cannot read or preprocess image {str(path)!r}: {exc}") from None
        if packed is None:
            raise DataError(f"{self.name}: the test pipeline dropped image {str(path)!r}")
        with torch.no_grad():
            data = preprocessor({"inputs": [packed["inputs"]], "data_samples": [packed["data_samples"]]}, False)
        return data["inputs"].to(self.options.device), data["data_samples"]


def pad_to_canvas(images: list[torch.Tensor]) -> torch.Tensor:
    """``(3, H, W)`` images zero-padded (bottom/right) to one ``(N, 3, Hmax, Wmax)`` canvas.

    Zero is the data preprocessor's pad value, applied after normalisation, as mmdet pads batches.
    """
    height = max(int(im.shape[-2]) for im in images)
    width = max(int(im.shape[-1]) for im in images)
    out = images[0].new_zeros((len(images), images[0].shape[0], height, width))
    for i, im in enumerate(images):
        out[i, :, : im.shape[-2], : im.shape[-1]] = im
    return out


def coco_metrics(stats: Mapping[str, list[float]]) -> dict[str, float]:
    """``COCOeval.stats`` for ``bbox`` and ``segm`` as percent metrics (-1 stays -1)."""
    metrics: dict[str, float] = {}
    for kind, iou_type in (("box", "bbox"), ("mask", "segm")):
        for stat_name, value in zip(_STAT_NAMES, stats[iou_type]):
            metrics[f"{kind}_{stat_name}"] = float(value) * 100.0 if value >= 0 else -1.0
    return {name: metrics[name] for name in METRICS}


def _find_runner(model: nn.Module) -> DetectorRunner:
    for module in model.modules():
        if isinstance(module, DetectorRunner):
            return module
    raise DataError(f"coco evaluates the DetectorRunner its build_model returns; got {type(model).__name__}")


def _subset_rule(total: int, limit: int | None) -> str:
    return describe_subset(total, limit, EVAL_SUBSET_SEED, "val2017 images", "the val2017 image list",
                           "annotation-file order")
