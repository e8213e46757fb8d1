"""Build torch-pruning's DependencyGraph, with channel splits mapped from autograd's own record of them.

torch-pruning 1.6.1 reads a split's sizes from ``grad_fn._saved_split_sizes`` / ``_saved_self_sizes``; current
PyTorch saves ``chunk``/``split(int)`` as ``SplitBackward0`` with ``_saved_split_size`` and
``_saved_self_sym_sizes`` instead, so the library falls back to guessing sizes from the neighbours and, for a
C2f / CSPNet block (``x.chunk(2, 1)`` feeding a concat and a residual branch), guesses wrong: the group indices run
past the tensor (the ``IndexError`` of torch-pruning issues #219, #392, #412, #506). It also assumes the graph's
list of split outputs is in chunk order, which tracing does not guarantee.

The repair is generic: for every split node we read which chunks each consumer takes (the ``output_nr`` in the
consumer's ``grad_fn.next_functions``; a C2f concat takes both) and the chunk bounds from the saved sizes, then
rebuild the index mappings.
No per-architecture rule is involved.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch_pruning as tp
from torch import nn
from torch_pruning import ops
from torch_pruning.dependency import index_mapping, shape_infer

from grouping.trace import ForwardFn

CHANNEL_DIM = 1


def chunk_bounds(grad_fn: Any) -> list[tuple[int, int]] | None:
    """[start, end) of every output of a split along the channel dim, from the autograd node's saved values."""
    dim = getattr(grad_fn, "_saved_dim", None)
    sizes_in = getattr(grad_fn, "_saved_self_sym_sizes", None)
    if dim is None or sizes_in is None or dim >= len(sizes_in):
        return None
    if dim < 0:
        dim += len(sizes_in)
    if dim != CHANNEL_DIM:
        return None
    total = int(sizes_in[dim])
    if hasattr(grad_fn, "_saved_split_sizes"):
        sizes = [int(s) for s in grad_fn._saved_split_sizes]
    elif hasattr(grad_fn, "_saved_split_size"):
        step = int(grad_fn._saved_split_size)
        sizes = [min(step, total - start) for start in range(0, total, step)]
    else:
        return None
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


def _chunks_read(split_fn: Any, consumer_fn: Any, max_depth: int = 8) -> list[int]:
    """Which outputs of ``split_fn`` the consumer reads, in the order of its autograd inputs.

    A consumer that takes the split directly lists every chunk it reads (a C2f concat ``cat([a, b, m(b)])``
    reads both); one that sits further down is searched breadth-first and reads the first chunk found.
    """
    direct = [int(nr) for parent, nr in consumer_fn.next_functions if parent is split_fn]
    if direct:
        return direct
    frontier, seen = [consumer_fn], set()
    for _ in range(max_depth):
        nxt = []
        for fn in frontier:
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            for parent, output_nr in fn.next_functions:
                if parent is split_fn:
                    return [int(output_nr)]
                nxt.append(parent)
        frontier = nxt
    return []


def _occurrence_chunks(node: Any, bounds: list[tuple[int, int]]) -> list[int] | None:
    """The chunk behind each entry of ``node.outputs``, or None when one cannot be told.

    torch-pruning lists a consumer once per chunk it reads, in the order of the consumer's autograd inputs,
    and adds its dependencies in that same order; the j-th listing of a consumer is its j-th chunk read.
    """
    reads: dict[Any, list[int]] = {}
    numbers = []
    for out in node.outputs:
        if out not in reads:
            reads[out] = _chunks_read(node.grad_fn, out.grad_fn)
        if not reads[out]:
            return None
        numbers.append(reads[out].pop(0))
    return numbers if all(n < len(bounds) for n in numbers) else None


def _deps_to(deps: list[Any], target: Any) -> list[Any]:
    return [dep for dep in deps if dep.target == target]


