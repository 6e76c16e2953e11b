"""Point-MAE fine-tuned models (ModelNet40 classification, ShapeNetPart part segmentation).

Re-implementations of ``PointTransformer`` (``models/Point_MAE.py``) and the part-segmentation
``get_model`` (``segmentation/models/pt.py``) of ``Pang-Yatian/Point-MAE``. Their ``state_dict()``
keys and shapes are those of the released checkpoints (``modelnet_1k.pth``, ``part_seg.pth``),
with the defaults of ``cfgs/finetune_modelnet.yaml`` and of the segmentation code; smaller
variants (for tests and demos) change the constructor arguments.

Both models take one tensor, so the rest of benchsuite (calibration sets, reconstruction caches)
treats a batch as it treats images:

- classifier: ``points (B, N, 3)`` → logits ``(B, num_classes)``;
- segmenter: ``(B, N, 3 + num_categories)``, the xyz followed by the shape's category one-hot
  repeated on every point (:func:`pack_segmentation_input`) → part logits ``(B, num_parts, N)``.
  The reference ends with ``log_softmax`` over parts; it is left out (a per-point shift, so the
  argmax over any subset of parts, which the ShapeNetPart metrics take, is unchanged).

Checkpoints load with :func:`load_point_mae_checkpoint` (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchsuite.errors import DataError
from benchsuite.pointcloud.layers import (
    FeaturePropagation,
    Group,
    PointEncoder,
    PointwiseConv,
    TokenBatchNorm,
    TransformerEncoder,
)
from benchsuite.pointcloud.ops import Backend

__all__ = [
    "PointMAEClassifier",
    "PointMAESegmenter",
    "default_feature_blocks",
    "load_point_mae_checkpoint",
    "pack_segmentation_input",
    "point_mae_state_dict",
]


def _position_embedding(dim: int) -> nn.Sequential:
    """Center xyz → token-sized position embedding (Linear 3→128, GELU, Linear 128→dim)."""
    return nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, dim))


def _check_points(points: torch.Tensor, channels: int, what: str) -> None:
    if points.ndim != 3 or points.shape[-1] != channels:
        raise ValueError(f"{what} expects (B, N, {channels}) input, got {tuple(points.shape)}")


class PointMAEClassifier(nn.Module):
    """Point-MAE's ModelNet40 classifier: ``points (B, N, 3) → logits (B, num_classes)``.

    Tokens: FPS ``num_groups`` centers, kNN ``group_size`` neighbours, mini-PointNet encoder; a
    class token is prepended and the position embedding (of the centers; a learned one for the
    class token) is added before every block. The head reads ``[cls, max over group tokens]`` of
    the final LayerNorm's output: Linear → BN → ReLU → Dropout, twice, then Linear.
    """

    def __init__(
        self,
        num_classes: int = 40,
        *,
        dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        num_groups: int = 64,
        group_size: int = 32,
        mlp_ratio: float = 4.0,
        head_hidden: int = 256,
        drop_path_rate: float = 0.1,
        pointnet2_ops_compat: bool = True,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dim = dim
        self.group_divider = Group(
            num_groups, group_size, pointnet2_ops_compat=pointnet2_ops_compat, backend=backend
        )
        self.encoder = PointEncoder(dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = _position_embedding(dim)
        self.blocks = TransformerEncoder(
            dim, depth, num_heads, mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate, scale_queries=False
        )
        self.norm = nn.LayerNorm(dim)
        # Indices 0, 4, 8 (Linears) and 1, 5 (BN) are the checkpoint's cls_head_finetune.* keys.
        self.cls_head_finetune = nn.Sequential(
            nn.Linear(2 * dim, head_hidden),
            nn.BatchNorm1d(head_hidden),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(head_hidden, head_hidden),
            nn.BatchNorm1d(head_hidden),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(head_hidden, num_classes),
        )
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.cls_pos, std=0.02)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        _check_points(points, 3, type(self).__name__)
        neighbourhood, center = self.group_divider(points)
        tokens = self.encoder(neighbourhood)
        batch = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(batch, -1, -1), tokens], dim=1)
        pos = torch.cat([self.cls_pos.expand(batch, -1, -1), self.pos_embed(center)], dim=1)
        x = self.norm(self.blocks(x, pos))
        pooled = torch.cat([x[:, 0], x[:, 1:].max(dim=1).values], dim=-1)
        return self.cls_head_finetune(pooled)


def default_feature_blocks(depth: int) -> tuple[int, ...]:
    """The blocks whose outputs the segmentation head reads: the last of each third.

    ``(3, 7, 11)`` for depth 12, as in the reference; ``(0, 1, 2)`` for depth 3.
    """
    if depth < 3:
        raise ValueError(f"the default feature blocks need depth >= 3, got {depth}; pass feature_blocks")
    return (depth // 3 - 1, 2 * depth // 3 - 1, depth - 1)


class PointMAESegmenter(nn.Module):
    """Point-MAE's ShapeNetPart part segmenter: ``(B, N, 3 + C) → part logits (B, num_parts, N)``.

    The input is xyz followed by the category one-hot on every point (:func:`pack_segmentation_input`);
    the one-hot is read from the first point. The outputs of ``feature_blocks`` are normalized by
    the shared final LayerNorm and concatenated per token; their max and mean over tokens and an
    embedding of the category form a global feature; a PointNet++ feature propagation
    interpolates the token features back onto every point; three pointwise convs give the logits.
    """

    def __init__(
        self,
        num_parts: int = 50,
        num_categories: int = 16,
        *,
        dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        num_groups: int = 128,
        group_size: int = 32,
        mlp_ratio: float = 4.0,
        feature_blocks: Sequence[int] | None = None,
        label_channels: int = 64,
        propagation_channels: Sequence[int] | None = None,
        head_channels: tuple[int, int] = (512, 256),
        drop_path_rate: float = 0.1,
        pointnet2_ops_compat: bool = True,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        self.num_parts = num_parts
        self.num_categories = num_categories
        self.dim = dim
        self.feature_blocks = tuple(feature_blocks) if feature_blocks is not None else default_feature_blocks(depth)
        if not self.feature_blocks or any(not 0 <= i < depth for i in self.feature_blocks):
            raise ValueError(f"feature_blocks {self.feature_blocks} must be block indices below depth {depth}")
        if len(set(self.feature_blocks)) != len(self.feature_blocks):
            raise ValueError(f"feature_blocks {self.feature_blocks} repeat a block")
        self.feature_blocks = tuple(sorted(self.feature_blocks))
        token_features = len(self.feature_blocks) * dim
        propagation = tuple(propagation_channels) if propagation_channels is not None else (4 * dim, 1024)

        self.group_divider = Group(
            num_groups, group_size, pointnet2_ops_compat=pointnet2_ops_compat, backend=backend
        )
        self.encoder = PointEncoder(dim)
        self.pos_embed = _position_embedding(dim)
        self.blocks = TransformerEncoder(
            dim, depth, num_heads, mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate, scale_queries=True
        )
        self.norm = nn.LayerNorm(dim)
        self.label_conv = nn.Sequential(
            PointwiseConv(num_categories, label_channels, bias=False),
            TokenBatchNorm(label_channels),
            nn.LeakyReLU(0.2),
        )
        self.propagation_0 = FeaturePropagation(token_features + 3, propagation)
        self.convs1 = PointwiseConv(propagation[-1] + 2 * token_features + label_channels, head_channels[0])
        self.dp1 = nn.Dropout(0.5)
        self.convs2 = PointwiseConv(head_channels[0], head_channels[1])
        self.convs3 = PointwiseConv(head_channels[1], num_parts)
        self.bns1 = TokenBatchNorm(head_channels[0])
        self.bns2 = TokenBatchNorm(head_channels[1])
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_points(x, 3 + self.num_categories, type(self).__name__)
        points, category = x[..., :3], x[:, :1, 3:]  # category: (B, 1, C), taken from point 0
        batch, num_points, _ = points.shape
        neighbourhood, center = self.group_divider(points)
        tokens = self.encoder(neighbourhood)
        levels = self.blocks.collect(tokens, self.pos_embed(center), self.feature_blocks)
        features = torch.cat([self.norm(level) for level in levels], dim=-1)  # (B, G, levels·dim)
        label = self.label_conv(category).squeeze(1)
        global_feature = torch.cat([features.max(dim=1).values, features.mean(dim=1), label], dim=-1)
        propagated = self.propagation_0(points, center, points, features)
        h = torch.cat([propagated, global_feature.unsqueeze(1).expand(batch, num_points, -1)], dim=-1)
        h = self.dp1(self.relu(self.bns1(self.convs1(h))))
        h = self.relu(self.bns2(self.convs2(h)))
        return self.convs3(h).transpose(1, 2)


def pack_segmentation_input(
    points: torch.Tensor, category: torch.Tensor, num_categories: int = 16
) -> torch.Tensor:
    """The segmenter's single input tensor: ``points (B, N, 3)`` with the category on every point.

    ``category`` is a one-hot ``(B, num_categories)`` or integer ids ``(B,)``. The result is
    ``(B, N, 3 + num_categories)`` in ``points``' dtype.
    """
    _check_points(points, 3, "pack_segmentation_input")
    batch, num_points, _ = points.shape
    if category.ndim == 1:
        if category.dtype.is_floating_point:
            raise ValueError("integer category ids are expected when category is 1-D")
        category = nn.functional.one_hot(category.long(), num_categories)
    if category.shape != (batch, num_categories):
        raise ValueError(
            f"category must be ({batch}, {num_categories}) one-hot or ({batch},) ids, got {tuple(category.shape)}"
        )
    onehot = category.to(device=points.device, dtype=points.dtype)
    return torch.cat([points, onehot.unsqueeze(1).expand(batch, num_points, num_categories)], dim=-1)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

#: Where Point-MAE's training scripts nest the weights: ``base_model`` (tools/builder.py
#: save_checkpoint), ``model`` (accepted by its load_model), ``model_state_dict``
#: (segmentation/main.py).
_CONTAINER_KEYS = ("base_model", "model", "model_state_dict", "state_dict")
#: Prefixes Point-MAE's loaders strip: ``module.`` (DataParallel), ``base_model.`` and
#: ``MAE_encoder.`` (pre-training checkpoints, see load_model_from_ckpt).
_PREFIXES = ("module.", "base_model.", "MAE_encoder.")


def _numpy_scalar_globals() -> list:
    """Allow-list for the numpy scalars (epoch metrics) that Point-MAE's checkpoints pickle.

    ``segmentation/main.py`` saves accuracies computed with numpy next to the weights; rebuilding
    a numeric numpy scalar runs no user code, so they are allowed, under their numpy 1 and 2 names.
    """
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    allowed: list = [
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
    ]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType"):
            if hasattr(dtypes, name):
                allowed.append(getattr(dtypes, name))
    return allowed


def _read_checkpoint(path: Path) -> object:
    if not path.is_file():
        raise DataError(f"Point-MAE checkpoint {str(path)!r} does not exist")
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every reader error means an unusable file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"cannot read Point-MAE checkpoint {str(path)!r}: {first}") from None


def point_mae_state_dict(checkpoint: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """The model weights of a Point-MAE checkpoint, with the training wrappers' prefixes removed.

    Accepts the whole saved dict (weights under ``base_model`` / ``model`` / ``model_state_dict``)
    or a bare state dict; strips leading ``module.``, ``base_model.`` and ``MAE_encoder.`` as
    Point-MAE's own loaders do (they also drop ``module.`` wherever it occurs, which no key of
    these models contains otherwise).
    """
    state: Mapping[str, object] = checkpoint
    for key in _CONTAINER_KEYS:
        nested = checkpoint.get(key)
        if isinstance(nested, Mapping) and nested:
            state = nested
            break
    cleaned: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise DataError(f"Point-MAE checkpoint entry {key!r} is a {type(value).__name__}, not a tensor")
        name = key
        while name.startswith(_PREFIXES):
            name = name.split(".", 1)[1]
        if name in cleaned:
            raise DataError(f"Point-MAE checkpoint has {name!r} twice once prefixes are removed")
        cleaned[name] = value
    return cleaned


def _listing(keys: Sequence[str], shown: int = 10) -> str:
    return ", ".join(keys[:shown]) + (f", ... ({len(keys) - shown} more)" if len(keys) > shown else "")


def load_point_mae_checkpoint(
    model: PointMAEClassifier | PointMAESegmenter,
    state_dict_or_path: Mapping[str, object] | str | Path,
) -> None:
    """Load official Point-MAE weights into ``model``, strictly.

    ``state_dict_or_path`` is a checkpoint file (read with ``torch.load(weights_only=True)``), a
    loaded checkpoint dict, or a state dict, in Point-MAE's layout with or without its prefixes.
    Any missing or unexpected key, or a shape mismatch, raises :class:`~benchsuite.errors.DataError`
    naming them, since a silently partial load would benchmark a half-random model.
    """
    if isinstance(state_dict_or_path, (str, Path)):
        source = str(state_dict_or_path)
        checkpoint = _read_checkpoint(Path(state_dict_or_path).expanduser())
        if not isinstance(checkpoint, Mapping):
            raise DataError(f"Point-MAE checkpoint {source!r} holds a {type(checkpoint).__name__}, not a dict")
    else:
        source, checkpoint = "state dict", state_dict_or_path
    state = point_mae_state_dict(checkpoint)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    where = f"Point-MAE {source!r} does not fit {type(model).__name__}"
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        if any(key.startswith("MAE_decoder.") for key in unexpected):
            parts.append("this looks like a pre-training checkpoint; a fine-tuned one is needed")
        raise DataError(f"{where}: {'; '.join(parts)}")
    mismatched = [
        f"{key} {tuple(state[key].shape)} vs {tuple(value.shape)}"
        for key, value in expected.items()
        if tuple(state[key].shape) != tuple(value.shape)
    ]
    if mismatched:
        raise DataError(f"{where}: shape mismatch (checkpoint vs model): {_listing(mismatched)}")
    model.load_state_dict(state, strict=True)
