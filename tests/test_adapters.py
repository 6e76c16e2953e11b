"""Adapters: every family's canonical rewrite keeps the float output and tags sites correctly.

Each family is one :class:`Case` in :data:`CASES`: a factory for a random-weight model, the family
the registry must pick, and the roles and input kinds its sites must carry. Adding a family means
adding entries there; every test below runs on every entry.

Weights are re-drawn at fan-in scale (timm's 0.02-std init makes attention almost uniform and
DINOv2's 1e-5 layer scale makes blocks almost no-ops, either of which would hide a wrong rewrite).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import timm
import torch
from timm.layers.attention import Attention
from timm.layers.mlp import SwiGLU
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import ResPostBlock, VisionTransformer
from torch import nn

from benchsuite.errors import BenchsuiteError
from benchsuite.quant.adapters import UnsupportedModelError, adapt, registered_adapters
from benchsuite.quant.adapters.timm_vit import CanonicalAttention
from benchsuite.quant.calibration import iter_quantizers, observe
from benchsuite.quant.canonical import CanonicalModel, InputKind, Role
from benchsuite.quant.modules import QuantConv2d, QuantLinear, QuantModule
from benchsuite.quant.quantizers import UniformQuantizer

K = InputKind


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fan-in-scaled random weights, so attention is peaked and every block matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim >= 2:
                param.copy_(noise / math.sqrt(param[0].numel()))
            elif name.endswith("gamma"):  # layer scale
                param.copy_(0.5 + 0.25 * noise.tanh())
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.1 * noise)
    return model.eval()


def vit_roles(depth: int, fc1_per_block: int = 1, heads: int = 1, gate: bool = False) -> list[Role]:
    """Expected site roles of a timm ViT, in execution order."""
    block = [Role.OTHER] if gate else []
    block += [Role.QKV, Role.MATMUL_QK, Role.MATMUL_AV, Role.PROJ] + [Role.FC1] * fc1_per_block + [Role.FC2]
    return [Role.PATCH_EMBED] + block * depth + [Role.HEAD] * heads


VIT_KINDS: dict[Role, tuple[InputKind, ...]] = {
    Role.PATCH_EMBED: (K.IMAGE,),
    Role.QKV: (K.POST_LAYERNORM,),
    Role.MATMUL_QK: (K.GENERIC, K.GENERIC),
    Role.MATMUL_AV: (K.POST_SOFTMAX, K.GENERIC),
    Role.PROJ: (K.GENERIC,),
    Role.FC1: (K.POST_LAYERNORM,),
    Role.FC2: (K.POST_GELU,),
    Role.HEAD: (K.POST_LAYERNORM,),
}


@dataclass(frozen=True)
class Case:
    """One model of one family, and what its canonical form must look like."""

    id: str
    factory: Callable[[], nn.Module]
    family: str
    depth: int
    roles: list[Role]
    kinds: dict[Role, tuple[InputKind, ...]]
    input_shape: tuple[int, ...] = (2, 3, 224, 224)
    #: Norm → reading-linear pairs per block (RepQ-ViT's norm1→qkv and norm2→fc1).
    pairs_per_block: int = 2


def _tiny_vit(cls: type[VisionTransformer] = VisionTransformer, **kwargs) -> Callable[[], nn.Module]:
    base = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    return lambda: cls(**{**base, **kwargs})


def _with_gated_attention(model: VisionTransformer) -> VisionTransformer:
    """Swap in timm Attention with qk-norm, an inner norm and a sigmoid gate (timm 1.0.31)."""
    for block in model.blocks:
        dim = block.norm1.normalized_shape[0]
        block.attn = Attention(
            dim, num_heads=2, qkv_bias=True, qk_norm=True, scale_norm=True, gated=True,
            norm_layer=nn.LayerNorm,
        )
    return model


CASES: list[Case] = [
    Case(
        "vit_small_patch16_224",
        lambda: timm.create_model("vit_small_patch16_224", pretrained=False),
        "timm_vit", 12, vit_roles(12), VIT_KINDS,
    ),
    Case(
        "deit_tiny_patch16_224",
        lambda: timm.create_model("deit_tiny_patch16_224", pretrained=False),
        "timm_vit", 12, vit_roles(12), VIT_KINDS,
    ),
    Case(  # layer scale, no classifier head (num_classes=0)
        "vit_small_patch14_dinov2",
        lambda: timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=224),
        "timm_vit", 12, vit_roles(12, heads=0), VIT_KINDS,
    ),
    Case(  # DeiT distillation head after the class head
        "tiny_deit_distilled",
        _tiny_vit(VisionTransformerDistilled),
        "timm_vit", 2, vit_roles(2, heads=2), VIT_KINDS, input_shape=(2, 3, 32, 32),
    ),
    Case(  # SwiGLU MLP (fc2 reads a gated product), qk-norm, gated attention with inner norm, avg pool
        "tiny_vit_swiglu_gated",
        lambda: _with_gated_attention(
            _tiny_vit(mlp_layer=SwiGLU, global_pool="avg", reg_tokens=2, init_values=1e-5)()
        ),
        "timm_vit", 2, vit_roles(2, fc1_per_block=2, gate=True),
        {**VIT_KINDS, Role.OTHER: (K.POST_LAYERNORM,), Role.FC2: (K.GENERIC,)},
        input_shape=(2, 3, 32, 32),
    ),
]


@pytest.fixture(scope="module", params=CASES, ids=[case.id for case in CASES])
def reference(request) -> tuple[Case, nn.Module, torch.Tensor, torch.Tensor]:
    """(case, pristine float model, input batch, float output), built once per case."""
    case: Case = request.param
    torch.manual_seed(0)
    model = randomize(case.factory())
    images = torch.randn(case.input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(images)
    return case, model, images, expected


@pytest.fixture(scope="module")
def adapted(reference) -> tuple[Case, CanonicalModel]:
    """The case's model adapted once, shared by the read-only tests."""
    case, model, _, _ = reference
    return case, adapt(copy.deepcopy(model))


