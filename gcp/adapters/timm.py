"""timm CNN backbones built with ``features_only=True`` (the form a detector's neck consumes).

The model's outputs are its feature maps, so the layers producing them keep their widths (the neck is built for
them) and everything inside the stages is prunable. CSPNet stages (``cspdarknet53``, ``cspresnet50``, ...) run
``conv_exp(x).split(expand_chs // 2, 1)``; :func:`split_blocks` rewrites each CrossStage / CrossStage3 into an
equivalent stage whose ``conv_exp`` is two convs, so both halves become prunable. Other timm blocks that split
channels in their forward keep those channels whole through the core's split lock.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gcp.core.registry import Adapter, rewrite_modules, split_output_channels


def is_timm_features(model: nn.Module) -> bool:
    """A timm model built with ``features_only=True``: its ``feature_info`` is a ``FeatureInfo`` (plain timm
    classifiers carry a list there). Covers the generic wrappers (FeatureListNet, ...) and the native feature
    classes (EfficientNetFeatures, MobileNetV3Features, ...)."""
    if not type(model).__module__.startswith("timm."):
        return False
    from timm.models._features import FeatureInfo

    return isinstance(getattr(model, "feature_info", None), FeatureInfo)


def run_network(model: nn.Module, images: Any) -> Any:
    """The backbone's forward: a list (or dict) of feature maps, largest first."""
    return model(images)


class SplitCrossStage(nn.Module):
    """timm CrossStage with ``conv_exp`` as two convs: ``conv_exp_s(x), conv_exp_b(x)`` equal its split."""

    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        half = stage.expand_chs // 2
        self.expand_chs = stage.expand_chs
        self.conv_down = stage.conv_down
        self.conv_exp_s, self.conv_exp_b = split_output_channels(stage.conv_exp, [half, half])
        self.blocks = stage.blocks
        self.conv_transition_b = stage.conv_transition_b
        self.conv_transition = stage.conv_transition

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_down(x)
        xs, xb = self.conv_exp_s(x), self.conv_exp_b(x)
        xb = self.conv_transition_b(self.blocks(xb)).contiguous()
        return self.conv_transition(torch.cat([xs, xb], dim=1))


class SplitCrossStage3(nn.Module):
    """timm CrossStage3 with ``conv_exp`` as two convs: ``conv_exp_1(x), conv_exp_2(x)`` equal its split."""

    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        half = stage.expand_chs // 2
        self.expand_chs = stage.expand_chs
        self.conv_down = stage.conv_down
        self.conv_exp_1, self.conv_exp_2 = split_output_channels(stage.conv_exp, [half, half])
        self.blocks = stage.blocks
        self.conv_transition = stage.conv_transition

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_down(x)
        x1, x2 = self.conv_exp_1(x), self.conv_exp_2(x)
        return self.conv_transition(torch.cat([self.blocks(x1), x2], dim=1))


def _rewrite_for(stage: nn.Module) -> type[nn.Module] | None:
    if not hasattr(stage, "expand_chs") or not hasattr(stage, "conv_exp"):
        return None
    from timm.models.cspnet import CrossStage, CrossStage3

    splits_evenly = stage.expand_chs % 2 == 0
    if type(stage).forward is CrossStage.forward and splits_evenly:
        return SplitCrossStage
    if type(stage).forward is CrossStage3.forward and splits_evenly:
        return SplitCrossStage3
    return None


def split_blocks(model: nn.Module) -> int:
    """Replace every CrossStage / CrossStage3 by its split-``conv_exp`` equivalent; returns how many."""
    return rewrite_modules(model, _rewrite_for)


ADAPTER = Adapter(
    name="timm",
    matches=is_timm_features,
    run=run_network,
    heads=None,
    prepare=split_blocks,
)
