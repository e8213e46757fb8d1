"""Dynamic sparse training: an L1 penalty on BatchNorm γ whose rate changes during training (paper §4.1, eq. 3).

:func:`DynamicSparsity` is the one entry point; it checks that every argument applies to the chosen mechanism
and builds that mechanism's hook:

* ``"layer_relative"`` (default, :mod:`gcp.sparse.layer_relative`): §4.1's schedule applied by the hook
  itself, with a layer-normalised proximal step on γ, so that it works under AdamW;
* ``"eq3"`` (:mod:`gcp.sparse.eq3`): the paper's literal subgradient (eq. 3) added to γ.grad, for SGD;
* ``"selective"`` (:mod:`gcp.sparse.selective`): the schedule's end point, with the channels chosen by their
  Taylor importance and ramped to exactly zero.

What the three share (γ selection, stats, history, state, the §4.1 rate schedule) is in :mod:`gcp.sparse.base`;
``docs/design.md``, "Sparse training", has the measurements behind each.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gcp.sparse.base import (
    DECAY,
    PROTECT,
    QUANTILES,
    SPARSE_BELOW,
    SWITCH_AT,
    SparseTraining,
    TooFewStepsError,
)
from gcp.sparse.eq3 import Eq3Sparsity
from gcp.sparse.layer_relative import BETAS, GAMMA_LR, LayerRelativeSparsity
from gcp.sparse.selective import MAX_LAYER_SHARE, SelectiveSparsity
from gcp.vocab import DEFAULT_PUSH_FLOOR, DEFAULT_SCORE_SHARE, DEFAULT_TARGET, SPARSITY_MECHANISMS
from grouping import Group

__all__ = [
    "BETAS",
    "MAX_LAYER_SHARE",
    "MECHANISMS",
    "QUANTILES",
    "SPARSE_BELOW",
    "DynamicSparsity",
    "TooFewStepsError",
]

MECHANISMS: dict[str, type[SparseTraining]] = {
    "layer_relative": LayerRelativeSparsity,
    "eq3": Eq3Sparsity,
    "selective": SelectiveSparsity,
}
# What a mechanism-specific argument is, for the refusal of one that does not apply.
OPTIONS = {
    "s": "rate s",
    "protect": "protected share protect",
    "decay": "protected-rate factor decay",
    "lr": "γ learning rate lr",
    "follow_schedule": "γ lr schedule follow_schedule",
    "push_floor": "push floor push_floor",
    "target": "target share target",
    "score_share": "scoring share score_share",
    "max_layer_share": "per-layer cap max_layer_share",
    "costs": "channel costs costs",
}


def DynamicSparsity(
    model: nn.Module,
    s: float | None = None,
    switch_at: float = SWITCH_AT,
    protect: float = PROTECT,
    decay: float = DECAY,
    layers: Iterable[str] | None = None,
    groups: Sequence[Group] | None = None,
    mechanism: str = "layer_relative",
    lr: float = GAMMA_LR,
    follow_schedule: bool = False,
    push_floor: float = DEFAULT_PUSH_FLOOR,
    target: float = DEFAULT_TARGET,
    score_share: float = DEFAULT_SCORE_SHARE,
    max_layer_share: float = MAX_LAYER_SHARE,
    costs: Mapping[str, torch.Tensor] | None = None,
) -> SparseTraining:
    """Sparse training of BatchNorm γ with the paper's dynamic schedule (§4.1); a ``gcp.detection.train.fit``
    hook (call its ``step``, alias ``after_backward``, between backward and the optimiser step).

    ``mechanism`` picks the hook (module docstring); each takes ``switch_at``, ``layers`` and ``groups``
    (:class:`gcp.sparse.base.SparseTraining`), and only its own parameters:

    * ``eq3``: ``s`` (``None``: the paper's 7.5e-4), ``protect``, ``decay`` (:class:`Eq3Sparsity`);
    * ``layer_relative``: those and ``lr``, ``follow_schedule``, ``push_floor`` (:class:`LayerRelativeSparsity`);
    * ``selective``: ``target``, ``score_share``, ``max_layer_share``, ``costs`` (:class:`SelectiveSparsity`).

    An argument of another mechanism is refused unless it is left at its default: a value the hook would
    silently ignore is a configuration mistake. ``switch_at=1.0`` gives constant-rate Network Slimming.
    """
    if mechanism not in SPARSITY_MECHANISMS:
        raise ValueError(f"unknown sparsity mechanism {mechanism!r}; choose from {SPARSITY_MECHANISMS}")
    options = {
        "s": s,
        "protect": protect,
        "decay": decay,
        "lr": lr,
        "follow_schedule": follow_schedule,
        "push_floor": push_floor,
        "target": target,
        "score_share": score_share,
        "max_layer_share": max_layer_share,
        "costs": costs,
    }
    hook = MECHANISMS[mechanism]
    accepted = inspect.signature(hook).parameters
    _refuse_inapplicable(mechanism, {name: v for name, v in options.items() if name not in accepted})
    own = {name: v for name, v in options.items() if name in accepted}
    return hook(model, switch_at=switch_at, layers=layers, groups=groups, **own)


def _refuse_inapplicable(mechanism: str, unused: dict[str, Any]) -> None:
    """Raise for the first of ``unused`` (arguments the mechanism does not take) not at its default, naming it
    and the mechanisms it belongs to."""
    defaults = inspect.signature(DynamicSparsity).parameters
    for name, value in unused.items():
        default = defaults[name].default
        if value is not None if default is None else value != default:
            owners = [m for m, hook in MECHANISMS.items() if name in inspect.signature(hook).parameters]
            hint = " (target and switch_at set what goes and when)" if mechanism == "selective" else ""
            shown = "{...}" if isinstance(value, Mapping) else repr(value)
            raise ValueError(
                f"mechanism={mechanism!r} has no {OPTIONS[name]}{hint}: {name}={shown} applies only to "
                f"{' and '.join(owners)}; leave it at its default {default!r}"
            )
