"""Distillation losses of paper §4.3: group spatial attention L_AT (eq. 5-7), soft targets L_soft (eq. 8-12).

All functions are pure: tensors in, a scalar tensor out, gradients flowing to whichever inputs require them
(the student's). They know nothing about hooks or detectors; :mod:`distill.distiller` wires them up.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from gcp.vocab import ATTENTION_DISTANCES, CLASS_ACTIVATIONS

AttentionDistance = Literal["squared", "mean_squared", "norm"]
SoftPriors = Literal["candidates", "all"]
ClassActivation = Literal["sigmoid", "softmax"]


def spatial_attention(feature_map: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Flattened, L2-normalised spatial attention Q = vec(F(A)) / ||vec(F(A))||_2 of a (B, C, H, W) map.

    F(A) = sum_c |A_c|^p over channels (eq. 7, p = 2 in the paper) collapses any channel count to one H x W
    heat map, which is what lets a pruned student with fewer channels imitate its teacher; the normalisation
    (eq. 5) makes the comparison about *where* the network looks, not how large its activations are. Computed
    in float32 so fp16 activations cannot overflow when squared and summed; each map is first divided by its
    own maximum, so the normalisation stays exact (‖Q‖ = 1) however small the activations are (a randomly
    initialised network in eval mode produces maps of 1e-14, below ``F.normalize``'s epsilon).
    """
    if feature_map.dim() != 4:
        raise ValueError(
            f"spatial attention needs a (B, C, H, W) feature map, got shape {tuple(feature_map.shape)}"
        )
    return _unit(feature_map.float().abs().pow(p).sum(dim=1).flatten(1))


def _unit(attention: torch.Tensor) -> torch.Tensor:
    """Rows of ``attention`` (B, N) scaled to unit L2 norm, exactly even for tiny values."""
    peak = attention.detach().amax(dim=1, keepdim=True)
    scaled = attention / torch.where(peak > 0, peak, torch.ones_like(peak))
    return F.normalize(scaled, p=2.0, dim=1)


