"""The method on an Ultralytics YOLOv8n through Ultralytics' own trainer, against its peers on equal terms:
from one converged base, at ``--macs`` of the MACs removed, every row trained the same epochs after the base.

On DigitScenes in the YOLO layout (3,000 train / 500 val / 500 test at 256 px, data seed 0 whatever ``--seed``:
the split of ``bench_vs_yolov8n.py``), every stage runs the ``gcp`` command (or, where no command does what a
row needs, the pipeline function the command runs) with ``model.name: ultralytics``, as a user of their own
model would. Every training stage is Ultralytics' trainer at the lr its ``optimizer=auto`` picks for this run
(AdamW, lr0 = 0.002 · 5 / (4 + 10)), batch 32, fliplr 0.

1. ``base``: the converged base, shared by every seed like a teacher. YOLOv8n from ``yolov8n.yaml``, no
   pretrained weights, trained with seed 0 for ``--base-epochs`` (a fixed schedule: Ultralytics' linear lr decay
   over those epochs, 3 warm-up epochs, mosaic closed for the last 10) by ``gcp train`` in ``--base-dir``
   (default ``runs/ultralytics_cpu/base_e<epochs>``), resumable. When the schedule is done it reads Ultralytics'
   per-epoch validation mAP@0.5 (``<base-dir>/fits/train/results.csv``, the EMA weights on the val split) and
   calls the base converged when the best mAP@0.5 of the last fifth of the epochs gains less than
   ``--converged`` over the epoch before that fifth (``train_reference.convergence``, the rule of gcp's own
   teacher). The curve and verdict go to ``benchmarks/results/yolov8n_base.json`` and
   ``benchmarks/figures/yolov8n_base_curve.png``; the weights become the asset
   ``benchmarks/assets/yolov8n_digits.pt`` only when converged (or with ``--ship-unconverged``), and the rows do
   not start from an unconverged base unless ``--ship-unconverged`` says so. Later runs (other seeds, other
   checkouts) copy the asset instead of training only when ``yolov8n_base.json`` says it converged and holds
   the asset's SHA-256, or with ``--ship-unconverged`` when it says the asset was shipped unconverged. The
   shipped base (2026-12-04) is 60 epochs on a lent H200 (``--device cuda --workers 12 --base-epochs 60``,
   5.3 min): val mAP@0.5 0.932, still gaining 0.010 over its last fifth, so not converged by the rule, and the
   rows go on from it only with ``--ship-unconverged``.
2. ``dense``: the dense control: the base trained E = ``--epochs-sparse`` + ``--epochs-recover`` more epochs with
   the recovery's settings (Ultralytics' trainer, same lr, no warm-up) → ``dense.pt``. No ``gcp`` command trains
   an unpruned model file further (``gcp finetune`` takes ``pruned_<method>.pt``, ``gcp train`` starts a run
   from ``model.weights`` into ``trained.pt``), so the stage calls what ``gcp finetune`` calls, the model
   family's ``fit``, on ``trained.pt`` with ``finetune.epochs`` = E, in ``fits/dense/``.
3. ``sparse``: stage 1, ``gcp sparse-train`` for ``--epochs-sparse`` (``gcp.DynamicSparsity`` inside
   Ultralytics' step) → ``sparse.pt``;
4. ``prune``: stage 2 at ``--macs`` of the MACs, both from ``sparse.pt``: ``gcp prune`` (group thresholds) →
   ``pruned_gcp.pt`` and ``gcp prune --method slim`` (Network Slimming's one global γ threshold) →
   ``pruned_slim.pt``;
5. ``distill``: stage 3, ``gcp distill`` for ``--epochs-recover`` (group spatial attention distillation taught by
   the base; Ultralytics' loss is L_hard) → ``distilled_gcp.pt`` (the gcp + GSA row);
6. ``finetune``: ``gcp finetune`` for ``--epochs-recover`` of ``pruned_gcp.pt`` → ``finetuned_gcp.pt`` (gcp + FT,
   what GSA adds) and of ``pruned_slim.pt`` → ``finetuned_slim.pt`` (slim + FT);
7. ``tp``: torch-pruning's YOLOv8 recipe on the base: C2f split into its branch form
   (``gcp.adapters.ultralytics.split_blocks``, as torch-pruning's example replaces C2f), its ``MagnitudePruner``
   with L2 group magnitude importance, iterative as in its example: ``--tp-rounds`` R rounds, round k stepping
   the pruner until k/R of gcp's achieved MACs cut is gone (``common.tp_prune``) and then fine-tuning for its
   share of the E epochs (6 over 3 rounds: 2 each), the next round pruning that fine-tuned model. The row has
   no stage 1, so its E epochs are all fine-tuning. Round k's files are ``pruned_tpl2_round<k>.pt`` and
   ``finetuned_tpl2_round<k>.pt``; the last round's are the row's ``pruned_tpl2.pt`` (its last pruning, before
   that round's fine-tuning) and ``finetuned_tpl2.pt``; the pruning records are chained
   (``PruneResult.following``), so gcp's weights-only files replay every round on the base;
8. ``eval``: ``gcp eval`` on the test split (gcp's evaluator and ``YOLO.val``) and ``gcp bench latency`` (ONNX
   Runtime, batch 1, the architectures timed round-robin) of every model file above; the measurements (per row
   map50, map, ultralytics_map50, ultralytics_map, params_cut, macs_cut, ort_ms, commit, machine, date) go to
   ``benchmarks/results/ultralytics_cpu_measurements_seed<N>.json``;
9. ``report``: every seed's measurements file (``--seeds`` picks some) aggregated into
   ``benchmarks/results/ultralytics_cpu.json`` (``teacher_map50``, ``seeds``, ``rows`` of {method, recovery,
   params_cut, macs_cut, map50, map, ...} with one value per seed in the order of ``seeds``, mean ± sd, gcp +
   GSA's paired difference to the row ± its standard error, ``targets``, ``commit``, ``machine``, ``minutes``)
   and the RESULTS.md section, which leads with the aggregate table and each target met, missed or not
   measured. Rows measured on a CPU and on a GPU are never averaged together.

Every row is E epochs of training after the base: dense E; gcp + GSA, gcp + FT and slim + FT ``--epochs-sparse``
of stage 1 then ``--epochs-recover`` of recovery; torch-pruning E of fine-tuning.

``--seed`` changes the training's data order and augmentation (the data, the base and the pruning rule stay);
each seed has its run directory (default ``runs/ultralytics_cpu/seed<N>``). Each stage leaves its files there and
is skipped when they are; interrupted training resumes from Ultralytics' ``last.pt`` (the ``gcp`` command's
``--resume``), so the benchmark can be split across sessions by running the same command again.

Compute, an estimate from the earlier runs on 2 AVX-512 cores (one YOLOv8n epoch ≈ 6.5 min, a pruned one ≈ 5.5,
a stage-1 epoch ≈ 11, a distillation epoch ≈ 9): the base once, 30 epochs ≈ 3.3 h; then per seed with the
defaults (E = 6) dense ≈ 40 min, stage 1 ≈ 35, GSA ≈ 27, the three FT rows ≈ 70, eval and latency ≈ 10: about
3 h a seed.

    YOLO_OFFLINE=1 python benchmarks/bench_ultralytics.py                    # seed 0, everything
    YOLO_OFFLINE=1 python benchmarks/bench_ultralytics.py --seed 1           # another seed (same base)
    YOLO_OFFLINE=1 python benchmarks/bench_ultralytics.py --stages base      # a part
    YOLO_OFFLINE=1 python benchmarks/bench_ultralytics.py --stages report --seeds 0 1   # the report alone
    YOLO_OFFLINE=1 python benchmarks/bench_ultralytics.py --smoke            # the script end to end, tiny
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("YOLO_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_yolov8n import SIZE, to_yolo_layout  # noqa: E402
from common import (  # noqa: E402
    device_kind,
    git_revision,
    machine,
    mean_sd,
    now,
    paired,
    tp_prune,
    write_section,
)
from train_reference import CONVERGED_GAIN, convergence, plot_curve  # noqa: E402

from gcp.app.plots import overall_sparse_fraction  # noqa: E402
from gcp.detection.data import make_digit_scenes  # noqa: E402
from gcp.io import atomic_write_json, atomic_write_text, file_sha256  # noqa: E402

HERE = Path(__file__).resolve().parent
STAGES = ["base", "dense", "sparse", "prune", "distill", "finetune", "tp", "eval", "report"]
ASSET = HERE / "assets" / "yolov8n_digits.pt"
RESULTS_DIR = HERE / "results"
FIGURES_DIR = HERE / "figures"
RESULTS_NAME = "ultralytics_cpu.json"
BASE_NAME = "yolov8n_base.json"
CURVE_NAME = "yolov8n_base_curve.png"
SEED_FILE = re.compile(r"ultralytics_cpu_measurements_seed(\d+)\.json")
TITLE = "The method on an Ultralytics YOLOv8n, through Ultralytics' trainer"
TP_METHOD = "tpl2"  # the file names of torch-pruning's row: pruned_tpl2.pt, finetuned_tpl2.pt
DENSE_FILE = "dense"  # the dense control: dense.pt
# Ultralytics' optimizer=auto for this run (fewer than 10,000 iterations, 10 classes): AdamW at
# lr0 = 0.002 · 5 / (4 + nc), momentum 0.9; every stage uses it so that only the stage's purpose differs.
NUM_CLASSES = 10
LR = round(0.002 * 5 / (4 + NUM_CLASSES), 6)
BATCH = 32
FIT = f"optimizer: adamw, lr: {LR}, momentum: 0.9, batch_size: {BATCH}"
#: Each model file of a seed's run and the measurement it is recorded as.
MEASURED = {
    "trained": "base",
    "sparse": "sparse",
    DENSE_FILE: "dense",
    "pruned_gcp": "pruned_gcp",
    "distilled_gcp": "gcp_gsa",
    "finetuned_gcp": "gcp_ft",
    "pruned_slim": "pruned_slim",
    "finetuned_slim": "slim_ft",
    f"pruned_{TP_METHOD}": "pruned_tp_magnitude",
    f"finetuned_{TP_METHOD}": "tp_magnitude_ft",
}
GSA = ("gcp", "gsa")
DENSE = ("dense", "none")
#: The rows compared: gcp + GSA first (every pair compares it), the dense control last.
ROWS = (GSA, ("gcp", "ft"), ("slim", "ft"), ("tp_magnitude", "ft"), DENSE)
LABELS = {
    GSA: "gcp + GSA",
    ("gcp", "ft"): "gcp + FT",
    ("slim", "ft"): "slim + FT",
    ("tp_magnitude", "ft"): "torch-pruning L2 + FT",
    DENSE: "dense control",
}
#: Issue 25's margins: gcp + GSA within this of the dense control, and this above every other pruned row.
DENSE_MARGIN = 0.02
PEER_MARGIN = 0.03


def row_key(method: str, recovery: str) -> str:
    """The measurement a row of the aggregate reads: ``dense``, ``gcp_gsa``, ``slim_ft``, ..."""
    return "dense" if (method, recovery) == DENSE else f"{method}_{recovery}"


# ----------------------------------------------------------------------------------------- configs and runs


def _data_and_model(data_yaml: Path, args: argparse.Namespace) -> str:
    return f"""device: {args.device}
