"""``gcp.compress`` / ``gcp compress`` end to end on a tiny gcp YOLOv4 (width 0.125, 64 px) and a tiny YOLO-format
data.yaml written here (8 train and 4 val images, tests/_ultralytics_toys.py), a resume after an interruption
between stages, and every bad input of issue 28 refused in one line before any training, inputs untouched."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("ultralytics")  # a data.yaml is read with Ultralytics' checker

from _ultralytics_toys import offline_ultralytics, write_boxes_dataset  # noqa: E402
from ultralytics import YOLO  # noqa: E402
from ultralytics.nn.tasks import DetectionModel  # noqa: E402

import gcp  # noqa: E402
import gcp.app.compress as compress_module  # noqa: E402
from gcp.app.cli import main  # noqa: E402
from gcp.app.compress import compress, default_schedule, parse_target, plan_compression  # noqa: E402
from gcp.app.config import ConfigError  # noqa: E402
from gcp.app.pipeline import RUN_MARKER, RunError  # noqa: E402
from gcp.app.ultralytics.family import save_checkpoint  # noqa: E402
from gcp.core.serialize import ModelFileError, load_pruned, save_model  # noqa: E402
from gcp.detection.data import DatasetError  # noqa: E402
from gcp.detection.models import yolov4  # noqa: E402

TINY = [
    "prune.round_to=1",  # layers of 4-64 channels: too coarse for multiples of 8
    "prune.calib_images=4",
    "sparsity.batch_size=4",
    "distill.batch_size=4",
    "eval.batch_size=4",
    "bench.runs=2",
    "bench.warmup=0",
]


@pytest.fixture(scope="module", autouse=True)
def no_downloads():
    with offline_ultralytics():
        yield


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model file, data.yaml): an untrained 2-class gcp YOLOv4 and the boxes data set."""
    root = tmp_path_factory.mktemp("inputs")
    data = write_boxes_dataset(root / "data")
    torch.manual_seed(0)
    model = save_model(yolov4(num_classes=2, width=0.125, depth=0.33), root / "model.pt")
    return model, data


def snapshot(*paths: Path) -> dict[str, bytes]:
    """Every file under ``paths`` with its bytes."""
    files = {}
    for path in paths:
        for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            files[str(file)] = file.read_bytes()
    return files


def tiny(model: Path, data: Path, run_dir: Path, lines: list[str] | None = None, **options):
    options = {"target": "macs=0.3", "sparse_epochs": 2, "recover_epochs": 1, **options}
    return compress(
        model,
        data,
        run_dir=run_dir,
        imgsz=64,
        device="cpu",
        progress=False,
        overrides=TINY,
        echo=(lines.append if lines is not None else lambda line: None),
        **options,
    )


@pytest.fixture(scope="module")
def full(inputs, tmp_path_factory: pytest.TempPathFactory):
    """One uninterrupted run: (result, progress lines, the inputs' bytes before it)."""
    model, data = inputs
    before = snapshot(model, data.parent)
    lines: list[str] = []
    result = tiny(model, data, tmp_path_factory.mktemp("runs") / "full", lines)
    return result, lines, before


