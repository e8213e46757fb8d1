"""Deploy a (pruned) detector: ONNX export with a parity check, TensorRT engines and latency (paper §5.3.3).

The paper deploys its pruned YOLOv4 models by converting PyTorch → ONNX → TensorRT engine and timing the engines
on a Jetson Nano (Table 8: 414 ms base vs 274 ms for the 68 MB model). We follow the same path: only the network
is exported (our detectors return a list of raw head tensors; decoding and NMS stay in
:func:`gcp.detection.models.postprocess`), every export is checked against PyTorch in ONNX Runtime, and latency is measured
for several models in one process, round-robin, so that the comparison is fair on a shared machine.
"""

from __future__ import annotations

import io
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gcp.core.report import count_macs_params, size_mb
from gcp.io import atomic_write_bytes

MIN_OPSET = 17
TENSORRT_INSTALL_HINT = "pip install 'gcp[tensorrt]'"

Runner = Callable[[], None]


def _as_input_tuple(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The model's positional inputs as a tuple of tensors, each with a batch axis to make dynamic."""
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise ValueError(
            "example_inputs must be a tensor or a non-empty sequence of tensors (positional inputs)"
        )
    if any(t.dim() == 0 for t in inputs):
        raise ValueError("every example input needs a leading batch axis; got a 0-d tensor")
    return inputs


def _flat_outputs(outputs: Any) -> list[torch.Tensor]:
    """The model's outputs as a flat list of tensors (our detectors return a list of raw head tensors)."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, (list, tuple)) and outputs and all(isinstance(t, torch.Tensor) for t in outputs):
        return list(outputs)
    raise ValueError(
        "export_onnx exports networks that return a tensor or a list/tuple of tensors (raw head outputs); "
        f"this model returned {type(outputs).__name__}. Export the network without its postprocessing"
    )


def io_names(model: nn.Module, n_inputs: int, n_outputs: int) -> tuple[list[str], list[str]]:
    """Readable ONNX input/output names: ``images`` and ``head_s8``/``head_s16``/... for our detectors."""
    inputs = ["images"] if n_inputs == 1 else [f"input_{i}" for i in range(n_inputs)]
    strides = getattr(model, "strides", None)
    if isinstance(strides, (list, tuple)) and len(strides) == n_outputs:
        outputs = [f"head_s{int(s)}" for s in strides]
    else:
        outputs = [f"output_{i}" for i in range(n_outputs)]
    return inputs, outputs


def _batch_of(inputs: tuple[torch.Tensor, ...], size: int) -> tuple[torch.Tensor, ...]:
    """The example inputs cycled along the batch axis to ``size`` rows: real data at a different batch size."""
    return tuple(t.repeat_interleave(math.ceil(size / t.shape[0]), dim=0)[:size] for t in inputs)


def ort_session(
    model_bytes_or_path: bytes | str | os.PathLike,
    threads: int | None = None,
    *,
    spinning: bool = True,
    profile_prefix: str | None = None,
) -> Any:
    """An ONNX Runtime CPU session. ``spinning=False`` makes its worker threads sleep between runs instead of
    busy-waiting: needed when several sessions take turns on the same cores, where the idle sessions' spinning
    threads would otherwise steal the running one's CPU (measured on 2 cores: four demo models timed
    round-robin took 53-76 ms each with spinning, 30-39 ms without, 24-33 ms each timed alone).
    ``profile_prefix`` turns on ONNX Runtime's profiler, writing its JSON there (``gcp.core.latency``)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1 (or None for ONNX Runtime's default), got {threads}")
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    source = model_bytes_or_path if isinstance(model_bytes_or_path, bytes) else str(model_bytes_or_path)
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def _max_abs_diff(
    model: nn.Module, session: Any, inputs: tuple[torch.Tensor, ...], input_names: Sequence[str]
) -> float:
    """Largest |PyTorch − ONNX Runtime| over every element of every raw head output for ``inputs``."""
    with torch.no_grad():
        expected = _flat_outputs(model(*inputs))
    feed = {name: t.detach().cpu().numpy() for name, t in zip(input_names, inputs)}
    got = session.run(None, feed)
    if len(got) != len(expected):
        raise RuntimeError(f"ONNX model returned {len(got)} outputs, PyTorch {len(expected)}")
    worst = 0.0
    for ours, theirs in zip(expected, got):
        ours_np = ours.detach().float().cpu().numpy()
        if ours_np.shape != theirs.shape:
            raise RuntimeError(f"ONNX output shape {theirs.shape} differs from PyTorch's {ours_np.shape}")
        worst = max(worst, float(np.max(np.abs(ours_np - theirs))) if ours_np.size else 0.0)
    return worst


