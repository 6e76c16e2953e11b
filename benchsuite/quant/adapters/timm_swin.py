"""Adapter for timm 1.x ``SwinTransformer`` (Swin-T/S/B/L, S3 variants), channels-last (NHWC).

The model is rewritten in place:

- every block's timm ``WindowAttention`` becomes a :class:`CanonicalWindowAttention` with the two
  attention matmuls as :class:`~benchsuite.quant.modules.QuantMatMul` sites and the softmax as a
  visible ``nn.Softmax`` module (never the fused ``scaled_dot_product_attention``);
- ``qkv``, ``proj``, the MLP linears, each ``PatchMerging.reduction``, the patch-embedding conv and
  the classifier head's ``fc`` become :class:`~benchsuite.quant.modules.QuantLinear` /
  :class:`~benchsuite.quant.modules.QuantConv2d` sharing the original Parameters;
- norms, the relative position bias tables (shared, not copied), the shift masks, window
  partitioning, cyclic shifts and pooling are untouched: the blocks still do all of that.

Execution order in timm 1.x: ``patch_embed`` → for each stage, its ``PatchMerging`` *first*
(stages 1..n; timm moved downsampling to the start of the next stage) and then its blocks →
final norm → pooled head. Sites, blocks and LayerNorm pairs are listed in that order.

Activations are channels-last: ``reduction`` reads a 4-D ``(B, H/2, W/2, 4C)`` tensor, ``qkv`` a
``(B · windows, N, C)`` one, ``fc1``/``fc2`` ``(B, H·W, C)``; a per-channel activation quantizer must
use the last dim.

Only structures whose forward the adapter knows are accepted (timm ``PatchEmbed`` with a conv,
``SwinTransformerStage`` of ``SwinTransformerBlock`` with ``WindowAttention`` and ``Mlp``,
``PatchMerging`` or no downsampling, a ``ClassifierHead`` with a linear or no ``fc``). Anything else
raises :class:`~benchsuite.quant.adapters.UnsupportedModelError`. Swin V2 is a different class and
is not accepted.
"""

from __future__ import annotations

import torch
from timm.layers import ClassifierHead
from timm.layers import activations as timm_activations
from timm.layers.mlp import Mlp
from timm.models.swin_transformer import (
    PatchMerging,
    SwinTransformer,
    SwinTransformerBlock,
    SwinTransformerStage,
    WindowAttention,
)
from torch import nn

from benchsuite.quant.adapters import UnsupportedModelError
from benchsuite.quant.adapters.checks import check_fresh_conv_embedding, unsupported
from benchsuite.quant.canonical import BlockSites, CanonicalModel, InputKind, LayerNormPair, Role, Site
from benchsuite.quant.modules import QuantConv2d, QuantLinear, QuantMatMul, QuantModule

__all__ = ["FAMILY", "CanonicalWindowAttention", "adapt_timm_swin", "is_timm_swin"]

FAMILY = "timm_swin"

_GELU_TYPES: tuple[type[nn.Module], ...] = (nn.GELU,) + tuple(
    getattr(timm_activations, name)
    for name in ("GELU", "GELUTanh", "QuickGELU")
    if hasattr(timm_activations, name)
)


def is_timm_swin(model: nn.Module) -> bool:
    """The registry predicate: any timm (V1) ``SwinTransformer``."""
    return isinstance(model, SwinTransformer)


