"""DigitScenes: a small, offline, real-pixel detection dataset bundled with the toolkit.

The paper's experiments (§5) need PASCAL VOC, which cannot be downloaded here; DigitScenes stands in for it
when checking the whole pipeline (train, prune, distil, evaluate) end to end. Every pixel comes from real data
shipped inside installed wheels: handwritten digits from scikit-learn's ``load_digits()`` (8x8 glyphs,
upscaled smoothly and used as an alpha mask with a random ink colour) pasted at 8-96 px onto random crops of
the photographs bundled with scikit-learn and scikit-image. It has 10 classes ("0".."9"), 1-8 objects per
image and is written in the VOC layout, so :class:`gcp.detection.data.VOCDataset` reads it.

Validation and test digits are different handwriting samples from training digits: the 1797 glyphs are split
by index into disjoint blocks (70/15/15 %), and each object records its glyph index in the XML (``<glyph>``).
"""

from __future__ import annotations

import io
import json
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from gcp.io import atomic_write_json, atomic_write_text

DIGITSCENES_VERSION = 1
PARAMS_FILE = "digitscenes.json"
CLASS_NAMES = tuple(str(digit) for digit in range(10))
SPLITS = ("train", "val", "test")
#: Fractions of the 1797 glyphs (taken in index order) reserved for the train, val and test splits.
GLYPH_SPLIT_FRACTIONS = (0.70, 0.15, 0.15)
MIN_OBJECT_SIZE, MAX_OBJECT_SIZE = 8, 96
MAX_OBJECTS = 8
#: Placed digits may overlap, but by less than this fraction of the smaller one, so every digit stays visible.
MAX_OVERLAP = 0.3
#: Upscaled glyph intensities (0-1) below INK_LOW are not drawn, above INK_HIGH are solid ink.
INK_LOW, INK_HIGH = 0.4, 0.6
PLACEMENT_TRIES = 50
#: Backgrounds are square crops of 40-100 % of a photo's shorter side.
MIN_CROP_FRACTION = 0.4
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)

#: scikit-image photographs stored inside its wheel (they load without the optional ``pooch`` download).
#: ``page``/``text`` are left out because they show printed characters, ``horse``/``logo`` as non-photos.
SKIMAGE_PHOTOS = (
    "astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "retina", "rocket", "stereo_motorcycle",
)  # fmt: skip


def glyph_pools(n_glyphs: int) -> dict[str, np.ndarray]:
    """Split glyph indices ``0..n_glyphs-1`` into disjoint contiguous blocks for train, val and test.

    Contiguous blocks rather than a shuffle: the samples are disjoint either way, and if the data set keeps
    each writer's digits together, blocks also keep most writers within one split.
    """
    n_train, n_val = round(GLYPH_SPLIT_FRACTIONS[0] * n_glyphs), round(GLYPH_SPLIT_FRACTIONS[1] * n_glyphs)
    edges = (0, n_train, n_train + n_val, n_glyphs)
    return {split: np.arange(edges[i], edges[i + 1]) for i, split in enumerate(SPLITS)}


