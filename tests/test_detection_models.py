"""The COCO detectors: configs, full-size builds, official checkpoint key layout, adapter.

Needs the ``coco`` extra (mmdet, mmcv with its ops); skips without it. Every detector is built
once (module-scoped, full size, random weights, ~1-2 s each on one CPU thread); no forward pass.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.coco
pytest.importorskip("mmdet")
pytest.importorskip("mmcv.ops")

from benchsuite.detection.checkpoint import (  # noqa: E402
    convert_swin_detection_state_dict,
    swin_checkpoint_layout,
)
from benchsuite.detection.models import (  # noqa: E402
    DETECTORS,
    build_detector,
    detector_config,
    detector_spec,
)
from benchsuite.errors import UnknownNameError  # noqa: E402

NAMES = sorted(DETECTORS)
CASCADE = [n for n in NAMES if DETECTORS[n].detector == "cascade-mask-rcnn"]

_built: dict[str, torch.nn.Module] = {}


@pytest.fixture(scope="module")
def built():
    """name -> built detector, each built at most once for the whole module."""

    def get(name: str) -> torch.nn.Module:
        if name not in _built:
            _built[name] = build_detector(name)
        return _built[name]

    yield get
    _built.clear()


# ------------------------------------------------------------------------------------------
# mmdet 3 key -> official (Swin fork, mmdet 2.11) key: written here independently of the
# converter, from the table in the spec (section 2.1), so the test checks the converter.
# ------------------------------------------------------------------------------------------

_BLOCK_TO_OFFICIAL = {
    "attn.w_msa.qkv.": "attn.qkv.",
    "attn.w_msa.proj.": "attn.proj.",
    "attn.w_msa.relative_position_bias_table": "attn.relative_position_bias_table",
    "attn.w_msa.relative_position_index": "attn.relative_position_index",
    "ffn.layers.0.0.": "mlp.fc1.",
    "ffn.layers.1.": "mlp.fc2.",
    "norm1.": "norm1.",
    "norm2.": "norm2.",
}
_STAGE = re.compile(r"backbone\.stages\.(\d+)\.(blocks\.\d+|downsample)\.(.+)")


def _official_merging(tensor: torch.Tensor) -> torch.Tensor:
    """mmdet 3's unfold order (channel-major, window row by row: ``c*4 + 2*dy + dx``) -> the fork's
    concat order (pixel-major, window column by column: ``(dy + 2*dx)*C + c``)."""
    *lead, merged = tensor.shape
    by_channel = tensor.reshape(*lead, merged // 4, 4)  # [..., c, p], p = 2*dy + dx
    by_pixel = by_channel[..., [0, 2, 1, 3]]  # [..., c, q], q = dy + 2*dx
    return by_pixel.transpose(-1, -2).reshape(*lead, merged).clone()


def to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    official = {}
    for key, value in state.items():
        if key.startswith("backbone.patch_embed.projection."):
            official[key.replace(".projection.", ".proj.")] = value
            continue
        match = _STAGE.fullmatch(key)
        if match is None:  # patch_embed.norm, norm{i}, neck, heads: unchanged
            official[key] = value
            continue
        stage, where, rest = match.groups()
        prefix = f"backbone.layers.{stage}.{where}."
        if where == "downsample":
            assert rest in ("reduction.weight", "norm.weight", "norm.bias"), key
            official[prefix + rest] = _official_merging(value)
            continue
        for new, old in _BLOCK_TO_OFFICIAL.items():
            if rest.startswith(new):
                official[prefix + old + rest[len(new):]] = value
                break
        else:
            raise AssertionError(f"no official name for {key}")
    return official


# ------------------------------------------------------------------------------------------
# Specs and configs (no build)
# ------------------------------------------------------------------------------------------


def test_the_four_detectors_and_their_paper_numbers():
    assert set(DETECTORS) == {
        "mask-rcnn-swin-t",
        "mask-rcnn-swin-s",
        "cascade-mask-rcnn-swin-t",
        "cascade-mask-rcnn-swin-s",
    }
    aps = {n: (s.box_ap, s.mask_ap) for n, s in DETECTORS.items()}
    assert aps == {
        "mask-rcnn-swin-t": (46.0, 41.6),
        "mask-rcnn-swin-s": (48.5, 43.3),
        "cascade-mask-rcnn-swin-t": (50.4, 43.7),
        "cascade-mask-rcnn-swin-s": (51.9, 45.0),
    }
    for spec in DETECTORS.values():
        assert spec.source_repo == "SwinTransformer/Swin-Transformer-Object-Detection"
        assert spec.checkpoint.endswith(".pth") and spec.checkpoint_url.endswith(spec.checkpoint)
        assert "3x_coco" in spec.official_config
        assert (spec.mmdet_config is None) == (spec.detector == "cascade-mask-rcnn")
    with pytest.raises(Exception):
        DETECTORS["mask-rcnn-swin-t"].box_ap = 0.0  # frozen


def test_unknown_name_suggests_the_closest():
    with pytest.raises(UnknownNameError, match="did you mean 'cascade-mask-rcnn-swin-t'"):
        detector_config("cascade-mask-rcnn-swin-tt")
    with pytest.raises(KeyError):
        build_detector("faster-rcnn")
    assert detector_spec("Mask_RCNN_Swin_T").name == "mask-rcnn-swin-t"


def test_importing_the_module_does_not_import_mmdet():
    code = (
        "import sys, benchsuite.detection.models; "
        "bad = [m for m in ('mmdet', 'mmcv', 'mmengine') if m in sys.modules]; "
        "print(', '.join(bad)); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def _walk(node):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _walk(value)


@pytest.mark.parametrize("name", NAMES)
def test_config_is_offline_single_device_and_uses_the_test_pipeline(name):
    config = detector_config(name).to_dict()
    model = config["model"]
    assert model["backbone"]["init_cfg"] is None
    assert model["backbone"]["convert_weights"] is False
    assert not any(d.get("type") == "SyncBN" for d in _walk(model))
    assert not any(d.get("type") == "Pretrained" for d in _walk(model))
    pre = model["data_preprocessor"]
    assert pre["type"] == "DetDataPreprocessor" and pre["pad_size_divisor"] == 32
    assert pre["mean"] == [123.675, 116.28, 103.53] and pre["std"] == [58.395, 57.12, 57.375]
    assert pre["bgr_to_rgb"] is True
    resize = [t for t in config["test_pipeline"] if t["type"] == "Resize"]
    assert len(resize) == 1 and tuple(resize[0]["scale"]) == (1333, 800) and resize[0]["keep_ratio"]
    assert not any("Flip" in t["type"] for t in config["test_pipeline"])
    test_cfg = model["test_cfg"]
    assert test_cfg["rpn"]["nms_pre"] == 1000 and test_cfg["rpn"]["max_per_img"] == 1000
    assert test_cfg["rpn"]["nms"]["iou_threshold"] == 0.7
    rcnn = test_cfg["rcnn"]
    assert rcnn["score_thr"] == 0.05 and rcnn["nms"]["iou_threshold"] == 0.5
    assert rcnn["max_per_img"] == 100 and rcnn["mask_thr_binary"] == 0.5


@pytest.mark.parametrize("name", CASCADE)
def test_cascade_config_matches_the_swin_fork(name):
    roi = detector_config(name).model.roi_head
    assert roi.type == "CascadeRoIHead" and roi.num_stages == 3
    assert list(roi.stage_loss_weights) == [1, 0.5, 0.25]
    stds = [list(head.bbox_coder.target_stds) for head in roi.bbox_head]
    assert stds == [[0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1], [0.033, 0.033, 0.067, 0.067]]
    for head in roi.bbox_head:
        assert head.type == "ConvFCBBoxHead"
        assert (head.num_shared_convs, head.num_shared_fcs, head.fc_out_channels) == (4, 1, 1024)
        assert head.reg_decoded_bbox is True and head.reg_class_agnostic is False
        assert head.loss_bbox.type == "GIoULoss" and head.loss_bbox.loss_weight == 10.0
        assert head.norm_cfg.type == "BN"
    assert roi.mask_head.type == "FCNMaskHead" and roi.mask_head.num_convs == 4


# ------------------------------------------------------------------------------------------
# Built models
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_builds_with_the_expected_swin_backbone(built, name):
    from mmdet.models.backbones.swin import SwinTransformer

    spec = DETECTORS[name]
    model = built(name)
    assert not model.training
    backbone = model.backbone
    assert isinstance(backbone, SwinTransformer)
    assert backbone.patch_embed.projection.out_channels == spec.embed_dims == 96
    assert [len(stage.blocks) for stage in backbone.stages] == list(spec.depths)
    assert list(spec.depths) == ([2, 2, 6, 2] if name.endswith("-t") else [2, 2, 18, 2])
    heads = [stage.blocks[0].attn.w_msa.num_heads for stage in backbone.stages]
    assert heads == list(spec.num_heads) == [3, 6, 12, 24]
    assert [stage.blocks[0].attn.w_msa.window_size for stage in backbone.stages] == [(7, 7)] * 4
    assert backbone.out_indices == (0, 1, 2, 3) and not backbone.use_abs_pos_embed
    assert list(model.neck.in_channels) == [96, 192, 384, 768]
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())


@pytest.mark.parametrize("name", CASCADE)
def test_cascade_has_three_giou_4conv1fc_stages(built, name):
    from mmdet.models.losses import GIoULoss
    from mmdet.models.roi_heads.bbox_heads import ConvFCBBoxHead

    roi = built(name).roi_head
    assert roi.num_stages == 3 and len(roi.bbox_head) == 3 and len(roi.mask_head) == 3
    for head in roi.bbox_head:
        assert type(head) is ConvFCBBoxHead
        assert len(head.shared_convs) == 4 and len(head.shared_fcs) == 1
        assert isinstance(head.shared_convs[0].bn, torch.nn.BatchNorm2d)
        assert head.shared_fcs[0].out_features == 1024
        assert isinstance(head.loss_bbox, GIoULoss) and head.reg_decoded_bbox
        assert head.fc_reg.out_features == 4 * 80


@pytest.mark.parametrize("name", NAMES)
def test_official_checkpoint_layout_converts_to_the_built_keys(built, name):
    model = built(name)
    state = model.state_dict()
    official = to_official(state)
    assert swin_checkpoint_layout(official) == "official"
    assert "backbone.layers.0.blocks.0.attn.qkv.weight" in official
    assert "backbone.layers.2.downsample.reduction.weight" in official
    assert "backbone.patch_embed.proj.weight" in official
    if name in CASCADE:
        assert "roi_head.bbox_head.2.shared_convs.3.bn.running_var" in official
        assert "roi_head.mask_head.2.conv_logits.weight" in official

    converted = convert_swin_detection_state_dict(official)
    assert set(converted) == set(state)
    for key, value in state.items():
        assert converted[key].shape == value.shape, key
        assert torch.equal(converted[key], value), key
    result = model.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_the_adapter_accepts_a_full_detector():
    from benchsuite.quant.adapters import adapt
    from benchsuite.quant.canonical import Role

    model = build_detector("mask-rcnn-swin-t")  # its own copy: adapting wraps modules in place
    canonical = adapt(model)
    assert canonical.family == "mmdet_swin"
    sites = canonical.sites()
    backbone = [s for s in sites if s.name.startswith("backbone.")]
    others = [s for s in sites if not s.name.startswith("backbone.")]
    assert backbone[0].role is Role.PATCH_EMBED
    assert sum(s.role is Role.QKV for s in backbone) == sum(DETECTORS["mask-rcnn-swin-t"].depths)
    assert others and all(s.role is Role.OTHER for s in others)
    for prefix in ("neck.", "rpn_head.", "roi_head.bbox_head", "roi_head.mask_head"):
        assert any(s.name.startswith(prefix) for s in others), prefix
