"""Procedural shapes made of labelled parts, for the ShapeNetPart demo twin.

Each generator draws one object (a mug, a lamp, a table, a chair) with random proportions from a
``numpy.random.Generator`` and samples points with normals on the surfaces of its primitives
(cylinders, disks, a torus, a cone frustum, boxes). Every point carries the id of its part within
the object (0, 1, ...); the caller maps these to global part ids. A moderate random rotation about the up
axis, a small tilt, an anisotropic scale and Gaussian jitter make the shapes differ, so that a
model has to learn the parts' geometry, not fixed coordinates.

The up axis is y, as in ShapeNet. Nothing here touches the disk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["GENERATORS", "PartCloud", "generate_shape"]

#: Per-point Gaussian noise (std) relative to the object's size, before normalization.
JITTER = 0.008


@dataclass(frozen=True)
class PartCloud:
    """Points ``(n, 3)``, unit normals ``(n, 3)`` and local part ids ``(n,)`` of one object."""

    points: np.ndarray
    normals: np.ndarray
    parts: np.ndarray


# --------------------------------------------------------------------------------------------
# Surface primitives: (points, normals) with about uniform density, axis along y
# --------------------------------------------------------------------------------------------

Surface = tuple[np.ndarray, np.ndarray]


def _cylinder(rng: np.random.Generator, n: int, radius: float, y0: float, y1: float,
              center: Sequence[float] = (0.0, 0.0)) -> Surface:
    theta = rng.uniform(0, 2 * np.pi, n)
    normals = np.stack([np.cos(theta), np.zeros(n), np.sin(theta)], axis=1)
    points = normals * radius + np.stack([np.full(n, center[0]), rng.uniform(y0, y1, n), np.full(n, center[1])], 1)
    return points, normals


def _disk(rng: np.random.Generator, n: int, radius: float, y: float, up: bool) -> Surface:
    theta = rng.uniform(0, 2 * np.pi, n)
    r = radius * np.sqrt(rng.uniform(0, 1, n))
    points = np.stack([r * np.cos(theta), np.full(n, y), r * np.sin(theta)], axis=1)
    normals = np.tile([0.0, 1.0 if up else -1.0, 0.0], (n, 1))
    return points, normals


def _frustum(rng: np.random.Generator, n: int, r0: float, r1: float, y0: float, y1: float) -> Surface:
    """Side of a cone frustum: radius ``r0`` at ``y0`` to ``r1`` at ``y1``."""
    theta = rng.uniform(0, 2 * np.pi, n)
    # Area grows with the radius: draw t so that the density along the slant is uniform.
    u = rng.uniform(0, 1, n)
    if abs(r1 - r0) < 1e-9:
        t = u
    else:
        t = (np.sqrt(r0**2 + u * (r1**2 - r0**2)) - r0) / (r1 - r0)
    r = r0 + t * (r1 - r0)
    y = y0 + t * (y1 - y0)
    points = np.stack([r * np.cos(theta), y, r * np.sin(theta)], axis=1)
    slope = (r0 - r1) / (y1 - y0)
    normals = np.stack([np.cos(theta), np.full(n, slope), np.sin(theta)], axis=1)
    return points, normals / np.linalg.norm(normals, axis=1, keepdims=True)


def _torus_arc(rng: np.random.Generator, n: int, major: float, minor: float, center: Sequence[float],
               arc: tuple[float, float]) -> Surface:
    """Part of a torus lying in the xy plane (a mug handle), angles ``arc`` around its center."""
    phi = rng.uniform(arc[0], arc[1], n)
    psi = rng.uniform(0, 2 * np.pi, n)
    ring = np.stack([np.cos(phi), np.sin(phi), np.zeros(n)], axis=1)
    normals = ring * np.cos(psi)[:, None] + np.array([0.0, 0.0, 1.0]) * np.sin(psi)[:, None]
    points = np.asarray(center) + ring * major + normals * minor
    return points, normals


def _box(rng: np.random.Generator, n: int, low: Sequence[float], high: Sequence[float]) -> Surface:
    """The six faces of an axis-aligned box, each sampled in proportion to its area."""
    low, high = np.asarray(low, float), np.asarray(high, float)
    size = high - low
    areas = np.array([size[1] * size[2], size[1] * size[2], size[0] * size[2], size[0] * size[2],
                      size[0] * size[1], size[0] * size[1]])
    face = rng.choice(6, size=n, p=areas / areas.sum())
    points = low + rng.uniform(0, 1, (n, 3)) * size
    axis, side = face // 2, face % 2
    points[np.arange(n), axis] = np.where(side == 1, high[axis], low[axis])
    normals = np.zeros((n, 3))
    normals[np.arange(n), axis] = np.where(side == 1, 1.0, -1.0)
    return points, normals


def _legs(rng: np.random.Generator, n: int, half_x: float, half_z: float, thickness: float, height: float) -> Surface:
    """Four square legs from the floor (y = 0) to ``height`` at the corners of a rectangle."""
    counts = np.bincount(rng.integers(0, 4, n), minlength=4)
    pieces = []
    for count, (sx, sz) in zip(counts, ((-1, -1), (-1, 1), (1, -1), (1, 1))):
        cx, cz = sx * (half_x - thickness), sz * (half_z - thickness)
        t = thickness / 2
        pieces.append(_box(rng, int(count), (cx - t, 0.0, cz - t), (cx + t, height, cz + t)))
    return np.concatenate([p[0] for p in pieces]), np.concatenate([p[1] for p in pieces])


# --------------------------------------------------------------------------------------------
# Objects: each returns its parts as surfaces, given the point count of each part
# --------------------------------------------------------------------------------------------

PartSampler = Callable[[np.random.Generator, int], Surface]


def _mug(rng: np.random.Generator) -> list[tuple[float, PartSampler]]:
    radius, height = rng.uniform(0.3, 0.45), rng.uniform(0.6, 1.0)
    major = rng.uniform(0.28, 0.38) * height
    minor = rng.uniform(0.05, 0.07)
    center = (radius, height * rng.uniform(0.45, 0.55), 0.0)

    def body(g: np.random.Generator, n: int) -> Surface:
        side = 2 * np.pi * radius * height
        bottom = np.pi * radius**2
        k = int(round(n * side / (side + bottom)))
        a, b = _cylinder(g, k, radius, 0.0, height), _disk(g, n - k, radius, 0.0, up=False)
        return np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]])

    def handle(g: np.random.Generator, n: int) -> Surface:
        return _torus_arc(g, n, major, minor, center, (-np.pi / 2, np.pi / 2))

    return [(2 * np.pi * radius * height, body), (np.pi * major * 2 * np.pi * minor, handle)]


def _lamp(rng: np.random.Generator) -> list[tuple[float, PartSampler]]:
    base_r, base_h = rng.uniform(0.25, 0.4), rng.uniform(0.04, 0.08)
    rod_r, rod_h = rng.uniform(0.025, 0.045), rng.uniform(0.6, 1.1)
    shade_r0, shade_r1, shade_h = rng.uniform(0.3, 0.5), rng.uniform(0.1, 0.22), rng.uniform(0.3, 0.5)
    shade_y0 = base_h + rod_h - 0.3 * shade_h

    def shade(g: np.random.Generator, n: int) -> Surface:
        return _frustum(g, n, shade_r0, shade_r1, shade_y0, shade_y0 + shade_h)

    def rod(g: np.random.Generator, n: int) -> Surface:
        return _cylinder(g, n, rod_r, base_h, base_h + rod_h)

    def base(g: np.random.Generator, n: int) -> Surface:
        k = n // 2
        a, b = _disk(g, k, base_r, base_h, up=True), _cylinder(g, n - k, base_r, 0.0, base_h)
        return np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]])

    shade_area = np.pi * (shade_r0 + shade_r1) * shade_h
    return [(shade_area, shade), (2 * np.pi * rod_r * rod_h, rod), (np.pi * base_r**2, base)]


def _table(rng: np.random.Generator) -> list[tuple[float, PartSampler]]:
    half_x, half_z = rng.uniform(0.5, 0.8), rng.uniform(0.3, 0.5)
    height, thick, leg = rng.uniform(0.55, 0.85), rng.uniform(0.04, 0.08), rng.uniform(0.04, 0.08)

    def top(g: np.random.Generator, n: int) -> Surface:
        return _box(g, n, (-half_x, height - thick, -half_z), (half_x, height, half_z))

    def legs(g: np.random.Generator, n: int) -> Surface:
        return _legs(g, n, half_x, half_z, leg, height - thick)

    return [(8 * half_x * half_z, top), (16 * leg * height, legs)]


def _chair(rng: np.random.Generator) -> list[tuple[float, PartSampler]]:
    half = rng.uniform(0.22, 0.32)
    seat_y, thick, leg = rng.uniform(0.38, 0.5), rng.uniform(0.04, 0.07), rng.uniform(0.03, 0.06)
    back_h, back_t = rng.uniform(0.4, 0.7), rng.uniform(0.03, 0.06)

    def seat(g: np.random.Generator, n: int) -> Surface:
        return _box(g, n, (-half, seat_y - thick, -half), (half, seat_y, half))

    def back(g: np.random.Generator, n: int) -> Surface:
        return _box(g, n, (-half, seat_y, -half), (half, seat_y + back_h, -half + back_t))

    def legs(g: np.random.Generator, n: int) -> Surface:
        return _legs(g, n, half, half, leg, seat_y - thick)

    return [(8 * half * half, seat), (4 * half * back_h, back), (16 * leg * seat_y, legs)]


#: Object generators by demo category name, with their parts in local-id order.
GENERATORS: dict[str, tuple[Callable[[np.random.Generator], list[tuple[float, PartSampler]]], tuple[str, ...]]] = {
    "Mug": (_mug, ("body", "handle")),
    "Lamp": (_lamp, ("shade", "rod", "base")),
    "Table": (_table, ("top", "legs")),
    "Chair": (_chair, ("seat", "back", "legs")),
}


def _point_counts(areas: Sequence[float], total: int, floor: float) -> list[int]:
    """Points per part in proportion to area, each part getting at least ``floor`` of the total."""
    share = np.asarray(areas, float) / float(np.sum(areas))
    share = np.maximum(share, floor)
    share /= share.sum()
    counts = np.floor(share * total).astype(int)
    counts[np.argmax(share)] += total - counts.sum()
    return counts.tolist()


def _rotation(rng: np.random.Generator, max_yaw: float, max_tilt: float) -> np.ndarray:
    """A rotation about y of at most ``max_yaw``, then a tilt of at most ``max_tilt`` about x and z."""
    yaw = rng.uniform(-max_yaw, max_yaw)
    ax, az = rng.uniform(-max_tilt, max_tilt, 2)
    cy, sy, cx, sx, cz, sz = np.cos(yaw), np.sin(yaw), np.cos(ax), np.sin(ax), np.cos(az), np.sin(az)
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rot_z @ rot_x @ rot_y


def generate_shape(category: str, rng: np.random.Generator, num_points: int, *, min_part_share: float = 0.12,
                   max_yaw: float = np.pi / 6, max_tilt: float = 0.1, jitter: float = JITTER) -> PartCloud:
    """One random object of ``category`` with ``num_points`` surface points, shuffled.

    Rotations are moderate (±30° about the up axis, ±0.1 rad of tilt by default) because
    ShapeNet's shapes are aligned to a common frame; the demo model is trained in seconds and
    should learn parts, not a rotation-invariant representation.
    """
    if category not in GENERATORS:
        raise KeyError(f"no generator for category {category!r}; known: {', '.join(GENERATORS)}")
    build, _ = GENERATORS[category]
    parts = build(rng)
    counts = _point_counts([area for area, _ in parts], num_points, min_part_share)
    points, normals, labels = [], [], []
    for local, ((_, sample), count) in enumerate(zip(parts, counts)):
        p, n = sample(rng, count)
        points.append(p)
        normals.append(n)
        labels.append(np.full(len(p), local, dtype=np.int64))
    xyz, nrm, lab = np.concatenate(points), np.concatenate(normals), np.concatenate(labels)
    scale = rng.uniform(0.85, 1.15, 3)
    rotation = _rotation(rng, max_yaw, max_tilt)
    xyz = (xyz * scale) @ rotation.T
    nrm = (nrm / scale) @ rotation.T
    nrm /= np.maximum(np.linalg.norm(nrm, axis=1, keepdims=True), 1e-12)
    xyz = xyz + rng.normal(0.0, jitter, xyz.shape)
    order = rng.permutation(len(xyz))
    return PartCloud(xyz[order], nrm[order], lab[order])
