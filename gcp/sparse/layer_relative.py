"""``mechanism="layer_relative"`` (the default): §4.1's dynamic schedule applied by the hook itself, so that it
works under AdamW, where eq. 3's subgradient is normalised away (:mod:`gcp.sparse.eq3`).

The hook trains γ outside the optimiser, with a proximal step whose strength does not depend on the optimiser
or on the loss scale, and that cannot be satisfied by shrinking a whole layer (a BatchNorm follows every conv,
so a uniform γ scale is almost free for the loss):

1. the data gradient of each layer's γ is divided by that layer's gradient RMS (a running scalar per layer,
   not per channel as in Adam), so channels compete with the other channels of their layer in units of the
   layer's typical gradient, and one dimensionless s means the same in the stem and in the stride-32 stage
   whose gradients are 1000× smaller;
2. the L1 term is made scale-invariant by measuring each |γ_i| against its layer's contrast point
   c = mean γ² / mean|γ| (Hoyer's ‖γ‖₁/‖γ‖₂ has its zero-gradient point there): channel i is pushed towards zero
   at the rate s_i·max(f, 1 − |γ_i| / c), s_i from the schedule. The channels furthest below their layer's
   contrast point get the full rate; nothing is pushed up (growing γ would change what the Mish layers
   compute); with ``push_floor`` f > 0 every channel gets at least that share of its rate: a trained network
   can silence a useless channel downstream, its γ then gets no data gradient, and without a floor a silenced
   channel above its layer's contrast point is never pushed. A channel that carries signal must then hold
   against f·s through its data gradient, which a detector's noisy per-channel gradients do not at s = 1;
3. the sign part is applied as a soft threshold (proximal L1), so unneeded channels reach exactly 0.

``docs/design.md``, "Sparse training", has the measurements.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from gcp.sparse.base import DECAY, PROTECT, SWITCH_AT, RateSchedule
from gcp.vocab import DEFAULT_PUSH_FLOOR
from grouping import Group

BETAS = (0.9, 0.99)  # data-gradient momentum and the per-layer gradient-RMS average
#: γ's own learning rate (with s = 1.0, what benchmarks/bench_method.py runs).
GAMMA_LR = 0.02


class LayerRelativeSparsity(RateSchedule):
    """The proximal, layer-normalised γ update of the module docstring with §4.1's dynamic rate.

    Every step takes each trained γ out of the optimiser (its ``.grad`` is set to None, so SGD and AdamW skip
    it) and updates it with learning rate ``lr``. ``follow_schedule=True`` scales ``lr`` (data step and push
    alike) by the trainer's lr schedule (:meth:`on_lr`, called every step by ``gcp.detection.train.fit`` and by
    the Ultralytics adapter): channels are then cut while the rest of the network still learns fast enough to
    take over their work, and the last, small steps let it settle. With a constant γ lr the cuts keep coming
    while a cosine schedule has nearly stopped the network. ``push_floor`` is f of step 2.
    """

    mechanism = "layer_relative"

    def __init__(
        self,
        model: nn.Module,
        s: float | None = None,
        switch_at: float = SWITCH_AT,
        protect: float = PROTECT,
        decay: float = DECAY,
        layers: Iterable[str] | None = None,
        groups: Sequence[Group] | None = None,
        lr: float = GAMMA_LR,
        follow_schedule: bool = False,
        push_floor: float = DEFAULT_PUSH_FLOOR,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr (γ's own learning rate) must be > 0, got {lr}")
        if not 0.0 <= push_floor <= 1.0:
            raise ValueError(f"push_floor must be in [0, 1], got {push_floor}")
        super().__init__(model, s, switch_at, protect, decay, layers, groups)
        self.lr = lr
        self.follow_schedule = follow_schedule
        self.push_floor = push_floor
        self._lr_scale = 1.0
        self._momentum: dict[str, torch.Tensor] = {}
        self._mean_square: dict[str, float] = {}
        self._updates = 0

    def on_lr(self, scale: float) -> None:
        """The trainer's lr of this step over its base lr; γ's own lr follows it with ``follow_schedule``."""
        self._lr_scale = float(scale) if self.follow_schedule else 1.0

    @torch.no_grad()
    def step(self, epoch: int, total_epochs: int) -> None:
        """One proximal step on every trained γ at the schedule's rates."""
        rates = self.rates(epoch, total_epochs)
        self._updates += 1
        for name, rate in rates.items():
            self._update(name, rate)

    def _update(self, name: str, rate: torch.Tensor) -> None:
        """One proximal step on a layer's γ with a layer-normalised data gradient (module docstring, 1–3)."""
        weight = self.norms[name].weight
        gamma = weight.detach().float()
        grad = weight.grad.detach().float() if weight.grad is not None else torch.zeros_like(gamma)
        weight.grad = None  # the optimiser must not also move γ (nor decay it)
        data_step = self._normalised_step(name, grad)
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

    def _normalised_step(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """The layer's data gradient with momentum, over the layer's running gradient RMS (step 1), both
        bias-corrected as in Adam but with one RMS scalar per layer."""
        beta1, beta2 = BETAS
        momentum = self._momentum.get(name, torch.zeros_like(grad)).to(grad.device)
        momentum.mul_(beta1).add_(grad, alpha=1 - beta1)  # from zero, as the bias correction below assumes
        self._momentum[name] = momentum
        mean_square = beta2 * self._mean_square.get(name, 0.0) + (1 - beta2) * float(grad.pow(2).mean())
        self._mean_square[name] = mean_square
        rms = (mean_square / (1 - beta2**self._updates)) ** 0.5
        return momentum / (1 - beta1**self._updates) / max(rms, 1e-12)

    def _mechanism_state(self) -> dict[str, Any]:
        """The momentum, RMS and step count of :meth:`_normalised_step`."""
        return {
            "momentum": {n: m.cpu() for n, m in self._momentum.items()},
            "mean_square": json.dumps(self._mean_square),
            "updates": self._updates,
        }

    def _load_mechanism_state(self, state: dict[str, Any]) -> None:
        """Continue the momentum and RMS averages exactly where the checkpoint left them."""
        self._momentum = {n: m.clone() for n, m in state.get("momentum", {}).items()}
        self._mean_square = json.loads(state.get("mean_square", "{}"))
        self._updates = int(state.get("updates", 0))
