"""``prune_detector``: decide which channels go, then let torch-pruning's DependencyGraph remove them.

Data flows one way: model → ``grouping.partition`` → ``grouping.allocate`` → importance (``gcp.importance``) →
DependencyGraph → report. The DependencyGraph is the only authority on which channels are coupled (residual
adds, concats, splits); this module never writes per-architecture channel rules.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

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

from .adapters import Adapter, failing_module, resolve_adapter, snapshot_submodules, tracing_hint
from .graph import build_graph, crosses_channel_split
from .importance import (
    CONV_IN_FNS,
    CONV_OUT_FNS,
    NORM_OUT_FNS,
    L1FilterImportance,
    RandomImportance,
    ThiNetImportance,
    coupled_scores,
)
from .report import build_report, out_channels

METHODS = ("gcp", "slim", "thinet", "l1", "random")
ALLOCATORS = ("explicit", "paper", "valley")
BUDGETS = ("channels", "params", "macs")
COUPLINGS = ("vote", "mean", "max")
OUT_FNS = CONV_OUT_FNS + NORM_OUT_FNS


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
        from .serialize import save_pruned

        return save_pruned(self, path)


def _validate(
    ratio: Any,
    method: str,
    allocator: str,
    budget: str,
    coupling: str,
    round_to: int | None,
    min_keep: int,
    max_group_ratio: float,
) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if allocator not in ALLOCATORS:
        raise ValueError(f"unknown allocator {allocator!r}; choose from {ALLOCATORS}")
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; choose from {BUDGETS}")
    if coupling not in COUPLINGS:
        raise ValueError(f"unknown coupling {coupling!r}; choose from {COUPLINGS}")
    if isinstance(ratio, Mapping):
        if method != "gcp" or allocator != "explicit":
            raise ValueError("per-group ratios (a mapping) need method='gcp' and allocator='explicit'")
    else:
        if not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or not 0.0 < float(ratio) < 1.0:
            raise ValueError(f"ratio must be a number in (0, 1), got {ratio!r}")
        if method == "gcp" and allocator == "explicit":
            raise ValueError("allocator='explicit' needs ratio as a mapping group name -> ratio")
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be a positive integer or None, got {round_to!r}")
    if not isinstance(min_keep, int) or min_keep < 1:
        raise ValueError(f"min_keep must be an integer >= 1, got {min_keep!r}")
    if not 0.0 < max_group_ratio <= 1.0:
        raise ValueError(f"max_group_ratio must be in (0, 1], got {max_group_ratio!r}")


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


def _check_round_to(units: Sequence[Unit], round_to: int | None) -> None:
    if round_to is None:
        return
    for unit in units:
        if unit.size < round_to:
            raise ValueError(
                f"round_to={round_to} is larger than layer {unit.root_name!r}, which has {unit.size} channels"
            )


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
    """Turns thresholds (γ methods) or a uniform fraction (l1/thinet/random) into per-unit prune masks."""

    def __init__(
        self,
        units: Sequence[Unit],
        floor: int,
        round_to: int | None,
        scores: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.units = units
        self.floor = floor
        self.round_to = round_to
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
        masks = []
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
        return masks

    def by_fraction(self, scores: Sequence[torch.Tensor], fraction: float) -> list[torch.Tensor]:
        masks = []
        for unit, score in zip(self.units, scores):
            n_prune = int(math.floor(fraction * unit.size))
            prune = torch.zeros(unit.size, dtype=torch.bool)
            prune[torch.argsort(score)[:n_prune]] = True
            masks.append(_constrain(unit, prune, score, self.floor, self.round_to))
        return masks


class _Budget:
    """Measures what a set of prune masks removes: γ entries, parameters or MACs (fractions of the total)."""

    def __init__(
        self,
        units: Sequence[Unit],
        kind: str,
        layer_macs: Mapping[nn.Module, float],
        layer_params: Mapping[nn.Module, float],
        total_macs: float,
        total_params: float,
    ) -> None:
        self.units = units
        self.kind = kind
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
        removing channels scales them by the kept fractions.
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
            removed += cost * (1.0 - keep)
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


def _compensate(
    graph: Any, units: Sequence[Unit], masks: Sequence[torch.Tensor], means: Mapping[nn.Module, torch.Tensor]
) -> int:
    """Fold the mean activation of every removed channel into its consumers (bias or next BN running mean).

    A removed channel still carried a value: for γ = 0 exactly the constant act(β), otherwise on average its
    mean. Its consumer conv W added Σ_k W[o, c, k] · mean_c to output o; we add that to the consumer's bias,
    or subtract it from the running mean of the BatchNorm right after a bias-free conv. Returns the number of
    removed consumer channels that had nowhere to fold into (warned about).
    """
    uncompensated = 0
    with torch.no_grad():
        for unit, mask in zip(units, masks):
            for member in unit.ins:
                module = member.module
                removed = member.local[mask[member.root]]
                if removed.numel() == 0 or module not in means:
                    continue
                if isinstance(module, nn.Conv2d) and module.groups != 1:
                    continue  # depthwise consumers lose the matching outputs too: nothing left to fold into
                mean = means[module][removed]
                weight = module.weight.detach().float()
                w = weight[:, removed].flatten(2).sum(-1) if weight.dim() == 4 else weight[:, removed]
                delta = (w * mean.to(w.device)).sum(1)
                if not torch.isfinite(delta).all():
                    continue
                if getattr(module, "bias", None) is not None:
                    module.bias.add_(delta.to(module.bias.dtype))
                    continue
                norm = _following_norm(graph, module)
                if norm is not None and norm.running_mean is not None:
                    norm.running_mean.sub_(delta.to(norm.running_mean.dtype))
                else:
                    uncompensated += int(removed.numel())
    if uncompensated:
        warnings.warn(
            f"{uncompensated} removed channels feed a bias-free layer with no BatchNorm after it; their mean "
            "activation could not be folded (the pruned model may shift slightly until fine-tuned)",
            stacklevel=3,
        )
    return uncompensated


def _following_norm(graph: Any, module: nn.Module) -> nn.Module | None:
    node = graph.module2node.get(module)
    if node is None or len(node.outputs) != 1:
        return None
    nxt = node.outputs[0].module
    return nxt if isinstance(nxt, nn.modules.batchnorm._BatchNorm) else None


def _gcp_groups(model: nn.Module, example_inputs: Any, groups: Any, seen: Observation) -> list[Group]:
    if groups == "auto":
        return partition(model, example_inputs, observation=seen)
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
    then removes all or nothing (0 % for any ratio). We add δ · r to |γ|, where r ∈ (0, 1] is the channel's
    rank, inside its layer, by the L2 norm of the conv filter that produces it (channel index where that ties
    too) and δ is below a quarter of the smallest gap between distinct |γ|, so the |γ| order itself is never
    changed. With all γ tied, a global threshold then removes the same fraction of every layer, weakest
    filters first.
    """
    gammas = {n: m.weight.detach().abs().float().cpu() for n, m in norms.items()}
    if not gammas:
        return {}
    flat = torch.cat(list(gammas.values()))
    distinct = torch.unique(flat)
    gaps = distinct[1:] - distinct[:-1]
    top = float(flat.max()) if flat.numel() else 0.0
    delta = 1e-6 * max(top, 1e-12)
    if gaps.numel():
        delta = min(delta, float(gaps.min()) / 4.0)
    scores = {}
    for name, gamma in gammas.items():
        secondary = _producer_filter_norms(graph, norms[name])
        if secondary is None or secondary.numel() != gamma.numel():
            secondary = torch.arange(gamma.numel(), dtype=torch.float32)
        order = torch.sort(secondary, stable=True).indices
        rank = torch.empty(gamma.numel())
        rank[order] = torch.arange(1, gamma.numel() + 1, dtype=torch.float32) / gamma.numel()
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
) -> list[torch.Tensor]:
    """l1/thinet/random: rank each unit's channels and remove the same fraction of every unit."""
    if method == "thinet":
        scorer: Any = ThiNetImportance(seed=seed)
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
    return masks


