"""Stages 1 and 3 of the method on an Ultralytics detector, through Ultralytics' own trainer (see
:func:`gcp.app.ultralytics.trainer.train`, the entry point; this module imports ultralytics, that one does not).

Ultralytics' ``DetectionTrainer`` rebuilds the network from its YAML before training (``get_model``), which
silently trains a fresh unpruned model. :class:`PrunedDetectionTrainer` trains the module it is given instead,
and plugs the ``gcp.detection.train.fit`` hook protocol (``docs/design.md``, "Trainer hooks") into Ultralytics' step:

* ``loss_terms(images, targets, outputs)``, e.g. the group spatial attention distiller of paper §4.3, through
  the model's ``criterion`` (:class:`LossTermsCriterion`): Ultralytics' detection loss is L_hard, the hooks'
  terms are added to it (eq. 4) and logged as loss items;
* ``after_backward(epoch, total_epochs)``, e.g. :class:`gcp.DynamicSparsity` (§4.1), in the trainer's
  ``optimizer_step``, plugged for that one step into the optimiser the trainer holds then (Ultralytics builds
  a new one when it halves the batch after running out of memory, which a hook registered once would miss):
  after backward, after the gradients were unscaled and clipped, before the update; preceded by
  ``on_lr(scale)`` (γ's lr over its base lr, as ``gcp.detection.train.fit`` passes it) and ``on_step(step,
  total_steps)``, counted in real optimiser steps against the number the run's schedule takes (the
  ``selective`` mechanism's clock, :meth:`PrunedDetectionTrainer._step_position`);
* ``on_epoch_end(epoch, metrics)`` at the end of every training epoch; ``state_dict`` / ``load_state_dict``
  in ``weights/gcp_hooks.pt`` next to ``last.pt``, so a resumed run continues the hooks' state too.

A run with ``after_backward`` hooks is theirs (:attr:`PrunedDetectionTrainer.edits_weights`): the EMA
Ultralytics validates and saves is set to the trained weights at every epoch end, after the hooks' epoch end,
since an average of the weights has none of the exact zeros sparse training set; its checkpoints then hold the
weights the hooks' history describes, and :func:`train` returns ``last.pt``, the end of the schedule.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torchvision.ops import box_convert
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.nn.tasks import DetectionModel, load_checkpoint

from distill import GroupAttentionDistiller
from distill.taps import tap_layers
from gcp.adapters.ultralytics import (
    SplitC2f,
    SplitC2PSA,
    detect_head,
    is_ultralytics_detector,
    soft_outputs,
    split_blocks,
)
from gcp.core.prune import PruneResult
from gcp.io import atomic_torch_save, atomic_write_json
from grouping import prunable_norms

if TYPE_CHECKING:
    from ultralytics import YOLO

# The hooks' states, in the run's weights folder beside last.pt (named so that Ultralytics' search for the
# latest last*.pt to resume never finds it), and the distiller's per-epoch term values and gradient norms.
HOOK_STATES = "gcp_hooks.pt"
DISTILL_LOG = "distill_terms.json"
# The pruning record a module carries through Ultralytics' pickled checkpoints (PruneResult's history, input
# shape, adapter and report), so gcp's weights-only format can be written after any later run, resumed or not.
PRUNING_RECORD = "gcp_pruning"
# Arguments train() sets itself, and Ultralytics' own distillation, which would wrap the model in another.
_OWN_ARGUMENTS = ("task", "mode", "distill_model")
_HOOK_TABLES = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
# The hook methods called at every optimiser step (module docstring).
_STEP_METHODS = ("on_lr", "on_step", "after_backward")


def batch_targets(batch: Mapping[str, Any]) -> list[dict[str, torch.Tensor]]:
    """Ultralytics' batch labels as gcp targets (``docs/design.md``, "Targets"): per image, ``boxes`` xyxy in
    pixels of the (augmented, letterboxed) training image and ``labels``.

    Ultralytics keeps one flat list of normalised xywh boxes with a ``batch_idx`` per box; the distiller's box
    term (eq. 12) selects its candidate priors by IoU against these boxes in input pixels.
    """
    images = batch["img"]
    height, width = images.shape[-2:]
    scale = images.new_tensor([width, height, width, height], dtype=torch.float32)
    boxes = box_convert(batch["bboxes"].to(images.device).float().reshape(-1, 4) * scale, "cxcywh", "xyxy")
    index = batch["batch_idx"].to(images.device).long().view(-1)
    labels = batch["cls"].to(images.device).long().view(-1)
    return [{"boxes": boxes[index == i], "labels": labels[index == i]} for i in range(images.shape[0])]


class LossTermsCriterion:
    """Ultralytics' detection loss (L_hard) plus the ``loss_terms`` of gcp hooks (L_AT + L_soft, eq. 4).

    Installed as the student's ``criterion``, the place where Ultralytics computes the training loss from the
    model's outputs and the batch, so the student's forward (which fills the distiller's attention taps) is
    Ultralytics' own. Returns the loss vector with one entry per term (the trainer sums it) and the detached
    terms as loss items, so each term appears in the progress bar and in ``results.csv`` as ``train/<term>``.
    The hooks' terms follow Ultralytics' convention of a sum over the batch's images (per-image means times the
    batch size), which is also the distiller's default ``batch_reduction="sum"``.
    """

    def __init__(self, hard: Any, hooks: Sequence[Any] = ()) -> None:
        self.hard = hard
        self.hooks = list(hooks)
        self.term_names: tuple[str, ...] = ()
        self._batch: Mapping[str, Any] | None = None

    def __call__(self, preds: Any, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, items = self.hard(preds, batch)
        targets = batch_targets(batch)
        self._batch = batch
        try:
            extra: dict[str, torch.Tensor] = {}
            for hook in self.hooks:
                for name, value in hook.loss_terms(batch["img"], targets, preds).items():
                    if name in items or name in extra:
                        raise ValueError(
                            f"hook {type(hook).__name__} returned loss term {name!r}, already in use"
                        )
                    extra[name] = value
        finally:
            self._batch = None
        self.term_names = tuple(extra)
        if not extra:
            return loss, items
        values = torch.stack([value.to(loss.dtype).reshape(()) for value in extra.values()])
        return torch.cat([loss.reshape(-1), values]), {**items, **{n: v.detach() for n, v in extra.items()}}

    def hard_total(self, outputs: Any, _targets: Any) -> torch.Tensor:
        """L_hard of the batch being processed, for the distiller's gradient-norm log (:class:`distill.TermLog`)."""
        if self._batch is None:
            raise RuntimeError("hard_total is only defined while the criterion processes a batch")
        return self.hard(outputs, self._batch)[0].sum()

    def update(self) -> None:
        """Ultralytics calls this once per epoch; end-to-end heads' losses use it for their schedule."""
        if hasattr(self.hard, "update"):
            self.hard.update()