# Mish in ONNX. The exporter writes it as Softplus → Tanh → Mul, and ONNX Runtime's CPU Softplus is slow: on the
# demo's YOLOv4 it was 55 % of the whole network's kernel time, more than every convolution together
# (docs/design.md, "Latency"). Since tanh(softplus(x)) = n / (n + 2) with n = eˣ(eˣ + 2), Mish is written as
# x·n/(n + 2) from one Exp and arithmetic, which runs vectorised: 4× faster for the activation, 2.2× for a
# conv + Mish stack (same probe), equal to PyTorch's Mish within 1e-7. Above x = 20, eˣ is clamped: there n/(n + 2)
# is 1 in float32, so Mish(x) = x exactly as in PyTorch. ``gcp.runtime.timers.conv_graph`` times the same nodes.
MISH_EXP_LIMIT = 20.0


def _mish_symbolic(g: Any, x: Any) -> Any:
    """``aten::mish`` as Exp + arithmetic (see :data:`MISH_EXP_LIMIT`)."""
    limit = g.op("Constant", value_t=torch.tensor(MISH_EXP_LIMIT))
    two = g.op("Constant", value_t=torch.tensor(2.0))
    e = g.op("Exp", g.op("Min", x, limit))
    n = g.op("Mul", e, g.op("Add", e, two))
    return g.op("Div", g.op("Mul", x, n), g.op("Add", n, two))


