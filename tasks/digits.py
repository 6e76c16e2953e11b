"""The built-in demo task: scikit-learn's 8x8 handwritten digits, classified by a tiny ViT.

The data ships with scikit-learn (1797 images, values 0..16), so the demo needs no data root and
no download. The model is a real timm ``VisionTransformer`` (patch embedding, cls token,
LayerNorm, GELU MLP, head) small enough to train on a CPU in well under a minute; it is trained
once by :func:`train_digits_vit` with a fixed recipe and cached as safetensors in the user cache
folder, under a file name that includes a hash of the recipe, so a recipe change retrains.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchsuite.api import CalibrationSet, Evaluation, ModelSpec, Task, TaskInfo, sha256_of
from benchsuite.errors import DataError
from benchsuite.metrics.classification import classification_metrics, evaluate_classifier, reference_logits
from benchsuite.weights import cached_trained_weights, file_sha256, load_into
from benchsuite.weights import load_weights_file as _read_weights_file

__all__ = [
    "DigitsTask",
    "MODEL_NAME",
    "RECIPE",
    "RECIPE_VERSION",
    "DigitsSplit",
    "build_architecture",
    "cache_dir",
    "cached_weights_path",
    "digits_split",
    "load_weights_file",
    "preprocess",
    "recipe_hash",
    "train_digits_vit",
    "training_runs",
]

log = logging.getLogger(__name__)

MODEL_NAME = "vit-tiny-digits"

#: Bump when anything that changes the trained weights changes outside :data:`RECIPE`'s fields.
RECIPE_VERSION = 1

#: Everything that determines the trained weights; its hash is part of the cache file name.
RECIPE: dict[str, Any] = {
    "version": RECIPE_VERSION,
    "architecture": {
        "img_size": 32,
        # 8x8 patches of the 4x-upsampled image cover 2x2 source pixels: 16 tokens + cls.
        # (4x4 patches would be single source pixels: 4x the cost for lower accuracy.)
        "patch_size": 8,
        "in_chans": 3,
        "num_classes": 10,
        "embed_dim": 64,
        "depth": 4,
        "num_heads": 4,
        "mlp_ratio": 2.0,
    },
    "split": {"test_size": 0.3, "random_state": 0, "stratify": True},
    "preprocess": {"scale": 1 / 16, "size": 32, "mode": "bilinear", "align_corners": False,
                   "channels": 3, "mean": 0.5, "std": 0.5},
    "seed": 0,
    "epochs": 24,
    "batch_size": 32,
    "optimizer": "AdamW",
    "lr": 2e-3,
    "weight_decay": 0.05,
    "schedule": {"name": "OneCycleLR", "pct_start": 0.15},
    # Augmentation: random translation by up to this many pixels of the 32x32 input.
    "max_shift": 1,
}

_INFO = TaskInfo(
    modality="image",
    metrics=("top1", "top5", "agreement", "kl_to_float"),
    main_metric="top1",
    higher_is_better=True,
    default_calib_size=32,
    description=(
        "scikit-learn's 8x8 handwritten digits (1797 images, 30% stratified test split), "
        "upsampled to 32x32, classified by a 4-block ViT trained by benchsuite; runs in minutes on a CPU"
    ),
    demo=True,
)

_MODELS: dict[str, ModelSpec] = {
    MODEL_NAME: ModelSpec(
        name=MODEL_NAME,
        source="timm.VisionTransformer",
        family="timm_vit",
        description="timm VisionTransformer, 32x32 input, 8x8 patches, dim 64, depth 4, 4 heads, "
        "MLP ratio 2 (~148k parameters), trained on the digits train split by benchsuite",
    ),
}


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class DigitsSplit:
    """One split of the digits data: preprocessed images, labels and stable sample ids."""

    def __init__(self, name: str, indices: np.ndarray, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.name = name
        self.indices = indices
        self.images = images
        self.labels = labels
        self.ids: tuple[str, ...] = tuple(f"digits:{name}:{int(i):04d}" for i in indices)

    def __len__(self) -> int:
        return len(self.ids)


def preprocess(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, 8, 8) digits with values 0..16 -> (N, 3, 32, 32) float32 normalized to about [-1, 1]."""
    spec = RECIPE["preprocess"]
    x = torch.as_tensor(np.asarray(images, dtype=np.float32)).reshape(-1, 1, 8, 8) * spec["scale"]
    x = F.interpolate(x, size=(spec["size"], spec["size"]), mode=spec["mode"], align_corners=spec["align_corners"])
    x = (x - spec["mean"]) / spec["std"]
    return x.expand(-1, spec["channels"], -1, -1).contiguous()


