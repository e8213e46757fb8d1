"""``prune_detector``: decide which channels go, then let torch-pruning's DependencyGraph remove them.

Data flows one way: model → ``grouping.partition`` → ``grouping.allocate`` → importance (``gcp.core.importance``) →
DependencyGraph → report. The DependencyGraph is the only authority on which channels are coupled (residual
adds, concats, splits); this module never writes per-architecture channel rules.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gcp.core.graph import build_graph, crosses_channel_split
from gcp.core.importance import (
    CONV_IN_FNS,
    CONV_OUT_FNS,
    DEPTHWISE_FNS,
    NORM_OUT_FNS,
    L1FilterImportance,
    RandomImportance,
    ThiNetImportance,
    coupled_scores,
)
from gcp.core.latency import (
    LatencyTable,
    LatencyTimer,
    TracedNetwork,
    cache_dir,
    conv_specs,
    latency_table,
    resolve_timer,
)
from gcp.core.lcp import LCPImportance, check_calib_targets
from gcp.core.registry import Adapter, failing_module, resolve_adapter, snapshot_submodules, tracing_hint
from gcp.core.report import before_after, build_report, out_channels
from gcp.core.serialize import save_pruned
from gcp.limits import PRUNE_RATIO
from gcp.vocab import ALLOCATORS, BN_FREE, BUDGETS, COUPLINGS, PRUNE_METHODS
from grouping import (
    Group,
    allocate,
    bisect,
    groups_from_patterns,
    load_group_patterns,
    partition,
    prunable_norms,
)
from grouping.allocate import MAX_GROUP_RATIO, warn_if_missed
from grouping.trace import ForwardFn, Observation, Recorder, first_image_tensor, run_forward

OUT_FNS = CONV_OUT_FNS + DEPTHWISE_FNS + NORM_OUT_FNS


@dataclass
class Member:
    """One layer inside a coupled unit: which of its channels map to which root channel."""

    name: str
    module: nn.Module
    local: torch.Tensor
    root: torch.Tensor


@dataclass
class Unit:
    """A torch-pruning group: root channels that can only be removed together with all coupled channels."""

    group: Any
    root_name: str
    size: int
    norms: list[Member] = field(default_factory=list)
    outs: list[Member] = field(default_factory=list)
    ins: list[Member] = field(default_factory=list)

    @property
    def subsets(self) -> list[torch.Tensor]:
        """Root channels of each output layer of the unit (a concat input covers only part of the root)."""
        if not hasattr(self, "_subsets"):
            self._subsets = [torch.unique(m.root) for m in self.outs if m.root.numel() < self.size]
        return self._subsets

    @property
    def carriers(self) -> list[Member]:
        """Entries counted by the ``channels`` budget: one per BN γ (the paper's count), else conv filters."""
        return self.norms or [
            m for m in self.outs if not isinstance(m.module, nn.modules.batchnorm._BatchNorm)
        ]


@dataclass
class PruneResult:
    """The pruned model (same object as the input, pruned in place), its report and replayable history."""

    model: nn.Module
    report: dict[str, Any]
    history: list[list[Any]]
    input_shape: list[int]
    adapter: str | None = None

    def save(self, path: str | Path) -> Path:
        """Write weights + a plain description of the kept channels (see :func:`gcp.load_pruned`)."""
        return save_pruned(self, path)

    def following(self, history: list[list[Any]], report: dict[str, Any]) -> PruneResult:
        """This pruning as a later step of a model already pruned by ``history`` (its report ``report``): a
        pruned model fine-tuned and pruned again, as iterative pruning does. A step's history indexes the
        channels the model had when it ran, so the unpruned base is rebuilt by replaying the earlier steps
        first; the returned result carries both histories in that order and a report whose ``params``/``macs``
        (and, for those budgets, ``achieved``) compare with the unpruned base, each step's own report kept under
        ``steps``. Raises ValueError when the earlier report lacks the counts to compare with."""
        try:
            before = {key: report[key]["before"] for key in ("params", "macs")}
        except (KeyError, TypeError):
            raise ValueError("the earlier pruning's report has no params/macs before-counts") from None
        chained = {**self.report, "steps": [*report.get("steps", [report]), self.report]}
        for key in ("params", "macs"):
            chained[key] = before_after(before[key], self.report[key]["after"])
        if self.report.get("budget") in ("params", "macs"):
            chained["achieved"] = chained[self.report["budget"]]["pruned"]
        return replace(self, report=chained, history=[*history, *self.history])


@dataclass(frozen=True)
class _Spec:
    """Everything one pruning pass needs besides the model, its inputs and the ratio; checked once, by
    :func:`_check_spec`, before the model is touched (``timer`` is the resolved latency timer or None)."""

    method: str
    groups: Any
    allocator: str
    budget: str
    coupling: str
    ignored_layers: Iterable[nn.Module | str] | None
    round_to: int | None
    min_keep: int
    max_group_ratio: float
    forward_fn: ForwardFn | None
    output_transform: Callable[[Any], Any] | None
    calib_data: Any
    seed: int
    adapter: str | Adapter | None
    bn_free: str
    timer: LatencyTimer | None
    latency_cache: str | Path | None


def _check_choices(spec: _Spec) -> None:
    for name, value, choices in (
        ("method", spec.method, PRUNE_METHODS),
        ("allocator", spec.allocator, ALLOCATORS),
        ("budget", spec.budget, BUDGETS),
        ("coupling", spec.coupling, COUPLINGS),
        ("bn_free", spec.bn_free, BN_FREE),
    ):
        if value not in choices:
            raise ValueError(f"unknown {name} {value!r}; choose from {choices}")


def _check_ratio(ratio: Any, spec: _Spec) -> None:
    """The one place the ratio is checked: a number in :data:`gcp.limits.PRUNE_RATIO`, or per-group ratios for
    ``allocator="explicit"`` (each group's range is checked by :func:`grouping.allocate`)."""
    if isinstance(ratio, Mapping):
        if spec.method != "gcp" or spec.allocator != "explicit":
            raise ValueError("per-group ratios (a mapping) need method='gcp' and allocator='explicit'")
        return
    if ratio not in PRUNE_RATIO:
        raise ValueError(f"ratio must be a number in {PRUNE_RATIO}, got {ratio!r}")
    if spec.method == "gcp" and spec.allocator == "explicit":
        raise ValueError("allocator='explicit' needs ratio as a mapping group name -> ratio")


def _check_spec(ratio: Any, spec: _Spec, latency_checks: int) -> None:
    """Refuse bad input before anything is touched, naming the argument."""
    _check_choices(spec)
    _check_ratio(ratio, spec)
    if spec.round_to is not None and (not isinstance(spec.round_to, int) or spec.round_to < 1):
        raise ValueError(f"round_to must be a positive integer or None, got {spec.round_to!r}")
    if not isinstance(spec.min_keep, int) or spec.min_keep < 1:
        raise ValueError(f"min_keep must be an integer >= 1, got {spec.min_keep!r}")
    if not 0.0 < spec.max_group_ratio <= 1.0:
        raise ValueError(f"max_group_ratio must be in (0, 1], got {spec.max_group_ratio!r}")
    if spec.method == "thinet" and spec.calib_data is None:
        raise ValueError(
            "method='thinet' needs calib_data: a few image batches to measure reconstruction error"
        )
    if spec.method == "lcp":
        check_calib_targets(spec.calib_data)
    if not isinstance(latency_checks, int) or isinstance(latency_checks, bool) or latency_checks < 0:
        raise ValueError(f"latency_checks must be an integer >= 0, got {latency_checks!r}")


def _resolve_ignored(model: nn.Module, ignored: Iterable[nn.Module | str] | None) -> list[nn.Module]:
    modules = dict(model.named_modules())
    result = []
    for item in ignored or []:
        if isinstance(item, str):
            if item not in modules:
                raise ValueError(f"ignored_layers: no module named {item!r} in the model")
            result.append(modules[item])
        elif isinstance(item, nn.Module):
            result.append(item)
        else:
            raise TypeError(f"ignored_layers takes modules or module names, got {type(item).__name__}")
    return result


def _touches_grouped_conv(group: Any) -> bool:
    """True when a group's channels enter or leave a grouped conv that is not depthwise (ResNeXt, RegNet).

    torch-pruning 1.6 prunes such a conv as if it were dense, leaving a weight whose channel counts are no
    longer divisible by ``groups``; those channels are kept whole. Depthwise convs (groups = in = out) are fine.
    """
    return any(
        isinstance(dep.layer, nn.modules.conv._ConvNd)
        and dep.layer.groups > 1
        and not dep.layer.groups == dep.layer.in_channels == dep.layer.out_channels
        for dep, _ in group
    )


def _units(model: nn.Module, graph: Any, ignored: list[nn.Module]) -> list[Unit]:
    names = {m: n for n, m in model.named_modules()}
    units = []
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=(nn.Conv2d, nn.Linear)):
        if crosses_channel_split(graph, group) or _touches_grouped_conv(group):
            continue
        root = group[0].dep.target.module
        unit = Unit(group=group, root_name=names[root], size=len(group[0].idxs))
        for i, (dep, idxs) in enumerate(group):
            root_idxs = group[i].root_idxs
            if root_idxs is None or any(r is None for r in root_idxs) or not isinstance(dep.layer, nn.Module):
                continue
            member = Member(
                names.get(dep.layer, ""), dep.layer, torch.as_tensor(list(idxs)), torch.as_tensor(root_idxs)
            )
            if dep.pruning_fn in NORM_OUT_FNS and getattr(dep.layer, "affine", False):
                unit.norms.append(member)
            if dep.pruning_fn in OUT_FNS:
                unit.outs.append(member)
            elif dep.pruning_fn in CONV_IN_FNS:
                unit.ins.append(member)
        units.append(unit)
    return units


