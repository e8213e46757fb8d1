"""Box-aware image transforms: letterboxing and training augmentation on ``torchvision.transforms.v2``.

Every geometric step here goes through ``torchvision.transforms.v2`` with ``tv_tensors.BoundingBoxes``, so the
boxes follow the pixels by construction instead of by hand-written arithmetic.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

#: Grey used for letterbox padding and for the area uncovered by random affine moves (114/255, as in YOLO).
PAD_VALUE_UINT8 = 114


def letterbox(
    image: tv_tensors.Image, boxes: tv_tensors.BoundingBoxes, size: int
) -> tuple[tv_tensors.Image, tv_tensors.BoundingBoxes]:
    """Resize ``image`` so its longer side is ``size`` (aspect kept) and pad it, centred, to ``size x size``.

    Detectors such as YOLOv4 (the paper's §5 runs it at 416x416) take square inputs; letterboxing keeps the
    objects' shapes undistorted, and the grey padding is the same grey the augmentation uses.
    """
    if size <= 0:
        raise ValueError(f"letterbox size must be positive, got {size}")
    height, width = image.shape[-2:]
    scale = size / max(height, width)
    new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
    if (new_height, new_width) != (height, width):
        image = F.resize(image, size=[new_height, new_width], antialias=True)
        boxes = F.resize(boxes, size=[new_height, new_width])
    left, top = (size - new_width) // 2, (size - new_height) // 2
    padding = [left, top, size - new_width - left, size - new_height - top]
    fill = PAD_VALUE_UINT8 if image.dtype == torch.uint8 else PAD_VALUE_UINT8 / 255.0
    return F.pad(image, padding, fill=fill), F.pad(boxes, padding)


def training_augmentation(*, horizontal_flip: bool = True) -> v2.Compose:
    """Random zoom/shift, horizontal flip and colour jitter for float images, all box-aware through v2.

    ``horizontal_flip=False`` is for classes whose mirror image is not a member of the class: a mirrored
    digit or letter is not a digit or letter, so flipping DigitScenes teaches the classifier shapes the test
    split never shows (VOC's objects, the paper's data, are mirror-symmetric as classes and keep the flip).

    ``RandomAffine`` without rotation or shear keeps axis-aligned boxes exact while it zooms in and out
    (scale 0.5-1.5) and shifts by up to 10 %; the uncovered area is filled with the letterbox grey. Hue
    jitter is left out: YOLO's +-1.5 % hue shift tripled the cost of the whole pipeline (RGB-HSV round trip).
    """
    return v2.Compose(
        [
            v2.RandomAffine(
                degrees=0.0,
                translate=(0.1, 0.1),
                scale=(0.5, 1.5),
                interpolation=v2.InterpolationMode.BILINEAR,
                fill={tv_tensors.Image: PAD_VALUE_UINT8 / 255.0, "others": 0},
            ),
            *([v2.RandomHorizontalFlip(p=0.5)] if horizontal_flip else []),
            v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.5),
        ]
    )


#: Per-box entries of a sample that must be dropped together with their boxes.
PER_BOX_KEYS = ("labels", "difficult")


def per_box_entries(sample: Any) -> tuple[torch.Tensor, ...]:
    """The per-box tensors of a sample dict (labels and the difficult flags) for ``SanitizeBoundingBoxes``,
    whose default finds only ``labels`` and would leave the flags misaligned with the boxes it drops."""
    return tuple(sample[key] for key in PER_BOX_KEYS if key in sample)


def finalize_boxes() -> v2.Compose:
    """Clamp boxes to the canvas and drop the degenerate ones (under 1 px) that resizing left."""
    return v2.Compose(
        [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter=per_box_entries)]
    )
