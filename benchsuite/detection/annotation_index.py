"""The image list and categories of a COCO annotation file, read without loading its annotations.

``instances_train2017.json`` is ~450 MB, nearly all of it annotations; calibration needs only its
``images`` (id, file name, size) and every cell of a run builds its own task. So the two small
arrays are streamed out with ijson (its C backend) and memoized per process by path, size and
modification time: a run reads each file once, and a changed file is read again.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import NamedTuple

from benchsuite.errors import DataError

__all__ = ["ImageRecord", "categories", "image_records"]


class ImageRecord(NamedTuple):
    """One entry of a COCO file's ``images`` array."""

    id: int
    file_name: str
    height: int
    width: int


def image_records(path: Path) -> tuple[ImageRecord, ...]:
    """The ``images`` array of the annotation file ``path``, in file order."""
    return _image_records(*_identity(path))


def categories(path: Path) -> dict[str, int]:
    """Category name -> id of the annotation file ``path``."""
    return dict(_categories(*_identity(path)))


def _identity(path: Path) -> tuple[str, int, int]:
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise DataError(f"cannot read the COCO annotation file {str(path)!r}: {exc.strerror}") from None
    return str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=8)
def _image_records(path: str, _size: int, _mtime_ns: int) -> tuple[ImageRecord, ...]:
    items = _stream(path, "images.item")
    try:
        return tuple(
            ImageRecord(int(im["id"]), str(im["file_name"]), int(im["height"]), int(im["width"])) for im in items
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"cannot read the image list of {path!r}: bad image entry ({exc})") from None


@functools.lru_cache(maxsize=8)
def _categories(path: str, _size: int, _mtime_ns: int) -> tuple[tuple[str, int], ...]:
    try:
        return tuple((str(c["name"]), int(c["id"])) for c in _stream(path, "categories.item"))
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"cannot read the categories of {path!r}: bad category entry ({exc})") from None


def _stream(path: str, prefix: str) -> list[dict]:
    import ijson

    try:
        with open(path, "rb") as handle:
            return list(ijson.items(handle, prefix, use_float=True))
    except OSError as exc:
        raise DataError(f"cannot read the COCO annotation file {path!r}: {exc.strerror}") from None
    except ijson.JSONError as exc:
        raise DataError(f"{path!r} is not valid JSON: {exc}") from None