def _check_round_to(units: Sequence[Unit], round_to: int | None) -> list[str]:
    """The layers too small to round (fewer channels than ``round_to``): they are left whole, and a warning
    names them. A stem of 8 channels must not stop ``round_to=16`` for the rest of the network; only a
    ``round_to`` above every prunable layer is refused."""
    if round_to is None or round_to == 1 or not units:
        return []
    small = [u.root_name for u in units if u.size < round_to]
    if len(small) == len(units):
        largest = max(units, key=lambda u: u.size)
        raise ValueError(
            f"round_to={round_to} is larger than every prunable layer (the largest, {largest.root_name!r}, has "
            f"{largest.size} channels); pass a smaller round_to, or round_to=1 not to round"
        )
    if small:
        warnings.warn(
            f"round_to={round_to}: {len(small)} layers have fewer channels and are left whole, e.g. {small[:4]}",
            stacklevel=4,
        )
    return small


# The multiple kept channel counts are rounded to when the caller names none and no runtime is timed: the
# deployment target's, never this CPU's, so the same call gives the same architecture on every machine. 8 is
# TensorRT's tensor-core multiple and ONNX Runtime's NCHWc block on AVX2 CPUs (16 on AVX-512, where a multiple
# of 8 still runs, in a half-used block): it serves the common edge targets.
DEFAULT_ROUND_TO = 8


@dataclass(frozen=True)
class _Rounding:
    """The channel multiple kept layers are rounded to (None: no rounding), the layers left whole as smaller
    than it, and why this multiple (the report's ``round_to.source``)."""

    multiple: int | None
    left_whole: list[str]
    source: str

    def report(self) -> dict[str, Any] | None:
        if self.multiple is None:
            return None
        return {"multiple": self.multiple, "left_whole": self.left_whole, "source": self.source}


def _resolve_round_to(units: Sequence[Unit], round_to: int | None, timer: LatencyTimer | None) -> _Rounding:
    """The channel multiple kept layers are rounded to, and the layers left whole as smaller than it.

    Unrounded cuts buy little time: measured on YOLOv8n at 40 % of its MACs (docs/design.md, "Latency"), an
    unrounded cut buys 0.06–0.57 of its MACs cut in ONNX Runtime time, rounded to 8 0.83–0.89, because convs
    whose channels are off the block leave the blocked layout. So ``round_to=None`` (the default) rounds to
    :data:`DEFAULT_ROUND_TO`, a fixed deployment multiple, except with ``budget="latency"``, where the user
    asked for a runtime timed here and its own ``align`` is used (ONNX Runtime on this CPU: 8, or 16 with
    AVX-512). Layers smaller than the default multiple are left whole without a warning (the report lists
    them), and a model whose every layer is smaller is not rounded; an explicit ``round_to`` warns and refuses
    as :func:`_check_round_to` says.
    """
    if round_to is not None:
        source = "round_to=1: no rounding" if round_to == 1 else f"round_to={round_to} (given)"
        return _Rounding(round_to, _check_round_to(units, round_to), source)
    if timer is not None:
        multiple = timer.align
        source = f"the channel block of the timed runtime ({timer.describe()['runtime']}), on this machine"
    else:
        multiple = DEFAULT_ROUND_TO
        source = f"default: {DEFAULT_ROUND_TO}, TensorRT's and ONNX Runtime's (AVX2) channel multiple"
    if not units or all(u.size < multiple for u in units):
        return _Rounding(None, [], f"{source}; every prunable layer is smaller, so none is rounded")
    return _Rounding(multiple, [u.root_name for u in units if u.size < multiple], source)


def _give_back(prune: torch.Tensor, rank: torch.Tensor, candidates: torch.Tensor, count: int) -> None:
    """Un-prune the ``count`` best-ranked pruned channels among ``candidates`` (in place)."""
    if count <= 0:
        return
    pruned = candidates[prune[candidates]]
    best = pruned[torch.argsort(rank[pruned], descending=True)[:count]]
    prune[best] = False


def _constrain(
    unit: Unit, prune: torch.Tensor, rank: torch.Tensor, floor: int, round_to: int | None
) -> torch.Tensor:
    """Give channels back (best ``rank`` first) until every layer keeps ``floor`` and counts are rounded."""
    keep_target = max(int((~prune).sum()), min(floor, unit.size))
    if round_to:
        keep_target = min(unit.size, int(math.ceil(keep_target / round_to)) * round_to)
    prune = prune.clone()
    _give_back(prune, rank, torch.arange(unit.size), keep_target - int((~prune).sum()))
    for subset in unit.subsets:
        _give_back(prune, rank, subset, min(floor, subset.numel()) - int((~prune[subset]).sum()))
    return prune


