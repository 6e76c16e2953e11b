"""Small data helpers shared by the point-cloud tasks (ModelNet40, ShapeNetPart).

Each helper does one thing the reference loaders do inline, so every task does it the same way:
reading a text point file, normalizing a cloud into the unit sphere, and drawing a seeded
resample whose randomness depends only on (seed, shape id), never on iteration order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchsuite.errors import DataError

__all__ = [
    "fps_downsample",
    "normalize_unit_sphere",
    "read_point_txt",
    "resample_indices",
    "shape_rng",
]


def read_point_txt(path: str | Path, delimiter: str | None = None, columns: int | None = None) -> np.ndarray:
    """One point file as a float64 ``(points, columns)`` array.

    ``delimiter`` None splits on whitespace (ShapeNetPart), ``","`` reads ModelNet40's files.
    ``columns`` checks the width. An unreadable or malformed file raises :class:`DataError`
    naming it, because a half-read cloud would silently change a benchmark number.
    """
    path = Path(path)
    try:
        data = np.loadtxt(path, delimiter=delimiter, dtype=np.float64, ndmin=2)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"cannot read point file {str(path)!r}: {first}") from None
    if data.shape[0] == 0:
        raise DataError(f"point file {str(path)!r} holds no points")
    if columns is not None and data.shape[1] != columns:
        raise DataError(f"point file {str(path)!r} has {data.shape[1]} columns per line, expected {columns}")
    if not np.isfinite(data).all():
        raise DataError(f"point file {str(path)!r} holds non-finite values")
    return data


def normalize_unit_sphere(xyz: np.ndarray) -> np.ndarray:
    """Subtract the centroid, then divide by the largest distance to it (Point-MAE's ``pc_normalize``).

    Returns a new float array; a cloud whose points all coincide is only centred (no division by 0).
    """
    xyz = np.asarray(xyz)
    centred = xyz - xyz.mean(axis=0, keepdims=True)
    radius = float(np.sqrt((centred**2).sum(axis=1)).max())
    return centred / radius if radius > 0 else centred


def shape_rng(seed: int, shape_id: str) -> np.random.Generator:
    """A generator determined by ``(seed, shape_id)`` alone.

    The entropy is ``[seed, first four 32-bit words of sha256(shape_id)]`` fed to numpy's
    ``SeedSequence`` (PCG64), so a shape's draw is the same whichever order or batch it is loaded
    in, and differs between shapes and between seeds.
    """
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    digest = hashlib.sha256(shape_id.encode("utf-8")).digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), *words])))


def resample_indices(available: int, count: int, seed: int, shape_id: str) -> np.ndarray:
    """``count`` point indices drawn uniformly *with replacement* from ``range(available)``.

    This is the reference's ``np.random.choice(n, count, replace=True)``, made reproducible by
    :func:`shape_rng`: the reference leaves it unseeded, even at test time.
    """
    if available < 1:
        raise ValueError("cannot resample a cloud with no points")
    return shape_rng(seed, shape_id).choice(available, size=count, replace=True)


def fps_downsample(
    clouds: Sequence[np.ndarray],
    count: int,
    *,
    pointnet2_ops_compat: bool = True,
    batch_size: int = 64,
    device: str = "cpu",
) -> np.ndarray:
    """The first ``count`` farthest-point samples of each ``(N_i, 3)`` cloud → ``(len, count, 3)``.

    This is Point-MAE's test-time ``misc.fps`` (pointnet2_ops kernel, start index 0; with
    ``pointnet2_ops_compat`` also its near-origin rule, tasks spec §3.4), always with the pure-torch
    op, so the picked points do not depend on torch-cluster being installed. ``device`` is meant only
    to make it faster: every step is elementwise float ops and a first-maximum argmax, so a GPU
    should pick the same points. Clouds of equal size are batched; the output keeps the input
    order and the first cloud's dtype.
    """
    import torch

    from benchsuite.pointcloud.ops import farthest_point_sample

    out = np.empty((len(clouds), count, 3), dtype=clouds[0].dtype if len(clouds) else np.float32)
    by_size: dict[int, list[int]] = {}
    for index, cloud in enumerate(clouds):
        if cloud.ndim != 2 or cloud.shape[1] != 3:
            raise ValueError(f"cloud {index} must be (N, 3), got {cloud.shape}")
        if cloud.shape[0] < count:
            raise ValueError(f"cloud {index} has {cloud.shape[0]} points, fewer than the {count} to sample")
        by_size.setdefault(cloud.shape[0], []).append(index)
    for members in by_size.values():
        for start in range(0, len(members), max(1, batch_size)):
            chunk = members[start : start + max(1, batch_size)]
            xyz = torch.from_numpy(np.stack([clouds[i] for i in chunk]))
            picked = farthest_point_sample(
                xyz.to(device), count, pointnet2_ops_compat=pointnet2_ops_compat, backend="torch"
            ).cpu()
            out[chunk] = torch.gather(xyz, 1, picked.unsqueeze(-1).expand(-1, -1, 3)).numpy()
    return out


