"""ImageNet-1k classification: the PTQ papers' ViT, DeiT and Swin models on real ImageNet folders.

Data: a user-given root in the standard ImageFolder layout, ``train/<wnid>/*`` and
``val/<wnid>/*`` (jpg/jpeg/png, any case). Labels are the index of the wnid in the canonical
sorted list of the 1000 ImageNet-1k synsets that timm ships (``imagenet_synsets.txt``), never
the position among the folders present, so a subset of classes keeps the right labels.

Models: the papers' names (``deit-s``, ``swin-t`` ...) map to timm names with explicit pretrained
tags (protocol §1.1); any other timm model name is accepted as is. Preprocessing follows the PTQ
reference code per family (§1.2); other timm names get crop_pct 0.875, bicubic, and the mean/std
of their timm pretrained config. Weights come from ``--weights imagenet=FILE`` (safetensors or a
weights-only torch checkpoint, loaded strictly) or from timm's hub weights, which are used only
when already in the local cache unless ``BENCHSUITE_ALLOW_DOWNLOAD=1`` allows a download.

Calibration draws ``size`` train images with a seeded permutation of the sorted train file list.
Evaluation runs the val split (``eval_limit`` takes a fixed-seed random subset, so classes are
spread). Decoding is PIL + torchvision in a DataLoader with up to ``BENCHSUITE_DATA_WORKERS``
(default 2) workers. Decoded evaluation images are kept in memory within a process, as uint8
after the crop (3x224x224 bytes = 147 KiB each: the 1,300-image asset set takes 196 MB, versus
780 MB as float32) and normalized per batch, so several cells of one run decode the val set once
per preprocessing; the cache holds at most ``BENCHSUITE_IMAGENET_CACHE_MB`` (default 2048, about
14,000 images) and larger evaluations (the full 50,000-image val set) stream instead.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchsuite.api import CalibrationSet, Evaluation, ModelSpec, Task, TaskInfo, sha256_of
from benchsuite.errors import DataError, UnknownNameError
from benchsuite.eval_subset import describe_subset, subset_indices
from benchsuite.metrics.classification import classification_metrics, evaluate_classifier, reference_logits
from benchsuite.weights import file_sha256, load_into, load_weights_file

__all__ = [
    "ALLOW_DOWNLOAD_ENV",
    "CACHE_MB_ENV",
    "EVAL_SUBSET_SEED",
    "GENERIC_CROP_PCT",
    "IMAGE_EXTENSIONS",
    "IMAGE_SIZE",
    "LAYOUT",
    "NUM_CLASSES",
    "PAPER_MODELS",
    "WORKERS_ENV",
    "ImageFolderSplit",
    "ImageNetTask",
    "PaperModel",
    "Preprocess",
    "canonical_synsets",
    "clear_caches",
    "eval_indices",
    "hf_hub_cache_dir",
    "hub_weights_file",
    "preprocess_for",
    "scan_split",
    "timm_name",
]

log = logging.getLogger(__name__)

IMAGE_SIZE = 224
NUM_CLASSES = 1000
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # compared case-insensitively (.JPEG included)
#: Seed of the permutation that picks the ``eval_limit`` subset of the val split.
EVAL_SUBSET_SEED = 0
GENERIC_CROP_PCT = 0.875
ALLOW_DOWNLOAD_ENV = "BENCHSUITE_ALLOW_DOWNLOAD"
CACHE_MB_ENV = "BENCHSUITE_IMAGENET_CACHE_MB"
WORKERS_ENV = "BENCHSUITE_DATA_WORKERS"
DEFAULT_CACHE_MB = 2048
DEFAULT_WORKERS = 2

LAYOUT = (
    "expected ImageNet in ImageFolder layout: <root>/train/<wnid>/*.JPEG (calibration) and "
    "<root>/val/<wnid>/*.JPEG (evaluation), wnids such as n01440764, images jpg/jpeg/png"
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


# --------------------------------------------------------------------------------------------
# Models and preprocessing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to floor(image_size / crop_pct), center-crop, normalize."""

    crop_pct: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    image_size: int = IMAGE_SIZE
    rule: str = ""

    @property
    def resize(self) -> int:
        return math.floor(self.image_size / self.crop_pct)

    def transform(self):
        """PIL image -> uint8 tensor (3, image_size, image_size), before normalization."""
        from torchvision import transforms

        modes = {"bicubic": transforms.InterpolationMode.BICUBIC, "bilinear": transforms.InterpolationMode.BILINEAR}
        return transforms.Compose([
            transforms.Resize(self.resize, interpolation=modes[self.interpolation]),
            transforms.CenterCrop(self.image_size),
            transforms.PILToTensor(),
        ])

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> float32, exactly as ToTensor (x / 255) followed by Normalize."""
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        return images.to(torch.float32).div_(255.0).sub_(mean).div_(std)

    @property
    def cache_key(self) -> tuple[Any, ...]:
        """What determines the uint8 crops (mean and std are applied later)."""
        return (self.resize, self.image_size, self.interpolation)

    def manifest(self) -> dict[str, Any]:
        return {
            "crop_pct": self.crop_pct,
            "resize": self.resize,
            "interpolation": self.interpolation,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "rule": self.rule,
            "steps": [
                "PIL open, convert RGB",
                f"resize shorter side to {self.resize} ({self.interpolation}, PIL)",
                f"center crop {self.image_size}",
                "to tensor (x / 255)",
                f"normalize mean {list(self.mean)}, std {list(self.std)}",
            ],
        }


#: Preprocessing of the PTQ reference code per paper family (protocol §1.2).
FAMILY_PREPROCESS: dict[str, Preprocess] = {
    "vit": Preprocess(0.9, HALF, HALF, rule="paper family ViT (PTQ reference code)"),
    "deit": Preprocess(0.875, IMAGENET_MEAN, IMAGENET_STD,
                       rule="paper family DeiT (PTQ reference code; timm's own config says crop_pct 0.9)"),
    "swin": Preprocess(0.9, IMAGENET_MEAN, IMAGENET_STD, rule="paper family Swin (PTQ reference code)"),
}


@dataclass(frozen=True)
class PaperModel:
    """A model of the PTQ papers: its timm name with the explicit pretrained tag."""

    name: str
    timm_name: str
    family: str  # key of FAMILY_PREPROCESS
    description: str


PAPER_MODELS: dict[str, PaperModel] = {
    m.name: m
    for m in (
        PaperModel("vit-t", "vit_tiny_patch16_224.augreg_in21k_ft_in1k", "vit", "ViT-T/16, AugReg IN-21k -> 1k"),
        PaperModel("vit-s", "vit_small_patch16_224.augreg_in21k_ft_in1k", "vit",
                   "ViT-S/16, AugReg IN-21k -> 1k (papers' FP top-1 81.39)"),
        PaperModel("vit-b", "vit_base_patch16_224.augreg_in21k_ft_in1k", "vit",
                   "ViT-B/16, AugReg IN-21k -> 1k (papers' FP top-1 84.54)"),
        PaperModel("deit-t", "deit_tiny_patch16_224.fb_in1k", "deit", "DeiT-T, non-distilled (papers' FP top-1 72.21)"),
        PaperModel("deit-s", "deit_small_patch16_224.fb_in1k", "deit", "DeiT-S (papers' FP top-1 79.85)"),
        PaperModel("deit-b", "deit_base_patch16_224.fb_in1k", "deit", "DeiT-B (papers' FP top-1 81.80)"),
        PaperModel("swin-t", "swin_tiny_patch4_window7_224.ms_in1k", "swin", "Swin-T, IN-1k (papers' FP top-1 81.35)"),
        PaperModel("swin-s", "swin_small_patch4_window7_224.ms_in1k", "swin", "Swin-S, IN-1k (papers' FP top-1 83.23)"),
        PaperModel("swin-b", "swin_base_patch4_window7_224.ms_in22k_ft_in1k", "swin",
                   "Swin-B, IN-22k -> 1k (papers' FP top-1 85.27)"),
    )
}


def _adapter_family(timm_model: str) -> str:
    arch = timm_model.split(".", 1)[0]
    if arch.startswith("swin"):
        return "timm_swin"
    if arch.startswith(("vit", "deit")):
        return "timm_vit"
    return "timm"


def timm_name(model: str) -> str:
    """The timm name of a paper name (with its tag), or ``model`` itself."""
    paper = PAPER_MODELS.get(model)
    return paper.timm_name if paper else model


def _timm_pretrained_cfg(name: str) -> Any:
    from timm.models import get_pretrained_cfg

    try:
        return get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - an unregistered tag: treat as no config
        return None


def preprocess_for(model: str) -> Preprocess:
    """The evaluation (and calibration) preprocessing of a paper name or a timm name."""
    paper = PAPER_MODELS.get(model)
    if paper is not None:
        return FAMILY_PREPROCESS[paper.family]
    cfg = _timm_pretrained_cfg(model)
    mean = tuple(cfg.mean) if cfg is not None and cfg.mean else IMAGENET_MEAN
    std = tuple(cfg.std) if cfg is not None and cfg.std else IMAGENET_STD
    if len(mean) != 3 or len(std) != 3:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    source = "timm pretrained_cfg" if cfg is not None else "ImageNet defaults (no timm pretrained_cfg)"
    return Preprocess(
        GENERIC_CROP_PCT, mean, std,
        rule=f"generic timm model: crop_pct {GENERIC_CROP_PCT}, bicubic, mean/std from {source}",
    )


# --------------------------------------------------------------------------------------------
# Data: the folder scan, labels and decoding
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def canonical_synsets() -> tuple[str, ...]:
    """The 1000 ImageNet-1k wnids in canonical (sorted) order, from timm's ``imagenet_synsets.txt``."""
    from timm.data import ImageNetInfo

    synsets = tuple(ImageNetInfo().label_names())
    if len(synsets) != NUM_CLASSES or list(synsets) != sorted(synsets):  # pragma: no cover - timm's file
        raise RuntimeError("timm's ImageNet synset list is not the sorted 1000 ImageNet-1k wnids")
    return synsets


