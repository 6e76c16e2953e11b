"""The ModelNet40 folder layouts: finding them, listing splits, and the evaluation preprocessing.

Two layouts (tasks spec §3.2), under the user's data root or as the root itself::

    modelnet40_normal_resampled/                  (Point-MAE, Point-BERT; preferred when both exist)
      modelnet40_shape_names.txt                  one class per line; label = line index
      modelnet40_{train,test}.txt                 "<class>_<NNNN>" per line, the split in order
      <class>/<class>_<NNNN>.txt                  "x,y,z,nx,ny,nz" per line (10,000 points)
      modelnet40_{train,test}_8192pts_fps.dat     optional: pickle [points (8192, 6) ..., labels]

    modelnet40_ply_hdf5_2048/                     (PointNet, DGCNN, PCT)
      ply_data_{train0..4,test0..1}.h5            "data" (N, 2048, 3), "label" (N, 1)
      shape_names.txt                             optional class names

As in Point-MAE's ``ModelNet`` dataset: a shape's class is its id without the ``_NNNN`` suffix; the
split lists give the order; with the ``.dat`` cache the class folders need not exist. A sample id
is the shape file's path relative to the dataset folder (``airplane/airplane_0627.txt``), or
``<h5 file>:<row>`` for the HDF5 layout.

Evaluation preprocessing (spec §3.3), the same for calibration:

1. normalize xyz (centroid, max radius; :func:`~benchsuite.pointcloud.data.normalize_unit_sphere`)
   over the points read: the 8192 of the cache, every point of a txt file, or all 2048 of an h5
   row, in float32 as the reference does;
2. drop the normals;
3. keep ``num_points`` points: farthest point sampling with pointnet2_ops conventions from the
   8192-point cache or from the whole txt shape (Point-MAE's test-time ``misc.fps``); the first
   ``num_points`` rows for HDF5 (PointNet's convention, no FPS). No voting.

Without the ``.dat`` cache, FPS runs on the whole txt shape: FPS is greedy, so its first 1024
picks from index 0 are the first 1024 of a start-0 8192-point cache, but the normalization then
uses every point rather than the cache's 8192 (a tiny shift, recorded as the source ``txt``).
The reference's cache starts its FPS at a random point; a user-made ``.dat`` is used as is.

Preprocessed clouds are kept in memory within a process (1024 × 3 float32 = 12 KiB per shape, the
whole test split 30 MB), so the cells of one run read and sample each shape once.
"""

from __future__ import annotations

import pickle
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from benchsuite.api import sha256_of
from benchsuite.errors import DataError
from benchsuite.pointcloud.data import fps_downsample, normalize_unit_sphere, read_point_txt

__all__ = [
    "FPS_CACHE",
    "H5_FOLDER",
    "LAYOUT",
    "SHAPE_NAMES",
    "SPLITS",
    "SPLIT_LIST",
    "TXT_FOLDER",
    "ModelNetDataset",
    "ModelNetSplit",
    "check_files",
    "clear_cache",
    "find_dataset",
    "load_points",
    "preprocess_steps",
    "read_split",
    "write_lists",
    "write_shape",
]

TXT_FOLDER = "modelnet40_normal_resampled"
H5_FOLDER = "modelnet40_ply_hdf5_2048"
SHAPE_NAMES = "modelnet40_shape_names.txt"
SPLIT_LIST = "modelnet40_{split}.txt"
FPS_CACHE = "modelnet40_{split}_8192pts_fps.dat"
H5_SHAPE_NAMES = "shape_names.txt"
SPLITS = ("train", "test")

Source = Literal["txt", "dat", "h5"]

LAYOUT = (
    f"expected ModelNet40 as <root>/{TXT_FOLDER}/ (or that folder itself) holding {SHAPE_NAMES}, "
    "modelnet40_{train,test}.txt and <class>/<class>_NNNN.txt files of 'x,y,z,nx,ny,nz' lines (or the "
    "modelnet40_{train,test}_8192pts_fps.dat caches instead of the class folders), or as "
    f"<root>/{H5_FOLDER}/ holding ply_data_train*.h5 and ply_data_test*.h5 ('data' and 'label')"
)


# --------------------------------------------------------------------------------------------
# Finding the dataset and listing its splits
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelNetDataset:
    """The dataset folder and which of the two layouts it holds."""

    folder: Path
    kind: Literal["txt", "h5"]


def _h5_files(folder: Path, split: str) -> list[Path]:
    """``ply_data_<split>N.h5`` files in numeric order (``train10`` after ``train9``)."""
    pattern = re.compile(rf"^ply_data_{split}(\d+)\.h5$")
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := pattern.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def _kind_of(folder: Path) -> Literal["txt", "h5"] | None:
    if (folder / SHAPE_NAMES).is_file():
        return "txt"
    if folder.is_dir() and (_h5_files(folder, "train") or _h5_files(folder, "test")):
        return "h5"
    return None


