"""Forward hooks capturing the feature maps that group spatial attention is computed from (§4.3.1, Fig. 6).

The paper distils one feature map per group, at the five scales 208, 104, 52, 26 and 13 of a 416x416 input,
i.e. output strides 2, 4, 8, 16 and 32 of the backbone (§5.4; §6.3 for MobileNet-YOLOv3), and at the four
scales 104 to 13 for Darknet53-YOLOv3 (§6.3). The stride-32 map is the last one of Group3, YOLOv4's SPP output
(darknet layer 116, §5.3). The taps only *observe* a model through
forward hooks, so they work on any detector and on students pruned by any method: pruning changes channel
counts, never module names, which is why a student's taps are made from its teacher's tap names.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gcp.core.registry import Adapter, resolve_adapter
from grouping.trace import (
    ForwardFn,
    LayerTrace,
    direct_nodes,
    first_image_tensor,
    output_stride,
    run_forward,
)

# Output strides of the five groups' feature maps (paper §5.4: 208..13 px maps of a 416 px input).
PAPER_TAP_STRIDES: tuple[int, ...] = (2, 4, 8, 16, 32)


class AttentionTaps:
    """Capture, on every forward pass, the output of a few named modules of ``model``.

    ``layers="auto"`` picks one module per stride in ``strides`` (default :func:`tap_strides`: the model's
    ``attention_strides``, else the paper's five; see :func:`auto_tap_layers`); a list of
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
        strides: Sequence[int] | None = None,
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


def tap_strides(model: nn.Module) -> tuple[int, ...]:
    """The strides ``"auto"`` taps: the model's own ``attention_strides`` when it declares them (Darknet53-YOLOv3
    is distilled at four scales in §6.3), else the paper's five (§5.4)."""
    return tuple(getattr(model, "attention_strides", PAPER_TAP_STRIDES))


def auto_tap_layers(
    model: nn.Module,
    example_inputs: Any,
    strides: Sequence[int] | None = None,
    forward_fn: ForwardFn | None = None,
) -> list[LayerTrace]:
    """The groups' feature maps (§4.3.1, Fig. 6): for each stride in ``strides`` (default
    :func:`tap_strides`), the output of the last block (execution order) at that stride in the backbone.

    The backbone is what runs before the stride first decreases (the first upsample), minus what only feeds
    that upsample: §5.3 ends Group3 at YOLOv4's SPP output (darknet layer 116), not at the CBL after it
    (layer 117, the first layer of Group4), so a module qualifies only if its output reaches a model output
    along some path without an upsample (:func:`grouping.trace.direct_nodes`).

    Every named submodule is a candidate, not only leaves: a container finishes after its children, so the
    winner is the output of a whole block (a CSP stage after its fusion, a Darknet stage after its last
    residual add) rather than a raw convolution. A module inside a block that starts at its stride and ends
    at a coarser one is that block's intermediate, not a block output: MobileNetV2's expansion 1x1 runs at
    the previous block's stride, before the block's stride-2 depthwise conv, and is skipped. Modules whose
    output is not a single (B, C, H, W) tensor (a backbone returning three maps) and modules called more than
    once (a shared activation, whose captured output would be ambiguous) are skipped too. Strides absent from
    the backbone are simply missing. The model is traced in eval mode, so BatchNorm statistics are not
    touched, and its train/eval and requires_grad flags are restored afterwards.
    """
    strides = tap_strides(model) if strides is None else tuple(strides)
    traces = _trace_block_outputs(model, example_inputs, forward_fn)
    backbone = _before_first_stride_decrease(traces)
    chosen = {trace.stride: trace for trace in backbone if trace.stride in set(strides)}
    if not chosen:
        seen = sorted({trace.stride for trace in backbone})
        raise ValueError(
            f"no module before the first upsample outputs a map at strides {tuple(strides)}; saw {seen}"
        )
    return [chosen[stride] for stride in sorted(chosen)]


@dataclass
class _Call:
    """What a module's forward hook saw: how often it ran, its first output's autograd node and strides."""

    calls: int = 0
    single_map: bool = False
    grad_fn: Any = None
    in_stride: int = 0
    trace: LayerTrace | None = None


def _trace_block_outputs(
    model: nn.Module, example_inputs: Any, forward_fn: ForwardFn | None
) -> list[LayerTrace]:
    """One grad-enabled eval forward hooking every named submodule; the tap candidates in execution order."""
    candidates = {module: name for name, module in model.named_modules() if name}
    input_hw = tuple(first_image_tensor(example_inputs).shape[-2:])
    seen: dict[nn.Module, _Call] = {}

    def record(module: nn.Module, inputs: Any, output: Any) -> None:
        call = seen.setdefault(module, _Call())
        call.calls += 1
        if call.calls > 1:
            return
        call.single_map = isinstance(output, torch.Tensor) and output.dim() == 4
        call.grad_fn = output.grad_fn if isinstance(output, torch.Tensor) else None
        call.in_stride = output_stride(inputs, input_hw)[0]
        stride, shape = output_stride(output, input_hw)
        call.trace = LayerTrace(
            candidates[module], type(module).__name__, len(seen) - 1, stride, shape, module
        )

    handles = [module.register_forward_hook(record) for module in candidates]
    training = {module: module.training for module in model.modules()}
    # A frozen teacher (requires_grad=False) would build no autograd graph to follow back from the outputs.
    frozen = [p for p in model.parameters() if not p.requires_grad]
    try:
        model.eval()
        for parameter in frozen:
            parameter.requires_grad_(True)
        with torch.enable_grad():
            outputs = run_forward(model, example_inputs, forward_fn)
        direct = direct_nodes(outputs)
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in training.items():
            module.training = flag
        for parameter in frozen:
            parameter.requires_grad_(False)
    by_name = {candidates[module]: call for module, call in seen.items()}

    def inside_downsampling_block(name: str, stride: int) -> bool:
        parts = name.split(".")
        for depth in range(1, len(parts)):
            parent = by_name.get(".".join(parts[:depth]))
            if (
                parent is not None
                and parent.trace is not None
                and parent.in_stride == stride < parent.trace.stride
            ):
                return True
        return False

    kept = [
        call.trace
        for call in seen.values()
        if call.trace is not None
        and call.calls == 1
        and call.single_map
        and call.trace.stride > 0
        and call.grad_fn in direct
        and not inside_downsampling_block(call.trace.name, call.trace.stride)
    ]
    return sorted(kept, key=lambda trace: trace.order)


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


def tap_layers(model: nn.Module, example_inputs: Any, adapter: str | Adapter | None = "auto") -> list[str]:
    """Distillation taps (paper §4.3.1): one feature map per backbone stride, largest first.

    The family's own ``taps`` when it declares them, else :func:`distill.taps.auto_tap_layers` traced through
    the family's ``forward_fn``. Pass the names as ``taps=`` to :class:`distill.GroupAttentionDistiller`
    (prefixed with ``"model."`` when the distiller runs on :func:`network` views).
    """
    resolved = resolve_adapter(model, adapter)
    declared = resolved.taps(model) if resolved is not None and resolved.taps is not None else []
    if declared:
        return declared
    forward_fn = resolved.forward_fn if resolved is not None else None
    was_training = model.training
    model.eval()
    try:
        return [t.name for t in auto_tap_layers(model, example_inputs, forward_fn=forward_fn)]
    finally:
        model.train(was_training)