@lru_cache(maxsize=1)
def _synset_index() -> dict[str, int]:
    return {wnid: i for i, wnid in enumerate(canonical_synsets())}


@dataclass(frozen=True)
class ImageFolderSplit:
    """One split: sorted relative paths (the sample ids) and canonical labels."""

    root: Path
    split: str
    ids: tuple[str, ...]  # posix paths relative to the data root: "val/n01440764/x.JPEG"
    labels: tuple[int, ...]
    classes: tuple[str, ...]  # wnids that hold at least one image, sorted

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def files_sha256(self) -> str:
        return _ids_hash(self.ids)


@lru_cache(maxsize=16)
def _ids_hash(ids: tuple[str, ...]) -> str:
    return sha256_of(ids)


def check_root(data_root: Path | None) -> Path:
    """The data root as a Path; DataError (with the expected layout) when it cannot be ImageNet."""
    if data_root is None:
        raise DataError(f"imagenet needs a data root: pass --data-root imagenet=PATH; {LAYOUT}")
    root = Path(data_root).expanduser()
    if not root.exists():
        raise DataError(f"imagenet data root {str(root)!r} does not exist; {LAYOUT}")
    if not root.is_dir():
        raise DataError(f"imagenet data root {str(root)!r} is not a folder; {LAYOUT}")
    missing = [f"{split}/" for split in ("train", "val") if not (root / split).is_dir()]
    if missing:
        raise DataError(f"imagenet data root {str(root)!r} has no {' or '.join(missing)} folder; {LAYOUT}")
    return root


