"""The ShapeNetPart folder layout: reading it (real data and the demo twin) and writing it (demo).

Layout (tasks spec §3.2), under the user's data root or as the root itself::

    shapenetcore_partanno_segmentation_benchmark_v0_normal/
      synsetoffset2category.txt                      "<Category>\t<synset>" per line
      train_test_split/shuffled_{train,val,test}_file_list.json
                                                     ["shape_data/<synset>/<shape id>", ...]
      <synset>/<shape id>.txt                        "x y z nx ny nz part_label" per line

As in Point-MAE's ``PartNormalDataset``: a category's index (its one-hot position) is its line in
``synsetoffset2category.txt``; a split lists shapes category by category in that order, each
category's shapes sorted by id; xyz are normalized into the unit sphere over *all* of a shape's
points (centroid, max radius), and only then resampled with replacement to a fixed count. Normals
are read and dropped (Point-MAE's segmentation runs without ``--normal``, i.e. on xyz only). The
resample is seeded per shape (:func:`benchsuite.pointcloud.data.resample_indices`).

A sample id is ``"<synset>/<shape id>"``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from benchsuite.api import sha256_of
from benchsuite.errors import DataError
from benchsuite.pointcloud.data import normalize_unit_sphere, read_point_txt, resample_indices

__all__ = [
    "CATEGORY_FILE",
    "DATASET_FOLDER",
    "LAYOUT",
    "SPLITS",
    "SPLIT_FOLDER",
    "Category",
    "Clouds",
    "PartSplit",
    "atomic_folder",
    "clear_caches",
    "dataset_folder",
    "load_clouds",
    "load_shape",
    "publish_folder",
    "read_categories",
    "read_split",
    "write_shape",
    "write_split_lists",
]

DATASET_FOLDER = "shapenetcore_partanno_segmentation_benchmark_v0_normal"
CATEGORY_FILE = "synsetoffset2category.txt"
SPLIT_FOLDER = "train_test_split"
SPLITS = ("train", "val", "test")
#: Columns of a shape file: x y z nx ny nz part_label.
COLUMNS = 7

LAYOUT = (
    f"expected ShapeNetPart as <root>/{DATASET_FOLDER}/ (or that folder itself) holding {CATEGORY_FILE}, "
    f"{SPLIT_FOLDER}/shuffled_{{train,val,test}}_file_list.json and <synset>/<shape id>.txt files "
    "with 'x y z nx ny nz part_label' lines"
)


@dataclass(frozen=True)
class Category:
    """One category: its name, synset folder, one-hot index and global part ids."""

    name: str
    synset: str
    index: int
    parts: tuple[int, ...]


def dataset_folder(data_root: Path | str | None, task: str = "shapenetpart") -> Path:
    """The dataset folder: ``<root>/DATASET_FOLDER`` if present, else ``root`` holding the layout."""
    if data_root is None:
        raise DataError(f"{task} needs a data root: pass --data-root {task}=PATH; {LAYOUT}")
    root = Path(data_root).expanduser()
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise DataError(f"{task} data root {str(root)!r} {what}; {LAYOUT}")
    nested = root / DATASET_FOLDER
    folder = nested if nested.is_dir() else root
    if not (folder / CATEGORY_FILE).is_file():
        raise DataError(f"{task} data root {str(root)!r} has no {CATEGORY_FILE}; {LAYOUT}")
    if not (folder / SPLIT_FOLDER).is_dir():
        raise DataError(f"{task} data root {str(root)!r} has no {SPLIT_FOLDER}/ folder; {LAYOUT}")
    return folder


def read_categories(folder: Path, table: Mapping[str, Sequence[int]]) -> tuple[Category, ...]:
    """The categories of ``synsetoffset2category.txt`` in file order, with their parts from ``table``.

    The file must name exactly the categories of ``table``: another set means another dataset (or
    a part table that does not fit it), and the one-hot order would be wrong.
    """
    path = folder / CATEGORY_FILE
    entries: list[tuple[str, str]] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise DataError(f"{str(path)!r} line {number}: expected '<Category> <synset>', got {line.strip()!r}")
        entries.append((fields[0], fields[1]))
    names = [name for name, _ in entries]
    if sorted(names) != sorted(table) or len(set(names)) != len(names):
        missing = sorted(set(table) - set(names))
        extra = sorted(set(names) - set(table))
        raise DataError(
            f"{str(path)!r} lists categories {names}, expected {sorted(table)}"
            + (f" (missing: {', '.join(missing)})" if missing else "")
            + (f" (unknown: {', '.join(extra)})" if extra else "")
        )
    return tuple(Category(name, synset, i, tuple(table[name])) for i, (name, synset) in enumerate(entries))


@dataclass(frozen=True)
class PartSplit:
    """One split: sample ids (``synset/shape``) in reference order and their category indices."""

    folder: Path
    split: str
    ids: tuple[str, ...]
    categories: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def ids_sha256(self) -> str:
        return _ids_hash(self.ids)


@lru_cache(maxsize=16)
def _ids_hash(ids: tuple[str, ...]) -> str:
    return sha256_of(ids)


def read_split(folder: Path, split: str, categories: Sequence[Category]) -> PartSplit:
    """The shapes of ``shuffled_<split>_file_list.json``; remembered per (folder, split, mtime)."""
    if split not in SPLITS:
        raise ValueError(f"unknown ShapeNetPart split {split!r}; splits: {', '.join(SPLITS)}")
    path = folder / SPLIT_FOLDER / f"shuffled_{split}_file_list.json"
    if not path.is_file():
        raise DataError(f"ShapeNetPart split list {str(path)!r} does not exist; {LAYOUT}")
    return _read_split(str(folder), split, tuple(categories), path.stat().st_mtime_ns)


@lru_cache(maxsize=16)
def _read_split(folder_text: str, split: str, categories: tuple[Category, ...], _mtime: int) -> PartSplit:
    folder = Path(folder_text)
    path = folder / SPLIT_FOLDER / f"shuffled_{split}_file_list.json"
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read ShapeNetPart split list {str(path)!r}: {exc}") from None
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise DataError(f"{str(path)!r} must hold a JSON list of 'shape_data/<synset>/<shape id>' strings")
    by_synset = {c.synset: c for c in categories}
    per_category: dict[int, set[str]] = {c.index: set() for c in categories}
    for entry in entries:
        parts = entry.strip("/").split("/")
        if len(parts) < 2 or parts[-2] not in by_synset:
            raise DataError(
                f"{str(path)!r} lists {entry!r}, which is not 'shape_data/<synset>/<shape id>' with a synset "
                f"of {CATEGORY_FILE}"
            )
        per_category[by_synset[parts[-2]].index].add(parts[-1])
    ids: list[str] = []
    cats: list[int] = []
    for category in categories:
        for shape in sorted(per_category[category.index]):
            ids.append(f"{category.synset}/{shape}")
            cats.append(category.index)
    missing = [i for i in ids if not (folder / f"{i}.txt").is_file()]
    if missing:
        raise DataError(
            f"ShapeNetPart {split} list names {len(missing)} shape file(s) missing under {str(folder)!r} "
            f"(first: {missing[0]}.txt); {LAYOUT}"
        )
    return PartSplit(folder, split, tuple(ids), tuple(cats))


def clear_caches() -> None:
    """Forget remembered split lists (they are re-read when a list file's mtime changes)."""
    _read_split.cache_clear()
    _ids_hash.cache_clear()


def load_shape(folder: Path, sample_id: str, category: Category) -> tuple[np.ndarray, np.ndarray]:
    """One shape: normalized xyz ``(n, 3)`` float32 and part labels ``(n,)`` int64, all its points.

    Labels outside the category's parts raise :class:`DataError`: they would mean a part table
    that does not fit the files.
    """
    path = folder / f"{sample_id}.txt"
    data = read_point_txt(path, columns=COLUMNS)
    labels_float = data[:, -1]
    labels = np.rint(labels_float).astype(np.int64)
    if not np.array_equal(labels, labels_float):
        raise DataError(f"shape file {str(path)!r} has non-integer part labels")
    unknown = np.setdiff1d(np.unique(labels), np.asarray(category.parts))
    if unknown.size:
        raise DataError(
            f"shape file {str(path)!r} has part labels {unknown.tolist()} outside {category.name}'s "
            f"parts {list(category.parts)}"
        )
    xyz = normalize_unit_sphere(data[:, :3]).astype(np.float32)
    return xyz, labels


@dataclass(frozen=True)
class Clouds:
    """Resampled, preprocessed shapes: xyz ``(S, N, 3)`` float32, labels ``(S, N)``, categories ``(S,)``."""

    ids: tuple[str, ...]
    points: torch.Tensor
    labels: torch.Tensor
    categories: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)


