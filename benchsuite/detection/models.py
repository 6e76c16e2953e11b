"""The four COCO detectors of the ``coco`` task, as mmdetection 3.3 model configs and modules.

The PTQ papers report Mask R-CNN and Cascade Mask R-CNN with Swin-T and Swin-S backbones, all on
the 3x multi-scale schedule, evaluated with the checkpoints released by
SwinTransformer/Swin-Transformer-Object-Detection (the "Swin fork", mmdet 2.11). benchsuite runs
them in mmdet 3.3 and loads those checkpoints through
:func:`benchsuite.detection.checkpoint.convert_swin_detection_state_dict`, so every config here
must build a model whose parameters match the fork's one for one (same modules, same shapes, key
names equal after the backbone rename). Where the configs come from:

- **Mask R-CNN**: mmdet 3.3 ships a port of the fork's 3x configs
  (``swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py`` and
  ``swin/mask-rcnn_swin-s-p4-w7_fpn_amp-ms-crop-3x_coco.py`` under ``<mmdet>/.mim/configs``); the
  model part is the fork's (mmdet's Swin-S row is its own retrain, but with the fork's architecture),
  so it is used as it is, with the edits of :func:`detector_config`.
- **Cascade Mask R-CNN**: mmdet 3 has no Swin cascade config. :func:`cascade_mask_rcnn_swin_config`
  rebuilds the fork's ``cascade_mask_rcnn_swin_{tiny,small}_patch4_window7_mstrain_480-800_giou_4conv1f_adamw_3x_coco.py``
  (on its ``_base_/models/cascade_mask_rcnn_swin_fpn.py``) on top of mmdet 3's own
  ``_base_/models/cascade-mask-rcnn_r50_fpn.py``; its docstring lists every difference.

Importing this module imports neither mmdet, mmcv nor mmengine; the functions import them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchsuite.errors import UnknownNameError
from benchsuite.registry import normalize, suggestion

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from mmengine.config import Config

__all__ = [
    "DETECTORS",
    "DetectorSpec",
    "SWIN_FORK_REPO",
    "build_detector",
    "cascade_mask_rcnn_swin_config",
    "detector_config",
    "register_mmdet_modules",
    "detector_spec",
    "mmdet_config_dir",
]

#: Where the official checkpoints and the configs they were trained with come from.
SWIN_FORK_REPO = "SwinTransformer/Swin-Transformer-Object-Detection"
_RELEASES = "https://github.com/SwinTransformer/storage/releases/download/v1.0.2/"

#: Swin-T / Swin-S backbone sizes (the fork's ``embed_dim``, ``depths``, ``num_heads``).
_SWIN_SIZES: dict[str, tuple[int, tuple[int, ...], tuple[int, ...]]] = {
    "t": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "s": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
}

#: Per-stage regression target stds of the three cascade bbox heads (the fork's, = mmdet's).
_CASCADE_TARGET_STDS = (
    (0.1, 0.1, 0.2, 0.2),
    (0.05, 0.05, 0.1, 0.1),
    (0.033, 0.033, 0.067, 0.067),
)


@dataclass(frozen=True)
class DetectorSpec:
    """One benchmarked detector.

    ``box_ap`` / ``mask_ap`` are the float COCO val2017 APs (in %) that the Swin fork reports for
    ``checkpoint`` (spec table 2.1); a float run of benchsuite is checked against them.
    ``checkpoint`` is the file name of the fork's release (``checkpoint_url``), trained with the
    fork's ``official_config`` in ``source_repo``. The model config comes from exactly one of
    ``mmdet_config`` (a path under mmdet's ``.mim/configs``) and ``config_builder`` (a function
    returning the model config and the test pipeline, for detectors mmdet has no config for).
    """

    name: str
    description: str
    detector: str  # "mask-rcnn" or "cascade-mask-rcnn"
    backbone: str  # "swin-t" or "swin-s"
    embed_dims: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    box_ap: float
    mask_ap: float
    checkpoint: str
    checkpoint_url: str
    official_config: str
    source_repo: str = SWIN_FORK_REPO
    mmdet_config: str | None = None
    config_builder: Callable[[], Config] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if (self.mmdet_config is None) == (self.config_builder is None):
            raise ValueError(f"{self.name}: give exactly one of mmdet_config and config_builder")


def mmdet_config_dir() -> Path:
    """``<mmdet package>/.mim/configs``: where mmdet's pip package ships its configs."""
    import mmdet

    path = Path(mmdet.__file__).parent / ".mim" / "configs"
    if not path.is_dir():
        raise FileNotFoundError(
            f"mmdet's configs are not at {path}; benchsuite needs mmdet==3.3.0 installed from its "
            "wheel, which ships them under .mim/configs"
        )
    return path


