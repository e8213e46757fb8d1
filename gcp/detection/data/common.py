"""The shared base of the dataset readers: records, input checks, image loading, letterbox and collate.

A reader (VOC, COCO, YOLO) only parses its annotation format into :class:`ImageRecord` objects; everything a
detector needs afterwards — checking the files, clipping boxes, letterboxing, augmenting, producing the
``(image, target)`` pair of docs/design.md — happens here once, so the three formats behave the same way.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from PIL import Image as PILImage
from torch.utils.data import Dataset
from torchvision import io as tvio
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from gcp.detection.data.transforms import finalize_boxes, letterbox, training_augmentation

Item = TypeVar("Item")


class DatasetError(ValueError):
    """A dataset cannot be read as asked: the message names the file, class or setting at fault."""


class CorruptFileError(DatasetError):
    """One image or annotation file is missing or unreadable; ``strict=False`` readers skip such files."""


def _no_boxes() -> torch.Tensor:
    return torch.zeros(0, 4)


def _no_labels() -> torch.Tensor:
    return torch.zeros(0, dtype=torch.long)


@dataclass(frozen=True)
class ImageRecord:
    """One image and its objects, boxes ``xyxy`` in the pixels of the original (not letterboxed) image.

    ``boxes``/``labels`` are the objects a detector is trained on and scored against. ``difficult_boxes`` /
    ``difficult_labels`` are VOC's "difficult" objects, kept apart because the VOC protocol neither trains on
    them nor counts them as ground truth, but ignores detections that hit them (:mod:`gcp.detection.evaluate`): dropping
    them outright would score such a detection as a false positive.
    """

    image_path: Path
    width: int
    height: int
    boxes: torch.Tensor  # FloatTensor[N, 4]
    labels: torch.Tensor  # LongTensor[N]
    difficult_boxes: torch.Tensor = field(default_factory=_no_boxes)  # FloatTensor[M, 4]
    difficult_labels: torch.Tensor = field(default_factory=_no_labels)  # LongTensor[M]


@dataclass
class SkippedFiles:
    """The files a ``strict=False`` reader passed over, reported together in one warning."""

    reasons: list[str] = field(default_factory=list)

    def warn(self, dataset_name: str) -> None:
        """Emit one warning with the count and the first few reasons, or nothing when no file was skipped."""
        if self.reasons:
            shown = "; ".join(self.reasons[:3]) + ("; ..." if len(self.reasons) > 3 else "")
            warnings.warn(
                f"{dataset_name}: skipped {len(self.reasons)} unreadable item(s) (strict=False): {shown}",
                stacklevel=3,
            )


def parse_items(
    items: Iterable[Item], parse: Callable[[Item], Any], *, strict: bool, skipped: SkippedFiles
) -> list[Any]:
    """Apply ``parse`` to every item; a :class:`CorruptFileError` stops the reader, or, if not strict, is
    recorded in ``skipped`` and the item left out. Other errors (a wrong label map) always propagate."""
    parsed = []
    for item in items:
        try:
            parsed.append(parse(item))
        except CorruptFileError as error:
            if strict:
                raise
            skipped.reasons.append(str(error))
    return parsed


def probe_image(path: Path) -> tuple[int, int]:
    """Return ``(width, height)`` from the image header, raising :class:`CorruptFileError` naming the file.

    Reading only the header is cheap (no pixel decode), so every image can be checked when the dataset is
    built instead of failing hours into a training run.
    """
    if not path.is_file():
        raise CorruptFileError(f"image file not found: {path}")
    try:
        with PILImage.open(path) as image:
            image.verify()
            return image.size
    except Exception as error:  # PIL raises many unrelated types for broken files
        raise CorruptFileError(f"cannot read image {path}: {error}") from error


def load_image(path: Path) -> torch.Tensor:
    """Decode an image file into a ``uint8`` RGB tensor ``(3, H, W)``; the error names the file."""
    try:
        return tvio.decode_image(str(path), mode=tvio.ImageReadMode.RGB)
    except (RuntimeError, OSError, ValueError) as error:
        raise CorruptFileError(f"cannot decode image {path}: {error}") from error


def clip_boxes(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Clip ``xyxy`` pixel boxes to the image rectangle ``[0, width] x [0, height]``."""
    limits = torch.tensor([width, height, width, height], dtype=boxes.dtype)
    return torch.minimum(boxes.clamp(min=0), limits)


