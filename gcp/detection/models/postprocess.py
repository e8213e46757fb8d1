"""Turning raw head tensors into boxes: decoding and class-aware NMS.

Both functions read only ``model.anchors``, ``model.strides`` and ``model.num_classes``, never the layers, so
a channel-pruned model (whose head output convolutions are untouched) decodes exactly like its base.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision
from torch import nn

# Candidates kept (highest score first) before NMS: early in training nearly every cell passes
# conf_thres=0.001 and NMS time grows quadratically; 30k is far more than any image has objects.
DEFAULT_MAX_CANDIDATES = 30000


def split_levels(model: nn.Module, outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Reshape each raw head tensor (B, A*(5+C), H, W) to (B, A, H, W, 5+C), checking it against the model."""
    anchors = model.anchors
    num_outputs = 5 + model.num_classes
    if len(outputs) != len(model.strides) or len(outputs) != anchors.shape[0]:
        raise ValueError(
            f"expected {len(model.strides)} head outputs (strides {tuple(model.strides)}), got {len(outputs)}"
        )
    levels = []
    for stride, output in zip(model.strides, outputs):
        if output.dim() != 4 or output.shape[1] != anchors.shape[1] * num_outputs:
            raise ValueError(
                f"stride-{stride} head output must be (B, {anchors.shape[1]}*(5+{model.num_classes}), H, W), "
                f"got {tuple(output.shape)}"
            )
        batch, _, height, width = output.shape
        levels.append(
            output.view(batch, anchors.shape[1], num_outputs, height, width)
            .permute(0, 1, 3, 4, 2)
            .contiguous()
        )
    return levels


def decode_boxes(raw_xywh: torch.Tensor, cells_xy: torch.Tensor, anchors_wh: torch.Tensor) -> torch.Tensor:
    """Box centre and size from raw logits, in the units of ``cells_xy`` and ``anchors_wh`` (cxcywh).

    xy = 2*sigmoid - 0.5 + cell and wh = (2*sigmoid)^2 * anchor (the YOLOv5 parametrisation, chosen over
    darknet's exp(): the centre may reach half a cell beyond its own, so the neighbour-cell positives of the
    loss are reachable, and the size is bounded to (0, 4) anchors, so a from-scratch network cannot blow up to
    inf).
    The loss uses this same function, so what is trained is what is decoded.
    """
    xy = raw_xywh[..., :2].sigmoid() * 2 - 0.5 + cells_xy
    wh = (raw_xywh[..., 2:4].sigmoid() * 2) ** 2 * anchors_wh
    return torch.cat([xy, wh], dim=-1)


def decode(model: nn.Module, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """All predictions of all scales as ``(B, N, 5 + C)``: boxes xyxy in input pixels, then objectness and
    class probabilities (sigmoids). N = sum over strides of A*H*W, ordered stride, anchor, row, column."""
    decoded = []
    for level, stride, anchors in zip(split_levels(model, outputs), model.strides, model.anchors):
        batch, num_anchors, height, width, _ = level.shape
        rows = torch.arange(height, device=level.device, dtype=level.dtype)
        cols = torch.arange(width, device=level.device, dtype=level.dtype)
        grid_y, grid_x = torch.meshgrid(rows, cols, indexing="ij")
        cells = torch.stack([grid_x, grid_y], dim=-1)  # (H, W, 2) as (x, y)
        anchors_wh = anchors.to(level.dtype).view(1, num_anchors, 1, 1, 2)
        boxes = decode_boxes(level[..., :4], cells, anchors_wh / stride) * stride
        xyxy = torchvision.ops.box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy")
        decoded.append(torch.cat([xyxy, level[..., 4:].sigmoid()], dim=-1).view(batch, -1, level.shape[-1]))
    return torch.cat(decoded, dim=1)


def postprocess(
    model: nn.Module,
    outputs: Sequence[torch.Tensor],
    conf_thres: float = 0.001,
    iou_thres: float = 0.6,
    max_det: int = 300,
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
) -> list[dict[str, torch.Tensor]]:
    """Detections per image: ``{"boxes": (K, 4) xyxy pixels, "scores": (K,), "labels": (K,) int64}``.

    score = objectness * class probability. Every (box, class) pair above ``conf_thres`` is a candidate
    (multi-label, as for mAP evaluation a box may count for a second class), boxes are clipped to the input,
    and ``torchvision.ops.batched_nms`` suppresses overlaps within each class. At most ``max_det`` detections
    per image are kept, highest score first.
    """
    if not 0.0 <= conf_thres < 1.0 or not 0.0 < iou_thres <= 1.0:
        raise ValueError(f"need 0 <= conf_thres < 1 and 0 < iou_thres <= 1, got {conf_thres}, {iou_thres}")
    if max_det < 1 or max_candidates < 1:
        raise ValueError(f"max_det and max_candidates must be positive, got {max_det}, {max_candidates}")
    predictions = decode(model, outputs)
    input_size = (outputs[0].shape[-2] * model.strides[0], outputs[0].shape[-1] * model.strides[0])
    results = []
    for image_predictions in predictions:
        scores_per_class = image_predictions[:, 4:5] * image_predictions[:, 5:]
        box_index, labels = (scores_per_class > conf_thres).nonzero(as_tuple=True)
        scores = scores_per_class[box_index, labels]
        if scores.numel() > max_candidates:
            scores, top = scores.topk(max_candidates)
            box_index, labels = box_index[top], labels[top]
        boxes = torchvision.ops.clip_boxes_to_image(image_predictions[box_index, :4], input_size)
        keep = torchvision.ops.batched_nms(boxes, scores, labels, iou_thres)[:max_det]
        results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return results
