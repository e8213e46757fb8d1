"""Ultralytics YOLO detectors (``ultralytics.nn.tasks.DetectionModel``: YOLOv8, YOLO11 and their kin).

Three things stop plain torch-pruning on these models, and this adapter handles each:

* C2f / C3k2 run ``cv1(x).chunk(2, 1)``; the core locks channels through a channel split (a chunk re-splits the
  pruned tensor in halves at run time), which would keep every C2f's ``cv1`` and the residual stream behind it
  whole. :func:`split_blocks` rewrites each C2f (and C2PSA, whose ``split`` is the same pattern) into an
  equivalent block whose ``cv1`` is two convs holding the two halves of the weights and BatchNorm, so both
  halves become ordinary prunable layers.
* The Detect head concatenates its per-level maps along the anchor axis and decodes boxes with a fixed DFL conv;
  we trace only up to the prediction convs (``cv2[i][-1]``, ``cv3[i][-1]``), whose outputs are the raw maps.
* PSA attention reshapes its ``qkv`` channels into heads and views its output back to the *input* channel count,
  so the attention's channels and the residual stream through it keep their width (``qkv``, ``pe``, ``proj``).

:func:`train` runs stages 1 and 3 of the method (sparse training, distillation) on such a model, pruned or not,
with Ultralytics' own trainer, loss, augmentation and ``data.yaml``; :func:`postprocess` turns its outputs into
detections for :func:`gcp.detection.evaluate`, and :mod:`gcp.app.ultralytics.family` runs the ``gcp`` command's
stages on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torchvision
from torch import nn

from gcp.core.registry import Adapter, SoftOutputs, rewrite_modules, split_output_channels

if TYPE_CHECKING:
    pass

# Attributes Ultralytics' DetectionModel reads off every top-level block to route its forward pass.
_ROUTING_ATTRIBUTES = ("f", "i", "type", "np")


def is_ultralytics_detector(model: nn.Module) -> bool:
    """A DetectionModel-like module: defined by ultralytics, a ``model`` Sequential ending in a Detect head.

    Segmentation, pose and OBB heads (Detect subclasses with extra outputs) are not covered.
    """
    if not type(model).__module__.startswith("ultralytics."):
        return False
    blocks = getattr(model, "model", None)
    if not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
        return False
    return type(blocks[-1]).__name__ in ("Detect", "v10Detect")


def detect_head(model: nn.Module) -> tuple[str, nn.Module]:
    """Name and module of the model's Detect head (the last block)."""
    index = len(model.model) - 1
    return f"model.{index}", model.model[index]


def _branches(detect: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    names = ("cv2", "cv3", "one2one_cv2", "one2one_cv3")
    return [(n, getattr(detect, n)) for n in names if isinstance(getattr(detect, n, None), nn.ModuleList)]


def head_layers(model: nn.Module) -> list[str]:
    """The prediction convs, level by level: box (``cv2[i][-1]``) then class (``cv3[i][-1]``) of each level,
    then the one-to-one branch of end-to-end heads. Their outputs are the raw (B, 4·reg_max, H, W) and
    (B, nc, H, W) maps."""
    prefix, detect = detect_head(model)
    branches = _branches(detect)
    names = []
    for pair_start in range(0, len(branches), 2):
        pair = branches[pair_start : pair_start + 2]
        for level in range(detect.nl):
            for branch_name, branch in pair:
                names.append(f"{prefix}.{branch_name}.{level}.{len(branch[level]) - 1}")
    return names


def run_network(model: nn.Module, images: Any) -> Any:
    """DetectionModel's own forward on an image batch (its decoding runs too, but nothing traced depends on it)."""
    return model(images)


def attention_layers(model: nn.Module) -> list[str]:
    """Convs of every PSA attention (``qkv``, ``pe``, ``proj``): heads and the residual width stay fixed."""
    found = []
    for name, module in model.named_modules():
        if all(isinstance(getattr(module, part, None), nn.Module) for part in ("qkv", "pe", "proj")):
            found += [
                f"{name}.{part}.conv"
                for part in ("qkv", "pe", "proj")
                if hasattr(getattr(module, part), "conv")
            ]
    return found


class _SplitCv1(nn.Module):
    """A block whose ``cv1`` output is split in two halves at run time, with ``cv1`` made two convs instead."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.c = block.c
        self.cv1_a, self.cv1_b = split_output_channels(block.cv1, [block.c, block.c])
        self.m = block.m
        self.cv2 = block.cv2
        _copy_routing(block, self)


class SplitC2f(_SplitCv1):
    """C2f / C3k2 with ``cv1`` as two convs: ``[cv1_a(x), cv1_b(x)]`` equals ``cv1(x).chunk(2, 1)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1_a(x), self.cv1_b(x)]
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SplitC2PSA(_SplitCv1):
    """C2PSA with ``cv1`` as two convs: ``cv1_a(x), cv1_b(x)`` equal ``cv1(x).split((c, c), 1)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv2(torch.cat((self.cv1_a(x), self.m(self.cv1_b(x))), 1))


def _copy_routing(source: nn.Module, target: nn.Module) -> None:
    for attribute in _ROUTING_ATTRIBUTES:
        if hasattr(source, attribute):
            setattr(target, attribute, getattr(source, attribute))


def _rewrite_for(block: nn.Module) -> type[nn.Module] | None:
    if not hasattr(block, "cv1") or not hasattr(block, "c"):
        return None
    from ultralytics.nn.modules.block import C2PSA, C2f

    forward = type(block).forward
    if forward is C2f.forward and block.cv1.conv.out_channels == 2 * block.c:
        return SplitC2f
    if forward is C2PSA.forward and block.cv1.conv.out_channels == 2 * block.c:
        return SplitC2PSA
    return None


def split_blocks(model: nn.Module) -> int:
    """Replace every C2f-style block (forward unchanged from C2f or C2PSA) by its split-``cv1`` equivalent.

    Outputs are unchanged up to float rounding of the convolution (tested at atol 1e-6). Returns the number
    of blocks rewritten; a second call rewrites nothing.
    """
    return rewrite_modules(model, _rewrite_for)


def _per_level(outputs: Any, levels: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(box bins (B, 4·reg_max, HW), class logits (B, nc, HW), a map of the level's size) for each level.

    Accepts the adapter's raw head maps (:func:`gcp.core.registry.network`) as well as the model's own outputs: the
    training dict ``{"boxes", "scores", "feats"}`` (one-to-many branch for end-to-end heads) or the eval tuple
    ``(decoded, dict)``, so the distiller can run on the plain DetectionModel.
    """
    if isinstance(outputs, tuple) and len(outputs) == 2 and isinstance(outputs[1], dict):
        outputs = outputs[1]
    if isinstance(outputs, dict):
        raw = outputs.get("one2many", outputs)
        sizes = [f.shape[2] * f.shape[3] for f in raw["feats"]]
        return list(zip(raw["boxes"].split(sizes, 2), raw["scores"].split(sizes, 2), raw["feats"]))
    maps = list(outputs)
    if len(maps) < 2 * levels or not all(isinstance(m, torch.Tensor) and m.dim() == 4 for m in maps):
        raise ValueError(
            f"expected {2 * levels} raw head maps (box, class per level) or the model's own outputs, "
            f"got {type(outputs).__name__} of {len(maps)}"
        )
    return [(maps[2 * i].flatten(2), maps[2 * i + 1].flatten(2), maps[2 * i]) for i in range(levels)]


