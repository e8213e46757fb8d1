"""The detector's own training loss, L_hard of the paper's Eq. 4 (§4.3): YOLOv4's CIoU box loss,
objectness BCE and class BCE.

Anchor assignment follows YOLOv5: a ground-truth box is matched to every anchor of every scale whose width and
height ratios to it are all below ``anchor_threshold`` (rather than only to the single best anchor), and each
match is also assigned to the two grid cells next to the box centre (the nearer horizontal and the nearer
vertical neighbour). That triples the positives, which speeds up training from scratch, and the neighbours are
reachable because the decoded centre spans half a cell beyond its own cell
(see :func:`gcp.detection.models.postprocess.decode_boxes`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from gcp.detection.models.postprocess import decode_boxes, split_levels

# Objectness weight per scale (strides 8, 16, 32), as in YOLOv5: the stride-8 map has 16x the cells of the
# stride-32 map, so its mean BCE is diluted by many more easy negatives and gets a larger weight.
DEFAULT_OBJ_LEVEL_WEIGHTS = (4.0, 1.0, 0.4)


@dataclass(frozen=True)
class LevelAssignment:
    """Positives of one scale: which prediction (image, anchor, cell) learns which box and class.

    ``boxes`` are (cx, cy, w, h) in grid cells, the centre relative to the top-left corner of the assigned
    cell.
    """

    image: torch.Tensor
    anchor: torch.Tensor
    cell_y: torch.Tensor
    cell_x: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor


def targets_to_tensor(targets: Sequence[dict], num_classes: int, device: torch.device) -> torch.Tensor:
    """Flatten the per-image target dicts of docs/design.md (xyxy pixels) into rows
    ``(image index, label, cx, cy, w, h)`` in pixels, validating shapes, boxes and label range. Zero-size
    boxes are kept; they match no anchor (their w/h ratio is infinite) and so teach nothing."""
    rows = []
    for image_index, target in enumerate(targets):
        if "boxes" not in target or "labels" not in target:
            raise ValueError(f"target {image_index} needs 'boxes' and 'labels', got keys {sorted(target)}")
        boxes = torch.as_tensor(target["boxes"], dtype=torch.float32, device=device).reshape(-1, 4)
        labels = torch.as_tensor(target["labels"], device=device).reshape(-1)
        if boxes.shape[0] != labels.shape[0]:
            raise ValueError(f"target {image_index}: {boxes.shape[0]} boxes but {labels.shape[0]} labels")
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"target {image_index}: labels must lie in [0, {num_classes}), got {labels.tolist()}"
            )
        if not torch.isfinite(boxes).all() or (boxes[:, 2:] < boxes[:, :2]).any():
            raise ValueError(f"target {image_index}: boxes must be finite xyxy with x2 >= x1 and y2 >= y1")
        cxcywh = torchvision.ops.box_convert(boxes, in_fmt="xyxy", out_fmt="cxcywh")
        index = torch.full((labels.shape[0], 1), float(image_index), device=device)
        rows.append(torch.cat([index, labels.float().unsqueeze(1), cxcywh], dim=1))
    return torch.cat(rows) if rows else torch.zeros((0, 6), device=device)


def assign_level(
    targets: torch.Tensor, anchors: torch.Tensor, grid_size: tuple[int, int], anchor_threshold: float
) -> LevelAssignment:
    """Match targets (rows of :func:`targets_to_tensor`, box columns already in grid cells of this scale) to
    the anchors (A, 2) of this scale (in grid cells), and to their cell plus its two nearest neighbours."""
    height, width = grid_size
    wh = targets[:, 4:6]
    ratio = wh[:, None, :] / anchors[None, :, :]
    worst_ratio = torch.maximum(ratio, 1.0 / ratio).amax(dim=2)
    target_index, anchor_index = (worst_ratio < anchor_threshold).nonzero(as_tuple=True)

    centre = targets[target_index, 2:4]
    grid_limit = torch.tensor([width - 1, height - 1], device=targets.device)
    own_cell = torch.minimum(centre.floor().long().clamp(min=0), grid_limit)
    toward_nearer = torch.where(centre - own_cell < 0.5, -1, 1)
    x_neighbour = own_cell.clone()
    x_neighbour[:, 0] += toward_nearer[:, 0]
    y_neighbour = own_cell.clone()
    y_neighbour[:, 1] += toward_nearer[:, 1]
    cells = torch.cat([own_cell, x_neighbour, y_neighbour])
    inside = ((cells >= 0) & (cells <= grid_limit)).all(dim=1)

    target_index = target_index.repeat(3)[inside]
    anchor_index = anchor_index.repeat(3)[inside]
    cells = cells[inside]
    rows = targets[target_index]
    return LevelAssignment(
        image=rows[:, 0].long(),
        anchor=anchor_index,
        cell_y=cells[:, 1],
        cell_x=cells[:, 0],
        boxes=torch.cat([rows[:, 2:4] - cells, rows[:, 4:6]], dim=1),
        labels=rows[:, 1].long(),
    )


class YoloLoss:
    """``loss(outputs, targets) -> {"box", "obj", "cls", "total"}`` for a YOLO detector of :mod:`gcp.detection.models`.

    - box: mean (1 - CIoU) over positives (``torchvision.ops.complete_box_iou_loss``), summed over scales.
    - obj: BCE over every prediction; positives' target is their detached CIoU (clamped at 0), so objectness
      learns localisation quality, as in YOLOv5. Scales are weighted by ``obj_level_weights``.
    - cls: BCE over positives against one-hot labels (also for one class, where it drives p(class) to 1).

    Each term is multiplied by its gain and by the batch size, which turns the per-image mean into a sum over
    the batch. With YOLOv4/v5's recipe of accumulating gradients up to a nominal batch of 64 images per
    optimizer step, this makes the gradient of one step independent of the per-step batch size chosen to fit
    memory. Under DDP the batch is each process's share; ``gcp.detection.train.fit`` scales the terms by the number of
    processes, so that DDP's gradient average becomes the sum over all of them (``loss_reduction="sum"``).
    Anchors, strides and class count are read from the model at every call, so the loss follows the model
    across devices and through pruning.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        box_gain: float = 0.05,
        obj_gain: float = 1.0,
        cls_gain: float = 0.5,
        anchor_threshold: float = 4.0,
        obj_level_weights: Sequence[float] = DEFAULT_OBJ_LEVEL_WEIGHTS,
    ) -> None:
        if anchor_threshold <= 1.0:
            raise ValueError(f"anchor_threshold is a max w/h ratio and must exceed 1, got {anchor_threshold}")
        if len(obj_level_weights) != len(model.strides):
            raise ValueError(
                f"need one objectness weight per stride {tuple(model.strides)}, got {len(obj_level_weights)}"
            )
        self.model = model
        self.box_gain = box_gain
        self.obj_gain = obj_gain
        self.cls_gain = cls_gain
        self.anchor_threshold = anchor_threshold
        self.obj_level_weights = tuple(obj_level_weights)

    def __call__(self, outputs: Sequence[torch.Tensor], targets: Sequence[dict]) -> dict[str, torch.Tensor]:
        levels = split_levels(self.model, outputs)
        batch_size = levels[0].shape[0]
        if len(targets) != batch_size:
            raise ValueError(f"got {len(targets)} targets for a batch of {batch_size} images")
        device = levels[0].device
        pixel_targets = targets_to_tensor(targets, self.model.num_classes, device)
        box_loss = torch.zeros((), device=device)
        obj_loss = torch.zeros((), device=device)
        cls_loss = torch.zeros((), device=device)
        for level, stride, anchors, obj_weight in zip(
            levels, self.model.strides, self.model.anchors, self.obj_level_weights
        ):
            grid_targets = pixel_targets.clone()
            grid_targets[:, 2:] /= stride
            anchors_grid = anchors.to(device) / stride
            assigned = assign_level(grid_targets, anchors_grid, level.shape[2:4], self.anchor_threshold)
            obj_target = torch.zeros(level.shape[:4], device=device)
            if assigned.labels.numel():
                predicted = level[assigned.image, assigned.anchor, assigned.cell_y, assigned.cell_x].float()
                ciou = self._ciou(predicted[:, :4], anchors_grid[assigned.anchor], assigned.boxes)
                box_loss = box_loss + (1.0 - ciou).mean()
                self._write_objectness_targets(obj_target, assigned, ciou.detach().clamp(min=0))
                one_hot = F.one_hot(assigned.labels, self.model.num_classes).float()
                cls_loss = cls_loss + F.binary_cross_entropy_with_logits(predicted[:, 5:], one_hot)
            obj_loss = obj_loss + obj_weight * F.binary_cross_entropy_with_logits(
                level[..., 4].float(), obj_target
            )
        box = self.box_gain * box_loss * batch_size
        obj = self.obj_gain * obj_loss * batch_size
        cls = self.cls_gain * cls_loss * batch_size
        return {"box": box, "obj": obj, "cls": cls, "total": box + obj + cls}

    @staticmethod
    def _ciou(raw_xywh: torch.Tensor, anchors_wh: torch.Tensor, target_boxes: torch.Tensor) -> torch.Tensor:
        """CIoU of decoded predictions and targets, both cxcywh in grid cells relative to the same cell."""
        predicted = decode_boxes(raw_xywh, torch.zeros_like(raw_xywh[:, :2]), anchors_wh)
        loss = torchvision.ops.complete_box_iou_loss(
            torchvision.ops.box_convert(predicted, in_fmt="cxcywh", out_fmt="xyxy"),
            torchvision.ops.box_convert(target_boxes, in_fmt="cxcywh", out_fmt="xyxy"),
            reduction="none",
        )
        return 1.0 - loss

    @staticmethod
    def _write_objectness_targets(
        obj_target: torch.Tensor, assigned: LevelAssignment, quality: torch.Tensor
    ) -> None:
        """Set each positive cell's objectness target to its CIoU; where several targets share one
        (image, anchor, cell), keep the best, deterministically (scatter with ``amax``)."""
        _, num_anchors, height, width = obj_target.shape
        flat_index = ((assigned.image * num_anchors + assigned.anchor) * height + assigned.cell_y) * width
        flat_index = flat_index + assigned.cell_x
        obj_target.view(-1).scatter_reduce_(0, flat_index, quality, reduce="amax")
