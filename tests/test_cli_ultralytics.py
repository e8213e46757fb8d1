"""The ``gcp`` stages on a user's Ultralytics model (``model.name: ultralytics``), run in-process through
``gcp.app.cli.main``: YOLOv8n from its packaged YAML on a tiny YOLO-format data.yaml (tests/_ultralytics_toys.py),
one epoch per training stage at 64 px on CPU, nothing downloaded."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("ultralytics")

from _ultralytics_toys import IMGSZ, offline_ultralytics, write_boxes_dataset  # noqa: E402
from ultralytics import YOLO  # noqa: E402

from gcp.app.cli import main  # noqa: E402
from gcp.detection.data import DatasetError, YOLODataset, read_data_yaml  # noqa: E402

FIT = "{epochs: 1, batch_size: 4, warmup_epochs: 0}"
CONFIG = f"""\
data: {{format: yolo, yaml: DATA_YAML, size: {IMGSZ}}}
model:
  name: ultralytics
  weights: yolov8n.yaml
  num_classes: 2
  train_args: {{nbs: 4, plots: false, verbose: false}}
sparsity: {{epochs: 1, batch_size: 4, warmup_epochs: 0, gamma_lr: 0.5, push_floor: 1.0}}
distill: {FIT}
prune: {{ratio: 0.3, calib_images: 4}}
eval: {{split: val, batch_size: 4}}
"""


@pytest.fixture(scope="module", autouse=True)
def no_downloads():
    with offline_ultralytics():
        yield


@pytest.fixture(scope="module")
def data_yaml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_boxes_dataset(tmp_path_factory.mktemp("boxes"))


@pytest.fixture(scope="module")
def config(data_yaml: Path) -> Path:
    path = data_yaml.parent / "yolo.yaml"
    path.write_text(CONFIG.replace("DATA_YAML", str(data_yaml)), encoding="utf-8")
    return path


def gcp(config: Path, run_dir: Path, *args: str) -> int:
    return main([*args, "--config", str(config), "--run-dir", str(run_dir), "--no-progress"])


@pytest.fixture(scope="module")
def run(config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run directory taken through sparse-train, prune and distill, shared by the tests below; given as a
    relative --run-dir, as the README's commands do (Ultralytics puts a relative project under its own runs
    folder, so the run's training files must still land inside the run directory)."""
    parent = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(parent)
        for command in ("sparse-train", "prune", "distill"):
            assert gcp(config, Path("yolo"), command) == 0, command
    run_dir = parent / "yolo"
    for stage in ("sparse", "distill_gcp"):
        assert (run_dir / "fits" / stage / "weights" / "last.pt").is_file(), stage
    return run_dir


def n_params(yolo: YOLO) -> int:
    return sum(p.numel() for p in yolo.model.parameters())


