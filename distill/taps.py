"""Forward hooks capturing the feature maps that group spatial attention is computed from (§4.3.1, Fig. 6).

The paper distils one feature map per group, at the five scales 208, 104, 52, 26 and 13 of a 416x416 input,
i.e. output strides 2, 4, 8, 16 and 32 of the backbone (§5.4, §6.3). The taps only *observe* a model through
forward hooks, so they work on any detector and on students pruned by any method: pruning changes channel
counts, never module names, which is why a student's taps are made from its teacher's tap names.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from grouping.trace import ForwardFn, LayerTrace, trace_layers

# Output strides of the five groups' feature maps (paper §5.4: 208..13 px maps of a 416 px input).
PAPER_TAP_STRIDES: tuple[int, ...] = (2, 4, 8, 16, 32)


class AttentionTaps:
    """Capture, on every forward pass, the output of a few named modules of ``model``.

    ``layers="auto"`` picks one module per stride in ``strides`` (see :func:`auto_tap_layers`); a list of
    module names overrides it and keeps the given order (give them largest scale first, which is the order the
    default β of :class:`distill.GroupAttentionDistiller` assume). ``example_inputs`` are only used by
    ``"auto"``.

    Each hook keeps a reference to the latest output of its module, replacing the previous one, so the taps
    never hold more than one forward pass worth of maps (and the autograd graph behind them, for a student in
    training); :meth:`clear` drops even those. A module called several times per forward pass is captured at
    its last call. Use as a context manager, or call :meth:`close`, to remove the hooks.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any = None,
        layers: str | Sequence[str] = "auto",
        *,
        strides: Sequence[int] = PAPER_TAP_STRIDES,
        forward_fn: ForwardFn | None = None,
    ) -> None:
        if isinstance(layers, str):
            if layers != "auto":
                raise ValueError(f"layers must be 'auto' or a list of module names, got {layers!r}")
            if example_inputs is None:
                raise ValueError("layers='auto' needs example_inputs to trace the model")
            names = [trace.name for trace in auto_tap_layers(model, example_inputs, strides, forward_fn)]
        else:
            names = list(layers)
        modules = _named_modules(model, names)
        self.names: tuple[str, ...] = tuple(names)
        self._captured: dict[str, tuple[torch.Tensor, int]] = {}
        self._handles = [
            module.register_forward_hook(self._capture_hook(name, module)) for name, module in modules
        ]

    def _capture_hook(self, name: str, tapped: nn.Module) -> Any:
        def capture(module: nn.Module, _inputs: Any, output: Any) -> None:
            # copy.deepcopy(model) copies its hooks too (an EMA copy, a second student); only the tapped
            # module itself may write into these taps.
            if module is not tapped:
                return
            if not isinstance(output, torch.Tensor) or output.dim() != 4:
                got = (
                    f"{output.dim()}-D tensor" if isinstance(output, torch.Tensor) else type(output).__name__
                )
                raise TypeError(f"attention tap {name!r} must output a (B, C, H, W) tensor, got a {got}")
            # The version counter lets maps() detect a later in-place change (e.g. an inplace activation).
            self._captured[name] = (output, output._version)

        return capture

    def maps(self) -> OrderedDict[str, torch.Tensor]:
        """The maps captured by the last forward pass, tap order (largest scale first for ``"auto"``).

        Taps whose module did not run since the last :meth:`clear` are absent. Raises if a captured map was
        modified in place after its module returned, since its values would no longer be that module's output.
        """
        result: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name in self.names:
            if name not in self._captured:
                continue
            tensor, version = self._captured[name]
            if tensor._version != version:
                raise RuntimeError(
                    f"the output of attention tap {name!r} was modified in place after it was captured; "
                    "tap a module whose output is not overwritten (e.g. the block after an inplace op)"
                )
            result[name] = tensor
        return result

    def clear(self) -> None:
        """Drop the captured maps (and with them any autograd graph they keep alive)."""
        self._captured.clear()

    def close(self) -> None:
        """Remove the hooks and drop the captured maps; the model is left exactly as it was."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def __enter__(self) -> AttentionTaps:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"AttentionTaps({list(self.names)})"


def auto_tap_layers(
    model: nn.Module,
    example_inputs: Any,
    strides: Sequence[int] = PAPER_TAP_STRIDES,
    forward_fn: ForwardFn | None = None,
) -> list[LayerTrace]:
    """The five groups' feature maps: for each stride in ``strides``, the last module (execution order) whose
    output has that stride, within the part of the network that runs before the stride first decreases (the
    first upsample, i.e. the backbone plus whatever runs at its coarsest scale before the top-down neck).

    Every named submodule is a candidate, not only leaves: a container finishes after its children, so the
    winner is the output of a whole block (a CSP stage after its fusion, a Darknet stage after its last
    residual add) rather than a raw convolution. Modules whose output is not a single (B, C, H, W) tensor (a
    backbone returning three maps) and modules called more than once (a shared activation, whose captured
    output would be ambiguous) are skipped. Strides absent from the backbone are simply missing (§6.3: four
    taps for Darknet53-YOLOv3 in the paper). The model is traced in eval mode, so BatchNorm statistics are not
    touched, and its train/eval flags are restored afterwards.
    """
    traces = _trace_single_map_modules(model, example_inputs, forward_fn)
    backbone = _before_first_stride_decrease(traces)
    chosen = {trace.stride: trace for trace in backbone if trace.stride in set(strides)}
    if not chosen:
        seen = sorted({trace.stride for trace in backbone})
        raise ValueError(
            f"no module before the first upsample outputs a map at strides {tuple(strides)}; saw {seen}"
        )
    return [chosen[stride] for stride in sorted(chosen)]


def _trace_single_map_modules(
    model: nn.Module, example_inputs: Any, forward_fn: ForwardFn | None
) -> list[LayerTrace]:
    """``trace_layers`` over every named submodule, keeping those called once with a single 4-D output."""
    candidates = [(name, module) for name, module in model.named_modules() if name]
    calls: dict[nn.Module, int] = {}
    single_map: set[nn.Module] = set()

    def record(module: nn.Module, _inputs: Any, output: Any) -> None:
        calls[module] = calls.get(module, 0) + 1
        if isinstance(output, torch.Tensor) and output.dim() == 4:
            single_map.add(module)

    handles = [module.register_forward_hook(record) for _, module in candidates]
    training = {module: module.training for module in model.modules()}
    try:
        model.eval()
        traces = trace_layers(model, example_inputs, forward_fn, modules=[m for _, m in candidates])
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in training.items():
            module.training = flag
    return [t for t in traces if t.module in single_map and calls.get(t.module) == 1 and t.stride > 0]


def _before_first_stride_decrease(traces: Sequence[LayerTrace]) -> list[LayerTrace]:
    """The prefix of ``traces`` (execution order) before the first output finer than one already seen."""
    prefix: list[LayerTrace] = []
    coarsest = 0
    for trace in traces:
        if trace.stride < coarsest:
            break
        coarsest = max(coarsest, trace.stride)
        prefix.append(trace)
    return prefix


def _named_modules(model: nn.Module, names: Sequence[str]) -> list[tuple[str, nn.Module]]:
    if not names:
        raise ValueError("need at least one attention tap")
    if len(set(names)) != len(names):
        raise ValueError(f"attention taps must be distinct, got {list(names)}")
    by_name = dict(model.named_modules())
    missing = [name for name in names if name not in by_name]
    if missing:
        raise ValueError(f"the model has no modules named {missing} (taps are matched by module name)")
    return [(name, by_name[name]) for name in names]
