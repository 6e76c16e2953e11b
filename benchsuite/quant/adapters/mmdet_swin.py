"""Adapter for mmdetection 3.x's ``SwinTransformer`` backbone and the detectors built on it.

mmdet's ``WindowMSA`` computes both attention matmuls inline (``q @ kᵀ``, ``attn @ v``), so the
adapter replaces every block's ``attn.w_msa`` by a :class:`CanonicalWindowMSA` with the two
matmuls as :class:`~benchsuite.quant.modules.QuantMatMul` sites and the softmax as a visible
``nn.Softmax``; shifting, padding, window partitioning and the shift mask stay in mmdet's
``ShiftWindowMSA``, which calls the replacement exactly as it called ``WindowMSA``.

Sites, in execution order:

- ``patch_embed.projection`` (image input);
- per block: ``qkv`` (after ``norm1``), ``matmul_qk``, ``matmul_av`` (post-softmax), ``proj``,
  ``fc1`` (after ``norm2``), ``fc2`` (after the GELU) — mmdet's ``FFN`` holds them as
  ``ffn.layers[0][0]`` and ``ffn.layers[1]``;
- per stage with downsampling, *after* its blocks (mmdet 3 runs ``PatchMerging`` at the end of a
  stage, unlike timm): ``downsample.reduction``, reading the merging norm's output;
- for a detector, every ``nn.Conv2d`` and ``nn.Linear`` of the neck and heads, role ``other`` with
  a generic input, as the RepQ-ViT detection code quantizes the whole detector (transposed convs
  stay float, as there). ``backbone_only=True`` leaves neck and heads float.

Block units for reconstruction: the MLP unit is ``ffn.layers`` (the FFN's residual is added by
``FFN.forward`` from a second argument, so the module itself is not a function of one input).
mmdet blocks and window attention also take the feature map's ``hw_shape``, which the engine
captures with the unit's input and passes again (the calibration images share one padded canvas,
so it is one value per unit). The neck and head sites are not tunable
(:attr:`~benchsuite.quant.canonical.Site.tunable`): reconstruction methods tune the backbone and
only calibrate the rest.

The model is only inspected if mmdet is already imported (a model of its classes implies that), so
registering this adapter never imports mmdet.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from benchsuite.quant.adapters import UnsupportedModelError
from benchsuite.quant.canonical import BlockSites, CanonicalModel, InputKind, LayerNormPair, Role, Site
from benchsuite.quant.modules import QuantConv2d, QuantLinear, QuantMatMul, QuantModule

__all__ = ["FAMILY", "CanonicalWindowMSA", "adapt_mmdet_swin", "is_mmdet_swin"]

FAMILY = "mmdet_swin"

_SWIN_MODULE = "mmdet.models.backbones.swin"


def _swin_classes():
    """mmdet's swin module, or None when it is not loaded (then no model can be of its classes)."""
    module = sys.modules.get(_SWIN_MODULE)
    if module is None:
        return None
    return module


def _backbone_of(model: nn.Module) -> nn.Module | None:
    swin = _swin_classes()
    if swin is None:
        return None
    if isinstance(model, swin.SwinTransformer):
        return model
    backbone = getattr(model, "backbone", None)
    return backbone if isinstance(backbone, swin.SwinTransformer) else None


def is_mmdet_swin(model: nn.Module) -> bool:
    """The registry predicate: an mmdet ``SwinTransformer``, or a module whose ``backbone`` is one."""
    return _backbone_of(model) is not None


