"""A detector, a dataset and a loss small enough to train in milliseconds, for the trainer's tests.

The detector follows the output contract of docs/design.md (three raw head tensors at strides 8, 16, 32,
``anchors``, ``strides``, ``num_classes``), has BatchNorm (weight-decay groups, γ hooks) and dropout, and the
dataset augments with torch, numpy and python ``random`` alike, so a resume that restored any random stream
wrongly shows up as different weights.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

IMAGE_SIZE = 32
NUM_CLASSES = 2


class TinyDetector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.num_classes = NUM_CLASSES
        self.strides = (8, 16, 32)
        self.register_buffer("anchors", torch.tensor([[[8.0, 8.0]], [[16.0, 16.0]], [[32.0, 32.0]]]))
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, kernel_size=3, stride=8, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.SiLU(),
            nn.Dropout(0.1),
        )
        self.head = nn.Conv2d(8, 5 + NUM_CLASSES, kernel_size=1)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        stride8 = self.stem(images)
        stride16 = F.avg_pool2d(stride8, 2)
        stride32 = F.avg_pool2d(stride16, 2)
        return [self.head(features) for features in (stride8, stride16, stride32)]


def make_model(seed: int = 0) -> TinyDetector:
    torch.manual_seed(seed)
    return TinyDetector()


def square_target(index: int, x0: int, y0: int) -> dict:
    """The target of image ``index``: its 8x8 square at (x0, y0), class ``index % NUM_CLASSES``."""
    return {
        "boxes": torch.tensor([[x0, y0, x0 + 8, y0 + 8]], dtype=torch.float32),
        "labels": torch.tensor([index % NUM_CLASSES]),
        "image_id": index,
    }


class ToyDetection(Dataset):
    """One bright 8x8 square per image (its box the target), plus noise and a random horizontal flip."""

    def __init__(self, length: int = 8) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        corner = torch.randint(0, IMAGE_SIZE - 8, (2,), generator=torch.Generator().manual_seed(index))
        x0, y0 = int(corner[0]), int(corner[1])
        image = torch.rand(3, IMAGE_SIZE, IMAGE_SIZE) * 0.2
        image[:, y0 : y0 + 8, x0 : x0 + 8] += 0.6 + float(np.random.uniform(0.0, 0.2))
        if random.random() < 0.5:
            image = image.flip(-1)
            x0 = IMAGE_SIZE - 8 - x0
        return image.clamp(0, 1), square_target(index, x0, y0)


def toy_loss(outputs: list[torch.Tensor], targets: list[dict]) -> dict[str, torch.Tensor]:
    """Objectness BCE on the stride-8 map (1 in the cell holding each box centre) plus a small class term."""
    stride8 = outputs[0]
    objectness = torch.zeros_like(stride8[:, 4])
    for image_index, target in enumerate(targets):
        centres = (target["boxes"][:, :2] + target["boxes"][:, 2:]) / 2
        cells = (centres / 8).long().clamp(0, stride8.shape[-1] - 1)
        objectness[image_index, cells[:, 1], cells[:, 0]] = 1.0
    obj = F.binary_cross_entropy_with_logits(stride8[:, 4], objectness)
    cls = stride8[:, 5:].pow(2).mean() * 0.1
    return {"obj": obj, "cls": cls, "total": obj + cls}


class Interrupted(Exception):
    """Stands in for a kill in the middle of an epoch."""


class GammaSubgradient:
    """A stateful after_backward hook in the manner of dynamic sparse training: adds s·sign(γ) to γ's grad."""

    def __init__(self, model: torch.nn.Module, interrupt_at_call: int | None = None) -> None:
        self.gamma = model.stem[1].weight
        self.calls = 0
        self.interrupt_at_call = interrupt_at_call

    def after_backward(self, epoch: int, total_epochs: int) -> None:
        self.calls += 1
        if self.calls == self.interrupt_at_call:
            raise Interrupted
        self.gamma.grad.add_(1e-3 * torch.sign(self.gamma.detach()))

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = state["calls"]


class PlainDetector(nn.Module):
    """TinyDetector without BatchNorm and dropout: its gradient on a batch is the sum of its gradients on any
    split of that batch, which is what comparing one process with several needs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, kernel_size=3, stride=8, padding=1), nn.SiLU())
        self.head = nn.Conv2d(8, 5 + NUM_CLASSES, kernel_size=1)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        stride8 = self.stem(images)
        return [self.head(stride8), F.avg_pool2d(stride8, 2), F.avg_pool2d(stride8, 4)]


def make_plain_model(seed: int = 0) -> PlainDetector:
    torch.manual_seed(seed)
    return PlainDetector()


class FixedDetection(ToyDetection):
    """ToyDetection without augmentation: image i is the same in every process, whatever its random state."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        noise = torch.Generator().manual_seed(1000 + index)
        corner = torch.randint(0, IMAGE_SIZE - 8, (2,), generator=torch.Generator().manual_seed(index))
        x0, y0 = int(corner[0]), int(corner[1])
        image = torch.rand(3, IMAGE_SIZE, IMAGE_SIZE, generator=noise) * 0.2
        image[:, y0 : y0 + 8, x0 : x0 + 8] += 0.7
        return image.clamp(0, 1), square_target(index, x0, y0)


def toy_sum_loss(outputs: list[torch.Tensor], targets: list[dict]) -> dict[str, torch.Tensor]:
    """toy_loss summed over the batch's images (the convention of gcp.detection.loss.YoloLoss): the terms a batch of 2B
    images gives are the sums of those its two halves give."""
    return {name: value * len(targets) for name, value in toy_loss(outputs, targets).items()}
