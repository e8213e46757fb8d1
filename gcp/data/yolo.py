"""YOLO-txt reader: ``images/{split}/*`` with ``labels/{split}/<stem>.txt`` lines ``class cx cy w h``.

Coordinates are normalised to ``[0, 1]`` by the image size. As in the YOLO convention, an image without a
label file is a background image with no objects; an empty label file means the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from gcp.data.common import (
    CorruptFileError,
    DatasetError,
    DetectionDataset,
    ImageRecord,
    SkippedFiles,
    parse_items,
    probe_image,
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def parse_yolo_labels(path: Path) -> torch.Tensor:
    """Rows ``[class, cx, cy, w, h]`` (float) of one label file; a missing file means no objects."""
    if not path.exists():
        return torch.zeros((0, 5))
    try:
        rows = [[float(value) for value in line.split()] for line in path.read_text("utf-8").splitlines()]
    except (ValueError, UnicodeDecodeError) as error:
        raise CorruptFileError(f"cannot parse label file {path}: {error}") from error
    rows = [row for row in rows if row]
    if any(len(row) != 5 for row in rows):
        raise CorruptFileError(f"label file {path} has a line without exactly 5 values (class cx cy w h)")
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 5)


def check_class_indices(rows: torch.Tensor, num_classes: int, path: Path) -> torch.Tensor:
    """Return the class column as labels, failing with the indices that fall outside the label map."""
    classes = rows[:, 0]
    bad = (classes != classes.round()) | (classes < 0) | (classes >= num_classes)
    if bad.any():
        raise DatasetError(
            f"label file {path} uses class index(es) {sorted(set(classes[bad].tolist()))} outside the "
            f"label map of {num_classes} class names"
        )
    return classes.long()


def normalised_cxcywh_to_xyxy(rows: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Convert normalised ``cx, cy, w, h`` columns to ``xyxy`` pixel boxes."""
    cx, cy, w, h = (rows[:, 1] * width, rows[:, 2] * height, rows[:, 3] * width, rows[:, 4] * height)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1)


class YOLODataset(DetectionDataset):
    """A YOLO-txt dataset as letterboxed ``(image, target)`` pairs (see docs/design.md).

    The format has no class list of its own, so ``class_names`` is required. With ``strict=False`` unreadable
    images or label files are skipped and counted in one warning instead of raising.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        size: int = 416,
        augment: bool = False,
        horizontal_flip: bool = True,
        class_names: Sequence[str],
        strict: bool = True,
    ) -> None:
        root = Path(root)
        image_dir, label_dir = root / "images" / split, root / "labels" / split
        if not image_dir.is_dir():
            raise DatasetError(f"YOLO image folder not found: {image_dir}")
        image_paths = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        names = tuple(class_names)
        skipped = SkippedFiles()

        def parse(image_path: Path) -> ImageRecord:
            label_path = label_dir / f"{image_path.stem}.txt"
            rows = parse_yolo_labels(label_path)
            width, height = probe_image(image_path)
            labels = check_class_indices(rows, len(names), label_path)
            return ImageRecord(
                image_path, width, height, normalised_cxcywh_to_xyxy(rows, width, height), labels
            )

        records = parse_items(image_paths, parse, strict=strict, skipped=skipped)
        dataset_name = f"YOLODataset({root}, {split!r})"
        skipped.warn(dataset_name)
        super().__init__(
            records,
            names,
            size=size,
            augment=augment,
            horizontal_flip=horizontal_flip,
            dataset_name=dataset_name,
        )
