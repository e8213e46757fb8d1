"""One observed forward pass: which leaf module runs when, at which feature-map stride, and which feeds an output.

Grouping (paper §4.2.1) is by *feature scale* and *module structure*; both are read off a real forward pass rather
than off module names, so the same code serves our YOLOs and detectors we did not write.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

ForwardFn = Callable[[nn.Module, Any], Any]


@dataclass(frozen=True)
class LayerTrace:
    """What one leaf module did in the traced forward pass.

    ``stride`` is input size / output size of the module's (first) 4-D output, rounded to an integer; 0 when the
    output is not a feature map.
    """

    name: str
    type: str
    order: int
    stride: int
    out_shape: tuple[int, ...]
    module: nn.Module = field(repr=False, compare=False)


def first_image_tensor(example_inputs: Any) -> torch.Tensor:
    """The first 4-D tensor found in ``example_inputs`` (a tensor, or nested list/tuple/dict of them)."""
    if isinstance(example_inputs, torch.Tensor):
        if example_inputs.dim() == 4:
            return example_inputs
        if example_inputs.dim() == 3:  # a single image, as torchvision detectors take them
            return example_inputs.unsqueeze(0)
    if isinstance(example_inputs, dict):
        example_inputs = list(example_inputs.values())
    if isinstance(example_inputs, (list, tuple)):
        for item in example_inputs:
            try:
                return first_image_tensor(item)
            except ValueError:
                continue
    raise ValueError("example_inputs holds no image tensor of shape (B, 3, H, W)")


def flatten_tensors(obj: Any) -> list[torch.Tensor]:
    """All tensors in a nested output (tensor, list, tuple, dict, or object with tensor attributes in a dict)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in flatten_tensors(item)]
    return []


def run_forward(model: nn.Module, example_inputs: Any, forward_fn: ForwardFn | None = None) -> Any:
    """Call the model the way torch-pruning's tracer does: ``forward_fn(model, inputs)`` or ``model(inputs)``."""
    if forward_fn is not None:
        return forward_fn(model, example_inputs)
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, tuple):
        return model(*example_inputs)
    return model(example_inputs)


def _is_leaf(module: nn.Module) -> bool:
    return next(iter(module.children()), None) is None


def output_stride(output: Any, input_hw: tuple[int, int]) -> tuple[int, tuple[int, ...]]:
    """Stride (input size / map size, rounded) and shape of the first 4-D tensor in ``output``; stride 0 (and
    the first tensor's shape) when there is none."""
    tensors = [t for t in flatten_tensors(output) if t.dim() == 4]
    if not tensors:
        first = flatten_tensors(output)
        return 0, tuple(first[0].shape) if first else ()
    out = tensors[0]
    stride = max(input_hw[0] / out.shape[-2], input_hw[1] / out.shape[-1])
    return max(1, round(stride)), tuple(out.shape)


def trace_layers(
    model: nn.Module,
    example_inputs: Any,
    forward_fn: ForwardFn | None = None,
    modules: Iterable[nn.Module] | None = None,
) -> list[LayerTrace]:
    """Run one forward pass (no grad) and return every leaf module that ran, in execution order.

    A module called several times (a shared activation) is recorded at its first call. ``modules`` restricts
    the hooks to those modules (default: every leaf module). The model's train/eval mode is left as it was.
    """
    input_hw = tuple(first_image_tensor(example_inputs).shape[-2:])
    names = {module: name for name, module in model.named_modules()}
    targets = list(modules) if modules is not None else [m for m in model.modules() if _is_leaf(m)]
    records: dict[nn.Module, LayerTrace] = {}

    def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
        if module in records:
            return
        stride, shape = output_stride(output, input_hw)
        records[module] = LayerTrace(
            name=names.get(module, ""),
            type=type(module).__name__,
            order=len(records),
            stride=stride,
            out_shape=shape,
            module=module,
        )

    handles = [m.register_forward_hook(hook) for m in targets]
    try:
        with torch.no_grad():
            run_forward(model, example_inputs, forward_fn)
    finally:
        for handle in handles:
            handle.remove()
    return sorted(records.values(), key=lambda r: r.order)


