"""The three stages on an Ultralytics YOLOv8n through Ultralytics' own trainer, against
torch-pruning's YOLOv8 recipe at the same MACs.

On DigitScenes in the YOLO layout (3,000 train / 500 val / 500 test at 256 px, the split of
``bench_vs_yolov8n.py``), every stage runs the ``gcp`` command with ``model.name: ultralytics``
(``gcp/configs/ultralytics.yaml``), as a user of their own model would:

1. ``base``: YOLOv8n from ``yolov8n.yaml``, no pretrained weights, trained for ``--base-minutes`` with
   Ultralytics' trainer (``gcp train``; AdamW at the lr Ultralytics' ``optimizer=auto`` picks for this run,
   fliplr 0 as in ``bench_vs_yolov8n.py``). Its ``last.pt`` is kept as the benchmark asset
   ``benchmarks/assets/yolov8n_digits.pt``; when that asset exists the stage copies it instead of training;
2. ``sparse``: stage 1, ``gcp sparse-train`` (``gcp.DynamicSparsity`` inside Ultralytics' step);
3. ``prune``: stage 2, ``gcp prune`` (group thresholds, ``budget: macs``, ``--macs`` of the MACs);
4. ``distill``: stage 3, ``gcp distill`` (group spatial attention distillation from the base model; Ultralytics'
   loss is L_hard);
5. ``tp``: torch-pruning's recipe on the base model: its ``MagnitudePruner`` with L2 group magnitude
   importance, stepped (its iterative steps) until it removes as many MACs as gcp did, then fine-tuned
   with the same Ultralytics trainer, schedule and epochs as stage 3 (``gcp``'s finetune stage);
6. ``finetune`` (only when named in ``--stages``): gcp's pruned model fine-tuned the same way, without
   distillation, to separate what GSA adds;
7. ``eval``: ``gcp eval`` on the test split (gcp's evaluator and ``YOLO.val``) and ``gcp bench`` (ONNX Runtime,
   batch 1, base and pruned timed round-robin);
8. ``report``: ``benchmarks/results/ultralytics_cpu.json`` and the RESULTS.md section.

Each stage leaves its files in ``--run-dir`` and is skipped when they are there; interrupted training resumes
from Ultralytics' ``last.pt`` (the ``gcp`` command's ``--resume``), so the benchmark can be split across
sessions by running the same command again.

    YOLO_OFFLINE=1 python benchmarks/bench_ultralytics.py                 # everything
    YOLO_OFFLINE=1 python benchmarks/bench_ultralytics.py --stages base   # a part
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("YOLO_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_yolov8n import SIZE, to_yolo_layout  # noqa: E402
from common import git_revision, machine, now, tp_prune, write_section  # noqa: E402

from gcp.detection.data import make_digit_scenes  # noqa: E402
from gcp.io import atomic_write_json, atomic_write_text  # noqa: E402

STAGES = ["base", "sparse", "prune", "distill", "tp", "finetune", "eval", "report"]
# the rows; ``finetune`` (gcp's pruned model without distillation) runs when asked: --stages finetune eval report
DEFAULT_STAGES = ["base", "sparse", "prune", "distill", "tp", "eval", "report"]
ASSET = Path(__file__).with_name("assets") / "yolov8n_digits.pt"
RESULTS_JSON = Path(__file__).with_name("results") / "ultralytics_cpu.json"
TITLE = "The method on an Ultralytics YOLOv8n, through Ultralytics' trainer"
TP_METHOD = "tpl2"  # the file names of torch-pruning's row: pruned_tpl2.pt, finetuned_tpl2.pt
# Ultralytics' optimizer=auto for this run (fewer than 10,000 iterations, 10 classes): AdamW at
# lr0 = 0.002 · 5 / (4 + nc), momentum 0.9; every stage uses it so that only the stage's purpose differs.
NUM_CLASSES = 10
LR = round(0.002 * 5 / (4 + NUM_CLASSES), 6)


def config_text(data_yaml: Path, args: argparse.Namespace) -> str:
    """The run's config: the packaged ``ultralytics`` config with this benchmark's data, schedule and epochs."""
    fit = f"optimizer: adamw, lr: {LR}, momentum: 0.9, batch_size: 32"
    return f"""seed: {args.seed}
