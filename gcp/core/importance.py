"""Channel importance as torch-pruning ``Importance`` callables (the policy half of pruning).

Each callable takes a torch-pruning ``Group`` (channels coupled through residual adds, concats, splits) and
returns one score per root channel, so every one of them also works as the ``importance=`` of torch-pruning's own
pruners.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

NORM_OUT_FNS = (tp.prune_batchnorm_out_channels,)
CONV_OUT_FNS = (tp.prune_conv_out_channels, tp.prune_linear_out_channels)
#: torch-pruning gives depthwise convs (groups = in = out) their own handler, one for inputs and outputs alike:
#: removing a channel removes its filter, so in a coupled group such a conv counts as an output layer.
DEPTHWISE_FNS = (tp.prune_depthwise_conv_out_channels,)
CONV_IN_FNS = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)


def norm_items(group: Any) -> list[tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    """The affine BatchNorm members of a torch-pruning group: (module, local indices, root indices)."""
    items = []
    for i, (dep, idxs) in enumerate(group):
        layer = dep.layer
        root_idxs = group[i].root_idxs
        if dep.pruning_fn not in NORM_OUT_FNS or not getattr(layer, "affine", False):
            continue
        if root_idxs is None or any(r is None for r in root_idxs):
            continue
        items.append((layer, torch.as_tensor(list(idxs), dtype=torch.long), torch.as_tensor(root_idxs)))
    return items


def group_size(group: Any) -> int:
    """Number of root channels in a (full-index) torch-pruning group."""
    return len(group[0].idxs)


class BNGammaImportance(tp.importance.Importance):
    """|γ| of the BatchNorm layers in a coupled group, optionally divided by each layer's own threshold.

    With ``thresholds`` (BN module → t) the score of a channel in layer l is |γ| / t_group(l): a score below 1
    means "this layer's group says remove" (paper §4.2.2, Fig. 4). Coupled layers are combined by ``reduction``:

    * ``"vote"``: the public mask of §4.2.3: the fraction of coupled layers that say *keep*; a channel is removed
      when at least half say remove (Z ≥ N_conv / 2), i.e. when this score is ≤ 0.5.
    * ``"mean"`` / ``"max"``: the mean or max of the normalised |γ| (max: removed only if every layer agrees).

    Without thresholds it is plain Network Slimming |γ| (mean over coupled layers), usable as the importance of
    any torch-pruning pruner.
    """

    def __init__(self, thresholds: Mapping[nn.Module, float] | None = None, reduction: str = "mean") -> None:
        if reduction not in ("vote", "mean", "max"):
            raise ValueError(f"reduction must be 'vote', 'mean' or 'max', got {reduction!r}")
        self.thresholds = thresholds
        self.reduction = reduction

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        items = norm_items(group)
        if not items:
            return None
        values, roots = [], []
        for layer, idxs, root in items:
            gamma = layer.weight.detach().abs().float().cpu()[idxs]
            if self.thresholds is not None:
                gamma = gamma / max(float(self.thresholds[layer]), 1e-12)
            values.append(gamma)
            roots.append(root)
        return coupled_scores(values, roots, group_size(group), self.reduction)


def coupled_scores(
    values: list[torch.Tensor], roots: list[torch.Tensor], n: int, reduction: str
) -> torch.Tensor:
    """Combine per-layer normalised scores of coupled layers onto the ``n`` root channels.

    ``values[i][j]`` is layer i's score for its channel j, which is root channel ``roots[i][j]``; a score below
    1 means "remove" for that layer. ``vote`` gives the fraction of layers saying keep (§4.2.3), ``mean`` and
    ``max`` the mean or max score. Root channels no layer covers get 0. Computed in float64, the precision of
    :func:`gcp.core.prune.gamma_scores`' tie-break.
    """
    total = torch.zeros(n, dtype=torch.float64)
    count = torch.zeros(n, dtype=torch.float64)
    best = torch.zeros(n, dtype=torch.float64)
    for value, root in zip(values, roots):
        value = value.double()
        total.index_add_(0, root, (value >= 1.0).double() if reduction == "vote" else value)
        count.index_add_(0, root, torch.ones_like(value))
        best.scatter_reduce_(0, root, value, reduce="amax")
    if reduction == "max":
        return best
    return total / count.clamp_min(1)


class L1FilterImportance(tp.importance.GroupMagnitudeImportance):
    """Filter L1 norm (Li et al. 2017), summed over the coupled layers' output filters."""

    def __init__(self) -> None:
        super().__init__(
            p=1, group_reduction="mean", normalizer=None, target_types=[nn.modules.conv._ConvNd, nn.Linear]
        )


class RandomImportance(tp.importance.Importance):
    """Seeded random scores: the lower bound every method must beat."""

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, group: Any) -> torch.Tensor:
        return torch.rand(group_size(group), generator=self.generator)


