"""Detection accuracy: mAP@0.5 (the paper's metric, §5.1) and COCO's mAP@0.5:0.95, through pycocotools.

The ground truth and the detections are handed to ``pycocotools.cocoeval.COCOeval`` as in-memory COCO objects,
so the numbers are those of the reference implementation (101-point interpolated precision, greedy matching
by score) rather than of a re-implementation.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from gcp.data import collate
from gcp.models import postprocess


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
    (COCOeval treats a matched id of 0 as "unmatched")."""
    annotations = []
    for image_id, entry in enumerate(entries):
        scores = entry["scores"].tolist() if with_scores else [None] * len(entry["labels"])
        for bbox, label, score in zip(xyxy_to_coco(entry["boxes"]), entry["labels"].tolist(), scores):
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
            annotations.append(annotation)
    return annotations


def compute_map(
    predictions: Sequence[dict[str, torch.Tensor]],
    targets: Sequence[dict[str, torch.Tensor]],
    num_classes: int,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """mAP of ``predictions`` (``boxes`` xyxy, ``scores``, ``labels``) against ``targets`` (``boxes``,
    ``labels``), matched by list position.

    Returns ``map50`` (mean AP at IoU 0.5, the paper's mAP@0.5), ``map`` (mean AP over IoU 0.5:0.95, COCO's
    metric) and ``per_class`` ({name: AP@0.5}). Classes without ground truth have AP ``nan`` and are left out
    of the means. No detection is dropped: COCOeval's per-image cap is raised to the largest count present.
    """
    if len(predictions) != len(targets):
        raise ValueError(f"got {len(predictions)} prediction entries for {len(targets)} targets")
    names = list(class_names) if class_names is not None else [str(label) for label in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"got {len(names)} class names for num_classes={num_classes}")
    for index, (prediction, target) in enumerate(zip(predictions, targets)):
        check_boxes(prediction, ("boxes", "scores", "labels"), num_classes, f"prediction {index}")
        check_boxes(target, ("boxes", "labels"), num_classes, f"target {index}")
    if not any(len(target["labels"]) for target in targets):
        raise ValueError("mAP is undefined without any ground-truth object")

    images = [{"id": image_id} for image_id in range(len(targets))]
    ground_truth = coco_from(images, coco_annotations(targets, with_scores=False), num_classes)
    detections = coco_from(images, coco_annotations(predictions, with_scores=True), num_classes)
    evaluator = COCOeval(ground_truth, detections, iouType="bbox")
    evaluator.params.maxDets = [max([1, *(len(prediction["labels"]) for prediction in predictions)])]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
    # precision: [IoU threshold, recall point (101), class, area range (0 = all), max detections]
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    ap_per_iou = np.full((precision.shape[0], num_classes), math.nan)
    for label in range(num_classes):
        curve = precision[:, :, label]
        if (curve > -1).all():  # -1 marks a class without ground truth
            ap_per_iou[:, label] = curve.mean(axis=1)
    iou50 = int(np.argmin(np.abs(evaluator.params.iouThrs - 0.5)))
    has_objects = ~np.isnan(ap_per_iou[iou50])
    return {
        "map50": float(ap_per_iou[iou50, has_objects].mean()),
        "map": float(ap_per_iou[:, has_objects].mean()),
        "per_class": {name: float(ap_per_iou[iou50, label]) for label, name in enumerate(names)},
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
) -> dict[str, Any]:
    """Run ``model`` over ``dataset`` and return :func:`compute_map`'s dict for its detections.

    The model runs in eval mode (BatchNorm running statistics, as at deployment) under ``no_grad``; its
    train/eval mode is restored afterwards, so this can be called in the middle of training. Detections come
    from :func:`gcp.models.postprocess` with the low ``conf_thres`` customary for mAP, which needs the whole
    precision-recall curve.
    """
    if getattr(dataset, "augment", False):
        raise ValueError("evaluate needs a dataset built with augment=False: augmented images move the boxes")
    num_classes = getattr(dataset, "num_classes", None) or model.num_classes
    if model.num_classes != num_classes:
        raise ValueError(f"model predicts {model.num_classes} classes but the dataset has {num_classes}")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    predictions, targets = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for images, batch_targets in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
                outputs = model(images.to(device))
                detections = postprocess(model, outputs, conf_thres, iou_thres, max_det)
                predictions.extend({key: value.cpu() for key, value in det.items()} for det in detections)
                targets.extend(batch_targets)
    finally:
        model.train(was_training)
    return compute_map(predictions, targets, num_classes, getattr(dataset, "class_names", None))