def load_glyphs() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 handwritten digits of ``sklearn.datasets.load_digits()`` as ink in ``[0, 1]`` and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def load_photos(size: int) -> list[Image.Image]:
    """The real photographs bundled with scikit-learn and scikit-image, as RGB PIL images.

    Photos much larger than needed are shrunk by an integer factor (box filter, cheap) as long as the
    smallest crop :func:`random_background` takes still has at least ``size`` pixels a side, so no detail the
    scenes could show is lost while every later resize gets cheaper.
    """
    import skimage.data
    from sklearn.datasets import load_sample_images

    arrays = list(load_sample_images().images)
    for name in SKIMAGE_PHOTOS:
        image = getattr(skimage.data, name)()
        arrays.append(image[0] if isinstance(image, tuple) else image)  # stereo_motorcycle is a tuple
    photos = []
    for array in arrays:
        photo = Image.fromarray(np.ascontiguousarray(array)).convert("RGB")
        factor = int(MIN_CROP_FRACTION * min(photo.size) // size)
        photos.append(photo.reduce(factor) if factor >= 2 else photo)
    return photos


def random_background(photos: Sequence[Image.Image], size: int, rng: np.random.Generator) -> Image.Image:
    """A random square crop (40-100 % of the photo's shorter side) of a random photo, maybe mirrored, resized
    (antialiased) to ``size x size``."""
    photo = photos[rng.integers(len(photos))]
    side = int(rng.uniform(MIN_CROP_FRACTION, 1.0) * min(photo.size))
    left, top = int(rng.integers(photo.width - side + 1)), int(rng.integers(photo.height - side + 1))
    crop = photo.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
    return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def render_glyph(glyph: np.ndarray, long_side: float, aspect: float) -> tuple[np.ndarray, list[int]]:
    """Upscale an 8x8 glyph smoothly (bicubic) into an alpha mask whose ink spans about ``long_side`` px.

    The glyph is cropped to its ink and given a one-pixel empty border, so the upscale fades the strokes out
    instead of cutting them. The 8x8 glyphs are 4x4-block averages of 32x32 pen strokes; a ramp from
    :data:`INK_LOW` to :data:`INK_HIGH` turns that blur back into strokes with soft edges. The returned box
    ``[x1, y1, x2, y2]`` (patch pixels) is tight around every pixel with non-zero alpha.
    """
    rows, cols = np.nonzero(glyph > 0)
    ink = glyph[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    scale = long_side / max(ink.shape[0], ink.shape[1] * aspect)
    bordered = Image.fromarray(np.pad(ink, 1))  # float32 -> mode "F"
    patch_size = (max(1, round(bordered.width * scale * aspect)), max(1, round(bordered.height * scale)))
    intensity = np.asarray(bordered.resize(patch_size, Image.Resampling.BICUBIC))
    alpha = np.clip((intensity - INK_LOW) / (INK_HIGH - INK_LOW), 0.0, 1.0).astype(np.float32)
    if not alpha.any():  # a faint glyph drawn very small: keep its strongest pixel
        alpha[np.unravel_index(np.argmax(intensity), alpha.shape)] = 1.0
    rows, cols = np.nonzero(alpha)
    return alpha, [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]


def contrasting_ink(background_luma: float, rng: np.random.Generator) -> tuple[int, int, int]:
    """A random RGB ink colour whose luma (0-1) differs from the background's by at least 0.4 (black or white
    if ten random draws all fail), so every digit is visible to a detector."""
    for _ in range(10):
        colour = rng.random(3)
        if abs(float(colour @ LUMA_WEIGHTS) - background_luma) >= 0.4:
            return tuple(int(channel) for channel in np.round(colour * 255))
    return (0, 0, 0) if background_luma > 0.5 else (255, 255, 255)


def overlaps_too_much(box: list[int], placed_boxes: list[list[int]]) -> bool:
    """Whether ``box`` covers :data:`MAX_OVERLAP` or more of a placed box, or a placed box that much of it.

    Intersection over the *smaller* area rather than IoU: a small digit inside a large one has a low IoU yet
    is hidden. The condition is stricter than IoU < MAX_OVERLAP, since IoU never exceeds this ratio.
    """
    if not placed_boxes:
        return False
    placed = np.asarray(placed_boxes, dtype=np.float64)
    widths = np.minimum(placed[:, 2], box[2]) - np.maximum(placed[:, 0], box[0])
    heights = np.minimum(placed[:, 3], box[3]) - np.maximum(placed[:, 1], box[1])
    intersections = np.clip(widths, 0, None) * np.clip(heights, 0, None)
    areas = (placed[:, 2] - placed[:, 0]) * (placed[:, 3] - placed[:, 1])
    smaller = np.minimum(areas, (box[2] - box[0]) * (box[3] - box[1]))
    return bool((intersections / smaller).max() >= MAX_OVERLAP)


def compose_scene(
    glyphs: np.ndarray,
    pool: np.ndarray,
    photos: Sequence[Image.Image],
    size: int,
    rng: np.random.Generator,
) -> tuple[Image.Image, list[tuple[int, list[int]]]]:
    """Paint 1-8 digits (glyph indices drawn from ``pool``) onto a random background.

    Returns the RGB image and per digit ``(glyph_index, [x1, y1, x2, y2])``. A digit that finds no spot
    overlapping the others by less than :data:`MAX_OVERLAP` is left out; the first digit always fits.
    """
    image = random_background(photos, size, rng)
    max_object = min(MAX_OBJECT_SIZE, size // 2)
    placed: list[tuple[int, list[int]]] = []
    for _ in range(rng.integers(1, MAX_OBJECTS + 1)):
        glyph_index = int(pool[rng.integers(len(pool))])
        long_side = math.exp(rng.uniform(math.log(MIN_OBJECT_SIZE), math.log(max_object)))
        alpha, ink_box = render_glyph(glyphs[glyph_index], long_side, aspect=rng.uniform(0.8, 1.25))
        patch_height, patch_width = alpha.shape
        for _ in range(PLACEMENT_TRIES):
            top, left = int(rng.integers(size - patch_height + 1)), int(rng.integers(size - patch_width + 1))
            box = [ink_box[0] + left, ink_box[1] + top, ink_box[2] + left, ink_box[3] + top]
            if not overlaps_too_much(box, [placed_box for _, placed_box in placed]):
                break
        else:
            continue
        under_ink = np.asarray(image.crop(tuple(box)), dtype=np.float32).mean(axis=(0, 1)) / 255.0
        ink = contrasting_ink(float(under_ink @ LUMA_WEIGHTS), rng)
        opacity = np.round(alpha * rng.uniform(0.85, 1.0) * 255.0).astype(np.uint8)
        image.paste(ink, (left, top), Image.fromarray(opacity))
        placed.append((glyph_index, box))
    return image, placed


def encode_jpeg(image: Image.Image) -> bytes:
    """JPEG bytes (quality 90) of an RGB image."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def voc_annotation(
    image_name: str, size: int, objects: Sequence[tuple[int, list[int]]], labels: np.ndarray
) -> str:
    """The VOC XML for one scene; boxes go from 0-based pixel edges to VOC's 1-based inclusive indices."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "DigitScenes"
    ET.SubElement(root, "filename").text = image_name
    size_element = ET.SubElement(root, "size")
    for tag, value in (("width", size), ("height", size), ("depth", 3)):
        ET.SubElement(size_element, tag).text = str(value)
    for glyph_index, (x1, y1, x2, y2) in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = CLASS_NAMES[labels[glyph_index]]
        ET.SubElement(obj, "difficult").text = "0"
        ET.SubElement(obj, "glyph").text = str(glyph_index)
        bndbox = ET.SubElement(obj, "bndbox")
        for tag, value in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(bndbox, tag).text = str(value)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def is_complete(root: Path, params: dict) -> bool:
    """True when ``root`` holds a finished DigitScenes made with ``params`` (marker last, files present)."""
    marker = root / PARAMS_FILE
    if not marker.is_file():
        return False
    try:
        if json.loads(marker.read_text(encoding="utf-8")) != params:
            return False
    except json.JSONDecodeError:
        return False
    for split in SPLITS:
        split_file = root / "ImageSets" / "Main" / f"{split}.txt"
        if not split_file.is_file():
            return False
        ids = split_file.read_text(encoding="utf-8").split()
        if len(ids) != params[f"n_{split}"]:
            return False
        for image_id in ids:
            if not (root / "JPEGImages" / f"{image_id}.jpg").is_file():
                return False
            if not (root / "Annotations" / f"{image_id}.xml").is_file():
                return False
    return True


def make_digit_scenes(
    root: str | Path,
    *,
    n_train: int = 2000,
    n_val: int = 300,
    n_test: int = 300,
    size: int = 256,
    seed: int = 0,
) -> Path:
    """Write DigitScenes to ``root`` in VOC layout and return ``root``; reuse it if already complete.

    Each image is drawn from its own random stream seeded by ``(seed, split, index)``, so the files are the
    same on every run, whatever order the worker threads finish in. The parameters are written last, to
    ``digitscenes.json``: a crash midway leaves no marker, and the next call regenerates instead of trusting
    a half-written dataset.
    """
    counts = {"train": n_train, "val": n_val, "test": n_test}
    if any(count < 1 for count in counts.values()):
        raise ValueError(f"every split needs at least one image, got {counts}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if size < 64:
        raise ValueError(f"DigitScenes images must be at least 64 px to hold digits, got size={size}")
    root = Path(root)
    params = {
        "version": DIGITSCENES_VERSION,
        **{f"n_{s}": n for s, n in counts.items()},
        "size": size,
        "seed": seed,
    }
    if is_complete(root, params):
        return root
    (root / PARAMS_FILE).unlink(missing_ok=True)
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    glyphs, labels = load_glyphs()
    pools = glyph_pools(len(glyphs))
    photos = load_photos(size)

    def write_scene(split_index: int, index: int) -> None:
        split = SPLITS[split_index]
        image_id = f"{split}_{index:05d}"
        rng = np.random.default_rng([seed, split_index, index])
        image, objects = compose_scene(glyphs, pools[split], photos, size, rng)
        (root / "JPEGImages" / f"{image_id}.jpg").write_bytes(encode_jpeg(image))
        xml = voc_annotation(f"{image_id}.jpg", size, objects, labels)
        (root / "Annotations" / f"{image_id}.xml").write_text(xml, encoding="utf-8")

    # Threads, not processes: PIL resizes and encodes without the GIL, and nothing needs re-importing.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as executor:
        jobs = [(s, index) for s, split in enumerate(SPLITS) for index in range(counts[split])]
        list(executor.map(write_scene, *zip(*jobs)))
    for split in SPLITS:
        ids = "".join(f"{split}_{index:05d}\n" for index in range(counts[split]))
        atomic_write_text(root / "ImageSets" / "Main" / f"{split}.txt", ids)
    atomic_write_text(root / "labels.txt", "\n".join(CLASS_NAMES) + "\n")
    atomic_write_json(root / PARAMS_FILE, params)
    return root