def _consumers(group: Any) -> list[tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    """Dense conv/linear layers that read the group's channels: (module, local in-indices, root indices)."""
    result = []
    for i, (dep, idxs) in enumerate(group):
        layer = dep.layer
        root_idxs = group[i].root_idxs
        if dep.pruning_fn not in CONV_IN_FNS or root_idxs is None or any(r is None for r in root_idxs):
            continue
        if isinstance(layer, nn.modules.conv._ConvNd) and layer.groups != 1:
            continue
        result.append((layer, torch.as_tensor(list(idxs), dtype=torch.long), torch.as_tensor(root_idxs)))
    return result


def conv_columns(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``module(x)`` written as a product of input columns and weights, channel by channel.

    Returns ``cols`` (B, C, K, L) and ``weight`` (O, C, K) with ``module(x)[b, o, l] - bias[o] =
    Σ_c Σ_k cols[b, c, k, l] · weight[o, c, k]``, so that ``cols[b, :, :, l] · weight[o]`` summed over k is each
    input channel's contribution to one output entry (ThiNet's z_c). A ``ConvTranspose2d`` is the plain
    convolution of its input with zeros inserted between pixels (stride − 1 of them), padded by
    dilation · (k − 1) − padding (plus ``output_padding`` at the end), with the kernel flipped and its in/out
    dims swapped. None for layers other than dense (groups = 1) Conv2d and ConvTranspose2d.
    """
    if not isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)) or module.groups != 1:
        return None
    weight = module.weight.detach().float()
    if isinstance(module, nn.ConvTranspose2d):
        b, c, h, w = x.shape
        (sh, sw), (dh, dw), (kh, kw) = module.stride, module.dilation, module.kernel_size
        spread = x.new_zeros(b, c, (h - 1) * sh + 1, (w - 1) * sw + 1)
        spread[:, :, ::sh, ::sw] = x
        ph, pw = dh * (kh - 1) - module.padding[0], dw * (kw - 1) - module.padding[1]
        oh, ow = module.output_padding
        x = nn.functional.pad(spread, (pw, pw + ow, ph, ph + oh))  # negative amounts crop
        weight = weight.flip(-2, -1).transpose(0, 1)
        cols = nn.functional.unfold(x, module.kernel_size, module.dilation, 0, 1)
    else:
        cols = nn.functional.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
    return cols.view(x.shape[0], weight.shape[1], -1, cols.shape[-1]), weight.flatten(2)


class ThiNetImportance(tp.importance.Importance):
    """ThiNet (Luo et al. 2017): keep the channels that best reconstruct the *next* layer's output.

    ``collect`` runs the calibration batches once and stores, for every consumer conv of every group, each
    input channel's contribution to randomly sampled output entries (z_c in the ThiNet paper). The score of a
    channel is then its position in ThiNet's greedy order: we repeatedly remove the channel whose contribution
    adds the least to the squared reconstruction error of the removed set, so the channel removed first is the
    least important. A root channel read several times by one consumer (an SPP concat of x and its pooled
    copies) contributes the sum of its copies' z, since removing it removes all of them. Groups without a dense
    consumer (Conv2d, ConvTranspose2d or Linear) fall back to filter L1 norm.
    """

    def __init__(self, samples_per_batch: int = 128, seed: int = 0) -> None:
        self.samples_per_batch = samples_per_batch
        self.seed = seed
        self.contributions: dict[nn.Module, torch.Tensor] = {}
        self.fallback = L1FilterImportance()

    @torch.no_grad()
    def collect(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        consumers: Iterable[nn.Module],
        forward: Callable[[nn.Module, Any], Any],
    ) -> None:
        """Record sampled per-channel contributions of every consumer layer over the calibration batches."""
        generator = torch.Generator().manual_seed(self.seed)
        chunks: dict[nn.Module, list[torch.Tensor]] = {}

        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: Any) -> None:
            x = inputs[0].detach().float()
            m = self.samples_per_batch
            if isinstance(module, nn.Linear):
                flat = x.reshape(-1, x.shape[-1])
                ri = torch.randint(flat.shape[0], (m,), generator=generator)
                oi = torch.randint(module.out_features, (m,), generator=generator)
                z = flat[ri] * module.weight.detach().float()[oi]
            else:
                unfolded = conv_columns(module, x)
                if unfolded is None:
                    return  # no columns from a layer we cannot sample (a group with none: L1 norm)
                cols, weight = unfolded  # (B, C, K, L), (O, C, K)
                bi = torch.randint(cols.shape[0], (m,), generator=generator)
                li = torch.randint(cols.shape[-1], (m,), generator=generator)
                oi = torch.randint(weight.shape[0], (m,), generator=generator)
                z = (cols[bi, :, :, li] * weight[oi]).sum(-1)  # (m, C)
            chunks.setdefault(module, []).append(z.cpu())

        handles = [m.register_forward_hook(hook) for m in consumers]
        was_training = model.training
        model.eval()
        try:
            for batch in batches:
                forward(model, batch)
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()
        self.contributions = {m: torch.cat(z, 0) for m, z in chunks.items()}

    @staticmethod
    def greedy_order(z: torch.Tensor) -> torch.Tensor:
        """Greedy removal order over the columns of ``z`` (samples × channels): least harmful first."""
        n = z.shape[1]
        removed = torch.zeros(n, dtype=torch.bool)
        running = torch.zeros(z.shape[0])
        order = []
        for _ in range(n):
            cost = ((running.unsqueeze(1) + z) ** 2).sum(0)
            cost[removed] = float("inf")
            pick = int(torch.argmin(cost))
            order.append(pick)
            removed[pick] = True
            running += z[:, pick]
        return torch.as_tensor(order)

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        n = group_size(group)
        columns = torch.zeros(0, n)
        for layer, idxs, root in _consumers(group):
            z = self.contributions.get(layer)
            if z is None:
                continue
            block = torch.zeros(z.shape[0], n)
            block.index_add_(1, root, z[:, idxs])  # SPP: x and its pooled copies all carry one root channel
            columns = torch.cat([columns, block], 0)
        if columns.shape[0] == 0:
            return self.fallback(group)
        order = self.greedy_order(columns)
        score = torch.empty(n)
        score[order] = torch.arange(n, dtype=torch.float32)
        return score