def find_dataset(data_root: Path | str | None, task: str = "modelnet40") -> ModelNetDataset:
    """The dataset under ``data_root`` (``<root>/<layout folder>`` first, then the root itself).

    Anything else raises :class:`DataError` naming the expected layouts.
    """
    if data_root is None:
        raise DataError(f"{task} needs a data root: pass --data-root {task}=PATH; {LAYOUT}")
    root = Path(data_root).expanduser()
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise DataError(f"{task} data root {str(root)!r} {what}; {LAYOUT}")
    for nested in (root / TXT_FOLDER, root / H5_FOLDER):
        if nested.is_dir():
            kind = _kind_of(nested)
            if kind is None:
                raise DataError(f"{task}: {str(nested)!r} holds neither {SHAPE_NAMES} nor ply_data_*.h5; {LAYOUT}")
            return ModelNetDataset(nested, kind)
    kind = _kind_of(root)
    if kind is None:
        raise DataError(f"{task} data root {str(root)!r} holds no ModelNet40 dataset; {LAYOUT}")
    return ModelNetDataset(root, kind)


@dataclass(frozen=True)
class ModelNetSplit:
    """One split: sample ids in the dataset's order, their labels, and where points come from."""

    dataset: ModelNetDataset
    split: str
    ids: tuple[str, ...]
    labels: tuple[int, ...]
    #: Class names in label order; empty for an HDF5 folder without ``shape_names.txt``.
    classes: tuple[str, ...]
    source: Source

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def files_sha256(self) -> str:
        return _ids_hash(self.ids)

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else (max(self.labels) + 1 if self.labels else 0)


@lru_cache(maxsize=16)
def _ids_hash(ids: tuple[str, ...]) -> str:
    return sha256_of(ids)


