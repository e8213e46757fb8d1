"""MobileNet-YOLOv3: torchvision's MobileNetV2 as backbone, YOLOv3's FPN neck and heads.

The backbone is ``torchvision.models.mobilenet_v2(weights=None)`` (architecture only, never any download); its
``features`` are cut after blocks 6, 13 and 18, where the map reaches strides 8, 16 and 32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision
from torch import nn

from gcp.detection.models.yolov3 import FPNDetector

# Where MobileNetV2's ``features`` are cut: [0, 7) ends at stride 8, [7, 14) at 16, [14, 19) at 32.
_STRIDE8_END, _STRIDE16_END = 7, 14


class MobileNetV2Backbone(nn.Module):
    """torchvision MobileNetV2 feature extractor split into the stages ending at strides 8, 16 and 32."""

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        features = torchvision.models.mobilenet_v2(weights=None, width_mult=width).features
        self.stage8 = features[:_STRIDE8_END]
        self.stage16 = features[_STRIDE8_END:_STRIDE16_END]
        self.stage32 = features[_STRIDE16_END:]
        self.out_channels = tuple(
            stage[-1].out_channels for stage in (self.stage8, self.stage16, self.stage32)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c3 = self.stage8(x)
        c4 = self.stage16(c3)
        c5 = self.stage32(c4)
        return c3, c4, c5


def mobilenet_yolov3(
    num_classes: int = 20, width: float = 1.0, anchors: Sequence | torch.Tensor | None = None
) -> FPNDetector:
    """Build MobileNet-YOLOv3. ``width`` is MobileNetV2's ``width_mult`` and also scales the neck and head;
    ``anchors`` (3, A, 2) in input pixels default to YOLOv4's 416-px anchors."""
    if width <= 0:
        raise ValueError(f"width multiplier must be positive, got {width}")
    model = FPNDetector(MobileNetV2Backbone(width), num_classes, width, anchors)
    model.gcp_builder = {
        "name": "mobilenet_yolov3",
        "kwargs": {
            "num_classes": num_classes,
            "width": width,
            "anchors": None if anchors is None else model.anchors.tolist(),
        },
    }
    return model
