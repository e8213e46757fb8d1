"""Dataset readers (VOC, COCO, YOLO), letterbox/augmentation box consistency, bad-input handling (issue §7)
and the DigitScenes generator, all on tiny fixtures written to tmp_path."""

from __future__ import annotations

import itertools
import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from gcp.app.config import build_config
from gcp.app.pipeline import Context, RunDir
from gcp.detection.data import (
    VOC_CLASSES,
    COCODataset,
    CorruptFileError,
    DatasetError,
    VOCDataset,
    YOLODataset,
    collate,
    make_digit_scenes,
)
from gcp.detection.data.digits import CLASS_NAMES, PARAMS_FILE, glyph_pools, load_glyphs, render_glyph
from gcp.detection.loss import targets_to_tensor

WHITE = (255, 255, 255)


def save_image(path, width, height, boxes=(), colour=WHITE):
    """A black image with filled rectangles (xyxy, pixel edges) in ``colour``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (width, height), (0, 0, 0))
    for box in boxes:
        image.paste(colour, tuple(box))
    image.save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))


def write_voc(root, images, split="train", with_images=True):
    """VOC layout; ``images``: id -> (width, height, [(name, (x1, y1, x2, y2), difficult)]), pixel edges."""
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for image_id, (width, height, objects) in images.items():
        if with_images:
            save_image(root / "JPEGImages" / f"{image_id}.jpg", width, height, [box for _, box, _ in objects])
        xml_objects = "".join(
            f"<object><name>{name}</name><difficult>{int(difficult)}</difficult><bndbox><xmin>{x1 + 1}</xmin>"
            f"<ymin>{y1 + 1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
            for name, (x1, y1, x2, y2), difficult in objects
        )
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><size><width>{width}</width><height>{height}</height></size>{xml_objects}</annotation>"
        )
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(images) + "\n")


def white_extent(image):
    """[x1, y1, x2, y2] pixel edges of the pixels brighter than 75 % of the image's brightest, or None."""
    grey = image.min(dim=0).values
    rows, cols = torch.nonzero(grey > 0.75 * grey.max(), as_tuple=True)
    if rows.numel() == 0:
        return None
    return torch.tensor([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=torch.float32)


TWO_VOC_IMAGES = {
    "a": (100, 80, [("dog", (10, 20, 50, 60), False), ("person", (60, 5, 90, 30), False)]),
    "b": (60, 120, [("person", (5, 10, 40, 100), False), ("cat", (0, 0, 10, 10), True)]),
}


def test_voc_reader_yields_letterboxed_design_format(tmp_path):
    write_voc(tmp_path, TWO_VOC_IMAGES)
    dataset = VOCDataset(tmp_path, "train", size=64)
    assert dataset.class_names == VOC_CLASSES and dataset.num_classes == 20 and len(dataset) == 2
    image, target = dataset[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert target["labels"].dtype == torch.long and target["labels"].tolist() == [11, 14]  # dog, person
    assert target["boxes"].dtype == torch.float32 and target["image_id"] == 0
    # 100x80 -> 64x51 (x scale 0.64, y scale 51/80), padded 6 px on top and 7 below
    sx, sy, top = 0.64, 51 / 80, 6
    expected = torch.tensor(
        [[10 * sx, 20 * sy + top, 50 * sx, 60 * sy + top], [60 * sx, 5 * sy + top, 90 * sx, 30 * sy + top]]
    )
    torch.testing.assert_close(target["boxes"], expected)
    assert image[:, :top].sub(114 / 255).abs().max() < 1e-6  # letterbox grey above the picture
    _, target = dataset[1]
    assert target["labels"].tolist() == [14]  # the difficult cat is left out


def test_voc_keeps_difficult_objects_for_scoring_but_not_as_training_targets(tmp_path):
    # issue 15 item 2: the reader used to drop difficult objects, so a detection on one scored as a false
    # positive. They now travel in difficult_boxes/difficult_labels (what gcp.detection.evaluate ignores matches to),
    # never in boxes/labels (what the loss trains on).
    write_voc(tmp_path, TWO_VOC_IMAGES)
    _, target = VOCDataset(tmp_path, "train", size=64)[1]
    assert target["labels"].tolist() == [14] and target["difficult_labels"].tolist() == [7]  # person; cat
    # 60x120 -> 32x64 (scale 8/15), padded 16 px left: the cat's (0, 0, 10, 10) follows the letterbox
    torch.testing.assert_close(
        target["difficult_boxes"], torch.tensor([[16.0, 0.0, 16 + 10 * 8 / 15, 80 / 15]])
    )
    assert targets_to_tensor([target], 20, torch.device("cpu"))[:, 1].tolist() == [14.0]
    _, target = VOCDataset(tmp_path, "train", size=64)[0]
    assert target["difficult_boxes"].shape == (0, 4) and target["difficult_labels"].dtype == torch.long


def test_difficult_objects_leave_augmented_training_items_unchanged(tmp_path):
    with_cat, without_cat = tmp_path / "with", tmp_path / "without"
    write_voc(with_cat, TWO_VOC_IMAGES)
    write_voc(without_cat, {**TWO_VOC_IMAGES, "b": (60, 120, TWO_VOC_IMAGES["b"][2][:1])})
    # same pixels (the cat stays painted), so only the annotation differs
    (without_cat / "JPEGImages" / "b.jpg").write_bytes((with_cat / "JPEGImages" / "b.jpg").read_bytes())
    datasets = [VOCDataset(root, "train", size=64, augment=True) for root in (with_cat, without_cat)]
    for seed in range(6):
        items = []
        for dataset in datasets:
            torch.manual_seed(seed)
            items.append(dataset[1])
        (image_a, target_a), (image_b, target_b) = items
        assert torch.equal(image_a, image_b)
        assert torch.equal(target_a["boxes"], target_b["boxes"])
        assert torch.equal(target_a["labels"], target_b["labels"])
        assert target_b["difficult_labels"].numel() == 0


def test_voc_class_names_come_from_labels_txt(tmp_path):
    write_voc(tmp_path, {"a": (64, 64, [("kiwi", (1, 1, 30, 30), False), ("fig", (32, 32, 60, 60), False)])})
    (tmp_path / "labels.txt").write_text("fig\nkiwi\n")
    dataset = VOCDataset(tmp_path, "train", size=64)
    assert dataset.class_names == ("fig", "kiwi")
    assert dataset[0][1]["labels"].tolist() == [1, 0]


def test_coco_reader_maps_sparse_ids_in_sorted_order_and_skips_crowds(tmp_path):
    for name in ("x.jpg", "y.jpg"):
        save_image(tmp_path / "images" / name, 64, 64, [(8, 8, 24, 40)])
    content = {
        "images": [
            {"id": 5, "file_name": "x.jpg", "width": 64, "height": 64},
            {"id": 9, "file_name": "y.jpg"},
        ],
        "categories": [{"id": 7, "name": "cat"}, {"id": 3, "name": "bird"}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 7, "bbox": [8, 8, 16, 32], "iscrowd": 0},
            {"id": 2, "image_id": 5, "category_id": 3, "bbox": [30, 30, 10, 10], "iscrowd": 0},
            {"id": 3, "image_id": 9, "category_id": 3, "bbox": [0, 0, 64, 64], "iscrowd": 1},
        ],
    }
    (tmp_path / "instances.json").write_text(json.dumps(content))
    dataset = COCODataset(tmp_path / "images", tmp_path / "instances.json", size=64)
    assert dataset.class_names == ("bird", "cat") and dataset.num_classes == 2
    _, target = dataset[0]
    assert target["labels"].tolist() == [1, 0]
    torch.testing.assert_close(target["boxes"], torch.tensor([[8.0, 8, 24, 40], [30, 30, 40, 40]]))
    assert dataset[1][1]["boxes"].shape == (0, 4)  # only a crowd region: kept as a background image


def test_yolo_reader_converts_normalised_boxes_and_missing_label_file_means_background(tmp_path):
    save_image(tmp_path / "images" / "train" / "a.png", 128, 64, [(32, 16, 96, 48)])
    save_image(tmp_path / "images" / "train" / "b.png", 64, 64)
    (tmp_path / "labels" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train" / "a.txt").write_text("1 0.5 0.5 0.5 0.5\n")
    dataset = YOLODataset(tmp_path, "train", size=64, class_names=["plane", "boat"])
    assert dataset.num_classes == 2 and len(dataset) == 2
    _, target = dataset[0]
    assert target["labels"].tolist() == [1]
    torch.testing.assert_close(
        target["boxes"], torch.tensor([[16.0, 24, 48, 40]])
    )  # halved, 16 px pad on top
    assert dataset[1][1]["boxes"].shape == (0, 4)


def test_letterbox_keeps_the_box_on_the_object(tmp_path):
    save_image(tmp_path / "images" / "val" / "a.png", 150, 90, [(37, 11, 101, 70)])
    (tmp_path / "labels" / "val").mkdir(parents=True)
    (tmp_path / "labels" / "val" / "a.txt").write_text(f"0 {69 / 150} {40.5 / 90} {64 / 150} {59 / 90}\n")
    image, target = YOLODataset(tmp_path, "val", size=96, class_names=["box"])[0]
    torch.testing.assert_close(target["boxes"][0], white_extent(image), atol=1.0, rtol=0)


def test_augmentation_keeps_boxes_on_the_objects(tmp_path):
    save_image(tmp_path / "images" / "train" / "a.png", 160, 120, [(40, 30, 100, 90)])
    (tmp_path / "labels" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train" / "a.txt").write_text(f"0 {70 / 160} {60 / 120} {60 / 160} {60 / 120}\n")
    dataset = YOLODataset(tmp_path, "train", size=96, augment=True, class_names=["box"])
    boxes_seen = set()
    for seed in range(25):
        torch.manual_seed(seed)
        image, target = dataset[0]
        extent = white_extent(image)
        if target["boxes"].shape[0] == 0:  # zoomed or shifted out of view: no white object pixels may remain
            assert extent is None or (extent[2:] - extent[:2]).min() < 2
            continue
        # bilinear resampling blurs the edges by up to a pixel; ColorJitter may not move the box at all
        torch.testing.assert_close(target["boxes"][0], extent, atol=1.5, rtol=0)
        boxes_seen.add(tuple(target["boxes"][0].round().tolist()))
    assert len(boxes_seen) > 10  # the augmentation really moves and scales the object


def left_lit_object(root):
    """A VOC set of one 'box' whose left half is white and right half black: its mirror image differs."""
    write_voc(root, {"a": (120, 120, [("box", (30, 30, 90, 90), False)])})
    save_image(root / "JPEGImages" / "a.jpg", 120, 120, [(30, 30, 60, 90)])
    (root / "labels.txt").write_text("box\n")
    return root


def times_mirrored(dataset, draws=30):
    """How many of ``draws`` augmented copies show the object's white half on the right of its box."""
    mirrored = 0
    for seed in range(draws):
        torch.manual_seed(seed)
        image, target = dataset[0]
        if target["boxes"].shape[0] == 0:
            continue
        x1, y1, x2, y2 = target["boxes"][0].round().int().tolist()
        middle = (x1 + x2) // 2
        inside = image[:, y1:y2].mean(dim=(0, 1))
        mirrored += bool(inside[middle:x2].mean() > inside[x1:middle].mean())
    return mirrored


def test_horizontal_flip_can_be_turned_off_for_classes_that_mirroring_changes(tmp_path):
    root = left_lit_object(tmp_path)
    assert times_mirrored(VOCDataset(root, "train", size=96, augment=True)) >= 5
    assert times_mirrored(VOCDataset(root, "train", size=96, augment=True, horizontal_flip=False)) == 0


@pytest.mark.parametrize(
    ("data_format", "setting", "flips"),
    [("voc", None, True), ("digits", None, False), ("digits", True, True), ("voc", False, False)],
)
def test_experiments_flip_training_images_unless_digits_or_told_otherwise(
    tmp_path, data_format, setting, flips
):
    root = left_lit_object(tmp_path / "data")
    config = build_config(
        {
            "data": {"format": data_format, "root": str(root), "size": 96, "horizontal_flip": setting},
            "model": {"num_classes": 1},
        }
    )
    train = Context(config, RunDir(tmp_path / "run")).dataset("train", augment=True)
    assert (times_mirrored(train) > 0) == flips


def test_collate_stacks_images_and_keeps_target_list(tmp_path):
    write_voc(tmp_path, TWO_VOC_IMAGES)
    dataset = VOCDataset(tmp_path, "train", size=64)
    images, targets = collate([dataset[0], dataset[1]])
    assert images.shape == (2, 3, 64, 64)
    assert [t["image_id"] for t in targets] == [0, 1] and [len(t["labels"]) for t in targets] == [2, 1]


# ---------------------------------------------------------------- bad input (issue §7)


def test_missing_annotation_names_the_file_or_is_skipped_with_one_warning(tmp_path):
    write_voc(tmp_path, TWO_VOC_IMAGES)
    (tmp_path / "Annotations" / "b.xml").unlink()
    with pytest.raises(CorruptFileError, match=r"annotation file not found: .*b\.xml"):
        VOCDataset(tmp_path, "train", size=64)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable item.*b\.xml"):
        assert len(VOCDataset(tmp_path, "train", size=64, strict=False)) == 1


def test_corrupt_annotation_names_the_file(tmp_path):
    write_voc(tmp_path, TWO_VOC_IMAGES)
    (tmp_path / "Annotations" / "a.xml").write_text("<annotation><object>")
    with pytest.raises(CorruptFileError, match=r"cannot parse annotation .*a\.xml"):
        VOCDataset(tmp_path, "train", size=64)


@pytest.mark.parametrize("problem", ["missing", "corrupt"])
def test_bad_image_names_the_file_or_is_skipped(tmp_path, problem):
    write_voc(tmp_path, TWO_VOC_IMAGES)
    image_path = tmp_path / "JPEGImages" / "a.jpg"
    if problem == "missing":
        image_path.unlink()
    else:
        image_path.write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(CorruptFileError, match=r"a\.jpg"):
        VOCDataset(tmp_path, "train", size=64)
    with pytest.warns(UserWarning, match=r"skipped 1 .*a\.jpg"):
        dataset = VOCDataset(tmp_path, "train", size=64, strict=False)
    assert len(dataset) == 1 and dataset.records[0].image_path.name == "b.jpg"


def test_boxes_outside_are_clipped_and_zero_area_dropped_with_counted_warnings(tmp_path):
    objects = [
        ("dog", (-10, 5, 30, 40), False),  # left edge outside: clipped to x1 = 0
        ("dog", (50, 50, 90, 90), False),  # reaches past the 64x64 image: clipped
        ("cat", (20, 20, 20, 40), False),  # zero width: dropped
        ("cat", (70, 70, 80, 80), False),  # entirely outside: nothing left, dropped
    ]
    write_voc(tmp_path, {"a": (64, 64, objects)})
    with pytest.warns(UserWarning) as records:
        dataset = VOCDataset(tmp_path, "train", size=64)
    messages = " | ".join(str(record.message) for record in records)
    assert "clipped 2 box(es)" in messages and "dropped 2 zero-area box(es)" in messages
    torch.testing.assert_close(dataset[0][1]["boxes"], torch.tensor([[0.0, 5, 30, 40], [50, 50, 64, 64]]))


def test_empty_dataset_is_a_clear_error(tmp_path):
    write_voc(tmp_path, {})
    with pytest.raises(DatasetError, match="empty"):
        VOCDataset(tmp_path, "train", size=64)
    write_voc(tmp_path, TWO_VOC_IMAGES, with_images=False)
    with pytest.warns(UserWarning, match="skipped 2"), pytest.raises(DatasetError, match="empty"):
        VOCDataset(tmp_path, "train", size=64, strict=False)
    (tmp_path / "images" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match="empty"):
        YOLODataset(tmp_path, "train", size=64, class_names=["a"])


def test_missing_split_file_and_bad_size_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"split file not found: .*val\.txt"):
        VOCDataset(tmp_path, "val")
    write_voc(tmp_path, TWO_VOC_IMAGES)
    with pytest.raises(DatasetError, match="multiple of 32"):
        VOCDataset(tmp_path, "train", size=100)


def test_class_names_outside_the_label_map_are_named(tmp_path):
    write_voc(tmp_path, {"a": (64, 64, [("unicorn", (1, 1, 9, 9), False), ("dog", (10, 10, 20, 20), False)])})
    with pytest.raises(DatasetError, match=r"'unicorn' \(e\.g\. for a\.jpg\)"):
        VOCDataset(tmp_path, "train", size=64)
    with pytest.raises(DatasetError, match="'dog'"):
        VOCDataset(tmp_path, "train", size=64, class_names=["unicorn"])


def test_coco_and_yolo_reject_unknown_classes_and_malformed_files(tmp_path):
    save_image(tmp_path / "x.jpg", 32, 32)
    content = {
        "images": [{"id": 1, "file_name": "x.jpg"}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 4, "bbox": [0, 0, 5, 5]}],
    }
    (tmp_path / "bad.json").write_text(json.dumps(content))
    with pytest.raises(DatasetError, match=r"category id\(s\) \[4\]"):
        COCODataset(tmp_path, tmp_path / "bad.json", size=64)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(DatasetError, match=r"broken\.json"):
        COCODataset(tmp_path, tmp_path / "broken.json", size=64)

    save_image(tmp_path / "images" / "train" / "a.png", 32, 32)
    (tmp_path / "labels" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train" / "a.txt").write_text("5 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DatasetError, match=r"class index\(es\) \[5\.0\]"):
        YOLODataset(tmp_path, "train", size=64, class_names=["a", "b"])
    (tmp_path / "labels" / "train" / "a.txt").write_text("0 0.5 0.5\n")
    with pytest.raises(CorruptFileError, match=r"a\.txt"):
        YOLODataset(tmp_path, "train", size=64, class_names=["a", "b"])


# ---------------------------------------------------------------- DigitScenes

SMALL = {"n_train": 10, "n_val": 3, "n_test": 3, "size": 128}


@pytest.fixture(scope="module")
def small_scenes(tmp_path_factory):
    return make_digit_scenes(tmp_path_factory.mktemp("digits"), **SMALL)


def all_files(root):
    return {path.relative_to(root): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_digit_scenes_are_deterministic_and_reused(small_scenes, tmp_path):
    again = make_digit_scenes(tmp_path / "again", **SMALL)
    assert all_files(again) == all_files(small_scenes)
    stamps = {path: path.stat().st_mtime_ns for path in again.rglob("*.jpg")}
    make_digit_scenes(again, **SMALL)  # complete, same parameters: nothing rewritten
    assert stamps == {path: path.stat().st_mtime_ns for path in again.rglob("*.jpg")}
    other = make_digit_scenes(tmp_path / "again", **{**SMALL, "seed": 1})  # different seed: regenerated
    assert json.loads((other / PARAMS_FILE).read_text())["seed"] == 1
    assert (other / "JPEGImages" / "train_00000.jpg").read_bytes() != all_files(small_scenes)[
        (small_scenes / "JPEGImages" / "train_00000.jpg").relative_to(small_scenes)
    ]


def test_digit_scenes_load_as_voc_with_sized_separated_digits(small_scenes):
    dataset = VOCDataset(small_scenes, "train", size=128)
    assert dataset.class_names == CLASS_NAMES and len(dataset) == SMALL["n_train"]
    for record in dataset.records:
        assert 1 <= len(record.labels) <= 8
        long_sides = (record.boxes[:, 2:] - record.boxes[:, :2]).max(dim=1).values
        assert long_sides.min() >= 5 and long_sides.max() <= 1.1 * 64  # 8-96 px, capped at size // 2
        iou = box_iou(record.boxes, record.boxes).fill_diagonal_(0)
        assert iou.max() < 0.3
    assert torch.cat([record.labels for record in dataset.records]).unique().numel() >= 5


def test_digit_scenes_use_disjoint_handwriting_per_split(small_scenes):
    _, labels = load_glyphs()
    used = {}
    for split in ("train", "val", "test"):
        used[split] = set()
        for image_id in (small_scenes / "ImageSets" / "Main" / f"{split}.txt").read_text().split():
            for obj in ET.parse(small_scenes / "Annotations" / f"{image_id}.xml").getroot().iter("object"):
                glyph = int(obj.findtext("glyph"))
                assert obj.findtext("name") == str(labels[glyph])  # the label is the digit drawn
                used[split].add(glyph)
    pools = glyph_pools(len(labels))
    for split, glyphs in used.items():
        assert glyphs and glyphs <= set(pools[split].tolist())
    for first, second in itertools.combinations(pools.values(), 2):
        assert not set(first.tolist()) & set(second.tolist())
    assert sum(len(pool) for pool in pools.values()) == len(labels)


def test_digit_scenes_reject_bad_parameters(tmp_path):
    with pytest.raises(ValueError, match="at least one image"):
        make_digit_scenes(tmp_path, n_val=0)
    with pytest.raises(ValueError, match="at least 64 px"):
        make_digit_scenes(tmp_path, size=32)


@pytest.mark.parametrize("glyph_index", [0, 1, 7, 100])
@pytest.mark.parametrize("long_side", [8, 40, 96])
def test_rendered_glyph_box_is_tight_around_all_ink(glyph_index, long_side):
    glyphs, _ = load_glyphs()
    alpha, (x1, y1, x2, y2) = render_glyph(glyphs[glyph_index], long_side, aspect=1.1)
    rows, cols = np.nonzero(alpha)
    assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == (x1, y1, x2, y2)
    assert abs(max(x2 - x1, y2 - y1) - long_side) <= max(2, 0.15 * long_side)
    assert alpha.max() == pytest.approx(1.0)  # solid strokes, not the grey of the 8x8 averages
