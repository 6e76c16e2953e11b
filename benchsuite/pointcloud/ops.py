"""Point grouping ops: farthest point sampling, k nearest neighbours, and gathering by index.

Point-MAE tokenizes a cloud with the CUDA kernels of ``pointnet2_ops`` (FPS) and ``knn_cuda``
(kNN), which need a GPU and a compiled extension. These pure-torch versions run anywhere and
follow the same conventions (tasks spec §3.4), so a model evaluated on CPU groups points as the
reference does:

- FPS starts at index 0 and takes, at each step, the point whose running minimum squared distance
  to the chosen set is largest (running minimum initialised to 1e10); ties go to the lowest index
  (``argmax`` returns the first maximum, as the kernel's strict ``>`` reduction does).
- ``pointnet2_ops_compat=True`` also reproduces the kernel's near-origin rule: a point with
  x² + y² + z² ≤ 1e-3 is never chosen (index 0 is always the first sample whatever its norm).
- kNN ranks squared distances ``‖q‖² + ‖r‖² − 2 q·r`` with ``topk(largest=False)``; the query
  point itself is among its own neighbours when it belongs to the reference set.

``torch-cluster`` (the ``pointcloud`` extra) is an optional backend: ``backend="auto"`` uses it
when it imports, ``"torch"`` never does, ``"torch_cluster"`` insists. Its FPS has no near-origin
rule, so compat mode always runs the torch implementation. The two backends agree on tie-free
inputs (tested); tie order in kNN is implementation-defined in both.

All ops are vectorised over the batch; FPS loops once per sample (the method is sequential).
"""

from __future__ import annotations

import functools
from typing import Literal

import torch

__all__ = [
    "Backend",
    "farthest_point_sample",
    "gather_points",
    "knn",
    "torch_cluster_available",
]

Backend = Literal["auto", "torch", "torch_cluster"]

#: pointnet2_ops never samples a point with x² + y² + z² at or below this (except index 0).
NEAR_ORIGIN_SQ_NORM = 1e-3
#: The kernel's initial running minimum distance.
_FAR = 1e10


@functools.lru_cache(maxsize=1)
def torch_cluster_available() -> bool:
    """Whether ``torch_cluster`` imports (a wheel built for another torch fails here, not later)."""
    try:
        import torch_cluster  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or an OSError from a mismatched binary
        return False
    return True


