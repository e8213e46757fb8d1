"""Split a detector's prunable layers into groups by feature scale and module structure (paper §4.2.1, Fig. 3).

The paper's five YOLOv4 groups (§5.3, darknet ``yolov4.cfg`` layer numbers) are: backbone up to stride 8
(layers 0–55), backbone at stride 16 (56–85), backbone at stride 32 including the CBLs around SPP (86–116), the
PANet top-down neck (117–136) and the detection heads with the bottom-up path (136–161). We recover that split
from one observed forward pass instead of layer numbers, so it also applies to detectors we did not write:

* **backbone**: BatchNorm layers that run before the feature maps first get *larger* (the first upsample),
  that feed more than one output and that reach an output along at least one path without an upsample; split
  by stride into ``n_groups - 2`` buckets, the largest strides each on their own, the smaller ones merged into
  the first bucket. The last condition is what ends Group3 at the SPP output (layer 116): the CBL after it
  (layer 117, ``neck.reduce_p5``) still runs at stride 32 before the first upsample, but it feeds nothing
  else, and §5.3 starts Group4 with it.
* **head**: layers that feed exactly one output (a head branch), and, when the first prediction happens only
  after the backbone (PANet style), every later layer: the bottom-up path runs interleaved with the heads.
* **neck**: the rest, i.e. the top-down path.

Two layers where §5.3's ranges are not what its text describes: layer 55, the stride-2 CBM that opens the
stride-16 CSP stage, is listed in Group1 (0–55) but outputs 26×26 maps, and "group2 only include the feature
layer at 26×26 scales along with the CSP module"; it is in our stride-16 group, as layer 86 (the stride-32 CSP
stage's opening CBM) is in §5.3's Group3. Layer 136, the last top-down CBL, is listed in both Group4 and Group5;
we keep it in the neck (it feeds the stride-8 head and the bottom-up path). Moving layer 55 changes Table 2's
structure by less than half a percentage point (``benchmarks/bench_tables12.py``).

When a model has a single output or no stage can be told apart, we fall back to stride-only groups and warn.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .trace import ForwardFn, Observation, observe

NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm,)


@dataclass
class Group:
    """A set of BatchNorm layers (the carriers of γ) that share one pruning threshold.

    ``stride`` is the largest output stride among the layers; ``kind`` is ``backbone``, ``neck``, ``head`` or
    ``custom`` (user-given patterns) or ``stride`` (fallback partition).
    """

    name: str
    layers: list[str]
    stride: int
    kind: str
    patterns: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "layers": list(self.layers), "stride": self.stride, "kind": self.kind}


def prunable_norms(model: nn.Module) -> dict[str, nn.Module]:
    """Affine BatchNorm layers by name, in definition order: the layers whose γ the paper prunes by."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, NORM_TYPES) and m.affine and m.weight is not None
    }


def _stride_buckets(strides: Iterable[int], n_buckets: int) -> dict[int, int]:
    """Map each stride to a bucket: the ``n_buckets - 1`` largest strides alone, all smaller ones in bucket 0."""
    distinct = sorted(set(strides))
    n_buckets = max(1, min(n_buckets, len(distinct)))
    alone = distinct[len(distinct) - (n_buckets - 1) :] if n_buckets > 1 else []
    return {s: (alone.index(s) + 1 if s in alone else 0) for s in distinct}


def _stride_groups(
    names: list[str], strides: dict[str, int], n_groups: int, prefix: str, kind: str
) -> list[Group]:
    buckets = _stride_buckets((strides[n] for n in names), n_groups)
    groups: dict[int, list[str]] = {}
    for name in names:
        groups.setdefault(buckets[strides[name]], []).append(name)
    result = []
    for bucket in sorted(groups):
        layers = groups[bucket]
        top = max(strides[n] for n in layers)
        result.append(Group(name=f"{prefix}_s{top}", layers=layers, stride=top, kind=kind))
    return result