data: {{format: yolo, yaml: {data_yaml.resolve()}, size: {SIZE}, num_workers: {args.workers}}}
model:
  name: ultralytics
  weights: yolov8n.yaml
  num_classes: {NUM_CLASSES}
  train_args: {{fliplr: 0.0, plots: false, amp: false}}
eval: {{split: test, batch_size: 16}}
"""


def base_config_text(data_yaml: Path, args: argparse.Namespace) -> str:
    """The base's run: YOLOv8n from ``yolov8n.yaml`` trained with seed 0 for ``--base-epochs``."""
    return f"""# bench_ultralytics: the base, shared by every seed
seed: 0
{_data_and_model(data_yaml, args)}train: {{epochs: {args.base_epochs}, {FIT}, warmup_epochs: 3}}
"""


def config_text(data_yaml: Path, args: argparse.Namespace) -> str:
    """A seed's run: the stages after the base (its ``trained.pt`` is the base, copied in by the base stage)."""
    total = args.epochs_sparse + args.epochs_recover
    return f"""# bench_ultralytics, equal epochs: the dense and torch-pruning rows fine-tune for {total} epochs
seed: {args.seed}
{_data_and_model(data_yaml, args)}sparsity: {{epochs: {args.epochs_sparse}, {FIT}, warmup_epochs: 0, schedule: dynamic, mechanism: layer_relative}}
prune: {{method: gcp, ratio: {args.macs}, budget: macs}}
finetune: {{epochs: {args.epochs_recover}, {FIT}, warmup_epochs: 0}}
distill: {{epochs: {args.epochs_recover}, {FIT}, warmup_epochs: 0}}
"""


