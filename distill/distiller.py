"""Group spatial attention distillation of a pruned student from its unpruned teacher (paper §4.3, Fig. 6).

L_total = L_AT + L_soft + L_hard (eq. 4): the student imitates the teacher's spatial attention at one feature
map per group (eq. 5-7), its class distributions and its boxes near the objects (eq. 8-12), and still fits the
ground truth. Both networks are only observed through forward hooks, so any student works, whatever pruned it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from distill.losses import (
    ATTENTION_DISTANCES,
    AttentionDistance,
    ClassActivation,
    SoftPriors,
    attention_terms,
    candidate_priors,
    soft_box_loss,
    soft_class_loss,
)
from distill.taps import AttentionTaps
from gcp.detection.loss import YoloLoss
from gcp.detection.models.postprocess import decode, split_levels
from gcp.vocab import CLASS_ACTIVATIONS, SOFT_PRIORS

# β_1..β_5 of paper §5.4, one per group, largest feature map first (for distance="mean_squared").
PAPER_BETAS: tuple[float, ...] = (1000.0, 1000.0, 1000.0, 10000.0, 10000.0)
# Defaults for distance="squared", set from measured gradient norms (docs/design.md, "Distillation balance"):
# on the DigitScenes YOLOv4 pruned by 40 % of MACs each tap's term at β = 1 had a gradient norm of 170-265
# and the detection loss 68, so β = 0.07 gives every scale the same weight and L_AT about L_hard's; the
# soft terms (172 + 53 at weight 1) get 0.3 for the same reason.
BALANCED_BETAS: tuple[float, ...] = (0.07, 0.07, 0.07, 0.07, 0.07)
BALANCED_SOFT_WEIGHT = 0.3

# One (class logits (B, k, C), boxes (B, k, 4) xyxy input pixels) pair per detection scale.
ScalePredictions = list[tuple[torch.Tensor, torch.Tensor]]
OutputAdapter = Callable[[Any], ScalePredictions]
BatchReduction = Literal["sum", "mean"]


def yolo_output_adapter(model: nn.Module) -> OutputAdapter:
    """Per-scale class logits and decoded boxes of a :mod:`gcp.detection.models` detector's raw outputs.

    The raw layout is ``[anchor][x, y, w, h, obj, cls...]`` per cell (docs/design.md); the k priors of a scale
    are its A*H*W (anchor, cell) predictions, in the order of :func:`gcp.detection.models.decode`, whose boxes (xyxy,
    input pixels) are split back per scale. Class *logits* are returned, as eq. 10-11 apply their own softmax.
    """
    missing = [name for name in ("anchors", "strides", "num_classes") if not hasattr(model, name)]
    if missing:
        raise ValueError(
            f"{type(model).__name__} has no {missing}: it is not a gcp.detection.models detector, so pass "
            "output_adapter=callable(outputs) -> [(class_logits (B, k, C), boxes_xyxy (B, k, 4)), ...], "
            "one pair per scale"
        )

    def adapt(outputs: Any) -> ScalePredictions:
        levels = split_levels(model, outputs)  # (B, A, H, W, 5 + C) each
        boxes = decode(model, outputs)[..., :4]
        priors_per_scale = [level.shape[1] * level.shape[2] * level.shape[3] for level in levels]
        return [
            (level[..., 5:].flatten(1, 3), scale_boxes)
            for level, scale_boxes in zip(levels, boxes.split(priors_per_scale, dim=1))
        ]

    return adapt


def resolve_betas(betas: Sequence[float], num_taps: int) -> tuple[float, ...]:
    """One β per tap: ``betas`` as given, or its last ``num_taps`` entries when it has more.

    Keeping the *last* ones matches the paper's defaults to the taps that exist when a model lacks the finest
    scale: Darknet53-YOLOv3 in §6.3 is distilled at four scales (strides 4-32), which keeps β = 1000, 1000,
    10^4, 10^4.
    """
    betas = tuple(float(beta) for beta in betas)
    if len(betas) < num_taps:
        raise ValueError(f"got {len(betas)} betas for {num_taps} attention taps; pass one beta per tap")
    if any(beta < 0 for beta in betas):
        raise ValueError(f"betas must be non-negative, got {betas}")
    return betas[len(betas) - num_taps :]


class GroupAttentionDistiller:
    """Distillation losses of a student against a frozen teacher, standalone or as a ``gcp.detection.train.fit`` hook.

    - Standalone: ``distiller(images, targets)`` runs both networks and returns ``{"at", "soft_cls",
      "soft_box", "hard", "total"}`` with ``total = at + soft_cls + soft_box + hard`` (eq. 4). Without
      targets, ``hard`` and ``soft_box`` (whose candidates are chosen against ground-truth boxes, eq. 12) are
      zero tensors.
    - Hook: ``fit(student, ..., hooks=[distiller])``. fit's own forward of the student fills the student taps,
      fit computes the hard loss, and :meth:`loss_terms` adds ``at``, ``soft_cls`` and ``soft_box``.

    Every returned term is already weighted (β per tap inside ``at``, ``soft_weight`` on both soft terms), so
    the total is their plain sum. The teacher is put in eval mode, frozen (``requires_grad=False``), run under
    ``no_grad`` and moved to the images' device when needed; it never receives gradients.

    Args:
        teacher, student: detectors; the student may have fewer channels (any pruning method), but the tapped
            modules must keep their names and their spatial sizes.
        example_inputs: a batch the teacher can be traced with, to find the ``"auto"`` taps.
        taps: ``"auto"`` (one block output per backbone stride of :func:`distill.taps.tap_strides`: 2 to 32,
            4 to 32 for Darknet53-YOLOv3 as in §6.3; see :func:`distill.taps.auto_tap_layers`) or module
            names, largest scale first.
        betas: per-tap weights (:data:`BALANCED_BETAS` by default; :data:`PAPER_BETAS` are §5.4's, meant for
            ``distance="mean_squared"``); with fewer taps the last ``len(taps)`` are used.
        temperature: T of eq. 10-11. The paper gives no value; 1.0 (no softening) is the default because with
            no T^2 factor in eq. 9 a higher T mostly just shrinks the class term.
        soft_weight: weight of L_soft (both terms); the paper uses 1, the default is measured (see betas).
        iou_threshold: teacher boxes with at least this IoU against a ground-truth box are the candidates of
            the box term (eq. 12).
        soft_priors: the priors the class term (eq. 9) reads: ``"all"`` (default), every prior as eq. 9 is
            written, or ``"candidates"``, eq. 12's candidates near the objects (a YOLO has no background class,
            so its class logits away from the objects are untrained). Without targets no candidate can be
            chosen, so with ``"candidates"`` both soft terms are zero, as the box term always is.
        class_activation: ``"softmax"`` (default; eq. 10-11 as written) or ``"sigmoid"``, the detector's own
            per-class sigmoids (Bernoulli KL per class), see :func:`distill.losses.soft_class_loss`. Neither
            alternative beat the paper's form in the demo's 30-step recovery (``docs/notes/distillation.md``,
            "GSA against fine-tuning in short recoveries"); they are there to be measured at other lengths.
        hard_loss: ``hard_loss(outputs, targets)`` returning a tensor or a dict with ``"total"``; default
            ``gcp.detection.loss.YoloLoss(student)``. Only used by the standalone call.
        output_adapter: ``adapter(outputs) -> [(class_logits (B, k, C), boxes_xyxy_pixels (B, k, 4)), ...]``
            per scale, for detectors other than :mod:`gcp.detection.models`; default :func:`yolo_output_adapter`.
        distance: ``"squared"`` (default, equal weight per scale), ``"mean_squared"`` (with the paper's β) or
            ``"norm"`` (see :func:`distill.losses.attention_terms`).
        resize: an interpolation mode (e.g. ``"bilinear"``) to allow student maps of another size.
        batch_reduction: ``"sum"`` (default) multiplies the per-image means by the batch size, the convention
            of ``gcp.detection.loss.YoloLoss`` (a sum over images), so the balance between distillation and hard loss
            does not depend on the batch size; ``"mean"`` keeps per-image means (for a hard loss that
            averages).
        measure_every: every this many steps, measure each term's gradient norm (:class:`TermLog`, kept in
            ``distiller.log.history`` per epoch); 0 never does.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        example_inputs: Any,
        *,
        taps: str | Sequence[str] = "auto",
        betas: Sequence[float] = BALANCED_BETAS,
        temperature: float = 1.0,
        soft_weight: float = BALANCED_SOFT_WEIGHT,
        iou_threshold: float = 0.5,
        soft_priors: SoftPriors = "all",
        class_activation: ClassActivation = "softmax",
        hard_loss: Callable[[Any, Sequence[dict]], Any] | None = None,
        output_adapter: OutputAdapter | None = None,
        distance: AttentionDistance = "squared",
        resize: str | None = None,
        batch_reduction: BatchReduction = "sum",
        measure_every: int = 50,
    ) -> None:
        _check_separate(teacher, student)
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if soft_weight < 0:
            raise ValueError(f"soft_weight must be non-negative, got {soft_weight}")
        if not 0.0 <= iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
        if batch_reduction not in ("sum", "mean"):
            raise ValueError(f"batch_reduction must be 'sum' or 'mean', got {batch_reduction!r}")
        if distance not in ATTENTION_DISTANCES:
            raise ValueError(f"distance must be one of {ATTENTION_DISTANCES}, got {distance!r}")
        if soft_priors not in SOFT_PRIORS:
            raise ValueError(f"soft_priors must be one of {SOFT_PRIORS}, got {soft_priors!r}")
        if class_activation not in CLASS_ACTIVATIONS:
            raise ValueError(f"class_activation must be one of {CLASS_ACTIVATIONS}, got {class_activation!r}")
        if measure_every < 0:
            raise ValueError(f"measure_every must be >= 0 (0: never measure gradients), got {measure_every}")
        self.teacher_adapter = output_adapter or yolo_output_adapter(teacher)
        self.student_adapter = output_adapter or yolo_output_adapter(student)
        self.hard_loss = hard_loss if hard_loss is not None else YoloLoss(student)
        self.temperature = temperature
        self.soft_weight = soft_weight
        self.iou_threshold = iou_threshold
        self.soft_priors = soft_priors
        self.class_activation = class_activation
        self.distance = distance
        self.resize = resize
        self.batch_reduction = batch_reduction
        self.measure_every = measure_every
        self.log = TermLog()
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student
        self.teacher_taps = AttentionTaps(teacher, example_inputs, taps)
        try:
            self.student_taps = AttentionTaps(student, layers=self.teacher_taps.names)
        except BaseException:
            self.teacher_taps.close()
            raise
        try:
            self.betas = resolve_betas(betas, len(self.teacher_taps))
        except BaseException:
            self.close()
            raise

    def __call__(
        self, images: torch.Tensor, targets: Sequence[dict] | None = None
    ) -> dict[str, torch.Tensor]:
        """Run student and teacher on ``images``; the eq. 4 terms and their total."""
        outputs = self.student(images)
        terms = self.loss_terms(images, targets, outputs)
        terms["hard"] = _total(self.hard_loss(outputs, targets)) if targets is not None else _zero(images)
        terms["total"] = terms["at"] + terms["soft_cls"] + terms["soft_box"] + terms["hard"]
        return terms

    def loss_terms(
        self, images: torch.Tensor, targets: Sequence[dict] | None, outputs: Any
    ) -> dict[str, torch.Tensor]:
        """The ``gcp.detection.train.fit`` hook: ``at``, ``soft_cls`` and ``soft_box`` for the student ``outputs`` just
        computed from ``images`` (whose forward also filled the student taps). Runs the teacher on ``images``.

        Both taps are cleared afterwards, so no map outlives its step.
        """
        try:
            teacher_outputs = self._run_teacher(images)
            batch_scale = images.shape[0] if self.batch_reduction == "sum" else 1
            at_per_tap = self._attention_loss(images.shape[0]) * batch_scale
            if self.soft_weight:
                soft_cls, soft_box = self._soft_losses(images, targets, teacher_outputs, outputs)
            else:  # soft_weight 0 (the demo's recovery): eq. 4 without L_soft, not L_soft computed and discarded
                soft_cls = soft_box = _zero(images)
        finally:
            self.teacher_taps.clear()
            self.student_taps.clear()
        terms = {
            "at": at_per_tap.sum(),
            "soft_cls": self.soft_weight * soft_cls * batch_scale,
            "soft_box": self.soft_weight * soft_box * batch_scale,
        }
        parts = {f"at/{name}": value for name, value in zip(self.teacher_taps.names, at_per_tap)}
        parts.update({"soft_cls": terms["soft_cls"], "soft_box": terms["soft_box"]})
        measure = (
            self.measure_every
            and torch.is_grad_enabled()
            and self.log.calls % self.measure_every == 0
            and not _distributed()  # extra backwards would desynchronise DDP's gradient hooks
        )
        if measure and targets is not None:
            parts["hard"] = _total(self.hard_loss(outputs, targets))
        self.log.record(parts, self.student if measure else None)
        return terms

    def _run_teacher(self, images: torch.Tensor) -> Any:
        parameter = next(self.teacher.parameters(), None)
        if parameter is not None and parameter.device != images.device:
            self.teacher.to(images.device)
        self.teacher.eval()
        with torch.no_grad():
            return self.teacher(images)

    def _attention_loss(self, batch_size: int) -> torch.Tensor:
        teacher_maps = self.teacher_taps.maps()
        student_maps = self.student_taps.maps()
        for name in self.teacher_taps.names:
            if name not in student_maps:
                raise RuntimeError(
                    f"student tap {name!r} captured nothing: loss_terms must follow a forward of the student "
                    "on the same images (the student's forward fills its taps)"
                )
            if student_maps[name].shape[0] != batch_size:
                raise RuntimeError(
                    f"student tap {name!r} holds a batch of {student_maps[name].shape[0]} but the images are "
                    f"{batch_size}: the student's last forward was not on these images"
                )
        names = list(self.teacher_taps.names)
        terms = attention_terms(
            [teacher_maps[name] for name in names],
            [student_maps[name] for name in names],
            self.betas,
            distance=self.distance,
            resize=self.resize,
            names=names,
        )
        return terms

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any] | None = None) -> None:
        """Close the epoch's term log: mean value and mean gradient norm of every term (:class:`TermLog`)."""
        self.log.close_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"term_log": json.dumps(self.log.state())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log.load(json.loads(state["term_log"]))

    def _soft_losses(
        self,
        images: torch.Tensor,
        targets: Sequence[dict] | None,
        teacher_outputs: Any,
        student_outputs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        teacher_scales = self.teacher_adapter(teacher_outputs)
        student_scales = self.student_adapter(student_outputs)
        if len(teacher_scales) != len(student_scales):
            raise ValueError(
                f"teacher predicts at {len(teacher_scales)} scales but the student at {len(student_scales)}"
            )
        soft_cls = _zero(images)
        soft_box = _zero(images)
        gt_boxes = None
        if targets is not None:
            gt_boxes = [torch.as_tensor(target["boxes"]).reshape(-1, 4) for target in targets]
        image_size = (images.shape[-2], images.shape[-1])
        for (teacher_cls, teacher_boxes), (student_cls, student_boxes) in zip(teacher_scales, student_scales):
            if self.soft_priors == "all":
                soft_cls = soft_cls + soft_class_loss(
                    teacher_cls, student_cls, self.temperature, activation=self.class_activation
                )
            if gt_boxes is None:
                continue
            candidates = candidate_priors(teacher_boxes, gt_boxes, self.iou_threshold)
            if self.soft_priors == "candidates":
                soft_cls = soft_cls + soft_class_loss(
                    teacher_cls, student_cls, self.temperature, candidates, self.class_activation
                )
            soft_box = soft_box + soft_box_loss(
                teacher_boxes, student_boxes, gt_boxes, image_size, self.iou_threshold, candidates
            )
        return soft_cls, soft_box

    def close(self) -> None:
        """Remove all hooks from teacher and student (the teacher stays frozen)."""
        self.teacher_taps.close()
        self.student_taps.close()

    def __enter__(self) -> GroupAttentionDistiller:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class TermLog:
    """Per-epoch record of each distillation term (every tap's share of L_AT apart) and of its gradient.

    The balance between the five attention scales, L_soft and L_hard (eq. 4) is set by β and soft_weight;
    whether a term actually steers the student is what its gradient norm with respect to the student's
    parameters says, so every ``measure_every``-th step measures that norm for each term separately (one extra
    backward per term; ``docs/design.md`` has the numbers that set the defaults). ``history`` holds one entry
    per epoch: ``{"epoch", "values": {term: mean}, "grad_norms": {term: mean}, "steps", "measured"}``.
    """

    def __init__(self) -> None:
        self.calls = 0
        self.history: list[dict[str, Any]] = []
        self._values: dict[str, float] = {}
        self._norms: dict[str, float] = {}
        self._steps = 0
        self._measured = 0

    def record(self, parts: Mapping[str, torch.Tensor], student: nn.Module | None) -> None:
        self.calls += 1
        self._steps += 1
        for name, value in parts.items():
            if name != "hard":
                self._values[name] = self._values.get(name, 0.0) + float(value.detach())
        if student is None:
            return
        params = [p for p in student.parameters() if p.requires_grad]
        self._measured += 1
        for name, value in parts.items():
            if not value.requires_grad:
                norm = 0.0
            else:
                grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
                norm = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))
            self._norms[name] = self._norms.get(name, 0.0) + norm

    def close_epoch(self, epoch: int) -> None:
        steps, measured = max(self._steps, 1), max(self._measured, 1)
        self.history.append(
            {
                "epoch": epoch,
                "values": {k: v / steps for k, v in self._values.items()},
                "grad_norms": {k: v / measured for k, v in self._norms.items()},
                "steps": self._steps,
                "measured": self._measured,
            }
        )
        self._values, self._norms, self._steps, self._measured = {}, {}, 0, 0

    def state(self) -> dict[str, Any]:
        return {"calls": self.calls, "history": self.history}

    def load(self, state: Mapping[str, Any]) -> None:
        self.calls = int(state["calls"])
        self.history = list(state["history"])


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _check_separate(teacher: nn.Module, student: nn.Module) -> None:
    """Freezing the teacher must not freeze the student: they may not share parameters."""
    if teacher is student:
        raise ValueError(
            "teacher and student are the same module; distil from a separate (e.g. unpruned) copy"
        )
    teacher_parameters = {id(p) for p in teacher.parameters()}
    if any(id(p) in teacher_parameters for p in student.parameters()):
        raise ValueError("teacher and student share parameters; make the student with copy.deepcopy(teacher)")


def _total(loss: Any) -> torch.Tensor:
    """A hard loss given as a tensor or as a dict of terms with ``"total"``."""
    if isinstance(loss, dict):
        if "total" not in loss:
            raise ValueError(f"hard_loss returned a dict without 'total' (keys {sorted(loss)})")
        return loss["total"]
    return loss


def _zero(images: torch.Tensor) -> torch.Tensor:
    return images.new_zeros((), dtype=torch.float32)
