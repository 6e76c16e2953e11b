"""Official Swin detection checkpoints (mmdet 2.x layout) -> mmdet 3.3: names, PatchMerging order, loading.

The official-layout weights here are built by this file's own small re-implementation of the
official naming and of its ``PatchMerging`` concat order. Needs the ``coco`` extra; skips without it.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.coco
mmdet = pytest.importorskip("mmdet")
pytest.importorskip("mmcv.ops")  # mmdet.models imports the RoI heads, which need mmcv's ops

from mmdet.models.backbones.swin import SwinTransformer, WindowMSA, swin_converter  # noqa: E402

from benchsuite.detection.checkpoint import (  # noqa: E402
    convert_swin_detection_state_dict,
    load_detection_checkpoint,
    reorder_patch_merging_channels,
    swin_checkpoint_layout,
)
from benchsuite.errors import DataError  # noqa: E402
from benchsuite.weights import load_into  # noqa: E402

TINY = dict(embed_dims=32, depths=(2, 2), num_heads=(2, 4), window_size=4, out_indices=(0, 1))


# --------------------------------------------------------------------------------------------
# The official layout, re-implemented for the tests
# --------------------------------------------------------------------------------------------


def official_relative_position_index(window: int) -> torch.Tensor:
    """The official Swin's index into the relative-position bias table, for a square window."""
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()])  # 2, N
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # N, N, 2
    return relative[..., 0] * (2 * window - 1) + relative[..., 1]


def official_backbone_state(seed: int = 0, attn_masks: bool = False, **arch) -> dict[str, torch.Tensor]:
    """Random weights under the official detection Swin's names (no ``backbone.`` prefix)."""
    arch = {**TINY, **arch}
    dim, window = arch["embed_dims"], arch["window_size"]
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    state = {
        "patch_embed.proj.weight": rnd(dim, 3, 4, 4),
        "patch_embed.proj.bias": rnd(dim),
        "patch_embed.norm.weight": rnd(dim),
        "patch_embed.norm.bias": rnd(dim),
    }
    widths = []
    for i, (depth, heads) in enumerate(zip(arch["depths"], arch["num_heads"])):
        widths.append(dim)
        for j in range(depth):
            block = f"layers.{i}.blocks.{j}."
            state |= {
                block + "norm1.weight": rnd(dim),
                block + "norm1.bias": rnd(dim),
                block + "attn.relative_position_bias_table": rnd((2 * window - 1) ** 2, heads),
                block + "attn.relative_position_index": official_relative_position_index(window),
                block + "attn.qkv.weight": rnd(3 * dim, dim) / dim**0.5,
                block + "attn.qkv.bias": rnd(3 * dim),
                block + "attn.proj.weight": rnd(dim, dim) / dim**0.5,
                block + "attn.proj.bias": rnd(dim),
                block + "norm2.weight": rnd(dim),
                block + "norm2.bias": rnd(dim),
                block + "mlp.fc1.weight": rnd(4 * dim, dim) / dim**0.5,
                block + "mlp.fc1.bias": rnd(4 * dim),
                block + "mlp.fc2.weight": rnd(dim, 4 * dim) / (4 * dim) ** 0.5,
                block + "mlp.fc2.bias": rnd(dim),
            }
            if attn_masks and j % 2:  # what the classification Swin stores for shifted blocks
                state[block + "attn_mask"] = torch.zeros(4, window * window, window * window)
        if i < len(arch["depths"]) - 1:
            state |= {
                f"layers.{i}.downsample.reduction.weight": rnd(2 * dim, 4 * dim) / (4 * dim) ** 0.5,
                f"layers.{i}.downsample.norm.weight": rnd(4 * dim),
                f"layers.{i}.downsample.norm.bias": rnd(4 * dim),
            }
            dim *= 2
    for i in arch["out_indices"]:
        state |= {f"norm{i}.weight": rnd(widths[i]), f"norm{i}.bias": rnd(widths[i])}
    return state


