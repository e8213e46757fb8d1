"""A YOLO-format dataset small enough for one Ultralytics epoch in seconds, and the offline setting every
Ultralytics test needs (shared by tests/test_ultralytics_train.py and tests/test_cli_ultralytics.py).

Nothing may download: models are built from Ultralytics' packaged YAMLs, plots are off, AMP's check is skipped
on CPU, and the font check of Ultralytics' dataset reader (which fetches Arial.ttf) is disabled.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

IMGSZ = 64
CLASS_NAMES = ("red", "blue")


@contextlib.contextmanager
def offline_ultralytics() -> Iterator[None]:
    """Ultralytics' dataset check fetches Arial.ttf (for plots) when it is not installed; here it does not."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("ultralytics.data.utils.check_font", lambda *_args, **_kwargs: None)
        yield


def write_boxes_dataset(root: Path, class_names: Sequence[str] = CLASS_NAMES) -> Path:
    """8 train and 4 val images under ``root``, each with a red (class 0) and a blue (class 1) box on dark
    noise; returns its ``data.yaml`` (listing ``class_names``, which may name more classes than are drawn)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 4)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for index in range(count):
            image = (rng.random((IMGSZ, IMGSZ, 3)) * 60).astype(np.uint8)
            lines = []
            for cls, colour in enumerate(((220, 40, 40), (40, 40, 220))):
                w, h = rng.integers(12, 28, 2)
                x, y = rng.integers(0, IMGSZ - w), rng.integers(0, IMGSZ - h)
                image[y : y + h, x : x + w] = colour
                lines.append(f"{cls} {(x + w / 2) / IMGSZ} {(y + h / 2) / IMGSZ} {w / IMGSZ} {h / IMGSZ}")
            Image.fromarray(image).save(root / "images" / split / f"{index}.png")
            (root / "labels" / split / f"{index}.txt").write_text("\n".join(lines) + "\n")
    names = "".join(f"  {index}: {name}\n" for index, name in enumerate(class_names))
    path = root / "data.yaml"
    path.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n{names}")
    return path