def scan_split(data_root: Path, split: str) -> ImageFolderSplit:
    """List ``<root>/<split>/<wnid>/**`` images; remembered per (root, split, folder mtime)."""
    root = check_root(data_root)
    folder = root / split
    return _scan(str(root.resolve()), split, folder.stat().st_mtime_ns)


@lru_cache(maxsize=8)
def _scan(root_text: str, split: str, _mtime_ns: int) -> ImageFolderSplit:
    root = Path(root_text)
    folder = root / split
    index = _synset_index()
    class_dirs = sorted(
        entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith(".")
    )
    unknown = [name for name in class_dirs if name not in index]
    if unknown:
        shown = ", ".join(unknown[:3]) + (", ..." if len(unknown) > 3 else "")
        raise DataError(
            f"imagenet {split}/ under {str(root)!r} has {len(unknown)} folder(s) that are not ImageNet-1k wnids "
            f"({shown}); {LAYOUT}"
        )
    if not class_dirs:
        raise DataError(
            f"imagenet {split}/ under {str(root)!r} has no class folders (a flat val/ must first be sorted "
            f"into <wnid> folders with the devkit's ground truth); {LAYOUT}"
        )
    ids: list[str] = []
    for wnid in class_dirs:
        for dirpath, dirnames, filenames in os.walk(folder / wnid, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(root).as_posix()
            ids.extend(f"{rel}/{name}" for name in filenames if name.lower().endswith(IMAGE_EXTENSIONS))
    if not ids:
        raise DataError(f"imagenet {split}/ under {str(root)!r} holds no images; {LAYOUT}")
    ids.sort()
    labels = tuple(index[sample_id.split("/", 2)[1]] for sample_id in ids)
    classes = tuple(sorted({sample_id.split("/", 2)[1] for sample_id in ids}))
    return ImageFolderSplit(root, split, tuple(ids), labels, classes)


def eval_indices(total: int, limit: int | None) -> list[int]:
    """Indices into the sorted val list: all, or a fixed-seed random subset kept in file order
    (:func:`benchsuite.eval_subset.subset_indices` with :data:`EVAL_SUBSET_SEED`)."""
    return subset_indices(total, limit, EVAL_SUBSET_SEED)


def _subset_rule(total: int, limit: int | None) -> str:
    return describe_subset(total, limit, EVAL_SUBSET_SEED, "val images", "the sorted val path list", "path order")


class _ImageFiles(torch.utils.data.Dataset):
    """Decodes images into uint8 crops; a bad file yields zeros and its error text."""

    def __init__(self, root: Path, ids: Sequence[str], preprocess: Preprocess) -> None:
        self.root = root
        self.ids = list(ids)
        self.size = preprocess.image_size
        self.transform = preprocess.transform()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        from PIL import Image

        try:
            with Image.open(self.root / self.ids[i]) as image:
                return self.transform(image.convert("RGB")), ""
        except Exception as exc:  # noqa: BLE001 - reported once, as one DataError line
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), f"{self.ids[i]}: {text}"