def _swin_backbone(size: str) -> dict[str, Any]:
    """mmdet 3's ``SwinTransformer`` with the fork's Swin-T/S detection settings.

    The fork's names map onto mmdet 3's as ``embed_dim`` -> ``embed_dims``, ``ape=False`` ->
    ``use_abs_pos_embed=False``, ``use_checkpoint`` -> ``with_cp``; ``patch_size=4``,
    ``window_size=7``, ``mlp_ratio=4``, ``qkv_bias=True``, ``patch_norm=True``,
    ``drop_path_rate=0.2`` (only active in training) and ``out_indices=(0, 1, 2, 3)`` are the
    fork's.
    ``init_cfg=None`` and ``convert_weights=False``: mmdet's configs point ``init_cfg`` at an
    ImageNet checkpoint URL that ``init_weights`` would download and convert, while benchsuite
    loads a whole detector checkpoint (converted by :mod:`benchsuite.detection.checkpoint`) instead.
    """
    embed_dims, depths, num_heads = _SWIN_SIZES[size]
    return dict(
        type="SwinTransformer",
        pretrain_img_size=224,
        embed_dims=embed_dims,
        patch_size=4,
        depths=list(depths),
        num_heads=list(num_heads),
        window_size=7,
        mlp_ratio=4,
        qkv_bias=True,
        qk_scale=None,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.2,
        use_abs_pos_embed=False,
        patch_norm=True,
        out_indices=(0, 1, 2, 3),
        with_cp=False,
        convert_weights=False,
        init_cfg=None,
    )


def _giou_4conv1fc_head(target_stds: tuple[float, ...]) -> dict[str, Any]:
    """One cascade stage's bbox head as the fork's "giou_4conv1f" configs define it."""
    return dict(
        type="ConvFCBBoxHead",
        num_shared_convs=4,
        num_shared_fcs=1,
        in_channels=256,
        conv_out_channels=256,
        fc_out_channels=1024,
        roi_feat_size=7,
        num_classes=80,
        bbox_coder=dict(
            type="DeltaXYWHBBoxCoder",
            target_means=[0.0, 0.0, 0.0, 0.0],
            target_stds=list(target_stds),
        ),
        reg_class_agnostic=False,
        reg_decoded_bbox=True,
        norm_cfg=dict(type="BN", requires_grad=True),
        loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
        loss_bbox=dict(type="GIoULoss", loss_weight=10.0),
    )


