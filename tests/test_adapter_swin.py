"""The timm Swin adapter: float output kept, sites tagged, masks and Swin's scale order honoured.

Swin does not fit :data:`test_adapters.CASES`: its LayerNorm pairs are not a fixed number per
block (each ``PatchMerging`` adds one) and it has ``reduction`` sites outside blocks. The checks
mirror that table's tests, plus Swin-only ones (shift mask, scale before ``matmul_qk``, resizing).

Weights are re-drawn at fan-in scale as in ``test_adapters`` and the relative position bias tables
get unit-scale random values, so a wrong bias index or a wrongly laid out shift mask shows up in
the output (timm initializes the tables near zero). Batch 2 where affordable: with batch 1 a
window-major vs batch-major mask layout cannot be told apart.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import timm
import torch
from test_adapters import randomize
from timm.models.swin_transformer import PatchMerging, SwinTransformer, WindowAttention
from torch import nn

from benchsuite.quant.adapters import UnsupportedModelError, adapt, registered_adapters
from benchsuite.quant.adapters.timm_swin import CanonicalWindowAttention
from benchsuite.quant.calibration import iter_quantizers, observe
from benchsuite.quant.canonical import CanonicalModel, InputKind, Role
from benchsuite.quant.modules import QuantConv2d, QuantLinear, QuantModule
from benchsuite.quant.quantizers import UniformQuantizer

K = InputKind

SWIN_KINDS: dict[Role, tuple[InputKind, ...]] = {
    Role.PATCH_EMBED: (K.IMAGE,),
    Role.REDUCTION: (K.POST_LAYERNORM,),
    Role.QKV: (K.POST_LAYERNORM,),
    Role.MATMUL_QK: (K.GENERIC, K.GENERIC),
    Role.MATMUL_AV: (K.POST_SOFTMAX, K.GENERIC),
    Role.PROJ: (K.GENERIC,),
    Role.FC1: (K.POST_LAYERNORM,),
    Role.FC2: (K.POST_GELU,),
    Role.HEAD: (K.POST_LAYERNORM,),
}
BLOCK_ROLES = [Role.QKV, Role.MATMUL_QK, Role.MATMUL_AV, Role.PROJ, Role.FC1, Role.FC2]


def swin_roles(depths: tuple[int, ...], head: bool = True) -> list[Role]:
    """Expected roles in execution order: timm 1.x merges patches at the *start* of stages 1..n."""
    roles = [Role.PATCH_EMBED]
    for stage, depth in enumerate(depths):
        roles += ([Role.REDUCTION] if stage else []) + BLOCK_ROLES * depth
    return roles + ([Role.HEAD] if head else [])


def randomize_swin(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fan-in-scaled weights, and unit-scale random relative position bias tables."""
    randomize(model, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                param.copy_(torch.randn(param.shape, generator=generator))
    return model.eval()


TINY = dict(img_size=64, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=4, num_classes=10)


@dataclass(frozen=True)
class SwinCase:
    id: str
    factory: Callable[[], nn.Module]
    depths: tuple[int, ...]
    input_shape: tuple[int, ...]


CASES = [
    # 16×16 then 8×8 tokens, window 4: every odd block of both stages is shifted and masked.
    SwinCase("tiny_swin", lambda: SwinTransformer(**TINY), (2, 2), (2, 3, 64, 64)),
    # 18×18 then 9×9 tokens: window padding, and masks built per forward from the padded input.
    SwinCase(
        "tiny_swin_dynamic_padded",
        lambda: SwinTransformer(**{**TINY, "dynamic_img_size": True}),
        (2, 2),
        (2, 3, 72, 72),
    ),
    SwinCase(
        "swin_tiny_patch4_window7_224",
        lambda: timm.create_model("swin_tiny_patch4_window7_224", pretrained=False),
        (2, 2, 6, 2),
        (2, 3, 224, 224),
    ),
    SwinCase(
        "swin_small_patch4_window7_224",
        lambda: timm.create_model("swin_small_patch4_window7_224", pretrained=False),
        (2, 2, 18, 2),
        (2, 3, 224, 224),
    ),
    SwinCase(
        "swin_base_patch4_window7_224",
        lambda: timm.create_model("swin_base_patch4_window7_224", pretrained=False),
        (2, 2, 18, 2),
        (1, 3, 224, 224),
    ),
]


@pytest.fixture(scope="module", params=CASES, ids=[case.id for case in CASES])
def reference(request) -> tuple[SwinCase, nn.Module, torch.Tensor, torch.Tensor]:
    """(case, pristine float model, input batch, float output), built once per case."""
    case: SwinCase = request.param
    torch.manual_seed(0)
    model = randomize_swin(case.factory())
    images = torch.randn(case.input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(images)
    return case, model, images, expected


@pytest.fixture(scope="module")
def adapted(reference) -> tuple[SwinCase, CanonicalModel]:
    case, model, _, _ = reference
    return case, adapt(copy.deepcopy(model))


def _tiny(**kwargs) -> tuple[SwinTransformer, torch.Tensor]:
    torch.manual_seed(0)
    model = randomize_swin(SwinTransformer(**{**TINY, **kwargs}))
    return model, torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------------------------
# Every case
# --------------------------------------------------------------------------------------------


def test_float_output_unchanged(reference, adapted) -> None:
    case, _, images, expected = reference
    _, canonical = adapted
    assert canonical.family == "timm_swin"
    with torch.no_grad():
        output = canonical(images)
    assert (output - expected).abs().max().item() <= 1e-5


def test_sites_roles_and_input_kinds(adapted) -> None:
    case, canonical = adapted
    sites = canonical.sites()
    assert [site.role for site in sites] == swin_roles(case.depths)
    for site in sites:
        assert site.input_kinds == SWIN_KINDS[site.role], site.name
        assert site.module.role == site.role and site.module.input_kinds == site.input_kinds
    modules = dict(canonical.model.named_modules())
    assert all(modules[site.name] is site.module for site in sites)
    site_modules = {id(site.module) for site in sites}
    for name, module in canonical.model.named_modules():
        assert type(module) not in (nn.Linear, nn.Conv2d), f"{name} left in float"
        assert not isinstance(module, WindowAttention), f"{name} left as timm WindowAttention"
        if isinstance(module, QuantModule):
            assert id(module) in site_modules, f"{name} is a wrapper but not a site"
    # Reductions sit between stages, in no block.
    reductions = canonical.sites_by_role(Role.REDUCTION)
    assert len(reductions) == len(case.depths) - 1
    assert all(site.block is None and site.name.endswith("downsample.reduction") for site in reductions)


def test_blocks_and_layernorm_pairs(adapted) -> None:
    case, canonical = adapted
    model = canonical.model
    timm_blocks = [block for stage in model.layers for block in stage.blocks]
    blocks = list(canonical.blocks())
    assert [b.index for b in blocks] == list(range(sum(case.depths)))
    assert [b.module for b in blocks] == timm_blocks
    in_blocks = [site for site in canonical.sites() if site.block is not None]
    assert [s for b in blocks for s in b.sites] == in_blocks
    for block in blocks:
        assert block.attention is block.module.attn and block.mlp is block.module.mlp
        assert isinstance(block.attention, CanonicalWindowAttention)
        assert [s.role for s in block.sites] == BLOCK_ROLES
        assert all(site.block == block.index for site in block.sites)
        assert any(isinstance(m, nn.Softmax) for m in block.attention.modules())

    # Execution order: each stage's PatchMerging pair, then norm1→qkv, norm2→fc1 per block.
    expected = []
    for stage in model.layers:
        if isinstance(stage.downsample, PatchMerging):
            expected.append((stage.downsample.norm, [stage.downsample.reduction]))
        for block in stage.blocks:
            expected += [(block.norm1, [block.attn.qkv]), (block.norm2, [block.mlp.fc1])]
    pairs = list(canonical.layernorm_pairs())
    assert len(pairs) == 2 * len(blocks) + len(case.depths) - 1
    assert [(p.norm, p.linears) for p in pairs] == expected
    post_ln = {id(s.module) for s in canonical.sites() if s.input_kind is K.POST_LAYERNORM}
    for pair in pairs:
        assert isinstance(pair.norm, nn.LayerNorm) and pair.norm is not model.norm
        assert all(id(linear) in post_ln for linear in pair.linears)


# --------------------------------------------------------------------------------------------
# Swin specifics, on the tiny model
# --------------------------------------------------------------------------------------------


def test_registry_picks_swin() -> None:
    assert "timm_swin" in {entry.name for entry in registered_adapters()}
    model, _ = _tiny()
    assert adapt(model).family == "timm_swin"


def test_quantized_smoke() -> None:
    model, images = _tiny()
    with torch.no_grad():
        expected = model(images)
    canonical = adapt(model)
    for site in canonical.sites():
        for index in range(len(site.input_kinds)):
            site.module.set_input_quantizer(index, UniformQuantizer(8))
        if isinstance(site.module, (QuantLinear, QuantConv2d)):
            site.module.set_weight_quantizer(UniformQuantizer(8, granularity="channel", channel_dim=0))
    quantizers = list(iter_quantizers(canonical))
    assert len(quantizers) == sum(len(s.input_kinds) + s.module.has_weight for s in canonical.sites())
    observe(canonical, quantizers, [images])
    assert all(q.initialized and not q.observing for q in quantizers)
    with torch.no_grad():
        output = canonical(images)
    assert torch.isfinite(output).all()
    assert not torch.equal(output, expected)


def test_q_is_scaled_before_matmul_qk() -> None:
    """Swin's order: the Q quantizer sees q · scale (ViT's would see unscaled q)."""
    model, images = _tiny()
    canonical = adapt(model)
    attn = next(canonical.blocks()).attention
    seen: dict[str, torch.Tensor] = {}
    attn.qkv.register_forward_hook(lambda m, args, out: seen.__setitem__("qkv", out))
    attn.matmul_qk.register_forward_pre_hook(lambda m, args: seen.update(q=args[0], kt=args[1]))
    with torch.no_grad():
        canonical(images)
    windows, tokens, _ = seen["qkv"].shape
    q, k, _ = seen["qkv"].reshape(windows, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    assert attn.scale < 1
    torch.testing.assert_close(seen["q"], q * attn.scale, rtol=0, atol=0)
    torch.testing.assert_close(seen["kt"], k.transpose(-2, -1), rtol=0, atol=0)


def test_shifted_blocks_are_masked() -> None:
    """Odd blocks of both tiny stages are shifted, and their mask changes the output."""
    model, _ = _tiny()
    timm_blocks = [block for stage in model.layers for block in stage.blocks]
    assert [block.attn_mask is not None for block in timm_blocks] == [False, True, False, True]
    canonical = adapt(model)
    for block in canonical.blocks():
        if block.module.attn_mask is None:
            continue
        mask = block.module.attn_mask
        x = torch.randn(2 * mask.shape[0], block.attention.window_area, block.attention.dim)
        with torch.no_grad():
            masked, unmasked = block.attention(x, mask), block.attention(x)
        assert (masked - unmasked).abs().max() > 1e-2


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "eager"])
def test_window_attention_matches_timm_with_mask(fused: bool) -> None:
    """Module level, against both timm paths (SDPA expands the mask differently from eager)."""
    model, _ = _tiny()
    block = model.layers[0].blocks[1]
    mask = block.attn_mask  # (windows, N, N) of 0 / -100
    attn = block.attn
    attn.fused_attn = fused
    x = torch.randn(2 * mask.shape[0], attn.window_area, attn.dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = attn(x, mask=mask)
        actual = CanonicalWindowAttention.from_timm(copy.deepcopy(attn))(x, mask=mask)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_shares_parameters_and_keeps_state_dict_keys() -> None:
    model, _ = _tiny()
    keys = set(model.state_dict())
    table = model.layers[1].blocks[1].attn.relative_position_bias_table
    canonical = adapt(model)
    assert canonical.model.layers[1].blocks[1].attn.relative_position_bias_table is table
    assert set(canonical.model.state_dict()) == keys


def test_set_input_size_after_adapting() -> None:
    """timm's resize path calls ``attn.set_window_size``, which the canonical attention supports."""
    model, _ = _tiny()
    canonical = adapt(copy.deepcopy(model))
    model.set_input_size(img_size=(96, 96))
    canonical.model.set_input_size(img_size=(96, 96))
    assert canonical.model.layers[0].blocks[0].attn.window_size == (6, 6)
    images = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(canonical(images), model(images), rtol=0, atol=1e-5)


def test_rejects_unknown_structure_and_readapting() -> None:
    model, _ = _tiny()
    model.layers[1].blocks[0].mlp = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(UnsupportedModelError, match="MLP Sequential"):
        adapt(model)
    canonical = adapt(_tiny()[0])
    assert adapt(canonical) is canonical
    with pytest.raises(UnsupportedModelError, match="already adapted"):
        adapt(canonical.model)


def test_headless_model_has_no_head_site() -> None:
    model, images = _tiny(num_classes=0)
    with torch.no_grad():
        expected = model(images)
    canonical = adapt(model)
    assert [s.role for s in canonical.sites()] == swin_roles((2, 2), head=False)
    with torch.no_grad():
        assert (canonical(images) - expected).abs().max().item() <= 1e-5