class Bench:
    """A run directory, its config and the ``gcp`` command on it."""

    def __init__(self, args: argparse.Namespace, run: Path, text: str) -> None:
        self.args = args
        self.run = run
        self.run.mkdir(parents=True, exist_ok=True)
        self.config = self.run / "bench.yaml"
        self.minutes_file = self.run / "stage_minutes.json"
        if self.config.is_file() and self.config.read_text() != text:
            sys.exit(
                f"{self.config} holds other settings than these; use another directory or the same arguments"
            )
        atomic_write_text(self.config, text)
        # The commit this invocation runs, read at launch as bench_method does: measurements recorded hours
        # later must not carry a commit the tree moved to meanwhile.
        self.commit = git_revision()

    def path(self, name: str) -> Path:
        return self.run / name

    def gcp(self, command: str, *extra: str) -> None:
        """``gcp <command>`` on the run (resuming what an earlier invocation left), output into the log."""
        argv = [sys.executable, "-m", "gcp.app.cli", command, *extra]
        argv += ["--config", str(self.config), "--run-dir", str(self.run), "--no-progress"]
        print("$", " ".join(argv[2:]), flush=True)
        subprocess.run(argv, check=True)

    def context(self, *overrides: str) -> Any:
        """The pipeline's context on this run (resuming), with ``overrides`` (``key=value``) on its config."""
        from gcp.app.config import load_config
        from gcp.app.pipeline import Context, RunDir

        config, _ = load_config(str(self.config), list(overrides))
        return Context(config, RunDir(self.run), resume=True, progress=False)

    def minutes(self) -> dict[str, float]:
        return json.loads(self.minutes_file.read_text()) if self.minutes_file.is_file() else {}

    def timed(self, stage: str, body: Callable[[], Any]) -> None:
        """Run ``body`` and add its wall minutes to the stage's record."""
        start = time.perf_counter()
        body()
        minutes = self.minutes()
        minutes[stage] = minutes.get(stage, 0.0) + (time.perf_counter() - start) / 60
        atomic_write_json(self.minutes_file, minutes)


class Places:
    """Where the benchmark's records go: the repository's, or a scratch directory's for ``--smoke``."""

    def __init__(self, scratch: Path | None = None) -> None:
        self.smoke = scratch is not None
        self.results = scratch / "results" if scratch else RESULTS_DIR
        self.figures = scratch / "figures" if scratch else FIGURES_DIR
        self.asset = None if scratch else ASSET  # a smoke run ships nothing

    @property
    def base_record(self) -> Path:
        return self.results / BASE_NAME

    @property
    def curve(self) -> Path:
        return self.figures / CURVE_NAME

    @property
    def aggregate(self) -> Path:
        return self.results / RESULTS_NAME

    def seed_file(self, seed: int) -> Path:
        return self.results / f"ultralytics_cpu_measurements_seed{seed}.json"


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


# ------------------------------------------------------------------------------------------------- the base


def read_results_csv(path: Path) -> dict[str, list[float]]:
    """Ultralytics' ``results.csv`` as ``epoch``, ``map50`` and ``map`` lists (validation, per epoch, in epoch
    order); an epoch written twice (a resumed run repeating it) keeps its last row."""
    by_epoch: dict[int, tuple[float, float]] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            row = {key.strip(): value.strip() for key, value in row.items() if key}
            by_epoch[int(float(row["epoch"]))] = (
                float(row["metrics/mAP50(B)"]),
                float(row["metrics/mAP50-95(B)"]),
            )
    epochs = sorted(by_epoch)
    return {
        "epoch": epochs,
        "map50": [by_epoch[e][0] for e in epochs],
        "map": [by_epoch[e][1] for e in epochs],
    }


def base_verdict(curve: Sequence[float], epochs: int, threshold: float) -> dict[str, Any]:
    """Whether the base's validation mAP@0.5 stopped improving: the gain of the last fifth of the schedule
    (``train_reference.convergence``) below ``threshold``. A schedule not run to its end, or too short to have
    an epoch before its last fifth, is not converged (``gain`` None), nor is a curve that never left 0."""
    if len(curve) < epochs or len(curve) < 2:
        reason = f"{len(curve)} of {epochs} epochs run" if len(curve) < epochs else "too few epochs to judge"
        return {
            "window_epochs": None,
            "gain": None,
            "threshold": threshold,
            "converged": False,
            "why": reason,
        }
    verdict = {**convergence(list(curve), threshold), "why": None}
    if max(curve) <= 0:  # flat because nothing was learnt, not because learning stopped
        verdict.update(converged=False, why="val mAP@0.5 never above 0")
    return verdict


def reusable_asset(places: Places, *, unconverged: bool = False) -> bool:
    """Whether the shipped asset is the recorded base: the base record holds the asset's hash and says it
    converged, or, with ``unconverged`` (``--ship-unconverged``), says it was shipped unconverged. Either way
    the seeds record the base's verdict (``seed_settings``), and the report states it."""
    record = read_json(places.base_record)
    asset = places.asset
    return bool(
        asset is not None
        and asset.is_file()
        and record.get("asset_sha256") == file_sha256(asset)
        and (record.get("converged") or (unconverged and record.get("shipped")))
    )


def stage_base(bench: Bench, base: Bench, places: Places) -> None:
    """The converged base → the run's ``trained.pt``: the shipped asset when its record says it converged (and
    not ``--retrain``), else ``gcp train`` in the base directory, judged, recorded and maybe shipped."""
    args, trained = bench.args, bench.path("trained.pt")
    if trained.is_file():
        return
    if not args.retrain and reusable_asset(places, unconverged=args.ship_unconverged):
        print(f"base: the shipped asset {places.asset} (see {places.base_record})", flush=True)
        shutil.copyfile(places.asset, trained)
        return
    base.timed("train", lambda: base.gcp("train", "--resume"))
    record = judge_base(base, places)
    if not record["converged"] and not (args.ship_unconverged or places.smoke):
        why = record["why"] or f"gain {record['gain']:+.4f} over the last fifth"
        sys.exit(
            f"base: not converged ({why}, threshold {record['threshold']}): train a longer schedule "
            "(--base-epochs, a new base directory) or pass --ship-unconverged to go on from it"
        )
    shutil.copyfile(base.path("trained.pt"), trained)