device: cpu
data: {{format: yolo, yaml: {data_yaml.resolve()}, size: {SIZE}, num_workers: 0}}
model:
  name: ultralytics
  weights: yolov8n.yaml
  num_classes: {NUM_CLASSES}
  train_args: {{fliplr: 0.0, plots: false, amp: false}}
train: {{epochs: 100, {fit}, warmup_epochs: 3}}
sparsity: {{epochs: {args.epochs_sparse}, {fit}, warmup_epochs: 0, schedule: dynamic, mechanism: layer_relative}}
prune: {{method: gcp, ratio: {args.macs}, budget: macs}}
finetune: {{epochs: {args.epochs_recover}, {fit}, warmup_epochs: 0}}
distill: {{epochs: {args.epochs_recover}, {fit}, warmup_epochs: 0}}
eval: {{split: test, batch_size: 16}}
"""


class Bench:
    """The run directory, its config and the ``gcp`` command on it."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.run = Path(args.run_dir)
        self.run.mkdir(parents=True, exist_ok=True)
        self.config = self.run / "bench.yaml"
        self.minutes_file = self.run / "stage_minutes.json"

    def path(self, name: str) -> Path:
        return self.run / name

    def gcp(self, command: str, *extra: str) -> None:
        """``gcp <command>`` on the run (resuming what an earlier invocation left), output into the log."""
        argv = [sys.executable, "-m", "gcp.app.cli", command, *extra]
        argv += ["--config", str(self.config), "--run-dir", str(self.run), "--no-progress"]
        print("$", " ".join(argv[2:]), flush=True)
        subprocess.run(argv, check=True)

    def timed(self, stage: str, body: Any) -> None:
        """Run ``body`` and add its wall minutes to the stage's record."""
        start = time.perf_counter()
        body()
        minutes = json.loads(self.minutes_file.read_text()) if self.minutes_file.is_file() else {}
        minutes[stage] = minutes.get(stage, 0.0) + (time.perf_counter() - start) / 60
        atomic_write_json(self.minutes_file, minutes)


def stage_base(bench: Bench) -> None:
    """YOLOv8n trained from scratch (or the shipped asset) → trained.pt."""
    trained = bench.path("trained.pt")
    if not trained.is_file() and ASSET.is_file() and not bench.args.retrain:
        shutil.copyfile(ASSET, trained)
    elif not trained.is_file():
        time_arg = f"model.train_args={{fliplr: 0.0, plots: false, amp: false, time: {bench.args.base_minutes / 60}}}"
        bench.gcp("train", "--resume", "--set", time_arg)
    if not ASSET.is_file() and not bench.args.smoke:
        ASSET.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(trained, ASSET)


def stage_tp(bench: Bench) -> None:
    """torch-pruning's L2 magnitude pruner on the base model, to gcp's achieved MACs cut → pruned_tpl2.pt;
    then the same fine-tuning as every recovery → finetuned_tpl2.pt."""
    from gcp.adapters.ultralytics import split_blocks
    from gcp.app.config import load_config
    from gcp.app.pipeline import Context, RunDir, finetune_stage

    config, _ = load_config(str(bench.config), [])
    ctx = Context(config, RunDir(bench.run), resume=True, progress=False)
    pruned = bench.path(f"pruned_{TP_METHOD}.pt")
    if not pruned.is_file():
        gcp_report = json.loads(bench.path("prune_gcp.json").read_text(encoding="utf-8"))
        model = ctx.family.load(bench.path("trained.pt"))
        split_blocks(model)  # as torch-pruning's YOLOv8 example replaces C2f by its split version
        result = tp_prune(model, ctx.example_inputs, "tp_magnitude", gcp_report["achieved"])
        result.adapter = "ultralytics"
        atomic_write_json(bench.path(f"prune_{TP_METHOD}.json"), result.report)
        ctx.family.save_pruned(result, pruned, bench.path("trained.pt"))
    finetune_stage(ctx, TP_METHOD)


def stage_eval(bench: Bench) -> None:
    """gcp's evaluator and YOLO.val on the test split, and ONNX Runtime latency, of every model of the run
    into report.json."""
    bench.gcp("eval")
    bench.gcp("bench", "latency", "--runs", "30")


