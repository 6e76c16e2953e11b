"""A tiny task and two misbehaving methods for framework tests (registered at runtime).

The toy task is a real timm ViT with random weights on random images, labelled by the float
model itself, so float top-1 is 100% and quantization damage shows directly in the metrics.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from typing import ClassVar

from benchsuite.api import CalibrationSet, Evaluation, Method, MethodConfig, ModelSpec, Task, TaskInfo
from benchsuite.config import TaskConfig
from benchsuite.bits import BitSpec
from benchsuite.metrics.classification import classification_metrics

TOY_EVAL = 48
TOY_TRAIN = 96


def toy_vit(seed: int = 1234) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                              mlp_ratio=2.0, num_classes=10)
    return model.eval()


def _images(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, 16, 16, generator=generator)


@dataclass(frozen=True)
class ToyConfig(TaskConfig):
    """One option that changes the float model and one that changes only calibration."""

    FLOAT_FIELDS: ClassVar[frozenset[str]] = frozenset({"weight_seed"})

    #: Seed of the toy ViT's random weights (a different float model).
    weight_seed: int = 1234
    #: Calibration images come from this offset of the training pool.
    calib_offset: int = 0


class ToyTask(Task):
    name = "toy"
    config_class = ToyConfig
    info = TaskInfo(
        modality="image",
        metrics=("top1", "agreement", "kl_to_float"),
        main_metric="top1",
        default_calib_size=8,
        description="random tiny ViT on random images (tests only)",
    )
    builds = 0

    @classmethod
    def models(cls) -> Mapping[str, ModelSpec]:
        return {"toy-vit": ModelSpec("toy-vit", "timm.VisionTransformer", "timm_vit")}

    def build_model(self, model: str) -> nn.Module:
        self.resolve_model(model)
        type(self).builds += 1
        return toy_vit(self.config.weight_seed)

    def calibration_set(self, model: str, size: int, seed: int) -> CalibrationSet:
        order = torch.randperm(TOY_TRAIN, generator=torch.Generator().manual_seed(seed))[:size]
        images = _images(TOY_TRAIN + self.config.calib_offset, 7)[order + self.config.calib_offset]
        ids = [f"toy:{int(i) + self.config.calib_offset}" for i in order]
        return CalibrationSet.from_tensor(images, ids, "toy:train", seed)

    def evaluate(self, model: nn.Module, model_name: str, reference: Evaluation | None = None) -> Evaluation:
        images = _images(TOY_EVAL, 99)
        with torch.no_grad():
            logits = model(images)
            labels = toy_vit(self.config.weight_seed)(images).argmax(-1)
        ref = reference.outputs if reference is not None else None
        return Evaluation(classification_metrics(logits, labels, ref, topk=(1,)), outputs=logits)

    def data_manifest(self, model: str) -> dict:
        return {"calib_offset": self.config.calib_offset, "weight_seed": self.config.weight_seed}


@dataclass(frozen=True)
class ExplodeConfig(MethodConfig):
    calib_size: int | None = 4


class Explode(Method):
    """Raises inside quantize, to test cell isolation."""

    name = "explode"
    config_class = ExplodeConfig

    def quantize(self, model, calibration: CalibrationSet, bits: BitSpec, config: MethodConfig) -> nn.Module:
        raise RuntimeError("boom at " + bits.name)


class Crash(Method):
    """Kills its own process inside quantize: a worker dying mid-cell (Ray executor tests only)."""

    name = "crash"
    config_class = ExplodeConfig

    def quantize(self, model, calibration: CalibrationSet, bits: BitSpec, config: MethodConfig) -> nn.Module:
        import os

        os._exit(13)
