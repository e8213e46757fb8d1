"""Timers of ONNX Runtime and TensorRT: how long one conv layer or a whole network takes on the runtime a pruned
detector will be deployed on. ``budget="latency"`` finds them by name through :mod:`gcp.core.registry`
(registered below); :func:`profile_onnxruntime` shows where a model's time goes, op by op.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gcp.core.latency import ConvSpec
from gcp.core.registry import register_timer
from gcp.runtime.export import (
    MIN_OPSET,
    MISH_EXP_LIMIT,
    build_tensorrt_engine,
    check_timing_args,
    io_names,
    onnxruntime_runner,
    ort_session,
    require_tensorrt,
    tensorrt_runner,
    time_round_robin,
    torchscript_export,
)


def conv_graph(spec: ConvSpec, in_channels: int, out_channels: int) -> bytes:
    """A one-layer ONNX model: ``spec``'s conv at these channel counts (with bias) and its activation."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

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
    elif (
        act == "Mish"
    ):  # as gcp's export writes it (gcp.runtime.export.MISH_EXP_LIMIT): x·n/(n + 2), n = eˣ(eˣ + 2)
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
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            n_outputs = len(network(images))
        inputs, outputs = io_names(network, 1, n_outputs)
        return torchscript_export(network, (images,), inputs, outputs, MIN_OPSET, dynamic_batch=False)
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
        return float(
            statistics.median(time_round_robin({"m": self._runner(data, shape)}, runs, self.warmup)["m"])
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
        shape = tuple(images.shape)
        runners = {
            str(i): self._runner(network_onnx(n, images), shape, False) for i, n in enumerate(networks)
        }
        times = time_round_robin(runners, self.model_runs, self.warmup)
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
        return onnxruntime_runner(data, shape, self.threads, spinning=spinning)[0]


class TensorRTTimer(_RuntimeTimer):
    """TensorRT on the CUDA GPU: every timed ONNX model is built into an engine first (seconds each, so fewer
    runs by default). Raises at once, naming what is missing, without the ``tensorrt`` package or a GPU."""

    def __init__(self, *, fp16: bool = False, runs: int = 10, warmup: int = 3, model_runs: int = 30) -> None:
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
        with tempfile.TemporaryDirectory() as folder:
            onnx_path = Path(folder) / "model.onnx"
            onnx_path.write_bytes(data)
            engine = build_tensorrt_engine(onnx_path, Path(folder) / "model.engine", fp16=self.fp16)
            return tensorrt_runner(engine, shape)[0]


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
    shape = check_timing_args(input_shape, runs, 0)
    with tempfile.TemporaryDirectory() as folder:
        session = ort_session(onnx, threads, profile_prefix=str(Path(folder) / "ort"))
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


register_timer("onnxruntime", OnnxRuntimeTimer)
register_timer("tensorrt", TensorRTTimer)
