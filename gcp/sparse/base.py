"""What every sparse-training mechanism shares (paper §4.1): the BatchNorm γ it acts on, its statistics and
history, its resumable state, and the dynamic rate schedule of §4.1 for the mechanisms that have a rate.

The paper's penalty s·Σ|γ| contributes the subgradient s·sign(γ) to every γ. Network Slimming keeps s constant,
which trades accuracy for sparsity (Table 9: 71.2 vs 79.8 mAP). The paper's dynamic schedule keeps s for every
channel until ``switch_at`` of the epochs (half of 200 in §5.2, 40 % in the §6.1 ablation) and then lets the
``protect`` fraction of channels with the largest |γ| (30 %) decay to ``decay`` × s (1 %), so important channels
recover while the rest keep being driven to zero (:class:`RateSchedule`).

Every mechanism leaves a γ that does not train (``requires_grad=False``, e.g. a layer frozen by Ultralytics'
``freeze=``) alone: the user froze it to keep it as it is, and a penalty it cannot answer with its data gradient
would only destroy it. Such layers are not penalised, ranked, scored or chosen; they are checked at every step,
since trainers freeze layers after the hook is built.

An average of the weights (an EMA) has no exact zeros where the trained weights have them, so a stage-1 model
saved from one hands pruning dense γ. :meth:`SparseTraining.save_history` therefore records the γ the model
holds when it is called, after training (the weights the trainer returned and saved), and warns when they lost
the exact zeros the training reached.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gcp.io import atomic_write_json
from gcp.vocab import DEFAULT_S
from grouping import Group, prunable_norms

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
SPARSE_BELOW = 1e-2
# The paper's schedule (§4.1, §5.2): switch at half the run, then the 30 % largest |γ| decay to 1 % of s.
SWITCH_AT = 0.5
PROTECT = 0.3
DECAY = 0.01


class TooFewStepsError(ValueError):
    """The run is too short for the mechanism's schedule; raised at the first step, before any update, so the
    pipeline can name the config keys that set the run's length."""


def select_norms(model: nn.Module, layers: Iterable[str] | None) -> dict[str, nn.Module]:
    """The affine BatchNorm layers to act on: all of them, or the named ``layers``; §4.1 penalises γ, so a model
    without BatchNorm cannot be sparse-trained."""
    norms = prunable_norms(model)
    if layers is not None:
        wanted = list(layers)
        unknown = [n for n in wanted if n not in norms]
        if unknown:
            raise ValueError(f"layers {unknown[:5]} are not affine BatchNorm layers of the model")
        norms = {n: norms[n] for n in wanted}
    if not norms:
        raise ValueError("the model has no affine BatchNorm layer: sparse training on γ needs BatchNorm")
    return norms


def empty_state() -> dict[str, Any]:
    """Every mechanism's resumable state, empty: the one-class hook wrote all of it whatever the mechanism, so
    each mechanism still writes every key (its checkpoints resume in that hook, and its checkpoints here)."""
    return {
        "momentum": {},
        "mean_square": "{}",
        "updates": 0,
        "scores": {},
        "scored": 0,
        "selected": {},
        "start": {},
    }


