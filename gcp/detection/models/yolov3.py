"""YOLOv3: Darknet53 + FPN + three YOLO heads (Redmon & Farhadi 2018; darknet ``yolov3.cfg``).

The FPN neck is shared with MobileNet-YOLOv3. ``forward`` runs backbone, the whole top-down neck, then the
heads in stride order 8, 16, 32, so execution order separates backbone, neck and head cleanly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gcp.detection.models.common import (
    DarknetBackbone,
    ResUnit,
    YoloDetector,
    cbl,
    five_cbl,
    scale_channels,
)

# Res units per stage of Darknet53 (strides 2, 4, 8, 16, 32).
DARKNET53_REPEATS = (1, 2, 8, 8, 4)
# Strides of the attention maps distilled for Darknet53-YOLOv3: paper §6.3 uses four scales, 104x104 to 13x13
# of a 416 input, where YOLOv4 and MobileNet-YOLOv3 use five (208x208 too). Read by distill.taps.tap_strides.
DARKNET53_ATTENTION_STRIDES: tuple[int, ...] = (4, 8, 16, 32)


class DarknetStage(nn.Module):
    """A stride-2 CBL 3x3 followed by X Res units (1x1 squeeze to half the channels, 3x3 back)."""

    def __init__(self, in_channels: int, out_channels: int, num_res_units: int) -> None:
        super().__init__()
        self.downsample = cbl(in_channels, out_channels, 3, stride=2)
        self.res_units = nn.Sequential(
            *(ResUnit(out_channels, out_channels // 2, activation="leaky") for _ in range(num_res_units))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_units(self.downsample(x))


def darknet53(width: float = 1.0, depth: float = 1.0) -> DarknetBackbone:
    """Darknet53: CBL stem and five Darknet stages (stride-2 CBL + residual units)."""
    return DarknetBackbone(
        cbl, lambda cin, cout, n, _i: DarknetStage(cin, cout, n), DARKNET53_REPEATS, width, depth
    )


class FPNNeck(nn.Module):
    """YOLOv3's top-down neck: five CBLs on C5, then twice (CBL 1x1, upsample, concat with the finer backbone
    map, five CBLs). Returns the head inputs (P3, P4, P5) at strides 8, 16, 32."""

    def __init__(self, in_channels: Sequence[int], width: float = 1.0) -> None:
        super().__init__()
        c3, c4, c5 = in_channels
        n3, n4, n5 = (scale_channels(n, width) for n in (128, 256, 512))
        self.fuse_p5 = five_cbl(c5, n5)
        self.reduce_p5 = cbl(n5, n4, 1)
        self.upsample_p5 = nn.Upsample(scale_factor=2, mode="nearest")
        self.fuse_p4 = five_cbl(n4 + c4, n4)
        self.reduce_p4 = cbl(n4, n3, 1)
        self.upsample_p4 = nn.Upsample(scale_factor=2, mode="nearest")
        self.fuse_p3 = five_cbl(n3 + c3, n3)
        self.out_channels = (n3, n4, n5)

    def forward(
        self, features: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c3, c4, c5 = features
        p5 = self.fuse_p5(c5)
        p4 = self.fuse_p4(torch.cat([self.upsample_p5(self.reduce_p5(p5)), c4], dim=1))
        p3 = self.fuse_p3(torch.cat([self.upsample_p4(self.reduce_p4(p4)), c3], dim=1))
        return p3, p4, p5


class FPNDetector(YoloDetector):
    """A backbone returning (C3, C4, C5) with ``out_channels``, the FPN neck, and the YOLO heads."""

    def __init__(
        self, backbone: nn.Module, num_classes: int, width: float, anchors: Sequence | torch.Tensor | None
    ) -> None:
        super().__init__(num_classes, anchors)
        self.backbone = backbone
        self.neck = FPNNeck(backbone.out_channels, width)
        self.build_head(self.neck.out_channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.neck(self.backbone(x))
        return [level(feature) for level, feature in zip(self.head, features)]


def yolov3(
    num_classes: int = 20,
    width: float = 1.0,
    depth: float = 1.0,
    anchors: Sequence | torch.Tensor | None = None,
) -> FPNDetector:
    """Build YOLOv3 (Darknet53 + FPN). ``width`` scales channels (multiples of 8), ``depth`` the Res units;
    ``anchors`` (3, A, 2) in input pixels default to YOLOv4's 416-px anchors. ``model.attention_strides`` are
    the four scales §6.3 distils it at."""
    model = FPNDetector(darknet53(width, depth), num_classes, width, anchors)
    model.attention_strides = DARKNET53_ATTENTION_STRIDES
    model.gcp_builder = {
        "name": "yolov3",
        "kwargs": {
            "num_classes": num_classes,
            "width": width,
            "depth": depth,
            "anchors": None if anchors is None else model.anchors.tolist(),
        },
    }
    return model
