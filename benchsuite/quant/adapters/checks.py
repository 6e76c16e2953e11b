"""Refusals every timm adapter shares: one message format, one already-adapted check."""

from __future__ import annotations

from timm.layers.patch_embed import PatchEmbed
from torch import nn

from benchsuite.quant.adapters import UnsupportedModelError
from benchsuite.quant.modules import QuantModule


def unsupported(family: str, model: nn.Module, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{family} adapter cannot rewrite {type(model).__name__}: {why}")


def check_fresh_conv_embedding(family: str, model: nn.Module) -> None:
    """Refuse an already adapted model, or one whose patch embedding is not a conv PatchEmbed."""
    if any(isinstance(m, QuantModule) for m in model.modules()):
        raise unsupported(family, model, "it is already adapted (it contains QuantModules)")
    embed = getattr(model, "patch_embed", None)
    if not isinstance(embed, PatchEmbed) or not isinstance(embed.proj, nn.Conv2d):
        raise unsupported(family, model, f"patch embedding {type(embed).__name__} is not a conv PatchEmbed")
