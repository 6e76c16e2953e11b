"""Adapter for timm's ``VisionTransformer`` (ViT, DeiT, DINOv2 and other timm 1.x variants).

The model is rewritten in place:

- every block's timm ``Attention`` becomes a :class:`CanonicalAttention` with the two attention
  matmuls as :class:`~benchsuite.quant.modules.QuantMatMul` sites and the softmax as a visible
  ``nn.Softmax`` module (never the fused ``scaled_dot_product_attention``);
- ``qkv``, ``proj``, the MLP linears, the patch-embedding conv and the classifier head become
  :class:`~benchsuite.quant.modules.QuantLinear` / :class:`~benchsuite.quant.modules.QuantConv2d`
  sharing the original Parameters;
- layer scale, class/register tokens, position embeddings and norms are untouched.

Only structures whose forward the adapter knows are accepted: timm's pre-norm ``Block`` with
``Attention`` and an ``Mlp`` / ``GluMlp`` / ``SwiGLU`` MLP, a conv ``PatchEmbed``, and no attention
pooling. Anything else raises :class:`~benchsuite.quant.adapters.UnsupportedModelError`, because
leaving an unknown op in float would overstate a method's accuracy without saying so.

Known limits: ``layernorm_pairs()`` lists only ``nn.LayerNorm`` norms (an RMSNorm model has no
pairs), and only norm1→(qkv) and norm2→(fc1) per block, as RepQ-ViT reparameterizes; the final
norm feeding the head and the optional inner norms of attention and MLP are not paired.
"""

from __future__ import annotations

import torch
from timm.layers import activations as timm_activations
from timm.layers.attention import Attention
from timm.layers.mlp import GluMlp, Mlp, SwiGLU
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from benchsuite.quant.adapters import UnsupportedModelError
from benchsuite.quant.adapters.checks import check_fresh_conv_embedding, unsupported
from benchsuite.quant.canonical import BlockSites, CanonicalModel, InputKind, LayerNormPair, Role, Site
from benchsuite.quant.modules import QuantConv2d, QuantLinear, QuantMatMul, QuantModule

__all__ = ["FAMILY", "CanonicalAttention", "adapt_timm_vit", "attention_bias", "is_timm_vit"]

FAMILY = "timm_vit"

_GELU_TYPES: tuple[type[nn.Module], ...] = (nn.GELU,) + tuple(
    getattr(timm_activations, name)
    for name in ("GELU", "GELUTanh", "QuickGELU")
    if hasattr(timm_activations, name)
)
_MLP_TYPES = (Mlp, GluMlp, SwiGLU)
#: Linears of an MLP that read its input, in the order the MLP's forward calls them.
_MLP_INPUT_LINEARS = ("fc1_g", "fc1_x", "fc1")


def is_timm_vit(model: nn.Module) -> bool:
    """The registry predicate: any timm ``VisionTransformer`` (DeiT-distilled included)."""
    return isinstance(model, VisionTransformer)


def attention_bias(
    scores: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool
) -> torch.Tensor | None:
    """The additive bias that ``scaled_dot_product_attention`` would apply to ``scores``.

    A boolean mask marks positions that may be attended (True) as SDPA does; a float mask is
    added as is; ``is_causal`` takes precedence, as in timm.
    """
    if is_causal:
        # Top-left aligned, like SDPA's is_causal and timm's eager path.
        return scores.new_full(scores.shape[-2:], float("-inf")).triu_(1)
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        return torch.zeros_like(attn_mask, dtype=scores.dtype).masked_fill_(~attn_mask, float("-inf"))
    return attn_mask


def _is_identity(module: nn.Module) -> bool:
    return isinstance(module, nn.Identity)


