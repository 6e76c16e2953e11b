"""FPS / kNN / gather against brute-force references, pointnet2_ops compat, torch-cluster parity.

Random inputs are tie-free (continuous coordinates), so every implementation must return the same
indices in the same order; the tie rule (lowest index) is checked on exactly representable points.
"""

from __future__ import annotations

import pytest
import torch

from benchsuite.pointcloud.ops import (
    NEAR_ORIGIN_SQ_NORM,
    farthest_point_sample,
    gather_points,
    knn,
    torch_cluster_available,
)

needs_torch_cluster = pytest.mark.skipif(not torch_cluster_available(), reason="torch-cluster is not installed")


def clouds(batch: int, points: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.rand(batch, points, 3, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2 - 1


def brute_force_fps(cloud: torch.Tensor, n: int, compat: bool = False) -> list[int]:
    """One cloud, one point at a time, written as the pointnet2_ops kernel reads."""
    points = cloud.tolist()
    running = [1e10] * len(points)
    chosen = [0]
    for _ in range(1, n):
        lx, ly, lz = points[chosen[-1]]
        best, best_index = -1.0, 0
        for index, (x, y, z) in enumerate(points):
            if compat and x * x + y * y + z * z <= NEAR_ORIGIN_SQ_NORM:
                continue
            running[index] = min(running[index], (x - lx) ** 2 + (y - ly) ** 2 + (z - lz) ** 2)
            if running[index] > best:  # strict: the lowest index keeps a tie
                best, best_index = running[index], index
        chosen.append(best_index)
    return chosen


def brute_force_knn(ref: torch.Tensor, query: torch.Tensor, k: int) -> torch.Tensor:
    distance = ((query[:, :, None, :] - ref[:, None, :, :]) ** 2).sum(-1)
    return distance.argsort(dim=-1, stable=True)[..., :k]


def test_fps_matches_brute_force_per_cloud():
    xyz = clouds(3, 200)
    got = farthest_point_sample(xyz, 24, backend="torch")
    assert got.shape == (3, 24) and got.dtype == torch.long
    for cloud, indices in zip(xyz, got):
        assert indices.tolist() == brute_force_fps(cloud, 24)


def test_fps_float32_equals_float64_on_tie_free_input():
    xyz = clouds(2, 300, seed=3)
    assert torch.equal(
        farthest_point_sample(xyz.float(), 32, backend="torch"), farthest_point_sample(xyz, 32, backend="torch")
    )


def test_fps_ties_go_to_the_lowest_index():
    line = torch.tensor([[0.0, 0, 0], [1, 0, 0], [-1, 0, 0], [2, 0, 0], [-2, 0, 0]]).unsqueeze(0)
    assert farthest_point_sample(line, 5, backend="torch").tolist() == [[0, 3, 4, 1, 2]]


def test_compat_never_picks_near_origin_points_except_the_first():
    xyz = clouds(2, 150, seed=5)
    xyz[:, 10:40] *= 0.01  # 30 points with x² + y² + z² <= 3e-4
    xyz[1, 0] = 0.0  # the first sample is index 0 even at the origin
    plain = farthest_point_sample(xyz, 100, backend="torch")
    compat = farthest_point_sample(xyz, 100, pointnet2_ops_compat=True, backend="torch")
    near = (xyz**2).sum(-1) <= NEAR_ORIGIN_SQ_NORM
    for row in range(2):
        assert compat[row, 0] == 0
        assert not near[row, compat[row, 1:]].any()
        assert near[row, plain[row]].any()  # without compat, the far-out greedy order reaches them
        assert compat[row].tolist() == brute_force_fps(xyz[row], 100, compat=True)


def test_compat_falls_back_to_index_zero_when_only_excluded_points_remain():
    xyz = torch.tensor([[[1.0, 0, 0], [-1, 0, 0], [0.01, 0, 0], [0, 0.01, 0]]])
    assert farthest_point_sample(xyz, 4, pointnet2_ops_compat=True, backend="torch").tolist() == [[0, 1, 0, 0]]
    assert farthest_point_sample(xyz, 4, backend="torch").tolist() == [[0, 1, 3, 2]]


def test_fps_rejects_bad_arguments():
    xyz = clouds(1, 10)
    with pytest.raises(ValueError, match="cannot sample"):
        farthest_point_sample(xyz, 11)
    with pytest.raises(ValueError, match=r"\(B, N, 3\)"):
        farthest_point_sample(xyz[0], 4)
    with pytest.raises(ValueError, match="backend"):
        farthest_point_sample(xyz, 4, backend="cuda")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="torch backend"):
        farthest_point_sample(xyz, 4, pointnet2_ops_compat=True, backend="torch_cluster")


def test_knn_matches_brute_force_and_contains_each_center():
    xyz = clouds(2, 300, seed=7)
    centers = gather_points(xyz, farthest_point_sample(xyz, 16, backend="torch"))
    got = knn(xyz, centers, 12, backend="torch")
    assert got.shape == (2, 16, 12)
    assert torch.equal(got, brute_force_knn(xyz, centers, 12))
    assert torch.equal(gather_points(xyz, got[..., 0]), centers)  # nearest neighbour: itself


def test_knn_rejects_bad_arguments():
    xyz = clouds(2, 10)
    with pytest.raises(ValueError, match="neighbours"):
        knn(xyz, xyz, 11)
    with pytest.raises(ValueError, match="batch"):
        knn(xyz, xyz[:1], 3)


def test_gather_points_picks_per_cloud():
    points = torch.arange(2 * 5 * 2, dtype=torch.float32).view(2, 5, 2)
    index = torch.tensor([[[4, 0]], [[1, 1]]])
    got = gather_points(points, index)
    assert got.shape == (2, 1, 2, 2)
    assert torch.equal(got[0, 0], points[0, [4, 0]]) and torch.equal(got[1, 0], points[1, [1, 1]])


@pytest.mark.skipif(torch_cluster_available(), reason="checks the message shown without torch-cluster")
def test_torch_cluster_backend_says_how_to_install():
    with pytest.raises(ModuleNotFoundError, match="pointcloud"):
        farthest_point_sample(clouds(1, 10), 4, backend="torch_cluster")


@needs_torch_cluster
@pytest.mark.parametrize("n", [1, 17, 64, 200])
def test_torch_cluster_fps_agrees(n):
    xyz = clouds(3, 200, seed=11, dtype=torch.float32)
    assert torch.equal(
        farthest_point_sample(xyz, n, backend="torch_cluster"), farthest_point_sample(xyz, n, backend="torch")
    )


@needs_torch_cluster
def test_torch_cluster_knn_agrees():
    xyz = clouds(3, 256, seed=13, dtype=torch.float32)
    centers = gather_points(xyz, farthest_point_sample(xyz, 32, backend="torch"))
    assert torch.equal(knn(xyz, centers, 16, backend="torch_cluster"), knn(xyz, centers, 16, backend="torch"))


@needs_torch_cluster
def test_auto_uses_torch_cluster_except_in_compat_mode(monkeypatch):
    import torch_cluster

    calls = []
    original = torch_cluster.fps
    monkeypatch.setattr(torch_cluster, "fps", lambda *a, **k: calls.append(1) or original(*a, **k))
    xyz = clouds(1, 50, dtype=torch.float32)
    farthest_point_sample(xyz, 8, pointnet2_ops_compat=True)
    assert not calls
    farthest_point_sample(xyz, 8)
    assert calls