def official_patch_merging(x: torch.Tensor, hw: tuple[int, int], state: dict, stage: int) -> torch.Tensor:
    """The official PatchMerging: pad odd sizes at the end, concat x0..x3, LayerNorm, reduction."""
    prefix = f"layers.{stage}.downsample."
    batch, _, channels = x.shape
    grid = x.view(batch, *hw, channels)
    grid = F.pad(grid, (0, 0, 0, hw[1] % 2, 0, hw[0] % 2))
    x0 = grid[:, 0::2, 0::2, :]
    x1 = grid[:, 1::2, 0::2, :]
    x2 = grid[:, 0::2, 1::2, :]
    x3 = grid[:, 1::2, 1::2, :]
    merged = torch.cat([x0, x1, x2, x3], -1).view(batch, -1, 4 * channels)
    merged = F.layer_norm(merged, (4 * channels,), state[prefix + "norm.weight"], state[prefix + "norm.bias"])
    return F.linear(merged, state[prefix + "reduction.weight"])


def prefixed(state: dict, prefix: str = "backbone.") -> dict[str, torch.Tensor]:
    return {prefix + key: value for key, value in state.items()}


def unprefixed(state: dict, prefix: str = "backbone.") -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def tiny_backbone(seed: int = 0) -> SwinTransformer:
    torch.manual_seed(seed)
    model = SwinTransformer(pretrain_img_size=32, **TINY)
    model.eval()  # mmdet's SwinTransformer.train() returns None: no chaining
    with torch.no_grad():  # random, not init-time zeros, so mapping mistakes show in the outputs
        for param in model.parameters():
            param.normal_(0, 0.3)
    return model


def head_key_patterns(state) -> set[str]:
    """Neck and head keys with every index replaced by ``#``."""
    numbered = re.compile(r"\.\d+(?=\.)")
    return {numbered.sub(".#", key) for key in state if not key.startswith("backbone.")}


# --------------------------------------------------------------------------------------------
# (a) names
# --------------------------------------------------------------------------------------------


def test_official_names_map_onto_mmdet3_swin_exactly():
    official = official_backbone_state(attn_masks=True)
    heads = {"neck.fpn_convs.0.conv.weight": torch.ones(2), "roi_head.bbox_head.fc_cls.bias": torch.ones(3)}
    converted = convert_swin_detection_state_dict(prefixed(official) | heads)

    model = SwinTransformer(pretrain_img_size=32, **TINY)
    expected = model.state_dict()
    backbone = unprefixed(converted)
    assert set(backbone) == set(expected)
    assert all(backbone[key].shape == expected[key].shape for key in expected)
    assert all(converted[key] is value for key, value in heads.items())  # neck and heads pass through
    assert not any("attn_mask" in key for key in converted)

    renamed = {
        "patch_embed.proj.weight": "patch_embed.projection.weight",
        "patch_embed.norm.bias": "patch_embed.norm.bias",
        "layers.1.blocks.0.attn.qkv.weight": "stages.1.blocks.0.attn.w_msa.qkv.weight",
        "layers.1.blocks.1.attn.proj.bias": "stages.1.blocks.1.attn.w_msa.proj.bias",
        "layers.0.blocks.1.attn.relative_position_bias_table": (
            "stages.0.blocks.1.attn.w_msa.relative_position_bias_table"
        ),
        "layers.0.blocks.0.mlp.fc1.weight": "stages.0.blocks.0.ffn.layers.0.0.weight",
        "layers.0.blocks.0.mlp.fc2.bias": "stages.0.blocks.0.ffn.layers.1.bias",
        "layers.1.blocks.1.norm2.weight": "stages.1.blocks.1.norm2.weight",
        "norm1.weight": "norm1.weight",
    }
    for old, new in renamed.items():
        assert backbone[new] is official[old], (old, new)
    load_into(model, backbone, "official-layout dict", "tiny Swin")  # strict


@pytest.mark.parametrize("window", [4, 7, 12])
def test_relative_position_index_is_the_same_in_both_implementations(window):
    msa = WindowMSA(embed_dims=8, num_heads=2, window_size=(window, window))
    assert torch.equal(msa.relative_position_index, official_relative_position_index(window))
    assert "relative_position_index" in msa.state_dict()  # persistent: a strict load needs the key