def partition(
    model: nn.Module,
    example_inputs: Any,
    n_groups: int = 5,
    *,
    forward_fn: ForwardFn | None = None,
    output_transform: Callable[[Any], Any] | None = None,
    observation: Observation | None = None,
) -> list[Group]:
    """Group the prunable BatchNorm layers by feature scale and module structure (paper §4.2.1).

    Returns groups in network order (backbone by increasing stride, then neck, then head); empty groups are
    dropped. The model's train/eval mode and parameters are left untouched (the forward pass runs in eval mode
    so BatchNorm running statistics do not move). ``observation`` reuses a pass made by the caller with
    ``watch=`` the prunable norms.
    """
    if n_groups < 1:
        raise ValueError(f"n_groups must be >= 1, got {n_groups}")
    norms = prunable_norms(model)
    if not norms:
        raise ValueError("the model has no affine BatchNorm layer, so there is no γ to group by")
    if observation is None:
        observation = _observe_in_eval_mode(model, example_inputs, forward_fn, output_transform, norms)
    order = {t.name: t.order for t in observation.traces}
    strides = {t.name: t.stride for t in observation.traces}
    ran = sorted((n for n in norms if n in order), key=order.__getitem__)
    reached = {name: observation.reached.get(name, set()) for name in norms}
    n_outputs = len(set().union(*reached.values())) if reached else 0
    if n_outputs < 2 or n_groups < 3:
        warnings.warn(
            f"partition: the model has {n_outputs} output(s); backbone/neck/head cannot be told apart, "
            "falling back to stride-only groups",
            stacklevel=2,
        )
        return _stride_groups(ran, strides, n_groups, "stride", "stride")
    backbone, neck, head = _split_by_structure(observation, ran, order, reached)
    if not backbone or not head:
        warnings.warn(
            "partition: could not find both a backbone and a head in the traced graph, "
            "falling back to stride-only groups",
            stacklevel=2,
        )
        return _stride_groups(ran, strides, n_groups, "stride", "stride")
    n_backbone = max(1, n_groups - (1 if neck else 0) - 1)
    groups = _stride_groups(backbone, strides, n_backbone, "backbone", "backbone")
    if neck:
        groups.append(Group(name="neck", layers=neck, stride=max(strides[n] for n in neck), kind="neck"))
    groups.append(Group(name="head", layers=head, stride=max(strides[n] for n in head), kind="head"))
    return groups


def _observe_in_eval_mode(
    model: nn.Module,
    example_inputs: Any,
    forward_fn: ForwardFn | None,
    output_transform: Callable[[Any], Any] | None,
    norms: Mapping[str, nn.Module],
) -> Observation:
    """One traced forward pass in eval mode (BatchNorm statistics must not move), the mode restored after."""
    was_training = model.training
    model.eval()
    try:
        return observe(model, example_inputs, forward_fn, output_transform, watch=norms.values())
    finally:
        model.train(was_training)


def _backbone_end(observation: Observation) -> int:
    """The first time the feature map gets larger marks the end of the backbone."""
    running_max = 0
    for t in observation.traces:
        if t.stride and t.stride < running_max:
            return t.order
        running_max = max(running_max, t.stride)
    return len(observation.traces)


def _split_by_structure(
    observation: Observation, ran: list[str], order: Mapping[str, int], reached: Mapping[str, set]
) -> tuple[list[str], list[str], list[str]]:
    """Backbone, neck and head layers: a layer that reaches one output is head; before the backbone's end and
    fed directly from the input path it is backbone; the rest is neck."""
    backbone_end = _backbone_end(observation)
    predictions = set(observation.predictions)
    first_prediction = min((order[p] for p in predictions if p in order), default=len(observation.traces))
    backbone, neck, head = [], [], []
    late_prediction = first_prediction > backbone_end
    for name in ran:
        single_output = len(reached[name]) == 1
        if single_output or (late_prediction and order[name] > first_prediction):
            head.append(name)
        elif order[name] < backbone_end and name in observation.direct:
            backbone.append(name)
        else:
            neck.append(name)
    # Layers after the first prediction but before the first single-output layer of the head belong to the
    # head only in PANet-style models; the top-down path is executed before any prediction there.
    if late_prediction:
        first_head = min(order[n] for n in head) if head else first_prediction
        moved = [n for n in neck if order[n] > first_head]
        neck = [n for n in neck if n not in moved]
        head = sorted(head + moved, key=order.__getitem__)
    return backbone, neck, head


def groups_from_patterns(model: nn.Module, patterns: Mapping[str, str | list[str]]) -> list[Group]:
    """User-defined groups: group name → module-name glob patterns (``fnmatch``), matched against BN names.

    Every pattern must match at least one prunable BatchNorm layer, and a layer matched by two groups is an
    error: a γ has exactly one threshold.
    """
    norms = prunable_norms(model)
    if not norms:
        raise ValueError("the model has no affine BatchNorm layer, so there is no γ to group by")
    owner: dict[str, str] = {}
    groups = []
    for group_name, pats in patterns.items():
        pats = [pats] if isinstance(pats, str) else list(pats)
        layers: list[str] = []
        for pat in pats:
            matched = [n for n in norms if fnmatch.fnmatchcase(n, pat)]
            if not matched:
                examples = ", ".join(list(norms)[:8])
                raise ValueError(
                    f"group {group_name!r}: pattern {pat!r} matches no BatchNorm layer (names look like: {examples}, ...)"
                )
            for n in matched:
                if n in owner and owner[n] != group_name:
                    raise ValueError(
                        f"layer {n!r} is matched by both group {owner[n]!r} and group {group_name!r}"
                    )
                if n not in owner:
                    owner[n] = group_name
                    layers.append(n)
        groups.append(Group(name=group_name, layers=layers, stride=0, kind="custom", patterns=pats))
    return groups


def load_group_patterns(path: str) -> dict[str, list[str]]:
    """Read a YAML file mapping group name → list of glob patterns (see :func:`groups_from_patterns`)."""
    import yaml

    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ValueError(f"{path}: expected a mapping of group name to glob patterns")
    return {k: ([v] if isinstance(v, str) else list(v)) for k, v in data.items()}