class CanonicalWindowAttention(nn.Module):
    """timm ``WindowAttention`` with every op explicit, in Swin's order.

    ``softmax(matmul_qk(q · scale, kᵀ) + relative position bias + shift mask) → matmul_av(·, v)``.
    q is scaled *before* ``matmul_qk`` (as in the Swin reference code that RepQ-ViT quantizes and
    in timm's eager path), so the Q quantizer sees scaled values; this differs from ViT's order.

    The shift mask is what the block passes: ``(num_windows, N, N)`` with 0 / -100 entries, added
    per window to scores laid out as ``(batch · num_windows, heads, N, N)`` (batch-major), exactly
    as timm does. The relative position bias table is the original Parameter.
    """

    def __init__(
        self,
        qkv: QuantLinear,
        proj: QuantLinear,
        relative_position_bias_table: nn.Parameter,
        relative_position_index: torch.Tensor,
        window_size: tuple[int, int],
        num_heads: int,
        head_dim: int,
        scale: float,
        attn_drop: nn.Module | None = None,
        proj_drop: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.dim = qkv.in_features
        self.window_size = tuple(window_size)
        self.window_area = self.window_size[0] * self.window_size[1]
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = scale
        self.relative_position_bias_table = relative_position_bias_table
        self.register_buffer("relative_position_index", relative_position_index, persistent=False)
        self.qkv = qkv
        self.matmul_qk = QuantMatMul(Role.MATMUL_QK, (InputKind.GENERIC, InputKind.GENERIC))
        self.softmax = nn.Softmax(dim=-1)
        self.attn_drop = attn_drop if attn_drop is not None else nn.Identity()
        self.matmul_av = QuantMatMul(Role.MATMUL_AV, (InputKind.POST_SOFTMAX, InputKind.GENERIC))
        self.proj = proj
        self.proj_drop = proj_drop if proj_drop is not None else nn.Identity()

    @classmethod
    def from_timm(cls, attn: WindowAttention) -> CanonicalWindowAttention:
        """Rebuild ``attn`` around its own submodules, Parameters and buffers (nothing is copied)."""
        attn_dim = attn.qkv.out_features // 3
        canonical = cls(
            qkv=QuantLinear.from_float(attn.qkv, Role.QKV, InputKind.POST_LAYERNORM),
            proj=QuantLinear.from_float(attn.proj, Role.PROJ, InputKind.GENERIC),
            relative_position_bias_table=attn.relative_position_bias_table,
            relative_position_index=attn.relative_position_index,
            window_size=attn.window_size,
            num_heads=attn.num_heads,
            head_dim=attn_dim // attn.num_heads,
            scale=attn.scale,
            attn_drop=attn.attn_drop,
            proj_drop=attn.proj_drop,
        )
        canonical.train(attn.training)
        return canonical

    def relative_position_bias(self) -> torch.Tensor:
        """The bias added to every window's scores, shape ``(1, heads, N, N)`` (as timm builds it)."""
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(self.window_area, self.window_area, -1).permute(2, 0, 1).contiguous()
        return bias.unsqueeze(0)

    # timm's SwinTransformerBlock.set_input_size calls attn.set_window_size, and meta-device
    # materialization calls init_non_persistent_buffers; timm's own implementations only touch
    # attributes this class shares with WindowAttention, so they are reused as is.
    set_window_size = WindowAttention.set_window_size
    _init_buffers = WindowAttention._init_buffers
    init_non_persistent_buffers = WindowAttention.init_non_persistent_buffers

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        windows_batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(windows_batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)

        q = q * self.scale
        scores = self.matmul_qk(q, k.transpose(-2, -1))
        scores = scores + self.relative_position_bias()
        if mask is not None:
            num_windows = mask.shape[0]
            scores = scores.view(-1, num_windows, self.num_heads, tokens, tokens)
            scores = (scores + mask.unsqueeze(1).unsqueeze(0)).view(-1, self.num_heads, tokens, tokens)
        probs = self.attn_drop(self.softmax(scores))
        x = self.matmul_av(probs, v)

        x = x.transpose(1, 2).reshape(windows_batch, tokens, -1)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}"


def _unsupported(model: nn.Module, why: str) -> UnsupportedModelError:
    return unsupported(FAMILY, model, why)


def _check_supported(model: SwinTransformer) -> None:
    """Refuse structures whose forward this adapter does not reproduce."""
    check_fresh_conv_embedding(FAMILY, model)
    head = model.head
    if not isinstance(head, ClassifierHead) or not isinstance(head.fc, (nn.Linear, nn.Identity)):
        raise _unsupported(model, "the head is not a timm ClassifierHead with a Linear (or no) fc")
    problems: set[str] = set()
    for stage in model.layers:
        if type(stage) is not SwinTransformerStage:
            problems.add(f"stage {type(stage).__name__}")
            continue
        down = stage.downsample
        if not isinstance(down, nn.Identity) and (
            type(down) is not PatchMerging or not isinstance(down.reduction, nn.Linear)
        ):
            problems.add(f"downsample {type(down).__name__}")
        for block in stage.blocks:
            if type(block) is not SwinTransformerBlock:
                problems.add(f"block {type(block).__name__}")
                continue
            if type(block.attn) is not WindowAttention:
                problems.add(f"attention {type(block.attn).__name__}")
            mlp = block.mlp
            linears = (getattr(mlp, "fc1", None), getattr(mlp, "fc2", None))
            if type(mlp) is not Mlp or not all(isinstance(linear, nn.Linear) for linear in linears):
                problems.add(f"MLP {type(mlp).__name__}")
    if problems:
        raise _unsupported(
            model,
            f"unsupported {', '.join(sorted(problems))} (supported: SwinTransformerStage of "
            f"SwinTransformerBlock with WindowAttention and a Linear Mlp, PatchMerging)",
        )


