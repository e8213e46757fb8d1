"""Detection accuracy: mAP@0.5 (the paper's metric, §5.1) and COCO's mAP@0.5:0.95, through pycocotools.

The ground truth and the detections are handed to ``pycocotools.cocoeval.COCOeval`` as in-memory COCO objects,
so matching is that of the reference implementation (greedy by score, each object matched at most once) rather
than of a re-implementation. How a precision-recall curve becomes an AP is ``ap_method``:

- ``"coco101"`` (default): pycocotools' own, the mean of the interpolated precision (highest precision at that
  recall or beyond) at the 101 recalls 0, 0.01, ..., 1;
- ``"voc11"``: the VOC2007 devkit's 11-point metric, the same mean at the recalls 0, 0.1, ..., 1, which many
  VOC07-test results report (the paper does not say which interpolation its mAP@0.5 uses);
- ``"voc_area"``: the VOC2010+ devkit's all-point AP, the area under the interpolated precision.

The three give different numbers for the same detections, so a number is only comparable with another of the
same method. Matching is COCOeval's under every method: the VOC devkit differs in details (IoU > 0.5 rather than
>= 0.5, box sizes counted with one extra pixel, a detection whose best-overlapping object is taken is a false
positive even if another object overlaps it enough), so ``voc11`` is VOC07's interpolation on COCO's matches,
not a replica of the devkit's script. VOC's "difficult" objects (``difficult_boxes``/``difficult_labels`` of a target) follow the
VOC protocol: they are not ground truth (missing them costs no recall) and a detection matched to one is
neither a true nor a false positive.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from gcp.detection.data import batch_to, collate
from gcp.detection.models import postprocess
from gcp.vocab import AP_METHODS

#: ``(model, eval-mode outputs, conf_thres, iou_thres, max_det) -> detections per image`` (see :func:`evaluate`).
Postprocess = Callable[[nn.Module, Any, float, float, int], list[dict[str, torch.Tensor]]]
#: How a precision-recall curve is turned into an AP (see the module docstring); the first is the default.
#: The optional target keys of VOC's difficult objects, filled by the dataset readers.
DIFFICULT_KEYS = ("difficult_boxes", "difficult_labels")


def check_ap_method(ap_method: str) -> None:
    """Fail with the valid choices on an unknown ``ap_method``, before any work (a misspelt method must not
    silently fall back to another interpolation: the numbers would look comparable and not be)."""
    if ap_method not in AP_METHODS:
        raise ValueError(f"unknown ap_method {ap_method!r}; choose one of {', '.join(AP_METHODS)}")


def check_boxes(entry: dict[str, torch.Tensor], keys: Sequence[str], num_classes: int, where: str) -> None:
    """Fail with a clear message when a prediction or target dict is malformed or has labels out of range."""
    missing = [key for key in keys if key not in entry]
    if missing:
        raise ValueError(f"{where} lacks the key(s) {missing}")
    boxes, labels = entry["boxes"], entry["labels"]
    if boxes.dim() != 2 or boxes.shape[1] != 4 or labels.shape != boxes.shape[:1]:
        shapes = f"{tuple(boxes.shape)} and {tuple(labels.shape)}"
        raise ValueError(f"{where}: boxes must be (N, 4) and labels (N,), got {shapes}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{where}: labels must lie in [0, {num_classes}), got {labels.unique().tolist()}")


def check_difficult(target: dict[str, torch.Tensor], num_classes: int, where: str) -> None:
    """Check a target's optional difficult objects: both keys or neither, shaped and labelled like objects."""
    present = [key for key in DIFFICULT_KEYS if key in target]
    if present and len(present) != len(DIFFICULT_KEYS):
        raise ValueError(f"{where} has {present[0]} without {set(DIFFICULT_KEYS).difference(present).pop()}")
    if present:
        boxes, labels = (target[key] for key in DIFFICULT_KEYS)
        check_boxes(
            {"boxes": boxes, "labels": labels}, ("boxes", "labels"), num_classes, f"{where} difficult_labels"
        )


