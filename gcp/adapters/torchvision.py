"""torchvision detectors: RetinaNet, FCOS, SSD / SSDlite and box-only Faster R-CNN.

Their ``forward`` takes a list of images and, around the trainable network, normalises and resizes them, builds
anchors, decodes and runs NMS (eval) or matches targets (train). Tracing all of that made torch-pruning's group
search take minutes: the heads' outputs are reshaped and concatenated over every anchor, and each of those
indices is carried through the graph. We trace only the network (transform → backbone + FPN → head, plus RPN
and the box head for Faster R-CNN), capturing the prediction convs' raw maps, so the pruned model still runs its
own full forward in both modes.

Detectors built with pretrained backbones normalise with ``FrozenBatchNorm2d``, a module torch-pruning does not
know (pruning the conv before it leaves its buffers at the old width). :class:`FrozenNorm` replaces each with an
equivalent BatchNorm that never leaves inference mode, so it is pruned along, and γ-based methods rank its
(pretrained) γ.

GroupNorm layers (FCOS heads, the v2 RetinaNet head) need a channel count divisible by their group count; the
convs feeding them keep their width.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models import detection
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.ssd import SSD
from torchvision.ops.misc import FrozenBatchNorm2d

from gcp.core.registry import Adapter, convs_feeding_groupnorm, image_list, rewrite_modules

_ONE_STAGE = (detection.RetinaNet, detection.FCOS, SSD)


def is_torchvision_detector(model: nn.Module) -> bool:
    """RetinaNet, FCOS, SSD/SSDlite, or a Faster R-CNN without mask or keypoint heads."""
    if isinstance(model, _ONE_STAGE):
        return True
    if isinstance(model, GeneralizedRCNN):
        roi_heads = model.roi_heads
        return not roi_heads.has_mask() and not roi_heads.has_keypoint()
    return False


def _features(model: nn.Module, images: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    batch, _ = model.transform(image_list(images))
    features = model.backbone(batch.tensors)
    if isinstance(features, torch.Tensor):
        features = OrderedDict([("0", features)])
    return batch, features


class FrozenNorm(nn.BatchNorm2d):
    """``FrozenBatchNorm2d`` as a BatchNorm2d: running statistics and affine terms fixed, in train mode too.

    Same output as the frozen layer up to float rounding (that one computes ``x * scale + shift`` from the same
    four vectors, this one ``F.batch_norm`` in inference mode), but torch-pruning prunes it like any BatchNorm.
    γ and β stay non-trainable, as before.
    """

    def __init__(self, frozen: FrozenBatchNorm2d) -> None:
        super().__init__(frozen.weight.numel(), eps=frozen.eps)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(self, name).copy_(getattr(frozen, name))
        self.weight.requires_grad_(False)
        self.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


def unfreeze_norms(model: nn.Module) -> int:
    """Replace every ``FrozenBatchNorm2d`` by an equivalent :class:`FrozenNorm`; returns how many."""
    return rewrite_modules(model, lambda m: FrozenNorm if isinstance(m, FrozenBatchNorm2d) else None)


def run_network(model: nn.Module, images: Any) -> Any:
    """Transform, backbone (+ FPN) and head; for Faster R-CNN also the RPN and the RoI box head.

    Proposals leave the RPN detached (torchvision decodes them from detached deltas), so the traced graph runs
    from the image through the backbone to each prediction layer, never through anchors or NMS. Faster R-CNN
    must be in eval mode (its RPN needs targets in train mode); the one-stage detectors run in either mode.
    """
    batch, features = _features(model, images)
    if isinstance(model, _ONE_STAGE):
        return model.head(list(features.values()))
    proposals, _ = model.rpn(batch, features)
    return model.roi_heads(features, proposals, batch.image_sizes)


def head_layers(model: nn.Module) -> list[str]:
    """Prediction layers: the last conv (or linear) of each classification / regression branch."""
    if isinstance(model, detection.RetinaNet):
        return ["head.classification_head.cls_logits", "head.regression_head.bbox_reg"]
    if isinstance(model, detection.FCOS):
        return [
            "head.classification_head.cls_logits",
            "head.regression_head.bbox_reg",
            "head.regression_head.bbox_ctrness",
        ]
    if isinstance(model, SSD):
        heads = model.head
        return [
            f"head.{branch}.module_list.{level}"
            for branch, levels in (
                ("classification_head", heads.classification_head.module_list),
                ("regression_head", heads.regression_head.module_list),
            )
            for level in range(len(levels))
        ]
    return [
        "rpn.head.cls_logits",
        "rpn.head.bbox_pred",
        "roi_heads.box_predictor.cls_score",
        "roi_heads.box_predictor.bbox_pred",
    ]


def backbone_taps(model: nn.Module) -> list[str]:
    """The backbone stages an FPN reads (``backbone.body``'s return layers, e.g. ResNet ``layer2..layer4``),
    largest first; none for SSD backbones, which fall back to the generic choice."""
    body = getattr(model.backbone, "body", None)
    return_layers = getattr(body, "return_layers", None)
    if not return_layers:
        return []
    return [f"backbone.body.{name}" for name in return_layers]


ADAPTER = Adapter(
    name="torchvision",
    matches=is_torchvision_detector,
    run=run_network,
    heads=head_layers,
    prepare=unfreeze_norms,
    ignored_layers=convs_feeding_groupnorm,
    taps=backbone_taps,
)