class CanonicalWindowMSA(nn.Module):
    """mmdet ``WindowMSA`` with every op explicit, in its order.

    ``softmax(matmul_qk(q · scale, kᵀ) + relative position bias + shift mask) → matmul_av(·, v) → proj``;
    q is scaled before ``matmul_qk`` as in mmdet (and the Swin reference code). The relative
    position bias table is the original Parameter and the index the original buffer.
    """

    def __init__(self, msa: nn.Module) -> None:
        super().__init__()
        self.embed_dims = msa.embed_dims
        self.window_size = tuple(msa.window_size)
        self.window_area = self.window_size[0] * self.window_size[1]
        self.num_heads = msa.num_heads
        self.scale = msa.scale
        self.relative_position_bias_table = msa.relative_position_bias_table
        self.register_buffer("relative_position_index", msa.relative_position_index)
        self.qkv = QuantLinear.from_float(msa.qkv, Role.QKV, InputKind.POST_LAYERNORM)
        self.matmul_qk = QuantMatMul(Role.MATMUL_QK, (InputKind.GENERIC, InputKind.GENERIC))
        self.softmax = msa.softmax
        self.attn_drop = msa.attn_drop
        self.matmul_av = QuantMatMul(Role.MATMUL_AV, (InputKind.POST_SOFTMAX, InputKind.GENERIC))
        self.proj = QuantLinear.from_float(msa.proj, Role.PROJ, InputKind.GENERIC)
        self.proj_drop = msa.proj_drop
        self.train(msa.training)

    def relative_position_bias(self) -> torch.Tensor:
        """``(1, heads, N, N)``, built as mmdet builds it."""
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(self.window_area, self.window_area, -1).permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        windows_batch, tokens, channels = x.shape
        qkv = self.qkv(x).reshape(windows_batch, tokens, 3, self.num_heads, channels // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        scores = self.matmul_qk(q * self.scale, k.transpose(-2, -1)) + self.relative_position_bias()
        if mask is not None:
            num_windows = mask.shape[0]
            scores = scores.view(-1, num_windows, self.num_heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)
            scores = scores.view(-1, self.num_heads, tokens, tokens)
        probs = self.attn_drop(self.softmax(scores))
        out = self.matmul_av(probs, v).transpose(1, 2).reshape(windows_batch, tokens, channels)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"embed_dims={self.embed_dims}, window_size={self.window_size}, num_heads={self.num_heads}"


def _unsupported(model: nn.Module, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{FAMILY} adapter cannot rewrite {type(model).__name__}: {why}")


def _check_supported(model: nn.Module, backbone: nn.Module) -> None:
    """Refuse what this adapter does not reproduce: adapted models, unknown block parts."""
    swin = _swin_classes()
    if any(isinstance(m, QuantModule) for m in model.modules()):
        raise _unsupported(model, "it is already adapted (it contains QuantModules)")
    if not isinstance(getattr(backbone.patch_embed, "projection", None), nn.Conv2d):
        raise _unsupported(model, "its patch embedding has no Conv2d projection")
    for stage in backbone.stages:
        for block in stage.blocks:
            if type(block) is not swin.SwinBlock or type(block.attn.w_msa) is not swin.WindowMSA:
                raise _unsupported(model, f"block {type(block).__name__} is not an mmdet SwinBlock with WindowMSA")
            layers = block.ffn.layers
            if len(layers) < 2 or not isinstance(layers[0][0], nn.Linear) or not isinstance(layers[1], nn.Linear):
                raise _unsupported(model, "an FFN is not Linear → activation → Linear")
        down = stage.downsample
        if down is not None and not isinstance(getattr(down, "reduction", None), nn.Linear):
            raise _unsupported(model, f"downsample {type(down).__name__} has no Linear reduction")


def _fc2_input_kind(ffn_layers: nn.Module) -> InputKind:
    activation = ffn_layers[0][1] if len(ffn_layers[0]) > 1 else None
    return InputKind.POST_GELU if isinstance(activation, nn.GELU) else InputKind.GENERIC


def _wrap_neck_and_heads(model: nn.Module, backbone: nn.Module, sites: list[Site]) -> None:
    """Every Conv2d and Linear outside the backbone becomes a role-``other`` site (in module order).

    Module order is registration order, which for mmdet detectors is neck → RPN → RoI heads, the
    order they run in.
    """
    backbone_modules = set(map(id, backbone.modules()))
    targets: list[tuple[str, nn.Module, str, nn.Module]] = []
    for parent_name, parent in model.named_modules():
        if id(parent) in backbone_modules or isinstance(parent, QuantModule):
            continue
        for child_name, child in parent.named_children():
            if type(child) in (nn.Conv2d, nn.Linear):
                targets.append((parent_name, parent, child_name, child))
    for parent_name, parent, child_name, child in targets:
        wrapper_cls = QuantConv2d if isinstance(child, nn.Conv2d) else QuantLinear
        wrapped = wrapper_cls.from_float(child, Role.OTHER, InputKind.GENERIC)
        setattr(parent, child_name, wrapped)
        name = f"{parent_name}.{child_name}" if parent_name else child_name
        # Not tunable: RPN/RoI heads see each model's own proposals, so their inputs have no float
        # counterpart row by row; reconstruction methods only calibrate the neck and heads.
        sites.append(Site(name, wrapped, wrapped.role, wrapped.input_kinds, None, tunable=False))


def adapt_mmdet_swin(model: nn.Module, backbone_only: bool = False) -> CanonicalModel:
    """Rewrite an mmdet Swin backbone (or a detector on one) in place and return it in canonical form.

    ``backbone_only`` keeps the neck and heads float (the default quantizes the whole detector).
    """
    backbone = _backbone_of(model)
    if backbone is None:
        raise _unsupported(model, "it is neither an mmdet SwinTransformer nor a detector with one as backbone")
    _check_supported(model, backbone)
    prefix = "backbone." if backbone is not model else ""

    def site(name: str, module: QuantModule, block: int | None = None) -> Site:
        return Site(prefix + name, module, module.role, module.input_kinds, block)

    sites: list[Site] = []
    blocks: list[BlockSites] = []
    pairs: list[LayerNormPair] = []

    embed = backbone.patch_embed
    embed.projection = QuantConv2d.from_float(embed.projection, Role.PATCH_EMBED, InputKind.IMAGE)
    sites.append(site("patch_embed.projection", embed.projection))

    index = 0
    for stage_index, stage in enumerate(backbone.stages):
        for block_index, block in enumerate(stage.blocks):
            name = f"stages.{stage_index}.blocks.{block_index}"
            msa = CanonicalWindowMSA(block.attn.w_msa)
            block.attn.w_msa = msa
            layers = block.ffn.layers
            layers[0][0] = QuantLinear.from_float(layers[0][0], Role.FC1, InputKind.POST_LAYERNORM)
            layers[1] = QuantLinear.from_float(layers[1], Role.FC2, _fc2_input_kind(layers))
            block_sites = [
                site(f"{name}.attn.w_msa.qkv", msa.qkv, index),
                site(f"{name}.attn.w_msa.matmul_qk", msa.matmul_qk, index),
                site(f"{name}.attn.w_msa.matmul_av", msa.matmul_av, index),
                site(f"{name}.attn.w_msa.proj", msa.proj, index),
                site(f"{name}.ffn.layers.0.0", layers[0][0], index),
                site(f"{name}.ffn.layers.1", layers[1], index),
            ]
            sites += block_sites
            blocks.append(BlockSites(index, block, attention=block.attn, mlp=layers, sites=block_sites))
            if isinstance(block.norm1, nn.LayerNorm):
                pairs.append(LayerNormPair(block.norm1, [msa.qkv]))
            if isinstance(block.norm2, nn.LayerNorm):
                pairs.append(LayerNormPair(block.norm2, [layers[0][0]]))
            index += 1
        down = stage.downsample
        if down is not None:
            down.reduction = QuantLinear.from_float(down.reduction, Role.REDUCTION, InputKind.POST_LAYERNORM)
            sites.append(site(f"stages.{stage_index}.downsample.reduction", down.reduction))
            if isinstance(down.norm, nn.LayerNorm):
                pairs.append(LayerNormPair(down.norm, [down.reduction]))

    if backbone is not model and not backbone_only:
        _wrap_neck_and_heads(model, backbone, sites)
    # Detection images keep their aspect ratio, so token counts differ from image to image.
    return CanonicalModel(model, family=FAMILY, sites=sites, blocks=blocks, layernorm_pairs=pairs,
                          fixed_token_count=False)
