"""Adapter for the Point-MAE point-cloud transformers (:mod:`benchsuite.pointcloud.point_mae`).

The model is rewritten in place, like the timm adapters:

- every block's attention becomes a :class:`~benchsuite.quant.adapters.timm_vit.CanonicalAttention`
  (``matmul_qk`` and ``matmul_av`` as QuantMatMul sites, softmax visible); the segmentation
  model, whose reference scales q *before* q·kᵀ, gets :class:`QueryScaledAttention`, which
  keeps that order so the float output is unchanged bit for bit (its ``matmul_qk`` quantizer
  therefore sees scaled queries);
- ``qkv`` (post-LayerNorm), ``proj``, ``fc1`` (post-LayerNorm), ``fc2`` (post-GELU) become
  QuantLinears sharing the original Parameters, with LayerNorm pairs norm1→qkv and norm2→fc1;
- the mini-PointNet encoder maps to role ``patch_embed`` (tasks spec §3.1): all four of its
  pointwise convs are quantized; the first reads the centred neighbourhood coordinates (the
  raw input, kind ``image``, which methods may keep at 8 bits as for a ViT patch embedding),
  the other three read BN/ReLU or max-pool outputs (kind ``generic``);
- the classifier's three head Linears are ``head`` (the first reads the final LayerNorm's
  output, pooled; the others BN/ReLU outputs);
- the segmentation head (category embedding conv, feature-propagation convs, ``convs1..3``) is
  ``other``, kind ``generic``.

Left in float, by design: the position-embedding MLP on the center coordinates (ViT's position
embedding is a float parameter in every PTQ method benchsuite implements), the BatchNorms (folded
into the preceding conv at deployment), the FPS/kNN grouping and the 3-NN interpolation (index
and distance computations, no weights).

The encoder and head convs are :class:`~benchsuite.pointcloud.layers.PointwiseConv`, i.e.
``nn.Linear`` on channels-last tensors, so they become plain QuantLinears whose inputs keep the
batch as their first dim.
"""

from __future__ import annotations

import torch
from torch import nn

from benchsuite.pointcloud.layers import Attention, Block, FeaturePropagation, Mlp, PointEncoder, PointwiseConv
from benchsuite.pointcloud.point_mae import PointMAEClassifier, PointMAESegmenter
from benchsuite.quant.adapters import UnsupportedModelError
from benchsuite.quant.adapters.checks import unsupported
from benchsuite.quant.adapters.timm_vit import CanonicalAttention, attention_bias
from benchsuite.quant.canonical import BlockSites, CanonicalModel, InputKind, LayerNormPair, Role, Site
from benchsuite.quant.modules import QuantLinear, QuantModule

__all__ = ["FAMILY", "QueryScaledAttention", "adapt_point_mae", "is_point_mae"]

FAMILY = "point_mae"

PointMAEModel = PointMAEClassifier | PointMAESegmenter


def is_point_mae(model: nn.Module) -> bool:
    """The registry predicate: a benchsuite Point-MAE classifier or segmenter."""
    return isinstance(model, (PointMAEClassifier, PointMAESegmenter))


class QueryScaledAttention(CanonicalAttention):
    """:class:`CanonicalAttention` with the scale on q before ``matmul_qk``: ``(q · scale) @ kᵀ``.

    Point-MAE's segmentation code uses this order (its classification code scales after);
    keeping it makes the adapted float model equal the original exactly.
    """

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        scores = self.matmul_qk(q * self.scale, k.transpose(-2, -1))
        bias = attention_bias(scores, attn_mask, is_causal)
        if bias is not None:
            scores = scores + bias
        probs = self.attn_drop(self.softmax(scores))
        x = self.matmul_av(probs, v).transpose(1, 2).reshape(batch, tokens, self.attn_dim)
        return self.proj_drop(self.proj(x))


def _unsupported(model: nn.Module, why: str) -> UnsupportedModelError:
    return unsupported(FAMILY, model, why)


def _check_supported(model: PointMAEModel) -> None:
    """Refuse an adapted model, or one whose parts were swapped for modules this adapter does not know."""
    if any(isinstance(m, QuantModule) for m in model.modules()):
        raise _unsupported(model, "it is already adapted (it contains QuantModules)")
    encoder = model.encoder
    if type(encoder) is not PointEncoder or not all(
        type(seq[i]) is PointwiseConv for seq in (encoder.first_conv, encoder.second_conv) for i in (0, 3)
    ):
        raise _unsupported(model, "its point encoder is not the mini-PointNet of PointwiseConvs")
    for block in model.blocks.blocks:
        if type(block) is not Block or type(block.attn) is not Attention or type(block.mlp) is not Mlp:
            raise _unsupported(model, f"unsupported block {type(block).__name__}")
        if not (isinstance(block.norm1, nn.LayerNorm) and isinstance(block.norm2, nn.LayerNorm)):
            raise _unsupported(model, "block norms must be nn.LayerNorm")
        if not isinstance(block.mlp.act, nn.GELU):
            raise _unsupported(model, f"MLP activation {type(block.mlp.act).__name__} is not GELU")
    if isinstance(model, PointMAESegmenter) and type(model.propagation_0) is not FeaturePropagation:
        raise _unsupported(model, "its feature propagation module is not the known one")