def test_float_output_unchanged(reference, adapted) -> None:
    case, _, images, expected = reference
    _, canonical = adapted
    assert canonical.family == case.family
    with torch.no_grad():
        output = canonical(images)
    assert (output - expected).abs().max().item() <= 1e-5


def test_sites_roles_and_input_kinds(adapted) -> None:
    case, canonical = adapted
    sites = canonical.sites()
    assert [site.role for site in sites] == case.roles
    for site in sites:
        assert site.input_kinds == case.kinds[site.role], site.name
        assert site.module.role == site.role and site.module.input_kinds == site.input_kinds
    modules = dict(canonical.model.named_modules())
    assert all(modules[site.name] is site.module for site in sites)
    # Every quantizable op is a site: no float Linear/Conv2d and no unregistered wrapper remains.
    site_modules = {id(site.module) for site in sites}
    for name, module in canonical.model.named_modules():
        assert not (type(module) in (nn.Linear, nn.Conv2d)), f"{name} left in float"
        if isinstance(module, QuantModule):
            assert id(module) in site_modules, f"{name} is a wrapper but not a site"


def test_blocks_and_layernorm_pairs(adapted) -> None:
    case, canonical = adapted
    blocks = list(canonical.blocks())
    assert [b.index for b in blocks] == list(range(case.depth))
    in_blocks = [site for site in canonical.sites() if site.block is not None]
    assert [s for b in blocks for s in b.sites] == in_blocks
    for block in blocks:
        assert all(site.block == block.index for site in block.sites)
        owned = {id(m) for m in block.module.modules()}
        assert {id(block.attention), id(block.mlp)} <= owned
        assert all(id(site.module) in owned for site in block.sites)
        # The post-softmax map is a visible module output (methods hook it; no fused SDPA).
        assert any(isinstance(m, nn.Softmax) for m in block.attention.modules())
        attention_modules = {id(m) for m in block.attention.modules()}
        assert {site.role for site in block.sites if id(site.module) in attention_modules} >= {
            Role.QKV, Role.MATMUL_QK, Role.MATMUL_AV, Role.PROJ,
        }

    pairs = list(canonical.layernorm_pairs())
    assert len(pairs) == case.pairs_per_block * case.depth
    post_ln = {id(s.module) for s in canonical.sites() if s.input_kind is K.POST_LAYERNORM}
    for pair in pairs:
        assert isinstance(pair.norm, nn.LayerNorm) and pair.linears
        assert all(id(linear) in post_ln for linear in pair.linears)
    head_ids = {id(s.module) for s in canonical.sites_by_role(Role.HEAD)}
    assert not any(id(linear) in head_ids for pair in pairs for linear in pair.linears)