def _resolve_backend(backend: Backend, *, compat: bool = False) -> Literal["torch", "torch_cluster"]:
    if backend not in ("auto", "torch", "torch_cluster"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'torch_cluster', got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "torch_cluster":
        if compat:
            raise ValueError(
                "pointnet2_ops_compat=True needs the torch backend: torch_cluster.fps has no near-origin rule"
            )
        if not torch_cluster_available():
            raise ModuleNotFoundError(
                "backend='torch_cluster' needs torch-cluster (pip install 'benchsuite[pointcloud]', "
                "or scripts/build_torch_cluster.sh)"
            )
        return "torch_cluster"
    return "torch_cluster" if torch_cluster_available() and not compat else "torch"


def _check_points(name: str, xyz: torch.Tensor) -> None:
    if xyz.ndim != 3 or xyz.shape[-1] != 3:
        raise ValueError(f"{name} must be (B, N, 3), got {tuple(xyz.shape)}")


def _squared_norm(xyz: torch.Tensor) -> torch.Tensor:
    """x² + y² + z², summed left to right as the CUDA kernel does (not a reordered reduction)."""
    return xyz[..., 0] * xyz[..., 0] + xyz[..., 1] * xyz[..., 1] + xyz[..., 2] * xyz[..., 2]


def farthest_point_sample(
    xyz: torch.Tensor,
    n: int,
    *,
    pointnet2_ops_compat: bool = False,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Indices ``(B, n)`` (int64) of ``n`` farthest-point samples of each cloud ``xyz (B, N, 3)``.

    The first sample is index 0. ``pointnet2_ops_compat=True`` additionally never picks a point
    with squared norm ≤ 1e-3 after the first, as pointnet2_ops does (Point-MAE's grouping); when
    every remaining point is excluded it falls back to index 0, as the kernel's default does.
    """
    _check_points("xyz", xyz)
    points = xyz.shape[1]
    if not 1 <= n <= points:
        raise ValueError(f"cannot sample {n} points from clouds of {points}")
    with torch.no_grad():
        if _resolve_backend(backend, compat=pointnet2_ops_compat) == "torch_cluster":
            return _fps_torch_cluster(xyz, n)
        return _fps_torch(xyz, n, pointnet2_ops_compat)


def _fps_torch(xyz: torch.Tensor, n: int, compat: bool) -> torch.Tensor:
    batch, points, _ = xyz.shape
    rows = torch.arange(batch, device=xyz.device)
    chosen = torch.zeros(batch, n, dtype=torch.long, device=xyz.device)
    running = xyz.new_full((batch, points), _FAR)
    excluded = _squared_norm(xyz) <= NEAR_ORIGIN_SQ_NORM if compat else None
    last = chosen[:, 0]
    for step in range(1, n):
        distance = _squared_norm(xyz - xyz[rows, last].unsqueeze(1))
        running = torch.minimum(running, distance)
        # Distances are >= 0, so -1 ranks an excluded point below every candidate; when all are
        # excluded argmax returns index 0, the kernel's initial best index.
        scores = running.masked_fill(excluded, -1.0) if excluded is not None else running
        last = scores.argmax(dim=1)  # first maximum: ties go to the lowest index
        chosen[:, step] = last
    return chosen


def _fps_torch_cluster(xyz: torch.Tensor, n: int) -> torch.Tensor:
    import torch_cluster

    batch, points, _ = xyz.shape
    ptr = torch.arange(0, (batch + 1) * points, points, device=xyz.device)
    # torch_cluster samples ceil(ratio · N) per cloud; asking for half a point more makes the
    # count n + 1 (or N) whatever the float rounding, and FPS is greedy, so the first n are exact.
    ratio = min(1.0, (n + 0.5) / points)
    flat = torch_cluster.fps(xyz.reshape(batch * points, 3), None, ratio, random_start=False, ptr=ptr)
    per_cloud = flat.numel() // batch
    if per_cloud < n:  # pragma: no cover - guards against a change in torch_cluster's count rule
        raise RuntimeError(f"torch_cluster.fps returned {per_cloud} samples per cloud, expected {n}")
    offsets = torch.arange(batch, device=xyz.device).unsqueeze(1) * points
    return flat.view(batch, per_cloud)[:, :n] - offsets


def knn(
    ref: torch.Tensor,
    query: torch.Tensor,
    k: int,
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Indices ``(B, M, k)`` into ``ref (B, N, 3)`` of the ``k`` nearest points to each query.

    Neighbours are ordered by increasing distance. Point-MAE calls this with the FPS centers as
    queries, so each group contains its own center.
    """
    _check_points("ref", ref)
    _check_points("query", query)
    if ref.shape[0] != query.shape[0]:
        raise ValueError(f"ref and query batch sizes differ: {ref.shape[0]} vs {query.shape[0]}")
    if not 1 <= k <= ref.shape[1]:
        raise ValueError(f"cannot take {k} neighbours from clouds of {ref.shape[1]} points")
    with torch.no_grad():
        if _resolve_backend(backend) == "torch_cluster":
            return _knn_torch_cluster(ref, query, k)
        return _knn_torch(ref, query, k)


def _knn_torch(ref: torch.Tensor, query: torch.Tensor, k: int) -> torch.Tensor:
    distance = (
        (query * query).sum(-1).unsqueeze(-1)
        + (ref * ref).sum(-1).unsqueeze(-2)
        - 2 * torch.matmul(query, ref.transpose(-1, -2))
    )
    return distance.topk(k, dim=-1, largest=False, sorted=True).indices


def _knn_torch_cluster(ref: torch.Tensor, query: torch.Tensor, k: int) -> torch.Tensor:
    import torch_cluster

    batch, points, _ = ref.shape
    queries = query.shape[1]
    device = ref.device
    batch_ref = torch.arange(batch, device=device).repeat_interleave(points)
    batch_query = torch.arange(batch, device=device).repeat_interleave(queries)
    row, col = torch_cluster.knn(ref.reshape(-1, 3), query.reshape(-1, 3), k, batch_ref, batch_query)
    if row.numel() != batch * queries * k:  # pragma: no cover - only when a cloud has < k points
        raise RuntimeError(f"torch_cluster.knn returned {row.numel()} pairs, expected {batch * queries * k}")
    col = col[torch.argsort(row, stable=True)].view(batch, queries, k)
    col = col - torch.arange(batch, device=device).view(batch, 1, 1) * points
    # torch_cluster does not promise an order within a query: sort by distance like the torch path.
    distance = (gather_points(ref, col) - query.unsqueeze(2)).pow(2).sum(-1)
    return col.gather(-1, torch.argsort(distance, dim=-1, stable=True))


def gather_points(points: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``points (B, N, C)`` picked by ``index (B, *S)`` → ``(B, *S, C)``, per cloud.

    Differentiable with respect to ``points`` (the indices are not).
    """
    if points.ndim != 3:
        raise ValueError(f"points must be (B, N, C), got {tuple(points.shape)}")
    if index.shape[0] != points.shape[0]:
        raise ValueError(f"index batch {index.shape[0]} does not match points batch {points.shape[0]}")
    rows = torch.arange(points.shape[0], device=points.device).view(-1, *([1] * (index.ndim - 1)))
    return points[rows, index]
