"""Smoke tests of every ``gcp`` subcommand on a tiny config (YOLOv4 width 0.125 at 64 px, 8 DigitScenes
training images, one optimiser step per stage), run in-process through ``gcp.app.cli.main``, plus the run-directory
rules (refuse, resume, overwrite) and ``gcp demo`` end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from gcp.app.cli import main
from gcp.app.pipeline import load_model
from gcp.core.serialize import load_pruned
from gcp.detection.models import yolov4
from gcp.detection.train import load_checkpoint
from grouping import prunable_norms

COMMANDS = (
    "train",
    "sparse-train",
    "prune",
    "finetune",
    "distill",
    "eval",
    "export",
    "plot",
    "bench",
    "demo",
)
FIT = "{epochs: 1, batch_size: 4, max_steps_per_epoch: 1, ema: false, warmup_epochs: 0}"
TINY_CONFIG = f"""\
data:
  root: DIGITS_ROOT
  size: 64
  digits: {{n_train: 8, n_val: 4, n_test: 4}}
model: {{width: 0.125, depth: 0.33}}
train: {FIT}
sparsity: {FIT}
finetune: {FIT}
distill: {FIT}
prune: {{ratio: 0.2, calib_images: 4, round_to: 1}}  # layers of 4-64 channels: too coarse for 8
eval: {{batch_size: 4}}
bench: {{runs: 1, warmup: 0}}
"""


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("config")
    path = folder / "tiny.yaml"
    path.write_text(TINY_CONFIG.replace("DIGITS_ROOT", str(folder / "digits")), encoding="utf-8")
    return path


def gcp(config: Path, run_dir: Path, *args: str) -> int:
    return main([*args, "--config", str(config), "--run-dir", str(run_dir), "--no-progress"])


@pytest.fixture(scope="module")
def run(tiny_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run directory taken through train, sparse-train and gcp pruning, shared by the tests below."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    assert gcp(tiny_config, run_dir, "train") == 0
    assert gcp(tiny_config, run_dir, "sparse-train") == 0
    assert gcp(tiny_config, run_dir, "prune", "--method", "gcp") == 0
    return run_dir


def report_rows(run_dir: Path) -> dict[str, dict]:
    return {row["name"]: row for row in json.loads((run_dir / "report.json").read_text())["rows"]}


def test_help_explains_every_subcommand(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    overview = capsys.readouterr().out
    assert "demo the whole method on DigitScenes: 9-12 min on 2 CPU cores" in " ".join(overview.split())
    for command in COMMANDS:
        assert command in overview
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        for option in ("--config", "--set", "--run-dir", "--resume", "--overwrite", "--device"):
            assert option in text, (command, option)


def test_train_writes_the_model_and_the_run_records(run: Path) -> None:
    model = load_model(run / "trained.pt")
    assert model.num_classes == 10 and model.gcp_builder["kwargs"]["width"] == 0.125
    assert (run / "fits" / "train" / "last.pt").is_file() and (run / "logs" / "train.log").is_file()
    assert "epochs: 1" in (run / "config" / "train.yaml").read_text()
    assert "train" in json.loads((run / "report.json").read_text())["stages"]


def test_existing_run_directory_is_refused_unless_resume_or_overwrite(
    run: Path, tiny_config: Path, capsys: pytest.CaptureFixture
) -> None:
    before = (run / "trained.pt").read_bytes()
    assert gcp(tiny_config, run, "train") == 2
    assert "already exists; pass --resume to continue it or --overwrite" in capsys.readouterr().err
    assert gcp(tiny_config, run, "prune", "--method", "gcp") == 2
    assert "pruned_gcp.pt" in capsys.readouterr().err
    assert gcp(tiny_config, run, "train", "--resume") == 0
    assert (run / "trained.pt").read_bytes() == before


def test_overwrite_never_deletes_a_directory_gcp_did_not_create(
    tiny_config: Path, tmp_path: Path, capsys
) -> None:
    (tmp_path / "notes.txt").write_text("precious")
    assert gcp(tiny_config, tmp_path, "train", "--overwrite") == 2
    assert "not a gcp run directory" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "precious"


def test_resume_finishes_a_stage_from_its_training_checkpoint(run: Path, tiny_config: Path) -> None:
    """A stage killed after its last epoch's checkpoint but before its model file: --resume completes it
    from fits/<stage>/last.pt without training again."""
    assert gcp(tiny_config, run, "finetune", "--method", "gcp") == 0
    finished = load_pruned(run / "finetuned_gcp.pt").state_dict()
    (run / "finetuned_gcp.pt").unlink()
    steps = load_checkpoint(run / "fits" / "finetune_gcp" / "last.pt")["step"]
    assert gcp(tiny_config, run, "finetune", "--method", "gcp", "--resume") == 0
    assert load_checkpoint(run / "fits" / "finetune_gcp" / "last.pt")["step"] == steps
    resumed = load_pruned(run / "finetuned_gcp.pt").state_dict()
    assert all(torch.equal(finished[k], resumed[k]) for k in finished)


def test_sparse_train_records_the_gamma_history_and_takes_the_constant_schedule(
    run: Path, tiny_config: Path, tmp_path: Path
) -> None:
    history = json.loads((run / "sparsity_history.json").read_text())
    assert history["switch_at"] == 0.5 and len(history["history"]) == 1
    assert set(history["history"][0]["groups"]) >= {"backbone_s8", "head"}
    other = tmp_path / "constant"
    assert (
        gcp(
            tiny_config, other, "sparse-train", "--schedule", "constant", "--weights", str(run / "trained.pt")
        )
        == 0
    )
    assert json.loads((other / "sparsity_history.json").read_text())["switch_at"] == 1.0
    assert load_model(other / "sparse.pt").num_classes == 10


def test_sparse_train_with_the_selective_mechanism_zeroes_channels(
    run: Path, tiny_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    options = ["--weights", str(run / "trained.pt"), "--set", "sparsity.mechanism=selective"]
    assert gcp(tiny_config, tmp_path / "one_step", "sparse-train", *options) == 2  # the tiny run has 1 step
    error = capsys.readouterr().err
    assert "needs a run of at least 2 steps" in error and "sparsity.epochs" in error
    assert not (tmp_path / "one_step" / "sparse.pt").exists()
    other = tmp_path / "selective"
    more = ["--set", "sparsity.epochs=3", "--set", "sparsity.target=0.3"]
    assert gcp(tiny_config, other, "sparse-train", *options, *more) == 0
    norms = prunable_norms(load_model(other / "sparse.pt"))
    gammas = torch.cat([m.weight.detach().flatten() for m in norms.values()])
    assert 0.05 < float((gammas == 0).float().mean()) < 0.95  # chosen per MAC, so not 30 % of the channels


def test_a_sparsity_key_of_another_mechanism_is_a_config_error(
    run: Path, tiny_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    options = ["--weights", str(run / "trained.pt"), "--set", "sparsity.mechanism=eq3"]
    assert (
        gcp(tiny_config, tmp_path / "eq3", "sparse-train", *options, "--set", "sparsity.push_floor=0.5") == 2
    )
    error = capsys.readouterr().err
    assert "sparsity.mechanism 'eq3'" in error and "push_floor=0.5 applies only to layer_relative" in error
    assert not (tmp_path / "eq3" / "sparse.pt").exists()


def test_the_latency_budget_is_timed_on_tensorrt_only_where_cuda_and_tensorrt_exist(monkeypatch) -> None:
    from gcp.app.config import PruneConfig
    from gcp.app.pipeline import latency_runtime

    assert latency_runtime(PruneConfig(budget="macs")) is None
    assert latency_runtime(PruneConfig(budget="latency", runtime="tensorrt")) == "tensorrt"
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert latency_runtime(PruneConfig(budget="latency")) == "onnxruntime"
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object() if name == "tensorrt" else None)
    assert latency_runtime(PruneConfig(budget="latency")) == "tensorrt"


def test_prune_methods_flags_and_group_files(run: Path, tiny_config: Path, tmp_path: Path) -> None:
    gcp_report = json.loads((run / "prune_gcp.json").read_text())
    assert gcp_report["method"] == "gcp" and gcp_report["achieved"] == pytest.approx(0.2, abs=0.02)
    groups = tmp_path / "groups.yaml"
    groups.write_text("backbone: ['backbone.*']\nrest: ['spp.*', 'neck.*', 'head.*']\n")
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(run / "sparse.pt", other / "sparse.pt")
    flags = ["--ratio", "0.25", "--budget", "params", "--allocator", "paper", "--groups", str(groups)]
    assert gcp(tiny_config, other, "prune", "--method", "gcp", *flags) == 0
    report = json.loads((other / "prune_gcp.json").read_text())
    assert report["budget"] == "params" and [g["name"] for g in report["groups"]] == ["backbone", "rest"]
    assert report["params"]["pruned"] == pytest.approx(0.25, abs=0.03)
    for method in ("slim", "thinet", "lcp"):  # lcp: calibration images with their boxes
        assert gcp(tiny_config, other, "prune", "--method", method) == 0
        pruned = load_pruned(other / f"pruned_{method}.pt")
        assert sum(p.numel() for p in pruned.parameters()) < report["params"]["before"]


def test_prune_without_its_input_says_which_command_makes_it(
    tiny_config: Path, tmp_path: Path, capsys
) -> None:
    assert gcp(tiny_config, tmp_path / "empty", "prune") == 2
    assert "run `gcp sparse-train` first, or set prune.source=trained" in capsys.readouterr().err


def test_distill_trains_the_pruned_model_against_the_teacher(run: Path, tiny_config: Path) -> None:
    assert gcp(tiny_config, run, "distill", "--method", "gcp") == 0
    distilled = load_pruned(run / "distilled_gcp.pt")
    pruned = load_pruned(run / "pruned_gcp.pt")
    assert {k: v.shape for k, v in distilled.state_dict().items()} == {
        k: v.shape for k, v in pruned.state_dict().items()
    }
    history = json.loads((run / "fits" / "distill_gcp" / "history.json").read_text())
    assert {"train/at", "train/soft_cls", "train/soft_box"} <= set(history)


def test_eval_export_and_bench_fill_report_rows(run: Path, tiny_config: Path, capsys) -> None:
    picked = ["--checkpoint", str(run / "trained.pt"), "--checkpoint", str(run / "pruned_gcp.pt")]
    assert gcp(tiny_config, run, "eval", *picked) == 0
    assert "pruned_gcp" in capsys.readouterr().out
    rows = report_rows(run)
    assert 0.0 <= rows["pruned_gcp"]["map50"] <= 1.0
    assert rows["pruned_gcp"]["params"] < rows["trained"]["params"]
    assert rows["pruned_gcp"]["ratio"] == pytest.approx(0.2, abs=0.02) and rows["trained"]["ratio"] == 0.0

    assert gcp(tiny_config, run, "export", "onnx", "--checkpoint", str(run / "pruned_gcp.pt")) == 0
    assert (run / "export" / "pruned_gcp.onnx").is_file()
    assert report_rows(run)["pruned_gcp"]["onnx_max_abs_diff"] < 1e-4

    assert gcp(tiny_config, run, "bench", "latency", *picked, "--runs", "2") == 0
    rows = report_rows(run)
    assert rows["trained"]["median_ms"] > 0 and rows["pruned_gcp"]["provider"] == "CPUExecutionProvider"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on machines without CUDA")
def test_tensorrt_without_gpu_fails_with_one_clear_line(run: Path, tiny_config: Path, capsys) -> None:
    assert gcp(tiny_config, run, "export", "tensorrt", "--checkpoint", str(run / "trained.pt")) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "TensorRT needs" in error and "CUDA" in error


def test_a_bad_model_file_is_one_line_naming_the_file_whichever_command_reads_it(
    run: Path, tiny_config: Path, tmp_path: Path, capsys
) -> None:
    cut = tmp_path / "cut.pt"  # a copy that stopped early: no zip central directory
    data = (run / "pruned_gcp.pt").read_bytes()
    cut.write_bytes(data[: min(100_000, len(data) // 2)])
    stranger = tmp_path / "stranger.pt"  # a PyTorch file, but not a gcp model
    torch.save({"weights": torch.zeros(3)}, stranger)
    other = tmp_path / "other.pt"  # a dense gcp file whose weights are another width's
    dense = torch.load(run / "trained.pt", weights_only=True)
    dense["state_dict"] = yolov4(num_classes=10, width=0.25, depth=0.33).state_dict()
    torch.save(dense, other)
    work = tmp_path / "work"
    shutil.copytree(run, work)
    cut_pruned = tmp_path / "cut_pruned"  # a run whose pruned_gcp.pt is the cut copy
    shutil.copytree(run, cut_pruned)
    shutil.copy(cut, cut_pruned / "pruned_gcp.pt")
    truncated = "cannot read the model file: truncated or not a PyTorch file"
    cases = [
        (work, ["eval", "--checkpoint", str(cut)], cut, truncated),
        (work, ["export", "onnx", "--checkpoint", str(cut)], cut, truncated),
        (work, ["bench", "latency", "--checkpoint", str(cut)], cut, truncated),
        (work, ["sparse-train", "--weights", str(cut), "--overwrite"], cut, truncated),
        (work, ["distill", "--teacher", str(cut), "--overwrite"], cut, truncated),
        (cut_pruned, ["finetune", "--overwrite"], cut_pruned / "pruned_gcp.pt", truncated),
        (work, ["eval", "--checkpoint", str(stranger)], stranger, "not a gcp model file"),
        (
            work,
            ["eval", "--checkpoint", str(other)],
            other,
            "weights do not match the yolov4 the file records",
        ),
    ]
    for run_dir, args, path, problem in cases:
        assert gcp(tiny_config, run_dir, *args) == 2, args
        errors = capsys.readouterr().err
        command = args[0]
        lines = [line for line in errors.splitlines() if line.startswith(f"gcp {command}: error:")]
        assert lines == [f"gcp {command}: error: {path}: " + lines[0].split(f"{path}: ", 1)[1]], (
            args,
            errors,
        )
        assert problem in lines[0] and "Traceback" not in errors, (args, errors)


def test_plots_are_written_for_each_kind(run: Path, tiny_config: Path) -> None:
    assert gcp(tiny_config, run, "eval", "--checkpoint", str(run / "pruned_gcp.pt")) == 0
    for kind in ("gammas", "sparsity", "tradeoff"):
        assert gcp(tiny_config, run, "plot", kind) == 0
        assert (run / "plots" / f"{kind}.png").read_bytes()[:4] == b"\x89PNG"
    assert set(json.loads((run / "report.json").read_text())["plots"]) == {"gammas", "sparsity", "tradeoff"}


def test_config_errors_reach_the_user_with_the_key(tiny_config: Path, tmp_path: Path, capsys) -> None:
    assert (
        main(["train", "--config", str(tiny_config), "--run-dir", str(tmp_path), "--set", "prune.ratoi=0.3"])
        == 2
    )
    error = capsys.readouterr().err
    assert "error: --set prune.ratoi=0.3: unknown key 'prune.ratoi'; did you mean 'prune.ratio'" in error
    assert gcp(tiny_config, tmp_path / "r1", "prune", "--ratio", "1.0") == 2
    assert "error: --ratio 1.0: prune.ratio: must be a number in (0, 1), got 1.0" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--config",
                str(tiny_config),
                "--run-dir",
                str(tmp_path / "r"),
                "--set",
                "model.weights=/no/w.pt",
            ]
        )
        == 2
    )
    assert "model.weights: no such file: /no/w.pt" in capsys.readouterr().err


def test_demo_runs_the_whole_method_and_prints_one_table(
    run: Path, tiny_config: Path, tmp_path: Path, capsys
) -> None:
    demo_dir = tmp_path / "demo"
    assert gcp(tiny_config, demo_dir, "demo", "--teacher", str(run / "trained.pt")) == 0
    out = capsys.readouterr().out
    assert out.count("mAP@0.5") == 1 and "ORT latency (ms)" in out
    rows = report_rows(demo_dir)
    for method in ("gcp", "slim", "thinet"):
        stages = ("pruned", "finetuned", "distilled") if method == "gcp" else ("pruned", "finetuned")
        for stage in stages:
            row = rows[f"{stage}_{method}"]
            assert 0.0 <= row["map50"] <= 1.0 and row["median_ms"] > 0, row
        assert rows[f"pruned_{method}"]["ratio"] == pytest.approx(0.2, abs=0.02)
    assert "distilled_slim" not in rows  # demo.distill: [gcp], as the benchmark
    assert rows["trained"]["params"] > rows["distilled_gcp"]["params"]
    sweep = json.loads((demo_dir / "report.json").read_text())["sweep"]
    for method in ("gcp", "slim", "thinet"):  # the trade-off plot's extra x values, scored before recovery
        ratios = sorted(row["ratio"] for row in sweep if row["method"] == method)
        assert ratios == pytest.approx([0.2, 0.3, 0.5], abs=0.03) and all(0 <= r["map50"] <= 1 for r in sweep)
    for kind in ("gammas", "sparsity", "tradeoff"):
        assert (demo_dir / "plots" / f"{kind}.png").is_file() and f"{kind}:" in out


def test_demo_without_methods_sparse_trains_and_plots_without_a_tradeoff(
    run: Path, tiny_config: Path, tmp_path: Path, capsys
) -> None:
    """How benchmarks/bench_digits.py gets the constant-schedule column of the paper's Table 9."""
    demo_dir = tmp_path / "demo"
    args = ("demo", "--teacher", str(run / "trained.pt"), "--set", "demo.methods=[]")
    assert gcp(tiny_config, demo_dir, *args, "--set", "sparsity.schedule=constant") == 0
    assert set(report_rows(demo_dir)) == {"trained", "sparse"}
    assert (demo_dir / "plots" / "sparsity.png").is_file()
    assert not (demo_dir / "plots" / "tradeoff.png").exists()


