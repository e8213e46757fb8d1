"""Decide the groups of a detector and each group's pruning ratio (paper §4.2.1–4.2.2)."""

from .allocate import MAX_GROUP_RATIO, Allocation, allocate, bisect, find_valley, quantile_threshold
from .partition import Group, groups_from_patterns, load_group_patterns, partition, prunable_norms
from .trace import LayerTrace, prediction_layers, trace_layers

__all__ = [
    "MAX_GROUP_RATIO",
    "Allocation",
    "Group",
    "LayerTrace",
    "allocate",
    "bisect",
    "find_valley",
    "groups_from_patterns",
    "load_group_patterns",
    "partition",
    "prediction_layers",
    "prunable_norms",
    "quantile_threshold",
    "trace_layers",
]