def judge_base(base: Bench, places: Places) -> dict[str, Any]:
    """The base's curve and convergence verdict into the base record and the figure; the weights into the asset
    when converged (or ``--ship-unconverged``; never in a smoke run)."""
    args = base.args
    curve = read_results_csv(base.path("fits/train/results.csv"))
    verdict = base_verdict(curve["map50"], args.base_epochs, args.converged)
    plot_curve(
        curve["epoch"],
        curve["map50"],
        curve["map"],
        verdict,
        places.curve,
        subject="YOLOv8n base",
        weights="Ultralytics' EMA weights",
    )
    weights = base.path("trained.pt")
    record: dict[str, Any] = {
        "model": "YOLOv8n from yolov8n.yaml, Ultralytics' trainer",
        "epochs": args.base_epochs,
        "curve": curve,
        **verdict,
        "base_dir": str(base.run),
        "figure": str(places.curve),
        "shipped": False,
        "asset_sha256": None,
        "weights_sha256": file_sha256(weights),
        "minutes": base.minutes().get("train"),
        "settings": {
            "lr": LR,
            "batch": BATCH,
            "size": SIZE,
            "warmup_epochs": 3,
            "seed": 0,
            "device": args.device,
            "workers": args.workers,
        },
        "commit": base.commit,
        "machine": machine(args.device),
        "date": now(),
    }
    if places.asset is not None and (verdict["converged"] or args.ship_unconverged):
        places.asset.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(weights, places.asset)
        record.update(shipped=True, asset_sha256=file_sha256(places.asset))
    atomic_write_json(places.base_record, record)
    gain = "—" if record["gain"] is None else f"{record['gain']:+.4f}"
    print(f"base: converged {record['converged']} (gain {gain}), shipped {record['shipped']}", flush=True)
    return record


# ----------------------------------------------------------------------------------------------- the rows


def total_epochs(args: argparse.Namespace) -> int:
    return args.epochs_sparse + args.epochs_recover


def stage_dense(bench: Bench) -> None:
    """The dense control: the base trained E more epochs with the recovery's settings → dense.pt."""
    from gcp.app.pipeline import prepare_data, stage_log

    output = bench.path(f"{DENSE_FILE}.pt")
    if output.is_file():
        return
    ctx = bench.context(f"finetune.epochs={total_epochs(bench.args)}")
    with stage_log(ctx, "dense-control"):
        prepare_data(ctx.config)
        model = ctx.family.load(bench.path("trained.pt"))
        ctx.family.fit(ctx, model, ctx.config.finetune, "dense", output)


def round_epochs(total: int, rounds: int) -> list[int]:
    """The E epochs of torch-pruning's row split over its rounds as evenly as whole epochs allow, the later
    rounds (the smaller models) taking the remainder: 6 over 3 → [2, 2, 2], 7 over 3 → [2, 2, 3]."""
    if not 1 <= rounds <= total:
        raise ValueError(f"--tp-rounds must be between 1 and the row's {total} epochs, not {rounds}")
    return [total // rounds + (k >= rounds - total % rounds) for k in range(rounds)]


def tp_round_method(k: int, rounds: int) -> str:
    """The pipeline's method name of round ``k`` (1-based): its files are pruned_<name>.pt and
    finetuned_<name>.pt; the last round's are the row's pruned_tpl2.pt and finetuned_tpl2.pt."""
    return TP_METHOD if k == rounds else f"{TP_METHOD}_round{k}"


def stage_tp(bench: Bench) -> None:
    """torch-pruning's YOLOv8 recipe, iterative as in its example: ``--tp-rounds`` rounds, each stepping the L2
    MagnitudePruner until k/R of gcp's achieved MACs cut (of the base) is gone, then fine-tuning with the
    round's share of the E epochs (``round_epochs``), the next round starting from that fine-tuned model. The
    last round's files are the row's: pruned_tpl2.pt (its last pruning, before its fine-tuning) and
    finetuned_tpl2.pt. Each round's files are kept, so an interrupted row resumes at its round."""
    from gcp.app.pipeline import finetune_stage

    rounds = bench.args.tp_rounds
    epochs = round_epochs(total_epochs(bench.args), rounds)
    record = bench.path("prune_gcp.json")
    if not record.is_file():
        raise SystemExit(
            f"stage tp: it removes the MACs share gcp's pruning achieved, read from {record}, which the prune "
            "stage writes; run the prune stage first (--stages sparse prune tp, or every stage)"
        )
    target = json.loads(record.read_text(encoding="utf-8"))["achieved"]
    source = bench.path("trained.pt")
    for k in range(1, rounds + 1):
        method = tp_round_method(k, rounds)
        ctx = bench.context(f"finetune.epochs={epochs[k - 1]}")
        if not ctx.run.pruned(method).is_file():
            tp_round(bench, ctx, source, method, target * k / rounds)
        source = finetune_stage(ctx, method)


def tp_round(bench: Bench, ctx: Any, source: Path, method: str, cut: float) -> None:
    """One pruning of torch-pruning's row: ``source`` (the base, split as torch-pruning's YOLOv8 example
    replaces C2f, or the previous round's fine-tuned model) stepped until ``cut`` of the base's MACs are gone
    → pruned_<method>.pt, its pruning record chained to the earlier rounds' so that gcp's weights-only format
    replays them all on the base."""
    from gcp.adapters.ultralytics import split_blocks
    from gcp.app.ultralytics.trainer import PRUNING_RECORD
    from gcp.core.report import count_macs_params

    model = ctx.family.load(source)
    earlier = getattr(model, PRUNING_RECORD, None)
    if earlier is None:
        split_blocks(model)
    macs, _ = count_macs_params(model.eval(), ctx.example_inputs)
    base_macs = earlier["report"]["macs"]["before"] if earlier else macs
    result = tp_prune(model, ctx.example_inputs, "tp_magnitude", 1 - base_macs * (1 - cut) / macs)
    result.adapter = "ultralytics"
    if earlier:
        result = result.following(earlier["history"], earlier["report"])
    atomic_write_json(bench.path(f"prune_{method}.json"), result.report)
    ctx.family.save_pruned(result, ctx.run.pruned(method), bench.path("trained.pt"))


def model_files(bench: Bench) -> list[Path]:
    """The run's model files that are measured, in ``MEASURED`` order."""
    return [bench.path(f"{name}.pt") for name in MEASURED if bench.path(f"{name}.pt").is_file()]


def stage_eval(bench: Bench) -> None:
    """gcp's evaluator and YOLO.val on the test split, and ONNX Runtime latency, of every model of the run
    into report.json."""
    checkpoints = [arg for path in model_files(bench) for arg in ("--checkpoint", str(path))]
    bench.gcp("eval", *checkpoints)
    bench.gcp("bench", "latency", "--runs", "30", *checkpoints)


def seed_settings(bench: Bench) -> dict[str, Any]:
    """What a seed's measurements were made with; a seed file made with others is not added to."""
    args, base = bench.args, read_json(bench.path("base_record.json"))
    return {
        "epochs_sparse": args.epochs_sparse,
        "epochs_recover": args.epochs_recover,
        "total_epochs": total_epochs(args),
        "macs": args.macs,
        "tp_rounds": args.tp_rounds,
        "lr": LR,
        "batch": BATCH,
        "size": SIZE,
        "base_sha256": file_sha256(bench.path("trained.pt")),
        "base": {key: base.get(key) for key in ("epochs", "converged", "gain", "threshold", "shipped")},
    }


def record_measurements(bench: Bench, places: Places) -> dict[str, Any]:
    """The eval stage's report.json rows → the seed's measurements file (rows by ``MEASURED`` key, each with
    the commit, machine and date it was measured at, merged into what the file holds)."""
    report = json.loads(bench.path("report.json").read_text(encoding="utf-8"))
    by_name = {row["name"]: row for row in report["rows"]}
    base = by_name["trained"]
    where = {"commit": bench.commit, "machine": machine(bench.args.device), "date": now()}
    path = places.seed_file(bench.args.seed)
    results = read_json(path) or {"seed": bench.args.seed, "rows": {}}
    settings = seed_settings(bench)
    if results.get("settings", settings) != settings:
        sys.exit(
            f"{path} holds measurements made with other settings ({results['settings']}); move it away or run "
            "with those settings"
        )
    for file in model_files(bench):
        row = by_name.get(file.stem)
        if row is None:
            continue
        results["rows"][MEASURED[file.stem]] = {
            "file": file.name,
            "map50": row["map50"],
            "map": row["map"],
            "ultralytics_map50": row.get("ultralytics_map50"),
            "ultralytics_map": row.get("ultralytics_map"),
            "params_cut": 1 - row["params"] / base["params"],
            "macs_cut": 1 - row["macs"] / base["macs"],
            "ort_ms": row.get("median_ms"),
            **where,
        }
    if "sparse" in results["rows"]:
        results["rows"]["sparse"]["sparse_fraction"] = sparse_fraction(bench.path("sparsity_history.json"))
    cuts = group_cuts(bench)
    if cuts:
        results["group_cuts"] = cuts
    results.update(settings=settings, wall_minutes=bench.minutes())
    places.results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, results)
    print(f"[{now()}] measurements of seed {bench.args.seed} → {path}", flush=True)
    return results


