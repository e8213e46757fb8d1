"""COCO reader: one folder of images and an ``instances_*.json`` annotation file.

COCO's category ids are sparse (1..90 with holes); detection heads need contiguous labels, so categories are
numbered ``0..C-1`` in increasing-id order. Crowd regions (``iscrowd=1``) are not single objects and are left
out.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from gcp.detection.data.common import (
    DatasetError,
    DetectionDataset,
    ImageRecord,
    SkippedFiles,
    parse_items,
    probe_image,
)


def load_coco_json(path: Path) -> dict[str, Any]:
    """Read and shape-check a COCO annotation file; errors name the file and the missing part."""
    if not path.is_file():
        raise DatasetError(f"COCO annotation file not found: {path}")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"cannot parse COCO annotation file {path}: {error}") from error
    if not isinstance(content, dict):
        raise DatasetError(f"COCO annotation file {path} does not hold a JSON object")
    missing = [key for key in ("images", "annotations", "categories") if key not in content]
    if missing:
        raise DatasetError(f"COCO annotation file {path} lacks the key(s) {missing}")
    return content


def contiguous_labels(categories: list[dict[str, Any]]) -> tuple[dict[int, int], tuple[str, ...]]:
    """Map category ids to labels ``0..C-1`` in sorted-id order; also return the class names in that order."""
    ordered = sorted(categories, key=lambda category: category["id"])
    return {category["id"]: label for label, category in enumerate(ordered)}, tuple(
        c["name"] for c in ordered
    )


def group_boxes(
    annotations: list[dict[str, Any]], label_of: dict[int, int], image_ids: set[int], source: Path
) -> dict[int, list[tuple[list[float], int]]]:
    """Non-crowd ``(xyxy box, label)`` pairs per image id; unknown categories or images are an error."""
    per_image: dict[int, list[tuple[list[float], int]]] = defaultdict(list)
    unknown_categories, unknown_images = set(), set()
    for annotation in annotations:
        if annotation.get("iscrowd", 0):
            continue
        category, image_id = annotation["category_id"], annotation["image_id"]
        if category not in label_of:
            unknown_categories.add(category)
            continue
        if image_id not in image_ids:
            unknown_images.add(image_id)
            continue
        x, y, w, h = (float(value) for value in annotation["bbox"])
        per_image[image_id].append(([x, y, x + w, y + h], label_of[category]))
    if unknown_categories:
        raise DatasetError(
            f"{source}: annotations use category id(s) {sorted(unknown_categories)} not listed in "
            f"'categories' (known: {sorted(label_of)})"
        )
    if unknown_images:
        raise DatasetError(
            f"{source}: annotations refer to image id(s) {sorted(unknown_images)[:10]} not listed in 'images'"
        )
    return per_image


class COCODataset(DetectionDataset):
    """A COCO-format dataset as letterboxed ``(image, target)`` pairs (see docs/design.md).

    Images without (non-crowd) objects are kept as background. With ``strict=False`` missing or unreadable
    images are skipped and counted in one warning instead of raising.
    """

    def __init__(
        self,
        image_dir: str | Path,
        annotation_json: str | Path,
        *,
        size: int = 416,
        augment: bool = False,
        horizontal_flip: bool = True,
        strict: bool = True,
    ) -> None:
        image_dir, annotation_json = Path(image_dir), Path(annotation_json)
        content = load_coco_json(annotation_json)
        try:
            label_of, class_names = contiguous_labels(content["categories"])
            images = {image["id"]: image for image in content["images"]}
            per_image = group_boxes(content["annotations"], label_of, set(images), annotation_json)
        except DatasetError:
            raise
        except (KeyError, TypeError, ValueError) as error:
            raise DatasetError(f"malformed COCO annotation file {annotation_json}: {error!r}") from error
        skipped = SkippedFiles()

        def parse(image: dict[str, Any]) -> ImageRecord:
            image_path = image_dir / image["file_name"]
            width, height = probe_image(image_path)
            pairs = per_image.get(image["id"], [])
            boxes = torch.tensor([box for box, _ in pairs], dtype=torch.float32).reshape(-1, 4)
            labels = torch.tensor([label for _, label in pairs], dtype=torch.long)
            return ImageRecord(image_path, width, height, boxes, labels)

        records = parse_items(images.values(), parse, strict=strict, skipped=skipped)
        dataset_name = f"COCODataset({annotation_json.name})"
        skipped.warn(dataset_name)
        super().__init__(
            records,
            class_names,
            size=size,
            augment=augment,
            horizontal_flip=horizontal_flip,
            dataset_name=dataset_name,
        )
