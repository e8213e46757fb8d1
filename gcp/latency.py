"""Predicted latency of a pruned network on its target runtime, from a per-layer table measured once and cached.

MACs are exact arithmetic but not time: the same MACs cut buys very different latency cuts depending on where
the channels go (issue 14). ``prune_detector(budget="latency")`` therefore bisects on a *predicted* latency:

    latency(kept channels) = Σ over conv calls t_call(c_in kept, c_out kept) + remainder

* ``t_call`` is measured on the target runtime by timing the layer alone: a one-conv ONNX graph with the
  layer's kernel, stride, padding, groups and input size, its BatchNorm folded into the bias (what ONNX Runtime
  and TensorRT do to the whole model anyway) and its activation after it, at a grid of channel counts (a few
  fractions of the base count, multiples of the runtime's channel block), and interpolated piecewise
  bilinearly between them. Bilinear is the physical form of a conv's cost: a + b·c_in + c·c_out + d·c_in·c_out
  (fixed overhead, input reads, output writes, multiply-accumulates), so the grid only has to capture how the
  runtime departs from it (cache sizes, kernel choices). Measurements are made non-decreasing in both channel
  counts (a layer with fewer channels is never predicted slower), so the allocators' bisection sees a monotone
  budget.
* ``remainder`` = the whole network measured on the runtime − Σ t_call at the base channel counts: every op
  the table does not model (concat, upsample, pooling, adds, reorders between layouts, linear layers) and the
  per-call overhead of the standalone timings. It is held fixed, so a pruning's predicted saving is the sum of
  its per-layer savings only.

The table is cached as JSON under :func:`cache_dir` (``latency_cache=``, else ``$GCP_CACHE_DIR/latency``,
else ``~/.cache/gcp/latency``), one file per :func:`table_key`: the architecture (module types, settings and parameter
shapes), the traced conv calls and forward, the input shape, the runtime, its version, its threads and the
device, so a second pruning of the same network measures nothing and another network never reuses its times. Writes are atomic.

Timers (:class:`OnnxRuntimeTimer`, :class:`TensorRTTimer`, or any object with the :class:`LatencyTimer`
methods, e.g. a fake one in tests) do the measuring. :func:`profile_onnxruntime` is the other tool here: ONNX
Runtime's own profiler, per node and per op type, to see where a model's time goes.
"""

from __future__ import annotations

import bisect as _bisect
import dataclasses
import hashlib
import json
import os
import re
import statistics
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from grouping.trace import ForwardFn, flatten_tensors, run_forward

from .io import atomic_write_json