def repair_splits(graph: Any) -> int:
    """Re-derive the index mapping of every channel split in ``graph``; returns how many splits were repaired.

    For each entry of the split's outputs (a consumer listed once per chunk it reads) the dependency between
    them gets that chunk's [start, end). ``split_sizes`` follows torch-pruning's shape inference, which reads it
    by output entry: the size of the chunk each entry reads, so it sums to more than the split's channels when
    a chunk has several readers (C2f: 3 × 8 for 16 channels). ``offsets`` is cleared: torch-pruning re-derives
    split mappings from it on every ``get_pruning_group``, assuming outputs in chunk order, which would undo
    this repair. Concats fed by a repaired split get their input sizes from the chunks they read.
    """
    plans = []
    for node in graph.module2node.values():
        if node.type != ops.OPTYPE.SPLIT:
            continue
        bounds = chunk_bounds(node.grad_fn)
        numbers = _occurrence_chunks(node, bounds) if bounds is not None else None
        if numbers is None:
            continue
        node.module.split_sizes = [bounds[n][1] - bounds[n][0] for n in numbers]
        node.module.offsets = None
        plans.append((node, [list(bounds[n]) for n in numbers]))
    if not plans:
        return 0
    spans_into: dict[tuple[Any, Any], list[list[int]]] = {}  # (split, consumer) -> span of each listing
    for node, spans in plans:
        for out_node, span in zip(node.outputs, spans):
            spans_into.setdefault((node, out_node), []).append(span)
    for cat in graph.module2node.values():  # concat sizes were inferred from the wrong split sizes: redo them
        if cat.type != ops.OPTYPE.CONCAT:
            continue
        cat.module.offsets = None
        cat.module.concat_sizes = None
        if any((n, cat) in spans_into for n in cat.inputs):
            taken: dict[Any, int] = {}
            sizes = []
            for n in cat.inputs:
                if (n, cat) in spans_into:
                    start, end = spans_into[(n, cat)][taken.get(n, 0)]
                    taken[n] = taken.get(n, 0) + 1
                    sizes.append(end - start)
                else:
                    sizes.append(shape_infer.infer_channels_between(graph, n, cat))
            cat.module.concat_sizes = sizes
    index_mapping.update_index_mapping(graph)
    for (node, out_node), spans in spans_into.items():
        for dep, span in zip(_deps_to(node.dependencies, out_node), spans):
            dep.index_mapping[0] = index_mapping._SplitIndexMapping(offset=span, reverse=False)
        for dep, span in zip(_deps_to(out_node.dependencies, node), spans):
            dep.index_mapping[0] = index_mapping._SplitIndexMapping(offset=span, reverse=True)
    return len(plans)


def build_graph(
    model: nn.Module,
    example_inputs: Any,
    forward_fn: ForwardFn | None = None,
    output_transform: Callable[[Any], Any] | None = None,
) -> Any:
    """``tp.DependencyGraph().build_dependency(...)`` followed by :func:`repair_splits`."""
    graph = tp.DependencyGraph().build_dependency(
        model, example_inputs, forward_fn=forward_fn, output_transform=output_transform, verbose=False
    )
    repair_splits(graph)
    return graph


SPLIT_LIKE = (ops._SplitOp, ops._SliceOp, ops._UnbindOp)


def crosses_channel_split(graph: Any, group: Any) -> bool:
    """True when a group's channels pass through a split/slice of the channel dimension.

    Such channels cannot be removed safely even with a correct graph: ``x.chunk(2, 1)`` re-splits the *pruned*
    tensor in halves at run time, and ``split([a, b])`` or ``x[:, :a]`` carry sizes written in the model's code.
    They are kept whole; an adapter may rewrite such a block into separate convs to make them prunable.
    """
    for dep, _ in group:
        if isinstance(dep.layer, SPLIT_LIKE):
            node = graph.module2node.get(dep.layer)
            dim = getattr(getattr(node, "grad_fn", None), "_saved_dim", CHANNEL_DIM)
            if dim == CHANNEL_DIM:
                return True
    return False


def producer_of(graph: Any, norm: nn.Module) -> nn.Module | None:
    """The conv/linear layer whose output a BatchNorm normalises (its channels are the BN's channels)."""
    node = graph.module2node.get(norm)
    if node is None:
        return None
    for parent in node.inputs:
        if isinstance(parent.module, (nn.modules.conv._ConvNd, nn.Linear)):
            return parent.module
    return None


def pruning_ratio_dict(
    model: nn.Module,
    example_inputs: Any,
    groups: Sequence[Mapping[str, Any]],
    forward_fn: ForwardFn | None = None,
) -> dict[tuple[nn.Module, ...], float]:
    """Express a group allocation as torch-pruning ``pruning_ratio_dict`` scopes.

    ``groups`` are the report's group entries (``name``, ``layers`` = BatchNorm names, ``ratio``); each becomes
    one scope: the tuple of convs producing those BatchNorms, pruned at the group's ratio with a ranking shared
    inside the scope, which is what a per-group threshold means (§4.2.2).
    """
    graph = build_graph(model, example_inputs, forward_fn)
    modules = dict(model.named_modules())
    scopes: dict[tuple[nn.Module, ...], float] = {}
    for entry in groups:
        convs = []
        for name in entry["layers"]:
            if name not in modules:
                raise ValueError(f"group {entry['name']!r}: no layer named {name!r} in the model")
            conv = producer_of(graph, modules[name])
            if conv is not None and conv not in convs:
                convs.append(conv)
        if convs:
            scopes[tuple(convs)] = float(entry["ratio"])
    return scopes
