"""Point-cloud support: grouping ops (FPS, kNN) and the Point-MAE backbone.

Nothing here needs a compiled extension: the pure-torch ops run on CPU and GPU, and
``torch-cluster`` (the ``pointcloud`` extra) is used only when installed and asked for.
"""

from __future__ import annotations

from benchsuite.pointcloud.ops import farthest_point_sample, gather_points, knn, torch_cluster_available
from benchsuite.pointcloud.point_mae import (
    PointMAEClassifier,
    PointMAESegmenter,
    load_point_mae_checkpoint,
    pack_segmentation_input,
)

__all__ = [
    "PointMAEClassifier",
    "PointMAESegmenter",
    "farthest_point_sample",
    "gather_points",
    "knn",
    "load_point_mae_checkpoint",
    "pack_segmentation_input",
    "torch_cluster_available",
]