def test_end_to_end_on_a_gcp_detector(full, inputs) -> None:
    result, lines, before = full
    model, data = inputs
    assert snapshot(model, data.parent) == before  # the user's files are only read
    assert gcp.compress is compress and gcp.CompressResult is compress_module.CompressResult

    original, pruned, recovered = result.original, result.pruned, result.recovered
    for row in (original, pruned, recovered):
        for key in ("map50", "map", "params", "macs", "file_mb", "median_ms"):
            assert isinstance(row[key], float | int), (row["name"], key)
    assert original["split"] == "val"  # the data.yaml has no test split
    assert recovered["params"] < original["params"] and pruned["params"] == recovered["params"]
    assert recovered["macs"] / original["macs"] == pytest.approx(0.7, abs=0.02)  # macs=0.3
    assert load_pruned(result.checkpoint).num_classes == 2
    assert result.onnx.is_file() and recovered["onnx_max_abs_diff"] < 1e-4
    assert sum(p.numel() for p in result.model.parameters()) == recovered["params"]

    report = json.loads(result.report_json.read_text())["compress"]
    assert report["target"]["budget"] == "macs" and report["target"]["ratio"] == 0.3
    assert report["inputs_unchanged"] == {"model": True, "data": True}
    assert report["groups"] and all(0 <= g["ratio"] < 1 for g in report["groups"])
    assert report["commands"][0].startswith("gcp compress --model ")
    markdown = result.report_md.read_text()
    assert "| original (`trained.pt`) |" in markdown and "**recovered vs original**" in markdown
    for name in ("gammas", "sparsity", "group_ratios", "losses"):
        png = result.run_dir / "plots" / f"{name}.png"
        assert f"(plots/{name}.png)" in markdown and png.read_bytes()[:4] == b"\x89PNG"

    assert len(lines) == 9  # one line per stage, then the table and the report's path
    for index, line in enumerate(lines[:8]):
        assert line.startswith(f"[{index + 1}/8] ") and "elapsed" in line
    assert "left (estimated from stage 1)" in lines[2] and str(result.report_md) in lines[8]


def test_resume_after_an_interruption_between_stages_gives_the_same_weights(full, inputs, tmp_path) -> None:
    model, data = inputs
    run_dir = tmp_path / "run"

    def killed(*_args, **_kwargs):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compress_module, "distill_stage", killed)
        with pytest.raises(KeyboardInterrupt):
            tiny(model, data, run_dir)
    assert (run_dir / "pruned_gcp.pt").is_file() and not (run_dir / "distilled_gcp.pt").exists()
    sparse_written = (run_dir / "sparse.pt").stat().st_mtime_ns
    with pytest.raises(RunError, match="already exists; pass --resume"):
        tiny(model, data, run_dir)
    lines: list[str] = []
    resumed = tiny(model, data, run_dir, lines, resume=True)
    assert (run_dir / "sparse.pt").stat().st_mtime_ns == sparse_written  # finished stages are not redone
    uninterrupted = full[0]
    expected = load_pruned(uninterrupted.checkpoint).state_dict()
    got = load_pruned(resumed.checkpoint).state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert resumed.recovered["map50"] == uninterrupted.recovered["map50"]


def test_defaults_come_from_the_data_set_size(inputs, tmp_path) -> None:
    assert default_schedule(8, 4) == {
        "steps_per_epoch": 2,
        "sparse_epochs": 300,
        "recover_epochs": 300,
        "warmup_epochs": 1.0,
    }
    assert default_schedule(118_287, 16)["sparse_epochs"] == 2  # COCO: 7,393 steps per epoch
    assert default_schedule(16_551, 16) == {
        "steps_per_epoch": 1035,
        "sparse_epochs": 2,
        "recover_epochs": 2,
        "warmup_epochs": 0.097,
    }
    model, data = inputs
    plan = plan_compression(model, data, "params=0.5", run_dir=tmp_path / "run")
    config = plan.config
    assert (config.prune.budget, config.prune.ratio, config.prune.method) == ("params", 0.5, "gcp")
    assert (config.sparsity.epochs, config.distill.epochs) == (300, 300)  # 8 images, batch 16: 1 step/epoch
    assert (config.sparsity.optimizer, config.distill.lr) == ("adamw", 5e-4)
    assert config.data.yaml == str(data) and config.model.num_classes == 2
    assert not (tmp_path / "run").exists()
    kept = plan_compression(
        model, data, "macs=0.4", run_dir=tmp_path / "run", overrides=["sparsity.epochs=7", "distill.lr=0.001"]
    ).config
    assert (kept.sparsity.epochs, kept.distill.epochs, kept.distill.lr) == (7, 300, 0.001)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("macs=0.4", ("macs", 0.4)), ("params=0.25", ("params", 0.25)), ("latency=0.3", ("latency", 0.3))],
)
def test_targets_map_onto_prune_budgets(text, expected) -> None:
    if expected[0] == "latency" and importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime not installed")
    assert parse_target(text) == expected


