"""Group spatial attention distillation (paper §4.3): forward-hook taps, the L_AT and L_soft losses, and a
distiller that runs standalone or as a ``gcp.detection.train.fit`` hook."""

from distill.distiller import (
    BALANCED_BETAS,
    BALANCED_SOFT_WEIGHT,
    PAPER_BETAS,
    GroupAttentionDistiller,
    TermLog,
    resolve_betas,
    yolo_output_adapter,
)
from distill.losses import (
    attention_terms,
    candidate_priors,
    soft_box_loss,
    soft_class_loss,
    spatial_attention,
)
from distill.taps import PAPER_TAP_STRIDES, AttentionTaps, auto_tap_layers, tap_strides

__all__ = [
    "BALANCED_BETAS",
    "BALANCED_SOFT_WEIGHT",
    "PAPER_BETAS",
    "TermLog",
    "PAPER_TAP_STRIDES",
    "AttentionTaps",
    "GroupAttentionDistiller",
    "attention_terms",
    "auto_tap_layers",
    "candidate_priors",
    "resolve_betas",
    "soft_box_loss",
    "soft_class_loss",
    "spatial_attention",
    "tap_strides",
    "yolo_output_adapter",
]