def _remove(graph: Any, units: Sequence[Unit], masks: Sequence[torch.Tensor]) -> list[list[Any]]:
    """Let the DependencyGraph remove each unit's masked channels; returns the replayable history."""
    for unit, mask in zip(units, masks):
        idxs = torch.nonzero(mask).flatten().tolist()
        if idxs:
            root = unit.group[0].dep
            graph.get_pruning_group(root.target.module, root.handler, idxs).prune()
    return [[name, bool(is_out), [int(i) for i in idxs]] for name, is_out, idxs in graph.pruning_history()]


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
) -> PruneResult:
    """Structurally prune ``model`` in place so that ``ratio`` of its ``budget`` is removed.

    ``method="gcp"`` is the paper's group channel pruning (§4.2): one |γ| threshold per group (``groups``,
    default :func:`grouping.partition`), thresholds from ``allocator``, residual-coupled channels decided by
    ``coupling`` (``"vote"``: the public mask of §4.2.3). ``"slim"`` is Network Slimming: one global |γ|
    threshold. ``"thinet"`` (needs ``calib_data``), ``"l1"`` and ``"random"`` remove the same fraction of every
    coupled unit, ranked by next-layer reconstruction, filter L1 norm or chance. Tied |γ| (a freshly built
    model) are ordered by :func:`gamma_scores`, so the ratio is still met. Prediction layers (convs that feed
    an output) keep their outputs; ``ignored_layers`` adds more. Removed channels' mean activations are folded
    into their consumers. Bad input raises before the model is touched.

    ``max_group_ratio`` (gcp only) caps the share of one group's γ that its threshold may remove (default 0.9,
    so no group is emptied), see :func:`grouping.allocate`.

    ``adapter`` (default ``"auto"``: the registered family that recognises the model, see :mod:`gcp.adapters`)
    lets detectors we did not write be pruned from a plain image batch: it rewrites split blocks into
    equivalent prunable ones, traces only the trainable network (its ``forward_fn``, unless one is given) and
    keeps the layers the family needs whole. ``None`` uses the model as given. The rewrite happens before the
    model is inspected (it renames layers); when a later check refuses the model, the rewrite is undone.
    """
    _validate(ratio, method, allocator, budget, coupling, round_to, min_keep, max_group_ratio)
    if method == "thinet" and calib_data is None:
        raise ValueError(
            "method='thinet' needs calib_data: a few image batches to measure reconstruction error"
        )
    family = resolve_adapter(model, adapter)
    undo_rewrite = snapshot_submodules(model)
    if family is not None:  # output-identical rewrite, before the layers are inspected (their names change)
        family.prepare_model(model)
    was_training = model.training
    channels_removed = False  # until then, a refusal hands the model back as given: the rewrite is undone
    try:
        norms = _check_norms(model, method)
        ignored = _resolve_ignored(model, ignored_layers)
        if family is not None:
            ignored += _resolve_ignored(model, family.ignored(model))
            forward_fn = forward_fn or family.forward_fn
        model.eval()  # analysis passes must not move BatchNorm running statistics
        traced = _trace(model, example_inputs, forward_fn, output_transform, norms, family)
        seen = traced.seen
        modules = dict(model.named_modules())
        ignored = ignored + [modules[p] for p in seen.predictions if modules[p] not in ignored]
        units = _units(model, traced.graph, ignored)
        _check_round_to(units, round_to)
        batch = first_image_tensor(example_inputs).shape[0]
        macs = sum(seen.macs.values()) / batch
        params = float(sum(p.numel() for p in model.parameters()))
        layer_params = {
            m: float(sum(p.numel() for p in m.parameters(recurse=False))) for m in model.modules()
        }
        measure = _Budget(units, budget, seen.macs, layer_params, sum(seen.macs.values()), params)
        batches = _calibration_batches(calib_data, example_inputs)

        part: list[Group] | None = None
        thresholds: dict[str, float] = {}
        if method in ("gcp", "slim"):
            scores = gamma_scores(traced.graph, norms)
            decider = _Decider(units, max(min_keep, round_to or 1), round_to, scores)
            part = _gamma_groups(model, example_inputs, groups, method, allocator, traced, norms, units)
            thresholds, masks = _decide_by_gamma(
                part, scores, ratio, method, allocator, coupling, max_group_ratio, decider, measure
            )
        else:
            decider = _Decider(units, max(min_keep, round_to or 1), round_to)
            masks = _decide_by_rank(model, method, ratio, units, batches, forward_fn, seed, decider, measure)

        before = _layer_channels(model)
        consumers = {m.module for u, mask in zip(units, masks) if mask.any() for m in u.ins}
        means = (
            seen.input_means if calib_data is None else _input_means(model, consumers, batches, forward_fn)
        )
        channels_removed = True
        _compensate(traced.graph, units, masks, means)
        history = _remove(traced.graph, units, masks)
        report = build_report(
            model,
            method=method,
            requested=ratio,
            budget=budget,
            achieved=measure(masks),
            before=(macs, params, before),
            macs_after=macs * (1.0 - measure.fraction(masks, "macs")),
            groups=part,
            thresholds=thresholds,
        )
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


def _layer_channels(model: nn.Module) -> dict[str, int]:
    """Output channels of every conv, linear and BatchNorm layer, by name."""
    return {
        n: out_channels(m)
        for n, m in model.named_modules()
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm))
    }