def _attention_pair(
    teacher_map: torch.Tensor, student_map: torch.Tensor, p: float, resize: str | None, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student attention vectors of one tap, the student's resized to the teacher's if asked."""
    if teacher_map.shape[0] != student_map.shape[0]:
        raise ValueError(
            f"tap {name!r}: teacher and student batch sizes differ "
            f"({teacher_map.shape[0]} vs {student_map.shape[0]})"
        )
    teacher_hw, student_hw = tuple(teacher_map.shape[-2:]), tuple(student_map.shape[-2:])
    if teacher_hw == student_hw:
        return spatial_attention(teacher_map, p), spatial_attention(student_map, p)
    if resize is None:
        raise ValueError(
            f"tap {name!r}: teacher map is {teacher_hw} but student map is {student_hw}; attention maps must "
            "cover the same grid (pass resize='bilinear' to interpolate the student's attention map)"
        )
    student_attention = student_map.float().abs().pow(p).sum(dim=1, keepdim=True)
    corners = {"align_corners": False} if resize in ("linear", "bilinear", "bicubic", "trilinear") else {}
    student_attention = F.interpolate(student_attention, size=teacher_hw, mode=resize, **corners)
    return spatial_attention(teacher_map, p), _unit(student_attention.flatten(1))


def attention_terms(
    teacher_maps: Sequence[torch.Tensor],
    student_maps: Sequence[torch.Tensor],
    betas: Sequence[float],
    *,
    p: float = 2.0,
    distance: AttentionDistance = "squared",
    resize: str | None = None,
    names: Sequence[str] | None = None,
) -> torch.Tensor:
    """The β-weighted attention term of every tap, shape (n_taps,); L_AT (eq. 5) is their sum.

    ``distance`` chooses how far apart the normalised attention vectors Q_T and Q_S are, per sample:

    - ``"squared"`` (default): ||Q_T - Q_S||_2^2, the square of eq. 5's norm. Q_T and Q_S are unit vectors,
      so this lies in [0, 2] whatever the map size: with equal β every scale weighs the same. Measured on the
      DigitScenes YOLOv4 (``docs/design.md``, "Distillation balance"), ``"mean_squared"`` with the paper's β
      left the stride-2 and stride-4 taps about 0.3 % of L_AT, because it divides by H·W.
    - ``"mean_squared"``: ||Q_T - Q_S||_2^2 / (H W), i.e. the *square* of eq. 5's norm averaged over
      the map's positions. This is the convention of the attention-transfer reference code (Zagoruyko &
      Komodakis, 2017, where β = 10^3 is divided by the number of attention-map elements and the batch
      size), which the paper's β = 1000 / 10000 (§5.4) evidently come from: the plain norm of two unit
      vectors reaches √2, so with those β each tap could add over 10^3 to 10^4 to the loss, whereas the mean
      over positions divides it by the map size (169 to 43264 positions at a 416 px input).
    - ``"norm"``: ||Q_T - Q_S||_2 exactly as eq. 5 is written (the AT paper's p = 2 norm of the difference);
      pair it with much smaller β.

    Either way the per-sample distances are averaged over the batch. Channel counts may differ (eq. 7 sums
    them away); spatial sizes must match unless ``resize`` (an ``F.interpolate`` mode such as ``"bilinear"``)
    is given. ``names`` (one per tap) only label error messages.
    """
    if distance not in ATTENTION_DISTANCES:
        raise ValueError(f"distance must be one of {ATTENTION_DISTANCES}, got {distance!r}")
    if not len(teacher_maps) == len(student_maps) == len(betas):
        raise ValueError(
            f"need one teacher map, student map and beta per tap, got {len(teacher_maps)} teacher maps, "
            f"{len(student_maps)} student maps and {len(betas)} betas"
        )
    if not teacher_maps:
        raise ValueError("attention distillation needs at least one tap")
    labels = list(names) if names is not None else [str(index) for index in range(len(betas))]
    terms = []
    for teacher_map, student_map, beta, label in zip(teacher_maps, student_maps, betas, labels):
        teacher_q, student_q = _attention_pair(teacher_map, student_map, p, resize, label)
        squared = (teacher_q - student_q).pow(2).sum(dim=1)
        if distance == "mean_squared":
            per_sample = squared / teacher_q.shape[1]
        elif distance == "norm":
            per_sample = squared.clamp_min(1e-12).sqrt()
        else:
            per_sample = squared
        terms.append(beta * per_sample.mean())
    return torch.stack(terms)


def soft_class_loss(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    temperature: float = 1.0,
    priors: torch.Tensor | None = None,
    activation: ClassActivation = "softmax",
) -> torch.Tensor:
    """Eq. 9-11 for one scale: KL(softmax(P_t / T) || softmax(P_s / T)) over the class logits of the priors.

    ``activation="sigmoid"`` replaces eq. 10-11's softmax by the detector's own per-class sigmoids: the KL of
    every class's Bernoulli pair (sigmoid(P_t / T), sigmoid(P_s / T)), summed over the classes. Why: a YOLO
    scores each class with an independent sigmoid trained by BCE, so the level of a logit is what it predicts;
    a softmax KL is blind to a shift of all of a prior's logits (the student's class loss rose while it
    matched the teacher's ratios over the candidates in the demo's recovery, ``docs/notes/distillation.md``).

    Both inputs are (B, k, C) class logits of the k prior boxes of one scale. Without ``priors`` this is eq. 9
    as written: the sum over all k priors divided by k, averaged over the batch. With ``priors`` (a (B, k) bool
    mask, e.g. :func:`candidate_priors`) it is eq. 9 over the chosen priors: their mean KL per image (0 for an
    image with none), averaged over the batch, so the term keeps eq. 9's scale (in the demo's recovery a sum
    over the candidates was about 40 times the mean, 479 against 12 in the first epoch, and drowned the other
    terms). Why a mask: the paper follows Chen et al. (2017), whose Faster R-CNN has a background class, so
    every prior's class distribution carries knowledge. A YOLO has none: its class logits
    are trained only on positive priors, so at the thousands of background priors the teacher's distribution is
    untrained. (Measured in the demo's 30-step recovery, reading only the candidates did not change the score:
    ``docs/notes/distillation.md``.)

    The paper applies no T^2 factor (Hinton et al. rescale by T^2 to keep gradient sizes comparable across
    temperatures) and neither do we: at the default T = 1 this is the plain KL divergence, and for T > 1 the
    term shrinks roughly as 1 / T^2. The softmax runs over the classes only, as eq. 10-11 say, although YOLO
    itself scores classes with independent sigmoids; a one-class detector therefore gets no class term (a
    softmax over one logit is constant).
    """
    if teacher_logits.shape != student_logits.shape or teacher_logits.dim() != 3:
        raise ValueError(
            "class logits must both be (B, k, C) with equal shapes, got "
            f"{tuple(teacher_logits.shape)} (teacher) and {tuple(student_logits.shape)} (student)"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if priors is not None and tuple(priors.shape) != tuple(teacher_logits.shape[:2]):
        raise ValueError(
            f"priors must be a (B, k) mask matching the logits, got {tuple(priors.shape)} for logits "
            f"{tuple(teacher_logits.shape)}"
        )
    if activation not in CLASS_ACTIVATIONS:
        raise ValueError(f"activation must be one of {CLASS_ACTIVATIONS}, got {activation!r}")
    teacher_scaled, student_scaled = (
        teacher_logits.float() / temperature,
        student_logits.float() / temperature,
    )
    if activation == "sigmoid":
        kl = _bernoulli_kl(teacher_scaled, student_scaled).sum(dim=2)  # (B, k)
    else:
        teacher_log_probs = F.log_softmax(teacher_scaled, dim=-1)  # log M, eq. 10
        student_log_probs = F.log_softmax(student_scaled, dim=-1)  # N, eq. 11
        kl = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(dim=2)  # (B, k)
    if priors is None:
        return kl.sum(dim=1).mean() / teacher_logits.shape[1]
    chosen = priors.to(kl.dtype)
    return ((kl * chosen).sum(dim=1) / chosen.sum(dim=1).clamp_min(1)).mean()


def _bernoulli_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(Bernoulli(sigmoid(t)) || Bernoulli(sigmoid(s))) element-wise, from logits (log-sigmoids stay finite)."""
    p = torch.sigmoid(teacher_logits)
    log_p, log_not_p = F.logsigmoid(teacher_logits), F.logsigmoid(-teacher_logits)
    log_q, log_not_q = F.logsigmoid(student_logits), F.logsigmoid(-student_logits)
    return p * (log_p - log_q) + (1 - p) * (log_not_p - log_not_q)


