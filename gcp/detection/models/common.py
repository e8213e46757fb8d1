"""Building blocks and the detector base class shared by the YOLOv4, YOLOv3 and MobileNet-YOLOv3 builders.

The blocks follow the paper's Fig. 2 vocabulary: CBM (Conv-BN-Mish), CBL (Conv-BN-LeakyReLU(0.1)), the Res
unit, and the YOLO head (a CBL 3x3 then a plain 1x1 convolution with bias). Every activation is its own module
instance so a forward trace (``grouping.trace_layers``) sees each layer exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

DEFAULT_STRIDES: tuple[int, int, int] = (8, 16, 32)

# YOLOv4's anchors for a 416x416 input (darknet yolov4.cfg) in input pixels; one row of three per stride.
YOLOV4_ANCHORS: tuple[tuple[tuple[float, float], ...], ...] = (
    ((12.0, 16.0), (19.0, 36.0), (40.0, 28.0)),
    ((36.0, 75.0), (76.0, 55.0), (72.0, 146.0)),
    ((142.0, 110.0), (192.0, 243.0), (459.0, 401.0)),
)

# Image size the objectness prior of the head bias is computed for: the paper trains and evaluates at 416x416.
_PRIOR_IMAGE_SIZE = 416
# Expected number of objects per image behind the objectness prior (a PASCAL VOC image holds ~2-3; 8 is the
# YOLOv5 convention, still a tiny probability per cell, which is what matters).
_PRIOR_OBJECTS_PER_IMAGE = 8
# Prior probability mass shared by the classes of a positive cell before any training.
_PRIOR_CLASS_MASS = 0.6


def scale_channels(channels: int, width: float) -> int:
    """Channel count of a width-scaled variant: ``channels * width`` rounded to a multiple of 8, at least 8.

    Multiples of 8 keep the convolutions friendly to vectorised kernels, and the floor of 8 keeps the tiniest
    CPU variants meaningful.
    """
    if width <= 0:
        raise ValueError(f"width multiplier must be positive, got {width}")
    return max(8, int(round(channels * width / 8)) * 8)


def scale_depth(repeats: int, depth: float) -> int:
    """Number of repeated Res units in a depth-scaled variant: ``round(repeats * depth)``, at least 1."""
    if depth <= 0:
        raise ValueError(f"depth multiplier must be positive, got {depth}")
    return max(1, int(round(repeats * depth)))


class ConvBnAct(nn.Sequential):
    """Convolution (no bias) -> BatchNorm -> activation; the CBM / CBL unit of the paper's Fig. 2.

    The BatchNorm's gamma is what sparse training and channel pruning act on (paper §4.1, Eq. 1), which is why
    the convolution carries no bias of its own.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        activation: str = "leaky",
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = make_activation(activation)


def make_activation(name: str) -> nn.Module:
    """A fresh activation module: ``"mish"`` (CSPDarknet53) or ``"leaky"`` (LeakyReLU, darknet's 0.1)."""
    if name == "mish":
        return nn.Mish()
    if name == "leaky":
        return nn.LeakyReLU(0.1)
    raise ValueError(f"unknown activation {name!r}; expected 'mish' or 'leaky'")


def cbm(in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1) -> ConvBnAct:
    """Conv-BN-Mish, the backbone unit of YOLOv4."""
    return ConvBnAct(in_channels, out_channels, kernel_size, stride, activation="mish")


def cbl(in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1) -> ConvBnAct:
    """Conv-BN-LeakyReLU(0.1), the neck and head unit of YOLOv3/v4 (and Darknet53's backbone unit)."""
    return ConvBnAct(in_channels, out_channels, kernel_size, stride, activation="leaky")


