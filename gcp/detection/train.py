"""The training loop shared by every stage of the method: plain training, dynamic sparse training (paper §4.1,
eq. 3, through an ``after_backward`` hook) and fine-tuning with spatial attention distillation (§4.3, through
a ``loss_terms`` hook).

The schedule follows the paper's setup (§5.2): a linear warm-up, then cosine annealing of the learning rate
down to 1 % of its initial value. Every epoch ends with an atomic checkpoint that holds everything the next
epoch depends on (weights, optimiser, step counter, EMA, hook states, history and every random generator), so
that a run killed at any point and resumed with ``resume=True`` reproduces the uninterrupted run bit for bit
on CPU. The same :func:`fit` runs unchanged under ``torchrun --nproc_per_node N``.

Checkpoint layout (``last.pt`` / ``best.pt``, loadable with ``torch.load(..., weights_only=True)``):
``format``, ``epoch`` (last completed, 0-based), ``epochs``, ``step`` (optimiser steps taken), ``world_size``,
``settings`` (the fit arguments in ``RESUME_SETTINGS``, which a resume must repeat), ``model`` (state_dict of the trained weights), ``ema`` (``{"module": state_dict, "updates": int}`` or None),
``optimizer``, ``hooks`` (one ``state_dict()`` or None per hook), ``history``, ``best_map50`` and ``rng`` (one
entry per rank).
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import itertools
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from gcp.detection.data.common import batch_to, collate
from gcp.detection.loss import YoloLoss
from gcp.io import ModelFileError, atomic_torch_save, atomic_write_json, read_torch_dict
from gcp.vocab import LOSS_REDUCTIONS, OPTIMIZERS

LOGGER = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "gcp.train/1"
# Paper §5.2: "the learning rate is updated by cosine annealing"; like the YOLOv4/YOLOv5 code bases the paper
# builds on, the cosine ends at 1 % of the initial learning rate.
FINAL_LR_RATIO = 0.01
# Momentum (SGD) or beta1 (AdamW) at the first warm-up step, rising linearly to the configured value: a low
# momentum keeps the first, noisy gradients of a fresh or freshly pruned network from dominating.
WARMUP_START_MOMENTUM = 0.8
EMA_DECAY = 0.9999
# Updates over which the EMA decay ramps up from 0 to EMA_DECAY, so early averages are not dominated by the
# initial weights.
EMA_RAMP_UPDATES = 2000
LossFn = Callable[[list[torch.Tensor], list[dict[str, Any]]], Mapping[str, torch.Tensor]]
# The fit settings that decide the trained weights; a checkpoint records them and a resume must ask for the same
# (out_dir, progress, num_workers and eval_every change where and how often things are written, not the weights).
RESUME_SETTINGS = (
    "epochs",
    "lr",
    "optimizer",
    "batch_size",
    "momentum",
    "weight_decay",
    "warmup_epochs",
    "ema",
    "seed",
    "sync_bn",
    "max_steps_per_epoch",
    "bf16",
    "loss_reduction",
    "channels_last",
)


def warmup_cosine_lr(
    step: int, *, base_lr: float, warmup_steps: int, total_steps: int, final_ratio: float = FINAL_LR_RATIO
) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up, then cosine annealing (paper §5.2).

    During the first ``warmup_steps`` steps the rate rises linearly, ``base_lr * (step + 1) / warmup_steps``,
    so the last warm-up step uses ``base_lr``. The remaining steps follow half a cosine from ``base_lr`` at
    the first step after warm-up to ``base_lr * final_ratio`` at the last step of training.
    """
    if not 0 <= step < total_steps:
        raise ValueError(f"step must lie in [0, total_steps={total_steps}), got {step}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be non-negative, got {warmup_steps}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    annealing_span = total_steps - warmup_steps - 1
    progress = (step - warmup_steps) / annealing_span if annealing_span > 0 else 0.0
    final_lr = base_lr * final_ratio
    return final_lr + (base_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_momentum(
    step: int, *, momentum: float, warmup_steps: int, start: float = WARMUP_START_MOMENTUM
) -> float:
    """Momentum (SGD) or beta1 (AdamW) of optimiser step ``step``: linear from ``start`` to ``momentum``
    during warm-up, reaching ``momentum`` on the last warm-up step, then constant.
    """
    if step >= warmup_steps:
        return momentum
    return start + (momentum - start) * (step + 1) / warmup_steps


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split the trainable parameters into decayed weights and undecayed normalisation parameters and biases.

    Weight decay on the BatchNorm γ would add an L2 pull to the very coefficients the sparsity term (paper
    eq. 3) and the pruning thresholds (§4.2) act on, and decaying biases only shifts activations; as in the
    YOLO code bases the paper trains with, only convolution/linear weights are decayed.
    """
    norm_types = (_NormBase, nn.GroupNorm, nn.LayerNorm)
    decayed: list[nn.Parameter] = []
    undecayed: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if isinstance(module, norm_types) or name == "bias":
                undecayed.append(param)
            else:
                decayed.append(param)
    if not seen:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": undecayed, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def build_optimizer(
    model: nn.Module, name: str, *, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum or AdamW (``momentum`` is its beta1) over :func:`parameter_groups`."""
    groups = parameter_groups(model, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")


def _copy_without_hooks(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` of ``model`` minus the forward/backward hooks registered on its modules.

    Hooks that other objects attach to the training model (the distiller's attention taps) are closures over
    those objects; a plain deepcopy would keep them, and every forward of the copy would write into the
    distiller's state. Mapping each hook table to a fresh empty one in deepcopy's memo leaves the original
    untouched and copies nothing the hooks refer to.
    """
    hook_tables = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
    memo: dict[int, Any] = {}
    for module in model.modules():
        for table_name in hook_tables:
            table = getattr(module, table_name, None)
            if table:
                memo[id(table)] = type(table)()
    return copy.deepcopy(model, memo)


class ModelEMA:
    """Exponential moving average of a model's floating-point parameters and buffers.

    The average is what gets evaluated and saved: it smooths the last epochs' noise, which matters most for
    the short fine-tuning runs after pruning. The decay ramps up as ``decay * (1 - exp(-updates / ramp))`` so
    the randomly initialised (or freshly pruned) starting weights are forgotten quickly. Integer buffers
    (BatchNorm's ``num_batches_tracked``) are copied rather than averaged.
    """

    def __init__(
        self, model: nn.Module, decay: float = EMA_DECAY, ramp_updates: int = EMA_RAMP_UPDATES
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.module = _copy_without_hooks(model).eval().requires_grad_(False)
        self.decay = decay
        self.ramp_updates = ramp_updates
        self.updates = 0

    def current_decay(self) -> float:
        """Decay applied by the most recent update."""
        return self.decay * (1.0 - math.exp(-self.updates / self.ramp_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights (call after each optimiser step)."""
        self.updates += 1
        weight_of_new = 1.0 - self.current_decay()
        averaged = self.module.state_dict()
        for name, value in model.state_dict().items():
            if averaged[name].dtype.is_floating_point:
                averaged[name].lerp_(value.detach(), weight_of_new)
            else:
                averaged[name].copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint written by :func:`fit` onto the CPU, safely (``weights_only=True``). A file that cannot
    be one (cut short by a kill, not PyTorch's, another format) raises the one-line ModelFileError every model
    file raises, which the command line shows as it is instead of a traceback."""
    path = Path(path)
    checkpoint = read_torch_dict(path, "training checkpoint")
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ModelFileError(f"{path}: not a gcp training checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    return checkpoint


@dataclass(frozen=True)
class _Distributed:
    """Where this process sits in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device: torch.device) -> tuple[_Distributed, torch.device]:
    """Join the process group torchrun describes (WORLD_SIZE > 1), or use one that is already initialised.

    Each CUDA process drives the GPU named by LOCAL_RANK; CPU processes talk through gloo. A group this
    creates stays open for the later ``fit`` calls of the process (sparse training, then fine-tuning, then
    distillation) and is destroyed at exit: re-initialising after a destroy reuses torchrun's rendezvous store,
    where a rank can read its peer's address from the closed group and fail with "Connection refused"
    (seen in about a third of launches on this machine).
    """
    requested_world = int(os.environ.get("WORLD_SIZE", "1"))
    already_initialised = dist.is_available() and dist.is_initialized()
    if not already_initialised and requested_world <= 1:
        return _Distributed(), device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not already_initialised:
        if not dist.is_available():
            raise RuntimeError(f"WORLD_SIZE={requested_world} but this torch build has no torch.distributed")
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        atexit.register(_destroy_process_group_if_open)
    return _Distributed(dist.get_rank(), dist.get_world_size()), device


def _destroy_process_group_if_open() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _derived_seed(*keys: int) -> int:
    """A well-mixed 32-bit seed from several integers (run seed, rank, epoch), so no two streams collide."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint32)[0])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _capture_rng() -> dict[str, Any]:
    """Every global random generator's state as tensors and plain containers (loadable with weights_only)."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    python_version, python_internal, python_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": python_version, "internal": list(python_internal), "gauss_next": python_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"]))
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _swap_in_sync_batchnorm(model: nn.Module) -> Callable[[], None]:
    """Replace the BatchNorm layers inside ``model`` by SyncBatchNorm; return the function that puts them
    back.

    SyncBatchNorm shares the original layers' parameters and statistics tensors, and both training and
    ``load_state_dict`` update those tensors in place, so the restored layers carry everything learnt.
    Restoring matters because pruning, export and single-process evaluation expect plain BatchNorm.
    """
    originals = {
        name: module for name, module in model.named_modules() if name and isinstance(module, _BatchNorm)
    }
    nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def restore() -> None:
        for name, module in originals.items():
            parent_name, _, child_name = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child_name, module)

    return restore


def _to_device(targets: Sequence[Mapping[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    return [
        {
            key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
            for key, value in t.items()
        }
        for t in targets
    ]


def _scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The entries of an eval_fn result that are single numbers (the ones worth keeping per epoch)."""
    scalars = {}
    for name, value in metrics.items():
        if isinstance(value, (int, float, np.number)) or (torch.is_tensor(value) and value.numel() == 1):
            scalars[name] = float(value)
    return scalars


def _append_history(history: dict[str, list], metrics: Mapping[str, float | int | None]) -> None:
    """Append one epoch; each list stays aligned with ``history['epoch']`` (None where a value is missing)."""
    epochs_so_far = len(history.get("epoch", []))
    for name in metrics:
        history.setdefault(name, [None] * epochs_so_far)
    for name, values in history.items():
        values.append(metrics.get(name))


@dataclass(frozen=True)
class FitSettings:
    """The settings of one :func:`fit` call, checked when made (every problem in one ValueError); see
    :func:`fit` for what each one does. ``fit(..., epochs=3, lr=0.1)`` builds one from its keywords;
    :meth:`from_section` builds one from a config section such as ``gcp.app.config.FitConfig``."""

    epochs: int
    lr: float = 0.01
    optimizer: str = "sgd"
    batch_size: int = 16
    momentum: float = 0.937
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    ema: bool = False
    out_dir: str | os.PathLike | None = None
    resume: bool = False
    seed: int = 0
    num_workers: int = 0
    eval_every: int = 1
    device: str | torch.device = "cpu"
    sync_bn: bool = False
    progress: bool = True
    max_steps_per_epoch: int | None = None
    bf16: bool = False
    loss_reduction: str = "sum"
    channels_last: bool = False

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("fit: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """What is wrong with these settings, one line each (empty when nothing is)."""
        problems = []
        if not isinstance(self.epochs, int) or self.epochs < 1:
            problems.append(f"epochs must be a positive int, got {self.epochs!r}")
        if self.lr <= 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be at least 1, got {self.batch_size}")
        if not 0.0 < self.momentum < 1.0:
            problems.append(f"momentum must lie in (0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be non-negative, got {self.weight_decay}")
        if self.warmup_epochs < 0:
            problems.append(f"warmup_epochs must be non-negative, got {self.warmup_epochs}")
        if self.seed < 0:
            problems.append(f"seed must be non-negative, got {self.seed}")
        if self.eval_every < 1:
            problems.append(f"eval_every must be at least 1, got {self.eval_every}")
        if self.num_workers < 0:
            problems.append(f"num_workers must be non-negative, got {self.num_workers}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            problems.append(f"max_steps_per_epoch must be at least 1 or None, got {self.max_steps_per_epoch}")
        if self.loss_reduction not in LOSS_REDUCTIONS:
            problems.append(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {self.loss_reduction!r}")
        if self.resume and self.out_dir is None:
            problems.append("resume=True needs out_dir (the folder holding last.pt)")
        return problems

    @classmethod
    def from_section(cls, section: Any, **others: Any) -> FitSettings:
        """The settings a config section (a dataclass such as ``gcp.app.config.FitConfig``) holds, taken by
        name (its fields that are no setting, such as a sparsity section's ``schedule``, are left out), plus
        ``others``: the settings the section does not hold (where to write, the seed, the device). A setting in
        both is a TypeError, so that no config value is silently replaced."""
        names = {setting.name for setting in fields(cls)}
        held = {item.name: getattr(section, item.name) for item in fields(section) if item.name in names}
        twice = sorted(held.keys() & others.keys())
        if twice:
            raise TypeError(f"FitSettings.from_section: {twice} given both by the section and as keywords")
        return cls(**held, **others)

    def recorded(self) -> dict[str, Any]:
        """The settings a checkpoint records and a resume must repeat (``RESUME_SETTINGS``)."""
        return {name: getattr(self, name) for name in RESUME_SETTINGS}


def _check_data(train_data: Dataset, val_data: Dataset | None) -> None:
    problems = []
    if len(train_data) == 0:
        problems.append("train_data is empty")
    if val_data is not None and len(val_data) == 0:
        problems.append("val_data is empty")
    if problems:
        raise ValueError("fit: " + "; ".join(problems))


def _check_same_settings(path: Path, recorded: Mapping[str, Any] | None, settings: FitSettings) -> None:
    """Refuse to resume a run with other settings than it was trained with: continuing a 5-epoch run asked for
    2 epochs at another lr would otherwise hand back the old model as if it were the new one. A checkpoint
    written before the settings were recorded resumes with a warning, since nothing can be checked."""
    if recorded is None:
        LOGGER.warning("%s records no fit settings (older gcp); resuming without checking them", path)
        return
    now = settings.recorded()
    changed = [
        f"{name}: checkpoint {recorded.get(name)!r}, now {now[name]!r}"
        for name in RESUME_SETTINGS
        if recorded.get(name) != now[name]
    ]
    if changed:
        raise ValueError(
            f"resume=True but {path} was trained with other settings ({'; '.join(changed)}); resume with the"
            " same settings, or train into a new out_dir"
        )


class _Trainer:
    """State and steps of one :func:`fit` call; see :func:`fit` for the meaning of the arguments."""

    def __init__(
        self,
        model: nn.Module,
        train_data: Dataset,
        val_data: Dataset | None,
        *,
        settings: FitSettings,
        distributed: _Distributed,
        device: torch.device,
        hooks: Sequence[Any],
        loss_fn: LossFn | None,
        eval_fn: Callable[[nn.Module], Mapping[str, Any]] | None,
    ) -> None:
        self.settings = settings
        self.epochs = settings.epochs
        self.hooks = list(hooks)
        self.eval_fn = eval_fn
        self.out_dir = Path(settings.out_dir) if settings.out_dir is not None else None
        self.distributed = distributed
        self.device = device
        if settings.sync_bn and distributed.enabled and device.type == "cpu":
            raise ValueError("sync_bn=True needs CUDA: torch's SyncBatchNorm does not run on CPU tensors")
        _seed_everything(_derived_seed(settings.seed, distributed.rank))
        self._build_model_and_optimizer(model, loss_fn)
        self._build_loaders(train_data, val_data)
        self._plan_steps()

        self.step = 0
        self.start_epoch = 0
        self.history: dict[str, list] = {}
        self.best_map50: float | None = None
        self.train_model: nn.Module = self.module
        # DDP averages the ranks' gradients. A loss summed over this rank's B images, times the world size N,
        # makes that average the gradient of the sum over all N·B images: one process's step on them.
        summed = settings.loss_reduction == "sum"
        self.loss_scale = self.distributed.world_size if summed else 1

    # ------------------------------------------------------------------------------------------ set-up steps

    def _build_model_and_optimizer(self, model: nn.Module, loss_fn: LossFn | None) -> None:
        settings = self.settings
        self.module = model.to(self.device)
        self.loss_fn = loss_fn if loss_fn is not None else _default_loss(self.module)
        self.ema = ModelEMA(self.module) if settings.ema else None
        self.optimizer = build_optimizer(
            self.module,
            settings.optimizer,
            lr=settings.lr,
            momentum=settings.momentum,
            weight_decay=settings.weight_decay,
        )

    def _build_loaders(self, train_data: Dataset, val_data: Dataset | None) -> None:
        self.train_loader, self.train_sampler, self.train_generator = self._loader(train_data, shuffle=True)
        self.val_loader, self.val_generator = None, None
        if val_data is not None:
            self.val_loader, _, self.val_generator = self._loader(val_data, shuffle=False)

    def _plan_steps(self) -> None:
        """Steps per epoch (capped by max_steps_per_epoch), in all, and of warm-up."""
        limit = self.settings.max_steps_per_epoch
        self.steps_per_epoch = len(self.train_loader) if limit is None else min(len(self.train_loader), limit)
        self.total_steps = self.epochs * self.steps_per_epoch
        self.warmup_steps = round(self.settings.warmup_epochs * self.steps_per_epoch)

    def _loader(
        self, dataset: Dataset, *, shuffle: bool
    ) -> tuple[DataLoader, DistributedSampler, torch.Generator]:
        """A loader over this rank's shard. The sampler reshuffles per epoch from (seed, epoch) alone and the
        generator, reseeded before every pass, fixes the worker seeds, so data order and worker-side
        augmentation survive a resume."""
        sampler = DistributedSampler(
            dataset,
            num_replicas=self.distributed.world_size,
            rank=self.distributed.rank,
            shuffle=shuffle,
            seed=self.settings.seed,
        )
        generator = torch.Generator().manual_seed(_derived_seed(self.settings.seed, self.distributed.rank))
        loader = DataLoader(
            dataset,
            batch_size=self.settings.batch_size,
            sampler=sampler,
            num_workers=self.settings.num_workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
            generator=generator,
        )
        return loader, sampler, generator

    # ---------------------------------------------------------------------------------------------- resume

    def resume_from(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"resume=True but there is no checkpoint at {path}")
        checkpoint = load_checkpoint(path)
        self._check_resumable(path, checkpoint)
        self._load_state(checkpoint)

    def _check_resumable(self, path: Path, checkpoint: Mapping[str, Any]) -> None:
        """Refuse a checkpoint this run cannot continue exactly: another world size, other settings, other
        hooks, or no EMA where this run keeps one."""
        if checkpoint["world_size"] != self.distributed.world_size:
            raise ValueError(
                f"{path} was written by {checkpoint['world_size']} process(es); resuming with "
                f"{self.distributed.world_size} would not reproduce its data order and random streams"
            )
        _check_same_settings(path, checkpoint.get("settings"), self.settings)
        if len(checkpoint["hooks"]) != len(self.hooks):
            raise ValueError(
                f"{path} holds states for {len(checkpoint['hooks'])} hooks, fit got {len(self.hooks)}"
            )
        if self.ema is not None and checkpoint["ema"] is None:
            raise ValueError(f"ema=True but {path} was trained without EMA")

    def _load_state(self, checkpoint: Mapping[str, Any]) -> None:
        self.module.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(checkpoint["ema"])
        for hook, state in zip(self.hooks, checkpoint["hooks"]):
            if state is not None:
                hook.load_state_dict(state)
        self.step = checkpoint["step"]
        self.start_epoch = checkpoint["epoch"] + 1
        self.history = checkpoint["history"]
        self.best_map50 = checkpoint["best_map50"]
        _restore_rng(checkpoint["rng"][self.distributed.rank])

    @contextlib.contextmanager
    def wrapped_for_distributed(self) -> Iterator[None]:
        """Train through DistributedDataParallel (and SyncBatchNorm) inside the block; the caller's model
        leaves it with its own BatchNorm layers, whatever happens.
        """
        if not self.distributed.enabled:
            yield
            return
        restore_batchnorm = _swap_in_sync_batchnorm(self.module) if self.settings.sync_bn else None
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.train_model = DistributedDataParallel(self.module, device_ids=device_ids)
        try:
            yield
        finally:
            self.train_model = self.module
            if restore_batchnorm is not None:
                restore_batchnorm()

    # -------------------------------------------------------------------------------------------- training

    def _hooks_with(self, method: str) -> list[Any]:
        return [hook for hook in self.hooks if hasattr(hook, method)]

    def _loss_terms(self, images: torch.Tensor, targets: list[dict], outputs: Any) -> dict[str, torch.Tensor]:
        """loss_fn's terms plus every hook's extra terms, with ``total`` their sum."""
        losses = self.loss_fn(outputs, targets)
        if not isinstance(losses, Mapping) or "total" not in losses:
            raise KeyError("loss_fn must return a dict of loss terms with a 'total' entry")
        terms = dict(losses)
        total = terms["total"]
        for hook in self._hooks_with("loss_terms"):
            for name, value in hook.loss_terms(images, targets, outputs).items():
                if name in terms:
                    raise ValueError(
                        f"hook {type(hook).__name__} returned loss term {name!r}, already in use"
                    )
                terms[name] = value
                total = total + value
        terms["total"] = total
        return terms

    def _apply_schedule(self) -> float:
        """Set this step's learning rate and momentum (beta1 for AdamW) on the optimiser, tell the hooks that
        follow the schedule, and return the learning rate."""
        lr = warmup_cosine_lr(
            self.step, base_lr=self.settings.lr, warmup_steps=self.warmup_steps, total_steps=self.total_steps
        )
        momentum = warmup_momentum(self.step, momentum=self.settings.momentum, warmup_steps=self.warmup_steps)
        for hook in self._hooks_with("on_lr"):  # hooks with an optimiser of their own follow the schedule
            hook.on_lr(lr / self.settings.lr)
        for hook in self._hooks_with("on_step"):  # hooks whose schedule runs in steps, not epochs
            hook.on_step(self.step, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if "betas" in group:
                group["betas"] = (momentum, group["betas"][1])
            else:
                group["momentum"] = momentum
        return lr

    def _forward_and_loss(
        self, images: torch.Tensor, targets: list[dict], epoch: int
    ) -> dict[str, torch.Tensor]:
        """The training forward (bf16 autocast when asked) and its loss terms, scaled for DDP and checked to
        be finite."""
        bf16 = self.settings.bf16
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            outputs = self.train_model(images)
        if bf16:
            outputs = _to_float32(outputs)
        terms = self._loss_terms(images, targets, outputs)
        if self.loss_scale != 1:
            terms = {name: value * self.loss_scale for name, value in terms.items()}
        if not torch.isfinite(terms["total"]):
            values = {name: float(value.detach()) for name, value in terms.items()}
            raise FloatingPointError(f"non-finite loss at epoch {epoch}, step {self.step}: {values}")
        return terms

    def _train_step(
        self, images: torch.Tensor, targets: list[dict], epoch: int
    ) -> tuple[dict[str, float], float]:
        lr = self._apply_schedule()
        self.optimizer.zero_grad(set_to_none=True)
        terms = self._forward_and_loss(images, targets, epoch)
        terms["total"].backward()
        for hook in self._hooks_with("after_backward"):
            hook.after_backward(epoch, self.epochs)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.module)
        self.step += 1
        return {name: float(value.detach()) for name, value in terms.items()}, lr

    def _train_epoch(self, epoch: int) -> tuple[dict[str, float], float]:
        """One pass over this rank's shard; returns each loss term's mean over all ranks, and the last lr."""
        self.train_sampler.set_epoch(epoch)
        self.train_generator.manual_seed(_derived_seed(self.settings.seed, epoch, self.distributed.rank))
        self.train_model.train()
        sums: dict[str, float] = {}
        lr = 0.0
        show_progress = self.settings.progress and self.distributed.is_main
        progress = tqdm(
            itertools.islice(self.train_loader, self.steps_per_epoch),
            total=self.steps_per_epoch,
            desc=f"epoch {epoch + 1}/{self.epochs}",
            disable=not show_progress,
        )
        for done, (images, targets) in enumerate(progress, start=1):
            images = batch_to(images, self.device, channels_last=self.settings.channels_last)
            terms, lr = self._train_step(images, _to_device(targets, self.device), epoch)
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value
            if show_progress:
                running_means = {name: f"{value / done:.4g}" for name, value in sums.items()}
                progress.set_postfix(running_means | {"lr": f"{lr:.3g}"}, refresh=False)
        progress.close()
        return self._global_mean(sums, self.steps_per_epoch), lr

    def _global_mean(self, sums: dict[str, float], count: float) -> dict[str, float]:
        """Average ``sums / count`` over all ranks (keys sorted so every rank reduces the same vector)."""
        names = sorted(sums)
        totals = torch.tensor(
            [sums[name] for name in names] + [count], dtype=torch.float64, device=self.device
        )
        if self.distributed.enabled:
            dist.all_reduce(totals)
        return {name: float(totals[i] / totals[-1]) for i, name in enumerate(names)}

    # ------------------------------------------------------------------------------------- end of an epoch

    def _evaluated_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.module

    def _broadcast_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics), so evaluation, hooks and the checkpoint
        see one model; parameters are already identical after the all-reduced steps.
        """
        if not self.distributed.enabled:
            return
        for module in [self.module] + ([self.ema.module] if self.ema is not None else []):
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)

    @torch.no_grad()
    def _validation_loss(self) -> dict[str, float]:
        model = self._evaluated_model()
        model.eval()
        sums: dict[str, float] = {}
        images_seen = 0
        # The same worker seeds every pass, so the validation loss never depends on how often it ran before.
        self.val_generator.manual_seed(_derived_seed(self.settings.seed, self.distributed.rank))
        for images, targets in self.val_loader:
            outputs = model(batch_to(images, self.device, channels_last=self.settings.channels_last))
            losses = self.loss_fn(outputs, _to_device(targets, self.device))
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + float(value) * len(images)
            images_seen += len(images)
        return self._global_mean(sums, images_seen)

    @torch.no_grad()
    def _evaluate(self) -> dict[str, float]:
        """Run eval_fn on rank 0 (one evaluation is enough) and share its scalar metrics with every rank."""
        metrics = None
        if self.distributed.is_main:
            model = self._evaluated_model()
            model.eval()
            result = self.eval_fn(model)
            if "map50" not in result:
                raise KeyError(f"eval_fn must return a dict with a 'map50' entry, got keys {sorted(result)}")
            metrics = _scalar_metrics(result)
        if self.distributed.enabled:
            shared = [metrics]
            dist.broadcast_object_list(shared, src=0, device=self.device)
            metrics = shared[0]
        return metrics

    def _checkpoint(self, epoch: int, rng_states: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": epoch,
            "epochs": self.epochs,
            "step": self.step,
            "world_size": self.distributed.world_size,
            "settings": self.settings.recorded(),
            "model": self.module.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "hooks": [hook.state_dict() if hasattr(hook, "state_dict") else None for hook in self.hooks],
            "history": self.history,
            "best_map50": self.best_map50,
            "rng": rng_states,
        }

    def _save(self, epoch: int, improved: bool) -> None:
        """Write last.pt (and best.pt when the mAP improved) from rank 0, with every rank's RNG states."""
        rng_states = [_capture_rng()]
        if self.distributed.enabled:
            rng_states = [None] * self.distributed.world_size
            dist.all_gather_object(rng_states, _capture_rng())
        if not self.distributed.is_main:
            return
        checkpoint = self._checkpoint(epoch, rng_states)
        atomic_torch_save(checkpoint, self.out_dir / "last.pt")
        if improved:
            atomic_torch_save(checkpoint, self.out_dir / "best.pt")
        atomic_write_json(self.out_dir / "history.json", self.history)

    def _scheduled_evaluation(self, epoch: int) -> tuple[dict[str, float], bool]:
        """eval_fn's metrics when this epoch is one to evaluate (every eval_every epochs, and the last), and
        whether mAP@0.5 improved on the best so far (which it then becomes)."""
        due = (epoch + 1) % self.settings.eval_every == 0 or epoch == self.epochs - 1
        if self.eval_fn is None or not due:
            return {}, False
        evaluation = self._evaluate()
        improved = self.best_map50 is None or evaluation["map50"] > self.best_map50
        if improved:
            self.best_map50 = evaluation["map50"]
        return evaluation, improved

    def _end_epoch(self, epoch: int, train_means: dict[str, float], lr: float, seconds: float) -> None:
        self._broadcast_buffers()
        metrics: dict[str, float | int] = {"epoch": epoch, "lr": lr, "seconds": seconds}
        metrics |= {f"train/{name}": value for name, value in train_means.items()}
        if self.val_loader is not None:
            metrics |= {f"val/{name}": value for name, value in self._validation_loss().items()}
        evaluation, improved = self._scheduled_evaluation(epoch)
        metrics |= {f"metrics/{name}": value for name, value in evaluation.items()}
        _append_history(self.history, metrics)
        for hook in self._hooks_with("on_epoch_end"):
            hook.on_epoch_end(epoch, dict(metrics))
        if self.out_dir is not None:
            self._save(epoch, improved)
        if self.distributed.is_main:
            LOGGER.info(
                "epoch %d/%d: %s", epoch + 1, self.epochs, {k: round(v, 5) for k, v in metrics.items()}
            )

    def run(self) -> dict[str, list]:
        for epoch in range(self.start_epoch, self.epochs):
            start = time.perf_counter()
            train_means, lr = self._train_epoch(epoch)
            self._end_epoch(epoch, train_means, lr, time.perf_counter() - start)
        if self.ema is not None:
            self.module.load_state_dict(self.ema.module.state_dict())
        return self.history


def _to_float32(value: Any) -> Any:
    """``value`` with every floating tensor inside (nested lists, tuples, dicts) in fp32, for the loss."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, Mapping):
        return {key: _to_float32(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_float32(item) for item in value)
    return value


def _default_loss(model: nn.Module) -> LossFn:
    return YoloLoss(model)


def fit(
    model: nn.Module,
    train_data: Dataset,
    val_data: Dataset | None = None,
    *,
    hooks: Sequence[Any] = (),
    loss_fn: LossFn | None = None,
    eval_fn: Callable[[nn.Module], Mapping[str, Any]] | None = None,
    settings: FitSettings | None = None,
    **options: Any,
) -> dict[str, list]:
    """Train ``model`` in place and return the per-epoch history.

    The settings come as keywords, one per :class:`FitSettings` field (``epochs`` required, the rest with its
    defaults), or whole as ``settings=FitSettings(...)``, which keywords then override; either way they are
    checked before anything runs, every problem in one ValueError.

    Each step: forward, ``loss_fn(outputs, targets)`` (default ``gcp.detection.loss.YoloLoss(model)``) plus every hook's
    ``loss_terms(images, targets, outputs)``, backward, every hook's ``after_backward(epoch, epochs)`` (epoch
    0-based; this is where dynamic sparse training adds its γ subgradient, paper eq. 3, or takes its own γ
    step; before the forward, hooks with ``on_lr(scale)`` get the step's lr / ``lr``), optimiser step, EMA
    update. The learning rate follows :func:`warmup_cosine_lr` per step over ``warmup_epochs`` of warm-up, and
    momentum :func:`warmup_momentum`. After each epoch: optional loss on ``val_data``, ``eval_fn(model)``
    every ``eval_every`` epochs and on the last one (must return ``map50``; run on the EMA weights when
    ``ema=True``), hooks' ``on_epoch_end(epoch, metrics)``, then ``out_dir/last.pt`` (and ``best.pt`` when
    ``map50`` improved) and ``out_dir/history.json``.

    With ``resume=True`` training continues from ``out_dir/last.pt`` with the same optimiser, schedule, EMA,
    hook and random states, so an interrupted run ends exactly where the uninterrupted one would (bit-for-bit
    on CPU, with or without loader workers). ``seed`` fixes data order, augmentation and dropout; the model's
    initial weights are the caller's. With ``ema=True`` the model ends holding the EMA weights (what was
    evaluated and saved).

    Under ``torchrun`` (WORLD_SIZE > 1) each process trains a shard of ``train_data`` with ``batch_size``
    images per step (per process) through DistributedDataParallel, with gloo on CPU and NCCL on the GPU named
    by LOCAL_RANK; hooks run on every rank after the all-reduced backward. ``sync_bn=True`` synchronises
    BatchNorm statistics across GPUs (CUDA only; ignored in a single process), which keeps the statistics the
    γ-based pruning relies on consistent. Rank 0 evaluates and writes the checkpoints.

    ``loss_reduction`` says how ``loss_fn`` and the hooks' terms reduce over a batch's images: ``"sum"`` (the
    default; :class:`gcp.detection.loss.YoloLoss` and the distiller's ``batch_reduction="sum"`` multiply per-image means
    by the batch size) or ``"mean"``. DDP averages gradients over the N processes, which for a sum would make N
    processes on B images each step like one process on N·B images at lr / N; with ``"sum"`` the terms are
    therefore multiplied by N before the backward pass, so N processes on B images take the same step as one
    process on N·B, and the logged train terms are sums over those N·B images too. A mean needs no scaling.

    The history maps ``epoch``, ``lr``, ``seconds`` (the wall time of the epoch's training pass),
    ``train/<term>``, ``val/<term>`` and ``metrics/<name>`` to one value per epoch (None where not measured);
    it is part of the checkpoint, so a resumed run's history still has every epoch's time. ``max_steps_per_epoch`` caps the steps of an epoch (quick
    experiments).

    ``bf16=True`` runs the training forward under bfloat16 autocast (convolutions in bf16, BatchNorm
    statistics, losses and the optimiser in fp32). On CPUs with AMX/AVX512-BF16 this cut a YOLOv4 (width
    0.25) step from 3.5 s to 2.2 s here; on CPUs without them it is slower, so it is off by default.
    Validation loss and evaluation stay in fp32.

    ``channels_last=True`` hands the model its image batches (training and validation) in channels-last memory
    order, which on CPU made an isolated YOLOv4 step a third faster here (10–25 % per epoch in the benchmark) with the same weights
    (:func:`gcp.detection.data.batch_to`); it needs 4-D batches and a model whose code does not assume contiguous
    feature maps (``.view`` on a permuted map fails; ``.reshape`` works).
    """
    settings = replace(settings, **options) if settings is not None else FitSettings(**options)
    _check_data(train_data, val_data)
    distributed, device = _setup_distributed(torch.device(settings.device))
    trainer = _Trainer(
        model,
        train_data,
        val_data,
        settings=settings,
        distributed=distributed,
        device=device,
        hooks=hooks,
        loss_fn=loss_fn,
        eval_fn=eval_fn,
    )
    if settings.resume:
        trainer.resume_from(Path(settings.out_dir) / "last.pt")
    with trainer.wrapped_for_distributed():
        return trainer.run()