@lru_cache(maxsize=None)
def digits_split(name: str) -> DigitsSplit:
    """The ``train`` or ``test`` split: fixed, stratified, sorted by index in the original array."""
    if name not in ("train", "test"):
        raise ValueError(f"unknown digits split {name!r}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    spec = RECIPE["split"]
    everything = np.arange(len(data.target))
    train, test = train_test_split(
        everything,
        test_size=spec["test_size"],
        random_state=spec["random_state"],
        stratify=data.target if spec["stratify"] else None,
    )
    indices = np.sort(train if name == "train" else test)
    images = preprocess(data.images[indices])
    labels = torch.as_tensor(data.target[indices], dtype=torch.long)
    return DigitsSplit(name, indices, images, labels)


# --------------------------------------------------------------------------------------------
# Model, training and the weights cache
# --------------------------------------------------------------------------------------------


def build_architecture() -> nn.Module:
    """The untrained ViT of :data:`RECIPE` (initialized from a fixed seed, global RNG untouched)."""
    from timm.models.vision_transformer import VisionTransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RECIPE["seed"])
        return VisionTransformer(**RECIPE["architecture"])


def recipe_hash() -> str:
    """Short hash of :data:`RECIPE` (which includes :data:`RECIPE_VERSION`)."""
    return hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:12]


