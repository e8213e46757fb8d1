"""The CPU-scale teacher: a reduced YOLOv4 trained from scratch on DigitScenes at 256 px until it converges.

Trains ``yolov4(num_classes=10, width=0.25, depth=0.33)`` on DigitScenes (3,000 train / 500 val / 500 test,
seed 0) for a fixed schedule (``--epochs``: one warm-up epoch, then cosine to 1 % of the lr), scoring the EMA
weights on the validation split after every epoch. Every epoch ends in ``--out/last.pt``; the same command
continues a stopped run (training is resumed by default and refuses a changed schedule). When the schedule is
done it checks convergence — validation mAP@0.5 gained over the last fifth of the epochs below ``--converged``
— draws the validation curve (``benchmarks/figures/teacher_curve.png``), scores the test split, ships the
weights (fp16, tensors only) as the teacher asset and writes the RESULTS.md section and
``benchmarks/results/teacher.json``.

Why converged: a teacher that more training still improves makes every "drop" measured from it mix pruning with
extra training, and lets the distilled student overtake the model that teaches it.

    python benchmarks/train_reference.py --epochs 40

The shipped teacher (0.773 test mAP@0.5, not converged by the rule above, 2026-12-03) was made by
``--epochs 30 --horizontal-flip --extend 12 --ship-unconverged``: 30 epochs with the flip (by mistake, see
RESULTS.md) and a 12-epoch second cycle without it, about 3.7 h of a 2-core AVX2 machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_revision, machine, now, ship_asset, write_section  # noqa: E402

from gcp.core.report import count_macs_params  # noqa: E402
from gcp.detection.data import VOCDataset, make_digit_scenes  # noqa: E402
from gcp.detection.evaluate import evaluate  # noqa: E402
from gcp.detection.models import YOLOV4_ANCHORS, scale_anchors, yolov4  # noqa: E402
from gcp.detection.train import fit  # noqa: E402

SIZE = 256
BATCH = 32
ARCH = {"num_classes": 10, "width": 0.25, "depth": 0.33}
FIGURE = Path(__file__).with_name("figures") / "teacher_curve.png"
RECORD = Path(__file__).with_name("results") / "teacher.json"
#: Issue 25 §1: a model has converged when val mAP@0.5 gains less than this over the last fifth of its epochs.
CONVERGED_GAIN = 0.005


def build_student() -> torch.nn.Module:
    anchors = scale_anchors(YOLOV4_ANCHORS, SIZE / 416).tolist()
    return yolov4(**ARCH, anchors=anchors)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default=".data/digit_scenes")
    parser.add_argument("--out", default="runs/teacher", help="run directory (last.pt, history.json)")
    parser.add_argument("--epochs", type=int, default=40, help="length of the cosine schedule")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--asset", default="gcp/assets/digits_teacher.pt")
    parser.add_argument("--lr", type=float, default=0.001, help="AdamW's lr (betas 0.9/0.999, wd 5e-4)")
    parser.add_argument(
        "--converged",
        type=float,
        default=CONVERGED_GAIN,
        help="converged when val mAP@0.5 gains less than this over the last fifth of the epochs",
    )
    parser.add_argument(
        "--ship",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write the weights to --asset (only when the run converged, unless --ship-unconverged)",
    )
    parser.add_argument("--ship-unconverged", action="store_true")
    parser.add_argument(
        "--horizontal-flip",
        action="store_true",
        help="mirror half the training images in the schedule (off: a mirrored digit is no digit; the flip cost the"
        " first teacher 0.113 mAP@0.5, benchmarks/notes/probes.md); the second cycle never flips",
    )
    parser.add_argument(
        "--extend",
        type=int,
        default=0,
        help="after the schedule, a second cosine cycle of this many epochs from its final weights (no warm-up,"
        " --extend-lr, in --out/extend, resumable): does more training still improve the teacher? The"
        " convergence check then covers the last fifth of both",
    )
    parser.add_argument(
        "--extend-lr", type=float, default=1e-4, help="the second cycle's lr (the benchmarks' stage-1 lr)"
    )
    return parser.parse_args()


def train(
    args: argparse.Namespace, train_set: VOCDataset, val_set: VOCDataset
) -> tuple[torch.nn.Module, dict]:
    """Fit the schedule (resuming ``--out/last.pt`` when it exists), scoring val mAP after every epoch.

    fp32 on purpose: the schedule must resume on any machine of the next session, and bf16 is only faster on
    CPUs with AMX. Channels-last batches change nothing but speed."""
    model = build_student()
    history = _fit(args, model, train_set, val_set, Path(args.out), args.epochs, args.lr, warmup_epochs=1.0)
    return model, history


def extend(
    args: argparse.Namespace,
    model: torch.nn.Module,
    train_set: VOCDataset,
    val_set: VOCDataset,
    history: dict,
) -> dict:
    """The second cycle (``--extend``): cosine from ``--extend-lr`` over ``--extend`` epochs, continuing the
    schedule's final (EMA) weights with a fresh optimiser and EMA. A gain here is what a model trained on from the
    teacher gets — the dense control of the benchmarks — so the check is made where it matters, on unflipped images as they see
    them. Returns the whole
    history, the second cycle's epochs numbered after the first's."""
    more = _fit(
        args,
        model,
        train_set,
        val_set,
        Path(args.out) / "extend",
        args.extend,
        args.extend_lr,
        warmup_epochs=0.0,
    )
    offset = len(history["epoch"])
    more["epoch"] = [offset + epoch for epoch in more["epoch"]]
    return {key: history[key] + more[key] for key in history if key in more}


def _fit(
    args: argparse.Namespace,
    model: torch.nn.Module,
    train_set: VOCDataset,
    val_set: VOCDataset,
    out: Path,
    epochs: int,
    lr: float,
    *,
    warmup_epochs: float,
) -> dict:
    """One cosine cycle into ``out`` (resuming its ``last.pt``), val mAP after every epoch, EMA weights at the end."""
    return fit(
        model,
        train_set,
        epochs=epochs,
        lr=lr,
        optimizer="adamw",
        momentum=0.9,
        batch_size=BATCH,
        warmup_epochs=warmup_epochs,
        ema=True,
        out_dir=out,
        resume=(out / "last.pt").is_file(),
        seed=args.seed,
        eval_fn=lambda m: evaluate(m, val_set, batch_size=16, progress=False, channels_last=True),
        progress=False,
        channels_last=True,
    )


def convergence(curve: list[float], threshold: float) -> dict:
    """Gain of val mAP@0.5 over the last fifth of the schedule (best of the window's end vs its start)."""
    window = max(1, len(curve) // 5)
    start, end = curve[-window - 1], max(curve[-window:])
    gain = end - start
    return {"window_epochs": window, "gain": gain, "converged": gain < threshold, "threshold": threshold}


def plot_curve(
    epochs: Sequence[int],
    map50: Sequence[float],
    map_: Sequence[float],
    verdict: dict,
    path: Path,
    *,
    subject: str,
    weights: str = "EMA weights",
    second_cycle_from: int | None = None,
) -> None:
    """Validation mAP@0.5 and mAP@0.5:0.95 against epoch (1-based), the window ``convergence`` judged shaded and,
    with ``second_cycle_from``, the start of a second cycle marked: the curve RESULTS.md shows for a converged
    model (this teacher, and ``bench_ultralytics``' YOLOv8n base with ``weights`` its own)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.4, 3.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(epochs, map50, marker="o", ms=3, label=f"val mAP@0.5 ({weights})")
    ax.plot(epochs, map_, marker="o", ms=3, label="val mAP@0.5:0.95")
    if verdict["window_epochs"]:
        last = epochs[-1]
        ax.axvspan(
            last - verdict["window_epochs"] + 0.5, last + 0.5, color="grey", alpha=0.15, label="last fifth"
        )
    if second_cycle_from is not None and epochs[-1] > second_cycle_from:
        ax.axvline(
            second_cycle_from + 0.5,
            color="black",
            linestyle=":",
            linewidth=1,
            label="second cycle (--extend)",
        )
    gain = "not judged" if verdict["gain"] is None else f"gain over the last fifth {verdict['gain']:+.3f}"
    ax.set_title(f"{subject} on DigitScenes val: {gain}", fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("mAP")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    wall = time.perf_counter()
    # The commit whose code this invocation runs: read now, not when the hours of training end (the tree may
    # have moved on meanwhile). Epochs resumed from earlier invocations ran earlier commits.
    commit = git_revision()
    torch.manual_seed(args.seed)
    root = make_digit_scenes(args.root, n_train=3000, n_val=500, n_test=500, size=SIZE, seed=args.seed)
    train_set = VOCDataset(root, "train", size=SIZE, augment=True, horizontal_flip=args.horizontal_flip)
    val_set = VOCDataset(root, "val", size=SIZE)
    model, history = train(args, train_set, val_set)
    if args.extend:  # on the images as the benchmarks train on them: never flipped
        plain = VOCDataset(root, "train", size=SIZE, augment=True, horizontal_flip=False)
        history = extend(args, model, plain, val_set, history)
    verdict = convergence(history["metrics/map50"], args.converged)
    plot_curve(
        [e + 1 for e in history["epoch"]],
        history["metrics/map50"],
        history["metrics/map"],
        verdict,
        FIGURE,
        subject="Teacher",
        second_cycle_from=args.epochs,
    )
    test = evaluate(model, VOCDataset(root, "test", size=SIZE), batch_size=16, progress=False)
    macs, params = count_macs_params(model, torch.zeros(1, 3, SIZE, SIZE))
    shipped = args.ship and (verdict["converged"] or args.ship_unconverged)
    if shipped:
        ship_asset(model, test["map50"], Path(args.asset))
    train_minutes = sum(history["seconds"]) / 60
    record = {
        "command": f"python benchmarks/train_reference.py --epochs {args.epochs}"
        + (" --horizontal-flip" if args.horizontal_flip else "")
        + (f" --extend {args.extend} --extend-lr {args.extend_lr:g}" if args.extend else ""),
        "seed": args.seed,
        "date": now(),
        "commit": commit,
        "machine": machine(),
        "epochs": args.epochs,
        "horizontal_flip": args.horizontal_flip,
        "extend": args.extend,
        "extend_lr": args.extend_lr if args.extend else None,
        "train_minutes": round(train_minutes, 1),
        # the pace of an epoch alone on the machine: the sum above includes epochs slowed by other runs
        "median_epoch_seconds": round(statistics.median(history["seconds"]), 1),
        "val_map50": history["metrics/map50"],
        "test_map50": float(test["map50"]),
        "test_map": float(test["map"]),
        "convergence": verdict,
        "shipped_as": args.asset if shipped else None,
        "params": params,
        "macs": macs,
    }
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    RECORD.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in record.items() if k != "val_map50"}), flush=True)
    write_section(
        "CPU-scale teacher: reduced YOLOv4 on DigitScenes, trained to convergence", render(record, wall)
    )


def flip_text(record: dict) -> str:
    if record["horizontal_flip"]:
        return " and horizontal flip (which the benchmarks' stages do not use: a mirrored digit is no digit)"
    return " (no horizontal flip: a mirrored digit is no digit)"


def second_cycle(record: dict) -> str:
    if not record["extend"]:
        return ""
    return (
        f"; then a second cosine cycle of {record['extend']} epochs from lr {record['extend_lr']:g} (no warm-up,"
        " fresh optimiser and EMA, no flip: the benchmarks' own training) to check that more training no longer"
        " improves it"
    )


def render(record: dict, wall: float) -> str:
    verdict = record["convergence"]
    met = "met" if verdict["converged"] else "NOT met"
    usage = (
        f"Shipped as `{record['shipped_as']}` (fp16): the teacher of `gcp demo` and of the benchmarks"
        + ("." if verdict["converged"] else ", although not converged (--ship-unconverged).")
        if record["shipped_as"]
        else "Not shipped (not converged, or --no-ship)."
    )
    return f"""Command: `{record["command"]}` — seed {record["seed"]}, {record["date"]}, commit {record["commit"]},
{record["machine"]}. Training {record["train_minutes"]:.1f} min summed over epochs (a run resumed across sessions
adds each session's epochs; machines may differ, see the commit history of `benchmarks/results/teacher.json`);
this invocation {(time.perf_counter() - wall) / 60:.1f} min; median epoch {record["median_epoch_seconds"]:.0f} s (an epoch alone
on the machine; the sum includes epochs slowed by other runs sharing the 2 cores).

Model: `yolov4(num_classes=10, width=0.25, depth=0.33)`, anchors = YOLOv4's scaled by 256/416;
{record["params"] / 1e6:.2f} M params, {record["macs"] / 1e9:.2f} GMACs at 256×256. Data: DigitScenes 3,000 train /
500 val / 500 test at 256 px. Training: AdamW, lr 0.001, batch {BATCH}, fp32, zoom/shift, colour jitter{flip_text(record)},
1 warm-up epoch then cosine to 1 %, EMA, {record["epochs"]} epochs{second_cycle(record)}.

| split | mAP@0.5 | mAP@0.5:0.95 |
|---|---|---|
| DigitScenes val, last epoch | {record["val_map50"][-1]:.3f} | — |
| DigitScenes test | {record["test_map50"]:.3f} | {record["test_map"]:.3f} |

Convergence (val mAP@0.5 gained over the last {verdict["window_epochs"]} epochs < {verdict["threshold"]}):
{verdict["gain"]:+.4f}, {met}. Curve: `benchmarks/figures/teacher_curve.png`. {usage}"""


if __name__ == "__main__":
    main()
