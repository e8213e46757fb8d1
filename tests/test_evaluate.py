"""compute_map against hand-worked average precisions, and evaluate() with a tiny detector through the real
decode + NMS path of gcp.detection.models.postprocess."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from gcp.app.config import ConfigError, build_config
from gcp.detection.data import VOCDataset, YOLODataset
from gcp.detection.evaluate import (
    AP_METHODS,
    DifficultAwareEval,
    coco_annotations,
    coco_from,
    compute_map,
    entries_by_class,
    evaluate,
    ground_truth_entries,
    ranked_counts,
)


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
    """A stand-in detector with the interface of gcp.detection.models (one stride-32 head, one 64x64 anchor) that
    "sees" the white (class 0) and the red (class 1) rectangle of an image and emits the raw logits that
    gcp.detection.models.decode turns back into their boxes. Only the network is fake; decoding and NMS are real."""

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
        """Invert xy = (2 sigmoid - 0.5 + cell) * 32 and wh = (2 sigmoid)^2 * 64 (gcp.detection.models.decode_boxes)."""
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
    assert evaluate(model, rectangles(rectangles_root), progress=False, channels_last=True) == result
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


# --- VOC "difficult" objects (issue 15 item 2) -------------------------------------------------------------


def with_difficult(target, boxes, labels):
    """``target`` plus difficult objects, in the keys the readers fill (``difficult_boxes``/``_labels``)."""
    extra = objects(boxes, labels)
    return {**target, "difficult_boxes": extra["boxes"], "difficult_labels": extra["labels"]}


def test_detection_on_a_difficult_object_is_neither_true_nor_false_positive():
    # Image 0: a normal object, detected at 0.9. Image 1: only a difficult object, detected at 0.95.
    # VOC protocol: the 0.95 detection is ignored and the difficult object is no ground truth, so the ranked
    # list is just one TP for one object -> AP 1. Counting it as a miss would give FP, TP -> AP 0.5.
    targets = [objects([[0, 0, 10, 10]], [0]), with_difficult(objects([], []), [[20, 20, 40, 40]], [0])]
    predictions = [detections([[0, 0, 10, 10]], [0.9], [0]), detections([[20, 20, 40, 40]], [0.95], [0])]
    for ap_method in AP_METHODS:
        result = compute_map(predictions, targets, num_classes=1, ap_method=ap_method)
        assert result["map50"] == pytest.approx(1.0), ap_method
        assert result["map"] == pytest.approx(1.0), ap_method


def test_duplicates_on_a_difficult_object_and_missed_difficult_objects_cost_nothing():
    # Image 1 holds a normal and a difficult object; the difficult one gets two overlapping detections that
    # both outrank everything (VOC never marks a difficult object as "taken", so the second is ignored too),
    # and a second difficult object in image 0 is not detected at all (it does not count towards recall).
    targets = [
        with_difficult(objects([[0, 0, 10, 10]], [0]), [[60, 60, 90, 90]], [0]),
        with_difficult(objects([[50, 0, 70, 20]], [0]), [[20, 20, 40, 40]], [0]),
    ]
    predictions = [
        detections([[0, 0, 10, 10]], [0.5], [0]),
        detections([[20, 20, 40, 40], [21, 21, 41, 41], [50, 0, 70, 20]], [0.95, 0.94, 0.6], [0, 0, 0]),
    ]
    for ap_method in AP_METHODS:
        assert compute_map(predictions, targets, num_classes=1, ap_method=ap_method)[
            "map50"
        ] == pytest.approx(1.0), ap_method


def test_a_class_with_only_difficult_objects_has_no_ap_and_difficult_alone_is_no_ground_truth():
    targets = [with_difficult(objects([[0, 0, 10, 10]], [0]), [[20, 20, 40, 40]], [1])]
    predictions = [detections([[0, 0, 10, 10], [20, 20, 40, 40]], [0.9, 0.8], [0, 1])]
    result = compute_map(predictions, targets, num_classes=2)
    assert result["per_class"]["0"] == pytest.approx(1.0) and math.isnan(result["per_class"]["1"])
    assert result["map50"] == pytest.approx(1.0)
    only_difficult = [with_difficult(objects([], []), [[20, 20, 40, 40]], [1])]
    with pytest.raises(ValueError, match="difficult"):
        compute_map([detections([], [], [])], only_difficult, num_classes=2)
    with pytest.raises(ValueError, match="difficult_labels"):
        compute_map(predictions, [{**targets[0], "difficult_labels": torch.tensor([5])}], num_classes=2)


def write_white_voc(root, layouts):
    """A VOC-layout split "test" of 128x128 images, each with white rectangles ``(box, difficult)``."""
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for index, rectangles_in_image in enumerate(layouts):
        image = Image.new("RGB", (128, 128), (40, 40, 40))
        xml = ""
        for (x1, y1, x2, y2), difficult in rectangles_in_image:
            image.paste((255, 255, 255), (x1, y1, x2, y2))
            xml += (
                f"<object><name>white</name><difficult>{int(difficult)}</difficult><bndbox><xmin>{x1 + 1}"
                f"</xmin><ymin>{y1 + 1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
            )
        image.save(root / "JPEGImages" / f"{index}.jpg", quality=95)
        (root / "Annotations" / f"{index}.xml").write_text(f"<annotation>{xml}</annotation>")
    (root / "ImageSets" / "Main" / "test.txt").write_text("\n".join(map(str, range(len(layouts)))) + "\n")


def test_evaluate_on_voc_ignores_detections_of_difficult_objects(tmp_path):
    # The reproducer end to end: reader -> detector -> postprocess -> compute_map. Image 1's only white
    # rectangle is difficult; the detector finds it, and that detection must not count as a false positive.
    write_white_voc(tmp_path, [[((10, 20, 60, 90), False)], [((30, 30, 110, 100), True)]])
    test = VOCDataset(tmp_path, "test", size=128, class_names=["white", "red"])
    assert test[1][1]["labels"].numel() == 0 and test[1][1]["difficult_labels"].tolist() == [0]
    result = evaluate(BrightRectangleDetector(), test, progress=False)
    assert result["per_class"]["white"] == pytest.approx(1.0)
    assert math.isnan(result["per_class"]["red"])


# --- ap_method: 101-point (COCO), 11-point (VOC07) and all-point (VOC2010+) AP (issue 15 item 3) ---------


def test_ap_methods_match_hand_worked_values():
    # The PR points of TARGETS/PREDICTIONS (see above), at IoU 0.5:
    #   class 0: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1;  class 1: precision 0, 1/2 at recall 0, 1.
    # voc11 (VOC07): mean over recall thresholds t = 0, 0.1, ..., 1 of the highest precision at recall >= t.
    #   class 0: t = 0..0.5 (6 thresholds) -> 1, t = 0.6..1 (5 thresholds) -> 2/3: AP = (6 + 5 * 2/3) / 11
    #            = 9.3333 / 11 = 0.84848.
    #   class 0 at IoU 0.95 (TP, FP, FP; recall stops at 1/2): 6 thresholds get 1, 5 get 0: AP = 6 / 11.
    #   class 1: every threshold -> 1/2: AP = 0.5.
    # voc_area (VOC2010+): area under the precision envelope, summed where recall changes.
    #   class 0: recall 0 -> 1/2 at precision 1, 1/2 -> 1 at precision 2/3: AP = 0.5 + 0.5 * 2/3 = 0.83333.
    #   class 0 at IoU 0.95: 0.5 * 1 = 0.5.  class 1: recall 0 -> 1 at precision 1/2: AP = 0.5.
    expected = {"voc11": ((6 + 5 * 2 / 3) / 11, 6 / 11), "voc_area": (0.5 + 0.5 * 2 / 3, 0.5)}
    for ap_method, (at_50, at_95) in expected.items():
        result = compute_map(
            PREDICTIONS, TARGETS, num_classes=2, class_names=["zero", "one"], ap_method=ap_method
        )
        assert result["ap_method"] == ap_method
        assert result["per_class"]["zero"] == pytest.approx(at_50, abs=1e-9), ap_method
        assert result["per_class"]["one"] == pytest.approx(AP_CLASS1, abs=1e-9), ap_method
        assert result["map50"] == pytest.approx((at_50 + AP_CLASS1) / 2, abs=1e-9), ap_method
        ap_class0 = (9 * at_50 + at_95) / 10  # IoU 0.5..0.9 share class 0's curve, 0.95 has its own
        assert result["map"] == pytest.approx((ap_class0 + AP_CLASS1) / 2, abs=1e-9), ap_method
    default = compute_map(PREDICTIONS, TARGETS, num_classes=2, class_names=["zero", "one"])
    assert default["ap_method"] == "coco101"
    assert default["per_class"]["zero"] == pytest.approx(AP_CLASS0_AT_50, abs=1e-6)


def test_voc11_counts_a_recall_of_exactly_three_tenths_at_the_threshold_0_3():
    # Ten objects, three found (ranked first), nothing else detected: precision 1 up to recall exactly 3/10.
    # Thresholds 0, 0.1, 0.2, 0.3 get 1, the other 7 get 0: AP = 4 / 11 = 0.3636. (Floating-point steps as in
    # np.arange(0, 1.1, 0.1) make the 4th threshold 0.30000000000000004 > 3/10 and would give 3 / 11.)
    boxes = [[20.0 * i, 0.0, 20.0 * i + 10, 10.0] for i in range(10)]
    target = objects(boxes, [0] * 10)
    prediction = detections(boxes[:3], [0.9, 0.8, 0.7], [0] * 3)
    assert compute_map([prediction], [target], num_classes=1, ap_method="voc11")["map50"] == pytest.approx(
        4 / 11, abs=1e-12
    )
    # the all-point area of the same curve: recall 0 -> 0.3 at precision 1
    assert compute_map([prediction], [target], num_classes=1, ap_method="voc_area")["map50"] == pytest.approx(
        0.3, abs=1e-12
    )


def test_unknown_ap_method_is_refused_with_the_choices(rectangles_root):
    with pytest.raises(ValueError, match="ap_method 'voc07'.*coco101, voc11, voc_area"):
        compute_map(PREDICTIONS, TARGETS, num_classes=2, ap_method="voc07")
    model = BrightRectangleDetector()
    with pytest.raises(ValueError, match="ap_method"):
        evaluate(model, rectangles(rectangles_root), progress=False, ap_method="11point")
    assert model.modes_seen == []  # refused before running the model over the dataset


def test_eval_config_carries_ap_method_and_checks_it():
    assert build_config({}).eval.ap_method == "coco101"
    assert build_config({"eval": {"ap_method": "voc11"}}).eval.ap_method == "voc11"
    with pytest.raises(ConfigError, match="ap_method"):
        build_config({"eval": {"ap_method": "voc07"}})


def test_voc_methods_rank_and_count_detections_as_pycocotools_does():
    # The VOC methods read the PR curve from COCOeval's matches themselves; sampled at pycocotools' 101
    # recalls, that curve must give pycocotools' own AP for every class and IoU threshold (random scenes,
    # about a third of the objects difficult, duplicates and misses among the detections).
    generator = torch.Generator().manual_seed(0)

    def random_boxes(n):
        corner = torch.rand(n, 2, generator=generator) * 80
        return torch.cat([corner, corner + 5 + torch.rand(n, 2, generator=generator) * 30], dim=1)

    targets, predictions = [], []
    for _ in range(8):
        boxes, labels = random_boxes(5), torch.randint(0, 3, (5,), generator=generator)
        hard = torch.rand(5, generator=generator) < 0.3
        targets.append(
            with_difficult(
                objects(boxes[~hard].tolist(), labels[~hard].tolist()),
                boxes[hard].tolist(),
                labels[hard].tolist(),
            )
        )
        moved = boxes + torch.randn(5, 4, generator=generator) * 3
        predictions.append(
            detections(
                torch.cat([boxes, moved, random_boxes(4)]).tolist(),
                torch.rand(14, generator=generator).tolist(),
                torch.cat([labels, labels, torch.randint(0, 3, (4,), generator=generator)]).tolist(),
            )
        )
    images = [{"id": index} for index in range(len(targets))]
    ground_truth = coco_from(images, coco_annotations(ground_truth_entries(targets), with_scores=False), 3)
    found = coco_from(images, coco_annotations(predictions, with_scores=True), 3)
    evaluator = DifficultAwareEval(ground_truth, found, iouType="bbox")
    evaluator.params.maxDets = [14]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
    reference = evaluator.eval["precision"][:, :, :, 0, -1]
    for label, entries in entries_by_class(evaluator).items():
        true_pos, false_pos, positives = ranked_counts(entries, 14)
        assert positives > 0
        for iou_index, (tp, fp) in enumerate(zip(true_pos, false_pos)):
            envelope = np.maximum.accumulate((tp / np.maximum(tp + fp, 1))[::-1])[::-1]
            at = np.searchsorted(tp / positives, evaluator.params.recThrs, side="left")
            sampled = np.where(at < len(envelope), envelope[np.minimum(at, len(envelope) - 1)], 0.0)
            assert sampled.mean() == pytest.approx(reference[iou_index, :, label].mean(), abs=1e-12)
