"""YOLOv4: CSPDarknet53 + SPP + PANet + three YOLO heads (paper §3, Fig. 2-3; darknet ``yolov4.cfg``).

Full size (``width=depth=1``, 20 classes) it has 64.0 M parameters and 29.9 G MACs at 416x416, the paper's
Table 2 "Base". ``width`` and ``depth`` give CPU-sized variants with the same topology.
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
    cbm,
    five_cbl,
    scale_channels,
)

# Res units per CSP stage of CSPDarknet53 (strides 2, 4, 8, 16, 32).
CSPDARKNET53_REPEATS = (1, 2, 8, 8, 4)


class CSPStage(nn.Module):
    """A CSP_X block: stride-2 CBM, then the input is split into a shortcut branch (one CBM 1x1) and a main
    branch (CBM 1x1, X Res units, CBM 1x1); the two are concatenated and fused by a CBM 1x1.

    The first stage of CSPDarknet53 is special in darknet: both branches keep the full width and its Res unit
    squeezes to half; later stages halve the branches and their Res units keep the branch width.
    """

    def __init__(self, in_channels: int, out_channels: int, num_res_units: int, first: bool = False) -> None:
        super().__init__()
        branch = out_channels if first else out_channels // 2
        res_hidden = branch // 2 if first else branch
        self.downsample = cbm(in_channels, out_channels, 3, stride=2)
        self.shortcut = cbm(out_channels, branch, 1)
        self.main_in = cbm(out_channels, branch, 1)
        self.res_units = nn.Sequential(
            *(ResUnit(branch, res_hidden, activation="mish") for _ in range(num_res_units))
        )
        self.main_out = cbm(branch, branch, 1)
        self.fuse = cbm(2 * branch, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        shortcut = self.shortcut(x)
        main = self.main_out(self.res_units(self.main_in(x)))
        return self.fuse(torch.cat([main, shortcut], dim=1))


def cspdarknet53(width: float = 1.0, depth: float = 1.0) -> DarknetBackbone:
    """CSPDarknet53: CBM stem and five CSP stages (the first without channel halving, as in darknet's cfg)."""
    return DarknetBackbone(
        cbm, lambda cin, cout, n, i: CSPStage(cin, cout, n, first=i == 1), CSPDARKNET53_REPEATS, width, depth
    )


class SPPBlock(nn.Module):
    """Three CBLs, spatial pyramid pooling (identity and 5/9/13 stride-1 max-pools, concatenated), three CBLs.

    The 1x1 "pool" is the identity branch; the pools widen the receptive field of the stride-32 map without
    changing its size.
    """

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.pre = nn.Sequential(
            cbl(in_channels, channels, 1), cbl(channels, channels * 2, 3), cbl(channels * 2, channels, 1)
        )
        self.pools = nn.ModuleList(nn.MaxPool2d(k, stride=1, padding=k // 2) for k in (5, 9, 13))
        self.post = nn.Sequential(
            cbl(channels * 4, channels, 1), cbl(channels, channels * 2, 3), cbl(channels * 2, channels, 1)
        )
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        return self.post(torch.cat([x, *(pool(x) for pool in self.pools)], dim=1))


class PANetNeck(nn.Module):
    """Path aggregation neck: a top-down pass (upsample, lateral CBL, concat, five CBLs) to stride 8, then a
    bottom-up pass (stride-2 CBL, concat, five CBLs) back to strides 16 and 32.

    The passes are separate methods because YOLOv4 runs the stride-8 head between them.
    """

    def __init__(self, c3: int, c4: int, p5: int, width: float = 1.0) -> None:
        super().__init__()
        n3, n4, n5 = (scale_channels(n, width) for n in (128, 256, 512))
        self.reduce_p5 = cbl(p5, n4, 1)
        self.upsample_p5 = nn.Upsample(scale_factor=2, mode="nearest")
        self.lateral_c4 = cbl(c4, n4, 1)
        self.fuse_p4 = five_cbl(2 * n4, n4)
        self.reduce_p4 = cbl(n4, n3, 1)
        self.upsample_p4 = nn.Upsample(scale_factor=2, mode="nearest")
        self.lateral_c3 = cbl(c3, n3, 1)
        self.fuse_p3 = five_cbl(2 * n3, n3)
        self.down_p3 = cbl(n3, n4, 3, stride=2)
        self.fuse_out4 = five_cbl(2 * n4, n4)
        self.down_out4 = cbl(n4, n5, 3, stride=2)
        self.fuse_out5 = five_cbl(n5 + p5, n5)
        self.out_channels = (n3, n4, n5)

    def top_down(
        self, c3: torch.Tensor, c4: torch.Tensor, p5: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stride-32 context into strides 16 and 8; returns (P3 = stride-8 head input, P4)."""
        up5 = self.upsample_p5(self.reduce_p5(p5))
        p4 = self.fuse_p4(torch.cat([self.lateral_c4(c4), up5], dim=1))
        up4 = self.upsample_p4(self.reduce_p4(p4))
        p3 = self.fuse_p3(torch.cat([self.lateral_c3(c3), up4], dim=1))
        return p3, p4

    def bottom_up_stride16(self, p3: torch.Tensor, p4: torch.Tensor) -> torch.Tensor:
        """Stride-16 head input: P3 downsampled and fused with P4."""
        return self.fuse_out4(torch.cat([self.down_p3(p3), p4], dim=1))

    def bottom_up_stride32(self, out4: torch.Tensor, p5: torch.Tensor) -> torch.Tensor:
        """Stride-32 head input: the stride-16 output downsampled and fused with the SPP output."""
        return self.fuse_out5(torch.cat([self.down_out4(out4), p5], dim=1))


class YOLOv4(YoloDetector):
    """YOLOv4 detector; ``forward`` runs backbone, SPP, top-down neck, stride-8 head, bottom-up to stride 16
    and its head, then stride 32 and its head (the execution order the grouping code reads scales from)."""

    def __init__(
        self,
        num_classes: int = 20,
        width: float = 1.0,
        depth: float = 1.0,
        anchors: Sequence | torch.Tensor | None = None,
    ) -> None:
        super().__init__(num_classes, anchors)
        self.backbone = cspdarknet53(width, depth)
        c3, c4, c5 = self.backbone.out_channels
        self.spp = SPPBlock(c5, scale_channels(512, width))
        self.neck = PANetNeck(c3, c4, self.spp.out_channels, width)
        self.build_head(self.neck.out_channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c3, c4, c5 = self.backbone(x)
        p5 = self.spp(c5)
        p3, p4 = self.neck.top_down(c3, c4, p5)
        out8 = self.head[0](p3)
        out4 = self.neck.bottom_up_stride16(p3, p4)
        out16 = self.head[1](out4)
        out5 = self.neck.bottom_up_stride32(out4, p5)
        out32 = self.head[2](out5)
        return [out8, out16, out32]


def yolov4(
    num_classes: int = 20,
    width: float = 1.0,
    depth: float = 1.0,
    anchors: Sequence | torch.Tensor | None = None,
) -> YOLOv4:
    """Build YOLOv4 (paper §3). ``width`` scales channels (multiples of 8), ``depth`` the Res units per stage;
    ``anchors`` (3, A, 2) in input pixels default to YOLOv4's 416-px anchors."""
    model = YOLOv4(num_classes, width, depth, anchors)
    model.gcp_builder = {
        "name": "yolov4",
        "kwargs": {
            "num_classes": num_classes,
            "width": width,
            "depth": depth,
            "anchors": None if anchors is None else model.anchors.tolist(),
        },
    }
    return model