def torchscript_export(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    opset: int,
    dynamic_batch: bool,
) -> bytes:
    """Export with the TorchScript-based exporter into memory.

    We use ``dynamo=False`` on purpose: the torch.export-based exporter needs the ``onnxscript`` package, which
    is not a dependency of gcp, while the TorchScript exporter handles our convolutional detectors exactly
    (parity ≤ 1e-5 in our tests). Its deprecation warning is therefore expected and silenced here.
    """
    dynamic_axes = {name: {0: "batch"} for name in input_names + output_names} if dynamic_batch else None
    buffer = io.BytesIO()
    torch.onnx.register_custom_op_symbolic("aten::mish", _mish_symbolic, MIN_OPSET)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            torch.onnx.export(
                model,
                inputs,
                buffer,
                dynamo=False,
                opset_version=opset,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::mish", MIN_OPSET)
    return buffer.getvalue()


def export_onnx(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    path: str | os.PathLike,
    *,
    opset: int = MIN_OPSET,
    dynamic_batch: bool = True,
    atol: float = 1e-4,
) -> float:
    """Export the network (no postprocessing) to ONNX at ``path`` and prove it computes what PyTorch computes.

    The first step of the paper's deployment (§5.3.3: PyTorch → ONNX → TensorRT). The graph is exported in eval
    mode (BatchNorm uses running statistics; the model's mode is restored afterwards), validated with
    ``onnx.checker.check_model`` and run in ONNX Runtime (CPUExecutionProvider) on ``example_inputs`` and, with
    ``dynamic_batch``, on a batch of one more image, which proves the batch axis really is dynamic. Returns the
    largest absolute difference to PyTorch over all raw head outputs; raises ``RuntimeError`` if it exceeds
    ``atol``. The file is only written (atomically) once every check passed, so a failed export leaves nothing.
    """
    if opset < MIN_OPSET:
        raise ValueError(
            f"opset must be >= {MIN_OPSET} (first opset our exports are verified with), got {opset}"
        )
    if not atol >= 0:
        raise ValueError(f"atol must be a non-negative number, got {atol!r}")
    inputs = _as_input_tuple(example_inputs)
    import onnx

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            n_outputs = len(_flat_outputs(model(*inputs)))
        input_names, output_names = io_names(model, len(inputs), n_outputs)
        data = torchscript_export(model, inputs, input_names, output_names, opset, dynamic_batch)
        onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
        session = ort_session(data)
        diff = _max_abs_diff(model, session, inputs, input_names)
        if dynamic_batch:
            other = _batch_of(inputs, inputs[0].shape[0] + 1)
            diff = max(diff, _max_abs_diff(model, session, other, input_names))
    finally:
        model.train(was_training)
    if not diff <= atol:
        raise RuntimeError(
            f"ONNX export of {type(model).__name__} differs from PyTorch by up to {diff:.3g} (> atol={atol:g}); "
            f"{path} was not written"
        )
    atomic_write_bytes(path, data)
    return diff


def _tensorrt_missing() -> list[str]:
    """What TensorRT engines need and this machine lacks (empty when both are present)."""
    import importlib.util

    missing = []
    if importlib.util.find_spec("tensorrt") is None:
        missing.append("tensorrt not installed")
    if not torch.cuda.is_available():
        missing.append("no CUDA device")
    return missing


def tensorrt_available() -> bool:
    """Whether TensorRT engines can be built and run here (the package and a CUDA GPU)."""
    return not _tensorrt_missing()


def require_tensorrt() -> None:
    """Raise one clear ``RuntimeError`` line naming what is missing for TensorRT (the package and/or a GPU)."""
    missing = _tensorrt_missing()
    if missing:
        raise RuntimeError(
            f"TensorRT needs the 'tensorrt' package ({TENSORRT_INSTALL_HINT}) and a CUDA GPU; "
            f"found: {', '.join(missing)}"
        )


def build_tensorrt_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    fp16: bool = False,
    workspace_gb: float = 2.0,
    max_batch: int = 1,
) -> Path:
    """Build a serialized TensorRT engine from an ONNX file (the paper's step on the Jetson Nano, §5.3.3).

    Uses the TensorRT ≥ 10 Python API. A dynamic batch axis gets an optimisation profile for batch sizes
    1..``max_batch`` (optimised for 1, the edge-device case the paper times). ``fp16`` allows half-precision
    kernels. The engine is written atomically. Raises ``RuntimeError`` when TensorRT or a CUDA GPU is missing.
    """
    require_tensorrt()
    if workspace_gb <= 0:
        raise ValueError(f"workspace_gb must be positive, got {workspace_gb}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    dynamic_inputs = 0
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        shape = tuple(tensor.shape)
        if any(d < 0 for d in shape[1:]):
            raise RuntimeError(f"input {tensor.name!r} has dynamic axes besides the batch: {shape}")
        if shape and shape[0] < 0:
            rest = shape[1:]
            profile.set_shape(tensor.name, (1, *rest), (1, *rest), (max_batch, *rest))
            dynamic_inputs += 1
    if dynamic_inputs:
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    return atomic_write_bytes(engine_path, bytes(serialized))


def check_timing_args(input_shape: Sequence[int], runs: int, warmup: int) -> tuple[int, ...]:
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d < 1 for d in shape):
        raise ValueError(
            f"input_shape must be positive dimensions like (1, 3, 416, 416), got {input_shape!r}"
        )
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    return shape


