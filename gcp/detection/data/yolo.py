"""YOLO-txt reader: ``images/{split}/*`` with ``labels/{split}/<stem>.txt`` lines ``class cx cy w h``.

Coordinates are normalised to ``[0, 1]`` by the image size. As in the YOLO convention, an image without a
label file is a background image with no objects; an empty label file means the same. Label files are found
as Ultralytics finds them (the image folder's path with its last ``images`` replaced by ``labels``), and an
Ultralytics ``data.yaml`` is read by Ultralytics' own checker (:func:`read_data_yaml`), so gcp's evaluator
reads the images Ultralytics' trainer trains on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from gcp.detection.data.common import (
    CorruptFileError,
    DatasetError,
    DetectionDataset,
    ImageRecord,
    SkippedFiles,
    parse_items,
    probe_image,
)
from gcp.io import one_line  # (Ultralytics' messages run over several lines)

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


def label_folder(image_folder: Path) -> Path:
    """Where Ultralytics looks for an image folder's label files: its path with the last ``images`` part
    replaced by ``labels`` (``root/images/train`` → ``root/labels/train``, ``train/images`` → ``train/labels``);
    beside the images when no part is called ``images``."""
    parts = image_folder.parts
    if "images" not in parts:
        return image_folder
    last = len(parts) - 1 - parts[::-1].index("images")
    return Path(*parts[:last], "labels", *parts[last + 1 :])


@dataclass(frozen=True)
class DataYaml:
    """What an Ultralytics ``data.yaml`` describes: class names and, per split, its image folders."""

    path: Path
    class_names: list[str]
    splits: dict[str, list[Path]]

    def folders(self, split: str) -> list[Path]:
        """The image folders of ``split``; a DatasetError naming the file when it has none."""
        if not self.splits.get(split):
            raise DatasetError(f"{self.path} has no {split!r} split (it has {', '.join(self.splits)})")
        return self.splits[split]


def read_data_yaml(path: str | Path) -> DataYaml:
    """Read an Ultralytics ``data.yaml`` with Ultralytics' own checker (``check_det_dataset``, downloads off), so
    paths resolve exactly as for its trainer; each problem is one DatasetError line. gcp reads folders of
    images, so a split given as a list file (``train.txt``) is refused."""
    path = Path(path)
    try:
        from ultralytics.data.utils import check_det_dataset
    except ImportError as error:
        raise DatasetError(
            f"{path}: a data.yaml is read with Ultralytics' own checker; install it with "
            f"pip install 'gcp[ultralytics]' ({error})"
        ) from None
    try:
        described = check_det_dataset(str(path), autodownload=False)
    except (FileNotFoundError, SyntaxError, TypeError, ValueError, yaml.YAMLError) as error:
        raise DatasetError(f"{path}: {one_line(error)}") from None
    splits = {}
    for split in ("train", "val", "test"):
        entries = described.get(split) or []
        folders = [Path(entry) for entry in ([entries] if isinstance(entries, str) else entries)]
        not_folders = [str(folder) for folder in folders if not folder.is_dir()]
        if not_folders:
            raise DatasetError(
                f"{path}: {split} names {not_folders[0]}, which is not a folder of images (missing, or a list "
                "file: gcp reads image folders)"
            )
        if folders:
            splits[split] = folders
    names = described["names"]
    return DataYaml(path, [names[index] for index in sorted(names)], splits)


class YOLODataset(DetectionDataset):
    """A YOLO-txt dataset as letterboxed ``(image, target)`` pairs (see docs/design.md).

    The images are ``root/images/<split>``, or ``root`` itself when ``split`` is None (a folder named by a
    ``data.yaml``, see :func:`read_data_yaml`); labels are in :func:`label_folder`. The format has no class
    list of its own, so ``class_names`` is required. With ``strict=False`` unreadable images or label files
    are skipped and counted in one warning instead of raising.
    """

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        *,
        size: int = 416,
        augment: bool = False,
        horizontal_flip: bool = True,
        class_names: Sequence[str],
        strict: bool = True,
    ) -> None:
        root = Path(root)
        image_dir = root if split is None else root / "images" / split
        label_dir = label_folder(image_dir)
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
        dataset_name = f"YOLODataset({root})" if split is None else f"YOLODataset({root}, {split!r})"
        skipped.warn(dataset_name)
        super().__init__(
            records,
            names,
            size=size,
            augment=augment,
            horizontal_flip=horizontal_flip,
            dataset_name=dataset_name,
        )
