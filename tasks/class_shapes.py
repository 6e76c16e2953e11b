"""Procedural shapes, one class each, for the ModelNet40 demo twin (``modelnet40-demo``).

Each generator samples points with unit normals on the surface of one kind of object (a sphere, a
box, a torus, a helix ...) with random proportions drawn from a ``numpy.random.Generator``. A
random rotation about the up axis (y, as in ModelNet's resampled clouds), a small tilt, an
anisotropic scale and Gaussian jitter then make two shapes of a class differ, so a classifier has
to learn each class's geometry rather than memorize coordinates. The classes are chosen to be
clearly separable by a tiny model trained for seconds, while a few pairs (sphere/bowl,
cylinder/cube, cone/pyramid) are close enough that quantization damage shows in the accuracy.

Nothing here touches the disk; :mod:`benchsuite.tasks.modelnet40_demo` writes the shapes in the
``modelnet40_normal_resampled`` layout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["CLASSES", "GENERATORS", "SurfaceCloud", "generate_shape"]

#: Per-point Gaussian noise (std) relative to the object's size, before normalization.
JITTER = 0.01

Surface = tuple[np.ndarray, np.ndarray]
Sampler = Callable[[np.random.Generator, int], Surface]


@dataclass(frozen=True)
class SurfaceCloud:
    """Points ``(n, 3)`` and unit normals ``(n, 3)`` of one shape."""

    points: np.ndarray
    normals: np.ndarray


# --------------------------------------------------------------------------------------------
# Surface pieces: (points, normals) with about uniform density
# --------------------------------------------------------------------------------------------


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def _mix(rng: np.random.Generator, n: int, pieces: Sequence[tuple[float, Sampler]]) -> Surface:
    """``n`` points spread over ``pieces`` in proportion to their areas (a multinomial draw)."""
    areas = np.asarray([area for area, _ in pieces], dtype=np.float64)
    counts = rng.multinomial(n, areas / areas.sum())
    drawn = [sample(rng, int(count)) for (_, sample), count in zip(pieces, counts)]
    return np.concatenate([p for p, _ in drawn]), np.concatenate([q for _, q in drawn])


def _sphere_cap(rng: np.random.Generator, n: int, radius: float, center: Sequence[float] = (0, 0, 0),
                max_y: float = 1.0) -> Surface:
    """Sphere points with normalized height ``y / radius <= max_y`` (1 = the whole sphere)."""
    y = rng.uniform(-1.0, max_y, n)  # uniform in height = uniform in area (Archimedes)
    theta = rng.uniform(0, 2 * np.pi, n)
    r = np.sqrt(np.clip(1 - y**2, 0, None))
    normals = np.stack([r * np.cos(theta), y, r * np.sin(theta)], axis=1)
    return normals * radius + np.asarray(center, dtype=np.float64), normals


def _box(rng: np.random.Generator, n: int, half: Sequence[float], center: Sequence[float] = (0, 0, 0)) -> Surface:
    """The six faces of an axis-aligned box with half-extents ``half``."""
    hx, hy, hz = half
    areas = np.array([hy * hz, hy * hz, hx * hz, hx * hz, hx * hy, hx * hy])
    face = rng.choice(6, size=n, p=areas / areas.sum())
    points = rng.uniform(-1, 1, (n, 3)) * np.asarray(half)
    axis, sign = face // 2, np.where(face % 2 == 0, 1.0, -1.0)
    points[np.arange(n), axis] = sign * np.asarray(half)[axis]
    normals = np.zeros((n, 3))
    normals[np.arange(n), axis] = sign
    return points + np.asarray(center, dtype=np.float64), normals


def _tube(rng: np.random.Generator, n: int, radius: float, y0: float, y1: float) -> Surface:
    """Side of a cylinder along y."""
    theta = rng.uniform(0, 2 * np.pi, n)
    normals = np.stack([np.cos(theta), np.zeros(n), np.sin(theta)], axis=1)
    points = normals * radius
    points[:, 1] = rng.uniform(y0, y1, n)
    return points, normals


def _disk(rng: np.random.Generator, n: int, radius: float, y: float, up: bool) -> Surface:
    theta = rng.uniform(0, 2 * np.pi, n)
    r = radius * np.sqrt(rng.uniform(0, 1, n))
    points = np.stack([r * np.cos(theta), np.full(n, y), r * np.sin(theta)], axis=1)
    return points, np.tile([0.0, 1.0 if up else -1.0, 0.0], (n, 1))


def _cone_side(rng: np.random.Generator, n: int, radius: float, y0: float, y1: float) -> Surface:
    """Side of a cone with its base (``radius``) at ``y0`` and its apex at ``y1``."""
    t = 1 - np.sqrt(rng.uniform(0, 1, n))  # 0 at the base; area density grows with the radius
    theta = rng.uniform(0, 2 * np.pi, n)
    r = radius * (1 - t)
    points = np.stack([r * np.cos(theta), y0 + t * (y1 - y0), r * np.sin(theta)], axis=1)
    normals = np.stack([np.cos(theta), np.full(n, radius / (y1 - y0)), np.sin(theta)], axis=1)
    return points, _unit(normals)


def _triangle(rng: np.random.Generator, n: int, a, b, c) -> Surface:
    a, b, c = (np.asarray(v, dtype=np.float64) for v in (a, b, c))
    u, v = rng.uniform(0, 1, (2, n))
    flip = u + v > 1
    u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
    points = a + u[:, None] * (b - a) + v[:, None] * (c - a)
    normal = np.cross(b - a, c - a)
    return points, np.tile(normal / np.linalg.norm(normal), (n, 1))


def _triangle_area(a, b, c) -> float:
    return 0.5 * float(np.linalg.norm(np.cross(np.subtract(b, a), np.subtract(c, a))))


# --------------------------------------------------------------------------------------------
# Classes: each draws its proportions, then samples n surface points
# --------------------------------------------------------------------------------------------


def _sphere(rng: np.random.Generator, n: int) -> Surface:
    return _sphere_cap(rng, n, 1.0)


def _cube(rng: np.random.Generator, n: int) -> Surface:
    return _box(rng, n, rng.uniform(0.6, 1.0, 3))


def _cylinder(rng: np.random.Generator, n: int) -> Surface:
    radius, half = rng.uniform(0.35, 0.55), rng.uniform(0.7, 1.0)
    return _mix(rng, n, [
        (2 * np.pi * radius * 2 * half, lambda g, k: _tube(g, k, radius, -half, half)),
        (np.pi * radius**2, lambda g, k: _disk(g, k, radius, half, up=True)),
        (np.pi * radius**2, lambda g, k: _disk(g, k, radius, -half, up=False)),
    ])


def _cone(rng: np.random.Generator, n: int) -> Surface:
    radius, height = rng.uniform(0.5, 0.8), rng.uniform(1.2, 1.8)
    slant = np.hypot(radius, height)
    return _mix(rng, n, [
        (np.pi * radius * slant, lambda g, k: _cone_side(g, k, radius, -height / 2, height / 2)),
        (np.pi * radius**2, lambda g, k: _disk(g, k, radius, -height / 2, up=False)),
    ])


def _torus(rng: np.random.Generator, n: int) -> Surface:
    major, minor = rng.uniform(0.65, 0.8), rng.uniform(0.15, 0.3)
    # Area density is proportional to major + minor·cos(psi): rejection-sample psi.
    psi = np.empty(0)
    while psi.size < n:
        candidate = rng.uniform(0, 2 * np.pi, 2 * n)
        keep = rng.uniform(0, major + minor, 2 * n) < major + minor * np.cos(candidate)
        psi = np.concatenate([psi, candidate[keep]])
    psi = psi[:n]
    phi = rng.uniform(0, 2 * np.pi, n)
    normals = np.stack([np.cos(psi) * np.cos(phi), np.sin(psi), np.cos(psi) * np.sin(phi)], axis=1)
    ring = np.stack([np.cos(phi), np.zeros(n), np.sin(phi)], axis=1) * major
    return ring + minor * normals, normals


def _pyramid(rng: np.random.Generator, n: int) -> Surface:
    half, height = rng.uniform(0.6, 0.8), rng.uniform(1.0, 1.5)
    base_y, apex = -height / 2, (0.0, height / 2, 0.0)
    corners = [(-half, base_y, -half), (half, base_y, -half), (half, base_y, half), (-half, base_y, half)]
    pieces: list[tuple[float, Sampler]] = []
    for i in range(4):
        a, b = corners[i], corners[(i + 1) % 4]
        pieces.append((_triangle_area(a, apex, b), lambda g, k, a=a, b=b: _triangle(g, k, a, apex, b)))
    base = ((corners[0], corners[1], corners[2]), (corners[0], corners[2], corners[3]))
    for tri in base:
        pieces.append((_triangle_area(*tri), lambda g, k, tri=tri: _triangle(g, k, *tri)))
    return _mix(rng, n, pieces)


def _bowl(rng: np.random.Generator, n: int) -> Surface:
    depth = rng.uniform(0.0, 0.4)  # the open top's normalized height: 0 = a hemisphere
    return _sphere_cap(rng, n, 1.0, max_y=depth)


def _cross(rng: np.random.Generator, n: int) -> Surface:
    length, width = rng.uniform(0.8, 1.0, 3), rng.uniform(0.12, 0.22)
    pieces: list[tuple[float, Sampler]] = []
    for axis in range(3):
        half = np.full(3, width)
        half[axis] = length[axis]
        area = 8 * (half[0] * half[1] + half[1] * half[2] + half[0] * half[2])
        pieces.append((area, lambda g, k, half=half: _box(g, k, half)))
    return _mix(rng, n, pieces)


def _dumbbell(rng: np.random.Generator, n: int) -> Surface:
    radius, gap, bar = rng.uniform(0.3, 0.45), rng.uniform(0.4, 0.8), rng.uniform(0.06, 0.12)
    end = radius + gap / 2
    return _mix(rng, n, [
        (4 * np.pi * radius**2, lambda g, k: _sphere_cap(g, k, radius, (0, end, 0))),
        (4 * np.pi * radius**2, lambda g, k: _sphere_cap(g, k, radius, (0, -end, 0))),
        (2 * np.pi * bar * 2 * end, lambda g, k: _tube(g, k, bar, -end, end)),
    ])


def _helix(rng: np.random.Generator, n: int) -> Surface:
    """A coil spring: a tube of radius ``minor`` around a helix along y."""
    turns, major, minor = rng.uniform(2.5, 4.0), rng.uniform(0.5, 0.7), rng.uniform(0.06, 0.1)
    height = rng.uniform(1.2, 1.8)
    t = rng.uniform(0, 2 * np.pi * turns, n)
    pitch = height / (2 * np.pi * turns)
    center = np.stack([major * np.cos(t), pitch * t - height / 2, major * np.sin(t)], axis=1)
    tangent = _unit(np.stack([-major * np.sin(t), np.full(n, pitch), major * np.cos(t)], axis=1))
    radial = np.stack([np.cos(t), np.zeros(n), np.sin(t)], axis=1)
    binormal = np.cross(tangent, radial)
    psi = rng.uniform(0, 2 * np.pi, n)
    normals = np.cos(psi)[:, None] * radial + np.sin(psi)[:, None] * binormal
    return center + minor * normals, normals


#: Class name -> sampler, in label order (the demo's ``modelnet40_shape_names.txt``).
GENERATORS: dict[str, Sampler] = {
    "sphere": _sphere,
    "cube": _cube,
    "cylinder": _cylinder,
    "cone": _cone,
    "torus": _torus,
    "pyramid": _pyramid,
    "bowl": _bowl,
    "cross": _cross,
    "dumbbell": _dumbbell,
    "helix": _helix,
}
CLASSES: tuple[str, ...] = tuple(GENERATORS)


def _rotation(rng: np.random.Generator, max_tilt: float) -> np.ndarray:
    """A random rotation about y, then a tilt of at most ``max_tilt`` radians about x and z."""
    yaw = rng.uniform(0, 2 * np.pi)
    ax, az = rng.uniform(-max_tilt, max_tilt, 2)
    cy, sy, cx, sx, cz, sz = np.cos(yaw), np.sin(yaw), np.cos(ax), np.sin(ax), np.cos(az), np.sin(az)
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rot_z @ rot_x @ rot_y


def generate_shape(
    name: str,
    rng: np.random.Generator,
    num_points: int,
    *,
    max_tilt: float = 0.25,
    scale_range: tuple[float, float] = (0.8, 1.2),
    jitter: float = JITTER,
) -> SurfaceCloud:
    """One random shape of class ``name`` with ``num_points`` surface points, in random order."""
    if name not in GENERATORS:
        raise KeyError(f"no generator for class {name!r}; known: {', '.join(GENERATORS)}")
    points, normals = GENERATORS[name](rng, num_points)
    scale = rng.uniform(*scale_range, 3)
    rotation = _rotation(rng, max_tilt)
    points = (points * scale) @ rotation.T
    normals = _unit((normals / scale) @ rotation.T)  # normals transform by the inverse transpose
    points = points + rng.normal(0.0, jitter, points.shape)
    order = rng.permutation(len(points))
    return SurfaceCloud(points[order], normals[order])
