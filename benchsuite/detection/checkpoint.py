"""The official Swin detection checkpoints (mmdet 2.x) in mmdetection 3.x's key layout.

The Mask R-CNN and Cascade Mask R-CNN Swin-T/S weights released with
SwinTransformer/Swin-Transformer-Object-Detection were trained with mmdet 2.11 and that
repository's own ``SwinTransformer``. mmdet 3.3's ``mmdet.models.backbones.SwinTransformer`` holds
the same parameters under other names, and its ``PatchMerging`` orders the merged channels
differently (see :func:`reorder_patch_merging_channels`). The conversion, under ``backbone.``:

==============================================  ===============================================
official (mmdet 2.x Swin repository)            mmdet 3.3
==============================================  ===============================================
``patch_embed.proj.*``                          ``patch_embed.projection.*``
``layers.i.blocks.j.attn.qkv.*``, ``.proj.*``,  ``stages.i.blocks.j.attn.w_msa.`` + same name
``.relative_position_bias_table``,
``.relative_position_index``
``layers.i.blocks.j.mlp.fc1.*``                 ``stages.i.blocks.j.ffn.layers.0.0.*``
``layers.i.blocks.j.mlp.fc2.*``                 ``stages.i.blocks.j.ffn.layers.1.*``
``layers.i.blocks.j.norm1.*``, ``norm2.*``      ``stages.i.blocks.j.norm1.*``, ``norm2.*``
``layers.i.downsample.reduction.weight``        ``stages.i.downsample.reduction.weight``, columns
                                                reordered
``layers.i.downsample.norm.weight``, ``.bias``  ``stages.i.downsample.norm.*``, reordered
``absolute_pos_embed`` (1, C, H, W)             ``absolute_pos_embed`` (1, H*W, C)
``layers.i.blocks.j.attn_mask``                 dropped
``patch_embed.norm.*``, ``norm{i}.*``           unchanged
==============================================  ===============================================

Buffers: ``relative_position_index`` is kept, because mmdet 3's ``WindowMSA`` registers it as a
persistent buffer (a strict load expects it) and its values depend on the window size alone, with
the same indices in both implementations (the tests check this), so loading the stored copy changes
nothing. ``attn_mask`` is dropped: only the official *classification* Swin stores a shift mask
(for its one fixed input size); the detection Swin and mmdet 3 build the mask for each input in
``forward``, so mmdet 3 has nothing to load it into. ``absolute_pos_embed`` exists only for
``ape=True`` (no released Swin-T/S detector uses it); note that mmdet 3 adds it unresized, so such a
model runs only at its pre-training resolution.

Everything outside ``backbone.`` passes through unchanged: the FPN (``neck.lateral_convs.k.conv``,
``neck.fpn_convs.k.conv``), ``RPNHead`` (``rpn_head.rpn_conv`` / ``rpn_cls`` / ``rpn_reg``), the
bbox heads (``shared_convs.k.conv`` / ``.bn``, ``shared_fcs.k``, ``fc_cls``, ``fc_reg``),
``FCNMaskHead`` (``convs.k.conv``, ``upsample``, ``conv_logits``) and the cascade stage index
(``roi_head.bbox_head.s.``, ``roi_head.mask_head.s.``) use the same module attribute names in
mmdet 2.11 and 3.3 (mmcv's ``ConvModule`` keeps ``conv`` / ``bn`` in both), so their keys agree.

Why not mmdet's own ``mmdet.models.backbones.swin.swin_converter``: it converts a *backbone-only*
(classification) state dict and prefixes every key with ``backbone.``. Given a detector's state
dict (keys already under ``backbone.``, plus neck and heads) it converts nothing and prefixes
everything a second time; mmdet only calls it from ``SwinTransformer.init_weights`` with an
``init_cfg`` of type ``Pretrained`` and ``convert_weights=True``, a path that loading a whole
detector never takes; and it is not idempotent (it would reorder an already converted
``PatchMerging`` again). The tests check that both give the same tensors on a backbone state dict.
"""

from __future__ import annotations

