"""``mechanism="selective"``: the paper's dynamic schedule (§4.1) taken to its end point, with the channels
chosen by the loss rather than by |γ|.

A penalty on every γ lets a detector's noisy per-channel gradients decide which channels fall, and which go is
then mostly where their |γ| happened to start (``docs/design.md`` measured it); here the first ``score_share``
of the steps only measure each channel's squared first-order Taylor importance (γ·∂L/∂γ)² (Molchanov et al.
2019), averaged over the batches: an estimate of the loss change from zeroing it, in the loss's units, so it
compares across layers. The ``target`` share of all channels with the lowest importance (with ``costs``, e.g.
:func:`gcp.core.prune.channel_costs`: the lowest importance per MAC, until the chosen hold ``target`` of the
MACs), at most ``max_layer_share`` of any layer, is then driven to exactly zero along a linear ramp that ends
at ``switch_at`` of the run, the optimiser's update of those γ withheld; every other channel is never penalised
(the paper's protected channels, with decay 0). The rest of the run trains the network with the chosen channels
at zero, so it has adapted to their loss before stage 2 removes them. This is the growing regularisation of
Wang et al. 2021 (pick the channels first, then raise their penalty until they vanish) with a Taylor criterion;
there is no rate s, no protect, decay or γ lr.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gcp.sparse.base import SWITCH_AT, SparseTraining, TooFewStepsError
from gcp.vocab import DEFAULT_S, DEFAULT_SCORE_SHARE, DEFAULT_TARGET
from grouping import Group

#: The most of one layer's channels that may be chosen (a layer emptied of its channels is a cut network); the
#: target and scoring share are in :mod:`gcp.vocab`.
MAX_LAYER_SHARE = 0.9


class SelectiveSparsity(SparseTraining):
    """Taylor-scored choice, then a ramp of the chosen γ to exactly zero (module docstring).

    Needs the trainer's ``on_step(step, total_steps)`` (``gcp.detection.train.fit`` and the Ultralytics adapter
    call it): ``target`` share of the channels, chosen after ``score_share`` of the steps, reach zero at
    ``switch_at`` of them.
    """

    mechanism = "selective"
    s = DEFAULT_S["selective"]  # no rate: recorded in the history file as the one-class hook recorded it

    def __init__(
        self,
        model: nn.Module,
        switch_at: float = SWITCH_AT,
        layers: Iterable[str] | None = None,
        groups: Sequence[Group] | None = None,
        target: float = DEFAULT_TARGET,
        score_share: float = DEFAULT_SCORE_SHARE,
        max_layer_share: float = MAX_LAYER_SHARE,
        costs: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        if not 0.0 < target < 1.0:
            raise ValueError(f"target (the share driven to zero) must be in (0, 1), got {target}")
        if not 0.0 <= score_share < 1.0:
            raise ValueError(f"score_share must be in [0, 1), got {score_share}")
        if not 0.0 < max_layer_share <= 1.0:
            raise ValueError(f"max_layer_share must be in (0, 1], got {max_layer_share}")
        if 0.0 <= switch_at <= 1.0 and score_share >= switch_at:
            raise ValueError(
                f"selective: scoring ends at score_share={score_share} of the run, which must come before the "
                f"ramp to zero ends at switch_at={switch_at}"
            )
        super().__init__(model, switch_at, layers, groups)
        self.costs = self._check_costs(costs)
        self.target = target
        self.score_share = score_share
        self.max_layer_share = max_layer_share
        self._scores: dict[str, torch.Tensor] = {}  # summed (γ·∂L/∂γ)² of the scoring steps
        self._scored = 0
        self._selected: dict[str, torch.Tensor] = {}  # chosen channels, and their γ when chosen
        self._start: dict[str, torch.Tensor] = {}

    def _check_costs(self, costs: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
        """One finite non-negative cost per channel of every penalised layer, as float32 on the CPU."""
        if costs is None:
            return None
        missing = [n for n in self.norms if n not in costs]
        if missing:
            raise ValueError(f"costs has no entry for BatchNorm layers {missing[:5]}")
        checked = {}
        for name, norm in self.norms.items():
            cost = torch.as_tensor(costs[name], dtype=torch.float32).flatten().cpu()
            if cost.numel() != norm.num_features or not torch.isfinite(cost).all() or (cost < 0).any():
                raise ValueError(
                    f"costs[{name!r}] must hold {norm.num_features} finite non-negative values, one per channel"
                )
            checked[name] = cost
        return checked

    def _check_run_length(self, total_steps: int) -> None:
        """The schedule needs one step to score and one to cut."""
        if total_steps < 2:
            raise TooFewStepsError(
                f"mechanism='selective' needs a run of at least 2 steps (one to score, one to cut), this run has "
                f"{total_steps}"
            )

    @torch.no_grad()
    def step(self, epoch: int, total_epochs: int) -> None:
        """Score (γ·∂L/∂γ)² until ``score_share`` of the run, then choose, then ramp the chosen γ to zero; the
        ramp is timed in steps (``on_step``), not in the ``epoch`` the trainer passes."""
        if self._progress is None:
            raise RuntimeError(
                "mechanism='selective' times its ramp in steps: the trainer must call on_step(step, total_steps) "
                "before after_backward (gcp.detection.train.fit and the Ultralytics adapter do)"
            )
        step, total = self._progress
        score_end, ramp_end = self._ramp(total)
        if not self._selected and step < score_end:
            self._accumulate_scores()
            return
        if not self._selected:
            self._choose()
        remaining = max(0.0, 1.0 - (step + 1 - score_end) / (ramp_end - score_end))
        for name, chosen in self._selected.items():
            weight = self.norms[name].weight
            if weight.grad is not None:
                weight.grad[chosen.to(weight.device)] = 0.0  # the optimiser must not hold them up
            values = (self._start[name] * remaining).to(weight.device, weight.dtype)
            weight.data[chosen.to(weight.device)] = values

    def _ramp(self, total: int) -> tuple[int, int]:
        """The step where scoring ends and the chosen are cut, and the step by which they reach zero."""
        score_end = max(1, round(self.score_share * total))
        return score_end, max(score_end + 1, round(self.switch_at * total))

    def _accumulate_scores(self) -> None:
        """Add this batch's (γ·∂L/∂γ)² of every trained channel (no gradient counts as 0)."""
        for name, norm in self.trained().items():
            weight = norm.weight
            grad = (
                weight.grad.detach().float() if weight.grad is not None else torch.zeros_like(weight.float())
            )
            taylor = (weight.detach().float() * grad).pow(2).cpu()
            self._scores[name] = self._scores.get(name, torch.zeros_like(taylor)) + taylor
        self._scored += 1

    def importance(self) -> dict[str, torch.Tensor]:
        """Each channel's mean (γ·∂L/∂γ)² over the scoring steps: the squared first-order estimate of the loss
        change from zeroing it, in the loss's units, so it compares across layers."""
        count = max(self._scored, 1)
        return {
            name: self._scores.get(name, torch.zeros(norm.num_features)) / count
            for name, norm in self.norms.items()
        }

    def _choose(self) -> None:
        """The ``target`` share of all trained channels with the lowest importance (with ``costs``: the channels
        with the lowest importance per cost until they hold ``target`` of the trained channels' cost), at most
        ``max_layer_share`` of each layer (ties by position), as boolean masks; their γ now are the ramp's
        starting values."""
        trained = self.trained()
        importance = {n: v for n, v in self.importance().items() if n in trained}
        names = list(importance)
        flat = torch.cat([importance[n] for n in names])
        layer = torch.cat([torch.full((importance[n].numel(),), i) for i, n in enumerate(names)])
        candidates = self._eligible(importance)
        if self.costs is None:
            order = torch.sort(flat[candidates], stable=True).indices
            order = order[: int(round(self.target * flat.numel()))]
        else:  # least importance per unit of cost first, until the chosen hold target of the total cost
            cost = torch.cat([self.costs[n] for n in names])
            per_cost = flat[candidates] / cost[candidates].clamp_min(1e-12)
            order = torch.sort(per_cost, stable=True).indices
            held = torch.cumsum(cost[candidates][order], 0)
            order = order[: int(torch.searchsorted(held, self.target * float(cost.sum()))) + 1]
        chosen = torch.zeros(flat.numel(), dtype=torch.bool)
        chosen[candidates[order]] = True
        for i, name in enumerate(names):
            mask = chosen[layer == i]
            if mask.any():
                self._selected[name] = mask
                self._start[name] = self.norms[name].weight.detach().float().cpu()[mask]

    def _eligible(self, importance: dict[str, torch.Tensor]) -> torch.Tensor:
        """Flat positions of each layer's least important ``max_layer_share`` of channels, one channel always
        kept (an emptied layer cuts the network)."""
        eligible = torch.zeros(sum(v.numel() for v in importance.values()), dtype=torch.bool)
        start = 0
        for scores in importance.values():
            count = scores.numel()
            cap = min(int(self.max_layer_share * count), count - 1)
            order = torch.sort(scores, stable=True).indices[:cap]
            eligible[start + order] = True
            start += count
        return torch.nonzero(eligible).flatten()

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any] | None = None) -> None:
        """Hold the chosen at zero (:meth:`_hold_zeros`), then record the epoch."""
        self._hold_zeros()
        super().on_epoch_end(epoch, metrics)

    @torch.no_grad()
    def _hold_zeros(self) -> None:
        """After its ramp, set the chosen γ back to exactly 0 at every epoch end: the optimiser's momentum from
        before the choice can still have moved them by about its lr."""
        if not self._selected or self._progress is None:
            return
        step, total = self._progress
        if step + 1 >= self._ramp(total)[1]:
            for name, chosen in self._selected.items():
                weight = self.norms[name].weight
                weight.data[chosen.to(weight.device)] = 0.0

    def _mechanism_state(self) -> dict[str, Any]:
        """The scores so far, and once chosen the choice and the ramp's starting γ."""
        return {
            "scores": dict(self._scores),
            "scored": self._scored,
            "selected": dict(self._selected),
            "start": dict(self._start),
        }

    def _load_mechanism_state(self, state: dict[str, Any]) -> None:
        """Continue the scoring, or keep the choice and ramp made before the interruption."""
        self._scores = {n: v.clone() for n, v in state.get("scores", {}).items()}
        self._scored = int(state.get("scored", 0))
        self._selected = {n: v.clone() for n, v in state.get("selected", {}).items()}
        self._start = {n: v.clone() for n, v in state.get("start", {}).items()}