def _bad_inputs(tmp_path: Path, model: Path, data: Path) -> dict[str, tuple[dict, type, str]]:
    root = tmp_path / "bad"
    root.mkdir()
    malformed = root / "malformed.yaml"
    malformed.write_text("train: [images/train\nnames: {0: red\n")
    no_val = root / "no_val.yaml"
    no_val.write_text(f"path: {data.parent}\ntrain: images/train\nnames:\n  0: red\n  1: blue\n")
    three = root / "three.yaml"
    three.write_text(data.read_text() + "  2: green\n")
    garbage = root / "garbage.pt"
    garbage.write_bytes(b"not a model at all" * 10)
    return {
        "missing data.yaml": (dict(data=root / "nope.yaml"), DatasetError, "no such data.yaml"),
        "malformed data.yaml": (dict(data=malformed), DatasetError, "malformed.yaml"),
        "data.yaml without val": (dict(data=no_val), DatasetError, "'val:' key missing"),
        "class count": (dict(data=three), ModelFileError, "predicts 2 classes but"),
        "macs=1.2": (dict(target="macs=1.2"), ConfigError, "must lie in (0, 1), got 1.2"),
        "unknown target": (dict(target="flops=0.4"), ConfigError, "expected macs=R, params=R or latency=R"),
        "unreadable model": (dict(model=garbage), ModelFileError, "gcp cannot read this model file"),
        "missing model": (dict(model=root / "nope.pt"), ModelFileError, "no such model file"),
    }


CASES = (
    "missing data.yaml",
    "malformed data.yaml",
    "data.yaml without val",
    "class count",
    "macs=1.2",
    "unknown target",
    "unreadable model",
    "missing model",
)


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_before_training_and_inputs_stay_identical(case, inputs, tmp_path) -> None:
    model, data = inputs
    options, error_type, message = _bad_inputs(tmp_path, model, data)[case]
    arguments = {"model": model, "data": data, "target": "macs=0.3", **options}
    before = snapshot(model, data.parent, tmp_path / "bad")
    with pytest.raises(error_type) as raised:
        compress(arguments.pop("model"), arguments.pop("data"), run_dir=tmp_path / "run", **arguments)
    assert message in str(raised.value) and "\n" not in str(raised.value)
    assert not (tmp_path / "run").exists()  # nothing ran
    assert snapshot(model, data.parent, tmp_path / "bad") == before