def soft_outputs(model: nn.Module) -> SoftOutputs:
    """L_soft mapping (eq. 8-12): per level (class logits (B, HW, nc), boxes xyxy in pixels (B, HW, 4)).

    Boxes are decoded as Ultralytics does: DFL expectation of the ``reg_max`` bins gives left/top/right/bottom
    distances in grid cells from each cell centre, times the level's stride gives input pixels. Class logits
    are returned raw; eq. 10-11 apply their own softmax.
    """
    from ultralytics.utils.tal import dist2bbox, make_anchors

    _, detect = detect_head(model)

    def adapt(outputs: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pairs = []
        for level, (box_bins, cls_logits, level_map) in enumerate(_per_level(outputs, detect.nl)):
            stride = detect.stride[level : level + 1]
            anchors, _ = make_anchors([level_map], stride, 0.5)
            distances = detect.dfl(box_bins)  # (B, 4, HW) in grid cells
            boxes = dist2bbox(distances, anchors.T.unsqueeze(0), xywh=False, dim=1) * stride
            pairs.append((cls_logits.transpose(1, 2), boxes.transpose(1, 2)))
        return pairs

    return adapt


def postprocess(
    model: nn.Module, outputs: Any, conf_thres: float, iou_thres: float, max_det: int
) -> list[dict[str, torch.Tensor]]:
    """Detections per image (``boxes`` xyxy in input pixels, ``scores``, ``labels``) from the model's eval-mode
    outputs, by Ultralytics' own NMS as its validator calls it (multi-label, class-aware; end-to-end heads are
    only thresholded), so that :func:`gcp.detection.evaluate` scores an Ultralytics model as ``YOLO.val`` would. Boxes are
    clipped to the input, as :func:`gcp.detection.models.postprocess` does for gcp's detectors."""
    from ultralytics.utils.nms import non_max_suppression

    _, detect = detect_head(model)
    raw = outputs[1].get("one2many", outputs[1])
    height, width = (int(n * detect.stride[0]) for n in raw["feats"][0].shape[-2:])
    kept = non_max_suppression(
        outputs[0],
        conf_thres,
        iou_thres,
        multi_label=True,
        max_det=max_det,
        end2end=bool(getattr(detect, "end2end", False)),
    )
    return [
        {
            "boxes": torchvision.ops.clip_boxes_to_image(rows[:, :4], (height, width)),
            "scores": rows[:, 4],
            "labels": rows[:, 5].long(),
        }
        for rows in kept
    ]


ADAPTER = Adapter(
    name="ultralytics",
    matches=is_ultralytics_detector,
    run=run_network,
    heads=head_layers,
    prepare=split_blocks,
    ignored_layers=attention_layers,
    soft_outputs=soft_outputs,
)