def write_report(bench: Bench) -> None:
    """``benchmarks/results/ultralytics_cpu.json`` with the issue's keys, and the RESULTS.md section."""
    report = json.loads(bench.path("report.json").read_text(encoding="utf-8"))
    by_name = {row["name"]: row for row in report["rows"]}
    base = by_name["trained"]
    minutes = json.loads(bench.minutes_file.read_text()) if bench.minutes_file.is_file() else {}
    rows = []
    for name, method, recovery in [
        ("pruned_gcp", "gcp", "none"),
        ("distilled_gcp", "gcp", "gsa"),
        ("finetuned_gcp", "gcp", "ft"),
        (f"pruned_{TP_METHOD}", "torch-pruning L2", "none"),
        (f"finetuned_{TP_METHOD}", "torch-pruning L2", "ft"),
    ]:
        row = by_name.get(name)
        if row is None:
            continue
        rows.append(
            {
                "method": method,
                "recovery": recovery,
                "params_cut": 1 - row["params"] / base["params"],
                "macs_cut": 1 - row["macs"] / base["macs"],
                "map50": row["map50"],
                "map": row["map"],
                "ultralytics_map50": row.get("ultralytics_map50"),
                "ultralytics_map": row.get("ultralytics_map"),
                "ort_ms": row.get("median_ms"),
            }
        )
    payload = {
        "base_map50": base["map50"],
        "base_map": base["map"],
        "base_ultralytics_map50": base.get("ultralytics_map50"),
        "base_ultralytics_map": base.get("ultralytics_map"),
        "base_ort_ms": base.get("median_ms"),
        "sparse_map50": by_name.get("sparse", {}).get("map50"),
        "rows": rows,
        "minutes": sum(minutes.values()),
        "stage_minutes": minutes,
        "seed": bench.args.seed,
        "commit": git_revision(),
        "machine": machine(),
        "settings": {
            "base_minutes": bench.args.base_minutes,
            "epochs_sparse": bench.args.epochs_sparse,
            "epochs_recover": bench.args.epochs_recover,
            "macs": bench.args.macs,
            "lr": LR,
        },
    }
    text = section(payload, bench)
    if bench.args.smoke:
        print(json.dumps(payload, indent=1), text, sep="\n")
        return
    atomic_write_json(RESULTS_JSON, payload)
    write_section(TITLE, text)


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def section(payload: dict[str, Any], bench: Bench) -> str:
    """The RESULTS.md text: how it was run, the table, the two targets' verdicts."""
    s = payload["settings"]
    lines = [
        f"Command: `YOLO_OFFLINE=1 python benchmarks/bench_ultralytics.py --run-dir {bench.args.run_dir} "
        f"--epochs-sparse {s['epochs_sparse']} --epochs-recover {s['epochs_recover']}` — seed {payload['seed']}, {now()}, "
        f"commit {payload['commit']}, {payload['machine']}; stage wall times (min): "
        + ", ".join(f"{k} {v:.1f}" for k, v in payload["stage_minutes"].items())
        + f"; total {payload['minutes']:.0f} min. Base: YOLOv8n from `yolov8n.yaml`, {s['base_minutes']:g} min "
        "of Ultralytics' trainer (asset `benchmarks/assets/yolov8n_digits.pt`); "
        f"stage 1 {s['epochs_sparse']} epochs; every recovery {s['epochs_recover']} epochs (AdamW lr {s['lr']}, "
        "batch 32, 256 px, fliplr 0). Test split (500 images); `ours` is gcp's evaluator (conf 0.001, NMS IoU "
        "0.6), `YOLO.val` Ultralytics' own; ONNX Runtime CPU latency at batch 1 (`gcp bench`).",
        "",
        "| model | recovery | params cut | MACs cut | mAP@0.5 ours | mAP@0.5:0.95 ours | mAP@0.5 YOLO.val "
        "| mAP@0.5:0.95 YOLO.val | ORT ms |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| YOLOv8n base | – | – | – | {payload['base_map50']:.3f} | {payload['base_map']:.3f} | "
        f"{_num(payload['base_ultralytics_map50'])} | {_num(payload['base_ultralytics_map'])} | "
        f"{_num(payload['base_ort_ms'], 1)} |",
    ]
    for r in payload["rows"]:
        lines.append(
            f"| {r['method']} | {r['recovery']} | {r['params_cut']:.1%} | {r['macs_cut']:.1%} | {r['map50']:.3f} | "
            f"{r['map']:.3f} | {_num(r['ultralytics_map50'])} | {_num(r['ultralytics_map'])} | "
            f"{_num(r['ort_ms'], 1)} |"
        )
    rows = {(r["method"], r["recovery"]): r for r in payload["rows"]}
    gsa, tp_ft = rows.get(("gcp", "gsa")), rows.get(("torch-pruning L2", "ft"))
    lines += ["", "Targets:", ""]
    if gsa is not None:
        lines.append(
            f"- gcp+GSA ≥ base − 0.02 mAP@0.5: {gsa['map50']:.3f} vs {payload['base_map50'] - 0.02:.3f}: "
            f"{_verdict(gsa['map50'] >= payload['base_map50'] - 0.02)}"
        )
        lines.append(f"- MACs cut ≥ 35 %: {gsa['macs_cut']:.1%}: {_verdict(gsa['macs_cut'] >= 0.35)}")
    if gsa is not None and tp_ft is not None:
        lines.append(
            f"- gcp+GSA ≥ torch-pruning L2 + FT + 0.03: {gsa['map50']:.3f} vs {tp_ft['map50'] + 0.03:.3f}: "
            f"{_verdict(gsa['map50'] >= tp_ft['map50'] + 0.03)}"
        )
    sparse = payload.get("sparse_map50")
    if sparse is not None and sparse > payload["base_map50"]:
        lines += [
            "",
            f"Read with care: stage 1 alone ({s['epochs_sparse']} more epochs) took the unpruned model from "
            f"{payload['base_map50']:.3f} to {sparse:.3f}, so the base is under-trained and the comparison with "
            "it is helped by training time; the torch-pruning row starts from the base, as its recipe does, and "
            f"so had {s['epochs_sparse']} epochs less training in all than gcp (stage 1 + recovery). No dense "
            "control at equal epochs was run for this model.",
        ]
    return "\n".join(lines)


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-dir", default="runs/ultralytics_cpu/seed0")
    parser.add_argument("--stages", nargs="*", default=DEFAULT_STAGES, choices=STAGES)
    parser.add_argument("--root", default=".data/digit_scenes")
    parser.add_argument("--base-minutes", type=float, default=40.0, help="YOLOv8n training budget")
    parser.add_argument("--retrain", action="store_true", help=f"train the base even when {ASSET} exists")
    parser.add_argument("--epochs-sparse", type=int, default=3)
    parser.add_argument("--epochs-recover", type=int, default=3)
    parser.add_argument("--macs", type=float, default=0.4, help="share of the MACs to remove")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="check the script end to end: 48 training images, 1 epoch a stage, a temporary run directory, "
        "no asset and no results written",
    )
    args = parser.parse_args()
    sizes = {"n_train": 3000, "n_val": 500, "n_test": 500}
    if args.smoke:
        scratch = Path(tempfile.mkdtemp(prefix="bench_ultralytics_"))
        args.root, args.run_dir = str(scratch / "digits"), str(scratch / "run")
        args.base_minutes, args.epochs_sparse, args.epochs_recover, args.retrain = 0.2, 1, 1, True
        sizes = {"n_train": 48, "n_val": 16, "n_test": 16}
    voc = make_digit_scenes(args.root, **sizes, size=SIZE, seed=args.seed)
    data_yaml = to_yolo_layout(voc, Path(args.root + "_yolo"))
    bench = Bench(args)
    text = config_text(data_yaml, args)
    if bench.config.is_file() and bench.config.read_text() != text:
        sys.exit(
            f"{bench.config} holds other settings than these; use another --run-dir or the same arguments"
        )
    atomic_write_text(bench.config, text)
    steps = {
        "base": lambda: stage_base(bench),
        "sparse": lambda: bench.gcp("sparse-train", "--resume"),
        "prune": lambda: bench.gcp("prune", "--resume"),
        "distill": lambda: bench.gcp("distill", "--resume"),
        "tp": lambda: stage_tp(bench),
        "finetune": lambda: bench.gcp("finetune", "--resume"),
        "eval": lambda: stage_eval(bench),
        "report": lambda: write_report(bench),
    }
    for stage in args.stages:
        print(f"[{now()}] stage {stage}", flush=True)
        bench.timed(stage, steps[stage])


if __name__ == "__main__":
    main()
