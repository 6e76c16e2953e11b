"""Object detection support (the ``coco`` extra): mmdetection 3.x detectors with Swin backbones.

Importing this package imports neither mmdet nor mmcv; the submodules that need them import them
where they are used. :mod:`benchsuite.detection.checkpoint` converts and loads the official Swin
detection checkpoints (trained with mmdet 2.x) into mmdet 3's key layout.
"""