@functools.cache
def optimizer_steps(batches: int, warmup: int, accumulate: int) -> int:
    """How many optimiser steps Ultralytics' trainer takes in the first ``batches`` batches of a run.

    It steps when ``accumulate`` batches have passed since its last step; during the first ``warmup`` batches
    that count ramps from 1 to ``accumulate`` (interpolated and rounded as Ultralytics does), so the steps of an
    epoch are not ``batches / accumulate`` until the warm-up is over.
    """
    ramp = min(warmup + 1, batches) if warmup else 0
    counts = np.maximum(1, np.interp(np.arange(ramp), [0, warmup], [1, accumulate]).round())
    steps, last = 0, -1
    for batch, count in enumerate(counts):
        if batch - last >= count:
            steps, last = steps + 1, batch
    return steps + (batches - 1 - last) // accumulate


def _finite_gradients(parameters: Iterable[nn.Parameter]) -> bool:
    """Whether every gradient is finite, with one device sync and with what every torch gcp allows has
    (``torch.nn.utils.get_total_norm`` needs torch 2.6)."""
    checks = [torch.isfinite(p.grad).all() for p in parameters if p.grad is not None]
    return not checks or bool(torch.stack(checks).all())


class PrunedDetectionTrainer(DetectionTrainer):
    """Ultralytics' detection trainer on a given module, as it is, with gcp hooks (see the module docstring).

    ``module`` is trained in place: ``get_model`` never rebuilds it from YAML, and on resume it receives the
    checkpoint's weights (same architecture, or a ValueError). The EMA and the checkpoints Ultralytics pickles
    are copies of this module, so the pruned architecture is what ``YOLO(last.pt)`` loads; with hooks that edit
    the weights the EMA is the trained weights themselves (module docstring).
    """

    _ema: Any = None

    def __init__(
        self,
        module: nn.Module,
        *,
        overrides: dict[str, Any],
        hooks: Sequence[Any] = (),
        teacher: nn.Module | None = None,
        distill_options: Mapping[str, Any] | None = None,
        callbacks: dict[str, list] | None = None,
    ) -> None:
        super().__init__(overrides=overrides, _callbacks=callbacks)
        classes, expected = detect_head(module)[1].nc, self.data["nc"]
        if classes != expected:
            raise ValueError(
                f"the model predicts {classes} classes but {self.args.data} has {expected}; build it with "
                f"nc={expected} (e.g. DetectionModel(cfg, nc={expected})) before training and pruning"
            )
        self.module = module
        self.gcp_hooks = list(hooks)
        self.teacher = teacher
        self.distill_options = dict(distill_options or {})
        self.distiller: Any = None
        self.criterion: LossTermsCriterion | None = None
        self._gammas = {id(norm.weight) for norm in prunable_norms(module).values()}
        self._nominal_accumulate = 1  # set by _build_train_pipeline
        self._steps_taken: int | None = None  # optimiser steps of the run so far (_step_position)
        # Ultralytics builds the loss lazily from the model's args; one left from an earlier run would keep that
        # run's hyperparameters (and device)
        module.criterion = None
        if not self.resume:
            self.model = module  # setup_model keeps a module as it is
        self.add_callback("on_pretrain_routine_end", lambda _trainer: self._attach())
        self.add_callback("on_train_epoch_end", lambda _trainer: self._end_epoch())
        # first, so the hooks' state is on disk with the checkpoint before any other callback can fail
        self.callbacks["on_model_save"].insert(0, lambda _trainer: self._save_hook_states())

    @property
    def edits_weights(self) -> bool:
        """Whether a hook acts on the weights at every step (``after_backward``, e.g. sparse training): the run's
        result is then the trained weights, not an average of them (module docstring)."""
        return any(hasattr(hook, "after_backward") for hook in self.gcp_hooks)

    @property
    def ema(self) -> Any:
        """Ultralytics' EMA of the module: what is validated and pickled into the checkpoints."""
        return self._ema

    @ema.setter
    def ema(self, value: Any) -> None:
        # After a NaN loss Ultralytics reloads last.pt and rebuilds the EMA from the training module; a copy made
        # while the attention taps and the distillation criterion are attached would pickle their closures (which
        # fails) and the teacher into every later checkpoint.
        if value is not None:
            for module in value.ema.modules():
                for table in _HOOK_TABLES:
                    getattr(module, table).clear()
            if hasattr(value.ema, "criterion"):
                value.ema.criterion = None
        self._ema = value

    def get_model(self, cfg: Any = None, weights: nn.Module | None = None, verbose: bool = True) -> nn.Module:
        """The given module; on resume ``weights`` is the checkpoint's model, whose weights it receives."""
        if weights is not None:
            load_same_architecture(self.module, weights.float().state_dict(), str(self.args.resume))
        return self.module

    def label_loss_items(self, loss_items: Any = None, prefix: str = "train") -> Any:
        """Ultralytics' labelled loss items, without the hooks' terms for validation (the validator computes only
        the detection loss, which would leave them at 0)."""
        labelled = super().label_loss_items(loss_items, prefix)
        if prefix != "val" or self.criterion is None:
            return labelled
        hidden = {f"val/{name}" for name in self.criterion.term_names}
        if isinstance(labelled, dict):
            return {key: value for key, value in labelled.items() if key not in hidden}
        return [key for key in labelled if key not in hidden]

    def _all_hooks(self) -> list[Any]:
        return self.gcp_hooks + ([self.distiller] if self.distiller is not None else [])

    def _attach(self) -> None:
        """After Ultralytics' setup (model on its device, optimiser, EMA, resumed state): plug the hooks in."""
        loss_hooks = [hook for hook in self.gcp_hooks if hasattr(hook, "loss_terms")]
        if loss_hooks or self.teacher is not None:
            hard = self.module.criterion or self.module.init_criterion()  # resume may have set it
            self.criterion = LossTermsCriterion(hard, loss_hooks)
            if self.teacher is not None:
                self.distiller = self._distiller(self.criterion)
                self.criterion.hooks.append(self.distiller)
            self.module.criterion = self.criterion
        if self.resume:
            self._load_hook_states()

    def _distiller(self, criterion: LossTermsCriterion) -> Any:
        """Group spatial attention distillation (paper §4.3) from ``teacher``: taps at the backbone's strides
        (:func:`distill.taps.tap_layers`), L_soft on the Detect head's class logits and DFL-decoded boxes
        (:func:`gcp.adapters.ultralytics.soft_outputs`), Ultralytics' loss as L_hard."""
        parameter = next(self.teacher.parameters())
        example = torch.zeros(1, 3, self.args.imgsz, self.args.imgsz, device=parameter.device)
        options = {
            "taps": tap_layers(self.teacher, example, "ultralytics"),
            "output_adapter": soft_outputs(self.module),
            "hard_loss": criterion.hard_total,
            **self.distill_options,
        }
        return GroupAttentionDistiller(self.teacher, self.module, example, **options)

    def _build_train_pipeline(self) -> None:
        """Ultralytics' data loaders for the current batch size (and, in its older versions, a new optimiser), at
        setup and after an out-of-memory halving of the batch; notes the accumulation count it set, which its
        warm-up ramps up to, and restarts the step count from the schedule (:meth:`_step_position`)."""
        super()._build_train_pipeline()
        self._nominal_accumulate = int(self.accumulate)
        self._steps_taken = None

    def optimizer_step(self) -> None:
        """Ultralytics' step (AMP unscaling, gradient clipping, the update, its EMA) with the gcp hooks'
        :data:`_STEP_METHODS` run as a pre-hook of the optimiser the trainer holds now, removed after the step."""
        if not any(hasattr(hook, method) for hook in self.gcp_hooks for method in _STEP_METHODS):
            super().optimizer_step()
            return
        handle = self.optimizer.register_step_pre_hook(
            functools.partial(self._before_update, self._step_position())
        )
        try:
            super().optimizer_step()
        finally:
            handle.remove()

    def _before_update(self, position: tuple[int, int], *_step_arguments: Any) -> None:
        """The hooks' step, in the optimiser's step pre-hook: the gradients are unscaled (AMP) and clipped.

        A scaler that found inf/NaN gradients skips the update; fused optimisers still enter ``step`` then, so
        the hooks are skipped too rather than acting on non-finite gradients.
        """
        if self.scaler.is_enabled() and not _finite_gradients(self.module.parameters()):
            return
        scale = self._lr_scale()
        for hook in self.gcp_hooks:
            if hasattr(hook, "on_lr"):
                hook.on_lr(scale)
            if hasattr(hook, "on_step"):
                hook.on_step(*position)
            if hasattr(hook, "after_backward"):
                hook.after_backward(self.epoch, self.epochs)

    def _lr_scale(self) -> float:
        """γ's lr at this step over its base lr, what ``gcp.detection.train.fit`` passes to ``on_lr``: the ratio of the
        optimiser group holding the BatchNorm weights, which Ultralytics' warm-up ramps up from 0 and its lr
        schedule then lowers (the bias group's warm-up comes down from ``warmup_bias_lr`` instead)."""
        group = next(
            g for g in self.optimizer.param_groups if any(id(p) in self._gammas for p in g["params"])
        )
        return group["lr"] / group["initial_lr"]

    def _step_position(self) -> tuple[int, int]:
        """This optimiser step's index over the run and the number of steps the run's schedule takes, as
        ``gcp.detection.train.fit`` passes them to ``on_step``; counts the step.

        Steps are counted as they are taken: Ultralytics steps once per ``accumulate`` batches, a count its
        warm-up ramps up from 1, so an epoch's steps are not fixed. The count starts from the schedule's count
        before the epoch training (re)starts in (0 for a new run), the total is the schedule's
        (:func:`optimizer_steps`). A resumed run restarts Ultralytics' accumulation and may take a step more
        than the schedule counts: the position stays at the last step then.
        """
        batches = len(self.train_loader)
        warmup = self._get_warmup_iterations(batches)
        if self._steps_taken is None:
            self._steps_taken = optimizer_steps(batches * self.epoch, warmup, self._nominal_accumulate)
        total = optimizer_steps(batches * self.epochs, warmup, self._nominal_accumulate)
        step = min(self._steps_taken, total - 1)
        self._steps_taken += 1
        return step, total

    def _end_epoch(self) -> None:
        metrics = {**(self.label_loss_items(self.tloss) if self.tloss else {}), **self.lr}
        for hook in self._all_hooks():
            if hasattr(hook, "on_epoch_end"):
                hook.on_epoch_end(self.epoch, dict(metrics))
        # what Ultralytics validates and saves next: the trained weights, which the hooks just recorded
        if self.edits_weights:
            self.ema.ema.load_state_dict(self.module.state_dict())

    def _save_hook_states(self) -> None:
        hooks = self._all_hooks()
        if not any(hasattr(hook, "state_dict") for hook in hooks):
            return
        states = [hook.state_dict() if hasattr(hook, "state_dict") else None for hook in hooks]
        atomic_torch_save({"epoch": self.epoch, "hooks": states}, self.wdir / HOOK_STATES)
        if self.distiller is not None:
            atomic_write_json(self.save_dir / DISTILL_LOG, self.distiller.log.history)

    def _load_hook_states(self) -> None:
        hooks = self._all_hooks()
        if not any(hasattr(hook, "state_dict") for hook in hooks):
            return
        path = self.wdir / HOOK_STATES
        if not path.is_file():
            raise FileNotFoundError(f"resuming with hooks, but {path} (their saved state) does not exist")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["epoch"] != self.start_epoch - 1 or len(saved["hooks"]) != len(hooks):
            raise ValueError(
                f"{path} holds {len(saved['hooks'])} hook states of epoch {saved['epoch'] + 1}, but the run resumes "
                f"after epoch {self.start_epoch} with {len(hooks)} hooks (the same hooks, and teacher, are needed)"
            )
        for hook, state in zip(hooks, saved["hooks"]):
            if state is not None:
                hook.load_state_dict(state)

    def detach(self) -> None:
        """Remove everything :meth:`_attach` plugged into the module."""
        if self.distiller is not None:
            self.distiller.close()
        self.module.criterion = None  # it holds the teacher, and this run's hyperparameters