def ground_truth_entries(targets: Sequence[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Each target's objects followed by its difficult ones, with a ``difficult`` flag per object."""
    entries = []
    for target in targets:
        boxes, labels = target["boxes"].reshape(-1, 4), target["labels"].reshape(-1)
        extra_boxes = target.get("difficult_boxes", boxes.new_zeros(0, 4)).reshape(-1, 4)
        extra_labels = target.get("difficult_labels", labels.new_zeros(0)).reshape(-1)
        entries.append(
            {
                "boxes": torch.cat([boxes.to(extra_boxes.dtype), extra_boxes]),
                "labels": torch.cat([labels.long(), extra_labels.long()]),
                "difficult": torch.cat(
                    [
                        torch.zeros(len(labels), dtype=torch.bool),
                        torch.ones(len(extra_labels), dtype=torch.bool),
                    ]
                ),
            }
        )
    return entries


class DifficultAwareEval(COCOeval):
    """``COCOeval`` with the VOC rule for difficult objects (ground-truth annotations with ``difficult: 1``).

    COCO has no such objects; its nearest notion, crowd regions, changes the IoU (intersection over the
    detection's area), so difficult objects are marked ``ignore`` instead, which COCOeval honours with the
    ordinary IoU: they do not count as positives and a detection matched to one is ignored. COCOeval lets an
    ignored non-crowd object take one detection only, so a second detection of a difficult object would count
    as a false positive; VOC ignores every detection overlapping a difficult object above the threshold, and so
    does :meth:`evaluateImg` here. (Where a detection overlaps both a normal and a difficult object, COCOeval
    matches the normal one first; VOC takes the larger IoU. This rare case follows COCOeval.)
    """

    def _prepare(self) -> None:
        super()._prepare()
        for image_objects in self._gts.values():
            for annotation in image_objects:
                if annotation.get("difficult"):
                    annotation["ignore"] = 1

    # COCOeval's method and argument names, kept so that COCOeval.evaluate calls this one
    def evaluateImg(self, imgId: int, catId: int, aRng: list[float], maxDet: int) -> dict[str, Any] | None:
        """COCOeval's per-image matching, then unmatched detections overlapping a difficult object ignored."""
        result = super().evaluateImg(imgId, catId, aRng, maxDet)
        ious = self.ious[imgId, catId]
        if result is None or len(ious) == 0 or not result["dtIds"]:
            return result
        difficult = np.array([bool(annotation.get("difficult")) for annotation in self._gts[imgId, catId]])
        if not difficult.any():
            return result
        # rows: detections by descending score (the order evaluateImg uses); columns: ground truth as stored
        best = np.asarray(ious)[: len(result["dtIds"]), difficult].max(axis=1)
        thresholds = np.minimum(self.params.iouThrs, 1 - 1e-10)[:, None]  # COCOeval's own ">= t" test
        on_difficult = (result["dtMatches"] == 0) & (best[None, :] >= thresholds)
        result["dtIgnore"] = np.logical_or(result["dtIgnore"], on_difficult)
        return result


def entries_by_class(evaluator: COCOeval) -> dict[int, list[dict[str, Any]]]:
    """The evaluator's per-image results for area "all", grouped by class, in image order (one pass: VOC07
    test has 20 classes x 4 area ranges x 4952 images of them)."""
    all_areas = list(evaluator.params.areaRng[0])
    grouped: dict[int, list[dict[str, Any]]] = {}
    for entry in evaluator.evalImgs:
        if entry is not None and list(entry["aRng"]) == all_areas:
            grouped.setdefault(entry["category_id"], []).append(entry)
    return grouped


def ranked_counts(entries: Sequence[dict[str, Any]], max_det: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Cumulative true- and false-positive counts ``(IoU thresholds, detections)`` of one class's per-image
    results ``entries``, its detections ranked by score across all images, and its number of (non-difficult)
    objects. Ranking, the per-image cap ``max_det`` and what counts follow ``COCOeval.accumulate``, so the
    VOC methods read the same curve as pycocotools' 101 points (a test checks it)."""
    scores = np.concatenate([np.asarray(entry["dtScores"][:max_det], dtype=float) for entry in entries])
    order = np.argsort(-scores, kind="mergesort")
    matched = np.concatenate([entry["dtMatches"][:, :max_det] for entry in entries], axis=1)[:, order] != 0
    ignored = np.concatenate([entry["dtIgnore"][:, :max_det] for entry in entries], axis=1)[:, order] != 0
    positives = sum(int(np.count_nonzero(entry["gtIgnore"] == 0)) for entry in entries)
    true_pos = np.cumsum(matched & ~ignored, axis=1)
    false_pos = np.cumsum(~matched & ~ignored, axis=1)
    return true_pos, false_pos, positives


def voc11_ap(true_pos: np.ndarray, false_pos: np.ndarray, positives: int) -> float:
    """VOC07's 11-point AP: the mean over t = 0, 0.1, ..., 1 of the highest precision at recall >= t (0 where
    recall never reaches t). "recall >= k/10" is tested exactly, as 10 TP >= k N: the devkit's floating-point
    steps (0.30000000000000004) would miss a recall of exactly 3/10."""
    precision = true_pos / np.maximum(true_pos + false_pos, 1)
    points = []
    for k in range(11):
        reached = 10 * true_pos >= k * positives
        points.append(float(precision[reached].max()) if reached.any() else 0.0)
    return float(np.mean(points))


def area_ap(true_pos: np.ndarray, false_pos: np.ndarray, positives: int) -> float:
    """VOC2010+'s all-point AP: the area under the interpolated precision (highest precision at that recall
    or beyond), summed over the recall steps the ranking makes."""
    recall = np.concatenate([[0.0], true_pos / positives, [1.0]])
    precision = np.concatenate([[0.0], true_pos / np.maximum(true_pos + false_pos, 1), [0.0]])
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[steps + 1] - recall[steps]) * envelope[steps + 1]))


