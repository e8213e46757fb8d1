"""The registries the pruning core looks things up in, filled by the packages above it: adapters (how to trace,
protect and distil a detector family this project did not write, filled by :mod:`gcp.adapters`), model
builders (filled by :mod:`gcp.detection.models`) and latency timers (filled by :mod:`gcp.runtime`).

An adapter describes one model family (Ultralytics YOLO, torchvision detection, timm ``features_only``
backbones) with a few plain functions:

* ``matches(model)``: is this model of the family (checked without importing the family's package);
* ``prepare(model)``: an in-place rewrite into an equivalent module (same outputs before pruning), e.g. a C2f
  whose ``cv1(x).chunk(2, 1)`` becomes two convs, so channels that ran through a channel split become prunable;
* ``run(model, images)``: the model's own trainable network (backbone, neck, head) on an image batch tensor
  ``(B, 3, H, W)``, converted to whatever the model's forward expects; never anchors, decoding or NMS;
* ``heads(model)``: names of the modules whose outputs are the raw predictions (the prediction layers, paper
  §4.2: their output channels are the detector's output format and are never pruned);
* ``ignored_layers(model)``: extra layers whose output channels must stay (attention heads, GroupNorm inputs);
* ``taps(model)``: the distillation taps (paper §4.3.1), when the generic choice of
  :func:`distill.taps.auto_tap_layers` does not suit the family;
* ``soft_outputs(model)``: maps the raw predictions to per-scale (class logits, xyxy boxes) pairs for L_soft
  (paper eq. 8-12), when the family's box decoding is implemented.

The dependency graph is traced through :meth:`Adapter.forward_fn`, which runs ``run`` and returns only the
captured outputs of ``heads``: torch-pruning then covers backbone, neck and head but never the reshapes,
concatenations over anchors and postprocessing behind them (whose index lists made graph building take
minutes on torchvision detectors).

Adding a family is one small file: the functions above and ``ADAPTER = Adapter(name=..., matches=..., run=...,
heads=...)``; register it in :mod:`gcp.adapters` to ship it, or call :func:`register_adapter` from user code
(it is then tried before the built-in ones). ``matches`` must not import the family's package (check
``type(model).__module__`` first), so that ultralytics and timm stay optional.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from grouping.trace import ForwardFn, first_image_tensor, flatten_tensors, run_forward

# Raw head tensors → per scale (class logits (B, k, C), boxes xyxy in input pixels (B, k, 4)), as the
# distiller's ``output_adapter`` takes them.
SoftOutputs = Callable[[Any], list[tuple[torch.Tensor, torch.Tensor]]]

_REGISTRY: dict[str, Adapter] = {}


@dataclass(frozen=True)
class Adapter:
    """How to trace, protect and distil one detector family (see the module docstring for each field)."""

    name: str
    matches: Callable[[nn.Module], bool]
    run: Callable[[nn.Module, Any], Any]
    heads: Callable[[nn.Module], list[str]] | None
    prepare: Callable[[nn.Module], int] | None = None
    ignored_layers: Callable[[nn.Module], list[str]] | None = None
    soft_outputs: Callable[[nn.Module], SoftOutputs] | None = None
    taps: Callable[[nn.Module], list[str]] | None = None

    @property
    def forward_fn(self) -> ForwardFn:
        """``forward_fn(model, images)`` for torch-pruning and the core: the raw head tensors, in ``heads`` order
        (all output tensors of ``run`` when the family has no ``heads``)."""
        if self.heads is None:
            return lambda model, images: flatten_tensors(self.run(model, images))
        return lambda model, images: capture_outputs(
            model, self.heads(model), lambda: self.run(model, images)
        )

    def ignored(self, model: nn.Module) -> list[str]:
        """Names of layers whose output channels this family needs unchanged."""
        return list(self.ignored_layers(model)) if self.ignored_layers is not None else []

    def prepare_model(self, model: nn.Module) -> int:
        """Apply the family's equivalent rewrite in place; returns how many blocks were rewritten."""
        return self.prepare(model) if self.prepare is not None else 0


