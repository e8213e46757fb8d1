"""Dynamic sparse training: an L1 penalty on BatchNorm γ whose rate changes during training (paper §4.1, eq. 3).

The paper's penalty s·Σ|γ| contributes the subgradient s·sign(γ) to every γ. Network Slimming keeps s constant,
which trades accuracy for sparsity (Table 9: 71.2 vs 79.8 mAP). The paper's dynamic schedule keeps s for every
channel until ``switch_at`` of the epochs (half of 200 in §5.2, 40 % in the §6.1 ablation) and then lets the
``protect`` fraction of channels with the largest |γ| (30 %) decay to ``decay`` × s (1 %), so important channels
recover while the rest keep being driven to zero.

Two mechanisms apply that schedule (``docs/design.md``, "Sparse training", has the measurements):

* ``"eq3"``: the literal subgradient added to γ.grad, for SGD runs as in the paper (Table 9's comparison). Under
  AdamW it does nothing useful: Adam divides every parameter's step by its own gradient RMS, so the added
  s·sign(γ) is normalised away and γ moves by at most about lr per step, whatever s is.
* ``"layer_relative"`` (default): the hook trains γ itself, outside the optimiser, with a proximal step whose
  strength does not depend on the optimiser or on the loss scale, and that cannot be satisfied by shrinking a
  whole layer (a BatchNorm follows every conv, so a uniform γ scale is almost free for the loss):

  1. the data gradient of each layer's γ is divided by that layer's gradient RMS (a running scalar per layer,
     not per channel as in Adam), so channels compete with the other channels of their layer in units of the
     layer's typical gradient, and one dimensionless s means the same in the stem and in the stride-32 stage
     whose gradients are 1000× smaller;
  2. the L1 term is made scale-invariant by measuring each |γ_i| against its layer's contrast point
     c = mean γ² / mean|γ| (Hoyer's ‖γ‖₁/‖γ‖₂ has its zero-gradient point there): channel i is pushed
     towards zero at the rate s_i·max(f, 1 − |γ_i| / c). The channels furthest below their layer's contrast
     point get the full rate; nothing is pushed up (growing γ would change what the Mish layers compute);
     with ``push_floor`` f > 0 every channel gets at least that share of its rate: a trained network can
     silence a useless channel downstream, its γ then gets no data gradient, and without a floor a silenced
     channel above its layer's contrast point is never pushed. A channel that carries signal must then hold
     against f·s through its data gradient, which a detector's noisy per-channel gradients do not at s = 1;
  3. the sign part is applied as a soft threshold (proximal L1), so unneeded channels reach exactly 0.

* ``"selective"``: the paper's dynamic schedule taken to its end point, with the channels chosen by the loss
  rather than by |γ|. A penalty on every γ lets a detector's noisy per-channel gradients decide which channels
  fall, and which go is then mostly where their |γ| happened to start (``docs/design.md`` measured it); here the
  first ``score_share`` of the steps only measure each channel's squared first-order Taylor importance
  (γ·∂L/∂γ)² (Molchanov et al. 2019), averaged over the batches: an estimate of the loss change from zeroing
  it, in the loss's units, so it compares across layers. The ``target`` share of all channels with the lowest
  importance (with ``costs``, e.g. :func:`gcp.core.prune.channel_costs`: the lowest importance per MAC, until the
  chosen hold ``target`` of the MACs), at most ``max_layer_share`` of any layer, is then driven to exactly
  zero along a linear ramp that ends at ``switch_at`` of the run, the optimiser's update of those γ withheld;
  every other channel is never penalised (the paper's protected channels, with decay 0). The rest of the run
  trains the network with the chosen channels at zero, so it has adapted to their loss before stage 2 removes
  them. This is the growing regularisation of Wang et al. 2021 (pick the channels first, then raise their
  penalty until they vanish) with a Taylor criterion; ``s``, ``protect``, ``decay`` and ``lr`` do not apply.

Every mechanism leaves a γ that does not train (``requires_grad=False``, e.g. a layer frozen by Ultralytics'
``freeze=``) alone: the user froze it to keep it as it is, and a penalty it cannot answer with its data gradient
would only destroy it. Such layers are not penalised, ranked, scored or chosen; they are checked at every step,
since trainers freeze layers after the hook is built.

An average of the weights (an EMA) has no exact zeros where the trained weights have them, so a stage-1 model
saved from one hands pruning dense γ. :meth:`DynamicSparsity.save_history` therefore records the γ the model holds
when it is called, after training (the weights the trainer returned and saved), and warns when they lost the
exact zeros the training reached.
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
from gcp.vocab import DEFAULT_PUSH_FLOOR, DEFAULT_S, DEFAULT_SCORE_SHARE, DEFAULT_TARGET, SPARSITY_MECHANISMS
from grouping import Group, prunable_norms

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
SPARSE_BELOW = 1e-2
BETAS = (0.9, 0.99)  # data-gradient momentum and the per-layer gradient-RMS average (layer_relative)
#: ``selective``: the most of one layer's channels that may be chosen (a layer emptied of its channels is a cut
#: network); its target and scoring share are in :mod:`gcp.vocab`.
MAX_LAYER_SHARE = 0.9


class TooFewStepsError(ValueError):
    """The run is too short for the mechanism's schedule; raised at the first step, before any update, so the
    pipeline can name the config keys that set the run's length."""