def cascade_mask_rcnn_swin_config(size: str) -> Config:
    """Cascade Mask R-CNN + Swin-``size`` (``"t"`` or ``"s"``), 3x: the model config and the test
    pipeline, mirroring the fork's
    ``configs/swin/cascade_mask_rcnn_swin_{tiny,small}_patch4_window7_mstrain_480-800_giou_4conv1f_adamw_3x_coco.py``.

    Built on mmdet 3.3's ``_base_/models/cascade-mask-rcnn_r50_fpn.py``, whose detector, FPN
    (256 channels, 5 outputs), RPN head and anchors, RoI extractors (RoIAlign 7 / 14, strides
    4-32, ``sampling_ratio=0``), three stages with loss weights (1, 0.5, 0.25), ``FCNMaskHead``
    (4 convs, one config replicated per stage, as in the fork), train assigners / samplers
    (IoU 0.5 / 0.6 / 0.7) and test settings (RPN ``nms_pre=1000``, ``max_per_img=1000``, NMS 0.7;
    RCNN ``score_thr=0.05``, NMS 0.5, ``max_per_img=100``, ``mask_thr_binary=0.5``) equal the
    fork's ``_base_/models/cascade_mask_rcnn_swin_fpn.py``. On top of it, as the fork's 3x config:
    the Swin backbone (:func:`_swin_backbone`), FPN ``in_channels=[96, 192, 384, 768]``, and the
    three bbox heads replaced by ``ConvFCBBoxHead`` with 4 shared convs + 1 shared fc (1024),
    class-specific regression (``reg_class_agnostic=False``), ``reg_decoded_bbox=True`` with
    ``GIoULoss(loss_weight=10)`` and target stds (0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1),
    (0.033, 0.033, 0.067, 0.067).

    Where ours differs from the fork's config, and why:

    - **BN instead of SyncBN** in the bbox heads' shared convs. SyncBN needs an initialised
      distributed process group and a GPU even in eval mode in some code paths, and benchsuite
      evaluates on one device; in eval mode both use the stored running statistics, so the outputs
      are identical, and mmcv's ``ConvModule`` names either layer ``bn``, so the checkpoint keys
      (``shared_convs.k.bn.*``) are unchanged.
    - **mmdet 3 spelling** of everything: the backbone is mmdet 3's ``SwinTransformer`` (renamed
      arguments, listed at :func:`_swin_backbone`; its parameters are renamed by the checkpoint
      converter), ``init_cfg=None`` instead of ``pretrained``, and the RPN ``nms_post`` of the fork
      (ignored by mmdet >= 2.11 in favour of ``max_per_img``) is dropped.
    - **Preprocessing** moves from the fork's pipeline (``Normalize`` with the ImageNet mean/std,
      ``to_rgb=True``; ``Pad(size_divisor=32)``) into mmdet 3's ``DetDataPreprocessor`` (same
      mean/std, ``bgr_to_rgb=True``, ``pad_size_divisor=32``); the test pipeline is mmdet 3's
      COCO instance one (``Resize`` to (1333, 800), ``keep_ratio=True``, no flip), the same
      transform as the fork's ``MultiScaleFlipAug(img_scale=(1333, 800), flip=False)``.
    - Training-only settings (the fork's AdamW, AMP ``DistOptimizerHook``, the 480-800 multi-scale
      crop train pipeline, the 36-epoch schedule) are not reproduced: benchsuite only evaluates.
    """
    from mmengine.config import Config

    if size not in _SWIN_SIZES:
        raise ValueError(f"Swin size must be one of {sorted(_SWIN_SIZES)}, got {size!r}")
    configs = mmdet_config_dir()
    base = configs / "_base_" / "models" / "cascade-mask-rcnn_r50_fpn.py"
    model = Config.fromfile(str(base)).model
    data = Config.fromfile(str(configs / "_base_" / "datasets" / "coco_instance.py"))
    model.backbone = _swin_backbone(size)
    model.neck.in_channels = [96, 192, 384, 768]
    model.roi_head.bbox_head = [_giou_4conv1fc_head(stds) for stds in _CASCADE_TARGET_STDS]
    return Config(dict(model=model.to_dict(), test_pipeline=copy.deepcopy(data.test_pipeline)))


def _cascade_t() -> Config:
    return cascade_mask_rcnn_swin_config("t")


def _cascade_s() -> Config:
    return cascade_mask_rcnn_swin_config("s")


def _spec(name: str, detector: str, size: str, box_ap: float, mask_ap: float, checkpoint: str,
          official_config: str, **source: Any) -> DetectorSpec:
    embed_dims, depths, num_heads = _SWIN_SIZES[size]
    label = {"mask-rcnn": "Mask R-CNN", "cascade-mask-rcnn": "Cascade Mask R-CNN"}[detector]
    return DetectorSpec(
        name=name,
        description=f"{label} with a Swin-{size.upper()} backbone, FPN, 3x multi-scale schedule "
        f"(COCO, official {SWIN_FORK_REPO} checkpoint)",
        detector=detector,
        backbone=f"swin-{size}",
        embed_dims=embed_dims,
        depths=depths,
        num_heads=num_heads,
        box_ap=box_ap,
        mask_ap=mask_ap,
        checkpoint=checkpoint,
        checkpoint_url=_RELEASES + checkpoint,
        official_config=official_config,
        **source,
    )


_FORK_CONFIG = "configs/swin/{}_swin_{}_patch4_window7_mstrain_480-800_{}adamw_3x_coco.py"

#: Our model names -> their specs (float APs from the spec table, section 2.1).
DETECTORS: Mapping[str, DetectorSpec] = {
    spec.name: spec
    for spec in (
        _spec(
            "mask-rcnn-swin-t", "mask-rcnn", "t", 46.0, 41.6,
            "mask_rcnn_swin_tiny_patch4_window7.pth",
            _FORK_CONFIG.format("mask_rcnn", "tiny", ""),
            mmdet_config="swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py",
        ),
        _spec(
            "mask-rcnn-swin-s", "mask-rcnn", "s", 48.5, 43.3,
            "mask_rcnn_swin_small_patch4_window7.pth",
            _FORK_CONFIG.format("mask_rcnn", "small", ""),
            mmdet_config="swin/mask-rcnn_swin-s-p4-w7_fpn_amp-ms-crop-3x_coco.py",
        ),
        _spec(
            "cascade-mask-rcnn-swin-t", "cascade-mask-rcnn", "t", 50.4, 43.7,
            "cascade_mask_rcnn_swin_tiny_patch4_window7.pth",
            _FORK_CONFIG.format("cascade_mask_rcnn", "tiny", "giou_4conv1f_"),
            config_builder=_cascade_t,
        ),
        _spec(
            "cascade-mask-rcnn-swin-s", "cascade-mask-rcnn", "s", 51.9, 45.0,
            "cascade_mask_rcnn_swin_small_patch4_window7.pth",
            _FORK_CONFIG.format("cascade_mask_rcnn", "small", "giou_4conv1f_"),
            config_builder=_cascade_s,
        ),
    )
}