# Part of every cache key: a new version whenever what is timed changes (2: Mish timed as gcp exports it).
FORMAT = "gcp.latency/2"
GRID_POINTS = 4  # channel counts per axis: 1/4, 1/2, 3/4 and all of the base count


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """One call of a Conv2d: everything its time depends on besides the channel counts, plus the grid.

    ``groups`` is ``"dense"``, ``"depthwise"`` (in = out = groups, pruned together) or the group count of
    another grouped conv (kept whole by pruning). ``in_grid``/``out_grid`` are the channel counts timed; an
    axis pruning cannot change has one point.
    """

    batch: int
    height: int
    width: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int, int, int]  # top, left, bottom, right
    dilation: tuple[int, int]
    groups: str
    activation: str
    in_channels: int
    out_channels: int
    in_grid: tuple[int, ...]
    out_grid: tuple[int, ...]

    @property
    def key(self) -> str:
        """Stable text key of the spec (the table's entries are stored under it)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    def out_hw(self) -> tuple[int, int]:
        """Output height and width (PyTorch's and ONNX's conv arithmetic)."""
        sizes = []
        for size, k, s, d, pad in zip(
            (self.height, self.width),
            self.kernel,
            self.stride,
            self.dilation,
            (self.padding[0] + self.padding[2], self.padding[1] + self.padding[3]),
        ):
            sizes.append((size + pad - d * (k - 1) - 1) // s + 1)
        return sizes[0], sizes[1]

    def group_count(self, out_channels: int) -> int:
        """The ``groups`` attribute of the conv with ``out_channels`` outputs."""
        if self.groups == "dense":
            return 1
        if self.groups == "depthwise":
            return out_channels
        return int(self.groups)


class LatencyTimer(Protocol):
    """What :func:`latency_table` needs from a runtime: it times single layers and whole networks (in ms).

    ``describe()`` names the runtime, its version, threads and device (all part of the cache key) and ``align``
    is the channel multiple the runtime's fast kernels work in (grid points and ``budget="latency"``'s default
    ``round_to``).
    """

    align: int

    def describe(self) -> dict[str, Any]: ...

    def time_conv(self, spec: ConvSpec, in_channels: int, out_channels: int) -> float: ...

    def time_model(self, network: nn.Module, images: torch.Tensor) -> float: ...

    # Optional: ``time_models(networks, images) -> list[float]``, several networks timed run by run in turn
    # (``budget="latency"``'s measured checks use it when present, else alternate ``time_model`` calls).


# ------------------------------------------------------------------------------------------------ layer specs

#: activations a conv's standalone graph reproduces (autograd name → ONNX ops, as torch exports them)
ACTIVATIONS = ("Relu", "LeakyRelu", "Sigmoid", "Tanh", "Silu", "Mish", "Hardswish", "Hardtanh")


def activation_after(graph: Any, conv: nn.Module) -> str:
    """The activation applied to ``conv``'s output (after a BatchNorm, if one follows), or ``"none"``.

    Read off torch-pruning's graph, whose element-wise nodes carry the autograd function (``LeakyReluBackward0``),
    so functional and module activations are found alike.
    """
    node = graph.module2node.get(conv)
    for _ in range(2):  # the op after the conv, or after the conv's BatchNorm
        if node is None or len(node.outputs) != 1:
            return "none"
        node = node.outputs[0]
        if isinstance(node.module, nn.modules.batchnorm._BatchNorm):
            continue
        grad_fn = getattr(node, "grad_fn", None)
        name = re.sub(r"Backward\d*$", "", grad_fn.name()) if grad_fn is not None else ""
        return name if name in ACTIVATIONS else "none"
    return "none"


def channel_grid(channels: int, prunable: bool, align: int, points: int = GRID_POINTS) -> tuple[int, ...]:
    """The channel counts a layer is timed at: k/points of ``channels`` rounded to multiples of ``align``.

    One point (the base count) when pruning cannot change this axis, or when it is too small for two multiples.
    """
    if not prunable or points < 2:
        return (channels,)
    counts = {channels}
    for k in range(1, points):
        count = int(round(channels * k / points / align)) * align
        if 0 < count < channels:
            counts.add(count)
    return tuple(sorted(counts))


def _padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0, 0, 0)
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]  # "same"
        return (total[0] // 2, total[1] // 2, total[0] - total[0] // 2, total[1] - total[1] // 2)
    ph, pw = conv.padding
    return (ph, pw, ph, pw)


def conv_specs(
    calls: Mapping[nn.Module, Sequence[tuple[int, ...]]],
    names: Mapping[nn.Module, str],
    graph: Any,
    prunable_in: set[nn.Module],
    prunable_out: set[nn.Module],
    align: int,
    points: int = GRID_POINTS,
) -> dict[str, list[ConvSpec]]:
    """Each Conv2d's calls (input shapes as recorded by the traced forward) as :class:`ConvSpec` by layer name.

    A layer called several times (a detection head shared across FPN levels) has one spec per call. Other
    layer types (linear, transposed conv) are not timed: their time is in the table's remainder.
    """
    specs: dict[str, list[ConvSpec]] = {}
    for module, shapes in calls.items():
        if not isinstance(module, nn.Conv2d):
            continue
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        groups = "dense" if module.groups == 1 else "depthwise" if depthwise else str(module.groups)
        in_ok = module in prunable_in and groups == "dense"
        out_ok = module in prunable_out and groups in ("dense", "depthwise")
        activation = activation_after(graph, module)
        for shape in shapes:
            if len(shape) != 4:
                continue
            specs.setdefault(names[module], []).append(
                ConvSpec(
                    batch=int(shape[0]),
                    height=int(shape[2]),
                    width=int(shape[3]),
                    kernel=tuple(module.kernel_size),
                    stride=tuple(module.stride),
                    padding=_padding(module),
                    dilation=tuple(module.dilation),
                    groups=groups,
                    activation=activation,
                    in_channels=module.in_channels,
                    out_channels=module.out_channels,
                    in_grid=channel_grid(module.in_channels, in_ok, align, points),
                    out_grid=channel_grid(module.out_channels, out_ok, align, points),
                )
            )
    return specs


# --------------------------------------------------------------------------------------------- the table


class LayerTimes:
    """Measured times of one spec on its grid, interpolated piecewise bilinearly (linearly past the grid).

    The raw grid is made non-decreasing along both axes first (each point becomes the minimum over all points
    with at least its channel counts): timing noise must not make a smaller layer look slower, or the
    allocators' bisection would see a budget that is not monotone.
    """

    def __init__(
        self, in_grid: Sequence[int], out_grid: Sequence[int], ms: Sequence[Sequence[float]]
    ) -> None:
        self.in_grid = [int(c) for c in in_grid]
        self.out_grid = [int(c) for c in out_grid]
        grid = np.asarray(ms, dtype=float)
        if grid.shape != (len(self.in_grid), len(self.out_grid)):
            raise ValueError(f"latency grid of shape {grid.shape} for {len(in_grid)}×{len(out_grid)} points")
        grid = np.minimum.accumulate(grid[::-1, ::-1], axis=0)
        self.ms = np.minimum.accumulate(grid, axis=1)[::-1, ::-1]

    @staticmethod
    def _cell(grid: Sequence[int], x: float) -> tuple[int, int, float]:
        if len(grid) == 1:
            return 0, 0, 0.0
        i = min(max(_bisect.bisect_right(grid, x) - 1, 0), len(grid) - 2)
        return i, i + 1, (x - grid[i]) / (grid[i + 1] - grid[i])

    def __call__(self, in_channels: float, out_channels: float) -> float:
        i0, i1, u = self._cell(self.in_grid, in_channels)
        j0, j1, v = self._cell(self.out_grid, out_channels)
        t = self.ms
        value = (1 - u) * ((1 - v) * t[i0, j0] + v * t[i0, j1]) + u * ((1 - v) * t[i1, j0] + v * t[i1, j1])
        return max(float(value), 0.0)


@dataclasses.dataclass
class LatencyTable:
    """Per-layer predicted times plus the measured whole network: predicts a pruning's latency cut.

    ``layers`` maps a conv's name to its calls; ``model_ms`` is the whole network as measured; ``info`` the
    cache key's fields; ``path`` the cache file (None when not written).
    """

    key: str
    info: dict[str, Any]
    model_ms: float
    layers: dict[str, list[tuple[ConvSpec, LayerTimes]]]
    path: Path | None = None

    def layer_ms(self, name: str, in_channels: int | None = None, out_channels: int | None = None) -> float:
        """Predicted time of every call of layer ``name`` at these channel counts (default: its base counts)."""
        total = 0.0
        for spec, times in self.layers[name]:
            total += times(
                spec.in_channels if in_channels is None else in_channels,
                spec.out_channels if out_channels is None else out_channels,
            )
        return total

    @property
    def remainder_ms(self) -> float:
        """Measured whole network minus the layers' base predictions (see the module docstring)."""
        return self.model_ms - sum(self.layer_ms(name) for name in self.layers)

    def removed_fraction(self, pruned: Mapping[str, tuple[int, int]]) -> float:
        """Predicted share of the whole network's time removed when layer ``name`` loses ``pruned[name]`` =
        (input channels, output channels); layers not named keep theirs."""
        saved = 0.0
        for name, (lost_in, lost_out) in pruned.items():
            if name not in self.layers or not (lost_in or lost_out):
                continue
            spec = self.layers[name][0][0]
            kept = self.layer_ms(name, spec.in_channels - lost_in, spec.out_channels - lost_out)
            saved += self.layer_ms(name) - kept
        return saved / self.model_ms


