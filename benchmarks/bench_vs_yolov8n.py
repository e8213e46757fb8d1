"""Ultralytics YOLOv8n trained from scratch on the same DigitScenes split, same budget.

Converts the DigitScenes VOC layout (made by `train_reference.py`, same seed) to YOLO txt labels, trains
`yolov8n.yaml` from scratch with Ultralytics' own trainer for ``--minutes`` (its ``time=`` budget, offline,
no plots), then scores its test-split detections with *our* evaluator (pycocotools, same thresholds as
`gcp.detection.evaluate`) so both models are measured the same way. The table puts it next to our reduced YOLOv4 as
`train_reference.py` left it (``--teacher``, trained for the same number of minutes), evaluated again here.

``--fliplr`` is Ultralytics' horizontal-flip probability. Our reference trains DigitScenes without flips (a
mirrored digit is not a digit of its class), so the like-for-like default is 0; Ultralytics' own default, 0.5,
is the "its own recipe" run. Each setting keeps its result in ``runs/yolov8n/digits_fliplr<p>/result.json``
and the table shows every setting measured so far.

    YOLO_OFFLINE=1 python benchmarks/bench_vs_yolov8n.py --minutes 40
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("YOLO_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_revision, machine, now, write_section  # noqa: E402

from gcp.app.pipeline import load_model  # noqa: E402
from gcp.core.report import count_macs_params  # noqa: E402
from gcp.detection.data import VOCDataset, make_digit_scenes  # noqa: E402
from gcp.detection.evaluate import compute_map, evaluate  # noqa: E402
from gcp.io import atomic_write_json  # noqa: E402

SIZE = 256
RESULTS_DIR = Path("runs/yolov8n")


def result_file(fliplr: float) -> Path:
    """Where the YOLOv8n run with horizontal-flip probability ``fliplr`` keeps its numbers."""
    return RESULTS_DIR / f"digits_fliplr{fliplr:g}" / "result.json"


def to_yolo_layout(voc: Path, out: Path) -> Path:
    """Write images/ + labels/ per split (symlinked images, normalised cxcywh labels) and a data yaml."""
    for split in ("train", "val", "test"):
        data = VOCDataset(voc, split, size=SIZE)
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        for record in data.records:
            src = Path(record.image_path)
            dst = out / "images" / split / src.name
            if not dst.exists():
                dst.symlink_to(src.resolve())
            lines = []
            for (x0, y0, x1, y1), label in zip(record.boxes.tolist(), record.labels.tolist()):
                w, h = record.width, record.height
                lines.append(
                    f"{label} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} {(x1 - x0) / w:.6f} {(y1 - y0) / h:.6f}"
                )
            (out / "labels" / split / (src.stem + ".txt")).write_text("\n".join(lines) + "\n")
    names = VOCDataset(voc, "train", size=SIZE).class_names
    yaml_path = out / "digits.yaml"
    yaml_path.write_text(
        f"path: {out.resolve()}\ntrain: images/train\nval: images/val\ntest: images/test\n"
        + "names:\n"
        + "".join(f"  {i}: '{n}'\n" for i, n in enumerate(names))
    )
    return yaml_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", default=".data/digit_scenes")
    parser.add_argument("--minutes", type=float, default=40.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--teacher",
        default="gcp/assets/digits_teacher.pt",
        help="our reduced YOLOv4 as written by train_reference.py (same seed, same --minutes)",
    )
    parser.add_argument(
        "--fliplr",
        type=float,
        default=0.0,
        help="Ultralytics' horizontal-flip probability (0: as our DigitScenes recipe; 0.5: Ultralytics' default)",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="skip YOLOv8n: take its numbers from the last run with this --fliplr and only re-score --teacher",
    )
    args = parser.parse_args()
    if not 0.0 <= args.fliplr <= 1.0:
        parser.error(f"--fliplr is a probability, got {args.fliplr}")
    if args.reuse and not result_file(args.fliplr).is_file():
        parser.error(f"--reuse needs {result_file(args.fliplr)} from an earlier run without --reuse")
    voc = make_digit_scenes(args.root, n_train=3000, n_val=500, n_test=500, size=SIZE, seed=args.seed)
    test = VOCDataset(voc, "test", size=SIZE)
    if not args.reuse:
        atomic_write_json(result_file(args.fliplr), train_and_score_yolov8n(voc, test, args))
    runs = [
        json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(RESULTS_DIR.glob("digits_fliplr*/result.json"))
    ]
    ours = load_model(args.teacher)
    ours_metrics = evaluate(ours, test, batch_size=16, progress=False)
    ours_macs, ours_params = count_macs_params(ours, torch.zeros(1, 3, SIZE, SIZE))
    write_section(
        "CPU-scale comparison: Ultralytics YOLOv8n on the same DigitScenes split",
        comparison_text(runs, ours_metrics, ours_macs, ours_params, args),
    )
    print({f"yolov8n fliplr {run['fliplr']:g}": run["map50"] for run in runs}, "ours", ours_metrics["map50"])


def comparison_text(
    runs: list[dict], ours_metrics: dict, ours_macs: float, ours_params: float, args: argparse.Namespace
) -> str:
    """The RESULTS.md section: how each YOLOv8n run was made, one table row per run and ours, the verdicts."""
    runs_text = "\n".join(
        f"- `YOLO_OFFLINE=1 python benchmarks/bench_vs_yolov8n.py --minutes {run['budget_minutes']:g} --fliplr"
        f" {run['fliplr']:g}` — seed {run['seed']}, {run['date']}, commit {run['commit']}, {run['machine']}; total"
        f" wall time {run['wall_minutes']:.1f} min (training {run['train_minutes']:.1f} min)."
        for run in runs
    )
    rows = "\n".join(
        f"| YOLOv8n, Ultralytics trainer, fliplr {run['fliplr']:g}, {run['train_minutes']:.0f} min |"
        f" {run['params'] / 1e6:.2f} | {run['macs'] / 1e9:.2f} | {run['map50']:.3f} | {run['map']:.3f} |"
        for run in runs
    )

    def verdicts(key: str) -> str:
        return "; ".join(
            f"{'at least as good as' if ours_metrics[key] >= run[key] else 'WORSE than'} YOLOv8n with"
            f" fliplr {run['fliplr']:g} ({ours_metrics[key]:.3f} vs {run[key]:.3f})"
            for run in runs
        )

    return f"""YOLOv8n runs (Ultralytics from `yolov8n.yaml`, no pretrained weights, its own trainer and augmentation
apart from `fliplr`, 256 px, batch 32, `time=` the budget in hours):
{runs_text}