def capture_outputs(model: nn.Module, names: Sequence[str], run: Callable[[], Any]) -> list[torch.Tensor]:
    """Run ``run()`` and return the outputs of the modules ``names``: grouped by name, each in call order.

    A module called once per feature level (RetinaNet's shared head convs) contributes one tensor per call.
    Raises when a named module is missing or never ran, which means the adapter no longer fits the model.
    """
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"adapter head layers {missing} are not in {type(model).__name__}")
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def hook_for(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured[name].extend(flatten_tensors(output))

        return hook

    handles = [modules[n].register_forward_hook(hook_for(n)) for n in names]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    silent = [n for n, outs in captured.items() if not outs]
    if silent:
        raise RuntimeError(f"adapter head layers {silent} did not run in {type(model).__name__}'s forward")
    return [t for n in names for t in captured[n]]


def register_adapter(adapter: Adapter, *, replace: bool = False, last: bool = False) -> Adapter:
    """Add ``adapter`` to the registry, ahead of the ones already there (``find_adapter`` tries it first), or
    behind them with ``last=True`` (how :mod:`gcp.adapters` lists the built-in families, in the order tried)."""
    registry = _REGISTRY
    if adapter.name in registry and not replace:
        raise ValueError(f"an adapter named {adapter.name!r} is already registered; pass replace=True")
    others = [(name, a) for name, a in registry.items() if name != adapter.name]
    registry.clear()
    if last:
        registry.update(others)
        registry[adapter.name] = adapter
    else:
        registry[adapter.name] = adapter
        registry.update(others)
    return adapter


def unregister_adapter(name: str) -> None:
    """Remove the adapter registered as ``name``."""
    if _REGISTRY.pop(name, None) is None:
        raise ValueError(f"no adapter named {name!r} is registered")


def adapter_names() -> list[str]:
    """Registered adapter names, in the order ``find_adapter`` tries them."""
    return list(_REGISTRY)


def get_adapter(name: str) -> Adapter:
    """The adapter registered as ``name``."""
    registry = _REGISTRY
    if name not in registry:
        raise ValueError(f"no adapter named {name!r}; registered: {list(registry)}")
    return registry[name]


def find_adapter(model: nn.Module) -> Adapter | None:
    """The first registered adapter that recognises ``model``, or None."""
    return next((a for a in _REGISTRY.values() if a.matches(model)), None)


def resolve_adapter(model: nn.Module, adapter: str | Adapter | None) -> Adapter | None:
    """``"auto"`` → :func:`find_adapter`; a name → that adapter (which must recognise the model); None → None."""
    if adapter is None or isinstance(adapter, Adapter):
        return adapter
    if not isinstance(adapter, str):
        raise TypeError(
            f"adapter must be 'auto', an adapter name, an Adapter or None, got {type(adapter).__name__}"
        )
    if adapter == "auto":
        return find_adapter(model)
    found = get_adapter(adapter)
    if not found.matches(model):
        raise ValueError(f"adapter {adapter!r} does not recognise a {type(model).__name__}")
    return found


def network(model: nn.Module, adapter: str | Adapter = "auto") -> nn.Module:
    """The trainable network of ``model`` as a module: ``images (B, 3, H, W) -> tuple of raw head tensors``.

    Use it for ONNX export of what was pruned, or as the student/teacher of the distiller together with
    ``adapter.soft_outputs``. The wrapped model is shared, not copied.
    """
    resolved = resolve_adapter(model, adapter)
    if resolved is None:
        raise ValueError(f"no adapter recognises a {type(model).__name__}; pass adapter= explicitly")
    return NetworkView(model, resolved)


class NetworkView(nn.Module):
    """``forward(images)`` runs the adapter's trainable network and returns its raw head tensors as a tuple."""

    def __init__(self, model: nn.Module, adapter: Adapter) -> None:
        super().__init__()
        self.model = model
        self.adapter_name = adapter.name
        self._forward_fn = adapter.forward_fn

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self._forward_fn(self.model, images))


def split_output_channels(block: nn.Module, sizes: Sequence[int]) -> list[nn.Module]:
    """Copies of a conv(-norm-activation) block, each producing one consecutive slice of its output channels.

    Every parameter and buffer whose leading dimension is the block's output width (conv weight and bias,
    BatchNorm γ, β, running mean and variance, a PReLU slope) is sliced; the rest is copied. Concatenating the
    copies' outputs along channels gives the block's output, which is how a ``conv(x).chunk(...)`` becomes
    separately prunable convs.
    """
    convs = [m for m in block.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if len(convs) != 1 or convs[0].groups != 1:
        raise ValueError(
            f"can only split a block with one dense conv, got {type(block).__name__} with {len(convs)}"
        )
    width = convs[0].out_channels
    if sum(sizes) != width or any(s < 1 for s in sizes):
        raise ValueError(f"split sizes {list(sizes)} do not add up to the {width} output channels")
    parts, start = [], 0
    for size in sizes:
        part = copy.deepcopy(block)
        for module in part.modules():
            for tensors in (module._parameters, module._buffers):
                for key, value in tensors.items():
                    if value is not None and value.dim() >= 1 and value.shape[0] == width:
                        sliced = value.detach()[start : start + size].clone()
                        tensors[key] = (
                            nn.Parameter(sliced, value.requires_grad)
                            if tensors is module._parameters
                            else sliced
                        )
            if isinstance(module, nn.modules.conv._ConvNd):
                module.out_channels = size
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.num_features = size
        parts.append(part)
        start += size
    return parts


def rewrite_modules(
    model: nn.Module, rewrite_for: Callable[[nn.Module], Callable[[nn.Module], nn.Module] | None]
) -> int:
    """Replace, in place, every submodule for which ``rewrite_for(module)`` gives a constructor, by
    ``constructor(module)``; returns how many were replaced. Used by the adapters' equivalent-block rewrites."""
    replacements = []
    for name, module in model.named_modules():
        rewrite = rewrite_for(module) if name else None
        if rewrite is not None:
            replacements.append((name, rewrite))
    for name, rewrite in replacements:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, rewrite(parent.get_submodule(child)))
    return len(replacements)