def sparse_fraction(history: Path) -> float | None:
    """The share of all γ below 1e-2 at the end of stage 1 (issue 25's ``sparse_fraction_below_1e-2``), from
    the ``final`` per-group statistics ``gcp sparse-train`` writes of the γ sparse.pt holds."""
    final = read_json(history).get("final")
    return overall_sparse_fraction(final) if final else None


def group_cuts(bench: Bench) -> dict[str, dict[str, float]]:
    """The share of each of gcp's groups' channels that gcp and slim (one global threshold) removed, from the
    two prune reports: where the group thresholds (§4.2.2) and the global one part ways. Empty until both
    methods pruned."""
    reports = {method: read_json(bench.path(f"prune_{method}.json")) for method in ("gcp", "slim")}
    if not all(reports.values()):
        return {}
    layers = {method: {layer["name"]: layer for layer in r["layers"]} for method, r in reports.items()}

    def cut(method: str, names: Sequence[str]) -> float:
        before = sum(layers[method][name]["before"] for name in names)
        return 1 - sum(layers[method][name]["after"] for name in names) / before

    return {
        group["name"]: {method: cut(method, group["layers"]) for method in layers}
        for group in reports["gcp"]["groups"]
    }


# ------------------------------------------------------------------------------------------ the seeds together


def seed_measurements(results_dir: Path, seeds: Sequence[int] | None = None) -> dict[int, dict[str, Any]]:
    """Every seed's measurements file in ``results_dir`` with a measured row, by increasing seed; only
    ``seeds`` when given."""
    found: dict[int, dict[str, Any]] = {}
    for path in results_dir.glob("ultralytics_cpu_measurements_seed*.json"):
        match = SEED_FILE.fullmatch(path.name)
        if match:
            found[int(match.group(1))] = json.loads(path.read_text(encoding="utf-8"))
    missing = [seed for seed in seeds or [] if not found.get(seed, {}).get("rows")]
    if missing:
        print(f"report: no measurements for seeds {missing}: left out", flush=True)
    return {
        seed: found[seed]
        for seed in sorted(found)
        if found[seed].get("rows") and (seeds is None or seed in seeds)
    }


def device_kinds(values: Sequence[Sequence[Any]], machines: Sequence[Sequence[str | None]]) -> set[str]:
    """The kinds (cpu, gpu) of the machines of the seeds where every one of ``values`` is measured."""
    return {
        device_kind(where[i])
        for i in range(len(values[0]))
        if all(series[i] is not None for series in values)
        for where in machines
    }


def aggregate_row(results: list[dict[str, Any]], method: str, recovery: str) -> dict[str, Any]:
    """One row: its measurements per seed (None where a seed lacks it), the mean ± sd of its mAP@0.5 (not
    taken over CPU and GPU seeds together), and the cuts as means over the seeds (the dense control: 0)."""
    key, dense = row_key(method, recovery), (method, recovery) == DENSE

    def each(field: str) -> list[Any]:
        return [r["rows"].get(key, {}).get(field) for r in results]

    map50, machines = each("map50"), each("machine")
    mixed = len(device_kinds([map50], [machines])) > 1
    mean, sd, n = mean_sd(map50)
    return {
        "method": method,
        "recovery": recovery,
        "params_cut": 0.0 if dense else mean_sd(each("params_cut"))[0],
        "macs_cut": 0.0 if dense else mean_sd(each("macs_cut"))[0],
        "map50": map50,
        "map": each("map"),
        "ultralytics_map50": each("ultralytics_map50"),
        "ultralytics_map": each("ultralytics_map"),
        "ort_ms": each("ort_ms"),
        "commit": each("commit"),
        "machine": machines,
        "map50_mean": None if mixed else mean,
        "map50_sd": None if mixed else sd,
        "n": n,
        "mixed_devices": mixed,
    }