def test_training_stages_use_ultralytics_trainer_and_keep_the_pruned_architecture(
    run: Path, data_yaml: Path, tmp_path: Path
) -> None:
    trained, sparse, pruned, distilled = (
        YOLO(run / f"{name}.pt") for name in ("trained", "sparse", "pruned_gcp", "distilled_gcp")
    )
    params = n_params(pruned)
    assert n_params(sparse) == n_params(trained) and params < 0.8 * n_params(trained)
    assert n_params(distilled) == params  # trained as it is, not rebuilt from the YAML
    # Ultralytics' own run folders; sparse training ends on its last epoch, distillation on Ultralytics' best
    for stage, kept in (("sparse", "last"), ("distill_gcp", "best")):
        assert (run / "fits" / stage / "results.csv").is_file()
        assert (run / "fits" / stage / "weights" / f"gcp_{kept}.pt").is_file()
    history = json.loads((run / "sparsity_history.json").read_text())
    assert history["history"]
    final = history["final"].values()  # measured on the γ sparse.pt holds
    gammas = [m.weight for m in sparse.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert sum(g["channels"] for g in final) == sum(g.numel() for g in gammas)
    zeros = sum(int((g == 0).sum()) for g in gammas)
    assert sum(g["zero_fraction"] * g["channels"] for g in final) == pytest.approx(zeros) and zeros > 0
    terms = json.loads((run / "distill_terms_gcp.json").read_text())["history"]
    assert {"soft_cls", "hard"} <= set(terms[0]["grad_norms"])
    metrics = distilled.val(data=str(data_yaml), imgsz=IMGSZ, batch=4, plots=False, project=str(tmp_path))
    assert 0.0 <= metrics.box.map50 <= 1.0


def test_stage_1_reports_the_groups_that_pruning_thresholds(run: Path) -> None:
    # Ultralytics' own forward decodes every level into one tensor; traced that way, stage 1 once put the neck's
    # layers in the head and its per-group statistics described groups the pruning never used
    history = json.loads((run / "sparsity_history.json").read_text())
    report = json.loads((run / "prune_gcp.json").read_text())
    stage1 = {name: stats["channels"] for name, stats in history["final"].items()}
    pruned = {group["name"]: group["channels_before"] for group in report["groups"]}
    assert stage1 == pruned and {"neck", "head"} <= set(pruned)


def test_eval_scores_with_both_evaluators_and_export_writes_the_network(run: Path, config: Path) -> None:
    distilled = run / "distilled_gcp.pt"
    assert (
        gcp(config, run, "eval", "--checkpoint", str(run / "trained.pt"), "--checkpoint", str(distilled)) == 0
    )
    rows = {row["name"]: row for row in json.loads((run / "report.json").read_text())["rows"]}
    assert list(rows) == ["trained", "distilled_gcp"]
    for row in rows.values():
        assert 0.0 <= row["map50"] <= 1.0 and 0.0 <= row["ultralytics_map50"] <= 1.0
    assert rows["distilled_gcp"]["params"] < 0.8 * rows["trained"]["params"]
    assert rows["distilled_gcp"]["ratio"] == pytest.approx(0.3, abs=0.05) and rows["trained"]["ratio"] == 0.0

    assert gcp(config, run, "export", "onnx", "--checkpoint", str(distilled)) == 0
    assert (run / "export" / "distilled_gcp.onnx").is_file()
    assert json.loads((run / "report.json").read_text())["rows"][-1]["onnx_max_abs_diff"] < 1e-4


def test_a_data_yaml_is_read_as_ultralytics_resolves_it(tmp_path: Path) -> None:
    """A Roboflow-style export: ``train/images`` beside ``train/labels``, ``../`` paths that Ultralytics resolves
    inside the dataset folder; gcp reads the same folders and labels."""
    root = write_boxes_dataset(tmp_path / "export").parent
    for split, folder in (("train", "train"), ("val", "valid")):
        for kind in ("images", "labels"):
            shutil.move(root / kind / split, root / folder / kind)
    (root / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\nnames: [red, blue]\n")
    described = read_data_yaml(root / "data.yaml")
    assert described.splits == {"train": [root / "train" / "images"], "val": [root / "valid" / "images"]}
    _, target = YOLODataset(described.folders("val")[0], class_names=described.class_names, size=IMGSZ)[0]
    assert target["labels"].tolist() == [0, 1]
    with pytest.raises(DatasetError, match=r"data\.yaml has no 'test' split \(it has train, val\)"):
        described.folders("test")


def test_bad_inputs_are_one_line_errors(
    run: Path,
    config: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    three_classes = write_boxes_dataset(tmp_path / "three", ("red", "blue", "green"))
    cases = [
        (["--set", "model.weights=missing.pt"], "model.weights: no such file: missing.pt"),
        (["--set", f"data.yaml={three_classes}"], "model.num_classes is 2 but"),
        (
            ["--set", f"data.yaml={three_classes}", "--set", "model.num_classes=3"]
            + ["--set", f"model.weights={run / 'trained.pt'}"],
            "trained.pt: the model predicts 2 classes but",
        ),
        (["--set", "model.train_args.mosiac=0.5"], "did you mean 'mosaic'?"),
        (["--set", "model.train_args.epochs=3"], "is set by gcp from each stage's section"),
    ]
    for index, (overrides, expected) in enumerate(cases):
        assert gcp(config, tmp_path / f"run{index}", "sparse-train", *overrides) == 2, expected
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("gcp sparse-train: error: ") and expected in error, error

    copy = shutil.copytree(run, tmp_path / "copy")  # a stage whose training ended but whose file is missing
    (copy / "distilled_gcp.pt").unlink()
    assert gcp(config, copy, "distill", "--resume") == 2
    assert "has finished its training, which Ultralytics cannot resume" in capsys.readouterr().err

    monkeypatch.setitem(sys.modules, "ultralytics", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "gcp.app.ultralytics.family")
    assert gcp(config, tmp_path / "missing", "prune") == 2
    assert "pip install 'gcp[ultralytics]'" in capsys.readouterr().err


def test_demo_refuses_an_ultralytics_config_and_names_the_stages(
    config: Path, tmp_path: Path, capsys
) -> None:
    assert main(["demo", "--config", str(config), "--run-dir", str(tmp_path / "d"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "gcp demo runs gcp's own YOLOv4" in err and "gcp sparse-train, prune, distill" in err
    assert not (tmp_path / "d").exists()