def load_clouds(
    split: PartSplit,
    categories: Sequence[Category],
    indices: Sequence[int],
    num_points: int,
    seed: int,
) -> Clouds:
    """Shapes ``split.ids[i]`` for ``i`` in ``indices``, normalized and resampled to ``num_points``.

    Shape ``s`` takes ``resample_indices(len(s), num_points, seed, s_id)``: with replacement,
    depending on nothing but the seed and the shape id.
    """
    ids = tuple(split.ids[i] for i in indices)
    cats = [split.categories[i] for i in indices]
    points = np.empty((len(ids), num_points, 3), dtype=np.float32)
    labels = np.empty((len(ids), num_points), dtype=np.int64)
    for row, (sample_id, category) in enumerate(zip(ids, cats)):
        xyz, seg = load_shape(split.folder, sample_id, categories[category])
        choice = resample_indices(len(xyz), num_points, seed, sample_id)
        points[row], labels[row] = xyz[choice], seg[choice]
    return Clouds(ids, torch.from_numpy(points), torch.from_numpy(labels), torch.tensor(cats, dtype=torch.long))


# --------------------------------------------------------------------------------------------
# Writing the layout (the demo twin generates its data in it)
# --------------------------------------------------------------------------------------------


def write_shape(path: Path, points: np.ndarray, normals: np.ndarray, labels: np.ndarray) -> None:
    """One ``x y z nx ny nz part_label`` file, in the dataset's number format (6 decimals)."""
    table = np.column_stack([points, normals, labels.astype(np.float64)])
    path.parent.mkdir(parents=True, exist_ok=True)
    # One %-format over the whole table: twice as fast as np.savetxt, same text.
    line = " ".join(["%.6f"] * table.shape[1]) + "\n"
    path.write_text((line * len(table)) % tuple(table.ravel().tolist()))


def write_split_lists(folder: Path, splits: Mapping[str, Sequence[str]], categories: Sequence[tuple[str, str]]) -> None:
    """``synsetoffset2category.txt`` (``(name, synset)`` in order) and the three split lists.

    ``splits`` maps a split name to its ``synset/shape`` ids; they are written as the dataset
    writes them, ``shape_data/<synset>/<shape id>``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CATEGORY_FILE).write_text("".join(f"{name}\t{synset}\n" for name, synset in categories))
    (folder / SPLIT_FOLDER).mkdir(exist_ok=True)
    for split in SPLITS:
        entries = [f"shape_data/{sample_id}" for sample_id in splits.get(split, ())]
        (folder / SPLIT_FOLDER / f"shuffled_{split}_file_list.json").write_text(json.dumps(entries))


def atomic_folder(final: Path) -> Path:
    """A fresh temporary folder next to ``final``, to fill and then rename onto it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=final.name + ".", suffix=".tmp", dir=final.parent))


def publish_folder(tmp: Path, final: Path) -> None:
    """Move a filled temporary folder to ``final``; if another process won the race, keep theirs."""
    try:
        os.replace(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