class ResUnit(nn.Module):
    """Residual unit: 1x1 squeeze to ``hidden`` channels, 3x3 back to ``channels``, plus the identity."""

    def __init__(self, channels: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.reduce = ConvBnAct(channels, hidden, 1, activation=activation)
        self.expand = ConvBnAct(hidden, channels, 3, activation=activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.expand(self.reduce(x))


def five_cbl(in_channels: int, channels: int) -> nn.Sequential:
    """The neck's five alternating CBLs (1x1 to ``channels``, 3x3 to twice that, ...), ending at 1x1."""
    return nn.Sequential(
        cbl(in_channels, channels, 1),
        cbl(channels, channels * 2, 3),
        cbl(channels * 2, channels, 1),
        cbl(channels, channels * 2, 3),
        cbl(channels * 2, channels, 1),
    )


DARKNET_WIDTHS = (32, 64, 128, 256, 512, 1024)


class DarknetBackbone(nn.Module):
    """A stem and five stride-2 stages (Darknet53 and CSPDarknet53 share this skeleton, paper §3 Fig. 3).

    ``stage(in_channels, out_channels, repeats, index)`` builds stage ``index`` (1–5); forward returns the
    stride-8, 16 and 32 feature maps (C3, C4, C5) that the neck consumes.
    """

    def __init__(
        self,
        stem: Callable[[int, int, int], nn.Module],
        stage: Callable[[int, int, int, int], nn.Module],
        repeats: Sequence[int],
        width: float = 1.0,
        depth: float = 1.0,
    ) -> None:
        super().__init__()
        c = [scale_channels(n, width) for n in DARKNET_WIDTHS]
        r = [scale_depth(n, depth) for n in repeats]
        self.stem = stem(3, c[0], 3)
        for index in range(1, 6):
            setattr(self, f"stage{index}", stage(c[index - 1], c[index], r[index - 1], index))
        self.out_channels = (c[3], c[4], c[5])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.stage2(self.stage1(self.stem(x)))
        c3 = self.stage3(x)
        c4 = self.stage4(c3)
        c5 = self.stage5(c4)
        return c3, c4, c5


class YoloHeadLevel(nn.Module):
    """One scale of the YOLO head: CBL 3x3 doubling the channels, then a 1x1 convolution with bias (no BN)
    producing ``num_anchors * (5 + num_classes)`` raw outputs per cell."""

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int) -> None:
        super().__init__()
        self.conv = cbl(in_channels, in_channels * 2, 3)
        self.predict = nn.Conv2d(in_channels * 2, num_anchors * (5 + num_classes), 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict(self.conv(x))


def as_anchor_tensor(anchors: Sequence | torch.Tensor | None, num_scales: int = 3) -> torch.Tensor:
    """Validate anchors given as nested sequences or a tensor and return a float tensor (num_scales, A, 2).

    ``None`` gives :data:`YOLOV4_ANCHORS`. Anchors are widths and heights in input pixels, one row per stride.
    The values are checked on the CPU and returned on the default device, except the meta device: there the
    anchors (a few numbers, which the builders read back into their record) stay on the CPU, so that a
    detector can be built without memory to count its parameters, which is how :mod:`gcp.core.serialize` sizes a
    model file's recorded builder before building it.
    """
    values = YOLOV4_ANCHORS if anchors is None else anchors
    tensor = torch.as_tensor(values, dtype=torch.float32, device="cpu")
    if tensor.dim() != 3 or tensor.shape[0] != num_scales or tensor.shape[2] != 2 or tensor.shape[1] < 1:
        raise ValueError(
            f"anchors must have shape ({num_scales}, A, 2) (one row of (w, h) pairs per stride), "
            f"got {tuple(tensor.shape)}"
        )
    if not torch.isfinite(tensor).all() or (tensor <= 0).any():
        raise ValueError("anchors must be positive, finite widths and heights in pixels")
    device = torch.get_default_device()
    return tensor.to("cpu" if device.type == "meta" else device, copy=True)


def scale_anchors(anchors: Sequence | torch.Tensor | None, factor: float) -> torch.Tensor:
    """Anchors for an input ``factor`` times the size they were designed for (e.g. ``256 / 416``).

    Letterboxing scales every object by the same factor as the image, so scaling the anchors keeps them
    matched to the objects; ``None`` scales the default :data:`YOLOV4_ANCHORS`.
    """
    if not factor > 0:
        raise ValueError(f"anchor scale factor must be positive, got {factor}")
    return as_anchor_tensor(anchors) * factor


class YoloDetector(nn.Module):
    """Base class of the three detectors: the attributes decode, NMS and the loss rely on, and the head.

    ``forward`` (in subclasses) returns the raw head tensors of docs/design.md: a list, strides 8, 16, 32,
    each ``(B, A * (5 + C), H, W)`` laid out ``[anchor][x, y, w, h, obj, cls...]``. Decoding needs only
    ``num_classes``, ``strides`` and the ``anchors`` buffer, so it keeps working after channel pruning (which
    never touches the head's output convolutions).
    """

    def __init__(self, num_classes: int, anchors: Sequence | torch.Tensor | None) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = num_classes
        self.strides: tuple[int, ...] = DEFAULT_STRIDES
        self.register_buffer("anchors", as_anchor_tensor(anchors, num_scales=len(self.strides)))
        self.gcp_builder: dict = {}

    @property
    def num_anchors(self) -> int:
        """Anchors per grid cell and scale (A)."""
        return int(self.anchors.shape[1])

    def build_head(self, in_channels: Sequence[int]) -> nn.ModuleList:
        """Create ``self.head`` (one :class:`YoloHeadLevel` per stride) with prior-initialised biases.

        Called last by subclasses so the head is registered after the backbone and neck.
        """
        if len(in_channels) != len(self.strides):
            raise ValueError(f"need one head input per stride {self.strides}, got {len(in_channels)}")
        self.head = nn.ModuleList(
            YoloHeadLevel(channels, self.num_anchors, self.num_classes) for channels in in_channels
        )
        for level, stride in zip(self.head, self.strides):
            initialise_prediction_bias(level.predict, stride, self.num_anchors, self.num_classes)
        return self.head


def initialise_prediction_bias(predict: nn.Conv2d, stride: int, num_anchors: int, num_classes: int) -> None:
    """Start the head at sensible probabilities so training from scratch does not first fight a flood of
    false positives (the YOLOv5 prior, also "Focal Loss" §4.1's bias trick).

    Objectness starts near ``8 / cells``: about eight objects per 416x416 image spread over the ``(416/s)^2``
    cells of stride ``s``. Class logits start at ``0.6 / (C - 0.99)`` each. Box logits keep their default
    init.
    """
    cells = (_PRIOR_IMAGE_SIZE / stride) ** 2
    with torch.no_grad():
        bias = predict.bias.view(num_anchors, 5 + num_classes)
        bias[:, 4] += math.log(_PRIOR_OBJECTS_PER_IMAGE / cells)
        bias[:, 5:] += math.log(_PRIOR_CLASS_MASS / (num_classes - 0.99))