def _workers(n: int, batch_size: int) -> int:
    try:
        wanted = int(os.environ.get(WORKERS_ENV, DEFAULT_WORKERS))
    except ValueError:
        wanted = DEFAULT_WORKERS
    if n < 32:  # starting workers costs more than decoding a handful of images
        return 0
    return max(0, min(wanted, os.cpu_count() or 1, math.ceil(n / batch_size)))


def _decode_batches(root: Path, ids: Sequence[str], preprocess: Preprocess, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 crops of ``ids`` in order, ``batch_size`` at a time; a bad image raises DataError."""
    dataset = _ImageFiles(root, ids, preprocess)
    workers = _workers(len(ids), batch_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
        persistent_workers=False, prefetch_factor=4 if workers else None,
    )
    for images, errors in loader:
        bad = [e for e in errors if e]
        if bad:
            more = f" (and {len(bad) - 1} more in this batch)" if len(bad) > 1 else ""
            raise DataError(f"cannot decode imagenet image {bad[0]}{more}")
        yield images


def _decode_all(root: Path, ids: Sequence[str], preprocess: Preprocess) -> torch.Tensor:
    size = preprocess.image_size
    out = torch.empty(len(ids), 3, size, size, dtype=torch.uint8)
    start = 0
    for images in _decode_batches(root, ids, preprocess, batch_size=64):
        out[start : start + len(images)] = images
        start += len(images)
    return out


_crop_cache: OrderedDict[tuple[Any, ...], torch.Tensor] = OrderedDict()
_crop_lock = threading.Lock()


def _cache_budget_bytes() -> int:
    try:
        return int(float(os.environ.get(CACHE_MB_ENV, DEFAULT_CACHE_MB)) * 2**20)
    except ValueError:
        return DEFAULT_CACHE_MB * 2**20


def _cached_crops(root: Path, ids: tuple[str, ...], preprocess: Preprocess) -> torch.Tensor | None:
    """The uint8 crops of ``ids``, decoded once per process; None when over the memory budget."""
    budget = _cache_budget_bytes()
    need = len(ids) * 3 * preprocess.image_size**2
    if need > budget:
        return None
    key = (str(root.resolve()), _ids_hash(ids), preprocess.cache_key)
    with _crop_lock:
        if key in _crop_cache:
            _crop_cache.move_to_end(key)
            return _crop_cache[key]
    started = time.perf_counter()
    crops = _decode_all(root, ids, preprocess)
    log.info("decoded %d imagenet images in %.1f s", len(ids), time.perf_counter() - started)
    with _crop_lock:
        _crop_cache[key] = crops
        while sum(t.numel() for t in _crop_cache.values()) > budget and len(_crop_cache) > 1:
            _crop_cache.popitem(last=False)
    return crops


def clear_caches() -> None:
    """Forget decoded images and folder scans (tests; long sessions that change the data)."""
    with _crop_lock:
        _crop_cache.clear()
    _scan.cache_clear()
    _ids_hash.cache_clear()


# --------------------------------------------------------------------------------------------
# Hub weights
# --------------------------------------------------------------------------------------------


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (as huggingface_hub does at import)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def _download_allowed() -> bool:
    return os.environ.get(ALLOW_DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class _HubSource:
    hub_id: str | None
    url: str | None
    cached: Path | None  # the weights file in the local cache, if present
    kind: str | None  # "hf-hub" or "url" for the cached file
    custom_load: bool


def hub_weights_file(name: str) -> Path | None:
    """The locally cached timm hub weights file of a timm name, or None (never downloads)."""
    return _hub_source(name).cached


def _hub_source(name: str) -> _HubSource:
    cfg = _timm_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise DataError(f"timm has no pretrained weights for {name!r}; pass --weights imagenet=FILE")
    custom = bool(cfg.custom_load)
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        filenames = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for filename in filenames:
            found = try_to_load_from_cache(repo, filename, cache_dir=str(hf_hub_cache_dir()), revision=revision or None)
            if isinstance(found, str) and Path(found).is_file():
                # timm's hub repositories hold timm-format state dicts: no custom (npz) loader
                return _HubSource(cfg.hf_hub_id, cfg.url, Path(found), "hf-hub", False)
    if cfg.url:
        from urllib.parse import urlparse

        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        if path.is_file():
            return _HubSource(cfg.hf_hub_id, cfg.url, path, "url", custom)
    return _HubSource(cfg.hf_hub_id, cfg.url, None, None, custom)


def _create(name: str, skip_init: bool = False, **kwargs: Any) -> nn.Module:
    """timm.create_model for ImageNet-1k: 1000 classes, img_size 224 where the architecture takes it.

    ``skip_init`` passes timm's ``weight_init="skip"`` (where the architecture takes it) for models
    whose every weight is loaded strictly right after: timm's random init dominates the build time
    (measured 3.4 s of 3.5 s for vit_tiny on this machine).
    """
    import timm

    optional = {"img_size": IMAGE_SIZE}
    if skip_init:
        optional["weight_init"] = "skip"
    kwargs = {"num_classes": NUM_CLASSES, **optional, **kwargs}
    while True:
        try:
            return timm.create_model(name, **kwargs)
        except TypeError as exc:
            dropped = [key for key in optional if key in kwargs and key in str(exc)]
            if not dropped:
                raise
            for key in dropped:
                kwargs.pop(key)


def _check_hub_head(name: str) -> None:
    cfg = _timm_pretrained_cfg(name)
    if cfg is not None and cfg.num_classes != NUM_CLASSES:
        raise DataError(
            f"timm's pretrained weights for {name!r} have no ImageNet-1k head ({cfg.num_classes} classes); "
            "pass --weights imagenet=FILE"
        )


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------

_INFO = TaskInfo(
    modality="image",
    metrics=("top1", "top5", "agreement", "kl_to_float"),
    main_metric="top1",
    higher_is_better=True,
    default_calib_size=32,
    description=(
        "ImageNet-1k classification (ImageFolder train/ and val/ under --data-root imagenet=PATH): "
        "ViT, DeiT and Swin with the PTQ papers' checkpoints and preprocessing, or any timm model; "
        "top-1/top-5 on val, calibration from train"
    ),
    demo=False,
)


class ImageNetTask(Task):
    """ImageNet-1k top-1/top-5 on real ImageNet folders, plus agreement and KL to the float model."""

    name = "imagenet"
    info = _INFO

    @classmethod
    def models(cls) -> Mapping[str, ModelSpec]:
        return {
            m.name: ModelSpec(m.name, f"timm:{m.timm_name}", _adapter_family(m.timm_name), m.description)
            for m in PAPER_MODELS.values()
        }

    def resolve_model(self, name: str) -> ModelSpec:
        """A paper name, or any timm model name (with or without a pretrained tag)."""
        offered = self.models()
        if name in offered:
            return offered[name]
        import timm

        from benchsuite.registry import suggestion

        if timm.is_model(name):
            arch, _, tag = name.partition(".")
            if tag and _timm_pretrained_cfg(name) is None:
                tags = [t.partition(".")[2] for t in timm.list_pretrained(arch)]
                raise UnknownNameError(
                    f"timm model {arch!r} has no pretrained tag {tag!r}{suggestion(tag, tags)}; "
                    f"tags: {', '.join(tags) or 'none'}"
                )
            return ModelSpec(name, f"timm:{name}", _adapter_family(name), "timm model given by name")

        raise UnknownNameError(
            f"task {self.name!r} has no model {name!r}{suggestion(name, offered)}; "
            f"models: {', '.join(offered)}, or any timm model name"
        )

    # ----------------------------------------------------------------------------------------

    def validate(self) -> None:
        check_root(self.options.data_root)
        self._split("val")
        self._split("train")
        if self.options.weights is not None and not Path(self.options.weights).expanduser().is_file():
            raise DataError(f"imagenet weights file {str(self.options.weights)!r} does not exist")

    def build_model(self, model: str) -> nn.Module:
        self.resolve_model(model)
        name = timm_name(model)
        if self.options.weights is not None:
            path = Path(self.options.weights).expanduser()
            state = load_weights_file(path, label="imagenet")
            net = _create(name, skip_init=True, pretrained=False)
            load_into(net, state, path, model, label="imagenet")
        else:
            net = self._hub_model(model, name)
        return net.eval().to(self.options.device)

    def _hub_model(self, model: str, name: str) -> nn.Module:
        _check_hub_head(name)
        source = _hub_source(name)
        if source.cached is not None:
            overlay = {"file": str(source.cached), "custom_load": source.custom_load}
            return _create(name, skip_init=True, pretrained=True, pretrained_cfg_overlay=overlay)
        where = source.hub_id or source.url
        if not _download_allowed():
            raise DataError(
                f"no local weights for imagenet model {model!r} (timm {name}, {where} is not in the hub cache "
                f"{str(hf_hub_cache_dir())!r}): pass --weights imagenet=FILE, or allow a download by setting "
                f"{ALLOW_DOWNLOAD_ENV}=1"
            )
        try:
            return _create(name, pretrained=True)
        except Exception as exc:  # noqa: BLE001 - any network/hub failure is the user's to fix
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(f"cannot download timm weights for {model!r} ({where}): {text}") from None

    def calibration_set(self, model: str, size: int, seed: int) -> CalibrationSet:
        self.resolve_model(model)
        preprocess = preprocess_for(model)
        train = self._split("train")
        if size < 1 or size > len(train):
            raise DataError(
                f"imagenet calibration size must be between 1 and {len(train)} (the images under train/), got {size}"
            )
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(len(train), generator=generator)[:size].tolist()
        ids = [train.ids[i] for i in chosen]
        images = preprocess.normalize(_decode_all(train.root, ids, preprocess))
        return CalibrationSet.from_tensor(
            images.to(self.options.device),
            ids,
            source="imagenet:train",
            seed=seed,
            population_hash=train.files_sha256,
        )

    def evaluate(self, model: nn.Module, model_name: str, reference: Evaluation | None = None) -> Evaluation:
        self.resolve_model(model_name)
        preprocess = preprocess_for(model_name)
        val = self._split("val")
        chosen = eval_indices(len(val), self.options.eval_limit)
        ids = tuple(val.ids[i] for i in chosen)
        labels = torch.tensor([val.labels[i] for i in chosen], dtype=torch.long)
        batch_size = max(1, int(self.options.eval_batch_size))
        logits, labels = evaluate_classifier(
            model, self._eval_batches(val.root, ids, labels, preprocess, batch_size), self.options.device
        )
        if logits.shape[1] != NUM_CLASSES:
            raise DataError(f"model {model_name!r} outputs {logits.shape[1]} classes; ImageNet-1k needs {NUM_CLASSES}")
        metrics = classification_metrics(logits, labels, reference_logits(reference, logits))
        details = {
            "samples": len(ids),
            "sample_ids_sha256": _ids_hash(ids),
            "eval_subset": _subset_rule(len(val), self.options.eval_limit),
            "eval_batch_size": batch_size,
        }
        return Evaluation(metrics=metrics, outputs=logits, details=details)

    def data_manifest(self, model: str) -> dict[str, Any]:
        spec = self.resolve_model(model)
        train, val = self._split("train"), self._split("val")
        chosen = eval_indices(len(val), self.options.eval_limit)
        return {
            "dataset": "ImageNet-1k (ILSVRC2012)",
            "layout": "ImageFolder: train/<wnid>/*, val/<wnid>/*",
            "data_root": str(val.root),
            "label_order": "index of the wnid in timm's sorted 1000-synset list (imagenet_synsets.txt)",
            "synsets_sha256": sha256_of(canonical_synsets()),
            "train_size": len(train),
            "train_classes": len(train.classes),
            "train_files_sha256": train.files_sha256,
            "val_size": len(val),
            "val_classes": len(val.classes),
            "val_files_sha256": val.files_sha256,
            "eval_split": "val",
            "eval_size": len(chosen),
            "eval_subset": _subset_rule(len(val), self.options.eval_limit),
            "eval_ids_sha256": _ids_hash(tuple(val.ids[i] for i in chosen)),
            "eval_batch_size": int(self.options.eval_batch_size),
            "calibration": "seeded torch.randperm over the sorted train path list, evaluation preprocessing, no labels",
            "model": {"name": model, "timm_name": timm_name(model), "family": spec.family},
            "preprocess": preprocess_for(model).manifest(),
            "weights": self._weights_manifest(model),
        }

    # ----------------------------------------------------------------------------------------

    def _split(self, split: str) -> ImageFolderSplit:
        return scan_split(check_root(self.options.data_root), split)

    def _weights_manifest(self, model: str) -> dict[str, Any]:
        if self.options.weights is not None:
            path = Path(self.options.weights).expanduser()
            weights: dict[str, Any] = {"source": "file", "path": str(path)}
            if path.is_file():
                weights["sha256"] = file_sha256(path)
            return weights
        name = timm_name(model)
        try:
            source = _hub_source(name)
        except DataError as exc:
            return {"source": "timm hub", "timm_name": name, "error": str(exc)}
        weights = {"source": "timm hub", "timm_name": name, "hub_id": source.hub_id, "url": source.url or None}
        if source.cached is not None:
            weights["file"] = str(source.cached)
            if source.kind == "hf-hub" and source.cached.parent.parent.name == "snapshots":
                weights["revision"] = source.cached.parent.name
            weights["sha256"] = file_sha256(source.cached)
        return weights

    def _eval_batches(
        self, root: Path, ids: tuple[str, ...], labels: torch.Tensor, preprocess: Preprocess, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        crops = _cached_crops(root, ids, preprocess)
        if crops is not None:
            for start in range(0, len(ids), batch_size):
                stop = start + batch_size
                yield preprocess.normalize(crops[start:stop]), labels[start:stop]
            return
        start = 0
        for images in _decode_batches(root, ids, preprocess, batch_size):
            yield preprocess.normalize(images), labels[start : start + len(images)]
            start += len(images)