def test_demo_without_teacher_says_how_to_make_one(tiny_config: Path, tmp_path: Path, capsys) -> None:
    missing = tmp_path / "teacher.pt"
    assert gcp(tiny_config, tmp_path / "demo", "demo", "--teacher", str(missing)) == 2
    assert "python benchmarks/train_reference.py" in capsys.readouterr().err


def test_demo_sparse_start_is_the_shipped_stage1_model_only_for_the_shipped_teacher(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from gcp.app.pipeline import SHIPPED_SPARSE, RunError, sparse_start

    def ctx(sparse=None, teacher=None):
        return SimpleNamespace(
            config=SimpleNamespace(demo=SimpleNamespace(sparse_start=sparse, teacher=teacher))
        )

    shipped = SHIPPED_SPARSE if SHIPPED_SPARSE.is_file() else None
    assert sparse_start(ctx()) == shipped
    assert sparse_start(ctx(), teacher=tmp_path / "mine.pt") is None  # the user's own teacher: start from it
    assert sparse_start(ctx(teacher="mine.pt")) is None
    assert sparse_start(ctx(sparse="teacher")) is None
    own = tmp_path / "sparse.pt"
    own.write_bytes(b"x")
    assert sparse_start(ctx(sparse=str(own))) == own
    with pytest.raises(RunError, match="demo.sparse_start"):
        sparse_start(ctx(sparse=str(tmp_path / "missing.pt")))
