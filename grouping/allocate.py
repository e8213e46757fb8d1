"""Turn a total pruning proportion into one |γ| threshold per group (paper §4.2.2, Table 1).

Three strategies:

* ``explicit``: the caller gives a ratio per group (the paper's Table 1 rows); each group's threshold is the
  matching quantile of its own |γ|.
* ``paper``: §4.2.2 as written: p_i = n_i / N is group i's share of the prunable channels and g_i = p_i · P.
  Read as "g_i is group i's share of *all* removed channels", group i loses g_i · N = P · n_i channels, i.e. the
  fraction P of its own channels, at its own threshold t_i (the P-quantile of its |γ|). (Read as a ratio inside
  the group instead, the total would be P · Σ p_i² < P and could never meet the request, so that reading is not
  the one implemented.) The quantile level is then adjusted by bisection so that coupling and the chosen budget
  still meet P. Note that this yields near-uniform group ratios; the paper's Table 1 ratios (10 %–96 %) cannot
  come from this formula, which is why ``valley`` exists.
* ``valley``: each group's threshold is placed at the valley between the near-zero mode and the important mode
  of its own |γ| distribution (what dynamic sparse training produces, Fig. 9), so each group loses what sparse
  training marked redundant in it; a budget beyond that takes the same share of every group's surviving
  channels, ranked inside the group. Groups without a valley (and a warning names them) lose only that share.
  One position is found by bisection so that the total meets the budget (see :func:`_valley_thresholds`).

The automatic strategies (``paper``, ``valley``) never take more than ``max_group_ratio`` (default
:data:`MAX_GROUP_RATIO`) of one group's γ: a group emptied of its channels is a backbone stage no fine-tuning
recovers.

``budget`` is a callable mapping thresholds to the achieved fraction, so that coupling (residual vote) and the
``params``/``macs`` budgets are measured by the caller (``gcp``) while the search stays here.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .partition import Group

Budget = Callable[[Mapping[str, float]], float]
TOLERANCE = 0.005  # 0.5 percentage points
MAX_GROUP_RATIO = 0.9


@dataclass
class Allocation:
    """Per-group thresholds and the resulting ratios; ``achieved`` is the budget measure of the result."""

    thresholds: dict[str, float]
    ratios: dict[str, float]
    achieved: float
    requested: float | None
    strategy: str


def group_values(groups: Sequence[Group], importances: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Concatenate the per-layer importances (|γ|) of each group into one flat float64 tensor (float32 would
    merge scores that a tie-break separated by less than its rounding step)."""
    values = {}
    for g in groups:
        missing = [n for n in g.layers if n not in importances]
        if missing:
            raise KeyError(f"group {g.name!r}: no importance for layers {missing[:5]}")
        values[g.name] = (
            torch.cat([importances[n].detach().flatten().double() for n in g.layers])
            if g.layers
            else torch.empty(0, dtype=torch.float64)
        )
    return values


def quantile_threshold(values: torch.Tensor, ratio: float) -> float:
    """A threshold below which exactly ``round(ratio * n)`` of ``values`` lie (midpoint between neighbours)."""
    n = values.numel()
    if n == 0:
        return 0.0
    k = int(round(min(max(ratio, 0.0), 1.0) * n))
    ordered = torch.sort(values).values
    if k <= 0:
        return float(ordered[0]) * 0.5 if float(ordered[0]) > 0 else 0.0
    if k >= n:
        return float(ordered[-1]) * 1.0001 + 1e-12
    return float(ordered[k - 1] + ordered[k]) / 2.0


#: A valley counts only when the histogram dips below this share of the lower of its two modes ...
VALLEY_DIP = 0.25
#: ... and the modes lie at least this many decades of |γ| apart (sparse training's near-zero mode vs 1).
VALLEY_DECADES = 1.0


