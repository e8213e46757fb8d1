"""``mechanism="eq3"``: the paper's sparse training as written (§4.1, eq. 3), for SGD runs as in the paper.

Eq. 3 adds the subgradient s_d·sign(γ) of the penalty s·Σ|γ| to γ.grad, with s_d from the dynamic schedule
(:class:`gcp.sparse.base.RateSchedule`), and leaves the update to the optimiser; Table 9's comparison of
constant and dynamic s is made this way. Under AdamW it does nothing useful: Adam divides every parameter's
step by its own gradient RMS, so the added s·sign(γ) is normalised away and γ moves by at most about lr per
step, whatever s is (``docs/design.md``, "Sparse training", has the measurement; ``layer_relative`` is the
answer).
"""

from __future__ import annotations

import torch

from gcp.sparse.base import RateSchedule


class Eq3Sparsity(RateSchedule):
    """Eq. 3's subgradient on γ.grad with §4.1's dynamic rate; its parameters are :class:`RateSchedule`'s
    (``s``, ``switch_at``, ``protect``, ``decay``), ``s=None`` is the paper's 7.5e-4."""

    mechanism = "eq3"

    @torch.no_grad()
    def step(self, epoch: int, total_epochs: int) -> None:
        """Eq. 3: add s_d·sign(γ) to γ.grad of every trained layer; the optimiser takes the step."""
        for name, rate in self.rates(epoch, total_epochs).items():
            weight = self.norms[name].weight
            penalty = rate.to(weight.device, weight.dtype) * torch.sign(weight.detach())
            if weight.grad is None:
                weight.grad = penalty.clone()
            else:
                weight.grad.add_(penalty)