# --------------------------------------------------------------------------------------------
# (b) the PatchMerging reorder is right, not just the names
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(8, 8), (7, 6)])
def test_converted_patch_merging_reproduces_the_official_concat_order(hw):
    official = official_backbone_state(seed=1)
    model = tiny_backbone()
    load_into(model, unprefixed(convert_swin_detection_state_dict(prefixed(official))), "converted", "tiny Swin")
    x = torch.randn(2, hw[0] * hw[1], TINY["embed_dims"])
    with torch.no_grad():
        merging = model.stages[0].downsample
        got, out_hw = merging(x, hw)
        reference = official_patch_merging(x, hw, official, stage=0)
    assert out_hw == ((hw[0] + 1) // 2, (hw[1] + 1) // 2)
    assert torch.allclose(got, reference, atol=1e-5)

    # the control: renaming without the reorder gives other outputs
    with torch.no_grad():
        merging.reduction.weight.copy_(official["layers.0.downsample.reduction.weight"])
        merging.norm.weight.copy_(official["layers.0.downsample.norm.weight"])
        merging.norm.bias.copy_(official["layers.0.downsample.norm.bias"])
        unordered, _ = merging(x, hw)
    assert not torch.allclose(unordered, reference, atol=1e-2)


def _official_from_unfold_permutation(channels: int) -> torch.Tensor:
    """``perm`` with unfold feature m == official feature perm[m], found by pushing labelled
    pixels through the two orders (independent of the library's formula)."""
    labels = torch.arange(4 * channels, dtype=torch.float64).view(1, 4, channels)  # pixel (dy, dx) row-major
    official = torch.cat([labels[:, 0], labels[:, 2], labels[:, 1], labels[:, 3]], -1)[0]  # x0, x1, x2, x3
    grid = labels.view(1, 2, 2, channels).permute(0, 3, 1, 2)
    unfolded = torch.nn.Unfold(kernel_size=2, stride=2)(grid)[0, :, 0]
    return torch.tensor([int((official == value).nonzero()) for value in unfolded])


def test_whole_backbone_round_trip_gives_identical_outputs():
    """mmdet 3 weights -> the official layout (test's inverse map) -> convert -> same outputs."""
    source = tiny_backbone(seed=2)
    inverse = {
        "patch_embed.projection.": "patch_embed.proj.",
        "attn.w_msa.": "attn.",
        "ffn.layers.0.0.": "mlp.fc1.",
        "ffn.layers.1.": "mlp.fc2.",
        "stages.": "layers.",
    }
    official = {}
    for key, value in source.state_dict().items():
        name = key
        for new, old in inverse.items():
            name = name.replace(new, old)
        if ".downsample." in key:
            perm = _official_from_unfold_permutation(value.shape[-1] // 4)
            restored = torch.empty_like(value)
            restored[..., perm] = value
            value = restored
        official[name] = value
    target = tiny_backbone(seed=3)
    load_into(target, unprefixed(convert_swin_detection_state_dict(prefixed(official))), "converted", "tiny Swin")
    image = torch.randn(1, 3, 36, 28)
    with torch.no_grad():
        for want, got in zip(source(image), target(image), strict=True):
            assert torch.allclose(want, got, atol=1e-5)


def test_reorder_matches_mmdets_swin_converter_on_a_backbone_state_dict():
    official = official_backbone_state(seed=4)
    ours = convert_swin_detection_state_dict(prefixed(official))
    theirs = swin_converter(official)  # backbone-only input, adds ``backbone.`` itself
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    first, second = tiny_backbone(), tiny_backbone(seed=5)
    load_into(first, unprefixed(ours), "ours", "tiny Swin")
    load_into(second, unprefixed(theirs), "swin_converter", "tiny Swin")
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(first(image), second(image), strict=True))
    # and why ours is still needed: on a detector-level dict swin_converter converts nothing
    assert "backbone.backbone.layers.0.blocks.0.attn.qkv.weight" in swin_converter(prefixed(official))


def test_reorder_rejects_shapes_that_are_not_merged_channels():
    with pytest.raises(DataError, match="PatchMerging"):
        reorder_patch_merging_channels(torch.zeros(6))
    with pytest.raises(DataError, match="PatchMerging"):
        reorder_patch_merging_channels(torch.zeros(2, 2, 8))


# --------------------------------------------------------------------------------------------
# Neck and heads: the same names in mmdet 2.11 and 3.3
# --------------------------------------------------------------------------------------------

_MASK_HEAD = ("convs.#.conv", "upsample", "conv_logits")
#: Key patterns of an mmdet 2.11 Mask R-CNN's neck and heads, transcribed from the module attribute
#: names in the Swin repository's mmdet 2.11 (FPN, RPNHead, Shared2FCBBoxHead, FCNMaskHead).
MMDET2_MASK_RCNN_HEADS = {
    *(f"neck.{branch}.#.conv.{p}" for branch in ("lateral_convs", "fpn_convs") for p in ("weight", "bias")),
    *(f"rpn_head.{name}.{p}" for name in ("rpn_conv", "rpn_cls", "rpn_reg") for p in ("weight", "bias")),
    *(f"roi_head.bbox_head.{name}.{p}" for name in ("shared_fcs.#", "fc_cls", "fc_reg") for p in ("weight", "bias")),
    *(f"roi_head.mask_head.{name}.{p}" for name in _MASK_HEAD for p in ("weight", "bias")),
}
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
#: The same for the Swin repository's Cascade Mask R-CNN (3 stages, "4conv1f" ConvFCBBoxHead with
#: norm_cfg, hence bias-free convs and a ``bn``).
MMDET2_CASCADE_HEADS = {
    *(key for key in MMDET2_MASK_RCNN_HEADS if not key.startswith("roi_head.")),
    "roi_head.bbox_head.#.shared_convs.#.conv.weight",
    *(f"roi_head.bbox_head.#.shared_convs.#.bn.{p}" for p in _BN),
    *(f"roi_head.bbox_head.#.{name}.{p}" for name in ("shared_fcs.#", "fc_cls", "fc_reg") for p in ("weight", "bias")),
    *(f"roi_head.mask_head.#.{name}.{p}" for name in _MASK_HEAD for p in ("weight", "bias")),
}


def tiny_detector(cascade: bool):
    """mmdet 3.3's own config (Swin Mask R-CNN, or Cascade Mask R-CNN with the Swin repository's
    4conv1f heads), shrunk: a tiny Swin, 16-channel neck and heads."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    register_all_modules()
    configs = Path(mmdet.__file__).parent / ".mim" / "configs"
    if cascade:
        name = "cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py"
    else:
        name = "swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py"
    cfg = Config.fromfile(str(configs / name)).model
    cfg.backbone = dict(type="SwinTransformer", pretrain_img_size=32, init_cfg=None, **TINY)
    cfg.neck.update(in_channels=[32, 64], out_channels=16, num_outs=3)
    cfg.rpn_head.update(in_channels=16, feat_channels=16)
    cfg.rpn_head.anchor_generator.strides = [4, 8, 16]
    roi = cfg.roi_head
    for extractor in (roi.bbox_roi_extractor, roi.mask_roi_extractor):
        extractor.update(featmap_strides=[4, 8], out_channels=16)
    roi.mask_head.update(in_channels=16, conv_out_channels=16)
    if cascade:
        heads = []
        for head in roi.bbox_head:
            head.update(
                type="ConvFCBBoxHead", num_shared_convs=4, num_shared_fcs=1, in_channels=16,
                conv_out_channels=16, fc_out_channels=32, norm_cfg=dict(type="BN"), reg_class_agnostic=False,
            )
            heads.append(head)
        roi.bbox_head = heads
    else:
        roi.bbox_head.update(in_channels=16, fc_out_channels=32)
    torch.manual_seed(0)
    model = MODELS.build(cfg)
    model.eval()
    return model


@pytest.mark.parametrize("cascade", [False, True], ids=["mask_rcnn", "cascade_mask_rcnn"])
def test_a_converted_detector_loads_strictly_and_head_names_match_mmdet2(cascade):
    model = tiny_detector(cascade)
    heads = {key: value for key, value in model.state_dict().items() if not key.startswith("backbone.")}
    assert head_key_patterns(heads) == (MMDET2_CASCADE_HEADS if cascade else MMDET2_MASK_RCNN_HEADS)
    converted = convert_swin_detection_state_dict(prefixed(official_backbone_state()) | heads)
    load_into(model, converted, "converted", "tiny detector")  # strict: every key, every shape


# --------------------------------------------------------------------------------------------
# (c) idempotence, (d) errors
# --------------------------------------------------------------------------------------------


def test_converting_twice_changes_nothing():
    once = convert_swin_detection_state_dict(prefixed(official_backbone_state()) | {"neck.x": torch.ones(1)})
    twice = convert_swin_detection_state_dict(once)
    assert swin_checkpoint_layout(once) == "mmdet3"
    assert twice.keys() == once.keys()
    assert all(twice[key] is once[key] for key in once)


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"neck.fpn_convs.0.conv.weight": torch.ones(1)}, "no Swin backbone keys"),
        ({}, "no Swin backbone keys"),
        ({"layers.0.blocks.0.attn.qkv.weight": torch.ones(1)}, "backbone-only"),
        (
            {
                "backbone.layers.0.blocks.0.norm1.weight": torch.ones(1),
                "backbone.stages.0.blocks.0.norm1.weight": torch.ones(1),
            },
            "mix",
        ),
        ({"backbone.layers.0.blocks.0.attn.qkv_extra": torch.ones(1)}, "unknown key"),
        ({"backbone.patch_embed.proj.weight": torch.ones(1), "backbone.norm.weight": torch.ones(1)}, "unknown key"),
    ],
    ids=["neither", "empty", "backbone_only", "mixed", "unknown_block_key", "unknown_top_key"],
)
def test_a_dict_in_neither_layout_is_a_one_line_data_error(state, message):
    with pytest.raises(DataError, match=message) as caught:
        convert_swin_detection_state_dict(state)
    assert "\n" not in str(caught.value)


# --------------------------------------------------------------------------------------------
# (e) files
# --------------------------------------------------------------------------------------------


def test_a_pth_with_mmdet2_meta_loads_weights_only(tmp_path):
    official = prefixed(official_backbone_state()) | {"rpn_head.rpn_cls.weight": torch.randn(3, 4, 1, 1)}
    checkpoint = {
        "meta": {
            "mmcv_version": "1.3.1",
            "time": "Mon May 10 12:00:00 2021",
            "CLASSES": ("person", "bicycle"),
            "epoch": 36,
            "iter": 87948,
            "config": "model = dict(type='MaskRCNN')",
            "hook_msgs": {"last_ckpt": "work_dirs/epoch_36.pth"},
            "tags": frozenset({"swin"}),
        },
        "state_dict": OrderedDict(("module." + key, value) for key, value in official.items()),
        "amp": OrderedDict(loss_scaler0={"loss_scale": 512.0, "unskipped": 17}),
    }
    path = tmp_path / "mask_rcnn_swin_tiny.pth"
    torch.save(checkpoint, path)
    loaded = load_detection_checkpoint(path)
    expected = convert_swin_detection_state_dict(official)
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)


def test_safetensors_load_and_converted_files_pass_unchanged(tmp_path):
    from safetensors.torch import save_file

    converted = convert_swin_detection_state_dict(prefixed(official_backbone_state()))
    path = tmp_path / "mask_rcnn_swin_tiny.safetensors"
    save_file(converted, str(path))
    loaded = load_detection_checkpoint(path)
    assert loaded.keys() == converted.keys()
    assert all(torch.equal(loaded[key], converted[key]) for key in converted)


_reduced = []


def _record_reduce() -> str:  # would run if the checkpoint were unpickled without weights_only
    _reduced.append(True)
    return "ran"


class _Sneaky:
    def __reduce__(self):
        return (_record_reduce, ())


@pytest.mark.parametrize(
    ("payload", "named"),
    [(_Sneaky(), "_record_reduce"), (np.float64(0.5), "numpy")],
    ids=["custom_object", "numpy_scalar"],
)
def test_objects_in_meta_are_refused_not_unpickled(tmp_path, payload, named):
    path = tmp_path / "ckpt.pth"
    meta = {"hook_msgs": {"best_score": payload}}
    torch.save({"meta": meta, "state_dict": prefixed(official_backbone_state())}, path)
    with pytest.raises(DataError, match=f"pickle a .*{named}.*weights-only") as caught:
        load_detection_checkpoint(path)
    assert "\n" not in str(caught.value)
    assert "weights_only=False" not in str(caught.value)
    assert not _reduced


def test_missing_and_corrupt_files_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_detection_checkpoint(tmp_path / "absent.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="cannot read Swin detection weights") as caught:
        load_detection_checkpoint(corrupt)
    assert "weights_only=False" not in str(caught.value)


def test_module_prefix_collisions_are_refused(tmp_path):
    state = prefixed(official_backbone_state())
    key = next(iter(state))
    path = tmp_path / "dup.pth"
    torch.save({"state_dict": state | {"module." + key: state[key]}}, path)
    with pytest.raises(DataError, match="twice"):
        load_detection_checkpoint(path)