def pair(gsa: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """gcp + GSA − ``row`` on the seeds that measured both: mean paired difference, its standard error, the
    number of pairs; not computed over CPU and GPU seeds together."""
    kinds = device_kinds([gsa["map50"], row["map50"]], [gsa["machine"], row["machine"]])
    d, se, n = paired(gsa["map50"], row["map50"])
    if len(kinds) > 1:
        return {"mean": None, "se": None, "n": n, "mixed_devices": True}
    return {"mean": d, "se": se, "n": n, "mixed_devices": False}


def pair_met(
    difference: dict[str, Any] | None, test: Callable[[float, float | None], bool | None]
) -> bool | None:
    """``test(mean, se)`` on a pair, None (not measured) without a pair or its mean."""
    if difference is None or difference["mean"] is None or difference["n"] == 0:
        return None
    return test(difference["mean"], difference["se"])


def combined(results: Sequence[bool | None]) -> bool | None:
    """Missed if any part is, met if every part is (and there is one), else not measured."""
    if any(result is False for result in results):
        return False
    return True if results and all(results) else None


def targets(rows: dict[tuple[str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 25's targets for this benchmark: gcp + GSA ≥ dense control − 0.02 mAP@0.5 (mean over the seeds),
    and gcp + GSA ≥ every other pruned row + 0.03 with the mean paired difference > 2 × its standard error."""
    gsa = rows.get(GSA)

    def against(key: tuple[str, str]) -> dict[str, Any] | None:
        return None if gsa is None or key not in rows else rows[key]["gsa_minus_row"]

    dense = against(DENSE)
    parts = []
    for key in ROWS:
        if key in (GSA, DENSE):
            continue
        difference = against(key)
        met = pair_met(difference, lambda d, se: None if se is None else d >= PEER_MARGIN and d > 2 * se)
        parts.append({"target": f"vs {LABELS[key]}", "met": met, "difference": difference})
    return [
        {
            "target": f"gcp + GSA ≥ dense control − {DENSE_MARGIN} mAP@0.5",
            "met": pair_met(dense, lambda d, se: d >= -DENSE_MARGIN),
            "difference": dense,
        },
        {
            "target": f"gcp + GSA ≥ every other pruned row + {PEER_MARGIN} mAP@0.5, mean paired difference > 2 × SE",
            "met": combined([part["met"] for part in parts]),
            "parts": parts,
        },
    ]


def aggregate(per_seed: dict[int, dict[str, Any]], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """``ultralytics_cpu.json``: every list "per seed" has one value per seed, in the order of ``seeds``."""
    results = list(per_seed.values())

    def first(key: str, field: str) -> Any:
        values = [r["rows"].get(key, {}).get(field) for r in results]
        return next((value for value in values if value is not None), None)

    rows = [
        aggregate_row(results, method, recovery)
        for method, recovery in ROWS
        if any(row_key(method, recovery) in r["rows"] for r in results)
    ]
    by_key = {(row["method"], row["recovery"]): row for row in rows}
    for row in rows:
        gsa = by_key.get(GSA)
        row["gsa_minus_row"] = None if gsa is None or row is gsa else pair(gsa, row)
    return {
        # the base is the same model for every seed: its test scores are the same on each
        "teacher_map50": first("base", "map50"),
        "teacher_map": first("base", "map"),
        "ultralytics_map50": first("base", "ultralytics_map50"),
        "ultralytics_map": first("base", "ultralytics_map"),
        "teacher_ort_ms": first("base", "ort_ms"),
        "base": base or None,
        "seeds": list(per_seed),
        "rows": rows,
        "targets": targets(by_key),
        "sparse_map50": [r["rows"].get("sparse", {}).get("map50") for r in results],
        "sparse_fraction_below_1e-2": [r["rows"].get("sparse", {}).get("sparse_fraction") for r in results],
        "pruned_before_recovery_map50": [r["rows"].get("pruned_gcp", {}).get("map50") for r in results],
        # issue 25's record shape; this benchmark measures one MACs cut and one recovery length
        "sweep": [],
        "recovery_lengths": [],
        "pruned_map50": {
            method: [r["rows"].get(f"pruned_{method}", {}).get("map50") for r in results]
            for method in ("gcp", "slim", "tp_magnitude")
        },
        "settings": [r.get("settings") for r in results],
        "commit": [places_of(r, "commit") for r in results],
        "machine": [places_of(r, "machine") for r in results],
        "minutes": [sum((r.get("wall_minutes") or {}).values()) for r in results],
    }


def places_of(results: dict[str, Any], field: str) -> list[str | None]:
    """The distinct commits or machines a seed's rows were measured at, in the order of the file."""
    seen: list[str | None] = []
    for row in results["rows"].values():
        if row.get(field) not in seen:
            seen.append(row.get(field))
    return seen


# ------------------------------------------------------------------------------------------------ RESULTS.md


def fmt(value: Any, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


def word(met: bool | None) -> str:
    return "not measured" if met is None else "met" if met else "missed"


def difference_text(difference: dict[str, Any] | None) -> str:
    if difference is None:
        return ""
    if difference["mixed_devices"]:
        return " (CPU and GPU seeds are not averaged together)"
    if difference["mean"] is None:
        return ""
    se = "" if difference["se"] is not None else ", no SE"
    return (
        f" (mean paired difference {difference['mean']:+.3f} ± SE {fmt(difference['se'])}, "
        f"n = {difference['n']}{se})"
    )


def target_lines(payload: dict[str, Any]) -> list[str]:
    lines = []
    for target in payload["targets"]:
        lines.append(
            f"- {target['target']}: {word(target['met'])}{difference_text(target.get('difference'))}"
        )
        for part in target.get("parts", []):
            lines.append(f"  - {part['target']}: {word(part['met'])}{difference_text(part['difference'])}")
    return lines


def aggregate_line(row: dict[str, Any]) -> str:
    name = LABELS[(row["method"], row["recovery"])]
    if row["mixed_devices"]:
        spread = "not averaged: CPU and GPU seeds"
    else:
        spread = f"{fmt(row['map50_mean'])} ± {fmt(row['map50_sd'])} (n = {row['n']})"
    difference = row["gsa_minus_row"]
    if difference is None:
        versus = "—"
    elif difference["mixed_devices"]:
        versus = "not averaged: CPU and GPU seeds"
    else:
        versus = f"{fmt(difference['mean'], '+.3f')} ± {fmt(difference['se'])} (n = {difference['n']})"
    per_seed = " / ".join(fmt(value) for value in row["map50"])
    other = " / ".join(fmt(value) for value in row["map"])
    return (
        f"| {name} | {spread} | {per_seed} | {versus} | {other} | {fmt(row['params_cut'], '.1%')} | "
        f"{fmt(row['macs_cut'], '.1%')} |"
    )


def stage1_line(payload: dict[str, Any]) -> str:
    """Stage 1 and the prune before recovery, seed by seed: the paper's stage-1 targets measured here too."""

    def per_seed(values: Sequence[float | None], spec: str) -> str:
        return " / ".join(fmt(value, spec) for value in values)

    return (
        f"Stage 1 per seed: {per_seed(payload['sparse_fraction_below_1e-2'], '.1%')} of γ below 1e-2, mAP@0.5"
        f" {per_seed(payload['sparse_map50'], '.3f')} (base {fmt(payload['teacher_map50'])}); gcp pruned, before"
        f" recovery: {per_seed(payload['pruned_before_recovery_map50'], '.3f')}."
    )


def base_line(payload: dict[str, Any]) -> str:
    base = payload["base"]
    if not base:
        return "Base: no record of its training (`benchmarks/results/yolov8n_base.json`)."
    verdict = (
        f"converged (gain {base['gain']:+.3f} < {base['threshold']} over the last fifth)"
        if base.get("converged")
        else "**not converged** ("
        + (
            base.get("why")
            or f"gain {fmt(base.get('gain'), '+.3f')} ≥ {base.get('threshold')} over the last fifth"
        )
        + ")"
    )
    tested = (
        f"test mAP@0.5 {fmt(payload['teacher_map50'])} (gcp's evaluator), {fmt(payload['ultralytics_map50'])} "
        "(`YOLO.val`)"
        if payload.get("teacher_map50") is not None
        else "test mAP@0.5 not measured yet (a seed's eval stage measures it)"
    )
    last_val = (base.get("curve") or {}).get("map50") or [None]
    return (
        f"Base: YOLOv8n from `yolov8n.yaml`, {base['epochs']} epochs of Ultralytics' trainer (seed 0; "
        f"{fmt(base.get('minutes'), '.1f')} min on {base.get('machine') or 'an unrecorded machine'}), {verdict}; "
        f"last val mAP@0.5 {fmt(last_val[-1])}; {tested}. Validation curve: `benchmarks/figures/{CURVE_NAME}`, record "
        f"`benchmarks/results/{BASE_NAME}`.\n\n![YOLOv8n base: val mAP vs epoch](figures/{CURVE_NAME})"
    )


def machine_lines(payload: dict[str, Any]) -> list[str]:
    lines = ["Measured (per seed):"]
    for seed, commits, machines, minutes in zip(
        payload["seeds"], payload["commit"], payload["machine"], payload["minutes"]
    ):
        lines.append(
            f"- seed {seed}: {' + '.join(m or 'machine not recorded' for m in machines)}; commit "
            f"{', '.join(c or 'not recorded' for c in commits)}; {minutes:.0f} min of stages"
        )
    kinds = {device_kind(m) for machines in payload["machine"] for m in machines}
    if len(kinds) > 1:
        lines.append(
            "**Some seeds ran on a CPU and some on a GPU: such rows are not averaged together (—).**"
        )
    bases = {(s or {}).get("base_sha256") for s in payload["settings"]}
    if len(bases) > 1:
        lines.append("**The seeds started from different base models: their rows do not share a start.**")
    return lines


SEED_ROWS = (
    ("base", "YOLOv8n base", "–"),
    ("sparse", "after stage 1", "–"),
    ("dense", "dense control", "E epochs of training"),
    ("pruned_gcp", "gcp", "none"),
    ("gcp_gsa", "gcp", "GSA"),
    ("gcp_ft", "gcp", "FT"),
    ("pruned_slim", "slim", "none"),
    ("slim_ft", "slim", "FT"),
    ("pruned_tp_magnitude", "torch-pruning L2", "none"),
    ("tp_magnitude_ft", "torch-pruning L2", "FT (E epochs)"),
)


def seed_lines(seed: int, results: dict[str, Any]) -> list[str]:
    """A seed's own table: every model file of its run, both evaluators, cuts, latency, commit."""
    lines = [
        "",
        f"### Seed {seed}",
        "",
        "| model | recovery | params cut | MACs cut | mAP@0.5 ours | mAP@0.5:0.95 ours | mAP@0.5 YOLO.val "
        "| mAP@0.5:0.95 YOLO.val | ORT ms | commit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    epochs = (results.get("settings") or {}).get("total_epochs", "E")
    for key, name, recovery in SEED_ROWS:
        r = results["rows"].get(key)
        if r is None:
            continue
        recovery = recovery.replace("E epochs", f"{epochs} epochs")
        lines.append(
            f"| {name} | {recovery} | {fmt(r['params_cut'], '.1%')} | {fmt(r['macs_cut'], '.1%')} | "
            f"{fmt(r['map50'])} | {fmt(r['map'])} | {fmt(r.get('ultralytics_map50'))} | "
            f"{fmt(r.get('ultralytics_map'))} | {fmt(r.get('ort_ms'), '.1f')} | {r.get('commit')} |"
        )
    cuts = results.get("group_cuts") or {}
    if cuts:
        shares = ", ".join(
            f"{name} {fmt(cut['gcp'], '.1%')} / {fmt(cut['slim'], '.1%')}" for name, cut in cuts.items()
        )
        lines += ["", f"Share of each of gcp's groups' channels removed, gcp / slim: {shares}."]
    wall = results.get("wall_minutes") or {}
    if wall:
        lines += ["", "Stage wall times (min): " + ", ".join(f"{k} {v:.1f}" for k, v in wall.items()) + "."]
    return lines


def render(payload: dict[str, Any], per_seed: dict[int, dict[str, Any]]) -> str:
    """The RESULTS.md section: the aggregate table and the targets first, then the base, how it was run, and
    each seed's own rows."""
    if not per_seed:
        waiting = "Not measured yet: no seed's measurements file holds a row."
        return f"{waiting}\n\n{base_line(payload)}" if payload.get("base") else waiting
    settings = next((s for s in payload["settings"] if s), {})
    es, er = settings.get("epochs_sparse"), settings.get("epochs_recover")
    lines = [
        f"Seeds {', '.join(map(str, payload['seeds']))}; from one base YOLOv8n, {fmt(settings.get('macs'), '.0%')}"
        f" of the MACs removed, every row E = {settings.get('total_epochs')} epochs of Ultralytics' trainer after"
        f" the base (dense control: E; gcp and slim: {es} of stage 1 + {er} of recovery; torch-pruning L2: E of"
        " fine-tuning). Test split, gcp's evaluator. mAP@0.5 per row: mean ± standard deviation over the seeds"
        " that measured it (n), each seed's (in seed order), and gcp + GSA minus the row on the same seeds: mean"
        " paired difference ± its standard error (n pairs).",
        "",
        "| row | mAP@0.5 mean ± sd (n) | mAP@0.5 per seed | gcp + GSA − row: mean ± SE (n) "
        "| mAP@0.5:0.95 per seed | params cut | MACs cut |",
        "|---|---|---|---|---|---|---|",
        *(aggregate_line(row) for row in payload["rows"]),
        "",
        "Issue 25's targets (means over the seeds; pairs on the same seed):",
        *target_lines(payload),
        "",
        stage1_line(payload),
        "",
        base_line(payload),
        "",
        *machine_lines(payload),
        "",
        f"Command, per seed: `YOLO_OFFLINE=1 python benchmarks/bench_ultralytics.py --seed N --epochs-sparse {es} "
        f"--epochs-recover {er} --macs {settings.get('macs')}`, then `--stages report`. AdamW lr "
        f"{settings.get('lr')}, batch {settings.get('batch')}, {settings.get('size')} px, fliplr 0; gcp's evaluator"
        " (conf 0.001, NMS IoU 0.6) and `YOLO.val` (Ultralytics' own settings) on the 500 test images; ONNX"
        " Runtime CPU latency at batch 1 (`gcp bench`). torch-pruning's row prunes and fine-tunes in"
        f" {settings.get('tp_rounds', 1)} rounds that share its E epochs (its YOLOv8 example's iterative recipe;"
        " measurements without `tp_rounds` pruned once and fine-tuned after).",
    ]
    for seed, results in per_seed.items():
        lines += seed_lines(seed, results)
    return "\n".join(lines)


def write_report(places: Places, seeds: Sequence[int] | None) -> dict[str, Any]:
    """``ultralytics_cpu.json`` and the RESULTS.md section from every seed's measurements (a smoke run: its
    scratch directory's, and the section printed instead of written)."""
    per_seed = seed_measurements(places.results, seeds)
    payload = aggregate(per_seed, read_json(places.base_record))
    text = render(payload, per_seed)
    places.results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(places.aggregate, payload)
    if places.smoke:
        print(json.dumps(payload, indent=1), f"## {TITLE}\n\n{text}", sep="\n")
    else:
        write_section(TITLE, text)
    return payload


# ---------------------------------------------------------------------------------------------------- main


def explicit_device(text: str) -> str:
    """``--device``: ``cpu`` or ``cuda[:N]``, not ``auto``: every row records the machine it trained on
    (``common.machine``), which must know whether that was the GPU."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0, help="training seed of the rows (the base: seed 0)")
    parser.add_argument("--run-dir", help="the seed's run directory (default runs/ultralytics_cpu/seed<N>)")
    parser.add_argument(
        "--base-dir", help="where the base trains (default runs/ultralytics_cpu/base_e<epochs>)"
    )
    parser.add_argument("--stages", nargs="*", default=STAGES, choices=STAGES)
    parser.add_argument("--seeds", type=int, nargs="*", help="report: only these seeds' measurements")
    parser.add_argument("--root", default=".data/digit_scenes")
    parser.add_argument("--base-epochs", type=int, default=30, help="the base's schedule (epochs)")
    parser.add_argument(
        "--converged",
        type=float,
        default=CONVERGED_GAIN,
        help="the base converged when val mAP@0.5 gains less than this over the last fifth of its epochs",
    )
    parser.add_argument(
        "--ship-unconverged",
        action="store_true",
        help="ship an unconverged base as the asset and go on from it (or from the shipped unconverged asset)",
    )
    parser.add_argument(
        "--retrain", action="store_true", help="train the base even when a converged asset exists"
    )
    parser.add_argument(
        "--device",
        type=explicit_device,
        default="cpu",
        help="cpu or cuda[:N]: where every stage trains (a base trained on a GPU is still an asset for CPU rows; "
        "rows are recorded with the machine, and GPU rows are never averaged with CPU rows)",
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="data-loading worker processes (0: the main process)"
    )
    parser.add_argument("--epochs-sparse", type=int, default=3)
    parser.add_argument("--epochs-recover", type=int, default=3)
    parser.add_argument("--macs", type=float, default=0.4, help="share of the MACs to remove")
    parser.add_argument(
        "--tp-rounds",
        type=int,
        default=3,
        help="torch-pruning's row: prune-then-fine-tune rounds sharing its E epochs (1: prune once, then E)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="check the script end to end: 48 training images, 2 base epochs and 1 epoch a stage, a temporary "
        "directory for everything, no asset, results or RESULTS.md written",
    )
    args = parser.parse_args(argv)
    args.run_dir = args.run_dir or f"runs/ultralytics_cpu/seed{args.seed}"
    args.base_dir = args.base_dir or f"runs/ultralytics_cpu/base_e{args.base_epochs}"
    return args


def main() -> None:
    args = parse_args()
    sizes = {"n_train": 3000, "n_val": 500, "n_test": 500}
    scratch = None
    if args.smoke:
        scratch = Path(tempfile.mkdtemp(prefix="bench_ultralytics_"))
        args.root, args.run_dir, args.base_dir = (str(scratch / name) for name in ("digits", "run", "base"))
        args.base_epochs, args.epochs_sparse, args.epochs_recover, args.tp_rounds = 2, 1, 1, 2
        sizes = {"n_train": 48, "n_val": 16, "n_test": 16}
        print(f"smoke run in {scratch}", flush=True)
    places = Places(scratch)
    if args.stages == ["report"]:  # the report reads the measurements files alone
        write_report(places, args.seeds)
        return
    voc = make_digit_scenes(args.root, **sizes, size=SIZE, seed=0)  # the same data for every seed
    data_yaml = to_yolo_layout(voc, Path(args.root + "_yolo"))
    bench = Bench(args, Path(args.run_dir), config_text(data_yaml, args))
    base = Bench(args, Path(args.base_dir), base_config_text(data_yaml, args))
    steps: dict[str, Callable[[], Any]] = {
        "base": lambda: stage_base(bench, base, places),
        "dense": lambda: stage_dense(bench),
        "sparse": lambda: bench.gcp("sparse-train", "--resume"),
        "prune": lambda: [bench.gcp("prune", "--resume", "--method", m) for m in ("gcp", "slim")],
        "distill": lambda: bench.gcp("distill", "--resume"),
        "finetune": lambda: [bench.gcp("finetune", "--resume", "--method", m) for m in ("gcp", "slim")],
        "tp": lambda: stage_tp(bench),
        "eval": lambda: stage_eval(bench),
        "report": lambda: write_report(places, args.seeds),
    }
    for stage in args.stages:
        print(f"[{now()}] stage {stage}", flush=True)
        bench.timed(stage, steps[stage])
        if stage == "base":
            record = read_json(places.base_record)
            atomic_write_json(
                bench.path("base_record.json"), {k: v for k, v in record.items() if k != "curve"}
            )
        if stage == "eval":
            record_measurements(bench, places)


if __name__ == "__main__":
    main()