import contextlib
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from benchsuite.errors import DataError
from benchsuite.weights import load_weights_file

__all__ = [
    "convert_swin_detection_state_dict",
    "load_detection_checkpoint",
    "reorder_patch_merging_channels",
    "swin_checkpoint_layout",
]

_LABEL = "Swin detection"
_BACKBONE = "backbone."

#: Key prefixes that only the official (mmdet 2.x Swin repository) layout has, and only mmdet 3's.
_OFFICIAL_MARKS = ("backbone.layers.", "backbone.patch_embed.proj.")
_MMDET3_MARKS = ("backbone.stages.", "backbone.patch_embed.projection.")

#: Official block parameter (after ``layers.i.blocks.j.``) -> mmdet 3 name (after ``stages.i.blocks.j.``).
_BLOCK_NAMES = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "attn.qkv.weight": "attn.w_msa.qkv.weight",
    "attn.qkv.bias": "attn.w_msa.qkv.bias",
    "attn.proj.weight": "attn.w_msa.proj.weight",
    "attn.proj.bias": "attn.w_msa.proj.bias",
    "attn.relative_position_bias_table": "attn.w_msa.relative_position_bias_table",
    "attn.relative_position_index": "attn.w_msa.relative_position_index",
    "mlp.fc1.weight": "ffn.layers.0.0.weight",
    "mlp.fc1.bias": "ffn.layers.0.0.bias",
    "mlp.fc2.weight": "ffn.layers.1.weight",
    "mlp.fc2.bias": "ffn.layers.1.bias",
}
#: Official block buffers that mmdet 3 does not keep (see the module docstring).
_DROPPED_BLOCK_BUFFERS = frozenset({"attn_mask"})
#: Official ``PatchMerging`` parameters (after ``layers.i.downsample.``), all reordered.
_MERGING_NAMES = frozenset({"reduction.weight", "norm.weight", "norm.bias"})
#: Backbone parameters outside the stages whose names do not change.
_KEPT_TOP = re.compile(r"(patch_embed\.norm|norm\d+)\.(weight|bias)")
_STAGE_KEY = re.compile(r"layers\.(\d+)\.(blocks\.(\d+)|downsample)\.(.+)")

#: For each slot p = 2*dy + dx of mmdet 3's unfold order, the official concat slot dy + 2*dx.
_UNFOLD_TO_OFFICIAL = [0, 2, 1, 3]

#: Plain builtins that a weights-only load refuses by default but that rebuild no code: allowed in
#: a checkpoint's ``meta``. Nothing else is: see :func:`load_detection_checkpoint`.
_META_SAFE_GLOBALS = [frozenset]