def onnxruntime_runner(
    onnx_path: bytes | str | os.PathLike,
    input_shape: tuple[int, ...],
    threads: int | None,
    *,
    spinning: bool = True,
) -> tuple[Runner, str]:
    """A zero-argument callable that runs one ONNX Runtime inference on a fixed random input.

    ``onnx_path`` may also be the model's bytes (the latency table's one-layer graphs are never written)."""
    if not isinstance(onnx_path, bytes) and not Path(onnx_path).is_file():
        raise FileNotFoundError(f"no ONNX file at {onnx_path}")
    session = ort_session(onnx_path, threads, spinning=spinning)
    model_inputs = session.get_inputs()
    if len(model_inputs) != 1:
        what = "the ONNX model" if isinstance(onnx_path, bytes) else onnx_path
        raise ValueError(f"latency timing feeds one image tensor; {what} has {len(model_inputs)} inputs")
    feed = {model_inputs[0].name: np.random.default_rng(0).random(input_shape, dtype=np.float32)}

    def run_once() -> None:
        session.run(None, feed)

    return run_once, session.get_providers()[0]


def tensorrt_runner(engine_path: str | os.PathLike, input_shape: tuple[int, ...]) -> tuple[Runner, str]:
    """A zero-argument callable that runs one TensorRT inference (synchronised, so wall time is GPU time)."""
    require_tensorrt()
    import tensorrt as trt

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise RuntimeError(f"TensorRT could not load the engine {engine_path}")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    if len(inputs) != 1:
        raise ValueError(f"latency timing feeds one image tensor; {engine_path} has {len(inputs)} inputs")
    context.set_input_shape(inputs[0], input_shape)
    device = torch.device("cuda")
    buffers = {}
    for name in names:
        dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(engine.get_tensor_dtype(name)))).dtype
        buffers[name] = torch.rand(tuple(context.get_tensor_shape(name)), device=device).to(dtype)
        context.set_tensor_address(name, buffers[name].data_ptr())
    stream = torch.cuda.Stream()

    def run_once() -> None:
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of {engine_path} failed")
        stream.synchronize()

    return run_once, "TensorRT"


def time_round_robin(runners: Mapping[str, Runner], runs: int, warmup: int) -> dict[str, list[float]]:
    """Milliseconds per run of each runner, interleaved run by run so load drifts hit every model alike."""
    for _ in range(warmup):
        for run_once in runners.values():
            run_once()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(runs):
        for name, run_once in runners.items():
            start = time.perf_counter()
            run_once()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def latency_summary(times_ms: Sequence[float], provider: str) -> dict[str, Any]:
    """Median (the robust figure to quote), 10th/90th percentiles and mean of per-run times in ms."""
    if not times_ms:
        raise ValueError("latency_summary needs at least one timing")
    ordered = np.asarray(times_ms, dtype=float)
    return {
        "median_ms": float(np.median(ordered)),
        "p10_ms": float(np.percentile(ordered, 10)),
        "p90_ms": float(np.percentile(ordered, 90)),
        "mean_ms": float(statistics.fmean(ordered)),
        "runs": len(times_ms),
        "provider": provider,
    }


def latency_onnxruntime(
    onnx_path: str | os.PathLike,
    input_shape: Sequence[int],
    *,
    runs: int = 50,
    warmup: int = 10,
    threads: int | None = None,
) -> dict[str, Any]:
    """Per-inference latency of an ONNX file in ONNX Runtime on the CPU (batch and size from ``input_shape``).

    ``threads`` sets intra-op threads (None: ONNX Runtime's default, all cores). Returns ``median_ms``,
    ``p10_ms``, ``p90_ms``, ``mean_ms``, ``runs`` and ``provider``. Prefer :func:`compare_latency` to compare
    models: it times them interleaved in one process.
    """
    shape = check_timing_args(input_shape, runs, warmup)
    run_once, provider = onnxruntime_runner(onnx_path, shape, threads)
    return latency_summary(time_round_robin({"model": run_once}, runs, warmup)["model"], provider)


def latency_tensorrt(
    engine_path: str | os.PathLike, input_shape: Sequence[int], *, runs: int = 50, warmup: int = 10
) -> dict[str, Any]:
    """Per-inference latency of a TensorRT engine on the GPU (paper Table 8); same fields as ONNX Runtime's."""
    shape = check_timing_args(input_shape, runs, warmup)
    run_once, provider = tensorrt_runner(engine_path, shape)
    return latency_summary(time_round_robin({"model": run_once}, runs, warmup)["model"], provider)


