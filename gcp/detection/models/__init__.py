"""Detectors (YOLOv4, YOLOv3, MobileNet-YOLOv3), their decoding and NMS, and a registry to rebuild them.

Every builder records ``model.gcp_builder = {"name": ..., "kwargs": {...}}``; ``build(**model.gcp_builder)``
rebuilds the same (unpruned) architecture, which is how a pruned checkpoint finds its base.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gcp.core.registry import register_builder
from gcp.detection.models.common import YOLOV4_ANCHORS, YoloDetector, scale_anchors
from gcp.detection.models.mobilenet_yolov3 import mobilenet_yolov3
from gcp.detection.models.postprocess import decode, postprocess
from gcp.detection.models.yolov3 import yolov3
from gcp.detection.models.yolov4 import yolov4

BUILDERS: dict[str, Callable[..., YoloDetector]] = {
    "yolov4": yolov4,
    "yolov3": yolov3,
    "mobilenet_yolov3": mobilenet_yolov3,
}
for _name, _builder in BUILDERS.items():  # so gcp.load_pruned rebuilds them from a file's record
    register_builder(_name, _builder)


def build(name: str, kwargs: dict[str, Any] | None = None, **overrides: Any) -> YoloDetector:
    """Build the detector registered as ``name``.

    Takes the builder's keyword arguments either as a dict, so ``build(**model.gcp_builder)`` rebuilds a
    model from its record, or directly (``build("yolov4", num_classes=3)``); direct ones win over the dict.
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown detector {name!r}; available: {', '.join(sorted(BUILDERS))}")
    return BUILDERS[name](**{**(kwargs or {}), **overrides})


__all__ = [
    "BUILDERS",
    "YOLOV4_ANCHORS",
    "YoloDetector",
    "build",
    "decode",
    "mobilenet_yolov3",
    "postprocess",
    "scale_anchors",
    "yolov3",
    "yolov4",
]