@dataclass
class Observation:
    """Everything pruning needs from one grad-enabled forward pass, so the model runs once, not five times.

    ``traces``: leaf modules in execution order with output strides. ``reached``: for each watched layer name,
    the indices of the model outputs its activations flow into. ``direct``: the watched layers with at least
    one path to an output that crosses no upsampling op (see :func:`direct_nodes`). ``predictions``:
    conv/linear layers whose outputs reach a model output through parameter-free ops only. ``macs``:
    multiply-accumulates of every conv/linear call. ``input_means``: per-channel mean input of every
    conv/linear layer. ``input_shapes``: the input shape of every conv/linear call, in call order (a layer
    shared across FPN levels runs once per level; the latency table times each call).
    """

    traces: list[LayerTrace]
    reached: dict[str, set[int]]
    direct: set[str]
    predictions: list[str]
    macs: dict[nn.Module, float]
    input_means: dict[nn.Module, torch.Tensor]
    input_shapes: dict[nn.Module, list[tuple[int, ...]]] = field(default_factory=dict)


def layer_macs(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> float:
    """Multiply-accumulates of one conv or linear call (bias adds not counted), per batch of the call."""
    out = flatten_tensors(output)
    if not out:
        return 0.0
    if isinstance(module, nn.modules.conv._ConvNd):
        per_output = module.in_channels // module.groups
        for k in module.kernel_size:
            per_output *= k
        return float(out[0].numel()) * per_output
    if isinstance(module, nn.Linear):
        return float(out[0].numel()) * module.in_features
    return 0.0


class Recorder:
    """Forward hooks that build an :class:`Observation` from whatever forward pass runs while they are attached.

    Use as a context manager around any grad-enabled forward (ours in :func:`observe`, or torch-pruning's own
    tracing pass, so that the model runs once for both), then call :meth:`finish` with that pass's outputs.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, watch: Iterable[nn.Module] = ()) -> None:
        self.model = model
        self.input_hw = tuple(first_image_tensor(example_inputs).shape[-2:])
        self.names = {module: name for name, module in model.named_modules()}
        self.watched = set(watch)
        self.records: dict[nn.Module, LayerTrace] = {}
        self.grad_fn_owner: dict[Any, str] = {}
        self.dense_owner: dict[Any, str] = {}
        self.macs: dict[nn.Module, float] = {}
        self.sums: dict[nn.Module, torch.Tensor] = {}
        self.counts: dict[nn.Module, int] = {}
        self.shapes: dict[nn.Module, list[tuple[int, ...]]] = {}
        self.handles: list[Any] = []

    def _hook(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if module not in self.records:
            stride, shape = output_stride(output, self.input_hw)
            self.records[module] = LayerTrace(
                self.names.get(module, ""), type(module).__name__, len(self.records), stride, shape, module
            )
        if module in self.watched:
            for t in flatten_tensors(output):
                if t.grad_fn is not None:
                    self.grad_fn_owner.setdefault(t.grad_fn, self.names[module])
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            for t in flatten_tensors(output):
                if t.grad_fn is not None:
                    self.dense_owner.setdefault(t.grad_fn, self.names[module])
            self.macs[module] = self.macs.get(module, 0.0) + layer_macs(module, inputs, output)
            if inputs and isinstance(inputs[0], torch.Tensor):
                self.shapes.setdefault(module, []).append(tuple(inputs[0].shape))
                x = inputs[0].detach().float()
                channel_dim = 1 if x.dim() == 4 else x.dim() - 1
                dims = [d for d in range(x.dim()) if d != channel_dim]
                self.sums[module] = self.sums.get(module, 0) + x.sum(dim=dims)
                self.counts[module] = self.counts.get(module, 0) + x.numel() // max(x.shape[channel_dim], 1)

    def __enter__(self) -> Recorder:
        targets = [m for m in self.model.modules() if _is_leaf(m) or m in self.watched]
        self.handles = [m.register_forward_hook(self._hook) for m in targets]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def finish(self, outputs: Any) -> Observation:
        """Walk the autograd graph back from ``outputs`` (already output-transformed) and assemble the result."""
        reached: dict[str, set[int]] = {self.names[m]: set() for m in self.watched}
        predictions: list[str] = []
        for index, tensor in enumerate(flatten_tensors(outputs)):
            for fn in _ancestors(tensor.grad_fn, expand=lambda _fn: True):
                if fn in self.grad_fn_owner:
                    reached[self.grad_fn_owner[fn]].add(index)
            # prediction layers: the first dense layer on each path back from this output
            for fn in _ancestors(tensor.grad_fn, expand=lambda fn: fn not in self.dense_owner):
                owner = self.dense_owner.get(fn)
                if owner is not None and owner not in predictions:
                    predictions.append(owner)
        direct = {self.grad_fn_owner[fn] for fn in direct_nodes(outputs) if fn in self.grad_fn_owner}
        means = {m: (self.sums[m] / max(self.counts[m], 1)).cpu() for m in self.sums}
        traces = sorted(self.records.values(), key=lambda r: r.order)
        return Observation(traces, reached, direct, predictions, self.macs, means, self.shapes)


def is_upsampling(fn: Any) -> bool:
    """True for the autograd node of an upsampling op (``nn.Upsample`` and ``F.interpolate`` alike)."""
    return type(fn).__name__.startswith("Upsample")


def direct_nodes(outputs: Any) -> set[Any]:
    """Autograd nodes whose result reaches one of ``outputs`` along a path that crosses no upsampling op.

    This is what separates the end of a backbone from the start of a top-down neck that runs at the same
    coarsest scale: YOLOv4's SPP output (darknet layer 116) reaches the stride-32 head through the bottom-up
    concat, while the CBL after it (layer 117) feeds only the first upsample. Paper §5.3 puts the first in
    Group3 and the second in Group4.
    """
    found: set[Any] = set()
    for tensor in flatten_tensors(outputs):
        found.update(_ancestors(tensor.grad_fn, expand=lambda fn: not is_upsampling(fn)))
    return found


def _ancestors(root: Any, expand: Callable[[Any], bool]) -> list[Any]:
    """Autograd nodes reachable backwards from ``root``; a node for which ``expand`` is false is returned but
    its inputs are not followed."""
    found, stack, seen = [], [root], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        found.append(fn)
        if expand(fn):
            stack.extend(nxt for nxt, _ in fn.next_functions)
    return found


def observe(
    model: nn.Module,
    example_inputs: Any,
    forward_fn: ForwardFn | None = None,
    output_transform: Callable[[Any], Any] | None = None,
    watch: Iterable[nn.Module] = (),
) -> Observation:
    """Run one forward pass with autograd on and record an :class:`Observation` (``watch``: layers to reach-test).

    The caller chooses train/eval mode; use eval so BatchNorm statistics do not move.
    """
    with Recorder(model, example_inputs, watch) as recorder, torch.enable_grad():
        outputs = run_forward(model, example_inputs, forward_fn)
    if output_transform is not None:
        outputs = output_transform(outputs)
    return recorder.finish(outputs)


def prediction_layers(
    model: nn.Module,
    example_inputs: Any,
    forward_fn: ForwardFn | None = None,
    output_transform: Callable[[Any], Any] | None = None,
) -> list[str]:
    """Names of the conv/linear layers whose outputs reach a model output through parameter-free ops only.

    These are the prediction layers: their output channels *are* the detector's output format (anchors × (5 +
    classes)), so they must keep all of them. Found by walking the autograd graph back from every output tensor
    until the first conv/linear on each path, which works whatever reshapes, concats or sigmoids sit between.
    """
    was_training = model.training
    model.eval()
    try:
        return observe(model, example_inputs, forward_fn, output_transform).predictions
    finally:
        model.train(was_training)