def find_valley(values: torch.Tensor, bins: int = 60) -> float | None:
    """The |γ| at the valley between the near-zero mode and the important mode of a log-|γ| histogram, or None.

    Sparse training (eq. 3) pushes unimportant γ towards zero while important ones stay large, so log|γ| is
    bimodal (Fig. 9). We smooth a histogram of log10|γ|, take its two highest separated peaks and return the
    lowest point between them. A group whose γ show no such separation (no sparse training yet, or none of its
    channels redundant) has no valley: any point of a unimodal histogram is noise, and a threshold read from
    it empties or spares the group by chance. We require a real dip (below ``VALLEY_DIP`` of the lower mode)
    between modes at least ``VALLEY_DECADES`` apart, and return None otherwise.
    """
    v = values.detach().abs().float().flatten()
    if v.numel() < 4:
        return None
    logs = torch.log10(v.clamp_min(1e-12))
    lo, hi = float(logs.min()), float(logs.max())
    if hi - lo < VALLEY_DECADES:
        return None
    hist = torch.histc(logs, bins=bins, min=lo, max=hi)
    kernel = torch.tensor([1.0, 2.0, 3.0, 2.0, 1.0]) / 9.0
    smooth = torch.nn.functional.conv1d(hist.view(1, 1, -1), kernel.view(1, 1, -1), padding=2).view(-1)
    width = (hi - lo) / bins
    peaks = [
        i
        for i in range(bins)
        if smooth[i] > 0
        and (i == 0 or smooth[i] >= smooth[i - 1])
        and (i == bins - 1 or smooth[i] >= smooth[i + 1])
    ]
    peaks.sort(key=lambda i: float(smooth[i]), reverse=True)
    if not peaks:
        return None
    first = peaks[0]
    separated = [p for p in peaks[1:] if abs(p - first) * width >= VALLEY_DECADES]
    if not separated:
        return None
    a, b = sorted((first, separated[0]))
    valley_bin = a + int(torch.argmin(smooth[a : b + 1]))
    if float(smooth[valley_bin]) > VALLEY_DIP * min(float(smooth[a]), float(smooth[b])):
        return None
    return float(10 ** (lo + (valley_bin + 0.5) * width))


def bisect(measure: Callable[[float], float], target: float, lo: float, hi: float, steps: int = 48) -> float:
    """The smallest x in [lo, hi] with measure(x) >= target, for a non-decreasing measure (bisection).

    Returns whichever of the bracketing points lands closer to the target, so a discrete measure that jumps
    over the target gets its nearest achievable value.
    """
    if measure(hi) < target:
        return hi
    if measure(lo) >= target:
        return lo
    for _ in range(steps):
        mid = (lo + hi) / 2.0
        if measure(mid) >= target:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-9 * max(1.0, abs(hi)):
            break
    return lo if abs(measure(lo) - target) < abs(measure(hi) - target) else hi


def entry_count_budget(values: Mapping[str, torch.Tensor]) -> Budget:
    """Default budget: the fraction of all γ entries below their group's threshold (no coupling)."""
    total = sum(v.numel() for v in values.values())

    def measure(thresholds: Mapping[str, float]) -> float:
        pruned = sum(int((v < thresholds[name]).sum()) for name, v in values.items())
        return pruned / max(total, 1)

    return measure


def _ratios(values: Mapping[str, torch.Tensor], thresholds: Mapping[str, float]) -> dict[str, float]:
    return {
        name: float((v < thresholds[name]).float().mean()) if v.numel() else 0.0 for name, v in values.items()
    }