class _Decider:
    """Turns thresholds (γ methods) or a uniform fraction (l1/thinet/random) into per-unit prune masks.

    ``secondary`` (γ methods) holds a score for each unit that carries no BatchNorm, None for the others:
    such units have no γ to threshold and are ranked by it instead (see :meth:`by_thresholds`).
    """

    def __init__(
        self,
        units: Sequence[Unit],
        floor: int,
        round_to: int | None,
        scores: Mapping[str, torch.Tensor] | None = None,
        secondary: Sequence[torch.Tensor | None] | None = None,
    ) -> None:
        self.units = units
        self.floor = floor
        self.round_to = round_to
        self.secondary = secondary
        self.gammas = [
            [
                (scores[m.name] if scores is not None else m.module.weight.detach().abs().float().cpu())[
                    m.local
                ]
                for m in u.norms
            ]
            for u in units
        ]

    def by_thresholds(self, thresholds: Mapping[str, float], coupling: str) -> list[torch.Tensor]:
        """Masks from per-layer |γ| thresholds, coupled channels decided by ``coupling`` (§4.2.3).

        Units without a BatchNorm lose, by their ``secondary`` score, the share of γ channels the thresholds
        remove from the units that have one: the paper's criterion decides how much goes, and where it can.
        """
        masks = []
        removed = total = 0
        for unit, gammas in zip(self.units, self.gammas):
            if not unit.norms:
                masks.append(torch.zeros(unit.size, dtype=torch.bool))
                continue
            normalised = [g / max(thresholds[m.name], 1e-12) for g, m in zip(gammas, unit.norms)]
            roots = [m.root for m in unit.norms]
            score = coupled_scores(normalised, roots, unit.size, coupling)
            rank = coupled_scores(normalised, roots, unit.size, "mean")
            covered = torch.zeros(unit.size, dtype=torch.bool)
            for r in roots:
                covered[r] = True
            prune = (score <= 0.5 if coupling == "vote" else score < 1.0) & covered
            masks.append(_constrain(unit, prune, rank, self.floor, self.round_to))
            removed += sum(int(masks[-1][m.root].sum()) for m in unit.norms)
            total += sum(m.root.numel() for m in unit.norms)
        for i, score in enumerate(self.secondary or []):
            if score is not None:
                masks[i] = self._fraction_mask(self.units[i], score, removed / max(total, 1))
        return masks

    def by_fraction(self, scores: Sequence[torch.Tensor], fraction: float) -> list[torch.Tensor]:
        return [self._fraction_mask(unit, score, fraction) for unit, score in zip(self.units, scores)]

    def _fraction_mask(self, unit: Unit, score: torch.Tensor, fraction: float) -> torch.Tensor:
        prune = torch.zeros(unit.size, dtype=torch.bool)
        prune[torch.argsort(score)[: int(math.floor(fraction * unit.size))]] = True
        return _constrain(unit, prune, score, self.floor, self.round_to)


class _Budget:
    """Measures what a set of prune masks removes: γ entries, parameters, MACs or predicted latency (fractions
    of the total)."""

    def __init__(
        self,
        units: Sequence[Unit],
        kind: str,
        layer_macs: Mapping[nn.Module, float],
        layer_params: Mapping[nn.Module, float],
        total_macs: float,
        total_params: float,
        latency: LatencyTable | None = None,
    ) -> None:
        self.units = units
        self.kind = kind
        self.latency = latency
        self.names = {m.module: m.name for u in units for m in (*u.outs, *u.ins)}
        self.total_carriers = sum(m.local.numel() for u in units for m in u.carriers)
        self.costs = {"macs": (layer_macs, total_macs), "params": (layer_params, total_params)}
        self.base_out: dict[nn.Module, int] = {}
        self.base_in: dict[nn.Module, int] = {}
        for unit in units:
            for m in unit.outs:
                self.base_out[m.module] = out_channels(m.module)
            for m in unit.ins:
                self.base_in[m.module] = _in_channels(m.module)

    def __call__(self, masks: Sequence[torch.Tensor]) -> float:
        return self.fraction(masks, self.kind)

    def fraction(self, masks: Sequence[torch.Tensor], kind: str) -> float:
        """Fraction of the model's ``kind`` (channels, params or macs) that ``masks`` remove.

        For MACs this is exact arithmetic, not an estimate: a conv's MACs are out × in/groups × k² × H × W, so
        removing channels scales them by the kept fractions. Parameters likewise, except that a bias only
        shrinks with the outputs. A depthwise conv (and a BatchNorm) loses inputs and outputs together, so its
        cost scales once, by the kept outputs.

        Latency is the :class:`gcp.core.latency.LatencyTable`'s prediction from each conv's kept channel counts.
        """
        if kind == "channels":
            pruned = sum(int(mask[m.root].sum()) for u, mask in zip(self.units, masks) for m in u.carriers)
            return pruned / max(self.total_carriers, 1)
        out_pruned: dict[nn.Module, int] = {}
        in_pruned: dict[nn.Module, int] = {}
        for unit, mask in zip(self.units, masks):
            for m in unit.outs:
                out_pruned[m.module] = out_pruned.get(m.module, 0) + int(mask[m.root].sum())
            for m in unit.ins:
                in_pruned[m.module] = in_pruned.get(m.module, 0) + int(mask[m.root].sum())
        if kind == "latency" and self.latency is not None:
            return self.latency.removed_fraction(
                {
                    self.names[m]: (in_pruned.get(m, 0), out_pruned.get(m, 0))
                    for m in set(out_pruned) | set(in_pruned)
                }
            )
        costs, total = self.costs[kind]
        removed = 0.0
        for module in set(out_pruned) | set(in_pruned):
            cost = float(costs.get(module) or 0.0)
            keep_out = 1.0 - out_pruned.get(module, 0) / max(self.base_out.get(module, 1), 1)
            keep_in = 1.0 - in_pruned.get(module, 0) / max(self.base_in.get(module, 1), 1)
            depthwise = (
                isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels
            )
            if isinstance(module, nn.modules.batchnorm._BatchNorm) or depthwise:
                keep = keep_out
            else:
                keep = keep_out * keep_in
            bias = getattr(module, "bias", None)
            per_output = float(bias.numel()) if kind == "params" and isinstance(bias, torch.Tensor) else 0.0
            removed += (cost - per_output) * (1.0 - keep) + per_output * (1.0 - keep_out)
        return removed / max(total, 1.0)


def _in_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    return int(getattr(module, "in_channels", 0))


def _calibration_batches(calib_data: Any, example_inputs: Any) -> list[Any]:
    if calib_data is None:
        return [example_inputs]
    if isinstance(calib_data, torch.Tensor):
        return [calib_data]
    batches = list(calib_data)
    if not batches:
        raise ValueError("calib_data is empty: ThiNet and offset compensation need at least one batch")
    return [
        b[0] if isinstance(b, (list, tuple)) and isinstance(b[0], torch.Tensor) and b[0].dim() == 4 else b
        for b in batches
    ]


def _input_means(
    model: nn.Module, modules: Iterable[nn.Module], batches: Sequence[Any], forward_fn: ForwardFn | None
) -> dict[nn.Module, torch.Tensor]:
    """Per-channel mean input of ``modules`` over the calibration batches (no grad, caller sets eval mode)."""
    sums: dict[nn.Module, torch.Tensor] = {}
    counts: dict[nn.Module, int] = {}

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], _out: Any) -> None:
        x = inputs[0].detach().float()
        channel_dim = 1 if x.dim() == 4 else x.dim() - 1
        dims = [d for d in range(x.dim()) if d != channel_dim]
        sums[module] = sums.get(module, 0) + x.sum(dim=dims).cpu()
        counts[module] = counts.get(module, 0) + x.numel() // max(x.shape[channel_dim], 1)

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        with torch.no_grad():
            for batch in batches:
                run_forward(model, batch, forward_fn)
    finally:
        for h in handles:
            h.remove()
    return {m: sums[m] / max(counts[m], 1) for m in sums}