def reorder_patch_merging_channels(tensor: Tensor) -> Tensor:
    """A ``PatchMerging`` ``reduction.weight`` (2-D) or ``norm.weight``/``.bias`` (1-D), official
    channel order -> mmdet 3's.

    Both merge each 2x2 neighbourhood of a C-channel map into 4C channels, with the pixel at row
    offset ``dy`` and column offset ``dx`` (0 or 1) in the window:

    - official Swin (``torch.cat([x0, x1, x2, x3], -1)`` with ``x0 = x[:, 0::2, 0::2]``,
      ``x1 = x[:, 1::2, 0::2]``, ``x2 = x[:, 0::2, 1::2]``, ``x3 = x[:, 1::2, 1::2]``) is
      pixel-major and walks the window column by column: channel ``c`` of pixel
      ``q = dy + 2*dx`` sits at ``q*C + c``;
    - mmdet 3 (``nn.Unfold(kernel_size=2, stride=2)`` on the ``(B, C, H, W)`` map) is
      channel-major and walks the window row by row: channel ``c`` of pixel ``p = 2*dy + dx`` sits
      at ``c*4 + p``.

    So the new feature ``c*4 + p`` is the old feature ``q(p)*C + c`` with ``q(p) = (0, 2, 1, 3)[p]``
    (the two middle pixels swap, and channel and pixel axes trade places). The reduction's columns
    and the merging LayerNorm's per-feature affine parameters follow the features (the LayerNorm's
    statistics do not depend on their order), so the converted layer gives the same outputs. The
    map is a permutation but not an involution: applying it to converted weights scrambles them,
    which is why :func:`convert_swin_detection_state_dict` detects the layout first.
    """
    if tensor.ndim not in (1, 2) or tensor.shape[-1] % 4:
        raise DataError(
            f"{_LABEL} weights: a PatchMerging tensor has shape {tuple(tensor.shape)}, "
            "expected (4C,) or (out, 4C)"
        )
    *lead, merged = tensor.shape
    slots = tensor.reshape(*lead, 4, merged // 4)[..., _UNFOLD_TO_OFFICIAL, :]
    return slots.transpose(-1, -2).reshape(*lead, merged).contiguous()


def swin_checkpoint_layout(state: Mapping[str, Tensor]) -> Literal["official", "mmdet3"]:
    """Which key layout a Swin detector's state dict uses: ``"official"`` (the mmdet 2.x Swin
    repository: ``backbone.layers.*``) or ``"mmdet3"`` (``backbone.stages.*``).

    A dict with neither, or with both, raises :class:`~benchsuite.errors.DataError`.
    """
    official = [key for key in state if key.startswith(_OFFICIAL_MARKS)]
    mmdet3 = [key for key in state if key.startswith(_MMDET3_MARKS)]
    if official and mmdet3:
        raise DataError(
            f"{_LABEL} weights mix the official Swin layout ({official[0]!r}) with mmdet 3's "
            f"({mmdet3[0]!r}); expected one of them"
        )
    if official:
        return "official"
    if mmdet3:
        return "mmdet3"
    keys = list(state)
    if any(key.startswith(("layers.", "stages.", "patch_embed.")) for key in keys):
        hint = "this looks like a backbone-only (classification) checkpoint, not a detector's"
    else:
        hint = f"first keys: {', '.join(keys[:3]) or '(none)'}"
    raise DataError(
        f"{_LABEL} weights have no Swin backbone keys in the official layout (backbone.layers.*) "
        f"or mmdet 3's (backbone.stages.*); {hint}"
    )


def convert_swin_detection_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A Swin detector's state dict in mmdetection 3.3's key layout.

    ``state`` is the ``state_dict`` of an official Swin detection checkpoint (Mask R-CNN, Cascade
    Mask R-CNN, ... from SwinTransformer/Swin-Transformer-Object-Detection, mmdet 2.x), without
    a ``module.`` prefix. Backbone keys are renamed, ``PatchMerging`` tensors reordered and
    ``attn_mask`` buffers dropped as the module docstring lists; neck and head keys pass through.
    A dict already in mmdet 3's layout comes back unchanged (as a new dict), so converting twice is
    harmless. A dict in neither layout, or an official backbone key this does not know, raises
    :class:`~benchsuite.errors.DataError` (a silently partial conversion would benchmark a
    half-random model). Tensors are not copied unless reordered or reshaped.
    """
    if swin_checkpoint_layout(state) == "mmdet3":
        return dict(state)
    converted: dict[str, Tensor] = {}
    for key, value in state.items():
        if not key.startswith(_BACKBONE):
            converted[key] = value
            continue
        renamed = _convert_backbone_entry(key[len(_BACKBONE) :], value)
        if renamed is not None:
            converted[_BACKBONE + renamed[0]] = renamed[1]
    return converted


def load_detection_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The weights of a Swin detection checkpoint file, on the CPU, in mmdet 3.3's key layout.

    ``.pt``/``.pth``/``.bin`` files are read with ``torch.load(weights_only=True)`` (as every
    benchsuite checkpoint is, by :func:`benchsuite.weights.load_weights_file`), anything else as
    safetensors. The weights are taken from ``state_dict`` (or ``model``) when the file nests them
    there, next to mmdet's ``meta`` (versions, time, config text, class names: plain strings,
    numbers, tuples and dicts, which a weights-only load accepts; ``frozenset`` is allowed too) and
    any ``optimizer`` state. A ``module.`` prefix is stripped, then
    :func:`convert_swin_detection_state_dict` converts an official checkpoint (an mmdet 3 one
    passes unchanged).

    A checkpoint that pickles any other object (an mmengine ``HistoryBuffer`` in ``message_hub``,
    a numpy scalar, a custom class) is refused with a :class:`~benchsuite.errors.DataError` naming
    it, never unpickled: re-save only its weights, or convert them to safetensors, on a machine
    where the file is trusted.
    """
    allow = getattr(torch.serialization, "safe_globals", None)
    with allow(list(_META_SAFE_GLOBALS)) if allow is not None else contextlib.nullcontext():
        try:
            state = load_weights_file(path, label=_LABEL)
        except DataError as exc:
            message = _weights_only_message(exc, Path(path).expanduser())
            if message is None:
                raise
            raise DataError(message) from None
    return convert_swin_detection_state_dict(_strip_module_prefix(state))


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _convert_backbone_entry(name: str, value: Tensor) -> tuple[str, Tensor] | None:
    """One official backbone entry (without ``backbone.``) -> its mmdet 3 name and value, or None
    when mmdet 3 keeps no such tensor."""
    if name in ("patch_embed.proj.weight", "patch_embed.proj.bias"):
        return name.replace("patch_embed.proj.", "patch_embed.projection.", 1), value
    if _KEPT_TOP.fullmatch(name):
        return name, value
    if name == "absolute_pos_embed":
        if value.ndim != 4:
            raise DataError(
                f"{_LABEL} weights: backbone.absolute_pos_embed has shape {tuple(value.shape)}, "
                "expected (1, C, H, W) in the official layout"
            )
        return name, value.flatten(2).transpose(1, 2).contiguous()
    match = _STAGE_KEY.fullmatch(name)
    if match is not None:
        stage, block, rest = match.group(1), match.group(3), match.group(4)
        if block is not None:
            if rest in _DROPPED_BLOCK_BUFFERS:
                return None
            if rest in _BLOCK_NAMES:
                return f"stages.{stage}.blocks.{block}.{_BLOCK_NAMES[rest]}", value
        elif rest in _MERGING_NAMES:
            return f"stages.{stage}.downsample.{rest}", reorder_patch_merging_channels(value)
    raise DataError(f"{_LABEL} weights: unknown key 'backbone.{name}' in the official Swin layout")


def _strip_module_prefix(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` without the ``module.`` that (Distributed)DataParallel puts before every key."""
    stripped: dict[str, Tensor] = {}
    for key, value in state.items():
        name = key[len("module.") :] if key.startswith("module.") else key
        if name in stripped:
            raise DataError(f"{_LABEL} weights hold {name!r} twice once 'module.' is removed")
        stripped[name] = value
    return stripped


def _weights_only_message(exc: DataError, path: Path) -> str | None:
    """A clearer message when ``exc`` comes from the weights-only unpickler, else None.

    :func:`benchsuite.weights.load_weights_file` raises its DataError ``from None`` inside the
    ``except`` block, so the reader's own error stays on ``__context__`` (only its display is
    suppressed). The unpickler's first line says only that loading failed and suggests
    ``weights_only=False``; this names the refused global instead, or gives the unpickler's reason.
    """
    reader = exc.__context__
    if not isinstance(reader, pickle.UnpicklingError):
        return None
    text = str(reader)
    if "Weights only load failed" not in text and "WeightsUnpickler" not in text:
        return None
    named = re.search(r"GLOBAL ([\w.]+)", text)
    if named is not None:
        return (
            f"{_LABEL} weights {str(path)!r} pickle a {named.group(1)} object, which benchsuite does "
            "not unpickle (a weights-only load); on a machine where you trust the file, re-save just "
            "its 'state_dict' with torch.save, or convert it to .safetensors"
        )
    reason = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    detail = reason.group(1).strip() if reason else "not a weights-only checkpoint"
    return f"cannot read {_LABEL} weights {str(path)!r}: {detail} (weights-only load)"