def candidate_priors(
    teacher_boxes: torch.Tensor, gt_boxes: Sequence[torch.Tensor], iou_threshold: float = 0.5
) -> torch.Tensor:
    """Eq. 12's candidates, a (B, k) bool mask: the priors whose *teacher* box (decoded, xyxy pixels, (B, k, 4))
    overlaps some ground-truth box of its image (one (N_b, 4) tensor per image) with IoU >= ``iou_threshold``."""
    if teacher_boxes.dim() != 3 or teacher_boxes.shape[-1] != 4:
        raise ValueError(f"teacher boxes must be (B, k, 4), got {tuple(teacher_boxes.shape)}")
    if len(gt_boxes) != teacher_boxes.shape[0]:
        raise ValueError(
            f"need ground-truth boxes for each of {teacher_boxes.shape[0]} images, got {len(gt_boxes)}"
        )
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
    mask = torch.zeros(teacher_boxes.shape[:2], dtype=torch.bool, device=teacher_boxes.device)
    for index, (teacher, gt) in enumerate(zip(teacher_boxes, gt_boxes)):
        if gt.numel():
            overlaps = box_iou(teacher.detach().float(), gt.to(teacher.device).float().reshape(-1, 4))
            mask[index] = overlaps.max(dim=1).values >= iou_threshold
    return mask


def soft_box_loss(
    teacher_boxes: torch.Tensor,
    student_boxes: torch.Tensor,
    gt_boxes: Sequence[torch.Tensor],
    image_size: tuple[int, int],
    iou_threshold: float = 0.5,
    candidates: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 12 for one scale: squared L2 distance between teacher and student boxes on the candidate priors
    (:func:`candidate_priors`: the *teacher* box has IoU >= ``iou_threshold`` with some ground-truth box);
    summed over the candidates, averaged over the images. ``candidates`` is that mask when the caller has
    already computed it (the distiller's class term reads the same priors), so it is not computed twice.

    Boxes are decoded, xyxy in input pixels: ``teacher_boxes`` and ``student_boxes`` (B, k, 4), ``gt_boxes``
    one (N_b, 4) tensor per image. Decoded rather than raw outputs because the candidates are chosen by IoU,
    which needs decoded boxes anyway, and because it keeps the adapter contract for other detectors to one
    box format. Coordinates are divided by the input width and height before the difference, so the term
    measures error as a fraction of the image and does not grow with the resolution, as squared pixels would.
    Eq. 12 does not divide by the number of candidates; neither do we, so images with more objects weigh more.
    """
    if teacher_boxes.shape != student_boxes.shape or teacher_boxes.dim() != 3 or teacher_boxes.shape[-1] != 4:
        raise ValueError(
            "boxes must both be (B, k, 4) with equal shapes, got "
            f"{tuple(teacher_boxes.shape)} (teacher) and {tuple(student_boxes.shape)} (student)"
        )
    if candidates is None:
        candidates = candidate_priors(teacher_boxes, gt_boxes, iou_threshold)
    height, width = image_size
    scale = teacher_boxes.new_tensor([width, height, width, height]).float()
    difference = (teacher_boxes.float() - student_boxes.float()) / scale
    return (difference.pow(2).sum(dim=2) * candidates).sum() / teacher_boxes.shape[0]
