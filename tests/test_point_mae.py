"""Point-MAE models: checkpoint layout and loading, outputs, input packing, canonical adapter.

The expected key layout is written out here from the reference code (``Pang-Yatian/Point-MAE``:
``models/Point_MAE.py`` PointTransformer, ``segmentation/models/pt.py`` get_model and
``segmentation/models/pointnet2_utils.py`` PointNetFeaturePropagation), independently of the
implementation, so a renamed or reshaped parameter fails here rather than at checkpoint load.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from benchsuite.errors import DataError
from benchsuite.pointcloud import (
    PointMAEClassifier,
    PointMAESegmenter,
    load_point_mae_checkpoint,
    pack_segmentation_input,
)
from benchsuite.pointcloud.layers import Attention, PointwiseConv, TokenBatchNorm
from benchsuite.quant.adapters import UnsupportedModelError, adapt
from benchsuite.quant.adapters.point_mae import QueryScaledAttention, adapt_point_mae
from benchsuite.quant.adapters.timm_vit import CanonicalAttention
from benchsuite.quant.canonical import InputKind, Role
from benchsuite.quant.modules import QuantLinear

K = InputKind


# --------------------------------------------------------------------------------------------
# The official layout
# --------------------------------------------------------------------------------------------


def _bn(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (channels,), f"{prefix}.bias": (channels,), f"{prefix}.running_mean": (channels,),
            f"{prefix}.running_var": (channels,), f"{prefix}.num_batches_tracked": ()}


def _conv(prefix: str, out: int, inp: int, bias: bool = True) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (out, inp, 1), **({f"{prefix}.bias": (out,)} if bias else {})}


def _linear(prefix: str, out: int, inp: int, bias: bool = True) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (out, inp), **({f"{prefix}.bias": (out,)} if bias else {})}


def _backbone(dim: int, depth: int) -> dict[str, tuple[int, ...]]:
    shapes = {
        **_conv("encoder.first_conv.0", 128, 3), **_bn("encoder.first_conv.1", 128),
        **_conv("encoder.first_conv.3", 256, 128),
        **_conv("encoder.second_conv.0", 512, 512), **_bn("encoder.second_conv.1", 512),
        **_conv("encoder.second_conv.3", dim, 512),
        **_linear("pos_embed.0", 128, 3), **_linear("pos_embed.2", dim, 128),
        "norm.weight": (dim,), "norm.bias": (dim,),
    }
    for i in range(depth):
        p = f"blocks.blocks.{i}"
        shapes.update({f"{p}.norm1.weight": (dim,), f"{p}.norm1.bias": (dim,), f"{p}.norm2.weight": (dim,),
                       f"{p}.norm2.bias": (dim,)})
        shapes.update(_linear(f"{p}.attn.qkv", 3 * dim, dim, bias=False))  # qkv_bias=False
        shapes.update(_linear(f"{p}.attn.proj", dim, dim))
        shapes.update(_linear(f"{p}.mlp.fc1", 4 * dim, dim))
        shapes.update(_linear(f"{p}.mlp.fc2", dim, 4 * dim))
    return shapes


def official_classifier_shapes(dim=384, depth=12, classes=40) -> dict[str, tuple[int, ...]]:
    return {
        **_backbone(dim, depth), "cls_token": (1, 1, dim), "cls_pos": (1, 1, dim),
        **_linear("cls_head_finetune.0", 256, 2 * dim), **_bn("cls_head_finetune.1", 256),
        **_linear("cls_head_finetune.4", 256, 256), **_bn("cls_head_finetune.5", 256),
        **_linear("cls_head_finetune.8", classes, 256),
    }


def official_segmenter_shapes(dim=384, depth=12, parts=50) -> dict[str, tuple[int, ...]]:
    return {
        **_backbone(dim, depth),
        **_conv("label_conv.0", 64, 16, bias=False), **_bn("label_conv.1", 64),
        **_conv("propagation_0.mlp_convs.0", 4 * dim, 3 * dim + 3), **_bn("propagation_0.mlp_bns.0", 4 * dim),
        **_conv("propagation_0.mlp_convs.1", 1024, 4 * dim), **_bn("propagation_0.mlp_bns.1", 1024),
        **_conv("convs1", 512, 3392), **_bn("bns1", 512),
        **_conv("convs2", 256, 512), **_bn("bns2", 256),
        **_conv("convs3", parts, 256),
    }


def shapes_of(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def test_full_size_models_have_the_official_checkpoint_layout():
    assert shapes_of(PointMAEClassifier()) == official_classifier_shapes()
    assert shapes_of(PointMAESegmenter()) == official_segmenter_shapes()


# --------------------------------------------------------------------------------------------
# Tiny models with weights that make every part matter
# --------------------------------------------------------------------------------------------


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fan-in-scaled weights and non-trivial BatchNorm statistics, then eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("running_var"):
                tensor.copy_(0.5 + noise.abs())
            elif tensor.ndim >= 2 and not name.startswith("cls_"):
                tensor.copy_(noise / math.sqrt(tensor[0].numel()))
            elif name.endswith("weight"):  # norms
                tensor.copy_(1.0 + 0.1 * noise)
            else:
                tensor.copy_(0.1 * noise)
    return model.eval()


def tiny_classifier(seed: int = 0) -> PointMAEClassifier:
    return randomize(PointMAEClassifier(7, dim=32, depth=2, num_heads=2, num_groups=16, group_size=8,
                                        head_hidden=24), seed)


def tiny_segmenter(seed: int = 0) -> PointMAESegmenter:
    model = PointMAESegmenter(6, 4, dim=32, depth=3, num_heads=2, num_groups=16, group_size=8,
                              propagation_channels=(48, 40), head_channels=(32, 16))
    return randomize(model, seed)


def points(batch: int = 3, count: int = 256, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, count, 3, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def seg_input(batch: int = 3, count: int = 256) -> torch.Tensor:
    return pack_segmentation_input(points(batch, count), torch.tensor([0, 3, 1, 2][:batch]), 4)


# --------------------------------------------------------------------------------------------
# Checkpoint loading
# --------------------------------------------------------------------------------------------


def test_classifier_loads_the_official_layout_with_prefixes():
    source, target = tiny_classifier(0), tiny_classifier(1)
    # tools/builder.py saves {'base_model': DataParallel(model).state_dict(), ...}: "module." keys.
    checkpoint = {"base_model": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 299}
    load_point_mae_checkpoint(target, checkpoint)
    x = points()
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_segmenter_loads_a_checkpoint_file_with_numpy_metrics(tmp_path):
    source, target = tiny_segmenter(0), tiny_segmenter(1)
    # segmentation/main.py saves {'model_state_dict': ..., metrics as numpy scalars, ...}.
    path = tmp_path / "part_seg.pth"
    torch.save({"epoch": 3, "class_avg_iou": np.float64(0.84), "inctance_avg_iou": np.mean([0.8, 0.9]),
                "model_state_dict": source.state_dict()}, path)
    load_point_mae_checkpoint(target, path)
    x = seg_input()
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_loading_names_missing_unexpected_and_misshapen_keys(tmp_path):
    model = tiny_classifier()
    state = {f"base_model.{k}": v for k, v in model.state_dict().items()}
    del state["base_model.cls_token"]
    state["base_model.MAE_decoder.norm.weight"] = torch.ones(3)
    with pytest.raises(DataError, match=r"missing keys \(1\): cls_token.*unexpected keys \(1\): MAE_decoder"):
        load_point_mae_checkpoint(model, state)
    state = dict(model.state_dict(), **{"norm.weight": torch.ones(5)})
    with pytest.raises(DataError, match=r"shape mismatch.*norm\.weight \(5,\) vs \(32,\)"):
        load_point_mae_checkpoint(model, state)
    with pytest.raises(DataError, match="does not exist"):
        load_point_mae_checkpoint(model, tmp_path / "absent.pth")


def test_pointwise_conv_is_a_channels_last_conv1d_with_its_state_dict():
    conv = nn.Conv1d(5, 7, 1)
    pointwise = PointwiseConv(5, 7)
    pointwise.load_state_dict(conv.state_dict())
    assert pointwise.state_dict()["weight"].shape == (7, 5, 1) and pointwise.weight.shape == (7, 5)
    x = torch.randn(2, 5, 9)
    torch.testing.assert_close(pointwise(x.transpose(1, 2)), conv(x).transpose(1, 2))


@pytest.mark.parametrize("training", [True, False])
def test_token_batch_norm_matches_batch_norm_1d(training):
    reference, ours = nn.BatchNorm1d(6), TokenBatchNorm(6)
    randomize(reference)
    ours.load_state_dict(reference.state_dict())
    reference.train(training), ours.train(training)
    x = torch.randn(4, 6, 10)
    torch.testing.assert_close(ours(x.transpose(1, 2)), reference(x).transpose(1, 2))
    torch.testing.assert_close(ours.running_mean, reference.running_mean)


@pytest.mark.parametrize("scale_queries", [False, True])
def test_attention_scales_where_its_reference_does(scale_queries):
    attn = randomize(Attention(8, 2, scale_queries=scale_queries))
    x = torch.randn(2, 5, 8)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
    scores = (q * attn.scale) @ k.transpose(-2, -1) if scale_queries else (q @ k.transpose(-2, -1)) * attn.scale
    expected = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 8))
    torch.testing.assert_close(attn(x), expected, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Inputs and outputs
# --------------------------------------------------------------------------------------------


def test_output_shapes():
    with torch.no_grad():
        assert tiny_classifier()(points(2, 200)).shape == (2, 7)
        assert tiny_segmenter()(seg_input(2, 200)).shape == (2, 6, 200)
    with pytest.raises(ValueError, match=r"\(B, N, 3\)"):
        tiny_classifier()(torch.zeros(2, 3, 200))
    with pytest.raises(ValueError, match=r"\(B, N, 7\)"):
        tiny_segmenter()(points(2, 200))


def test_pack_segmentation_input():
    xyz = points(2, 50)
    packed = pack_segmentation_input(xyz, torch.tensor([2, 0]), 4)
    assert packed.shape == (2, 50, 7)
    assert torch.equal(packed[..., :3], xyz)
    assert torch.equal(packed[:, :, 3:], torch.tensor([[0.0, 0, 1, 0], [1, 0, 0, 0]]).unsqueeze(1).expand(2, 50, 4))
    onehot = torch.nn.functional.one_hot(torch.tensor([2, 0]), 4)
    assert torch.equal(pack_segmentation_input(xyz, onehot, 4), packed)
    with pytest.raises(ValueError, match="one-hot"):
        pack_segmentation_input(xyz, torch.zeros(2, 5), 4)


def test_segmenter_reads_the_category():
    model = tiny_segmenter()
    xyz = points(1, 128)
    with torch.no_grad():
        a = model(pack_segmentation_input(xyz, torch.tensor([0]), 4))
        b = model(pack_segmentation_input(xyz, torch.tensor([3]), 4))
    assert not torch.allclose(a, b)


# --------------------------------------------------------------------------------------------
# Canonical adapter
# --------------------------------------------------------------------------------------------


def block_roles(depth: int) -> list[tuple[Role, tuple[InputKind, ...]]]:
    block = [(Role.QKV, (K.POST_LAYERNORM,)), (Role.MATMUL_QK, (K.GENERIC, K.GENERIC)),
             (Role.MATMUL_AV, (K.POST_SOFTMAX, K.GENERIC)), (Role.PROJ, (K.GENERIC,)),
             (Role.FC1, (K.POST_LAYERNORM,)), (Role.FC2, (K.POST_GELU,))]
    return block * depth


ENCODER = [(Role.PATCH_EMBED, (K.IMAGE,))] + [(Role.PATCH_EMBED, (K.GENERIC,))] * 3


@pytest.mark.parametrize(
    ("factory", "make_input", "attention_type", "tail"),
    [
        (tiny_classifier, points, CanonicalAttention,
         [(Role.HEAD, (K.POST_LAYERNORM,)), (Role.HEAD, (K.GENERIC,)), (Role.HEAD, (K.GENERIC,))]),
        (tiny_segmenter, seg_input, QueryScaledAttention, [(Role.OTHER, (K.GENERIC,))] * 6),
    ],
    ids=["classifier", "segmenter"],
)
def test_adapter_keeps_the_float_output_and_tags_sites(factory, make_input, attention_type, tail):
    model = factory()
    x = make_input()
    with torch.no_grad():
        reference = model(x)
    adapted = copy.deepcopy(model)
    encoder_weight = adapted.encoder.first_conv[0].weight
    canonical = adapt(adapted)
    assert canonical.family == "point_mae"
    with torch.no_grad():
        torch.testing.assert_close(canonical(x), reference, rtol=1e-5, atol=1e-5)

    depth = len(model.blocks.blocks)
    assert [(s.role, s.input_kinds) for s in canonical.sites()] == ENCODER + block_roles(depth) + tail
    assert all(isinstance(s.module, QuantLinear) or s.role in (Role.MATMUL_QK, Role.MATMUL_AV)
               for s in canonical.sites())
    blocks = list(canonical.blocks())
    assert [b.index for b in blocks] == list(range(depth))
    assert all(type(b.attention) is attention_type for b in blocks)
    pairs = list(canonical.layernorm_pairs())
    assert len(pairs) == 2 * depth
    assert all(isinstance(p.norm, nn.LayerNorm) and len(p.linears) == 1 for p in pairs)
    # wrappers share the Parameters, so in-place weight edits (reparameterization) reach the model
    assert canonical.sites()[0].module.weight is encoder_weight


def test_adapter_refuses_an_adapted_model():
    canonical = adapt(tiny_classifier())
    with pytest.raises(UnsupportedModelError, match="already adapted"):
        adapt_point_mae(canonical.model)
