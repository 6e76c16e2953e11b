"""The building blocks of Point-MAE, with the reference's state-dict layout and math.

Point-MAE (``Pang-Yatian/Point-MAE``) runs its mini-PointNet encoder and its segmentation head as
kernel-1 ``Conv1d`` + ``BatchNorm1d`` on channels-first tensors. Here the same layers run
channels-last (``(..., C)``), which keeps the batch as the first dim of every intermediate tensor
(so calibration caches and reconstruction units see one row per cloud) and lets the quantization
adapter wrap them as ordinary Linears:

- :class:`PointwiseConv` is an ``nn.Linear`` whose state dict reads and writes the ``Conv1d``
  layout (``weight`` of shape ``(out, in, 1)``), so official checkpoints load unchanged;
- :class:`TokenBatchNorm` is a ``BatchNorm1d`` applied over all leading dims.

The transformer (``Attention``, ``Mlp``, ``Block``, ``TransformerEncoder``) is the reference's
pre-LN ViT block with the position embedding added before *every* block, and attention computed
as separate q·kᵀ, softmax and attn·v ops (never a fused kernel) so the adapter can put quantizers
between them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from benchsuite.pointcloud.ops import Backend, farthest_point_sample, gather_points, knn

__all__ = [
    "Attention",
    "Block",
    "FeaturePropagation",
    "Group",
    "Mlp",
    "PointEncoder",
    "PointwiseConv",
    "TokenBatchNorm",
    "TransformerEncoder",
]


class PointwiseConv(nn.Linear):
    """A kernel-size-1 ``Conv1d`` applied channels-last: ``(..., in) → (..., out)``.

    The Parameter is 2-D (it *is* a Linear, so quantization wrappers and LayerNorm
    reparameterization treat it as one), while ``state_dict()`` and ``load_state_dict()`` use the
    ``Conv1d`` shape ``(out, in, 1)`` of the reference checkpoints.
    """

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[override]
        super()._save_to_state_dict(destination, prefix, keep_vars)
        key = prefix + "weight"
        destination[key] = destination[key].unsqueeze(-1)

    def _load_from_state_dict(  # type: ignore[override]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + "weight"
        value = state_dict.get(key)
        # state_dict is torch's private copy here, so replacing an entry does not touch the caller's.
        if isinstance(value, torch.Tensor) and value.ndim == 3 and value.shape[-1] == 1:
            state_dict[key] = value.squeeze(-1)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class TokenBatchNorm(nn.BatchNorm1d):
    """``BatchNorm1d`` over the last dim of a channels-last tensor of any rank.

    Flattening the leading dims gives the statistics that ``BatchNorm1d`` computes on the
    reference's ``(batch, C, length)`` tensors, in training as in eval.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