class DynamicSparsity:
    """Sparse training of BatchNorm γ with the paper's dynamic schedule; a ``gcp.detection.train.fit`` hook.

    Call :meth:`step` between backward and the optimiser step (it is the hook's ``after_backward``).
    ``mechanism="layer_relative"`` (default) takes every penalised γ out of the optimiser for that step (its
    ``.grad`` is set to None, so SGD and AdamW skip it) and updates it with learning rate ``lr`` as described in
    the module docstring; ``mechanism="eq3"`` adds s_d·sign(γ) to γ.grad and leaves the update to the optimiser
    (the paper's eq. 3, meant for SGD). ``s=None`` takes :data:`DEFAULT_S` for the mechanism.

    ``layers`` restricts the penalty to these BatchNorm names (default: every affine BatchNorm). ``groups``
    (e.g. from :func:`grouping.partition`) only changes how :meth:`stats` reports; the schedule ranks channels
    across the whole model, as §4.1 describes ("30 % of the channels"). ``switch_at=1.0`` gives constant-rate
    Network Slimming sparse training.

    ``follow_schedule=True`` scales ``lr`` (data step and push alike) by the trainer's lr schedule (``on_lr``,
    called every step by ``gcp.detection.train.fit`` and by the Ultralytics adapter): channels are then cut while the rest
    of the network still learns fast enough to take over their work, and the last, small steps let it settle.
    With a constant γ lr the cuts keep coming while a cosine schedule has nearly stopped the network.

    ``mechanism="selective"`` (module docstring) needs the trainer's ``on_step(step, total_steps)`` (``gcp.detection.train.fit``
    and the Ultralytics adapter call it): ``target`` share of the channels, chosen after ``score_share`` of the
    steps, reach zero at ``switch_at`` of them.
    """

    def __init__(
        self,
        model: nn.Module,
        s: float | None = None,
        switch_at: float = 0.5,
        protect: float = 0.3,
        decay: float = 0.01,
        layers: Iterable[str] | None = None,
        groups: Sequence[Group] | None = None,
        mechanism: str = "layer_relative",
        lr: float = 0.02,
        follow_schedule: bool = False,
        push_floor: float = DEFAULT_PUSH_FLOOR,
        target: float = DEFAULT_TARGET,
        score_share: float = DEFAULT_SCORE_SHARE,
        max_layer_share: float = MAX_LAYER_SHARE,
        costs: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        if mechanism not in SPARSITY_MECHANISMS:
            raise ValueError(f"unknown sparsity mechanism {mechanism!r}; choose from {SPARSITY_MECHANISMS}")
        if mechanism == "selective" and s is not None:
            raise ValueError(
                "mechanism='selective' has no rate s: target and switch_at set what goes and when"
            )
        s = DEFAULT_S[mechanism] if s is None else s
        if s < 0:
            raise ValueError(f"sparsity rate s must be >= 0, got {s}")
        if not 0.0 <= switch_at <= 1.0:
            raise ValueError(f"switch_at must be in [0, 1], got {switch_at}")
        if not 0.0 <= protect <= 1.0:
            raise ValueError(f"protect must be in [0, 1], got {protect}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        if not lr > 0:
            raise ValueError(f"lr (γ's own learning rate) must be > 0, got {lr}")
        if not 0.0 <= push_floor <= 1.0:
            raise ValueError(f"push_floor must be in [0, 1], got {push_floor}")
        if not 0.0 < target < 1.0:
            raise ValueError(f"target (the share driven to zero) must be in (0, 1), got {target}")
        if not 0.0 <= score_share < 1.0:
            raise ValueError(f"score_share must be in [0, 1), got {score_share}")
        if not 0.0 < max_layer_share <= 1.0:
            raise ValueError(f"max_layer_share must be in (0, 1], got {max_layer_share}")
        if mechanism == "selective" and score_share >= switch_at:
            raise ValueError(
                f"selective: scoring ends at score_share={score_share} of the run, which must come before the "
                f"ramp to zero ends at switch_at={switch_at}"
            )
        norms = prunable_norms(model)
        if layers is not None:
            wanted = list(layers)
            unknown = [n for n in wanted if n not in norms]
            if unknown:
                raise ValueError(f"layers {unknown[:5]} are not affine BatchNorm layers of the model")
            norms = {n: norms[n] for n in wanted}
        if not norms:
            raise ValueError("the model has no affine BatchNorm layer: sparse training on γ needs BatchNorm")
        self.norms = norms
        self.costs = self._check_costs(costs)
        self.s = s
        self.switch_at = switch_at
        self.protect = protect
        self.decay = decay
        self.mechanism = mechanism
        self.lr = lr
        self.follow_schedule = follow_schedule
        self.push_floor = push_floor
        self._lr_scale = 1.0
        self.groups = list(groups) if groups is not None else [Group("all", list(norms), 0, "all")]
        self.history: list[dict[str, Any]] = []
        self._protected_epoch: int | None = None
        self._protected: dict[str, torch.Tensor] = {}
        self._momentum: dict[str, torch.Tensor] = {}
        self._mean_square: dict[str, float] = {}
        self._updates = 0
        self.target = target
        self.score_share = score_share
        self.max_layer_share = max_layer_share
        self._progress: tuple[int, int] | None = None  # (step, total_steps) from on_step
        self._scores: dict[str, torch.Tensor] = {}  # selective: summed (γ·∂L/∂γ)² of the scoring steps
        self._scored = 0
        self._selected: dict[str, torch.Tensor] = {}  # selective: chosen channels, and their γ when chosen
        self._start: dict[str, torch.Tensor] = {}

    def _check_costs(self, costs: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
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

    def switched(self, epoch: int, total_epochs: int) -> bool:
        """True once ``epoch`` (0-based) has reached ``switch_at`` of the run."""
        return self.switch_at < 1.0 and epoch >= self.switch_at * total_epochs

    def trained(self) -> dict[str, nn.Module]:
        """The penalised BatchNorm layers whose γ trains now (``requires_grad``): the only ones the hook acts on
        (module docstring: frozen γ are left alone)."""
        return {n: m for n, m in self.norms.items() if m.weight.requires_grad}

    def _rank_protected(self) -> dict[str, torch.Tensor]:
        """Boolean masks of exactly the ``protect`` fraction of the trained channels with the largest |γ|,
        model-wide.

        Ties at the cut-off are broken by position (``torch.topk`` on a stable sort), so a model whose γ are
        all equal still protects exactly k channels, not all of them.
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

    @torch.no_grad()
    def step(self, epoch: int, total_epochs: int) -> None:
        """Apply one step of the penalty to every penalised γ (see the class docstring for the mechanisms)."""
        if self.mechanism == "selective":
            self._selective_update()
            return
        rates = self.rates(epoch, total_epochs)
        if self.mechanism == "eq3":
            self._add_subgradient(rates)
        else:
            self._updates += 1
            for name, rate in rates.items():
                self._layer_relative_update(name, rate)

    after_backward = step

    def on_lr(self, scale: float) -> None:
        """The trainer's lr of this step over its base lr; γ's own lr follows it with ``follow_schedule``."""
        self._lr_scale = float(scale) if self.follow_schedule else 1.0

    def on_step(self, step: int, total_steps: int) -> None:
        """The trainer's 0-based step over the whole run; ``selective`` times its scoring and ramp with it."""
        if total_steps < 1 or not 0 <= step < total_steps:
            raise ValueError(f"on_step needs 0 <= step < total_steps, got {step} of {total_steps}")
        if self.mechanism == "selective" and total_steps < 2:
            raise TooFewStepsError(
                f"mechanism='selective' needs a run of at least 2 steps (one to score, one to cut), this run has "
                f"{total_steps}"
            )
        self._progress = (int(step), int(total_steps))

    def _selective_update(self) -> None:
        """Score (γ·∂L/∂γ)² until ``score_share`` of the run, then choose, then ramp the chosen γ to zero."""
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
        eligible = torch.zeros(flat.numel(), dtype=torch.bool)
        start = 0
        for name in names:
            count = importance[name].numel()
            cap = min(int(self.max_layer_share * count), count - 1)  # every layer keeps a channel
            order = torch.sort(importance[name], stable=True).indices[:cap]
            eligible[start + order] = True
            start += count
        candidates = torch.nonzero(eligible).flatten()
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

    def _add_subgradient(self, rates: dict[str, torch.Tensor]) -> None:
        """Eq. 3: add s_d·sign(γ) to γ.grad of every penalised layer; the optimiser takes the step."""
        for name, rate in rates.items():
            weight = self.norms[name].weight
            penalty = rate.to(weight.device, weight.dtype) * torch.sign(weight.detach())
            if weight.grad is None:
                weight.grad = penalty.clone()
            else:
                weight.grad.add_(penalty)

    def _layer_relative_update(self, name: str, rate: torch.Tensor) -> None:
        """One proximal step on a layer's γ with a layer-normalised data gradient (module docstring, 1–3)."""
        weight = self.norms[name].weight
        gamma = weight.detach().float()
        grad = weight.grad.detach().float() if weight.grad is not None else torch.zeros_like(gamma)
        weight.grad = None  # the optimiser must not also move γ (nor decay it)
        beta1, beta2 = BETAS
        momentum = self._momentum.get(name, torch.zeros_like(grad)).to(grad.device)
        momentum.mul_(beta1).add_(grad, alpha=1 - beta1)  # from zero, as the bias correction below assumes
        self._momentum[name] = momentum
        mean_square = beta2 * self._mean_square.get(name, 0.0) + (1 - beta2) * float(grad.pow(2).mean())
        self._mean_square[name] = mean_square
        rms = (mean_square / (1 - beta2**self._updates)) ** 0.5
        data_step = momentum / (1 - beta1**self._updates) / max(rms, 1e-12)
        rate = rate.to(gamma.device, gamma.dtype)
        square = float(gamma.pow(2).mean())
        contrast = float(gamma.abs().mean()) / square if square > 0 else 0.0
        # push_i = s·max(f, 1 − |γ_i|·contrast): channels below the layer's contrast point are shrunk harder the
        # further below, every channel at least at f·s; none is pushed up (growth would change Mish layers)
        push = rate * torch.clamp(1.0 - gamma.abs() * contrast, min=self.push_floor)
        lr = self.lr * self._lr_scale
        z = gamma - lr * data_step
        shrunk = torch.sign(z) * torch.clamp(z.abs() - lr * push, min=0.0)  # proximal: exact zeros
        weight.data.copy_(shrunk.to(weight.dtype))

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
        self._hold_zeros()
        gammas = torch.cat([m.weight.detach().abs().flatten().float().cpu() for m in self.norms.values()])
        hist = torch.histc(torch.log10(gammas.clamp_min(1e-6)), bins=64, min=-6.0, max=1.0)
        entry: dict[str, Any] = {"epoch": epoch, "groups": self.stats(), "log10_hist": hist.tolist()}
        if metrics:
            entry["metrics"] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self.history.append(entry)

    @torch.no_grad()
    def _hold_zeros(self) -> None:
        """After its ramp, ``selective`` sets the chosen γ back to exactly 0 at every epoch end: the optimiser's
        momentum from before the choice can still have moved them by about its lr."""
        if not self._selected or self._progress is None:
            return
        step, total = self._progress
        if step + 1 >= self._ramp(total)[1]:
            for name, chosen in self._selected.items():
                weight = self.norms[name].weight
                weight.data[chosen.to(weight.device)] = 0.0

    def state_dict(self) -> dict[str, Any]:
        """History plus the ``layer_relative`` optimiser state, so ``fit(resume=True)`` continues exactly."""
        return {
            "history": json.dumps(self.history),
            "momentum": {n: m.cpu() for n, m in self._momentum.items()},
            "mean_square": json.dumps(self._mean_square),
            "updates": self._updates,
            "scores": dict(self._scores),
            "scored": self._scored,
            "selected": dict(self._selected),
            "start": dict(self._start),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = json.loads(state["history"])
        self._momentum = {n: m.clone() for n, m in state.get("momentum", {}).items()}
        self._mean_square = json.loads(state.get("mean_square", "{}"))
        self._updates = int(state.get("updates", 0))
        self._scores = {n: v.clone() for n, v in state.get("scores", {}).items()}
        self._scored = int(state.get("scored", 0))
        self._selected = {n: v.clone() for n, v in state.get("selected", {}).items()}
        self._start = {n: v.clone() for n, v in state.get("start", {}).items()}

    def save_history(self, path: str | Path) -> Path:
        """Write the per-epoch history as JSON (atomically), for ``gcp plot sparsity``, with ``final``: the
        :meth:`stats` of the γ the model holds now. Called after training, these are the weights the trainer
        returned and saved (with ``gcp.detection.train.fit(ema=True)`` the EMA's, not those the epochs' entries measured),
        so ``final`` describes the model pruning will get; a warning says when they hold fewer exact zeros than
        the last epoch's entry (module docstring: an EMA averages them away)."""
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
        return atomic_write_json(
            path,
            {
                "s": self.s,
                "switch_at": self.switch_at,
                "mechanism": self.mechanism,
                "history": self.history,
                "final": final,
            },
        )


def _zero_fraction(groups: Mapping[str, Mapping[str, float]]) -> float:
    """The share of exact zeros over all groups of a :meth:`DynamicSparsity.stats` result (0 for an entry written
    before the share was recorded)."""
    channels = sum(stats["channels"] for stats in groups.values())
    zeros = sum(stats.get("zero_fraction", 0.0) * stats["channels"] for stats in groups.values())
    return zeros / max(channels, 1)