def allocate(
    groups: Sequence[Group],
    importances: Mapping[str, torch.Tensor],
    ratio: float | Mapping[str, float],
    strategy: str = "valley",
    budget: Budget | None = None,
    max_group_ratio: float = MAX_GROUP_RATIO,
) -> Allocation:
    """Per-group |γ| thresholds for a total pruning proportion ``ratio`` (§4.2.2).

    ``importances`` maps BN layer name → |γ| (or any per-channel score); ``ratio`` is a float for ``paper`` and
    ``valley`` and a mapping group name → ratio for ``explicit``. ``budget(thresholds) -> fraction`` measures
    what a set of thresholds removes; by default the fraction of γ entries below threshold.

    ``max_group_ratio`` caps the share of any one group's γ below its threshold (``paper``/``valley``); the
    other groups then make up the total. 1.0 lifts the cap.
    """
    if not 0.0 < max_group_ratio <= 1.0:
        raise ValueError(f"max_group_ratio must be in (0, 1], got {max_group_ratio}")
    values = group_values(groups, importances)
    measure = budget or entry_count_budget(values)
    names = [g.name for g in groups]

    if strategy == "explicit":
        if not isinstance(ratio, Mapping):
            raise ValueError(
                "allocator 'explicit' needs a mapping group name -> ratio, e.g. {'head': 0.45, ...}"
            )
        unknown = sorted(set(ratio) - set(names))
        if unknown:
            raise ValueError(f"explicit ratios name unknown groups {unknown}; valid groups: {names}")
        missing = [n for n in names if n not in ratio]
        if missing:
            raise ValueError(f"explicit ratios are missing groups {missing}; valid groups: {names}")
        for name, r in ratio.items():
            if not 0.0 <= float(r) < 1.0:
                raise ValueError(f"explicit ratio for group {name!r} must be in [0, 1), got {r}")
        thresholds = {n: quantile_threshold(values[n], float(ratio[n])) for n in names}
        return Allocation(thresholds, _ratios(values, thresholds), measure(thresholds), None, strategy)

    if isinstance(ratio, Mapping):
        raise ValueError(
            f"allocator {strategy!r} takes one total ratio (a float); per-group ratios need 'explicit'"
        )
    ratio = float(ratio)
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")

    caps = {
        n: quantile_threshold(values[n], max_group_ratio) if max_group_ratio < 1.0 else math.inf
        for n in names
    }
    if strategy == "paper":

        def thresholds_at(level: float) -> dict[str, float]:
            return {n: min(quantile_threshold(values[n], level), caps[n]) for n in names}

        level = bisect(lambda q: measure(thresholds_at(q)), ratio, 0.0, 1.0)
        thresholds = thresholds_at(level)
    elif strategy == "valley":
        thresholds_at = _valley_thresholds(groups, values, caps)
        scale = bisect(lambda s: measure(thresholds_at(s)), ratio, 0.0, 2.0)
        thresholds = thresholds_at(scale)
    else:
        raise ValueError(f"unknown allocator {strategy!r}; choose from 'explicit', 'paper', 'valley'")

    achieved = measure(thresholds)
    warn_if_missed(achieved, ratio)
    return Allocation(thresholds, _ratios(values, thresholds), achieved, ratio, strategy)


def _valley_thresholds(
    groups: Sequence[Group], values: Mapping[str, torch.Tensor], caps: Mapping[str, float]
) -> Callable[[float], dict[str, float]]:
    """Thresholds of the ``valley`` strategy as a function of one position x in [0, 2] (non-decreasing).

    First the channels sparse training marked redundant go: for x ≤ 1 every group with a valley
    (:func:`find_valley`) has threshold x · valley, so x = 1 removes exactly the near-zero modes and nothing
    else. Past that every group also loses the same fraction x − 1 of its surviving channels (those above its
    valley), weakest |γ| first inside the group: the groups' shares stay ordered by how much sparse training
    found redundant in each, and |γ| is never compared across groups, whose scales need not agree (with
    ``gcp.DynamicSparsity``'s layer-relative penalty they are not calibrated against each other; comparing
    them globally is Network Slimming, ``method="slim"``). A group without a valley has no near-zero mode, so
    all its channels count as survivors, and a warning names it.
    """
    names = [g.name for g in groups]
    valleys = {n: find_valley(values[n]) for n in names}
    missing = [n for n in names if valleys[n] is None and values[n].numel()]
    if missing:
        warnings.warn(
            f"groups {missing} show no valley between a near-zero and an important |γ| mode (too little sparse "
            "training, or no redundant channels); they lose only the share every group gives up beyond its "
            "near-zero mode",
            stacklevel=4,
        )
    survivors = {n: values[n][values[n] >= (valleys[n] or 0.0)] for n in names}

    def thresholds_at(x: float) -> dict[str, float]:
        result = {}
        for n in names:
            own = valleys[n] or 0.0
            if x <= 1.0:
                threshold = own * x
            else:
                threshold = (
                    max(own, quantile_threshold(survivors[n], x - 1.0)) if survivors[n].numel() else own
                )
            result[n] = min(threshold, caps[n])
        return result

    return thresholds_at


def warn_if_missed(achieved: float, requested: float) -> None:
    """Warn when the nearest achievable budget is more than 0.5 percentage points from the request."""
    if math.fabs(achieved - requested) > TOLERANCE:
        warnings.warn(
            f"requested pruning ratio {requested:.4f} is not reachable exactly: the nearest achievable is "
            f"{achieved:.4f} (channels are removed in coupled units and some layers must keep min_keep/round_to "
            "channels)",
            stacklevel=3,
        )