class Group(nn.Module):
    """FPS centers and their kNN neighbourhoods: ``(B, N, 3) → (B, G, K, 3), (B, G, 3)``.

    Neighbourhoods are centred on their center, as in the reference. ``pointnet2_ops_compat``
    (default on) reproduces the near-origin rule of the pointnet2_ops FPS kernel Point-MAE was
    trained and evaluated with.
    """

    def __init__(
        self,
        num_groups: int,
        group_size: int,
        *,
        pointnet2_ops_compat: bool = True,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        self.num_groups = num_groups
        self.group_size = group_size
        self.pointnet2_ops_compat = pointnet2_ops_compat
        self.backend: Backend = backend

    def forward(self, xyz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        centers_index = farthest_point_sample(
            xyz, self.num_groups, pointnet2_ops_compat=self.pointnet2_ops_compat, backend=self.backend
        )
        center = gather_points(xyz, centers_index)
        neighbours = knn(xyz, center, self.group_size, backend=self.backend)
        neighbourhood = gather_points(xyz, neighbours) - center.unsqueeze(2)
        return neighbourhood, center

    def extra_repr(self) -> str:
        return f"groups={self.num_groups}, size={self.group_size}, compat={self.pointnet2_ops_compat}"


def _conv_bn_relu_conv(in_channels: int, hidden: int, out_channels: int) -> nn.Sequential:
    # Indices 0 (conv), 1 (bn), 3 (conv) match the reference's Sequential; 2 is the parameter-free ReLU.
    return nn.Sequential(
        PointwiseConv(in_channels, hidden),
        TokenBatchNorm(hidden),
        nn.ReLU(),
        PointwiseConv(hidden, out_channels),
    )


class PointEncoder(nn.Module):
    """The mini-PointNet that turns each neighbourhood into one token: ``(B, G, K, 3) → (B, G, C)``.

    Per point: conv 3→128, BN, ReLU, conv 128→256; the max over the group is concatenated in
    front of every point's feature (256 + 256), then conv 512→512, BN, ReLU, conv 512→C, and a
    final max over the group.
    """

    def __init__(self, out_channels: int) -> None:
        super().__init__()
        self.encoder_channel = out_channels
        self.first_conv = _conv_bn_relu_conv(3, 128, 256)
        self.second_conv = _conv_bn_relu_conv(512, 512, out_channels)

    def forward(self, neighbourhood: torch.Tensor) -> torch.Tensor:
        feature = self.first_conv(neighbourhood)  # (B, G, K, 256)
        pooled = feature.max(dim=2, keepdim=True).values
        feature = torch.cat([pooled.expand_as(feature), feature], dim=-1)  # global first, as reference
        feature = self.second_conv(feature)
        return feature.max(dim=2).values


class Mlp(nn.Module):
    """fc1 → GELU → dropout → fc2 → dropout (one dropout module used twice, as in the reference)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention with explicit q·kᵀ, softmax and attn·v.

    Point-MAE's two code bases differ in where the scale goes: the classification model computes
    ``(q @ kᵀ) · scale`` (``models/Point_MAE.py``), the segmentation model ``(q · scale) @ kᵀ``
    (``segmentation/models/pt.py``). ``scale_queries`` selects the latter so each model keeps its
    reference's exact float order.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: bool = False,
        scale_queries: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.scale_queries = scale_queries
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.scale_queries:
            scores = (q * self.scale) @ k.transpose(-2, -1)
        else:
            scores = (q @ k.transpose(-2, -1)) * self.scale
        probs = self.attn_drop(scores.softmax(dim=-1))
        x = (probs @ v).transpose(1, 2).reshape(batch, tokens, channels)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        scale_queries: bool = False,
    ) -> None:
        super().__init__()
        # Registration order follows the reference, so state_dict() lists keys in its order too.
        self.norm1 = nn.LayerNorm(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.attn = Attention(dim, num_heads, scale_queries=scale_queries)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class TransformerEncoder(nn.Module):
    """A stack of blocks; the position embedding is added to the input of every block."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        scale_queries: bool = False,
    ) -> None:
        super().__init__()
        rates = torch.linspace(0, drop_path_rate, depth).tolist() if depth else []
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio=mlp_ratio, drop_path=rate, scale_queries=scale_queries)
            for rate in rates
        )

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x + pos)
        return x

    def collect(self, x: torch.Tensor, pos: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
        """The outputs of the blocks at ``indices`` (in block order), for multi-level heads."""
        wanted = set(indices)
        outputs = []
        for index, block in enumerate(self.blocks):
            x = block(x + pos)
            if index in wanted:
                outputs.append(x)
        return outputs


def square_distance(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Squared distances ``(B, N, M)``, summed in the reference's order (``−2ab + ‖a‖² + ‖b‖²``).

    The order matters: the propagation weights are ``1 / (d + 1e-8)`` and a point's distance to
    itself comes out as rounding noise around 0.
    """
    distance = -2 * torch.matmul(src, dst.transpose(1, 2))
    distance = distance + (src**2).sum(-1).unsqueeze(-1)
    return distance + (dst**2).sum(-1).unsqueeze(-2)


class FeaturePropagation(nn.Module):
    """PointNet++ feature propagation: interpolate token features back onto every point.

    Each point takes the inverse-distance-weighted mean of its 3 nearest centers' features,
    concatenated after its own features, then ``conv → BN → ReLU`` per entry of ``channels``.
    Channels-last version of the reference's ``PointNetFeaturePropagation``.
    """

    def __init__(self, in_channels: int, channels: Sequence[int]) -> None:
        super().__init__()
        self.mlp_convs = nn.ModuleList()
        self.mlp_bns = nn.ModuleList()
        last = in_channels
        for width in channels:
            self.mlp_convs.append(PointwiseConv(last, width))
            self.mlp_bns.append(TokenBatchNorm(width))
            last = width

    def forward(
        self,
        xyz: torch.Tensor,
        center: torch.Tensor,
        point_features: torch.Tensor | None,
        center_features: torch.Tensor,
    ) -> torch.Tensor:
        batch, points, _ = xyz.shape
        if center.shape[1] == 1:
            interpolated = center_features.expand(batch, points, center_features.shape[-1])
        else:
            distance, index = square_distance(xyz, center).sort(dim=-1)
            distance, index = distance[..., :3], index[..., :3]
            reciprocal = 1.0 / (distance + 1e-8)
            weight = reciprocal / reciprocal.sum(dim=-1, keepdim=True)
            interpolated = (gather_points(center_features, index) * weight.unsqueeze(-1)).sum(dim=2)
        features = interpolated if point_features is None else torch.cat([point_features, interpolated], dim=-1)
        for conv, norm in zip(self.mlp_convs, self.mlp_bns):
            features = F.relu(norm(conv(features)))
        return features
