"""ONNX export parity, TensorRT availability errors and latency measurement (paper §5.3.3, Table 8)."""

import copy
import importlib.util

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from _core_toys import ToyDetector, randomise_bn

import gcp
from gcp.detection.models import yolov4
from gcp.runtime.export import (
    build_tensorrt_engine,
    compare_latency,
    export_onnx,
    latency_onnxruntime,
    latency_tensorrt,
)

X = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()
LATENCY_FIELDS = {"median_ms", "p10_ms", "p90_ms", "mean_ms", "runs", "provider"}


def tiny_yolov4() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomise_bn(yolov4(num_classes=3, width=0.125, depth=0.33))


@pytest.fixture(scope="module")
def base():
    return tiny_yolov4()


@pytest.fixture(scope="module")
def pruned():
    model = tiny_yolov4()
    gcp.prune_detector(model, X, ratio=0.3)
    return model


@pytest.fixture(scope="module")
def exported(base, tmp_path_factory):
    """The base model exported once, in train mode, to check the mode comes back."""
    path = tmp_path_factory.mktemp("onnx") / "base.onnx"
    base.train()
    state = copy.deepcopy(base.state_dict())
    diff = export_onnx(base, X, path)
    return path, diff, state


def test_export_matches_pytorch_and_restores_the_model(base, exported):
    path, diff, state_before = exported
    assert 0.0 <= diff <= 1e-4
    assert base.training, "export_onnx must restore train mode"
    assert all(torch.equal(v, state_before[k]) for k, v in base.state_dict().items()), "BN stats moved"
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    opset = {entry.domain: entry.version for entry in onnx.load(str(path)).opset_import}[""]
    assert opset >= 17


def test_exported_file_has_a_dynamic_batch_and_named_heads(base, exported):
    path, _, _ = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["head_s8", "head_s16", "head_s32"]
    batch = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    got = session.run(None, {"images": batch.numpy()})
    base.eval()
    with torch.no_grad():
        expected = base(batch)
    for ours, theirs in zip(expected, got):
        assert theirs.shape == tuple(ours.shape) and theirs.shape[0] == 3
        np.testing.assert_allclose(theirs, ours.numpy(), atol=1e-4)


def test_too_small_atol_raises_and_leaves_the_old_file(tmp_path):
    model = randomise_bn(ToyDetector(width=8))
    path = tmp_path / "toy.onnx"
    path.write_bytes(b"previous export")
    with pytest.raises(
        RuntimeError, match=r"differs from PyTorch by up to .*\(> atol=1e-12\); .*toy.onnx was not written"
    ):
        export_onnx(model, X, path, atol=1e-12)
    assert path.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["toy.onnx"]


def test_bad_export_arguments_raise_clear_errors(tmp_path):
    model = ToyDetector(width=8)
    with pytest.raises(ValueError, match="opset must be >= 17"):
        export_onnx(model, X, tmp_path / "a.onnx", opset=13)
    with pytest.raises(ValueError, match="tensor or a non-empty sequence"):
        export_onnx(model, [], tmp_path / "a.onnx")

    class DictOutput(torch.nn.Module):
        def forward(self, x):
            return {"boxes": x}

    with pytest.raises(ValueError, match="returned dict"):
        export_onnx(DictOutput(), X, tmp_path / "a.onnx")
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT and a CUDA GPU are present")
def test_tensorrt_without_package_or_gpu_names_what_is_missing(tmp_path, exported):
    path, _, _ = exported
    for call in (
        lambda: build_tensorrt_engine(path, tmp_path / "base.engine"),
        lambda: latency_tensorrt(tmp_path / "base.engine", (1, 3, 64, 64), runs=3, warmup=0),
    ):
        with pytest.raises(RuntimeError) as error:
            call()
        message = str(error.value)
        assert "\n" not in message and "pip install 'gcp[tensorrt]'" in message
        if importlib.util.find_spec("tensorrt") is None:
            assert "tensorrt not installed" in message
        if not torch.cuda.is_available():
            assert "no CUDA device" in message
    assert not (tmp_path / "base.engine").exists()


def test_onnxruntime_latency_fields_are_sane(exported):
    path, _, _ = exported
    result = latency_onnxruntime(path, (1, 3, 64, 64), runs=3, warmup=1, threads=1)
    assert set(result) == LATENCY_FIELDS
    assert result["runs"] == 3 and result["provider"] == "CPUExecutionProvider"
    assert 0.0 < result["p10_ms"] <= result["median_ms"] <= result["p90_ms"]
    assert result["mean_ms"] > 0.0
    with pytest.raises(ValueError, match="runs must be >= 1"):
        latency_onnxruntime(path, (1, 3, 64, 64), runs=0)
    with pytest.raises(FileNotFoundError, match="no ONNX file"):
        latency_onnxruntime(path.with_name("missing.onnx"), (1, 3, 64, 64), runs=1)


def test_compare_latency_exports_and_times_base_and_pruned(base, pruned, tmp_path):
    rows = compare_latency(
        {"base": base, "pruned": pruned}, (1, 3, 64, 64), tmp_path, runs=3, warmup=1, threads=1
    )
    assert [row["name"] for row in rows] == ["base", "pruned"]
    by_name = {row["name"]: row for row in rows}
    assert by_name["pruned"]["params"] < by_name["base"]["params"]
    assert by_name["pruned"]["size_mb"] < by_name["base"]["size_mb"]
    assert by_name["pruned"]["gmacs"] < by_name["base"]["gmacs"]
    for row in rows:
        assert (tmp_path / f"{row['name']}.onnx").is_file()
        assert row["onnx_max_abs_diff"] <= 1e-4
        assert 0.0 < row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
        assert row["provider"] == "CPUExecutionProvider"
        assert not any(key.startswith("trt_") for key in row)


def test_models_timed_in_turns_have_onnxruntime_threads_that_sleep_between_runs(
    base, pruned, tmp_path, monkeypatch
):
    """Spinning worker threads of the idle sessions would steal the running one's cores (up to 2x slower)."""
    timing_sessions = []
    make_session = gcp.runtime.export.ort_session

    def recording_session(source, threads=None, **kwargs):
        session = make_session(source, threads, **kwargs)
        if not isinstance(source, bytes):  # the export parity check loads bytes; timing loads files
            timing_sessions.append(session.get_session_options())
        return session

    monkeypatch.setattr(gcp.runtime.export, "ort_session", recording_session)
    compare_latency({"base": base, "pruned": pruned}, (1, 3, 64, 64), tmp_path, runs=1, warmup=0)
    assert len(timing_sessions) == 2
    assert all(o.get_session_config_entry("session.intra_op.allow_spinning") == "0" for o in timing_sessions)


def test_compare_latency_rejects_bad_requests_before_exporting(base, tmp_path):
    with pytest.raises(ValueError, match="at least one model"):
        compare_latency({}, (1, 3, 64, 64), tmp_path)
    with pytest.raises(ValueError, match="plain file name"):
        compare_latency({"../base": base}, (1, 3, 64, 64), tmp_path)
    if not HAS_TENSORRT:
        with pytest.raises(RuntimeError, match="TensorRT needs"):
            compare_latency({"base": base}, (1, 3, 64, 64), tmp_path, tensorrt=True)
    assert not any(tmp_path.iterdir())
