"""PASCAL VOC reader: ``Annotations/*.xml``, ``ImageSets/Main/{split}.txt`` and ``JPEGImages/*.jpg``.

VOC is the paper's dataset (§5.1: VOC07+12 trainval for training, VOC07 test for evaluation); DigitScenes is
written in the same layout so that this one reader serves both.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from gcp.detection.data.common import (
    CorruptFileError,
    DatasetError,
    DetectionDataset,
    ImageRecord,
    SkippedFiles,
    parse_items,
    probe_image,
)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

LABELS_FILE = "labels.txt"


@dataclass(frozen=True)
class VOCObject:
    """One ``<object>`` of an annotation: its class name, ``xyxy`` box in 0-based pixel edges and VOC's
    ``difficult`` flag."""

    name: str
    box: tuple[float, float, float, float]
    difficult: bool = False


def read_class_names(root: Path) -> tuple[str, ...]:
    """Class names from ``root/labels.txt`` (one per line) when present, else the 20 VOC classes."""
    labels_path = root / LABELS_FILE
    if not labels_path.is_file():
        return VOC_CLASSES
    names = tuple(
        line.strip() for line in labels_path.read_text(encoding="utf-8").splitlines() if line.strip()
    )
    if not names:
        raise DatasetError(f"class list {labels_path} is empty")
    return names


def read_split_ids(root: Path, split: str) -> list[str]:
    """Image ids listed in ``ImageSets/Main/{split}.txt`` (first token of each non-blank line)."""
    split_path = root / "ImageSets" / "Main" / f"{split}.txt"
    if not split_path.is_file():
        raise DatasetError(f"VOC split file not found: {split_path}")
    return [line.split()[0] for line in split_path.read_text(encoding="utf-8").splitlines() if line.strip()]


def parse_voc_xml(path: Path) -> list[VOCObject]:
    """Objects of one VOC annotation, ``difficult`` ones included and flagged.

    VOC's ``bndbox`` holds 1-based inclusive pixel indices; ``xmin - 1, ymin - 1, xmax, ymax`` are the
    0-based pixel edges used everywhere else. Difficult objects are kept (not trained on, but needed at
    evaluation: the VOC protocol ignores detections of them, which it cannot do for objects it never saw).
    """
    if not path.is_file():
        raise CorruptFileError(f"annotation file not found: {path}")
    try:
        root = ET.parse(path).getroot()
        objects = []
        for element in root.iter("object"):
            difficult = bool(int(element.findtext("difficult", default="0").strip() or 0))
            name = element.findtext("name")
            bndbox = element.find("bndbox")
            if name is None or bndbox is None:
                raise ValueError("an <object> lacks <name> or <bndbox>")
            xmin, ymin, xmax, ymax = (float(bndbox.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax"))
            objects.append(VOCObject(name.strip(), (xmin - 1.0, ymin - 1.0, xmax, ymax), difficult))
        return objects
    except (ET.ParseError, ValueError, TypeError) as error:
        raise CorruptFileError(f"cannot parse annotation {path}: {error}") from error


def labels_for(
    parsed: Sequence[tuple[Path, tuple[int, int], list[VOCObject]]], class_names: Sequence[str]
) -> dict[str, int]:
    """Map class names to label indices, failing with every unknown name found (and one file using it)."""
    label_of = {name: index for index, name in enumerate(class_names)}
    unknown: dict[str, Path] = {}
    for image_path, _, objects in parsed:
        for obj in objects:
            if obj.name not in label_of:
                unknown.setdefault(obj.name, image_path)
    if unknown:
        examples = ", ".join(f"{name!r} (e.g. for {path.name})" for name, path in sorted(unknown.items()))
        raise DatasetError(f"class name(s) not in the label map {list(class_names)}: {examples}")
    return label_of


def _tensors(
    objects: Sequence[VOCObject], label_of: dict[str, int], difficult: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes ``(N, 4)`` and labels ``(N,)`` of the objects whose difficult flag is ``difficult``."""
    chosen = [obj for obj in objects if obj.difficult == difficult]
    boxes = torch.tensor([obj.box for obj in chosen], dtype=torch.float32).reshape(-1, 4)
    return boxes, torch.tensor([label_of[obj.name] for obj in chosen], dtype=torch.long)


class VOCDataset(DetectionDataset):
    """A PASCAL-VOC-layout dataset as letterboxed ``(image, target)`` pairs (see docs/design.md).

    ``class_names`` defaults to ``root/labels.txt`` if present (DigitScenes writes one), else the 20 VOC
    classes. With ``strict=False`` missing or unreadable image/annotation files are skipped and counted in
    one warning instead of raising.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        size: int = 416,
        augment: bool = False,
        horizontal_flip: bool = True,
        class_names: Sequence[str] | None = None,
        strict: bool = True,
    ) -> None:
        root = Path(root)
        names = tuple(class_names) if class_names is not None else read_class_names(root)
        skipped = SkippedFiles()

        def parse(image_id: str) -> tuple[Path, tuple[int, int], list[VOCObject]]:
            objects = parse_voc_xml(root / "Annotations" / f"{image_id}.xml")
            image_path = root / "JPEGImages" / f"{image_id}.jpg"
            return image_path, probe_image(image_path), objects

        parsed = parse_items(read_split_ids(root, split), parse, strict=strict, skipped=skipped)
        dataset_name = f"VOCDataset({root}, {split!r})"
        skipped.warn(dataset_name)
        label_of = labels_for(parsed, names)
        records = [
            ImageRecord(
                image_path,
                width,
                height,
                *_tensors(objects, label_of, False),
                *_tensors(objects, label_of, True),
            )
            for image_path, (width, height), objects in parsed
        ]
        super().__init__(
            records,
            names,
            size=size,
            augment=augment,
            horizontal_flip=horizontal_flip,
            dataset_name=dataset_name,
        )