def detector_spec(name: str) -> DetectorSpec:
    """The spec of detector ``name`` (case-insensitive, ``-`` and ``_`` equal).

    An unknown name raises :class:`~benchsuite.errors.UnknownNameError` (a ``KeyError``) with the
    closest known name, the same wording as unknown methods and tasks.
    """
    by_norm = {normalize(key): spec for key, spec in DETECTORS.items()}
    spec = by_norm.get(normalize(name))
    if spec is None:
        raise UnknownNameError(
            f"unknown detector {name!r}{suggestion(name, DETECTORS)}; "
            f"known detectors: {', '.join(sorted(DETECTORS))}"
        )
    return spec


def _sync_bn_to_bn(node: Any) -> Any:
    """``node`` with every ``type='SyncBN'`` norm config turned into ``type='BN'`` (in place).

    SyncBN wants a process group (one device here); eval-mode BN computes the same thing from the
    same running statistics, and mmcv names both ``bn``, so checkpoint keys do not change.
    """
    if isinstance(node, Mapping):
        if node.get("type") == "SyncBN":
            node["type"] = "BN"
        for value in node.values():
            _sync_bn_to_bn(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _sync_bn_to_bn(value)
    return node


def detector_config(name: str) -> Config:
    """The mmdet 3.3 config of detector ``name``: ``model`` and ``test_pipeline``.

    ``model`` includes mmdet's ``DetDataPreprocessor`` (ImageNet mean/std in RGB,
    ``bgr_to_rgb=True``, ``pad_size_divisor=32``, ``pad_mask=True``) and the test settings;
    ``test_pipeline`` is mmdet's COCO instance test pipeline (load, ``Resize`` to (1333, 800) with
    ``keep_ratio=True``, no flip, load annotations, pack). Two edits to mmdet's configs, both
    without effect on the evaluated outputs: the backbone gets ``init_cfg=None`` and
    ``convert_weights=False`` (never download ImageNet weights; the whole detector's checkpoint is
    loaded later, already converted), and any SyncBN becomes BN (one device; see
    :func:`_sync_bn_to_bn`). The rest of the training config (schedule, optimizer, train pipeline,
    dataloaders, hooks) is left out: benchsuite builds its own evaluation loop.
    """
    from mmengine.config import Config

    spec = detector_spec(name)
    if spec.mmdet_config is not None:
        full = Config.fromfile(str(mmdet_config_dir() / spec.mmdet_config))
        config = Config(
            dict(model=full.model.to_dict(), test_pipeline=copy.deepcopy(full.test_pipeline))
        )
    else:
        assert spec.config_builder is not None
        config = spec.config_builder()
    config.model.backbone.init_cfg = None
    config.model.backbone.convert_weights = False
    _sync_bn_to_bn(config.model)
    return config


_REGISTERED = False


def register_mmdet_modules() -> None:
    """Register mmdet's modules in mmengine's registries once (and make ``mmdet`` the default
    scope), so that ``MODELS.build`` finds ``MaskRCNN``, ``SwinTransformer``, ... ."""
    global _REGISTERED
    if not _REGISTERED:
        from mmdet.utils import register_all_modules

        register_all_modules(init_default_scope=True)
        _REGISTERED = True


def build_detector(name: str) -> torch.nn.Module:
    """Detector ``name`` built from :func:`detector_config`, in eval mode, with random weights.

    The weights are PyTorch's constructor defaults (``init_weights`` is not called: it only
    re-randomises, or, with a ``Pretrained`` ``init_cfg``, downloads ImageNet weights); load a
    checkpoint, e.g. from :func:`benchsuite.detection.checkpoint.load_detection_checkpoint`, with
    ``load_state_dict(strict=True)``. Nothing is downloaded.
    """
    config = detector_config(name)
    register_mmdet_modules()
    from mmdet.registry import MODELS

    model = MODELS.build(config.model)
    model.eval()  # mmdet's SwinTransformer.train() returns None, so do not chain
    return model