class _SiteList:
    """Collects sites while the model is rewritten, in execution order."""

    def __init__(self) -> None:
        self.sites: list[Site] = []

    def add(self, name: str, module: QuantModule, block: int | None = None) -> Site:
        site = Site(name, module, module.role, module.input_kinds, block)
        self.sites.append(site)
        return site

    def linear(self, owner: nn.Module, attr: str, name: str, role: Role, kind: InputKind) -> QuantLinear:
        """Replace ``owner.<attr>`` (a Linear; an int index into a Sequential/ModuleList) by a QuantLinear."""
        key = int(attr) if attr.isdigit() else attr
        original = owner[key] if isinstance(key, int) else getattr(owner, key)
        if not isinstance(original, nn.Linear):
            raise TypeError(f"{name} is a {type(original).__name__}, not a Linear")
        wrapped = QuantLinear.from_float(original, role, kind)
        if isinstance(key, int):
            owner[key] = wrapped
        else:
            setattr(owner, key, wrapped)
        self.add(name, wrapped)
        return wrapped


def _wrap_encoder(encoder: PointEncoder, sites: _SiteList) -> None:
    layers = (
        ("first_conv", 0, InputKind.IMAGE),  # centred neighbourhood xyz: the raw input
        ("first_conv", 3, InputKind.GENERIC),  # after BN + ReLU
        ("second_conv", 0, InputKind.GENERIC),  # [group max, point feature]
        ("second_conv", 3, InputKind.GENERIC),  # after BN + ReLU
    )
    for seq_name, index, kind in layers:
        sites.linear(getattr(encoder, seq_name), str(index), f"encoder.{seq_name}.{index}", Role.PATCH_EMBED, kind)


def _wrap_block(index: int, block: Block, scale_queries: bool) -> tuple[BlockSites, list[LayerNormPair]]:
    attn = block.attn
    attention_type = QueryScaledAttention if scale_queries else CanonicalAttention
    canonical = attention_type(
        qkv=QuantLinear.from_float(attn.qkv, Role.QKV, InputKind.POST_LAYERNORM),
        proj=QuantLinear.from_float(attn.proj, Role.PROJ, InputKind.GENERIC),
        num_heads=attn.num_heads,
        head_dim=attn.head_dim,
        scale=attn.scale,
        attn_drop=attn.attn_drop,
        proj_drop=attn.proj_drop,
    )
    canonical.train(attn.training)
    block.attn = canonical
    mlp = block.mlp
    mlp.fc1 = QuantLinear.from_float(mlp.fc1, Role.FC1, InputKind.POST_LAYERNORM)
    mlp.fc2 = QuantLinear.from_float(mlp.fc2, Role.FC2, InputKind.POST_GELU)

    prefix = f"blocks.blocks.{index}"
    block_sites = _SiteList()
    block_sites.add(f"{prefix}.attn.qkv", canonical.qkv, index)
    block_sites.add(f"{prefix}.attn.matmul_qk", canonical.matmul_qk, index)
    block_sites.add(f"{prefix}.attn.matmul_av", canonical.matmul_av, index)
    block_sites.add(f"{prefix}.attn.proj", canonical.proj, index)
    block_sites.add(f"{prefix}.mlp.fc1", mlp.fc1, index)
    block_sites.add(f"{prefix}.mlp.fc2", mlp.fc2, index)
    pairs = [LayerNormPair(block.norm1, [canonical.qkv]), LayerNormPair(block.norm2, [mlp.fc1])]
    return BlockSites(index, block, attention=canonical, mlp=mlp, sites=block_sites.sites), pairs


def _wrap_classifier_head(model: PointMAEClassifier, sites: _SiteList) -> None:
    head = model.cls_head_finetune
    linear_indices = [i for i, layer in enumerate(head) if isinstance(layer, nn.Linear)]
    for position, index in enumerate(linear_indices):
        # The first Linear reads [cls, max over tokens] of the final LayerNorm's output.
        kind = InputKind.POST_LAYERNORM if position == 0 else InputKind.GENERIC
        sites.linear(head, str(index), f"cls_head_finetune.{index}", Role.HEAD, kind)


def _wrap_segmentation_head(model: PointMAESegmenter, sites: _SiteList) -> None:
    generic = InputKind.GENERIC
    sites.linear(model.label_conv, "0", "label_conv.0", Role.OTHER, generic)
    convs = model.propagation_0.mlp_convs
    for index in range(len(convs)):
        sites.linear(convs, str(index), f"propagation_0.mlp_convs.{index}", Role.OTHER, generic)
    for name in ("convs1", "convs2", "convs3"):
        sites.linear(model, name, name, Role.OTHER, generic)


def adapt_point_mae(model: nn.Module) -> CanonicalModel:
    """Rewrite a Point-MAE classifier or segmenter in place and return it in canonical form."""
    if not is_point_mae(model):
        raise _unsupported(model, "it is not a benchsuite Point-MAE model")
    assert isinstance(model, (PointMAEClassifier, PointMAESegmenter))
    _check_supported(model)
    segmenter = isinstance(model, PointMAESegmenter)

    sites = _SiteList()
    _wrap_encoder(model.encoder, sites)
    blocks: list[BlockSites] = []
    pairs: list[LayerNormPair] = []
    for index, block in enumerate(model.blocks.blocks):
        block_sites, block_pairs = _wrap_block(index, block, scale_queries=block.attn.scale_queries)
        sites.sites.extend(block_sites.sites)
        blocks.append(block_sites)
        pairs.extend(block_pairs)
    if segmenter:
        _wrap_segmentation_head(model, sites)
    else:
        _wrap_classifier_head(model, sites)
    return CanonicalModel(model, family=FAMILY, sites=sites.sites, blocks=blocks, layernorm_pairs=pairs)