def test_quantized_smoke(reference) -> None:
    case, model, images, expected = reference
    canonical = adapt(copy.deepcopy(model))
    for site in canonical.sites():
        for index in range(len(site.input_kinds)):
            site.module.set_input_quantizer(index, UniformQuantizer(8))
        if isinstance(site.module, (QuantLinear, QuantConv2d)):
            site.module.set_weight_quantizer(UniformQuantizer(8, granularity="channel", channel_dim=0))
    quantizers = list(iter_quantizers(canonical))
    observe(canonical, quantizers, [images])
    assert all(q.initialized and not q.observing for q in quantizers)
    with torch.no_grad():
        output = canonical(images)
    assert torch.isfinite(output).all()
    assert not torch.equal(output, expected)


# --------------------------------------------------------------------------------------------
# Registry errors
# --------------------------------------------------------------------------------------------


def test_registry_lists_builtin_families() -> None:
    assert {case.family for case in CASES} <= {entry.name for entry in registered_adapters()}


def test_rejects_model_of_no_family() -> None:
    with pytest.raises(BenchsuiteError) as raised:
        adapt(nn.Sequential(nn.Linear(4, 4)))
    message = str(raised.value)
    assert "Sequential" in message and "timm_vit" in message
    assert isinstance(raised.value, UnsupportedModelError)


def test_rejects_vit_with_unknown_block() -> None:
    model = _tiny_vit(block_fn=ResPostBlock)()
    with pytest.raises(UnsupportedModelError, match="ResPostBlock"):
        adapt(model)


def test_adapt_returns_canonical_model_as_is_and_refuses_readapting() -> None:
    canonical = adapt(_tiny_vit()())
    assert adapt(canonical) is canonical
    with pytest.raises(UnsupportedModelError, match="already adapted"):
        adapt(canonical.model)


# --------------------------------------------------------------------------------------------
# Attention with masks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "eager"])
@pytest.mark.parametrize("mask", ["none", "bool", "float", "causal"])
def test_canonical_attention_matches_timm(fused: bool, mask: str) -> None:
    torch.manual_seed(0)
    attn = randomize(Attention(32, num_heads=4, qkv_bias=True, qk_norm=True, norm_layer=nn.LayerNorm))
    attn.fused_attn = fused
    x = torch.randn(2, 7, 32)
    kwargs: dict[str, object] = {}
    if mask == "bool":
        keep = torch.rand(2, 1, 7, 7) > 0.3
        keep[..., 0] = True  # every query sees at least one key
        kwargs["attn_mask"] = keep
    elif mask == "float":
        kwargs["attn_mask"] = torch.randn(2, 4, 7, 7)
    elif mask == "causal":
        kwargs["is_causal"] = True
    with torch.no_grad():
        expected = attn(x, **kwargs)
        actual = CanonicalAttention.from_timm(copy.deepcopy(attn))(x, **kwargs)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