def architecture_signature(model: nn.Module) -> str:
    """Digest of the module tree: names, types, each module's settings as it prints them (``extra_repr``:
    a conv's stride, padding, dilation and groups, a pooling's window, an activation's slope) and the shapes of
    parameters and buffers (not their values).

    Equal for two copies of one architecture whatever their weights; different as soon as a layer changes,
    including a change that keeps every shape (a stride-2 conv in place of a stride-1 one).
    """
    parts = [
        [
            name,
            type(module).__name__,
            module.extra_repr(),
            [list(t.shape) for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))],
        ]
        for name, module in model.named_modules()
    ]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def forward_signature(network: nn.Module) -> str:
    """Names what computes the timed network: the model's class and ``forward_fn`` (a :class:`TracedNetwork`'s),
    each by module and qualified name, so two forwards over one module tree get two tables."""
    model = getattr(network, "model", network)
    forward_fn = getattr(network, "forward_fn", None)
    parts = [f"{type(model).__module__}.{type(model).__qualname__}"]
    if forward_fn is not None:
        parts.append(
            f"{getattr(forward_fn, '__module__', '?')}.{getattr(forward_fn, '__qualname__', repr(forward_fn))}"
        )
    return "|".join(parts)


def _call_key(spec: ConvSpec) -> str:
    """A conv call's geometry without its grid: layers held whole change grids, not the network that is timed
    (those entries are measured on their own, under the spec's full key)."""
    call = {k: v for k, v in dataclasses.asdict(spec).items() if k not in ("in_grid", "out_grid")}
    return json.dumps(call, sort_keys=True, separators=(",", ":"))


