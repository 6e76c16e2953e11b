"""The mmdet Swin adapter: float equivalence, sites and roles, on a tiny backbone and a tiny Mask R-CNN.

Needs the ``coco`` extra (mmdet, mmcv with its ops); skips without it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.coco
mmdet = pytest.importorskip("mmdet")
pytest.importorskip("mmcv.ops")

from mmdet.models.backbones.swin import SwinTransformer  # noqa: E402

from benchsuite.quant.adapters import adapt, registered_adapters  # noqa: E402
from benchsuite.quant.canonical import InputKind, Role  # noqa: E402
from benchsuite.quant.modules import QuantModule  # noqa: E402

from tiny_detectors import TINY_SWIN, shrink_to_tiny_swin  # noqa: E402


def tiny_backbone(seed: int = 0) -> SwinTransformer:
    torch.manual_seed(seed)
    model = SwinTransformer(pretrain_img_size=32, **TINY_SWIN)
    model.eval()  # mmdet's SwinTransformer.train() returns None, so no chaining
    with torch.no_grad():  # random, not init-time zeros, so the bias tables matter
        for block in (b for stage in model.stages for b in stage.blocks):
            block.attn.w_msa.relative_position_bias_table.normal_(0, 0.5)
    return model


def tiny_mask_rcnn():
    """mmdet's own Mask R-CNN Swin-T config, shrunk to the tiny backbone, with random weights."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    register_all_modules()
    config_dir = Path(mmdet.__file__).parent / ".mim" / "configs"
    cfg = Config.fromfile(str(config_dir / "swin" / "mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py")).model
    shrink_to_tiny_swin(cfg)
    torch.manual_seed(0)
    model = MODELS.build(cfg)
    model.init_weights()
    model.eval()
    return model


def test_the_adapter_is_registered_and_picks_only_mmdet_swin():
    assert "mmdet_swin" in [entry.name for entry in registered_adapters()]
    assert adapt(tiny_backbone()).family == "mmdet_swin"


@pytest.mark.parametrize("size", [(64, 64), (72, 56)], ids=["aligned", "padded"])
def test_backbone_float_equivalence(size):
    model = tiny_backbone()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, *size)
    canonical = adapt(model)
    with torch.no_grad():
        expected = reference(x)
        got = canonical(x)
    assert len(got) == len(expected) == 2
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_backbone_sites_roles_and_order():
    canonical = adapt(tiny_backbone())
    sites = canonical.sites()
    roles = [s.role for s in sites]
    assert roles[0] is Role.PATCH_EMBED and sites[0].input_kind is InputKind.IMAGE
    per_block = [Role.QKV, Role.MATMUL_QK, Role.MATMUL_AV, Role.PROJ, Role.FC1, Role.FC2]
    # stage 0: two blocks then its PatchMerging; stage 1: two blocks, no downsampling
    assert roles[1:] == per_block * 2 + [Role.REDUCTION] + per_block * 2
    fc2 = canonical.sites_by_role(Role.FC2)
    assert all(s.input_kind is InputKind.POST_GELU for s in fc2)
    assert sites_of(canonical, Role.MATMUL_AV)[0].input_kinds[0] is InputKind.POST_SOFTMAX
    assert len(list(canonical.blocks())) == 4
    assert len(list(canonical.layernorm_pairs())) == 4 * 2 + 1
    # the wrappers share the original Parameters: nothing was copied
    block = canonical.model.stages[0].blocks[0]
    assert block.attn.w_msa.qkv.weight is canonical.model.stages[0].blocks[0].attn.w_msa.qkv.weight


def sites_of(canonical, role):
    return canonical.sites_by_role(role)


def test_adapting_twice_is_refused():
    from benchsuite.quant.adapters import UnsupportedModelError
    from benchsuite.quant.adapters.mmdet_swin import adapt_mmdet_swin

    canonical = adapt(tiny_backbone())
    with pytest.raises(UnsupportedModelError, match="already adapted"):
        adapt_mmdet_swin(canonical.model)


@pytest.fixture(scope="module")
def detector_pair():
    model = tiny_mask_rcnn()
    return copy.deepcopy(model), model


def _predict(model, images: torch.Tensor):
    from mmdet.structures import DetDataSample

    samples = []
    for _ in range(images.shape[0]):
        sample = DetDataSample()
        h, w = images.shape[-2:]
        sample.set_metainfo(dict(img_shape=(h, w), ori_shape=(h, w), scale_factor=(1.0, 1.0),
                                 pad_shape=(h, w), batch_input_shape=(h, w)))
        samples.append(sample)
    with torch.no_grad():
        return model.predict(images, samples, rescale=False)


def test_detector_whole_scope_wraps_neck_and_heads_and_keeps_float_outputs(detector_pair):
    reference, model = detector_pair
    canonical = adapt(model)
    others = canonical.sites_by_role(Role.OTHER)
    names = [s.name for s in others]
    assert any(n.startswith("neck.") for n in names)
    assert any(n.startswith("rpn_head.") for n in names)
    assert any(n.startswith("roi_head.bbox_head") for n in names)
    assert any(n.startswith("roi_head.mask_head") for n in names)
    assert all(s.input_kind is InputKind.GENERIC for s in others)
    # transposed convs stay float, as in the RepQ-ViT detection code
    assert isinstance(canonical.model.roi_head.mask_head.upsample, torch.nn.ConvTranspose2d)
    backbone_sites = [s for s in canonical.sites() if s.name.startswith("backbone.")]
    assert backbone_sites[0].role is Role.PATCH_EMBED

    torch.manual_seed(1)
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        feats_ref = reference.extract_feat(images)
        feats = canonical.model.extract_feat(images)
    for a, b in zip(feats, feats_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    got, expected = _predict(canonical.model, images)[0], _predict(reference, images)[0]
    torch.testing.assert_close(got.pred_instances.bboxes, expected.pred_instances.bboxes, rtol=0, atol=1e-3)
    torch.testing.assert_close(got.pred_instances.scores, expected.pred_instances.scores, rtol=0, atol=1e-4)


def test_backbone_only_scope_leaves_neck_and_heads_float():
    from benchsuite.quant.adapters.mmdet_swin import adapt_mmdet_swin

    canonical = adapt_mmdet_swin(tiny_mask_rcnn(), backbone_only=True)
    assert not canonical.sites_by_role(Role.OTHER)
    outside = [m for name, m in canonical.model.named_modules() if not name.startswith("backbone")]
    assert not any(isinstance(m, QuantModule) for m in outside)