def positive_area(boxes: torch.Tensor) -> torch.Tensor:
    """Mask of the ``xyxy`` boxes whose width and height are both positive."""
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def _fixed_boxes(
    boxes: torch.Tensor, labels: torch.Tensor, width: int, height: int
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Boxes clipped to the image and those of zero area dropped, their labels, and the counts of both."""
    clipped = clip_boxes(boxes, width, height)
    keep = positive_area(clipped)
    changed = int(((clipped != boxes).any(dim=1) & keep).sum())
    return clipped[keep], labels[keep], changed, int((~keep).sum())


def checked_records(records: Sequence[ImageRecord], dataset_name: str) -> list[ImageRecord]:
    """Clip boxes reaching outside their image and drop zero-area ones, with one warning for each kind of
    fix (issue §7), so a sloppy annotation neither crashes training nor passes unnoticed. Difficult objects
    get the same fixes and count in the same warnings."""
    if not records:
        raise DatasetError(f"{dataset_name}: the dataset is empty (no readable images found)")
    fixed, clipped_in, dropped_in, n_clipped, n_dropped = [], [], [], 0, 0
    for record in records:
        size = (record.width, record.height)
        boxes, labels, changed, dropped = _fixed_boxes(record.boxes, record.labels, *size)
        hard_boxes, hard_labels, hard_changed, hard_dropped = _fixed_boxes(
            record.difficult_boxes, record.difficult_labels, *size
        )
        changed, dropped = changed + hard_changed, dropped + hard_dropped
        fixed.append(ImageRecord(record.image_path, *size, boxes, labels, hard_boxes, hard_labels))
        n_clipped, n_dropped = n_clipped + changed, n_dropped + dropped
        if changed:
            clipped_in.append(record.image_path.name)
        if dropped:
            dropped_in.append(record.image_path.name)
    if n_clipped:
        warnings.warn(
            f"{dataset_name}: clipped {n_clipped} box(es) reaching outside their image "
            f"(e.g. in {', '.join(clipped_in[:3])})",
            stacklevel=3,
        )
    if n_dropped:
        warnings.warn(
            f"{dataset_name}: dropped {n_dropped} zero-area box(es) (e.g. in {', '.join(dropped_in[:3])})",
            stacklevel=3,
        )
    return fixed


class DetectionDataset(Dataset):
    """Letterboxed ``(image, target)`` pairs in the format of docs/design.md, from parsed records.

    ``image`` is a float tensor ``(3, size, size)`` in ``[0, 1]``; ``target`` holds ``boxes`` (xyxy pixels of
    the letterboxed image), ``labels`` in ``[0, num_classes)`` and ``image_id`` (the item's index), plus
    ``difficult_boxes``/``difficult_labels`` (VOC's difficult objects, usually empty): the loss reads only
    ``boxes``/``labels``, :func:`gcp.detection.evaluate.compute_map` ignores detections of the difficult ones.
    ``augment=True`` applies :func:`gcp.detection.data.transforms.training_augmentation`; ``horizontal_flip=False`` leaves
    its mirroring out, for classes that a mirror changes (digits, text).
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        class_names: Sequence[str],
        *,
        size: int,
        augment: bool,
        dataset_name: str,
        horizontal_flip: bool = True,
    ) -> None:
        if size <= 0 or size % 32:
            raise DatasetError(f"{dataset_name}: size must be a positive multiple of 32, got {size}")
        if not class_names or len(set(class_names)) != len(class_names):
            raise DatasetError(f"{dataset_name}: class names must be non-empty and unique, got {class_names}")
        self.records = checked_records(records, dataset_name)
        self.class_names = tuple(class_names)
        self.size = size
        self._augmentation = training_augmentation(horizontal_flip=horizontal_flip) if augment else None
        self._finalize = finalize_boxes()

    @property
    def augment(self) -> bool:
        """Whether items are randomly augmented (training) or only letterboxed (evaluation)."""
        return self._augmentation is not None

    @property
    def num_classes(self) -> int:
        """Number of object classes, the ``C`` of the detection heads."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        record = self.records[index]
        pixels = load_image(record.image_path)
        height, width = pixels.shape[-2:]
        if (width, height) != (record.width, record.height):
            raise CorruptFileError(
                f"image {record.image_path} decodes to {width}x{height}, its header or annotation says "
                f"{record.width}x{record.height}"
            )
        image = tv_tensors.Image(pixels)
        # Difficult objects ride along with the others, flagged, so every geometric step moves them alike
        # (a second BoundingBoxes would be filtered with the first one's mask by SanitizeBoundingBoxes); each
        # step acts box by box, so the other objects come out exactly as without them.
        all_boxes = torch.cat([record.boxes, record.difficult_boxes.to(record.boxes.dtype)])
        difficult = torch.cat(
            [
                torch.zeros(len(record.labels), dtype=torch.bool),
                torch.ones(len(record.difficult_labels), dtype=torch.bool),
            ]
        )
        boxes = tv_tensors.BoundingBoxes(all_boxes, format="XYXY", canvas_size=(height, width))
        image, boxes = letterbox(image, boxes, self.size)
        sample = {
            "image": F.to_dtype(image, torch.float32, scale=True),
            "boxes": boxes,
            "labels": torch.cat([record.labels, record.difficult_labels.to(record.labels.dtype)]),
            "difficult": difficult,
        }
        if self._augmentation is not None:
            sample = self._augmentation(sample)
        sample = self._finalize(sample)
        boxes, labels = sample["boxes"].as_subclass(torch.Tensor).float(), sample["labels"].long()
        normal = ~sample["difficult"]
        target = {
            "boxes": boxes[normal],
            "labels": labels[normal],
            "image_id": index,
            "difficult_boxes": boxes[~normal],
            "difficult_labels": labels[~normal],
        }
        return sample["image"].as_subclass(torch.Tensor), target


def collate(
    batch: Sequence[tuple[torch.Tensor, dict[str, Any]]],
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Stack the images of a batch and keep the targets as a list (objects per image differ in number)."""
    if not batch:
        raise ValueError("collate got an empty batch")
    images, targets = zip(*batch)
    return torch.stack(images), list(targets)


def batch_to(images: torch.Tensor, device: torch.device | str, *, channels_last: bool) -> torch.Tensor:
    """A batch on ``device``, in channels-last memory order when asked.

    Why: on CPU, oneDNN convolutions on channels-last input skip a reorder per layer and the output stays
    channels-last, so the whole network follows the input without touching the model's weights. Measured on
    the shipped DigitScenes teacher (reduced YOLOv4, 256 px, 2 AVX2 cores): a training step of 32 images
    4.35 s → 2.93 s, an inference batch of 16 0.60 s → 0.50 s (``benchmarks/bench_layout.py``).
    Results equal the default layout's up to float rounding.
    """
    images = images.to(device, non_blocking=True)
    if not channels_last:
        return images
    if images.dim() != 4:
        raise ValueError(
            f"channels_last=True needs 4-D image batches (N, C, H, W), got shape {tuple(images.shape)}"
        )
    return images.contiguous(memory_format=torch.channels_last)