def _check_model_names(models: Mapping[str, nn.Module]) -> None:
    if not models:
        raise ValueError("compare_latency needs at least one model, e.g. {'base': base, 'pruned': pruned}")
    for name in models:
        if not isinstance(name, str) or not name or name.startswith(".") or any(c in name for c in "/\\:"):
            raise ValueError(f"model name {name!r} must be a plain file name (it names the exported .onnx)")


def compare_latency(
    models: Mapping[str, nn.Module],
    input_shape: Sequence[int],
    out_dir: str | os.PathLike,
    *,
    runs: int = 50,
    warmup: int = 10,
    tensorrt: bool = False,
    threads: int | None = None,
    dynamic_batch: bool = True,
    atol: float = 1e-4,
) -> list[dict[str, Any]]:
    """Export every model to ``out_dir/<name>.onnx`` and time them together (the paper's Table 8 comparison).

    All models are timed in this one process and run, interleaved round-robin (base, pruned, base, pruned, ...),
    so a change in machine load during the measurement affects every model alike; with more than one model,
    ONNX Runtime's threads do not spin between runs (see ``ort_session``), so no model is slowed by another's. Rows hold ``name``,
    ``params``, ``gmacs`` (per image), ``size_mb`` (fp32 parameters, the paper's model size), ``onnx_mb``,
    ``onnx_max_abs_diff``, ``median_ms``, ``p10_ms``, ``p90_ms`` and, with ``tensorrt=True``, the same three
    figures prefixed ``trt_`` (needs TensorRT and a CUDA GPU; the error says which is missing).

    Note (DEVELOPERS.md): ONNX Runtime CPU latency tracks MACs only when pruned channel counts are rounded
    (``prune_detector(..., round_to=16)``): odd channel counts can miss the blocked, vectorised convolution
    kernels, so an unrounded pruned model may gain much less time than its MACs promise. How much depends on
    the model, its size and the CPU, which is why this function measures rather than estimates.

    ``dynamic_batch`` and ``atol`` are :func:`export_onnx`'s (a torchvision detector's transform takes the
    batch apart, so its network exports only with a fixed batch).
    """
    _check_model_names(models)
    shape = check_timing_args(input_shape, runs, warmup)
    if tensorrt:
        require_tensorrt()
    out_dir = Path(out_dir)
    rows = []
    cpu_runners: dict[str, Runner] = {}
    providers: dict[str, str] = {}
    gpu_runners: dict[str, Runner] = {}
    for name, model in models.items():
        device = next(model.parameters()).device
        example = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(device)
        onnx_path = out_dir / f"{name}.onnx"
        diff = export_onnx(model, example, onnx_path, dynamic_batch=dynamic_batch, atol=atol)
        macs, params = count_macs_params(model, example)
        rows.append(
            {
                "name": name,
                "params": int(params),
                "gmacs": macs / 1e9,
                "size_mb": size_mb(params),
                "onnx_mb": onnx_path.stat().st_size / 2**20,
                "onnx_max_abs_diff": diff,
            }
        )
        cpu_runners[name], providers[name] = onnxruntime_runner(
            onnx_path, shape, threads, spinning=len(models) == 1
        )
        if tensorrt:
            engine_path = build_tensorrt_engine(onnx_path, out_dir / f"{name}.engine", max_batch=shape[0])
            gpu_runners[name], _ = tensorrt_runner(engine_path, shape)
    cpu_times = time_round_robin(cpu_runners, runs, warmup)
    gpu_times = time_round_robin(gpu_runners, runs, warmup) if tensorrt else {}
    for row in rows:
        cpu = latency_summary(cpu_times[row["name"]], providers[row["name"]])
        row.update({key: cpu[key] for key in ("median_ms", "p10_ms", "p90_ms", "provider")})
        if tensorrt:
            gpu = latency_summary(gpu_times[row["name"]], "TensorRT")
            row.update({f"trt_{key}": gpu[key] for key in ("median_ms", "p10_ms", "p90_ms")})
    return rows
