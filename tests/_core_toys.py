"""Small detectors with every coupling pattern the core must handle: residual add, CSP concat, split, SPP, upsample."""

from __future__ import annotations

import torch
from torch import nn


def cbl(cin: int, cout: int, k: int = 3, s: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1)
    )


class Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.a = cbl(c, c, 1)
        self.b = cbl(c, c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(self.a(x))


class SplitCSP(nn.Module):
    """C2f-like: conv, split in two halves, residual on one half, concat, conv."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.cv1 = cbl(c, c, 1)
        self.res = Residual(c // 2)
        self.cv2 = cbl(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.cv1(x).chunk(2, 1)
        return self.cv2(torch.cat([a, self.res(b)], 1))


class SPP(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.cv1 = cbl(c, c // 2, 1)
        self.pools = nn.ModuleList(nn.MaxPool2d(k, 1, k // 2) for k in (5, 9))
        self.cv2 = cbl(c // 2 * 3, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        return self.cv2(torch.cat([x] + [p(x) for p in self.pools], 1))


class ToyDetector(nn.Module):
    """Two outputs (strides 8 and 16); backbone → SPP → top-down neck → heads, like a tiny YOLOv4."""

    def __init__(self, width: int = 16, outputs: int = 12, split: bool = True) -> None:
        super().__init__()
        w = width
        self.stem = cbl(3, w, 3, 2)
        self.stage1 = nn.Sequential(cbl(w, 2 * w, 3, 2), Residual(2 * w))
        self.stage2 = nn.Sequential(cbl(2 * w, 4 * w, 3, 2), SplitCSP(4 * w) if split else Residual(4 * w))
        self.stage3 = nn.Sequential(cbl(4 * w, 8 * w, 3, 2), Residual(8 * w))
        self.spp = SPP(8 * w)
        self.lateral = cbl(8 * w, 4 * w, 1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.fuse = cbl(8 * w, 4 * w, 1)
        self.head8 = nn.Sequential(cbl(4 * w, 4 * w, 3), nn.Conv2d(4 * w, outputs, 1))
        self.down = cbl(4 * w, 8 * w, 3, 2)
        self.head16 = nn.Sequential(cbl(16 * w, 8 * w, 3), nn.Conv2d(8 * w, outputs, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c3 = self.stage2(self.stage1(self.stem(x)))
        c4 = self.spp(self.stage3(c3))
        p3 = self.fuse(torch.cat([self.up(self.lateral(c4)), c3], 1))
        out8 = self.head8(p3)
        out16 = self.head16(torch.cat([self.down(p3), c4], 1))
        return [out8, out16]


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm layers varied γ/β/statistics so that pruning decisions are not ties."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.05
            m.bias.data = torch.randn(n, generator=g) * 0.1
            m.running_mean.data = torch.randn(n, generator=g) * 0.1
            m.running_var.data = torch.rand(n, generator=g) + 0.5
    return model.eval()


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand 1×1 → depthwise 3×3 → project 1×1, residual add."""

    def __init__(self, c: int, expand: int) -> None:
        super().__init__()
        e = c * expand
        self.expand = cbl(c, e, 1)
        self.dw = nn.Sequential(nn.Conv2d(e, e, 3, 1, 1, groups=e, bias=False), nn.BatchNorm2d(e), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.dw(self.expand(x)))


class MobileToy(nn.Module):
    """Stem, three inverted-residual blocks, one prediction conv: most channels pass a depthwise conv."""

    def __init__(self, width: int = 16, expand: int = 4) -> None:
        super().__init__()
        self.stem = cbl(3, width, 3, 2)
        self.blocks = nn.Sequential(*(InvertedResidual(width, expand) for _ in range(3)))
        self.head = nn.Conv2d(width, 6, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.head(self.blocks(self.stem(x)))]


class C2fToy(nn.Module):
    """YOLOv8's C2f: chunk in two, a residual on the second part, concat of *both* parts and its output."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        second = c // 2  # chunk(2) puts the odd channel in the first part
        self.stem = cbl(3, c, 3)
        self.cv1 = cbl(c, c, 1)
        self.m = Residual(second)
        self.cv2 = cbl(c + second, c, 1)
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        a, b = self.cv1(self.stem(x)).chunk(2, 1)
        return [self.head(self.cv2(torch.cat([a, b, self.m(b)], 1)))]