def snapshot_submodules(model: nn.Module) -> Callable[[], None]:
    """Remember which submodule every module of ``model`` holds; the returned callable puts them all back.

    Undoes a :func:`rewrite_modules` (which only swaps submodules and never edits the ones it replaces), so
    that a model whose pruning is refused after its rewrite is handed back exactly as the user gave it.
    """
    children = {module: dict(module._modules) for module in model.modules()}

    def restore() -> None:
        for module, saved in children.items():
            module._modules.clear()
            module._modules.update(saved)

    return restore


def image_list(images: Any) -> list[torch.Tensor]:
    """A batch tensor (B, 3, H, W) as the list of (3, H, W) images torchvision-style forwards take."""
    if isinstance(images, torch.Tensor):
        return list(first_image_tensor(images).unbind(0))
    if isinstance(images, (list, tuple)) and all(
        isinstance(i, torch.Tensor) and i.dim() == 3 for i in images
    ):
        return list(images)
    raise TypeError("expected an image batch tensor (B, 3, H, W) or a list of (3, H, W) image tensors")


def convs_feeding_groupnorm(model: nn.Module) -> list[str]:
    """Convs directly followed by a GroupNorm inside a Sequential (torchvision's Conv-GN-ReLU head blocks).

    GroupNorm needs its channel count divisible by its number of groups, which an arbitrary pruning mask
    breaks, so these convs keep their output channels.
    """
    found = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for (name, child), (_, following) in zip(children, children[1:]):
            if isinstance(child, nn.modules.conv._ConvNd) and isinstance(following, nn.GroupNorm):
                found.append(f"{parent_name}.{name}" if parent_name else name)
    return found


def failing_module(model: nn.Module, example_inputs: Any, forward_fn: ForwardFn | None) -> str:
    """Run the model once more and name the innermost module that was running when it raised.

    Only called after a forward pass failed, to turn a bare exception into "module 'neck.2' (C2f)". Returns
    the model's own ``forward`` when the failure happened outside any submodule (or not again).
    """
    names = {m: n for n, m in model.named_modules()}
    running: list[nn.Module] = []

    def enter(module: nn.Module, _inputs: Any) -> None:
        running.append(module)

    def leave(module: nn.Module, _inputs: Any, _output: Any) -> None:
        if running and running[-1] is module:
            running.pop()

    handles = [m.register_forward_pre_hook(enter) for m in model.modules()]
    handles += [m.register_forward_hook(leave) for m in model.modules()]
    try:
        with torch.no_grad():
            run_forward(model, example_inputs, forward_fn)
    except Exception:  # the failure we are locating
        innermost = running[-1] if running else None
        if innermost is not None and innermost is not model:
            return f"module {names.get(innermost, '?')!r} ({type(innermost).__name__})"
    finally:
        for handle in handles:
            handle.remove()
    return f"{type(model).__name__}.forward"


def tracing_hint(model: nn.Module, family: Adapter | None) -> str:
    """How to describe a model to the tracer, for error messages."""
    known = (
        f"adapter {family.name!r} did not fit it"
        if family is not None
        else (f"no registered adapter ({', '.join(adapter_names())}) recognises {type(model).__name__}")
    )
    return (
        "forward_fn=lambda model, images: <run the trainable network, returning its raw head tensors> and, when "
        "the forward returns a structure, output_transform=lambda outputs: <list of those tensors> "
        f"({known}; see gcp.adapters to register one)"
    )


# ------------------------------------------------------------------------------------------- model builders
# Builders of the detectors a pruned file can record by name (``model.gcp_builder = {"name", "kwargs"}``); the
# detector package registers its own (gcp.detection.models), as timm's model registry is filled by its models.
_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_builder(name: str, builder: Callable[..., nn.Module]) -> None:
    """Let :func:`gcp.load_pruned` rebuild models recorded as ``name`` with ``builder(**kwargs)``."""
    if _BUILDERS.get(name, builder) is not builder:
        raise ValueError(f"a different builder is already registered as {name!r}")
    _BUILDERS[name] = builder


def builders() -> dict[str, Callable[..., nn.Module]]:
    """The registered builders by name (a copy)."""
    return dict(_BUILDERS)


# ------------------------------------------------------------------------------------------- latency timers
# Runtimes ``budget="latency"`` can time on, by name; gcp.runtime registers ONNX Runtime and TensorRT.
_TIMERS: dict[str, Callable[[], Any]] = {}


def register_timer(name: str, factory: Callable[[], Any]) -> None:
    """Let ``prune_detector(..., budget="latency", latency=name)`` time on the timer ``factory()`` makes."""
    _TIMERS[name] = factory


def timer_factory(name: str) -> Callable[[], Any] | None:
    """The factory registered as ``name``, or None."""
    return _TIMERS.get(name)