class SparseTraining:
    """A ``gcp.detection.train.fit`` hook that sparse-trains BatchNorm γ (paper §4.1); one subclass per mechanism.

    Call :meth:`step` (the hook's ``after_backward``) between backward and the optimiser step. ``layers``
    restricts it to these BatchNorm names (default: every affine BatchNorm). ``groups`` (e.g. from
    :func:`grouping.partition`) only changes how :meth:`stats` reports; the schedules rank channels across the
    whole model, as §4.1 describes ("30 % of the channels"). ``switch_at`` is the share of the run at which the
    mechanism's schedule turns (:class:`RateSchedule`; for ``selective`` the end of its ramp).
    """

    mechanism: str
    s: float

    def __init__(
        self,
        model: nn.Module,
        switch_at: float = SWITCH_AT,
        layers: Iterable[str] | None = None,
        groups: Sequence[Group] | None = None,
    ) -> None:
        if not 0.0 <= switch_at <= 1.0:
            raise ValueError(f"switch_at must be in [0, 1], got {switch_at}")
        self.norms = select_norms(model, layers)
        self.switch_at = switch_at
        self.groups = list(groups) if groups is not None else [Group("all", list(self.norms), 0, "all")]
        self.history: list[dict[str, Any]] = []
        self._progress: tuple[int, int] | None = None  # (step, total_steps) from on_step

    def trained(self) -> dict[str, nn.Module]:
        """The penalised BatchNorm layers whose γ trains now (``requires_grad``): the only ones the hook acts on
        (module docstring: frozen γ are left alone)."""
        return {n: m for n, m in self.norms.items() if m.weight.requires_grad}

    def step(self, epoch: int, total_epochs: int) -> None:
        """Apply one step of the mechanism to every penalised γ."""
        raise NotImplementedError

    def after_backward(self, epoch: int, total_epochs: int) -> None:
        """The trainer's name for :meth:`step` (called after backward, before the optimiser step)."""
        self.step(epoch, total_epochs)

    def on_lr(self, scale: float) -> None:
        """The trainer's lr of this step over its base lr; only ``layer_relative`` has a γ lr that follows it."""

    def on_step(self, step: int, total_steps: int) -> None:
        """The trainer's 0-based step over the whole run; ``selective`` times its scoring and ramp with it."""
        if total_steps < 1 or not 0 <= step < total_steps:
            raise ValueError(f"on_step needs 0 <= step < total_steps, got {step} of {total_steps}")
        self._check_run_length(total_steps)
        self._progress = (int(step), int(total_steps))

    def _check_run_length(self, total_steps: int) -> None:
        """Raise :class:`TooFewStepsError` when the mechanism's schedule does not fit into ``total_steps``."""

    def stats(self) -> dict[str, dict[str, float]]:
        """Per-group |γ| quantiles, the fraction of channels with |γ| < 1e-2 and the fraction with γ exactly 0
        (what the proximal and selective updates produce, and what an average of the weights loses)."""
        result = {}
        for group in self.groups:
            layers = [n for n in group.layers if n in self.norms]
            if not layers:
                continue
            g = torch.cat([self.norms[n].weight.detach().abs().flatten().float().cpu() for n in layers])
            q = torch.quantile(g, torch.tensor(QUANTILES))
            entry = {f"q{int(p * 100):02d}": float(v) for p, v in zip(QUANTILES, q)}
            entry["sparse_fraction"] = float((g < SPARSE_BELOW).float().mean())
            entry["zero_fraction"] = float((g == 0).float().mean())
            entry["channels"] = int(g.numel())
            result[group.name] = entry
        return result

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any] | None = None) -> None:
        """Record :meth:`stats` (and, for the |γ| plots, a 64-bin histogram of log10|γ|) for this epoch."""
        gammas = torch.cat([m.weight.detach().abs().flatten().float().cpu() for m in self.norms.values()])
        hist = torch.histc(torch.log10(gammas.clamp_min(1e-6)), bins=64, min=-6.0, max=1.0)
        entry: dict[str, Any] = {"epoch": epoch, "groups": self.stats(), "log10_hist": hist.tolist()}
        if metrics:
            entry["metrics"] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self.history.append(entry)

    def state_dict(self) -> dict[str, Any]:
        """History plus the mechanism's state (:func:`empty_state`'s keys), so ``fit(resume=True)`` continues
        exactly."""
        return {"history": json.dumps(self.history), **empty_state(), **self._mechanism_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`'s output, also one written by the one-class hook before the split."""
        self.history = json.loads(state["history"])
        self._load_mechanism_state(state)

    def _mechanism_state(self) -> dict[str, Any]:
        """The mechanism's own entries of :meth:`state_dict` (none here)."""
        return {}

    def _load_mechanism_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`_mechanism_state` wrote; a missing key reads as empty."""

    def save_history(self, path: str | Path) -> Path:
        """Write the per-epoch history as JSON (atomically), for ``gcp plot sparsity``, with ``final``: the
        :meth:`stats` of the γ the model holds now. Called after training, these are the weights the trainer
        returned and saved (with ``gcp.detection.train.fit(ema=True)`` the EMA's, not those the epochs' entries
        measured), so ``final`` describes the model pruning will get; a warning says when they hold fewer exact
        zeros than the last epoch's entry (module docstring: an EMA averages them away)."""
        final = self.stats()
        if self.history:
            reached = _zero_fraction(self.history[-1]["groups"])
            kept = _zero_fraction(final)
            if kept < reached:
                warnings.warn(
                    f"the model's γ hold {kept:.1%} exact zeros where sparse training reached {reached:.1%}: its "
                    "weights are an average (EMA) of the trained ones, so pruning will find dense γ; train stage 1 "
                    "without EMA (fit(ema=False), sparsity.ema: false)",
                    stacklevel=2,
                )
        record = {"s": self.s, "switch_at": self.switch_at, "mechanism": self.mechanism}
        return atomic_write_json(path, {**record, "history": self.history, "final": final})


class RateSchedule(SparseTraining):
    """The dynamic schedule of §4.1 for the mechanisms with an L1 rate ``s`` (``eq3``, ``layer_relative``).

    Every trained channel gets s until ``switch_at`` of the epochs; from then on the ``protect`` share of
    channels with the largest |γ| model-wide, re-ranked every epoch, gets ``decay`` × s. ``switch_at=1.0`` is
    Network Slimming's constant rate. ``s=None`` takes the mechanism's default (:data:`gcp.vocab.DEFAULT_S`).
    """

    def __init__(
        self,
        model: nn.Module,
        s: float | None = None,
        switch_at: float = SWITCH_AT,
        protect: float = PROTECT,
        decay: float = DECAY,
        layers: Iterable[str] | None = None,
        groups: Sequence[Group] | None = None,
    ) -> None:
        s = DEFAULT_S[self.mechanism] if s is None else s
        if s < 0:
            raise ValueError(f"sparsity rate s must be >= 0, got {s}")
        if not 0.0 <= protect <= 1.0:
            raise ValueError(f"protect must be in [0, 1], got {protect}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        super().__init__(model, switch_at, layers, groups)
        self.s = s
        self.protect = protect
        self.decay = decay
        self._protected_epoch: int | None = None
        self._protected: dict[str, torch.Tensor] = {}

    def switched(self, epoch: int, total_epochs: int) -> bool:
        """True once ``epoch`` (0-based) has reached ``switch_at`` of the run."""
        return self.switch_at < 1.0 and epoch >= self.switch_at * total_epochs

    def _rank_protected(self) -> dict[str, torch.Tensor]:
        """Boolean masks of exactly the ``protect`` fraction of the trained channels with the largest |γ|,
        model-wide (§4.1: "30 % of the channels").

        Ties at the cut-off are broken by position (a stable sort), so a model whose γ are all equal still
        protects exactly k channels, not all of them.
        """
        gammas = {n: m.weight.detach().abs().flatten().float().cpu() for n, m in self.trained().items()}
        flat = torch.cat(list(gammas.values()))
        k = int(round(self.protect * flat.numel()))
        chosen = torch.zeros(flat.numel(), dtype=torch.bool)
        if k:
            order = torch.sort(flat, descending=True, stable=True).indices
            chosen[order[:k]] = True
        masks, start = {}, 0
        for name, g in gammas.items():
            masks[name] = chosen[start : start + g.numel()]
            start += g.numel()
        return masks

    def rates(self, epoch: int, total_epochs: int) -> dict[str, torch.Tensor]:
        """Per-channel sparsity rate of every trained layer (:meth:`trained`) at ``epoch``: s, or s·decay for
        protected channels."""
        trained = self.trained()
        if not self.switched(epoch, total_epochs):
            return {n: torch.full((m.num_features,), self.s) for n, m in trained.items()}
        if self._protected_epoch != epoch:  # re-rank once per epoch
            self._protected = self._rank_protected()
            self._protected_epoch = epoch
        low = self.s * self.decay
        return {n: torch.where(self._protected[n], low, self.s) for n in trained}


def _zero_fraction(groups: Mapping[str, Mapping[str, float]]) -> float:
    """The share of exact zeros over all groups of a :meth:`SparseTraining.stats` result (0 for an entry written
    before the share was recorded)."""
    channels = sum(stats["channels"] for stats in groups.values())
    zeros = sum(stats.get("zero_fraction", 0.0) * stats["channels"] for stats in groups.values())
    return zeros / max(channels, 1)