Test detections of every model are scored with `gcp.detection.evaluate.compute_map` (conf 0.001, NMS IoU 0.6). Our row
re-scored {now()} at commit {git_revision()} (`--teacher {args.teacher}`).

| model | params (M) | GMACs @256 | mAP@0.5 | mAP@0.5:0.95 |
|---|---|---|---|---|
{rows}
| ours: `yolov4(width=0.25, depth=0.33)` (`{args.teacher}`, see its reference section) | {ours_params / 1e6:.2f} | {ours_macs / 1e9:.2f} | {ours_metrics["map50"]:.3f} | {ours_metrics["map"]:.3f} |

Our row's training ran on the machine its own section names; where that differs from a YOLOv8n run's, "equal
wall time" is only roughly equal compute. At equal wall time ours is, on mAP@0.5 (the metric the target names), {verdicts("map50")}; on mAP@0.5:0.95, {verdicts("map")}. Every row is one training run with
one seed; how far another seed would move them was not measured."""


def train_and_score_yolov8n(voc: Path, test: VOCDataset, args: argparse.Namespace) -> dict:
    """Train YOLOv8n with Ultralytics' trainer for ``args.minutes`` and score its test detections with our
    evaluator; returns the numbers the table needs, so that ``--reuse`` can re-score ours without retraining."""
    from ultralytics import YOLO

    wall = time.perf_counter()
    data_yaml = to_yolo_layout(voc, Path(args.root + "_yolo"))
    model = YOLO("yolov8n.yaml")
    start = time.perf_counter()
    model.train(
        data=str(data_yaml),
        imgsz=SIZE,
        epochs=100,
        time=args.minutes / 60,
        batch=32,
        workers=0,
        device="cpu",
        plots=False,
        seed=args.seed,
        project=str(RESULTS_DIR),
        name=result_file(args.fliplr).parent.name,
        fliplr=args.fliplr,
        exist_ok=True,
        pretrained=False,
        amp=False,
        val=True,
        verbose=False,
    )
    train_minutes = (time.perf_counter() - start) / 60
    predictions, targets = [], []
    for index, record in enumerate(test.records):
        result = model.predict(
            str(record.image_path), imgsz=SIZE, conf=0.001, iou=0.6, max_det=300, verbose=False
        )[0]
        predictions.append(
            {
                "boxes": result.boxes.xyxy.cpu(),
                "scores": result.boxes.conf.cpu(),
                "labels": result.boxes.cls.long().cpu(),
            }
        )
        targets.append({"boxes": record.boxes, "labels": record.labels, "image_id": index})
    metrics = compute_map(predictions, targets, test.num_classes, test.class_names)
    macs, params = count_macs_params(model.model.float().eval(), torch.zeros(1, 3, SIZE, SIZE))
    return {
        "map50": metrics["map50"],
        "map": metrics["map"],
        "params": params,
        "macs": macs,
        "train_minutes": train_minutes,
        "wall_minutes": (time.perf_counter() - wall) / 60,
        "budget_minutes": args.minutes,
        "fliplr": args.fliplr,
        "seed": args.seed,
        "date": now(),
        "commit": git_revision(),
        "machine": machine(),
    }


if __name__ == "__main__":
    main()