def _constant_response(
    module: nn.Module, mean: torch.Tensor, removed: torch.Tensor
) -> tuple[torch.Tensor, bool]:
    """What constant inputs ``mean`` on input channels ``removed`` add to each output channel of ``module``.

    Returns the per-output-channel shift and whether it is exact (the same at every output position, away from
    zero-padded borders). A linear layer or convolution adds Σ_k W[o, c, k] · mean_c: exact. A transposed
    convolution (weight (in, out, k…)) sends input pixel i to outputs i · s − p + k · d, so output position q
    receives only the taps with k · d ≡ q + p (mod s), one residue class per dim: a constant input becomes a
    pattern that repeats every s pixels (stride = kernel: the tiled kernel itself), which a per-channel bias
    cannot hold unless the classes sum alike (always for s = 1). Each of the s classes covers the same share of
    the output, so we fold the pattern's spatial mean, Σ_k W[c, o, k] · mean_c / Π s: the least-squares
    constant, leaving every output channel's mean unchanged and a zero-mean periodic residual.
    """
    weight = module.weight.detach().float()
    mean = mean.to(weight.device)
    if isinstance(module, nn.Linear):
        return weight[:, removed] @ mean, True
    if not isinstance(module, nn.modules.conv._ConvTransposeNd):
        return (weight[:, removed].flatten(2).sum(-1) * mean).sum(1), True
    pattern = torch.einsum("c o ..., c -> o ...", weight[removed], mean)  # (out, k1, ..., kn)
    for axis, (k, s, d) in enumerate(zip(module.kernel_size, module.stride, module.dilation), start=1):
        classes = nn.functional.one_hot((torch.arange(k) * d) % s, s).to(pattern)  # tap -> residue class
        pattern = (pattern.movedim(axis, -1) @ classes).movedim(-1, axis)
    shift = pattern.flatten(1).mean(1)
    residual = (pattern.flatten(1) - shift[:, None]).abs().max()
    return shift, bool(residual <= 1e-6 * max(float(pattern.abs().max()), 1e-12))


def _compensate(
    graph: Any, units: Sequence[Unit], masks: Sequence[torch.Tensor], means: Mapping[nn.Module, torch.Tensor]
) -> int:
    """Fold the mean activation of every removed channel into its consumers (bias or next BN running mean).

    A removed channel still carried a value: for γ = 0 exactly the constant act(β), otherwise on average its
    mean. Its consumer added the response to that constant (:func:`_constant_response`) to each output; we add
    it to the consumer's bias, or subtract it from the running mean of the BatchNorm right after a bias-free
    layer. Returns the number of removed consumer channels that had nowhere to fold into; those and the ones a
    transposed conv spreads into a position-dependent pattern are warned about.
    """
    uncompensated = approximate = 0
    with torch.no_grad():
        for unit, mask in zip(units, masks):
            for member in unit.ins:
                module = member.module
                removed = member.local[mask[member.root]]
                if removed.numel() == 0 or module not in means:
                    continue
                if isinstance(module, nn.modules.conv._ConvNd) and module.groups != 1:
                    continue  # depthwise consumers lose the matching outputs too: nothing left to fold into
                delta, exact = _constant_response(module, means[module][removed].float(), removed)
                if not torch.isfinite(delta).all():
                    continue
                if getattr(module, "bias", None) is not None:
                    module.bias.add_(delta.to(module.bias.dtype))
                else:
                    norm = _following_norm(graph, module)
                    if norm is None or norm.running_mean is None:
                        uncompensated += int(removed.numel())
                        continue
                    norm.running_mean.sub_(delta.to(norm.running_mean.dtype))
                approximate += 0 if exact else int(removed.numel())
    if uncompensated:
        warnings.warn(
            f"{uncompensated} removed channels feed a bias-free layer with no BatchNorm after it; their mean "
            "activation could not be folded (the pruned model may shift slightly until fine-tuned)",
            stacklevel=3,
        )
    if approximate:
        warnings.warn(
            f"{approximate} removed channels feed a transposed conv with stride > 1, which turns their constant "
            "activation into a pattern repeating every stride pixels; its spatial mean was folded into the bias, "
            "the zero-mean rest is lost until fine-tuned",
            stacklevel=3,
        )
    return uncompensated


def _following_norm(graph: Any, module: nn.Module) -> nn.Module | None:
    node = graph.module2node.get(module)
    if node is None or len(node.outputs) != 1:
        return None
    nxt = node.outputs[0].module
    return nxt if isinstance(nxt, nn.modules.batchnorm._BatchNorm) else None


def detector_groups(
    model: nn.Module, example_inputs: Any, groups: Any = "auto", adapter: str | Adapter | None = "auto"
) -> list[Group]:
    """The groups ``prune_detector(model, method="gcp", groups=groups)`` sets one threshold in (paper §4.2.1),
    for what must see the same groups without pruning: stage 1's per-group statistics and the γ plots (Fig. 8/9).

    ``"auto"`` traces the model the way pruning does, through its family adapter's forward: a family whose own
    forward decodes its head maps into one tensor (Ultralytics) would otherwise put every layer that reaches that
    tensor in one head, and the groups of stage 1 would not be those of the pruning."""
    if groups != "auto":
        return _given_groups(model, groups)
    family = resolve_adapter(model, adapter)
    return partition(model, example_inputs, forward_fn=family.forward_fn if family is not None else None)


def _gcp_groups(model: nn.Module, example_inputs: Any, groups: Any, seen: Observation) -> list[Group]:
    if groups == "auto":
        return partition(model, example_inputs, observation=seen)
    return _given_groups(model, groups)


def _given_groups(model: nn.Module, groups: Any) -> list[Group]:
    """Groups named by the caller: a YAML of glob patterns, a mapping name → patterns, or Group objects."""
    if isinstance(groups, (str, Path)):
        return groups_from_patterns(model, load_group_patterns(str(groups)))
    if isinstance(groups, Mapping):
        return groups_from_patterns(model, groups)
    if isinstance(groups, Sequence) and all(isinstance(g, Group) for g in groups):
        return list(groups)
    raise TypeError("groups must be 'auto', a YAML path, a mapping name -> glob patterns, or a list of Group")