def _read_lines(path: Path) -> list[str]:
    """Non-empty lines with trailing whitespace removed (the reference's ``line.rstrip()``)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {str(path)!r}: {exc}") from None
    return [line.rstrip() for line in text.splitlines() if line.strip()]


def read_split(dataset: ModelNetDataset, split: str) -> ModelNetSplit:
    """List ``split`` (``train`` or ``test``); remembered per folder and modification times."""
    if split not in SPLITS:
        raise ValueError(f"unknown ModelNet40 split {split!r}; use one of {SPLITS}")
    stamp = dataset.folder.stat().st_mtime_ns
    if dataset.kind == "txt":
        listing = dataset.folder / SPLIT_LIST.format(split=split)
        if not listing.is_file():
            raise DataError(f"modelnet40: {str(dataset.folder)!r} has no {listing.name}; {LAYOUT}")
        stamp = max(stamp, listing.stat().st_mtime_ns, (dataset.folder / SHAPE_NAMES).stat().st_mtime_ns)
    return _read_split(dataset, split, stamp)


@lru_cache(maxsize=16)
def _read_split(dataset: ModelNetDataset, split: str, _stamp: int) -> ModelNetSplit:
    if dataset.kind == "h5":
        return _read_h5_split(dataset, split)
    folder = dataset.folder
    classes = tuple(_read_lines(folder / SHAPE_NAMES))
    if len(set(classes)) != len(classes):
        raise DataError(f"{str(folder / SHAPE_NAMES)!r} names a class twice")
    index = {name: i for i, name in enumerate(classes)}
    listing = folder / SPLIT_LIST.format(split=split)
    ids: list[str] = []
    labels: list[int] = []
    for number, shape in enumerate(_read_lines(listing), 1):
        name = "_".join(shape.split("_")[:-1])
        if name not in index:
            raise DataError(
                f"{str(listing)!r} line {number}: shape {shape!r} is of class {name!r}, "
                f"which {SHAPE_NAMES} does not name"
            )
        ids.append(f"{name}/{shape}.txt")
        labels.append(index[name])
    if not ids:
        raise DataError(f"{str(listing)!r} lists no shapes; {LAYOUT}")
    source: Source = "dat" if (folder / FPS_CACHE.format(split=split)).is_file() else "txt"
    return ModelNetSplit(dataset, split, tuple(ids), tuple(labels), classes, source)


def _h5py() -> Any:
    try:
        import h5py
    except ImportError:
        raise DataError(
            "the modelnet40_ply_hdf5_2048 layout needs h5py: pip install 'benchsuite[pointcloud]' "
            f"(or use the {TXT_FOLDER} layout)"
        ) from None
    return h5py


def _read_h5(path: Path, what: str) -> np.ndarray:
    h5py = _h5py()
    try:
        with h5py.File(path, "r") as handle:
            return np.asarray(handle[what][()])
    except (OSError, KeyError) as exc:
        raise DataError(f"cannot read {what!r} from {str(path)!r}: {exc}") from None


def _read_h5_split(dataset: ModelNetDataset, split: str) -> ModelNetSplit:
    files = _h5_files(dataset.folder, split)
    if not files:
        raise DataError(f"modelnet40: {str(dataset.folder)!r} has no ply_data_{split}*.h5 file; {LAYOUT}")
    names_file = dataset.folder / H5_SHAPE_NAMES
    classes = tuple(_read_lines(names_file)) if names_file.is_file() else ()
    ids: list[str] = []
    labels: list[int] = []
    for path in files:
        label = _read_h5(path, "label").reshape(-1)
        ids.extend(f"{path.name}:{row}" for row in range(len(label)))
        labels.extend(int(v) for v in label)
    if classes and any(not 0 <= v < len(classes) for v in labels):
        raise DataError(
            f"modelnet40: a label in ply_data_{split}*.h5 is outside the {len(classes)} classes of {H5_SHAPE_NAMES}"
        )
    if any(v < 0 for v in labels):
        raise DataError(f"modelnet40: ply_data_{split}*.h5 holds negative labels")
    return ModelNetSplit(dataset, split, tuple(ids), tuple(labels), classes, "h5")


def check_files(split: ModelNetSplit) -> None:
    """Every shape file the split needs exists (txt source); DataError naming the first missing."""
    if split.source != "txt":
        return
    folder = split.dataset.folder
    missing = [sample_id for sample_id in split.ids if not (folder / sample_id).is_file()]
    if missing:
        raise DataError(
            f"modelnet40: {len(missing)} of the {len(split)} {split.split} shapes listed in "
            f"{SPLIT_LIST.format(split=split.split)} are missing under {str(folder)!r} (first: {missing[0]}) "
            f"and there is no {FPS_CACHE.format(split=split.split)}; {LAYOUT}"
        )


# --------------------------------------------------------------------------------------------
# Points: reading, preprocessing, the in-process cache
# --------------------------------------------------------------------------------------------


def preprocess_steps(source: Source, num_points: int) -> list[str]:
    """The preprocessing of ``source`` in words, for the result manifest."""
    read = {
        "dat": "read the 8192-point FPS cache (modelnet40_<split>_8192pts_fps.dat) as float32",
        "txt": "read every point of the txt shape (x,y,z,nx,ny,nz) as float32",
        "h5": "read every point of the h5 row (2048 in the official files) as float32",
    }[source]
    sample = (
        f"keep the first {num_points} points (no FPS)"
        if source == "h5"
        else f"FPS to {num_points} points: start index 0, pointnet2_ops conventions incl. the near-origin rule"
    )
    return [read, "normalize xyz: subtract the centroid, divide by the max radius", "drop normals", sample,
            "no voting"]


_cache: dict[tuple[Any, ...], dict[int, np.ndarray]] = {}
_cache_lock = threading.Lock()


def clear_cache() -> None:
    """Forget every preprocessed cloud (tests; a long-lived process that changes data)."""
    with _cache_lock:
        _cache.clear()


def load_points(split: ModelNetSplit, indices: Sequence[int], num_points: int, device: str = "cpu") -> torch.Tensor:
    """Preprocessed clouds ``(len(indices), num_points, 3)`` float32 (CPU) of the split's ``indices``.

    ``device`` is where FPS runs (only for speed; see :func:`~benchsuite.pointcloud.data.fps_downsample`).
    """
    key = (split.dataset, split.split, split.source, split.files_sha256, int(num_points))
    with _cache_lock:
        done = _cache.setdefault(key, {})
        wanted = sorted({int(i) for i in indices} - set(done))
        if wanted:
            done.update(_preprocess(split, wanted, num_points, device))
        clouds = [done[int(i)] for i in indices]
    if not clouds:
        return torch.empty(0, num_points, 3)
    return torch.from_numpy(np.stack(clouds))


def _preprocess(split: ModelNetSplit, indices: list[int], num_points: int, device: str) -> Mapping[int, np.ndarray]:
    if split.source == "txt":
        raw = [_read_shape(split, i) for i in indices]
    else:  # the whole .dat or h5 files are read anyway: keep every shape of the split
        indices = list(range(len(split)))
        raw = _read_dat(split) if split.source == "dat" else _read_h5_points(split)
    done: dict[int, np.ndarray] = {}
    for start in range(0, len(indices), _CHUNK):  # chunks bound the float copies of a large split
        chunk = indices[start : start + _CHUNK]
        clouds = raw[start : start + _CHUNK]
        for index, cloud in zip(chunk, clouds):
            if cloud.shape[0] < num_points:
                raise DataError(
                    f"modelnet40 shape {split.ids[index]!r} has {cloud.shape[0]} points; the model needs {num_points}"
                )
        normalized = [normalize_unit_sphere(cloud[:, :3].astype(np.float32)).astype(np.float32) for cloud in clouds]
        if split.source == "h5":
            sampled = [cloud[:num_points] for cloud in normalized]
        else:
            sampled = list(fps_downsample(normalized, num_points, device=device))
        done.update((index, np.ascontiguousarray(cloud)) for index, cloud in zip(chunk, sampled))
        raw[start : start + _CHUNK] = [None] * len(chunk)  # type: ignore[list-item]  # free as we go
    return done


#: Shapes preprocessed at a time.
_CHUNK = 256


def _read_shape(split: ModelNetSplit, index: int) -> np.ndarray:
    path = split.dataset.folder / split.ids[index]
    data = read_point_txt(path, delimiter=",")
    if data.shape[1] < 3:
        raise DataError(f"point file {str(path)!r} has {data.shape[1]} columns per line, expected x,y,z[,nx,ny,nz]")
    return data.astype(np.float32)


def _read_h5_points(split: ModelNetSplit) -> list[np.ndarray]:
    clouds: list[np.ndarray] = []
    for path in _h5_files(split.dataset.folder, split.split):
        data = _read_h5(path, "data")
        if data.ndim != 3 or data.shape[2] < 3:
            raise DataError(f"'data' in {str(path)!r} has shape {data.shape}, expected (N, points, 3)")
        clouds.extend(np.asarray(row, dtype=np.float32) for row in data)
    if len(clouds) != len(split):
        raise DataError(f"ply_data_{split.split}*.h5 hold {len(clouds)} clouds but {len(split)} labels")
    return clouds


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles lists of numpy arrays and nothing else: a ``.dat`` file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _pickle_allow_list().get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a point cache")
        return allowed


@lru_cache(maxsize=1)
def _pickle_allow_list() -> dict[tuple[str, str], Any]:
    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 renamed numpy.core
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):  # files pickled under numpy 1 or 2
        allowed[(f"{package}.multiarray", "_reconstruct")] = core.multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = core.multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = core.numeric._frombuffer
    return allowed


def _read_dat(split: ModelNetSplit) -> list[np.ndarray]:
    path = split.dataset.folder / FPS_CACHE.format(split=split.split)
    try:
        with path.open("rb") as handle:
            content = _ArrayUnpickler(handle).load()
    except Exception as exc:  # noqa: BLE001 - every reader error means an unusable cache
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"cannot read the point cache {str(path)!r}: {first}") from None
    if not (isinstance(content, (list, tuple)) and len(content) == 2 and all(isinstance(c, list) for c in content)):
        raise DataError(f"point cache {str(path)!r} is not [list of points, list of labels]")
    points, labels = content
    if len(points) != len(split) or len(labels) != len(split):
        raise DataError(
            f"point cache {str(path)!r} holds {len(points)} shapes, {SPLIT_LIST.format(split=split.split)} lists "
            f"{len(split)}: delete the cache or restore the list"
        )
    clouds: list[np.ndarray] = []
    for number, (cloud, label) in enumerate(zip(points, labels)):
        cloud = np.asarray(cloud)
        if cloud.ndim != 2 or cloud.shape[1] < 3:
            raise DataError(f"point cache {str(path)!r} entry {number} has shape {cloud.shape}")
        if int(np.asarray(label).reshape(-1)[0]) != split.labels[number]:
            raise DataError(
                f"point cache {str(path)!r} labels entry {number} ({split.ids[number]}) "
                f"{int(np.asarray(label).reshape(-1)[0])}, the lists say {split.labels[number]}"
            )
        clouds.append(cloud.astype(np.float32, copy=False))
    return clouds


# --------------------------------------------------------------------------------------------
# Writing the txt layout (the demo twin generates its data in it; tests write tiny ones)
# --------------------------------------------------------------------------------------------


def write_shape(path: Path, points: np.ndarray, normals: np.ndarray | None = None) -> None:
    """One ``x,y,z,nx,ny,nz`` file in the dataset's number format (6 decimals)."""
    table = points if normals is None else np.column_stack([points, normals])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savetxt(path, table, fmt="%.6f", delimiter=",")


def write_lists(folder: Path, classes: Sequence[str], splits: Mapping[str, Sequence[str]]) -> None:
    """``modelnet40_shape_names.txt`` and ``modelnet40_<split>.txt`` (shape names without .txt)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SHAPE_NAMES).write_text("".join(f"{name}\n" for name in classes))
    for split, shapes in splits.items():
        (folder / SPLIT_LIST.format(split=split)).write_text("".join(f"{shape}\n" for shape in shapes))