def cache_dir() -> Path:
    """``$BENCHSUITE_CACHE``, else ``$XDG_CACHE_HOME/benchsuite``, else ``~/.cache/benchsuite``."""
    explicit = os.environ.get("BENCHSUITE_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "benchsuite"


def cached_weights_path() -> Path:
    return cache_dir() / f"digits-{MODEL_NAME}-{recipe_hash()}.safetensors"


_training_runs = 0
_lock = threading.Lock()


def training_runs() -> int:
    """How many times this process has trained the model (0 when every build hit the cache)."""
    return _training_runs


def _shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels, filling with the background value."""
    n, _, h, w = x.shape
    spec = RECIPE["preprocess"]
    background = (0.0 - spec["mean"]) / spec["std"]
    padded = F.pad(x, (max_shift,) * 4, value=background)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, x.shape[1], h, w + 2 * max_shift)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, x.shape[1], h, w)
    return out.gather(3, cols)


def train_digits_vit(progress: bool | None = None) -> dict[str, torch.Tensor]:
    """Train the demo ViT on the train split with :data:`RECIPE`; return its state dict (CPU)."""
    global _training_runs
    split = digits_split("train")
    model = build_architecture()
    generator = torch.Generator().manual_seed(RECIPE["seed"])
    batch_size, epochs = RECIPE["batch_size"], RECIPE["epochs"]
    steps_per_epoch = -(-len(split) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=RECIPE["lr"], total_steps=epochs * steps_per_epoch,
        pct_start=RECIPE["schedule"]["pct_start"],
    )
    if progress is None:
        progress = sys.stderr.isatty()
    started = time.perf_counter()
    model.train()
    # One thread: this model's ops are too small to gain from more, and on a busy machine
    # intra-op threads made training several times slower (measured 0.9 s vs 2.3 s per epoch).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train_epochs(model, split, generator, optimizer, schedule, progress)
    finally:
        torch.set_num_threads(threads)
    _training_runs += 1
    log.info("trained %s in %.1f s", MODEL_NAME, time.perf_counter() - started)
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _train_epochs(model, split, generator, optimizer, schedule, progress: bool) -> None:
    batch_size, epochs = RECIPE["batch_size"], RECIPE["epochs"]
    with _progress(progress, epochs) as advance:
        for _ in range(epochs):
            order = torch.randperm(len(split), generator=generator)
            for start in range(0, len(split), batch_size):
                batch = order[start : start + batch_size]
                inputs = split.images[batch]
                if RECIPE["max_shift"]:
                    inputs = _shift(inputs, RECIPE["max_shift"], generator)
                loss = F.cross_entropy(model(inputs), split.labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
            advance()


class _progress:
    """A rich progress bar over epochs when asked for (on a terminal), else nothing."""

    def __init__(self, enabled: bool, epochs: int) -> None:
        self.enabled, self.epochs, self.bar = enabled, epochs, None

    def __enter__(self):
        if self.enabled:
            try:
                from rich.console import Console
                from rich.progress import Progress

                self.bar = Progress(console=Console(stderr=True), transient=True)
                self.bar.__enter__()
                task = self.bar.add_task(f"training {MODEL_NAME} (once; cached)", total=self.epochs)
                return lambda: self.bar.advance(task)
            except ImportError:  # pragma: no cover - rich is a dependency
                self.bar = None
        return lambda: None

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or a weights-only torch checkpoint (.pt/.pth/.bin).

    A missing, unreadable or corrupt file raises :class:`DataError`.
    """
    return _read_weights_file(path, label="digits")


def _load_into(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    load_into(model, state, path, MODEL_NAME, label="digits")


def _cached_state() -> dict[str, torch.Tensor]:
    """The trained weights from the cache, training and caching them first when needed."""
    return cached_trained_weights(
        cached_weights_path(),
        train_digits_vit,
        label="digits",
        metadata={"recipe": json.dumps(RECIPE, sort_keys=True)},
        lock=_lock,
    )


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------


class DigitsTask(Task):
    """8x8 digits upsampled to 32x32; top-1/top-5 plus agreement and KL to the float model."""

    name = "digits"
    info = _INFO

    @classmethod
    def models(cls) -> Mapping[str, ModelSpec]:
        return dict(_MODELS)

    def build_model(self, model: str) -> nn.Module:
        self.resolve_model(model)
        net = build_architecture()
        if self.options.weights is not None:
            path = Path(self.options.weights)
            _load_into(net, load_weights_file(path), path)
        else:
            _load_into(net, _cached_state(), cached_weights_path())
        return net.eval().to(self.options.device)

    def calibration_set(self, model: str, size: int, seed: int) -> CalibrationSet:
        self.resolve_model(model)
        split = digits_split("train")
        if size < 1 or size > len(split):
            raise DataError(f"digits calibration size must be between 1 and {len(split)} (the train split), got {size}")
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(len(split), generator=generator)[:size]
        return CalibrationSet.from_tensor(
            split.images[chosen].to(self.options.device),
            [split.ids[i] for i in chosen.tolist()],
            source="sklearn.datasets.load_digits:train",
            seed=seed,
            population_hash=sha256_of(split.ids),
        )

    def evaluate(self, model: nn.Module, model_name: str, reference: Evaluation | None = None) -> Evaluation:
        self.resolve_model(model_name)
        split = digits_split("test")
        n = self._eval_size(len(split))
        logits, labels = evaluate_classifier(model, self._batches(split, n), self.options.device)
        metrics = classification_metrics(logits, labels, reference_logits(reference, logits))
        details = {"samples": n, "sample_ids_sha256": sha256_of(split.ids[:n])}
        return Evaluation(metrics=metrics, outputs=logits, details=details)

    def data_manifest(self, model: str) -> dict[str, Any]:
        self.resolve_model(model)
        import sklearn

        train, test = digits_split("train"), digits_split("test")
        if self.options.weights is not None:
            path = Path(self.options.weights)
            weights: dict[str, Any] = {"source": "file", "path": str(path)}
            if path.is_file():
                weights["sha256"] = file_sha256(path)
        else:
            weights = {"source": "trained by benchsuite", "recipe_version": RECIPE_VERSION,
                       "recipe_sha256_12": recipe_hash(), "cache_file": cached_weights_path().name}
        return {
            "dataset": "sklearn.datasets.load_digits",
            "sklearn_version": sklearn.__version__,
            "split": dict(RECIPE["split"]),
            "train_size": len(train),
            "test_size": len(test),
            "eval_split": "test",
            "eval_size": self._eval_size(len(test)),
            "train_ids_sha256": sha256_of(train.ids),
            "test_ids_sha256": sha256_of(test.ids),
            "preprocess": [
                "x / 16 (values 0..16 -> [0, 1])",
                "resize 8x8 -> 32x32 (bilinear, align_corners=False)",
                "replicate to 3 channels",
                "normalize mean 0.5, std 0.5",
            ],
            "weights": weights,
        }

    # ----------------------------------------------------------------------------------------

    def _eval_size(self, total: int) -> int:
        limit = self.options.eval_limit
        return total if limit is None else max(0, min(int(limit), total))

    def _batches(self, split: DigitsSplit, n: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        size = max(1, int(self.options.eval_batch_size))
        for start in range(0, n, size):
            stop = min(start + size, n)
            yield split.images[start:stop], split.labels[start:stop]