def load_same_architecture(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``module``, refusing (ValueError) weights of another (e.g. unpruned) architecture."""
    expected = module.state_dict()
    mismatched = [k for k in state if k not in expected or expected[k].shape != state[k].shape]
    missing = [k for k in expected if k not in state]
    if mismatched or missing:
        raise ValueError(
            f"{source} holds another architecture than the model (mismatched: {mismatched[:3]}, missing: "
            f"{missing[:3]}); resume with the model it was trained from, e.g. YOLO('{source}')"
        )
    module.load_state_dict(state)


def unwrap(model: Any) -> tuple[nn.Module, Any]:
    """(the DetectionModel, the ``YOLO`` object or None) of a ``YOLO``, a ``PruneResult`` or a DetectionModel."""
    if is_ultralytics_detector(model):
        return model, None
    inner = getattr(model, "model", None)  # a YOLO object (itself an nn.Module) or a PruneResult
    if isinstance(inner, nn.Module) and is_ultralytics_detector(inner):
        return inner, None if isinstance(model, PruneResult) else model
    raise TypeError(
        f"expected a YOLO object, an Ultralytics DetectionModel or a PruneResult of one, got {type(model).__name__}"
    )


def train(
    model: YOLO | nn.Module | PruneResult,
    data: str | Path,
    *,
    epochs: int,
    hooks: Sequence[Any] = (),
    teacher: YOLO | nn.Module | None = None,
    distill_options: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> Path:
    """Train an Ultralytics detector as it is (pruned or not) with Ultralytics' trainer; returns the checkpoint.

    ``YOLO.train`` rebuilds the network from its YAML, so a pruned model would silently be replaced by a fresh
    unpruned one; here the given module itself is trained (in place), and the checkpoints Ultralytics writes
    pickle it, so ``ultralytics.YOLO(path)`` loads the pruned architecture for ``val``, ``predict`` and
    ``export`` (with gcp importable: pruned C2f blocks are :class:`SplitC2f`).

    Args:
        model: a ``YOLO`` object (its callbacks are used), a ``DetectionModel``, or the ``PruneResult`` of
            ``gcp.prune_detector``, whose pruning record the module then carries through every later
            checkpoint. Its number of classes must match ``data``.
        data: the ``data.yaml`` of a YOLO-format dataset.
        epochs: training epochs.
        hooks: ``gcp.detection.train.fit`` hooks (``docs/design.md``, "Trainer hooks"), built on this module:
            ``after_backward(epoch, total_epochs)`` runs after backward, after AMP's unscaling and Ultralytics'
            gradient clipping, before the update of whichever optimiser the trainer holds at that step
            (``gcp.DynamicSparsity``, paper §4.1, stage 1), preceded by ``on_lr(scale)`` and ``on_step(step,
            total_steps)`` as ``gcp.detection.train.fit`` calls them (γ's lr over its base lr; real optimiser steps
            through the warm-up's growing gradient accumulation); ``loss_terms(images, targets, outputs)`` adds
            terms to Ultralytics' loss; ``on_epoch_end(epoch, metrics)``; ``state_dict`` / ``load_state_dict``
            are saved beside ``last.pt`` for resuming.
        teacher: the unpruned model (``YOLO`` or ``DetectionModel``) for group spatial attention distillation
            (paper §4.3, stage 3): L_AT at the backbone's strides 2-32, L_soft on the Detect head's class
            logits and DFL-decoded boxes, Ultralytics' detection loss as L_hard; each term is logged as
            ``train/<term>`` in ``results.csv`` and with its gradient norm in ``distill_terms.json``.
        distill_options: keyword arguments of ``distill.GroupAttentionDistiller`` (``betas``,
            ``temperature``, ``soft_weight``, ``taps``, ...).
        **overrides: Ultralytics' own train arguments (``imgsz``, ``batch``, ``lr0``, ``device``, ``val``,
            ``plots``, ``project``, ``name``, ...), passed through unchanged. ``resume=True`` continues the run
            of a ``YOLO`` loaded from its ``last.pt`` (``resume='path/to/last.pt'`` for any module of that
            architecture); hooks and teacher must be given again, and their state is restored. One device only.

    Returns the final checkpoint, whose weights the module ends with. With hooks that edit the weights
    (``after_backward``, e.g. sparse training) it is ``last.pt``, the end of the schedule: ``best.pt`` is the
    epoch of the best validation mAP, usually one from before the sparsity took hold. Its weights are then the
    trained ones and the hooks' history describes them: Ultralytics' EMA, which it validates and saves and
    which would average away the exact zeros the hook set, is set to the trained weights at every epoch end.
    Without such hooks it is ``best.pt`` (else ``last.pt``). Beside it ``gcp_last.pt`` (or ``gcp_best.pt``)
    holds the same weights in gcp's weights-only format, which
    ``gcp.load_pruned(path, base=DetectionModel(cfg, nc=nc))`` rebuilds without unpickling code: written for a
    model pruned by ``prune_detector`` (passed as its ``PruneResult``, then or in an earlier run) and for an
    unpruned one (empty history); not for a model pruned by other means, whose history is unknown.
    """
    module, yolo = unwrap(model)
    taken = [key for key in _OWN_ARGUMENTS if key in overrides]
    if taken:
        raise ValueError(f"{taken} are set by train() (pass teacher= to distil)")
    if "," in str(overrides.get("device", "")):
        raise ValueError(
            "multi-GPU training is not supported: Ultralytics' DDP restarts training in new processes from a "
            "YAML or checkpoint path, which would lose the given (pruned) module; pass one device"
        )
    teacher_module = unwrap(teacher)[0] if teacher is not None else None
    if isinstance(model, PruneResult):
        carry_pruning_record(model)
    resume = overrides.pop("resume", False)
    source = getattr(yolo, "ckpt_path", None) or module.yaml.get("yaml_file")
    if resume is True:
        if not source or not str(source).endswith(".pt"):
            raise ValueError(
                "resume=True needs a YOLO object loaded from last.pt; pass resume='path/to/last.pt'"
            )
        resume = source
    args = {**overrides, "data": str(data), "epochs": epochs, "task": "detect", "mode": "train"}
    args |= {"model": str(resume or source or "model"), "resume": str(resume) if resume else False}
    trainer = PrunedDetectionTrainer(
        module,
        overrides=args,
        hooks=hooks,
        teacher=teacher_module,
        distill_options=distill_options,
        callbacks=getattr(yolo, "callbacks", None),
    )
    try:
        trainer.train()
    finally:
        trainer.detach()
    final = trainer.best if trainer.best.exists() and not trainer.edits_weights else trainer.last
    trained, _ = load_checkpoint(final)
    load_same_architecture(module, trained.state_dict(), str(final))
    module.eval()
    _write_weights_only(module, final, trainer.args.imgsz)
    return final


def carry_pruning_record(result: PruneResult) -> nn.Module:
    """Leave ``result``'s pruning record on its module (:data:`PRUNING_RECORD`), which every checkpoint
    Ultralytics pickles of the module then carries, so that gcp's weights-only format can be written after any
    later training run, resumed or not. Returns the module."""
    record = {
        "report": result.report,
        "history": result.history,
        "input_shape": result.input_shape,
        "adapter": result.adapter,
    }
    setattr(result.model, PRUNING_RECORD, record)
    return result.model


def _write_weights_only(module: nn.Module, final: Path, imgsz: int) -> Path | None:
    """gcp's weights-only format (``gcp.load_pruned``) beside ``final`` as ``gcp_<name>.pt``.

    A module pruned by ``prune_detector`` carries its pruning record (:data:`PRUNING_RECORD`); an unpruned one
    (stage 1) is written with an empty history. A module pruned by other means has no replayable history, so
    only Ultralytics' checkpoint exists for it (a warning says so).
    """
    record = getattr(module, PRUNING_RECORD, None) or _unpruned_record(module, imgsz)
    if record is None:
        warnings.warn(
            f"{type(module).__name__} differs from its YAML but carries no pruning record: gcp's weights-only "
            "format is not written (pass the PruneResult of gcp.prune_detector to train())",
            stacklevel=4,  # the caller of gcp.app.ultralytics.trainer.train
        )
        return None
    return PruneResult(model=module, **record).save(final.with_name(f"gcp_{final.name}"))


def _unpruned_record(module: nn.Module, imgsz: int) -> dict[str, Any] | None:
    """An empty pruning record when ``module`` has the architecture its YAML builds (after the adapter's
    split rewrite, when it was applied), else None."""
    rewritten = any(isinstance(m, (SplitC2f, SplitC2PSA)) for m in module.modules())
    fresh = DetectionModel(
        copy.deepcopy(module.yaml),
        ch=module.yaml.get("channels", 3),
        nc=detect_head(module)[1].nc,
        verbose=False,
    )
    if rewritten:
        split_blocks(fresh)
    shapes = {k: v.shape for k, v in module.state_dict().items()}
    if shapes != {k: v.shape for k, v in fresh.state_dict().items()}:
        return None
    return {
        "report": {},
        "history": [],
        "input_shape": [1, 3, imgsz, imgsz],
        "adapter": "ultralytics" if rewritten else None,
    }