def voc_ap_table(evaluator: COCOeval, num_classes: int, ap_method: str) -> np.ndarray:
    """``(IoU thresholds, classes)`` APs by ``voc11`` or ``voc_area`` from the evaluator's matches; ``nan`` for a
    class without (non-difficult) objects."""
    ap_of = voc11_ap if ap_method == "voc11" else area_ap
    table = np.full((len(evaluator.params.iouThrs), num_classes), math.nan)
    for label, entries in entries_by_class(evaluator).items():
        true_pos, false_pos, positives = ranked_counts(entries, evaluator.params.maxDets[-1])
        if positives:
            table[:, label] = [ap_of(tp, fp, positives) for tp, fp in zip(true_pos, false_pos)]
    return table


def xyxy_to_coco(boxes: torch.Tensor) -> list[list[float]]:
    """``xyxy`` rows to COCO's ``[x, y, width, height]`` lists."""
    boxes = boxes.detach().double().cpu()
    return torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()


def coco_from(images: list[dict], annotations: list[dict], num_classes: int) -> COCO:
    """An in-memory ``COCO`` object, its index built quietly (pycocotools prints progress on stdout)."""
    coco = COCO()
    coco.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": label} for label in range(num_classes)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_annotations(entries: Sequence[dict[str, torch.Tensor]], with_scores: bool) -> list[dict[str, Any]]:
    """COCO annotation dicts for all images; image ids are list positions and annotation ids start at 1
    (COCOeval treats a matched id of 0 as "unmatched"). An entry's optional ``difficult`` flags become
    ``difficult: 1`` on those annotations (read by :class:`DifficultAwareEval`)."""
    annotations = []
    for image_id, entry in enumerate(entries):
        scores = entry["scores"].tolist() if with_scores else [None] * len(entry["labels"])
        flags = entry["difficult"].tolist() if "difficult" in entry else [False] * len(entry["labels"])
        rows = zip(xyxy_to_coco(entry["boxes"]), entry["labels"].tolist(), scores, flags)
        for bbox, label, score, difficult in rows:
            annotation = {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": int(label),
                "bbox": bbox,
                "area": bbox[2] * bbox[3],
                "iscrowd": 0,
            }
            if with_scores:
                annotation["score"] = float(score)
            if difficult:
                annotation["difficult"] = 1
            annotations.append(annotation)
    return annotations


