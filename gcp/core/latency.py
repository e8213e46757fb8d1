"""Predicted latency of a pruned network on its target runtime, from a per-layer table measured once and cached.

MACs are exact arithmetic but not time: the same MACs cut buys very different latency cuts depending on where
the channels go. ``prune_detector(budget="latency")`` therefore bisects on a *predicted* latency:

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

Timers do the measuring: :class:`gcp.runtime.timers.OnnxRuntimeTimer` and ``TensorRTTimer`` (registered by
name in :mod:`gcp.core.registry`), or any object with the :class:`LatencyTimer` methods, e.g. a fake one in
tests.
"""

from __future__ import annotations

import bisect as _bisect
import dataclasses
import hashlib
import json
import os
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from gcp.core.registry import timer_factory
from gcp.io import atomic_write_json
from gcp.vocab import RUNTIMES
from grouping.trace import ForwardFn, flatten_tensors, run_forward

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


# What a timer's describe() must name: the latency cache key and the prune report are built from them.
TIMER_KEYS = ("runtime", "version", "threads", "device")


def resolve_timer(latency: str | LatencyTimer | None) -> LatencyTimer:
    """A runtime's name (None: ``"onnxruntime"``) → the timer :mod:`gcp.runtime` registered for it, or a timer
    object as it is, checked: it must time layers and networks, say its ``align`` and describe itself with
    :data:`TIMER_KEYS` (the cache key and the report are built from them), before any model is touched."""
    if latency is None or isinstance(latency, str):
        factory = timer_factory("onnxruntime" if latency is None else latency)
        if factory is None:
            raise ValueError(
                f"latency must be one of {RUNTIMES} or a timer (describe/time_conv/time_model, see "
                f"gcp.core.latency.LatencyTimer), got {latency!r}"
            )
        return factory()
    if not all(callable(getattr(latency, m, None)) for m in ("describe", "time_conv", "time_model")):
        raise ValueError(
            f"latency must be one of {RUNTIMES} or a timer (describe/time_conv/time_model, see "
            f"gcp.core.latency.LatencyTimer), got {latency!r}"
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