def table_key(
    model: nn.Module,
    input_shape: Sequence[int],
    timer: LatencyTimer,
    specs: Mapping[str, Sequence[ConvSpec]] | None = None,
    forward: str = "",
) -> str:
    """The cache key of ``model``'s table: everything its times depend on. The architecture (with every
    module's settings), the input shape, the runtime, its version, threads and device, the traced conv calls
    (``specs``: each call's input size, stride, padding, dilation and activation, as the forward ran them) and
    the forward itself (:func:`forward_signature`). A key missing one of these let a stride-2 network reuse a
    stride-1 network's whole-network time."""
    fields = {
        "format": FORMAT,
        "architecture": architecture_signature(model),
        "input_shape": [int(d) for d in input_shape],
        "calls": {name: sorted(_call_key(s) for s in calls) for name, calls in sorted((specs or {}).items())},
        "forward": forward,
        **timer.describe(),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cache_dir(latency_cache: str | os.PathLike | None = None) -> Path:
    """Where latency tables live: ``latency_cache`` itself, else ``$GCP_CACHE_DIR/latency``, else the user's
    cache folder (``$XDG_CACHE_HOME/gcp/latency`` or ``~/.cache/gcp/latency``)."""
    if latency_cache is not None:
        path = Path(latency_cache)
    elif os.environ.get("GCP_CACHE_DIR"):
        path = Path(os.environ["GCP_CACHE_DIR"]) / "latency"
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        path = Path(base) / "gcp" / "latency"
    if path.exists() and not path.is_dir():
        raise ValueError(f"latency cache {path} exists and is not a folder")
    return path


def _read_cache(path: Path, key: str) -> dict[str, Any]:
    """The stored table under ``key``, or {} when there is none; an unreadable file is measured anew."""
    if not path.is_file():
        return {}
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored.get("format") != FORMAT or stored.get("key") != key:
            raise ValueError("written for another key or format")
        float(stored["model_ms"])
        dict(stored["entries"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        warnings.warn(f"ignoring latency cache {path} ({exc}); measuring again", stacklevel=3)
        return {}
    return stored


def latency_table(
    model: nn.Module,
    specs: Mapping[str, Sequence[ConvSpec]],
    network: nn.Module,
    images: torch.Tensor,
    timer: LatencyTimer,
    latency_cache: str | os.PathLike | None = None,
) -> LatencyTable:
    """Load ``model``'s table from the cache, timing on ``timer`` only what is missing, and store it back.

    ``specs`` come from :func:`conv_specs`; ``network`` computes the traced forward from ``images`` (timed
    whole once, for the remainder). An entry is looked up by its spec, grid included, so a pruning that can
    change other channels than a cached one measures only those layers.
    """
    if not specs:
        raise ValueError(
            "budget='latency' predicts time from the network's Conv2d layers, and this one has none; "
            "use budget='macs' or 'params'"
        )
    key = table_key(model, images.shape, timer, specs, forward_signature(network))
    path = cache_dir(latency_cache) / f"{key}.json"
    stored = _read_cache(path, key)
    entries: dict[str, Any] = dict(stored.get("entries", {}))
    changed = not stored
    for spec in {s.key: s for calls in specs.values() for s in calls}.values():
        if spec.key in entries:
            continue
        entries[spec.key] = [[timer.time_conv(spec, ci, co) for co in spec.out_grid] for ci in spec.in_grid]
        changed = True
    model_ms = float(stored["model_ms"]) if stored else float(timer.time_model(network, images))
    if not model_ms > 0:
        raise ValueError(f"the timer measured the whole network at {model_ms} ms; a latency must be positive")
    layers = {
        name: [(s, LayerTimes(s.in_grid, s.out_grid, entries[s.key])) for s in calls]
        for name, calls in specs.items()
    }
    info = {
        "input_shape": list(images.shape),
        "architecture": architecture_signature(model),
        **timer.describe(),
    }
    table = LatencyTable(key, info, model_ms, layers, path)
    if changed:
        atomic_write_json(
            path,
            {
                "format": FORMAT,
                "key": key,
                "info": info,
                "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
                "model_ms": model_ms,
                "remainder_ms": table.remainder_ms,
                "layers_ms": {name: table.layer_ms(name) for name in layers},
                "entries": entries,
            },
        )
    return table


class TracedNetwork(nn.Module):
    """``forward(images)``: the traced forward (``forward_fn`` or the model's own) as a flat tuple of tensors,
    i.e. what pruning traced, in a form the ONNX exporter takes."""

    def __init__(self, model: nn.Module, forward_fn: ForwardFn | None = None) -> None:
        super().__init__()
        self.model = model
        self.forward_fn = forward_fn

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(flatten_tensors(run_forward(self.model, images, self.forward_fn)))


# ------------------------------------------------------------------------------------------------- timers


def conv_graph(spec: ConvSpec, in_channels: int, out_channels: int) -> bytes:
    """A one-layer ONNX model: ``spec``'s conv at these channel counts (with bias) and its activation."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from .export import MIN_OPSET, MISH_EXP_LIMIT

    groups = spec.group_count(out_channels)
    if spec.groups == "depthwise":
        in_channels = out_channels
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((out_channels, in_channels // groups, *spec.kernel), dtype=np.float32)
    init = [
        numpy_helper.from_array(weight * 0.05, "W"),
        numpy_helper.from_array(np.zeros(out_channels, dtype=np.float32), "B"),
    ]
    nodes = [
        helper.make_node(
            "Conv",
            ["X", "W", "B"],
            ["conv"],
            kernel_shape=list(spec.kernel),
            strides=list(spec.stride),
            pads=list(spec.padding),
            dilations=list(spec.dilation),
            group=groups,
        )
    ]
    act = spec.activation
    if act in ("Relu", "Sigmoid", "Tanh"):
        nodes.append(helper.make_node(act, ["conv"], ["Y"]))
    elif act == "LeakyRelu":
        nodes.append(helper.make_node("LeakyRelu", ["conv"], ["Y"], alpha=0.1))
    elif act == "Hardswish":
        nodes.append(helper.make_node("HardSwish", ["conv"], ["Y"]))
    elif act == "Hardtanh":  # ReLU6
        init += [numpy_helper.from_array(np.array(v, dtype=np.float32), n) for v, n in ((0, "lo"), (6, "hi"))]
        nodes.append(helper.make_node("Clip", ["conv", "lo", "hi"], ["Y"]))
    elif act == "Silu":
        nodes += [helper.make_node("Sigmoid", ["conv"], ["s"]), helper.make_node("Mul", ["conv", "s"], ["Y"])]
    elif act == "Mish":  # as gcp's export writes it (gcp.export.MISH_EXP_LIMIT): x·n/(n + 2), n = eˣ(eˣ + 2)
        init += [
            numpy_helper.from_array(np.array(v, dtype=np.float32), n)
            for v, n in ((MISH_EXP_LIMIT, "lim"), (2, "two"))
        ]
        nodes += [
            helper.make_node("Min", ["conv", "lim"], ["c"]),
            helper.make_node("Exp", ["c"], ["e"]),
            helper.make_node("Add", ["e", "two"], ["e2"]),
            helper.make_node("Mul", ["e", "e2"], ["n"]),
            helper.make_node("Mul", ["conv", "n"], ["xn"]),
            helper.make_node("Add", ["n", "two"], ["n2"]),
            helper.make_node("Div", ["xn", "n2"], ["Y"]),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["conv"], ["Y"]))
    out_h, out_w = spec.out_hw()
    graph = helper.make_graph(
        nodes,
        "layer",
        [
            helper.make_tensor_value_info(
                "X", TensorProto.FLOAT, [spec.batch, in_channels, spec.height, spec.width]
            )
        ],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [spec.batch, out_channels, out_h, out_w])],
        init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", MIN_OPSET)])
    model.ir_version = 8  # the IR of opset 17: newer onnx writes an IR that older ONNX Runtimes refuse
    onnx.checker.check_model(model)
    return model.SerializeToString()


def network_onnx(network: nn.Module, images: torch.Tensor) -> bytes:
    """The network exported to ONNX in memory at this fixed input shape, for timing (no parity check: the
    weights of a table's network do not change its time)."""
    from .export import MIN_OPSET, _io_names, _torchscript_export

    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            n_outputs = len(network(images))
        inputs, outputs = _io_names(network, 1, n_outputs)
        return _torchscript_export(network, (images,), inputs, outputs, MIN_OPSET, dynamic_batch=False)
    except Exception as exc:  # the exporter raises many types; say what failed and why budget needs it
        raise ValueError(
            f"budget='latency' times the whole network on the runtime, and exporting it to ONNX failed "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    finally:
        network.train(was_training)


def _cpuinfo(field: str) -> str | None:
    """The value of the first ``field`` line of ``/proc/cpuinfo`` (None where there is none: not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU model as the OS names it, else the platform's processor string."""
    import platform

    return _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown CPU"


def channel_block() -> int:
    """ONNX Runtime's NCHWc channel block on this CPU: 16 with AVX-512, else 8 (by ORT's design; the 8 is
    measured here, docs/design.md "Latency")."""
    return 16 if "avx512f" in (_cpuinfo("flags") or "").split() else 8


class _RuntimeTimer:
    """Times ONNX models (a layer's or the network's) on a runtime: warm-up runs, then the median of ``runs``
    (``model_runs`` for the whole network); subclasses say how one ONNX model is run once."""

    def __init__(self, runs: int, warmup: int, model_runs: int) -> None:
        for name, value, least in (("runs", runs, 1), ("warmup", warmup, 0), ("model_runs", model_runs, 1)):
            if not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        self.runs, self.warmup, self.model_runs = runs, warmup, model_runs

    def _runner(self, data: bytes, shape: tuple[int, ...], spinning: bool = True) -> Any:
        """One run of the ONNX model; ``spinning=False`` where sessions take turns on the same cores."""
        raise NotImplementedError

    def _median_ms(self, data: bytes, shape: tuple[int, ...], runs: int) -> float:
        from .export import _time_round_robin

        return float(
            statistics.median(_time_round_robin({"m": self._runner(data, shape)}, runs, self.warmup)["m"])
        )

    def time_conv(self, spec: ConvSpec, in_channels: int, out_channels: int) -> float:
        """Median ms of the layer alone at these channel counts (see :func:`conv_graph`)."""
        channels = out_channels if spec.groups == "depthwise" else in_channels
        shape = (spec.batch, channels, spec.height, spec.width)
        return self._median_ms(conv_graph(spec, in_channels, out_channels), shape, self.runs)

    def time_model(self, network: nn.Module, images: torch.Tensor) -> float:
        """Median ms of the whole network on ``images``' shape (see :func:`network_onnx`)."""
        return self._median_ms(network_onnx(network, images), tuple(images.shape), self.model_runs)

    def time_models(self, networks: Sequence[nn.Module], images: torch.Tensor) -> list[float]:
        """Median ms of each network, timed one run of each in turn (``model_runs`` rounds), so that a drift of
        the machine's speed hits all of them alike (docs/design.md, "Latency", noise)."""
        from .export import _time_round_robin

        shape = tuple(images.shape)
        runners = {
            str(i): self._runner(network_onnx(n, images), shape, False) for i, n in enumerate(networks)
        }
        times = _time_round_robin(runners, self.model_runs, self.warmup)
        return [float(statistics.median(times[str(i)])) for i in range(len(networks))]


class OnnxRuntimeTimer(_RuntimeTimer):
    """ONNX Runtime on the CPU (all graph optimisations, as deployed). ``threads``: intra-op threads (None:
    ONNX Runtime's default). ``align`` is the channel block of its NCHWc convolution layout: 16 with AVX-512,
    else 8. In a whole network, a conv whose input channels are off that multiple stays in the plain layout
    (docs/design.md: 61 of 82 convs of an unrounded pruned YOLOv4), while a one-layer graph at the same count
    still runs blocked, so the table is only right at multiples of ``align``: its grid points are, and
    ``budget="latency"`` rounds to it by default."""

    def __init__(
        self, threads: int | None = None, *, runs: int = 15, warmup: int = 3, model_runs: int = 30
    ) -> None:
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(
                f"threads must be an integer >= 1 or None (ONNX Runtime's default), got {threads!r}"
            )
        super().__init__(runs, warmup, model_runs)
        self.threads = threads
        self.align = channel_block()

    def describe(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {
            "runtime": "onnxruntime",
            "version": ort.__version__,
            "threads": self.threads if self.threads is not None else f"default of {os.cpu_count()} cores",
            "device": cpu_name(),
            "align": self.align,
        }

    def _runner(self, data: bytes, shape: tuple[int, ...], spinning: bool = True) -> Any:
        from .export import _onnxruntime_runner

        return _onnxruntime_runner(data, shape, self.threads, spinning=spinning)[0]


class TensorRTTimer(_RuntimeTimer):
    """TensorRT on the CUDA GPU: every timed ONNX model is built into an engine first (seconds each, so fewer
    runs by default). Raises at once, naming what is missing, without the ``tensorrt`` package or a GPU."""

    def __init__(self, *, fp16: bool = False, runs: int = 10, warmup: int = 3, model_runs: int = 30) -> None:
        from .export import require_tensorrt

        require_tensorrt()
        super().__init__(runs, warmup, model_runs)
        self.fp16 = fp16
        self.align = 8

    def describe(self) -> dict[str, Any]:
        import tensorrt

        return {
            "runtime": "tensorrt",
            "version": tensorrt.__version__,
            "threads": None,
            "device": torch.cuda.get_device_name(),
            "fp16": self.fp16,
            "align": self.align,
        }

    def _runner(self, data: bytes, shape: tuple[int, ...], spinning: bool = True) -> Any:
        from .export import _tensorrt_runner, build_tensorrt_engine

        with tempfile.TemporaryDirectory() as folder:
            onnx_path = Path(folder) / "model.onnx"
            onnx_path.write_bytes(data)
            engine = build_tensorrt_engine(onnx_path, Path(folder) / "model.engine", fp16=self.fp16)
            return _tensorrt_runner(engine, shape)[0]


RUNTIMES = ("onnxruntime", "tensorrt")
# What a timer's describe() must name: the latency cache key and the prune report are built from them.
TIMER_KEYS = ("runtime", "version", "threads", "device")


def resolve_timer(latency: str | LatencyTimer | None) -> LatencyTimer:
    """``None``/``"onnxruntime"`` → :class:`OnnxRuntimeTimer`, ``"tensorrt"`` → :class:`TensorRTTimer`, or a
    timer object as it is."""
    if latency is None or latency == "onnxruntime":
        return OnnxRuntimeTimer()
    if latency == "tensorrt":
        return TensorRTTimer()
    if isinstance(latency, str) or not all(
        callable(getattr(latency, m, None)) for m in ("describe", "time_conv", "time_model")
    ):
        raise ValueError(
            f"latency must be one of {RUNTIMES} or a timer (describe/time_conv/time_model, see "
            f"gcp.latency.LatencyTimer), got {latency!r}"
        )
    align = getattr(latency, "align", None)
    if not isinstance(align, int) or align < 1:
        raise ValueError(f"the latency timer's align must be a positive integer, got {align!r}")
    described = latency.describe()
    missing = [key for key in TIMER_KEYS if not isinstance(described, Mapping) or key not in described]
    if missing:
        raise ValueError(
            f"the latency timer's describe() must name {', '.join(TIMER_KEYS)} (the cache key and the report "
            f"use them); {type(latency).__name__}.describe() lacks {', '.join(missing)}"
        )
    return latency


# ---------------------------------------------------------------------------------------------- profiling


def profile_onnxruntime(
    onnx: bytes | str | os.PathLike,
    input_shape: Sequence[int],
    *,
    runs: int = 30,
    threads: int | None = None,
) -> dict[str, Any]:
    """Where an ONNX model's time goes in ONNX Runtime: its own profiler, per node and per op type.

    Each node's time is the median over ``runs`` of its kernel time (so the first, warm-up run does not count);
    a node's op type is suffixed ``/nchwc`` when ONNX Runtime runs it in its blocked layout (a conv without it
    runs the plain NCHW kernel). Returns ``nodes`` ({node: {"op", "ms"}}, node names as ONNX Runtime made
    them: a fused conv(+BN+activation) is named after its activation's output, ``/stage1/stage1.0/.../
    LeakyRelu_output_0_nchwc``), ``ops`` ({op type: ms}), ``total_ms`` (sum of the nodes) and ``runs``.
    """
    from .export import _check_timing_args, _ort_session

    shape = _check_timing_args(input_shape, runs, 0)
    with tempfile.TemporaryDirectory() as folder:
        session = _ort_session(onnx, threads, profile_prefix=str(Path(folder) / "ort"))
        feed = {session.get_inputs()[0].name: np.random.default_rng(0).random(shape, dtype=np.float32)}
        for _ in range(runs + 1):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text(encoding="utf-8"))
    durations: dict[str, list[float]] = {}
    op_of: dict[str, str] = {}
    for event in events:
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        node = name[: -len("_kernel_time")]
        op = event.get("args", {}).get("op_name", "?")
        op_of[node] = f"{op}/nchwc" if node.endswith("_nchwc") else op
        durations.setdefault(node, []).append(event["dur"] / 1e3)
    nodes = {n: {"op": op_of[n], "ms": float(statistics.median(d[1:] or d))} for n, d in durations.items()}
    ops: dict[str, float] = {}
    for row in nodes.values():
        ops[row["op"]] = ops.get(row["op"], 0.0) + row["ms"]
    return {
        "nodes": nodes,
        "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
        "total_ms": sum(ops.values()),
        "runs": runs,
    }


def compare_profiles(base: Mapping[str, Any], pruned: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per op type: base ms, pruned ms and the share of the base model's saving it accounts for, largest
    base time first (two :func:`profile_onnxruntime` results)."""
    saved = base["total_ms"] - pruned["total_ms"]
    rows = []
    for op in dict.fromkeys([*base["ops"], *pruned["ops"]]):
        before, after = base["ops"].get(op, 0.0), pruned["ops"].get(op, 0.0)
        rows.append(
            {
                "op": op,
                "base_ms": before,
                "pruned_ms": after,
                "cut": 1 - after / before if before else None,
                "share_of_saving": (before - after) / saved if saved else None,
            }
        )
    return rows