def _fc2_input_kind(mlp: Mlp) -> InputKind:
    """What fc2 reads: a norm's output, a GELU's output, or anything else."""
    if not isinstance(mlp.norm, nn.Identity):
        return InputKind.POST_LAYERNORM
    if isinstance(mlp.act, _GELU_TYPES):
        return InputKind.POST_GELU
    return InputKind.GENERIC


def _head_input_kind(model: SwinTransformer) -> InputKind:
    """The head reads the pooled final-norm output (GENERIC only if that norm was removed)."""
    return InputKind.GENERIC if isinstance(model.norm, nn.Identity) else InputKind.POST_LAYERNORM


def adapt_timm_swin(model: nn.Module) -> CanonicalModel:
    """Rewrite a timm ``SwinTransformer`` in place and return it in canonical form."""
    if not isinstance(model, SwinTransformer):
        raise _unsupported(model, "it is not a timm SwinTransformer")
    _check_supported(model)

    def site(name: str, module: QuantModule, block: int | None = None) -> Site:
        return Site(name, module, module.role, module.input_kinds, block)

    def add_pair(norm: nn.Module, linears: list[nn.Module]) -> None:
        if isinstance(norm, nn.LayerNorm):
            pairs.append(LayerNormPair(norm, linears))

    sites: list[Site] = []
    blocks: list[BlockSites] = []
    pairs: list[LayerNormPair] = []

    model.patch_embed.proj = QuantConv2d.from_float(model.patch_embed.proj, Role.PATCH_EMBED, InputKind.IMAGE)
    sites.append(site("patch_embed.proj", model.patch_embed.proj))

    index = 0
    for stage_index, stage in enumerate(model.layers):
        stage_prefix = f"layers.{stage_index}"
        down = stage.downsample
        if isinstance(down, PatchMerging):  # runs before the stage's blocks
            down.reduction = QuantLinear.from_float(down.reduction, Role.REDUCTION, InputKind.POST_LAYERNORM)
            sites.append(site(f"{stage_prefix}.downsample.reduction", down.reduction))
            add_pair(down.norm, [down.reduction])

        for block_index, block in enumerate(stage.blocks):
            prefix = f"{stage_prefix}.blocks.{block_index}"
            attn = CanonicalWindowAttention.from_timm(block.attn)
            block.attn = attn
            mlp = block.mlp
            mlp.fc1 = QuantLinear.from_float(mlp.fc1, Role.FC1, InputKind.POST_LAYERNORM)
            mlp.fc2 = QuantLinear.from_float(mlp.fc2, Role.FC2, _fc2_input_kind(mlp))
            block_sites = [
                site(f"{prefix}.attn.qkv", attn.qkv, index),
                site(f"{prefix}.attn.matmul_qk", attn.matmul_qk, index),
                site(f"{prefix}.attn.matmul_av", attn.matmul_av, index),
                site(f"{prefix}.attn.proj", attn.proj, index),
                site(f"{prefix}.mlp.fc1", mlp.fc1, index),
                site(f"{prefix}.mlp.fc2", mlp.fc2, index),
            ]
            sites += block_sites
            blocks.append(
                BlockSites(
                    index,
                    block,
                    attention=attn,
                    mlp=mlp,
                    sites=block_sites,
                    attention_entry=(block.norm1, True),
                    attention_call="_attn",
                )
            )
            add_pair(block.norm1, [attn.qkv])
            add_pair(block.norm2, [mlp.fc1])
            index += 1

    if isinstance(model.head.fc, nn.Linear):
        model.head.fc = QuantLinear.from_float(model.head.fc, Role.HEAD, _head_input_kind(model))
        sites.append(site("head.fc", model.head.fc))

    return CanonicalModel(model, family=FAMILY, sites=sites, blocks=blocks, layernorm_pairs=pairs)
