"""Dynamic sparse training: an L1 penalty on BatchNorm γ whose rate changes during training (paper §4.1, eq. 3).

The penalty s·Σ|γ| contributes the subgradient s·sign(γ) to every γ. Network Slimming keeps s constant, which
trades accuracy for sparsity (Table 9: 71.2 vs 79.8 mAP). The paper's dynamic schedule keeps s for every channel
until ``switch_at`` of the epochs (half of 200 in §5.2, 40 % in the §6.1 ablation) and then lets the ``protect``
fraction of channels with the largest |γ| (30 %) decay to ``decay`` × s (1 %), so important channels recover
while the rest keep being driven to zero.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from grouping import Group, prunable_norms

from .io import atomic_write_json

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
SPARSE_BELOW = 1e-2


class DynamicSparsity:
    """Adds the (dynamic) L1 subgradient on BatchNorm γ; call :meth:`step` between backward and optimizer step.

    ``layers`` restricts the penalty to these BatchNorm names (default: every affine BatchNorm). ``groups``
    (e.g. from :func:`grouping.partition`) only changes how :meth:`stats` reports; the schedule ranks channels
    across the whole model, as §4.1 describes ("30 % of the channels"). ``switch_at=1.0`` gives constant-rate
    Network Slimming sparse training. It is also a ``gcp.train.fit`` hook (``after_backward``).
    """

    def __init__(
        self,
        model: nn.Module,
        s: float = 7.5e-4,
        switch_at: float = 0.5,
        protect: float = 0.3,
        decay: float = 0.01,
        layers: Iterable[str] | None = None,
        groups: Sequence[Group] | None = None,
    ) -> None:
        if s < 0:
            raise ValueError(f"sparsity rate s must be >= 0, got {s}")
        if not 0.0 <= switch_at <= 1.0:
            raise ValueError(f"switch_at must be in [0, 1], got {switch_at}")
        if not 0.0 <= protect <= 1.0:
            raise ValueError(f"protect must be in [0, 1], got {protect}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
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
        self.s = s
        self.switch_at = switch_at
        self.protect = protect
        self.decay = decay
        self.groups = list(groups) if groups is not None else [Group("all", list(norms), 0, "all")]
        self.history: list[dict[str, Any]] = []
        self._protected_epoch: int | None = None
        self._protected: dict[str, torch.Tensor] = {}

    def switched(self, epoch: int, total_epochs: int) -> bool:
        """True once ``epoch`` (0-based) has reached ``switch_at`` of the run."""
        return self.switch_at < 1.0 and epoch >= self.switch_at * total_epochs

    def _rank_protected(self) -> dict[str, torch.Tensor]:
        """Boolean masks of the ``protect`` fraction of channels with the largest |γ|, ranked model-wide."""
        gammas = {n: m.weight.detach().abs().flatten().cpu() for n, m in self.norms.items()}
        flat = torch.cat(list(gammas.values()))
        k = int(round(self.protect * flat.numel()))
        if k == 0:
            return {n: torch.zeros_like(g, dtype=torch.bool) for n, g in gammas.items()}
        cutoff = torch.topk(flat, k).values[-1]
        masks = {n: g >= cutoff for n, g in gammas.items()}
        return masks

    def rates(self, epoch: int, total_epochs: int) -> dict[str, torch.Tensor]:
        """Per-channel sparsity rate of every layer at ``epoch``: s, or s·decay for protected channels."""
        if not self.switched(epoch, total_epochs):
            return {n: torch.full((m.num_features,), self.s) for n, m in self.norms.items()}
        if self._protected_epoch != epoch:  # re-rank once per epoch
            self._protected = self._rank_protected()
            self._protected_epoch = epoch
        low = self.s * self.decay
        return {n: torch.where(self._protected[n], low, self.s) for n in self.norms}

    @torch.no_grad()
    def step(self, epoch: int, total_epochs: int) -> None:
        """Add s_d·sign(γ) to γ.grad of every penalised layer (the gradient of eq. 3's second term)."""
        for name, rate in self.rates(epoch, total_epochs).items():
            weight = self.norms[name].weight
            penalty = rate.to(weight.device, weight.dtype) * torch.sign(weight.detach())
            if weight.grad is None:
                weight.grad = penalty.clone()
            else:
                weight.grad.add_(penalty)

    after_backward = step

    def stats(self) -> dict[str, dict[str, float]]:
        """Per-group |γ| quantiles and the fraction of channels with |γ| < 1e-2."""
        result = {}
        for group in self.groups:
            layers = [n for n in group.layers if n in self.norms]
            if not layers:
                continue
            g = torch.cat([self.norms[n].weight.detach().abs().flatten().float().cpu() for n in layers])
            q = torch.quantile(g, torch.tensor(QUANTILES))
            entry = {f"q{int(p * 100):02d}": float(v) for p, v in zip(QUANTILES, q)}
            entry["sparse_fraction"] = float((g < SPARSE_BELOW).float().mean())
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
        return {"history": json.dumps(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = json.loads(state["history"])

    def save_history(self, path: str | Path) -> Path:
        """Write the per-epoch history as JSON (atomically), for ``gcp plot sparsity``."""
        return atomic_write_json(path, {"s": self.s, "switch_at": self.switch_at, "history": self.history})
