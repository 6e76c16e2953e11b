"""Streaming the image list and categories out of a COCO annotation file."""

from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.coco
pytest.importorskip("ijson")

from benchsuite.detection.annotation_index import ImageRecord, categories, image_records  # noqa: E402
from benchsuite.errors import DataError  # noqa: E402


def _write(path, images, cats=({"id": 3, "name": "cat"},)):
    annotations = [{"id": i, "image_id": 1, "bbox": [0, 0, 1, 1], "segmentation": [[0, 0, 1, 0, 1, 1]]}
                   for i in range(50)]
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations, "categories": list(cats)}))


def test_images_and_categories_in_file_order(tmp_path):
    path = tmp_path / "a.json"
    _write(path, [{"id": 9, "file_name": "b.jpg", "height": 4, "width": 5, "license": 1},
                  {"id": 2, "file_name": "a.jpg", "height": 6, "width": 7}])
    assert image_records(path) == (ImageRecord(9, "b.jpg", 4, 5), ImageRecord(2, "a.jpg", 6, 7))
    assert categories(path) == {"cat": 3}


def test_a_changed_file_is_read_again(tmp_path):
    path = tmp_path / "a.json"
    _write(path, [{"id": 1, "file_name": "x.jpg", "height": 1, "width": 1}])
    assert len(image_records(path)) == 1
    stat = os.stat(path)
    _write(path, [{"id": 1, "file_name": "x.jpg", "height": 1, "width": 1},
                  {"id": 2, "file_name": "y.jpg", "height": 1, "width": 1}])
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert len(image_records(path)) == 2


@pytest.mark.parametrize("text, match", [
    ('{"images": [{"id": 1}]}', "bad image entry"),
    ('{"images": [', "not valid JSON"),
])
def test_bad_files_are_data_errors(tmp_path, text, match):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DataError, match=match):
        image_records(path)
    with pytest.raises(DataError, match="cannot read"):
        image_records(tmp_path / "missing.json")
