"""One tiny Swin Mask R-CNN for the coco tests: mmdet's own config, shrunk so a test takes seconds."""

from __future__ import annotations

#: A two-stage Swin small enough for CPU tests (stage widths 32 and 64).
TINY_SWIN = dict(embed_dims=32, depths=(2, 2), num_heads=(2, 4), window_size=4, out_indices=(0, 1))


def shrink_to_tiny_swin(model_cfg) -> None:
    """Shrink a Mask R-CNN Swin model config in place to TINY_SWIN (backbone, FPN, anchors, RoIs)."""
    model_cfg.backbone.update(TINY_SWIN, init_cfg=None, pretrain_img_size=32)
    model_cfg.neck.in_channels = [32, 64]
    model_cfg.neck.num_outs = 3
    model_cfg.rpn_head.anchor_generator.strides = [4, 8, 16]
    for extractor in (model_cfg.roi_head.bbox_roi_extractor, model_cfg.roi_head.mask_roi_extractor):
        extractor.featmap_strides = [4, 8]