def test_latency_target_without_onnx_runtime_is_refused(inputs, tmp_path) -> None:
    model, data = inputs
    real = importlib.util.find_spec
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a)
        )
        with pytest.raises(ConfigError, match="ONNX Runtime is not installed"):
            compress(model, data, "latency=0.3", run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_run_directory_holding_another_run_is_refused(full, inputs, tmp_path) -> None:
    model, data = inputs
    other = tmp_path / "other"
    other.mkdir()
    (other / RUN_MARKER).write_text('{"by": "gcp demo"}')
    (other / "trained.pt").write_bytes(b"someone else's")
    before = snapshot(other)
    with pytest.raises(RunError, match="already exists; pass --resume to continue it or --overwrite"):
        compress(model, data, "macs=0.3", run_dir=other)
    with pytest.raises(RunError, match="holds another gcp run, not one of gcp compress"):
        compress(model, data, "macs=0.3", run_dir=other, resume=True)
    assert snapshot(other) == before
    finished = full[0].run_dir
    before = snapshot(finished)
    with pytest.raises(RunError, match="holds a gcp compress run of other inputs .*target"):
        tiny(model, data, finished, target="macs=0.5", resume=True)
    assert snapshot(finished) == before


def test_end_to_end_on_an_ultralytics_model(tmp_path) -> None:
    """An Ultralytics checkpoint of YOLOv8n built from its packaged YAML (untrained: the numbers are not the
    point; 40 s on 2 cores) through every stage; the result is a checkpoint ``YOLO(path)`` loads. Ultralytics'
    dataset reader adds its ``labels/<split>.cache`` files next to the labels; every file that was there stays
    byte-identical."""
    data = write_boxes_dataset(tmp_path / "data")
    checkpoint = save_checkpoint(
        DetectionModel("yolov8n.yaml", nc=2, verbose=False), tmp_path / "best.pt", "yolov8n.yaml"
    )
    three = tmp_path / "three.yaml"
    three.write_text(data.read_text() + "  2: green\n")
    before = snapshot(data.parent, checkpoint)
    with pytest.raises(ModelFileError, match="the model predicts 2 classes but .*three.yaml has 3"):
        compress(checkpoint, three, run_dir=tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    result = compress(
        checkpoint,
        data,
        "macs=0.3",
        run_dir=tmp_path / "run",
        sparse_epochs=1,
        recover_epochs=1,
        imgsz=64,
        device="cpu",
        progress=False,
        echo=lambda line: None,
        overrides=[
            "model.train_args={nbs: 4, plots: false, verbose: false}",
            "sparsity.gamma_lr=0.5",
            "sparsity.push_floor=1.0",
            "prune.calib_images=4",
            "sparsity.batch_size=4",
            "distill.batch_size=4",
            "eval.batch_size=4",
            "bench.runs=2",
            "bench.warmup=0",
        ],
    )
    after = snapshot(data.parent, checkpoint)
    assert {k: after[k] for k in before} == before
    assert all(name.endswith(".cache") for name in set(after) - set(before))
    assert result.recovered["macs"] / result.original["macs"] == pytest.approx(0.7, abs=0.02)
    assert "ultralytics_map50" in result.recovered and result.onnx.is_file()
    yolo = YOLO(str(result.checkpoint))
    assert sum(p.numel() for p in yolo.model.parameters()) == result.recovered["params"]
    assert "YOLO.val mAP@0.5" in result.report_md.read_text()


def test_the_command_line_resumes_the_same_run_and_refuses_bad_input(full, inputs, tmp_path, capsys) -> None:
    model, data = inputs
    result = full[0]
    arguments = ["compress", "--model", str(model), "--data", str(data), "--run-dir", str(result.run_dir)]
    arguments += ["--target", "macs=0.3", "--sparse-epochs", "2", "--recover-epochs", "1", "--imgsz", "64"]
    arguments += ["--device", "cpu", "--no-progress"] + [f"--set={override}" for override in TINY]
    weights = result.checkpoint.read_bytes()
    assert main([*arguments, "--resume"]) == 0  # every stage finished: only the report is written again
    out = capsys.readouterr().out
    assert "[8/8] report" in out and "| recovered (`distilled_gcp.pt`) |" in out and "report.md" in out
    assert result.checkpoint.read_bytes() == weights
    assert main([*arguments, "--target", "macs=1.2"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("gcp compress: error: --target macs=1.2: ") and "\n" not in error


def test_the_data_can_come_from_a_config(inputs, tmp_path) -> None:
    """A YOLO-txt folder named by a config (as for VOC or COCO) instead of a data.yaml; checked without training."""
    model, data = inputs
    config = tmp_path / "mine.yaml"
    body = "data: {format: yolo, root: ROOT, class_names: NAMES, train: [train], val: [val], test: [val]}\n"
    config.write_text(body.replace("ROOT", str(data.parent)).replace("NAMES", "[red, blue]"))
    plan = plan_compression(model, None, "macs=0.3", run_dir=tmp_path / "run", config=config)
    assert (plan.train_images, plan.eval_images, plan.config.data.root) == (8, 4, str(data.parent))
    assert plan.config.eval.split == "test" and plan.config.sparsity.epochs == 300
    config.write_text(body.replace("ROOT", str(data.parent)).replace("NAMES", "[red, blue, green]"))
    with pytest.raises(ConfigError, match="the model predicts 2 classes; .*has 3 classes"):
        compress(model, None, "macs=0.3", run_dir=tmp_path / "run", config=config)
    with pytest.raises(ConfigError, match="--data: give the data.yaml"):
        compress(model, None, "macs=0.3", run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
