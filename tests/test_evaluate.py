"""compute_map against hand-worked average precisions, and evaluate() with a tiny detector through the real
decode + NMS path of gcp.models.postprocess."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from torch import nn

from gcp.data import YOLODataset
from gcp.evaluate import compute_map, evaluate


def detections(boxes, scores, labels):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.long),
    }


def objects(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels)}


# Two images, two classes.
#   image 0: class 0 at A=[0,0,10,10], class 1 at C=[50,50,70,70];  image 1: class 0 at B=[20,20,40,40].
TARGETS = [objects([[0, 0, 10, 10], [50, 50, 70, 70]], [0, 1]), objects([[20, 20, 40, 40]], [0])]
PREDICTIONS = [
    # class 0: A exactly (0.9); class 1: C exactly (0.6)
    detections([[0, 0, 10, 10], [50, 50, 70, 70]], [0.9, 0.6], [0, 1]),
    # class 0: a box on nothing (0.8), then B with IoU 400/440 = 0.909 (0.7); class 1: on B's spot (0.95)
    detections([[60, 60, 80, 80], [20, 20, 40, 42], [0, 0, 10, 10]], [0.8, 0.7, 0.95], [0, 0, 1]),
]
# pycocotools interpolates precision at the 101 recalls 0, 0.01, ..., 1: at each it takes the highest
# precision reached at that recall or beyond.
#   class 0, IoU 0.5..0.9 (9 thresholds): ranked TP, FP, TP; 2 objects -> precision 1, 1/2, 2/3 at recall
#     1/2, 1/2, 1. Recalls 0..0.50 (51 points) get 1, recalls 0.51..1 (50 points) get 2/3:
#     AP = (51 + 50 * 2/3) / 101 = 84.333 / 101 = 0.83498.
#   class 0, IoU 0.95: the second hit (IoU 0.909) is a miss too -> TP, FP, FP; recall stops at 1/2:
#     AP = 51 / 101 = 0.50495.
#   class 1, every IoU: ranked FP, TP; 1 object -> precision 0, 1/2 at recall 0, 1; all 101 points get 1/2.
AP_CLASS0_AT_50 = (51 + 50 * 2 / 3) / 101
AP_CLASS0_AT_95 = 51 / 101
AP_CLASS1 = 0.5


def test_compute_map_matches_hand_worked_case():
    result = compute_map(PREDICTIONS, TARGETS, num_classes=2, class_names=["zero", "one"])
    assert result["per_class"]["zero"] == pytest.approx(AP_CLASS0_AT_50, abs=1e-6)
    assert result["per_class"]["one"] == pytest.approx(AP_CLASS1, abs=1e-6)
    assert result["map50"] == pytest.approx((AP_CLASS0_AT_50 + AP_CLASS1) / 2, abs=1e-6)
    ap_class0 = (9 * AP_CLASS0_AT_50 + AP_CLASS0_AT_95) / 10  # mean over the 10 IoU thresholds 0.5:0.95
    assert result["map"] == pytest.approx((ap_class0 + AP_CLASS1) / 2, abs=1e-6)


def test_perfect_predictions_score_one_and_no_predictions_zero():
    perfect = [
        detections(t["boxes"].tolist(), [0.9] * len(t["labels"]), t["labels"].tolist()) for t in TARGETS
    ]
    result = compute_map(perfect, TARGETS, num_classes=2)
    assert result["map50"] == pytest.approx(1.0) and result["map"] == pytest.approx(1.0)
    assert result["per_class"] == {"0": pytest.approx(1.0), "1": pytest.approx(1.0)}
    empty = [detections([], [], []) for _ in TARGETS]
    result = compute_map(empty, TARGETS, num_classes=2)
    assert result["map50"] == 0.0 and result["map"] == 0.0


def test_class_without_ground_truth_is_nan_and_left_out_of_the_mean():
    perfect = [detections([[0, 0, 10, 10]], [0.9], [0])]
    result = compute_map(perfect, [objects([[0, 0, 10, 10]], [0])], num_classes=3)
    assert math.isnan(result["per_class"]["1"]) and math.isnan(result["per_class"]["2"])
    assert result["map50"] == pytest.approx(1.0)


def test_more_than_a_hundred_detections_per_image_are_all_counted():
    # 150 misses scored above the one hit: COCO's default cap of 100 detections would drop the hit (AP 0);
    # counting all, the hit is ranked 151st and every recall point gets precision 1/151.
    misses = [[100.0 + i, 100.0, 110.0 + i, 110.0] for i in range(150)]
    prediction = detections([*misses, [0, 0, 10, 10]], [0.9] * 150 + [0.1], [0] * 151)
    result = compute_map([prediction], [objects([[0, 0, 10, 10]], [0])], num_classes=1)
    assert result["map50"] == pytest.approx(1 / 151, abs=1e-6)


def test_compute_map_rejects_bad_input():
    with pytest.raises(ValueError, match="2 targets"):
        compute_map(PREDICTIONS[:1], TARGETS, num_classes=2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        compute_map([detections([[0, 0, 1, 1]], [0.5], [5]), PREDICTIONS[1]], TARGETS, num_classes=2)
    with pytest.raises(ValueError, match="without any ground-truth"):
        compute_map([detections([], [], [])], [objects([], [])], num_classes=2)
    with pytest.raises(ValueError, match="class names"):
        compute_map(PREDICTIONS, TARGETS, num_classes=2, class_names=["only one"])


class BrightRectangleDetector(nn.Module):
    """A stand-in detector with the interface of gcp.models (one stride-32 head, one 64x64 anchor) that
    "sees" the white (class 0) and the red (class 1) rectangle of an image and emits the raw logits that
    gcp.models.decode turns back into their boxes. Only the network is fake; decoding and NMS are real."""

    def __init__(self, wrong_class: bool = False) -> None:
        super().__init__()
        self.num_classes, self.strides, self.wrong_class = 2, (32,), wrong_class
        self.register_buffer("anchors", torch.tensor([[[64.0, 64.0]]]))
        self.modes_seen: list[bool] = []

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        self.modes_seen.append(self.training)
        batch, _, height, width = images.shape
        head = torch.full((batch, 5 + self.num_classes, height // 32, width // 32), -12.0)
        for index, image in enumerate(images):
            white = image.min(dim=0).values > 0.9
            red = (image[0] > 0.9) & (image[1] < 0.1) & (image[2] < 0.1)
            for label, mask in enumerate((white, red)):
                rows, cols = torch.nonzero(mask, as_tuple=True)
                if rows.numel():
                    box = [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
                    self.encode(
                        head[index], [float(v) for v in box], 1 - label if self.wrong_class else label
                    )
        return [head]

    @staticmethod
    def encode(head: torch.Tensor, box: list[float], label: int) -> None:
        """Invert xy = (2 sigmoid - 0.5 + cell) * 32 and wh = (2 sigmoid)^2 * 64 (gcp.models.decode_boxes)."""
        cx, cy, w, h = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, box[2] - box[0], box[3] - box[1]
        col, row = int(cx // 32), int(cy // 32)
        offsets = torch.tensor([cx / 32 - col, cy / 32 - row])
        sizes = torch.tensor([w / 64, h / 64])
        head[0:2, row, col] = torch.logit((offsets + 0.5) / 2)
        head[2:4, row, col] = torch.logit(sizes.sqrt() / 2)
        head[4, row, col] = 12.0
        head[5 + label, row, col] = 12.0


@pytest.fixture
def rectangles_root(tmp_path):
    (tmp_path / "images" / "val").mkdir(parents=True)
    (tmp_path / "labels" / "val").mkdir(parents=True)
    layouts = [
        ((10, 20, 60, 90), (70, 10, 120, 40)),
        ((30, 30, 110, 100), None),
        ((5, 5, 40, 50), (80, 80, 120, 125)),
    ]
    for index, (white, red) in enumerate(layouts):
        image = Image.new("RGB", (128, 128), (40, 40, 40))
        lines = []
        for label, (box, colour) in enumerate(((white, (255, 255, 255)), (red, (255, 0, 0)))):
            if box is not None:
                image.paste(colour, box)
                x1, y1, x2, y2 = box
                lines.append(
                    f"{label} {(x1 + x2) / 256} {(y1 + y2) / 256} {(x2 - x1) / 128} {(y2 - y1) / 128}"
                )
        image.save(tmp_path / "images" / "val" / f"{index}.png")
        (tmp_path / "labels" / "val" / f"{index}.txt").write_text("\n".join(lines))
    return tmp_path


def rectangles(root, augment=False):
    return YOLODataset(root, "val", size=128, augment=augment, class_names=["white", "red"])


def test_evaluate_runs_real_postprocess_in_eval_mode_and_restores_mode(rectangles_root):
    model = BrightRectangleDetector().train()
    result = evaluate(model, rectangles(rectangles_root), batch_size=2, progress=False)
    assert result["map50"] == pytest.approx(1.0) and result["map"] == pytest.approx(1.0)
    assert set(result["per_class"]) == {"white", "red"}
    assert model.modes_seen == [False, False] and model.training
    confused = BrightRectangleDetector(wrong_class=True).eval()
    assert evaluate(confused, rectangles(rectangles_root), progress=False)["map50"] == 0.0
    assert not confused.training


def test_evaluate_rejects_a_model_for_other_classes_and_augmented_data(rectangles_root):
    model = BrightRectangleDetector()
    model.num_classes = 3
    with pytest.raises(ValueError, match="3 classes"):
        evaluate(model, rectangles(rectangles_root), progress=False)
    with pytest.raises(ValueError, match="augment=False"):
        evaluate(BrightRectangleDetector(), rectangles(rectangles_root, augment=True), progress=False)