class CanonicalAttention(nn.Module):
    """timm ``Attention`` with every op explicit, in ViT's order.

    ``softmax(matmul_qk(q, kᵀ) · scale + mask) → matmul_av(·, v)``. The scale multiplies *after*
    ``matmul_qk`` (as in the ViT/DeiT reference code that RepQ-ViT and its successors quantize),
    so the Q and K quantizers see unscaled values; timm's own eager path scales q first, which is
    equal in float but not once q is quantized.
    """

    def __init__(
        self,
        qkv: QuantLinear,
        proj: QuantLinear,
        num_heads: int,
        head_dim: int,
        scale: float,
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
        norm: nn.Module | None = None,
        gate: QuantLinear | None = None,
        attn_drop: nn.Module | None = None,
        proj_drop: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = scale
        self.qkv = qkv
        self.q_norm = q_norm if q_norm is not None else nn.Identity()
        self.k_norm = k_norm if k_norm is not None else nn.Identity()
        self.matmul_qk = QuantMatMul(Role.MATMUL_QK, (InputKind.GENERIC, InputKind.GENERIC))
        self.softmax = nn.Softmax(dim=-1)
        self.attn_drop = attn_drop if attn_drop is not None else nn.Identity()
        self.matmul_av = QuantMatMul(Role.MATMUL_AV, (InputKind.POST_SOFTMAX, InputKind.GENERIC))
        self.norm = norm if norm is not None else nn.Identity()
        self.gate = gate
        self.proj = proj
        self.proj_drop = proj_drop if proj_drop is not None else nn.Identity()

    @classmethod
    def from_timm(cls, attn: Attention) -> CanonicalAttention:
        """Rebuild ``attn`` around its own submodules and Parameters (nothing is copied)."""
        norm = getattr(attn, "norm", None)
        gate = getattr(attn, "gate", None)
        has_norm = norm is not None and not _is_identity(norm)
        # proj reads norm(x) (· gate): post-LayerNorm only when nothing multiplies after the norm.
        proj_kind = InputKind.POST_LAYERNORM if has_norm and gate is None else InputKind.GENERIC
        canonical = cls(
            qkv=QuantLinear.from_float(attn.qkv, Role.QKV, InputKind.POST_LAYERNORM),
            proj=QuantLinear.from_float(attn.proj, Role.PROJ, proj_kind),
            num_heads=attn.num_heads,
            head_dim=attn.head_dim,
            scale=attn.scale,
            q_norm=attn.q_norm,
            k_norm=attn.k_norm,
            norm=norm,
            gate=None if gate is None else QuantLinear.from_float(gate, Role.OTHER, InputKind.POST_LAYERNORM),
            attn_drop=attn.attn_drop,
            proj_drop=attn.proj_drop,
        )
        canonical.train(attn.training)
        return canonical

    def input_linears(self) -> list[QuantLinear]:
        """The linears reading this attention's input, in execution order (gate, then qkv)."""
        return [self.qkv] if self.gate is None else [self.gate, self.qkv]

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        batch, tokens, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)

        scores = self.matmul_qk(q, k.transpose(-2, -1)) * self.scale
        bias = attention_bias(scores, attn_mask, is_causal)
        if bias is not None:
            scores = scores + bias
        probs = self.attn_drop(self.softmax(scores))
        x = self.matmul_av(probs, v)

        x = x.transpose(1, 2).reshape(batch, tokens, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def _unsupported(model: nn.Module, why: str) -> UnsupportedModelError:
    return unsupported(FAMILY, model, why)


def _check_supported(model: VisionTransformer) -> None:
    """Refuse structures whose forward this adapter does not reproduce."""
    check_fresh_conv_embedding(FAMILY, model)
    if getattr(model, "attn_pool", None) is not None:
        raise _unsupported(model, "attention pooling heads are not supported")
    problems: set[str] = set()
    for block in model.blocks:
        if type(block) is not Block:
            problems.add(f"block {type(block).__name__}")
            continue
        if type(block.attn) is not Attention:
            problems.add(f"attention {type(block.attn).__name__}")
        if type(block.mlp) not in _MLP_TYPES:
            problems.add(f"MLP {type(block.mlp).__name__}")
        elif not all(
            isinstance(getattr(block.mlp, name), nn.Linear)
            for name in (*_mlp_input_names(block.mlp), "fc2")
        ):
            problems.add(f"MLP {type(block.mlp).__name__} with non-Linear layers")
    if problems:
        raise _unsupported(
            model,
            f"unsupported {', '.join(sorted(problems))} (supported: timm Block with Attention and "
            f"Mlp/GluMlp/SwiGLU)",
        )


def _mlp_input_names(mlp: nn.Module) -> list[str]:
    return [name for name in _MLP_INPUT_LINEARS if hasattr(mlp, name)]


def _fc2_input_kind(mlp: nn.Module) -> InputKind:
    """What fc2 reads: GELU output for a plain GELU MLP, a norm's output, or anything else."""
    if not _is_identity(getattr(mlp, "norm", nn.Identity())):
        return InputKind.POST_LAYERNORM
    if type(mlp) is Mlp and isinstance(mlp.act, _GELU_TYPES):
        return InputKind.POST_GELU
    return InputKind.GENERIC  # gated MLPs (SwiGLU, GeGLU): act(gate) · x is not a GELU output


def _wrap_mlp(mlp: nn.Module) -> list[tuple[str, QuantLinear]]:
    """Replace the MLP's linears in place; returns (attribute, wrapper) in execution order."""
    wrapped: list[tuple[str, QuantLinear]] = []
    for name in _mlp_input_names(mlp):
        setattr(mlp, name, QuantLinear.from_float(getattr(mlp, name), Role.FC1, InputKind.POST_LAYERNORM))
        wrapped.append((name, getattr(mlp, name)))
    mlp.fc2 = QuantLinear.from_float(mlp.fc2, Role.FC2, _fc2_input_kind(mlp))
    wrapped.append(("fc2", mlp.fc2))
    return wrapped


def _head_input_kind(model: VisionTransformer) -> InputKind:
    """The head reads (pooled) final-norm output unless both final norms are absent."""
    if _is_identity(model.fc_norm) and _is_identity(model.norm):
        return InputKind.GENERIC
    return InputKind.POST_LAYERNORM


def adapt_timm_vit(model: nn.Module) -> CanonicalModel:
    """Rewrite a timm ``VisionTransformer`` in place and return it in canonical form."""
    if not isinstance(model, VisionTransformer):
        raise _unsupported(model, "it is not a timm VisionTransformer")
    _check_supported(model)

    def site(name: str, module: QuantModule, block: int | None = None) -> Site:
        return Site(name, module, module.role, module.input_kinds, block)

    sites: list[Site] = []
    model.patch_embed.proj = QuantConv2d.from_float(model.patch_embed.proj, Role.PATCH_EMBED, InputKind.IMAGE)
    sites.append(site("patch_embed.proj", model.patch_embed.proj))

    blocks: list[BlockSites] = []
    pairs: list[LayerNormPair] = []
    for index, block in enumerate(model.blocks):
        prefix = f"blocks.{index}"
        attn = CanonicalAttention.from_timm(block.attn)
        block.attn = attn
        block_sites = []
        if attn.gate is not None:
            block_sites.append(site(f"{prefix}.attn.gate", attn.gate, index))
        block_sites += [
            site(f"{prefix}.attn.qkv", attn.qkv, index),
            site(f"{prefix}.attn.matmul_qk", attn.matmul_qk, index),
            site(f"{prefix}.attn.matmul_av", attn.matmul_av, index),
            site(f"{prefix}.attn.proj", attn.proj, index),
        ]
        mlp_linears = _wrap_mlp(block.mlp)
        block_sites += [site(f"{prefix}.mlp.{name}", module, index) for name, module in mlp_linears]
        sites += block_sites
        blocks.append(BlockSites(index, block, attention=attn, mlp=block.mlp, sites=block_sites))

        mlp_inputs = [module for name, module in mlp_linears if name != "fc2"]
        for norm, linears in ((block.norm1, attn.input_linears()), (block.norm2, mlp_inputs)):
            if isinstance(norm, nn.LayerNorm):
                pairs.append(LayerNormPair(norm, list(linears)))

    head_kind = _head_input_kind(model)
    for name in ("head", "head_dist"):  # head_dist: DeiT's distillation head, run after head
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            setattr(model, name, QuantLinear.from_float(head, Role.HEAD, head_kind))
            sites.append(site(name, getattr(model, name)))

    return CanonicalModel(model, family=FAMILY, sites=sites, blocks=blocks, layernorm_pairs=pairs)