def gamma_scores(graph: Any, norms: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """|γ| of every BatchNorm channel, with ties broken deterministically by the producing conv's filter norm.

    A freshly built model has every γ = 1, and a quantile of tied values cannot separate them: a threshold
    then removes all or nothing (0 % for any ratio). We add δ_v · r to each |γ| = v, where r ∈ (0, 1] is the
    channel's rank, inside its layer, by the L2 norm of the conv filter that produces it (channel index where
    that ties too), and δ_v is a quarter of the gap from v to the next larger distinct |γ| in the model (at most
    1e-6 of the largest), so the |γ| order itself is never changed. The scores are float64 and δ is taken per
    value: a single global δ below the model's smallest gap fell under float32's rounding step as soon as two
    γ anywhere were one float32 step apart, and tied layers collapsed to one value again. With all γ tied, a
    global threshold then removes the same fraction of every layer, weakest filters first.
    """
    gammas = {n: m.weight.detach().abs().double().cpu() for n, m in norms.items()}
    if not gammas:
        return {}
    distinct = torch.unique(torch.cat(list(gammas.values())))  # sorted
    cap = 1e-6 * max(float(distinct[-1]), 1e-12)
    gap_above = torch.cat([distinct[1:] - distinct[:-1], torch.tensor([4 * cap], dtype=torch.float64)])
    delta_of_value = torch.clamp(gap_above / 4.0, max=cap)
    scores = {}
    for name, gamma in gammas.items():
        secondary = _producer_filter_norms(graph, norms[name])
        if secondary is None or secondary.numel() != gamma.numel():
            secondary = torch.arange(gamma.numel(), dtype=torch.float32)
        order = torch.sort(secondary, stable=True).indices
        rank = torch.empty(gamma.numel(), dtype=torch.float64)
        rank[order] = torch.arange(1, gamma.numel() + 1, dtype=torch.float64) / gamma.numel()
        delta = delta_of_value[torch.searchsorted(distinct, gamma)]
        scores[name] = gamma + delta * rank
    return scores


def _producer_filter_norms(graph: Any, norm: nn.Module) -> torch.Tensor | None:
    """L2 norm of each output filter of the conv/linear layer feeding ``norm`` directly, if there is one."""
    node = graph.module2node.get(norm) if graph is not None else None
    if node is None or len(node.inputs) != 1:
        return None
    producer = node.inputs[0].module
    weight = getattr(producer, "weight", None)
    if not isinstance(producer, (nn.modules.conv._ConvNd, nn.Linear)) or weight is None:
        return None
    w = weight.detach().float().cpu()
    if isinstance(producer, nn.modules.conv._ConvTransposeNd):
        w = w.transpose(0, 1)
    return w.flatten(1).norm(dim=1)


def _bn_free_scores(units: Sequence[Unit]) -> list[torch.Tensor | None]:
    """Filter L1 norm (the ranking of ``method="l1"``) of every unit without a BatchNorm; None for the others."""
    scorer = L1FilterImportance()
    scores: list[torch.Tensor | None] = []
    for unit in units:
        if unit.norms:
            scores.append(None)
            continue
        score = scorer(unit.group)
        scores.append(score.float().cpu() if score is not None else torch.zeros(unit.size))
    return scores


def _bn_free_layers(
    units: Sequence[Unit], bn_free: str, layer_params: Mapping[nn.Module, float], params: float
) -> dict[str, Any]:
    """The layers whose channels no γ can rank (their coupled unit has no BatchNorm) and their share of params.

    The paper's criterion (§4.2) is BatchNorm |γ|; a γ method that left such layers whole would miss a ratio of
    the model by far on detectors whose heads carry no BatchNorm (Faster R-CNN's box head: two thirds of its
    params), so by default (``bn_free="l1"``) they are ranked by filter L1 norm instead. Either way the report
    and a warning name them, so what a γ method could not decide is never silent. ``layer_params`` maps every
    module of the model, in its order, to its own parameter count.
    """
    found = {m.module: m.name for u in units if not u.norms for m in u.outs}
    layers = {found[m]: m for m in layer_params if m in found}  # in the model's order
    share = sum(layer_params[m] for m in layers.values()) / max(params, 1.0)
    if layers:
        how = (
            "were ranked by filter L1 norm and lose the share of γ channels removed elsewhere (bn_free='keep' "
            "leaves them whole)"
            if bn_free == "l1"
            else "were left whole: no γ method can prune them (bn_free='l1' ranks them by filter L1 norm)"
        )
        warnings.warn(
            f"{len(layers)} layers without BatchNorm ({share:.1%} of params, e.g. {list(layers)[:4]}) have no "
            f"γ; they {how}",
            stacklevel=3,
        )
    return {"handling": bn_free, "layers": list(layers), "params_share": share}


@dataclass
class _Traced:
    """What one traced forward pass tells us: the DependencyGraph and the observation of every layer."""

    graph: Any
    seen: Observation


def _check_norms(model: nn.Module, method: str) -> dict[str, nn.Module]:
    """The model's affine BatchNorms; γ methods refuse a model without them or with corrupt γ."""
    norms = prunable_norms(model)
    if method not in ("gcp", "slim"):
        return norms
    if not norms:
        raise ValueError(
            f"method={method!r} ranks channels by BatchNorm γ, but the model has no affine BatchNorm layer; "
            "use method='l1' or method='thinet' instead"
        )
    bad = [n for n, m in norms.items() if not torch.isfinite(m.weight.detach()).all()]
    if bad:
        raise ValueError(f"non-finite BatchNorm γ in layers {bad[:5]}: the model's weights are corrupt")
    return norms


def _trace(
    model: nn.Module,
    example_inputs: Any,
    forward_fn: ForwardFn | None,
    output_transform: Callable[[Any], Any] | None,
    norms: Mapping[str, nn.Module],
    family: Adapter | None,
) -> _Traced:
    """Build torch-pruning's graph; the same forward pass records strides, MACs and input means."""
    outputs: list[Any] = []

    def traced_forward(mdl: nn.Module, inputs: Any) -> Any:
        outputs.append(run_forward(mdl, inputs, forward_fn))
        return outputs[-1]

    try:
        with Recorder(model, example_inputs, watch=norms.values()) as recorder:
            graph = build_graph(model, example_inputs, traced_forward, output_transform)
    except Exception as exc:  # the user's forward may raise anything; show it and where it happened
        if outputs:
            raise ValueError(
                f"torch-pruning could not trace the outputs of {type(model).__name__} ({type(exc).__name__}: "
                f"{exc}); pass {tracing_hint(model, family)}"
            ) from exc
        raise ValueError(
            f"example_inputs do not run the model: {type(exc).__name__}: {exc} (raised in "
            f"{failing_module(model, example_inputs, forward_fn)}). Pass inputs the model accepts, or "
            f"{tracing_hint(model, family)}"
        ) from exc
    seen = recorder.finish(output_transform(outputs[-1]) if output_transform else outputs[-1])
    if not seen.predictions:
        raise ValueError(
            "no model output is computed by a conv or linear layer (outputs detached or postprocessed "
            f"without gradients), so the trainable network cannot be traced; pass {tracing_hint(model, family)}"
        )
    return _Traced(graph, seen)


def _gamma_groups(
    model: nn.Module,
    example_inputs: Any,
    groups: Any,
    method: str,
    allocator: str,
    traced: _Traced,
    norms: Mapping[str, nn.Module],
    units: Sequence[Unit],
) -> list[Group]:
    """The groups γ thresholds are allocated over: one global group (slim) or the partition (gcp), restricted
    to the BatchNorms that prunable units carry. A partition that leaves some of those out is refused."""
    in_units = {m.name for u in units for m in u.norms}
    if method == "slim":
        return [Group("global", [n for n in norms if n in in_units], 0, "global")]
    part = _gcp_groups(model, example_inputs, groups, traced.seen)
    covered = {n for g in part for n in g.layers}
    uncovered = sorted(in_units - covered)
    if uncovered:
        raise ValueError(
            f"groups leave {len(uncovered)} prunable BatchNorm layers in no group, e.g. {uncovered[:5]}; add "
            "patterns that cover them (or a catch-all group such as {'other': ['*']})"
        )
    part = [Group(g.name, [n for n in g.layers if n in in_units], g.stride, g.kind, g.patterns) for g in part]
    return [g for g in part if g.layers] if allocator != "explicit" else part


def _decide_by_gamma(
    part: Sequence[Group],
    scores: Mapping[str, torch.Tensor],
    ratio: Any,
    method: str,
    allocator: str,
    coupling: str,
    max_group_ratio: float,
    decider: _Decider,
    measure: _Budget,
) -> tuple[dict[str, float], list[torch.Tensor]]:
    """gcp/slim: per-group |γ| thresholds from ``grouping.allocate`` (§4.2.2), then masks by vote (§4.2.3)."""
    layer_group = {n: g.name for g in part for n in g.layers}

    def by_group(group_thresholds: Mapping[str, float]) -> dict[str, float]:
        return {n: group_thresholds[g] for n, g in layer_group.items()}

    allocation = allocate(
        part,
        {n: scores[n] for n in layer_group},
        ratio,
        "paper" if method == "slim" else allocator,
        budget=lambda t: measure(decider.by_thresholds(by_group(t), coupling)),
        max_group_ratio=1.0 if method == "slim" else max_group_ratio,
    )
    return allocation.thresholds, decider.by_thresholds(by_group(allocation.thresholds), coupling)


def _decide_by_rank(
    model: nn.Module,
    method: str,
    ratio: float,
    units: Sequence[Unit],
    batches: Sequence[Any],
    forward_fn: ForwardFn | None,
    seed: int,
    decider: _Decider,
    measure: _Budget,
    extra: dict[str, Any] | None = None,
) -> list[torch.Tensor]:
    """l1/thinet/random/lcp: rank each unit's channels and remove the same fraction of every unit."""
    scorer: Any
    if method == "lcp":  # gcp.core.lcp; its per-layer seconds go to the report's "lcp" entry
        scorer = LCPImportance(seed=seed)
        scorer.collect(model, batches, units, lambda mdl, b: run_forward(mdl, b, forward_fn))
    elif method == "thinet":
        scorer = ThiNetImportance(seed=seed)
        consumers = {m.module for u in units for m in u.ins}
        scorer.collect(model, batches, consumers, lambda mdl, b: run_forward(mdl, b, forward_fn))
    elif method == "l1":
        scorer = L1FilterImportance()
    else:
        scorer = RandomImportance(seed)
    scores = []
    for unit in units:
        score = scorer(unit.group)
        scores.append(score.float().cpu() if score is not None else torch.zeros(unit.size))
    fraction = bisect(lambda q: measure(decider.by_fraction(scores, q)), float(ratio), 0.0, 1.0)
    masks = decider.by_fraction(scores, fraction)
    warn_if_missed(measure(masks), float(ratio))
    if method == "lcp" and extra is not None:
        extra["lcp"] = scorer.report()
    return masks


def _latency_timer(
    budget: str, latency: str | LatencyTimer | None, latency_cache: Any, example_inputs: Any
) -> LatencyTimer | None:
    """The timer of ``budget="latency"`` (None for the other budgets), checked before the model is touched."""
    if budget != "latency":
        if latency is not None or latency_cache is not None:
            raise ValueError(f"latency= and latency_cache= apply to budget='latency', not budget={budget!r}")
        return None
    if not isinstance(example_inputs, torch.Tensor) or example_inputs.dim() != 4:
        raise ValueError(
            "budget='latency' times the network on one image batch: pass example_inputs as a tensor (B, 3, H, W)"
        )
    cache_dir(latency_cache)  # refuses a path that is a file
    return resolve_timer(latency)


def _latency_table(
    model: nn.Module,
    images: torch.Tensor,
    forward_fn: ForwardFn | None,
    traced: _Traced,
    units: Sequence[Unit],
    timer: LatencyTimer,
    latency_cache: Any,
) -> LatencyTable:
    """The network's per-layer latency table on the timer's runtime (cached; see :mod:`gcp.core.latency`), with
    grid points only along the channel axes that pruning can change."""
    names = {m: n for n, m in model.named_modules()}
    specs = conv_specs(
        traced.seen.input_shapes,
        names,
        traced.graph,
        prunable_in={m.module for u in units for m in u.ins},
        prunable_out={m.module for u in units for m in u.outs},
        align=timer.align,
    )
    return latency_table(model, specs, TracedNetwork(model, forward_fn), images, timer, latency_cache)


def _latency_report(table: LatencyTable, cut: float) -> dict[str, Any]:
    """The report's ``latency`` entry: which runtime, its measured time and the predicted one after ``cut``."""
    return {
        **{k: table.info[k] for k in ("runtime", "version", "threads", "device")},
        "table": str(table.path),
        "measured_ms": table.model_ms,
        "remainder_ms": table.remainder_ms,
        "predicted_ms": table.model_ms * (1.0 - cut),
        "pruned": cut,
    }


def _remove(graph: Any, units: Sequence[Unit], masks: Sequence[torch.Tensor]) -> list[list[Any]]:
    """Let the DependencyGraph remove each unit's masked channels; returns the replayable history."""
    for unit, mask in zip(units, masks):
        idxs = torch.nonzero(mask).flatten().tolist()
        if idxs:
            root = unit.group[0].dep
            graph.get_pruning_group(root.target.module, root.handler, idxs).prune()
    return [[name, bool(is_out), [int(i) for i in idxs]] for name, is_out, idxs in graph.pruning_history()]


# budget="latency": how many times a pruned copy is timed to correct the table's share, and how close (relative
# to the request) a measured cut must come to stop early.
LATENCY_CHECKS = 2
LATENCY_TOLERANCE = 0.02
# The most one correction may multiply (or divide) the share asked of the latency table by.
MAX_SHARE_STEP = 2.0


def _timed_network(model: nn.Module, spec: _Spec) -> nn.Module:
    """What the latency table times of ``model``: its traced forward (the adapter's, for other families)."""
    family = resolve_adapter(model, spec.adapter)
    forward_fn = spec.forward_fn
    if family is not None:
        family.prepare_model(model)  # output-identical; the pruned copies carry the same rewrite
        forward_fn = forward_fn or family.forward_fn
    return TracedNetwork(model.eval(), forward_fn)


def _measured_cut(base: nn.Module, pruned: nn.Module, images: torch.Tensor, timer: LatencyTimer) -> float:
    """1 − pruned/base time on the runtime, timed run by run in turn (``time_models``) where the timer can,
    else in alternating blocks, so that a drift of the machine hits both alike."""
    time_models = getattr(timer, "time_models", None)
    if callable(time_models):
        base_ms, pruned_ms = time_models([base, pruned], images)
        return 1.0 - pruned_ms / base_ms
    base_ms = pruned_ms = 0.0
    for _ in range(2):
        base_ms += timer.time_model(base, images)
        pruned_ms += timer.time_model(pruned, images)
    return 1.0 - pruned_ms / base_ms


def _final_share(trials: Sequence[Mapping[str, float]], target: float) -> tuple[float, float | None]:
    """The share to prune at and the measured cut of a trial at exactly that share (None when the share is
    interpolated between the two trials that bracket ``target`` and still has to be timed), else the trial that
    came closest."""
    below = [t for t in trials if t["measured_cut"] <= target]
    above = [t for t in trials if t["measured_cut"] > target]
    if below and above:
        low = max(below, key=lambda t: t["measured_cut"])
        high = min(above, key=lambda t: t["measured_cut"])
        weight = (target - low["measured_cut"]) / (high["measured_cut"] - low["measured_cut"])
        return low["share"] + weight * (high["share"] - low["share"]), None
    best = min(trials, key=lambda t: abs(t["measured_cut"] - target))
    return best["share"], best["measured_cut"]


def _corrected_share(share: float, target: float, measured: float) -> float | None:
    """The next share to try, scaled by target / measured but by no more than :data:`MAX_SHARE_STEP` either
    way (a noisy measurement of a small cut must not send the next trial to 0.999); None when the measured cut
    is not a saving at all, which no scaling can correct (the timing noise exceeds the cut)."""
    if measured <= 0:
        warnings.warn(
            f"budget='latency': a copy pruned at {share:.3f} of the predicted time measured {measured:+.3f} of "
            "the base's time saved (no saving: timing noise exceeds the cut on this machine); the table's share "
            "is not corrected further",
            stacklevel=4,
        )
        return None
    factor = min(max(target / measured, 1.0 / MAX_SHARE_STEP), MAX_SHARE_STEP)
    return min(share * factor, PRUNE_RATIO.high - 1e-3)


def _prune_to_measured_latency(
    model: nn.Module, example_inputs: Any, target: float, checks: int, spec: _Spec
) -> PruneResult:
    """``budget="latency"`` with the table's prediction corrected by measurement.

    The table sums layers timed alone plus a fixed remainder; in the whole network the cut it predicts was off
    by 8–14 % of the request in a run without checks (docs/design.md, "Latency": layout reorders and the other
    ops between convs shrink with the channels too). So a copy is pruned at the share asked of the table, timed
    against the base (:func:`_measured_cut`), and the share is corrected (:func:`_corrected_share`), up to
    ``checks`` times or until a measured cut is within :data:`LATENCY_TOLERANCE` of ``target``; ``model`` is
    then pruned at the share :func:`_final_share` picks from the trials, and timed too when that share is one
    no trial measured. The report keeps the request, the trials and ``latency.measured_cut``, always a
    measurement of the returned architecture.
    """
    images = first_image_tensor(example_inputs)
    base = _timed_network(copy.deepcopy(model), spec)
    share: float | None = target
    trials: list[dict[str, float]] = []
    while share is not None and len(trials) < checks:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the final pruning below says what applies
            trial = _prune_once(copy.deepcopy(model), example_inputs, share, spec)
        measured = _measured_cut(base, _timed_network(trial.model, spec), images, spec.timer)
        trials.append({"share": share, "predicted_cut": trial.report["achieved"], "measured_cut": measured})
        if abs(measured - target) <= LATENCY_TOLERANCE * target:
            break
        share = _corrected_share(share, target, measured)
    final_share, measured = _final_share(trials, target)
    result = _prune_once(model, example_inputs, final_share, spec)
    if measured is None:
        pruned = _timed_network(copy.deepcopy(result.model), spec)
        measured = _measured_cut(base, pruned, images, spec.timer)
    result.report["requested"] = target
    result.report["latency"].update(measured_cut=measured, checks=trials)
    if abs(measured - target) > LATENCY_TOLERANCE * target:
        warnings.warn(
            f"budget='latency': the pruned model measured {measured:.3f} of the base's time saved, "
            f"{measured - target:+.3f} from the requested {target:.3f}",
            stacklevel=3,
        )
    return result


def prune_detector(
    model: nn.Module,
    example_inputs: Any,
    *,
    ratio: float | Mapping[str, float],
    method: str = "gcp",
    groups: Any = "auto",
    allocator: str = "valley",
    budget: str = "channels",
    coupling: str = "vote",
    ignored_layers: Iterable[nn.Module | str] | None = None,
    round_to: int | None = None,
    min_keep: int = 1,
    max_group_ratio: float = MAX_GROUP_RATIO,
    forward_fn: ForwardFn | None = None,
    output_transform: Callable[[Any], Any] | None = None,
    calib_data: Any = None,
    seed: int = 0,
    adapter: str | Adapter | None = "auto",
    bn_free: str = "l1",
    latency: str | LatencyTimer | None = None,
    latency_cache: str | Path | None = None,
    latency_checks: int = LATENCY_CHECKS,
) -> PruneResult:
    """Structurally prune ``model`` in place so that ``ratio`` of its ``budget`` is removed.

    ``method="gcp"`` is the paper's group channel pruning (§4.2): one |γ| threshold per group (``groups``,
    default :func:`grouping.partition`), thresholds from ``allocator``, residual-coupled channels decided by
    ``coupling`` (``"vote"``: the public mask of §4.2.3). ``"slim"`` is Network Slimming: one global |γ|
    threshold. ``"thinet"`` (needs ``calib_data``), ``"l1"`` and ``"random"`` remove the same fraction of every
    coupled unit, ranked by next-layer reconstruction, filter L1 norm or chance; ``"lcp"`` ranks by
    localization-aware channel pruning (:mod:`gcp.core.lcp`) and needs ``calib_data`` as (images, targets)
    batches. Tied |γ| (a freshly built
    model) are ordered by :func:`gamma_scores`, so the ratio is still met. Prediction layers (convs that feed
    an output) keep their outputs; ``ignored_layers`` adds more. Removed channels' mean activations are folded
    into their consumers. Bad input raises before the model is touched.

    ``bn_free`` (gcp/slim) decides the channels of coupled units that carry no BatchNorm, hence no γ (FPN,
    RPN and Faster R-CNN's fully connected box head): ``"l1"`` (default) ranks them by filter L1 norm and removes
    the share of γ channels the thresholds remove from the BatchNorm layers, whose decisions stay the paper's;
    ``"keep"`` leaves them whole. The report's ``bn_free`` entry and a warning name those layers.

    ``budget`` is what ``ratio`` counts: BatchNorm channels (the paper's), parameters, MACs, or ``"latency"``:
    the network's predicted time on a runtime, from a per-layer table measured there (``latency``:
    ``"onnxruntime"``, the default, ``"tensorrt"``, or a :class:`gcp.runtime.timers.OnnxRuntimeTimer` with its threads)
    and cached on disk (``latency_cache``: a folder, default ``$GCP_CACHE_DIR/latency`` or
    ``~/.cache/gcp/latency``), so the first call on an architecture takes minutes and later ones none; see
    :mod:`gcp.core.latency` for the model (its predictions hold at the runtime's channel multiples). Kept channel
    counts are rounded by default to :data:`DEFAULT_ROUND_TO` (8), the deployment multiple, whatever CPU runs
    the call; with ``budget="latency"`` to the timed runtime's own block (:func:`_resolve_round_to`);
    ``round_to=N`` sets it and ``round_to=1`` does not round. A layer with fewer
    channels than ``round_to`` is left whole and named in the report (``round_to``) and, when ``round_to`` was
    given, in a warning.

    With ``budget="latency"`` and a single ``ratio``, the table's prediction is checked by measurement:
    ``latency_checks`` times a pruned copy is timed against the base on the runtime and the share asked of
    the table is corrected (:func:`_prune_to_measured_latency`); ``latency_checks=0`` trusts the table.

    ``max_group_ratio`` (gcp only) caps the share of one group's γ that its threshold may remove (default 0.9,
    so no group is emptied), see :func:`grouping.allocate`.

    ``adapter`` (default ``"auto"``: the registered family that recognises the model, see :mod:`gcp.adapters`)
    lets detectors we did not write be pruned from a plain image batch: it rewrites split blocks into
    equivalent prunable ones, traces only the trainable network (its ``forward_fn``, unless one is given) and
    keeps the layers the family needs whole. ``None`` uses the model as given. The rewrite happens before the
    model is inspected (it renames layers); when a later check refuses the model, the rewrite is undone.
    """
    spec = _Spec(
        method, groups, allocator, budget, coupling, ignored_layers, round_to, min_keep, max_group_ratio,
        forward_fn, output_transform, calib_data, seed, adapter, bn_free,
        _latency_timer(budget, latency, latency_cache, example_inputs), latency_cache,
    )  # fmt: skip
    _check_spec(ratio, spec, latency_checks)
    if spec.timer is not None and latency_checks and isinstance(ratio, (int, float)):
        return _prune_to_measured_latency(model, example_inputs, float(ratio), latency_checks, spec)
    return _prune_once(model, example_inputs, ratio, spec)


@dataclass
class _Analysis:
    """What the traced model tells a pruning pass: its graph and observations, the prunable units, how kept
    channels are rounded, what the budget measures, and the model's size before."""

    traced: _Traced
    norms: dict[str, nn.Module]
    units: list[Unit]
    rounding: _Rounding
    measure: _Budget
    table: LatencyTable | None
    forward_fn: ForwardFn | None
    macs: float
    params: float
    layer_params: dict[nn.Module, float]


@dataclass
class _Decision:
    """Which channels go (one mask per unit), and the groups and thresholds that chose them (γ methods)."""

    masks: list[torch.Tensor]
    groups: list[Group] | None = None
    thresholds: dict[str, float] = field(default_factory=dict)
    without_bn: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _prune_once(model: nn.Module, example_inputs: Any, ratio: Any, spec: _Spec) -> PruneResult:
    """One pass of the method on a checked spec: trace → partition and allocate → decide → compensate and remove
    → report (paper §4.2). Until channels are removed, a refusal hands the model back as given (the adapter's
    rewrite undone)."""
    family = resolve_adapter(model, spec.adapter)
    undo_rewrite = snapshot_submodules(model)
    if family is not None:  # output-identical rewrite, before the layers are inspected (their names change)
        family.prepare_model(model)
    was_training = model.training
    channels_removed = False
    try:
        analysis = _analyse(model, example_inputs, spec, family)
        decision = _decide(model, example_inputs, ratio, spec, analysis)
        before = _layer_channels(model)
        channels_removed = True
        history = _compensate_and_remove(model, spec, analysis, decision)
        report = _report(model, ratio, spec, analysis, decision, before)
    except BaseException:
        if not channels_removed:
            undo_rewrite()
        raise
    finally:
        model.train(was_training)
    return PruneResult(
        model=model,
        report=report,
        history=history,
        input_shape=list(first_image_tensor(example_inputs).shape),
        adapter=family.name if family is not None else None,
    )


def _analyse(model: nn.Module, example_inputs: Any, spec: _Spec, family: Adapter | None) -> _Analysis:
    """Trace the model once (graph, MACs, strides, input means), find its prunable units, and set up how kept
    channels are rounded and what the budget measures."""
    norms = _check_norms(model, spec.method)
    ignored = _resolve_ignored(model, spec.ignored_layers)
    forward_fn = spec.forward_fn
    if family is not None:
        ignored += _resolve_ignored(model, family.ignored(model))
        forward_fn = forward_fn or family.forward_fn
    model.eval()  # analysis passes must not move BatchNorm running statistics
    traced = _trace(model, example_inputs, forward_fn, spec.output_transform, norms, family)
    modules = dict(model.named_modules())
    ignored += [modules[p] for p in traced.seen.predictions if modules[p] not in ignored]
    units = _units(model, traced.graph, ignored)
    table = None
    if spec.timer is not None:
        table = _latency_table(
            model, example_inputs, forward_fn, traced, units, spec.timer, spec.latency_cache
        )
    batch = first_image_tensor(example_inputs).shape[0]
    params = float(sum(p.numel() for p in model.parameters()))
    layer_params = {m: float(sum(p.numel() for p in m.parameters(recurse=False))) for m in model.modules()}
    total_macs = sum(traced.seen.macs.values())
    measure = _Budget(units, spec.budget, traced.seen.macs, layer_params, total_macs, params, table)
    rounding = _resolve_round_to(units, spec.round_to, spec.timer)
    return _Analysis(
        traced, norms, units, rounding, measure, table, forward_fn, total_macs / batch, params, layer_params
    )


def _decide(model: nn.Module, example_inputs: Any, ratio: Any, spec: _Spec, analysis: _Analysis) -> _Decision:
    """gcp/slim: group the BatchNorms, allocate one |γ| threshold per group and mask by vote (§4.2.2–4.2.3);
    l1/thinet/random: remove the same ranked fraction of every unit."""
    units, multiple = analysis.units, analysis.rounding.multiple
    floor = max(spec.min_keep, multiple or 1)
    if spec.method not in ("gcp", "slim"):
        decider = _Decider(units, floor, multiple)
        lcp = spec.method == "lcp"  # LCP reads the targets too
        batches = spec.calib_data if lcp else _calibration_batches(spec.calib_data, example_inputs)
        extra: dict[str, Any] = {}
        masks = _decide_by_rank(
            model,
            spec.method,
            ratio,
            units,
            batches,
            analysis.forward_fn,
            spec.seed,
            decider,
            analysis.measure,
            extra,
        )
        return _Decision(masks, extra=extra)
    scores = gamma_scores(analysis.traced.graph, analysis.norms)
    secondary = _bn_free_scores(units) if spec.bn_free == "l1" else None
    decider = _Decider(units, floor, multiple, scores, secondary)
    part = _gamma_groups(
        model,
        example_inputs,
        spec.groups,
        spec.method,
        spec.allocator,
        analysis.traced,
        analysis.norms,
        units,
    )
    thresholds, masks = _decide_by_gamma(
        part, scores, ratio, spec.method, spec.allocator, spec.coupling, spec.max_group_ratio, decider,
        analysis.measure,
    )  # fmt: skip
    without_bn = _bn_free_layers(units, spec.bn_free, analysis.layer_params, analysis.params)
    return _Decision(masks, part, thresholds, without_bn)


def _compensate_and_remove(model: nn.Module, spec: _Spec, analysis: _Analysis, decision: _Decision) -> list:
    """Fold the removed channels' mean activations into their consumers, then let the DependencyGraph remove
    them; returns the replayable pruning history."""
    units, masks = analysis.units, decision.masks
    consumers = {m.module for u, mask in zip(units, masks) if mask.any() for m in u.ins}
    means = analysis.traced.seen.input_means
    if spec.calib_data is not None:
        batches = _calibration_batches(spec.calib_data, None)
        means = _input_means(model, consumers, batches, analysis.forward_fn)
    _compensate(analysis.traced.graph, units, masks, means)
    return _remove(analysis.traced.graph, units, masks)


def _report(
    model: nn.Module,
    ratio: Any,
    spec: _Spec,
    analysis: _Analysis,
    decision: _Decision,
    before: dict[str, int],
) -> dict[str, Any]:
    """The JSON-ready report of the pass (:func:`gcp.core.report.build_report`)."""
    measure, masks = analysis.measure, decision.masks
    cut = measure.fraction(masks, "latency") if analysis.table is not None else None
    report = build_report(
        model,
        method=spec.method,
        requested=ratio,
        budget=spec.budget,
        achieved=measure(masks),
        before=(analysis.macs, analysis.params, before),
        macs_after=analysis.macs * (1.0 - measure.fraction(masks, "macs")),
        groups=decision.groups,
        thresholds=decision.thresholds,
        bn_free=decision.without_bn,
        round_to=analysis.rounding.report(),
        latency=_latency_report(analysis.table, cut) if analysis.table is not None else None,
    )
    report.update(decision.extra)  # method-specific entries (lcp: seconds per layer)
    return report


def channel_costs(
    model: nn.Module,
    example_inputs: Any,
    forward_fn: ForwardFn | None = None,
    output_transform: Callable[[Any], Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Share of the model's MACs that each channel of each affine BatchNorm takes with it when it is removed.

    A channel's removal shrinks the conv that produces it (by 1/out of that conv's MACs) and every conv that
    reads it (by 1/in of theirs), found through torch-pruning's coupling as :func:`prune_detector` finds them;
    when residual adds couple several BatchNorms into one unit, each carries an equal part of the unit's cost.
    Prediction layers keep their outputs, as in pruning. Costs are marginal: every conv is counted once through
    its outputs and once through its inputs, so all channels' costs sum to about 2 (1.97 on the DigitScenes
    teacher), and a set holding both ends of a conv removes fewer MACs than its summed cost. Channels that
    torch-pruning's graph cannot remove (on an Ultralytics model traced without its adapter's rewrite, the
    split halves of C2f blocks) cost 0. ``gcp.DynamicSparsity(costs=...)`` uses this to
    choose, in stage 1, the channels that cost least accuracy per MAC removed. The model is left as given
    (traced in eval mode, so BatchNorm statistics do not move).
    """
    norms = prunable_norms(model)
    was_training = model.training
    model.eval()
    try:
        traced = _trace(model, example_inputs, forward_fn, output_transform, norms, None)
    finally:
        model.train(was_training)
    modules = dict(model.named_modules())
    units = _units(model, traced.graph, [modules[p] for p in traced.seen.predictions])
    total = max(sum(traced.seen.macs.values()), 1.0)
    names = {m: n for n, m in norms.items()}
    costs = {name: torch.zeros(norm.num_features) for name, norm in norms.items()}
    for unit in units:
        per_root = torch.zeros(unit.size)
        for members, channels in ((unit.outs, out_channels), (unit.ins, _in_channels)):
            for m in members:
                macs = float(traced.seen.macs.get(m.module) or 0.0)
                per_root.index_add_(
                    0, m.root, torch.full((m.root.numel(),), macs / max(channels(m.module), 1))
                )
        for m in unit.norms:
            if m.module in names:
                costs[names[m.module]][m.local] += per_root[m.root] / total / len(unit.norms)
    return costs


def _layer_channels(model: nn.Module) -> dict[str, int]:
    """Output channels of every conv, linear and BatchNorm layer, by name."""
    return {
        n: out_channels(m)
        for n, m in model.named_modules()
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm))
    }