def compute_map(
    predictions: Sequence[dict[str, torch.Tensor]],
    targets: Sequence[dict[str, torch.Tensor]],
    num_classes: int,
    class_names: Sequence[str] | None = None,
    ap_method: str = "coco101",
) -> dict[str, Any]:
    """mAP of ``predictions`` (``boxes`` xyxy, ``scores``, ``labels``) against ``targets`` (``boxes``,
    ``labels``, optionally VOC's ``difficult_boxes``/``difficult_labels``), matched by list position.

    Returns ``map50`` (mean AP at IoU 0.5, the paper's mAP@0.5), ``map`` (mean AP over IoU 0.5:0.95, COCO's
    metric when ``ap_method="coco101"``), ``per_class`` ({name: AP@0.5}) and ``ap_method``, which turns every
    precision-recall curve into an AP (``coco101``, ``voc11`` or ``voc_area``; see the module docstring) so
    that a number can be put next to a paper's computed the same way. Classes without (non-difficult) ground
    truth have AP ``nan`` and are left out of the means. No detection is dropped: COCOeval's per-image cap is
    raised to the largest count present.
    """
    check_ap_method(ap_method)
    if len(predictions) != len(targets):
        raise ValueError(f"got {len(predictions)} prediction entries for {len(targets)} targets")
    names = list(class_names) if class_names is not None else [str(label) for label in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"got {len(names)} class names for num_classes={num_classes}")
    for index, (prediction, target) in enumerate(zip(predictions, targets)):
        check_boxes(prediction, ("boxes", "scores", "labels"), num_classes, f"prediction {index}")
        check_boxes(target, ("boxes", "labels"), num_classes, f"target {index}")
        check_difficult(target, num_classes, f"target {index}")
    if not any(len(target["labels"]) for target in targets):
        raise ValueError("mAP is undefined without any ground-truth object (difficult objects do not count)")

    images = [{"id": image_id} for image_id in range(len(targets))]
    ground_truth = coco_from(
        images, coco_annotations(ground_truth_entries(targets), with_scores=False), num_classes
    )
    detections = coco_from(images, coco_annotations(predictions, with_scores=True), num_classes)
    evaluator = DifficultAwareEval(ground_truth, detections, iouType="bbox")
    evaluator.params.maxDets = [max([1, *(len(prediction["labels"]) for prediction in predictions)])]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        if ap_method == "coco101":
            evaluator.accumulate()
    if ap_method == "coco101":
        # precision: [IoU threshold, recall point (101), class, area range (0 = all), max detections]
        precision = evaluator.eval["precision"][:, :, :, 0, -1]
        ap_per_iou = np.full((precision.shape[0], num_classes), math.nan)
        for label in range(num_classes):
            curve = precision[:, :, label]
            if (curve > -1).all():  # -1 marks a class without ground truth
                ap_per_iou[:, label] = curve.mean(axis=1)
    else:
        ap_per_iou = voc_ap_table(evaluator, num_classes, ap_method)
    iou50 = int(np.argmin(np.abs(evaluator.params.iouThrs - 0.5)))
    has_objects = ~np.isnan(ap_per_iou[iou50])
    return {
        "map50": float(ap_per_iou[iou50, has_objects].mean()),
        "map": float(ap_per_iou[:, has_objects].mean()),
        "per_class": {name: float(ap_per_iou[iou50, label]) for label, name in enumerate(names)},
        "ap_method": ap_method,
    }


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 8,
    conf_thres: float = 0.001,
    iou_thres: float = 0.6,
    device: str | torch.device = "cpu",
    progress: bool = True,
    max_det: int = 300,
    ap_method: str = "coco101",
    postprocess_fn: Postprocess = postprocess,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Run ``model`` over ``dataset`` and return :func:`compute_map`'s dict for its detections.

    The model runs in eval mode (BatchNorm running statistics, as at deployment) under ``no_grad``; its
    train/eval mode is restored afterwards, so this can be called in the middle of training. Detections come
    from ``postprocess_fn(model, outputs, conf_thres, iou_thres, max_det)`` (default
    :func:`gcp.detection.models.postprocess`; another family's outputs need its own, e.g.
    :func:`gcp.adapters.ultralytics.postprocess`) with the low ``conf_thres`` customary for mAP, which needs the
    whole precision-recall curve. ``ap_method`` is :func:`compute_map`'s, checked before the model runs.
    ``channels_last`` feeds the batches in channels-last memory order (faster on CPU, see
    :func:`gcp.detection.data.batch_to`).
    """
    check_ap_method(ap_method)
    if getattr(dataset, "augment", False):
        raise ValueError("evaluate needs a dataset built with augment=False: augmented images move the boxes")
    declared = getattr(
        model, "num_classes", None
    )  # gcp.detection.models detectors declare it; other families may not
    num_classes = getattr(dataset, "num_classes", None) or declared
    if declared is not None and declared != num_classes:
        raise ValueError(f"model predicts {declared} classes but the dataset has {num_classes}")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    predictions, targets = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for images, batch_targets in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
                outputs = model(batch_to(images, device, channels_last=channels_last))
                detections = postprocess_fn(model, outputs, conf_thres, iou_thres, max_det)
                predictions.extend({key: value.cpu() for key, value in det.items()} for det in detections)
                targets.extend(batch_targets)
    finally:
        model.train(was_training)
    return compute_map(predictions, targets, num_classes, getattr(dataset, "class_names", None), ap_method)
