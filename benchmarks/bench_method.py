"""Issue 12 §6: the method at CPU scale, from the shipped DigitScenes teacher, against its peers at equal MACs.

From ``gcp/assets/digits_teacher.pt`` (reduced YOLOv4, 0.773 test mAP@0.5) on DigitScenes (3,000 train / 500
test at 256 px, the teacher's own data):

1. stage 1, dynamic sparse training (``gcp.DynamicSparsity``, layer_relative mechanism) → ``sparse``;
2. stage 2, pruning at ``--macs`` of the MACs for every method: gcp (group thresholds, §4.2), Network Slimming,
   ThiNet and LCP (localization-aware channel pruning, ``gcp.core.lcp``: ThiNet's calibration images with their
   boxes) on the sparse model; torch-pruning's own recipes: its ``GroupNormPruner`` after the same number of
   epochs of its ``regularize()`` sparse learning, and its ``MagnitudePruner`` (L2) on the dense model trained
   for those epochs;
3. stage 3, recovery: gcp with group spatial attention distillation (GSA, §4.3) and every method with plain
   fine-tuning, all for the same epochs.

Controls: the teacher trained densely for the same epochs as stages 1 + 3 (``dense_same_epochs``); Table 9
(dynamic vs constant schedule at equal steps) and Table 10 (group vs global thresholds before any recovery).

Every stage writes its result into ``--out`` (default ``runs/method_cpu/seed<seed>``) and is skipped when its
result is there, and every training stage resumes its last epoch checkpoint, so the benchmark can be split
across sessions: run the same command again. ``--stages`` runs a subset (in order). ``--seed`` changes data
order and augmentation (the data set and the teacher stay the same). ``--fresh`` starts over: it clears the
run directory (fits and models) and the measurements.

Every measurement records the commit, machine, date and settings it was made with, and the report shows each
row's own. A run adds no measurement to rows made at another commit or on another machine (a split run on a
new checkout, a probe on another CPU) unless ``--allow-mixed``; the report then lists which rows came from where.

Seeds (issue 25): each seed keeps its measurements in ``benchmarks/results/method_cpu_measurements_seed<N>.json``;
the report stage aggregates every seed with such a file (``--seeds`` picks some) into ``method_cpu.json`` and a
RESULTS.md section that leads with each row's mean ± standard deviation over the seeds, gcp + GSA's mean paired
difference to every other row with its standard error, and issue 25's targets; each seed's own rows follow.

Two stages run only when ``--stages`` names them (with the stages whose models they start from, on a checkout
whose run directory has gone): ``sweep`` (seed 2: gcp + GSA, slim + FT, torch-pruning magnitude + FT at 30, 50
and 60 % of the MACs besides ``--macs``; their pruned models and the teacher timed together in ONNX Runtime, and
the report plots mAP@0.5 against MACs cut and against latency, ``benchmarks/figures/method_cpu_sweep.png``) and ``lengths`` (gcp's pruned model recovered with GSA and with FT for 30
steps and 1 epoch besides the recovered rows' own 3 epochs).

    python benchmarks/bench_method.py                # everything: 134 min on 2 AVX-512 cores, ~215 on AVX2 ones
                                                     # (measured before the LCP rows: add its ranking and FT)
    python benchmarks/bench_method.py --seed 1       # another seed, into its own measurements file
    python benchmarks/bench_method.py --stages sparse prune    # a part
    python benchmarks/bench_method.py --rows lcp_ft gcp_ft     # these rows first (and the models they start from)
    python benchmarks/bench_method.py --seed 2 --stages sparse dense prune sweep report  # issue 25's sweep
    python benchmarks/bench_method.py --seed 1 --stages sparse prune lengths report     # its recovery lengths
    python benchmarks/bench_method.py --stages report --seeds 0 1 2                     # the report alone
    python benchmarks/bench_method.py --stages sparse ship    # seed 0's stage 1 → gcp/assets/digits_sparse.pt
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PAPER_MODEL2,
    device_kind,
    git_revision,
    machine,
    mean_sd,
    now,
    paired,
    ship_asset,
    tp_prune,
    tp_pruner,
    write_section,
)

import gcp  # noqa: E402
from distill import GroupAttentionDistiller  # noqa: E402
from gcp.app.pipeline import (  # noqa: E402
    SHIPPED_SPARSE,
    SHIPPED_TEACHER,
    load_model,
    save_model,
    save_pruned_like,
)
from gcp.core.prune import channel_costs  # noqa: E402
from gcp.core.report import count_macs_params  # noqa: E402
from gcp.core.serialize import ModelFileError, read_pruned  # noqa: E402
from gcp.detection.data import VOCDataset, make_digit_scenes  # noqa: E402
from gcp.detection.evaluate import evaluate  # noqa: E402
from gcp.detection.train import fit  # noqa: E402
from gcp.io import atomic_write_json, file_sha256  # noqa: E402
from gcp.runtime.export import compare_latency  # noqa: E402
from gcp.sparse.dynamic import SPARSE_BELOW  # noqa: E402
from grouping import prunable_norms  # noqa: E402

SIZE = 256
# The measurements were made before prune_detector rounded kept channels to the runtime's block by default
# (issue 14); pruning stays unrounded here so that the stored results are what this script computes.
UNROUNDED = 1
BATCH = 32
ROOT = ".data/digit_scenes"  # the teacher's data: 3,000 / 500 / 500, seed 0 (benchmarks/train_reference.py)
JSON_OUT = Path(__file__).parent / "results" / "method_cpu.json"
FIGURE = Path(__file__).parent / "figures" / "method_cpu_gammas.png"
METHODS = ("gcp", "slim", "thinet", "lcp", "tp_groupnorm", "tp_magnitude")
#: The methods that prune the stage-1 model (``sparse``); torch-pruning's start from their own training.
FROM_SPARSE = ("gcp", "slim", "thinet", "lcp")
#: The methods that rank channels on the calibration images (``calibration``); LCP reads their boxes too.
WITH_TARGETS = ("lcp",)
#: Which models start from each model file (``Bench.wanted``); recovered rows start from ``pruned_<method>``,
#: Table 9's pruned rows from the stage-1 model of their schedule.
FEEDS: dict[str, tuple[str, ...]] = {
    "sparse": (*(f"pruned_{m}" for m in FROM_SPARSE), "table9_sparse_pruned"),
    "sparse_constant": ("table9_sparse_constant_pruned",),
    "dense_e1": ("dense_same_epochs", "pruned_tp_magnitude"),
    "tp_sparse": ("pruned_tp_groupnorm",),
    **{f"pruned_{m}": (f"{m}_ft",) for m in METHODS},
}
FEEDS["pruned_gcp"] += ("gcp_gsa",)
#: Issue 25's sweep (``sweep`` stage, one seed): these rows pruned at each share of the MACs (the share of
#: ``--macs`` is the main rows': not made again).
SWEEP_ROWS = (("gcp", "gsa"), ("slim", "ft"), ("tp_magnitude", "ft"))
SWEEP_MACS = (0.3, 0.4, 0.5, 0.6)
#: The sweep's seed: the one whose rows and stage-1 model were all made on one machine (AVX-512), so the
#: sweep's shares and its ``--macs`` point (the main rows) share one stage-1 model and one CPU's rounding.
SWEEP_SEED = 2
#: The seed whose stage-1 model ``ship`` makes the demo's asset.
SHIP_SEED = 0
#: The sweep's latency: ONNX Runtime on the CPU, batch 1, this many intra-op threads and timed runs per model.
LATENCY_THREADS, LATENCY_RUNS = 2, 100
SWEEP_FIGURE = Path(__file__).parent / "figures" / "method_cpu_sweep.png"
STEPS_PER_EPOCH = -(-3000 // BATCH)  # the last, short batch included
#: Issue 25's recovery lengths (GSA against FT on gcp's pruned model), in training steps; the ``lengths`` stage
#: makes those the recovered rows are not (their own length: ``recovery_steps``).
LENGTHS = {"30 steps": 30, "1 epoch": STEPS_PER_EPOCH, "3 epochs": 3 * STEPS_PER_EPOCH}
#: Stages that run only when ``--stages`` names them, and the prefix of the keys each makes.
OPT_IN = {"sweep": "sweep", "lengths": "length", "ship": "ship"}  # ship makes no model


def sweep_key(method: str, macs: float, recovery: str | None = None) -> str:
    """The pruned (``recovery`` None) or recovered model of ``method`` at ``macs`` of the MACs in the sweep."""
    share = f"sweep{round(macs * 100)}"
    return f"{share}_pruned_{method}" if recovery is None else f"{share}_{method}_{recovery}"


def length_key(steps: int, recovery: str) -> str:
    return f"length{steps}_gcp_{recovery}"


def own_steps(settings: dict[str, Any]) -> int:
    """The training steps of the recovered rows (``gcp_gsa``, ``gcp_ft``, ...) made with ``settings``."""
    return settings["epochs_recover"] * min(STEPS_PER_EPOCH, settings.get("max_steps") or STEPS_PER_EPOCH)


def sweep_shares(args: argparse.Namespace) -> list[float]:
    """The sweep's shares of the MACs on this run's seed: all but ``--macs`` (the main rows'), on
    ``SWEEP_SEED`` only."""
    if args.seed != SWEEP_SEED:
        return []
    return [macs for macs in SWEEP_MACS if abs(macs - args.macs) > 1e-9]


def other_lengths(args: argparse.Namespace) -> list[int]:
    """Issue 25's recovery lengths the recovered rows do not measure already."""
    return [steps for steps in LENGTHS.values() if steps != own_steps(vars(args))]


def opt_in_keys(args: argparse.Namespace) -> set[str]:
    """The models the opt-in stages (``OPT_IN``) make with this run's settings (the sweep: ``SWEEP_SEED``'s
    only)."""
    sweep = {
        key
        for macs in sweep_shares(args)
        for method, recovery in SWEEP_ROWS
        for key in (sweep_key(method, macs), sweep_key(method, macs, recovery))
        if args.seed == SWEEP_SEED
    }
    return sweep | {
        length_key(steps, recovery) for steps in other_lengths(args) for recovery in ("gsa", "ft")
    }


for _method, _recovery in SWEEP_ROWS:
    for _macs in SWEEP_MACS:
        FEEDS["sparse" if _method in FROM_SPARSE else "dense_e1"] += (sweep_key(_method, _macs),)
        FEEDS[sweep_key(_method, _macs)] = (sweep_key(_method, _macs, _recovery),)
FEEDS["pruned_gcp"] += tuple(length_key(n, r) for n in LENGTHS.values() for r in ("gsa", "ft"))
#: Every model a run makes (besides the teacher it scores): the names ``--rows`` takes.
MODELS = frozenset({*FEEDS, *itertools.chain(*FEEDS.values())})
#: What a run directory may hold: every file bench_method writes there (``written_here``; ``--fresh`` deletes
#: nothing else).
RUN_FILES = frozenset(
    {
        "fits",
        "measurements.json",
        "method_cpu.json",
        "RESULTS_section.md",
        "gammas.png",
        "sweep.png",
        *(f"{name}{suffix}" for name in MODELS for suffix in (".pt", "_history.json", "_terms.json")),
    }
)
#: Options that say what to run and where, not how to measure: not part of the settings a row is made with.
RUN_OPTIONS = ("stages", "rows", "out", "fresh", "allow_mixed", "seeds")
#: Entries of the measurements file that are not measurements.
NOT_ROWS = ("settings", "wall_minutes", "rebuilt", "sweep_latency")
#: Every training stage: AdamW as the teacher was trained, fp32 (bf16 autocast is 6x slower on this AVX2 CPU),
#: no EMA (its average would smear the exact zeros of stage 1 and lag in stage 3's short runs).
TRAINING = {"optimizer": "adamw", "momentum": 0.9, "batch_size": BATCH, "warmup_epochs": 0.1, "ema": False}
#: What a setting added later meant for measurements recorded before it existed.
SETTINGS_BEFORE_THEY_EXISTED = {
    # the teacher every measurement before the key existed started from (0.616 test mAP@0.5, 37.5 min of training)
    "teacher_sha256": "9dcdb6b47ec5f3c1c131ff1947c39077216dfb44345d1e11410e84b31ca13efa",
    "push_floor": 0.0,
    "mechanism": "layer_relative",
    "target": 0.45,
    "target_of": "macs",
    "layout": "contiguous",
}
#: The paper's numbers beside ours (VOC 2007 test, CSPDarknet-YOLOv4 at 416 px, mAP@0.5 in %): the original
#: network and the one after dynamic sparse training (§5.4), constant-rate sparse training (Table 9).
PAPER_STAGES = {"teacher": 87.1, "sparse": 79.8, "sparse_constant": 71.2}
PAPER_ROWS = {
    (method, recovery): value
    for method, values in PAPER_MODEL2.items()
    for recovery, value in zip(("ft", "gsa"), values, strict=True)
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_options(parser)
    add_schedule_options(parser)
    add_stage1_options(parser)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.rows or ()) - MODELS)
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {sorted(MODELS)}")
    return args


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """What to run and where (``RUN_OPTIONS``: not settings of the measurements, except ``--seed``)."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="the seeds the report aggregates (default: every seed with a measurements file)",
    )
    parser.add_argument("--out", default=None, help="run directory (default runs/method_cpu/seed<seed>)")
    parser.add_argument(
        "--stages",
        nargs="*",
        default=None,
        help=f"subset of {list(STAGES)} (default: all but {list(OPT_IN)})",
    )
    parser.add_argument(
        "--rows",
        nargs="+",
        default=None,
        metavar="ROW",
        help="make only these models (e.g. lcp_ft) and the ones they start from, so that a session too short"
        " for a whole seed finishes the rows it needs first (default: every row of the stages run)",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="start over: delete the run directory's fits and models and the measurements first",
    )
    parser.add_argument(
        "--allow-mixed",
        action="store_true",
        help="add measurements to rows made at another commit or on another machine (the report says which)",
    )


def add_schedule_options(parser: argparse.ArgumentParser) -> None:
    """How every row is made and scored: the training lengths and rates, the MACs share, the data layout."""
    parser.add_argument("--epochs-sparse", type=int, default=2, help="stage 1 epochs (3,000 images each)")
    parser.add_argument(
        "--epochs-recover",
        type=int,
        default=3,
        help="stage 3 epochs (2 recovered gcp + GSA to 0.604, 4 to 0.640: RESULTS.md, 'Recovery length')",
    )
    parser.add_argument("--lr-sparse", type=float, default=1e-4, help="AdamW lr of stage 1 (and its control)")
    parser.add_argument(
        "--lr-recover", type=float, default=5e-4, help="AdamW lr of stage 3 (and its control)"
    )
    parser.add_argument("--tp-reg", type=float, default=5e-4, help="GroupNormPruner.regularize strength")
    parser.add_argument("--macs", type=float, default=0.4, help="share of MACs every method removes")
    parser.add_argument(
        "--layout",
        choices=("channels_last", "contiguous"),
        default="channels_last",
        help="memory order of the image batches (channels_last is faster on CPU: benchmarks/bench_layout.py)",
    )
    parser.add_argument("--max-steps", type=int, default=None, help="cap steps per epoch (smoke runs)")
    parser.add_argument("--eval-images", type=int, default=None, help="score on the first N test images")


def add_stage1_options(parser: argparse.ArgumentParser) -> None:
    """Stage 1's ``gcp.DynamicSparsity`` options."""
    parser.add_argument(
        "--mechanism",
        choices=("layer_relative", "selective"),
        default="layer_relative",
        help="gcp.DynamicSparsity mechanism of stage 1",
    )
    parser.add_argument(
        "--target",
        type=float,
        default=0.45,
        help="share of the MACs (or of the channels, --target-of channels) driven to zero (selective)",
    )
    parser.add_argument(
        "--target-of",
        choices=("macs", "channels"),
        default="macs",
        help="what --target counts (selective): channels chosen by importance per MAC, or by importance",
    )
    parser.add_argument("--s", type=float, default=1.0, help="sparsity rate (layer_relative)")
    parser.add_argument("--gamma-lr", type=float, default=0.02, help="γ's own learning rate (layer_relative)")
    parser.add_argument(
        "--gamma-schedule",
        choices=("follow", "constant"),
        default="constant",
        help="γ's lr follows the network's warm-up/cosine schedule, or stays constant (layer_relative)",
    )
    parser.add_argument(
        "--push-floor",
        type=float,
        default=0.0,
        help="share of s every channel gets (layer_relative; the recorded seed-0 run predates it: 0)",
    )


class Bench:
    """The run directory, data and settings shared by the stages; measurements kept in ``results_path``."""

    def __init__(self, args: argparse.Namespace) -> None:
        """The run directory and its measurements (no data: ``load_data``)."""
        self.args = args
        self._stage, self._tick = "setup", time.perf_counter()
        # Wall minutes of this session, added to the recorded ones once it measures something (``tick``).
        self._unsaved: dict[str, float] = {}
        self._measured = False
        self.out = Path(args.out or f"runs/method_cpu/seed{args.seed}")
        # Measurements are kept beside RESULTS.md (committed), the models in the run directory: a later session
        # on a fresh checkout re-runs only the stages whose measurements are missing.
        # A run with its own --out (a probe with other settings) keeps its measurements there instead.
        self.results_path = (
            self.out / "measurements.json"
            if args.out
            else JSON_OUT.parent / f"method_cpu_measurements_seed{args.seed}.json"
        )
        claim_run_dir(self.out, self.results_path, fresh=args.fresh)
        self.commit, self.machine = git_revision(), machine()
        self.results: dict[str, Any] = (
            json.loads(self.results_path.read_text()) if self.results_path.is_file() else {}
        )
        self.settings = self._check_settings()
        if not self.results_path.is_file():
            self.save()  # the run has started: its run directory is accounted for (claim_run_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.example = torch.zeros(1, 3, SIZE, SIZE)
        self.channels_last = args.layout == "channels_last"
        # --rows: those models and the chain each starts from (FEEDS read backwards); None: no restriction.
        self.chain = None if args.rows is None else {k for row in args.rows for k in lineage(row)}

    def load_data(self) -> None:
        """DigitScenes (generated on first use: the setup minutes) and the test split the rows are scored on."""
        root = make_digit_scenes(ROOT, n_train=3000, n_val=500, n_test=500, size=SIZE, seed=0)
        self.train = VOCDataset(root, "train", size=SIZE, augment=True, horizontal_flip=False)
        self.test = VOCDataset(root, "test", size=SIZE)
        if self.args.eval_images:
            self.test = torch.utils.data.Subset(self.test, range(self.args.eval_images))

    def _check_settings(self) -> dict[str, Any]:
        """Measurements made with other settings must not be mixed into one table: the first run records its
        settings, and a later run with different ones stops (use another --out, or --fresh). Returns this run's
        settings, which every measurement it makes records."""
        settings = {k: v for k, v in vars(self.args).items() if k not in RUN_OPTIONS}
        # Every row starts from the shipped teacher: rows made from another one (a retrained asset) are refused.
        settings["teacher_sha256"] = file_sha256(SHIPPED_TEACHER)
        recorded = self.results.setdefault("settings", settings)
        for key, value in SETTINGS_BEFORE_THEY_EXISTED.items():
            recorded.setdefault(key, value)
        changed = {k: (recorded.get(k), v) for k, v in settings.items() if recorded.get(k) != v}
        if changed:
            raise SystemExit(
                f"{self.results_path} holds measurements made with other settings "
                f"({', '.join(f'{k}: {old} there, {new} now' for k, (old, new) in changed.items())}); "
                "run with the same options, give another --out, or --fresh to start over"
            )
        return settings

    def save(self) -> None:
        atomic_write_json(self.results_path, self.results)

    def provenance(self) -> dict[str, Any]:
        """What a measurement made now is stored with: the commit and machine of this run, the date and the
        settings, so that each row keeps its own however many sessions and checkouts a run is split across."""
        return {"commit": self.commit, "machine": self.machine, "date": now(), "settings": self.settings}

    def refuse_mixing(self) -> None:
        """Stop before this run adds a measurement (or trains towards one) to rows made at another commit or on
        another machine, or whose provenance was not recorded: one table would then present them as one run's.
        ``--allow-mixed`` combines them, and the report lists which rows came from where."""
        if self.args.allow_mixed:
            return
        here = (self.commit, self.machine)
        elsewhere: dict[str, list[str]] = {}
        for key, row in measurements(self.results).items():
            if origin(row) != here:
                elsewhere.setdefault(where(origin(row)), []).append(key)
        if elsewhere:
            raise SystemExit(
                f"{self.results_path} holds rows measured elsewhere ("
                + "; ".join(f"{place}: {', '.join(keys)}" for place, keys in elsewhere.items())
                + f"); this run ({where(here)}) would add to them: pass --allow-mixed to combine them (the report"
                " says which row came from where), --fresh to start over, or give another --out"
            )

    def begin_stage(self, stage: str) -> None:
        self.tick()
        self._stage = stage

    def tick(self) -> None:
        """Add the wall time since the last tick to the stage's, summed over the runs (sessions) that worked
        on it: the ≤ 150 min target is the whole command's time, setup (data generation), training, pruning and
        scoring included. Ticks come with every recorded result, at the start and the end of a stage, so an
        interrupted run loses only the work it must redo (its unfinished epoch; finished epochs are added back
        from the fit's history). A session's minutes are kept back until it records a measurement: one that
        measures nothing (the report alone, a finished run run again) did none of the command's work."""
        now_ = time.perf_counter()
        self._unsaved[self._stage] = self._unsaved.get(self._stage, 0.0) + (now_ - self._tick) / 60
        self._tick = now_
        if not self._measured:
            return
        wall = self.results.setdefault("wall_minutes", {})
        for stage, minutes in self._unsaved.items():
            wall[stage] = wall.get(stage, 0.0) + minutes
        self._unsaved.clear()
        self.save()

    def path(self, name: str) -> Path:
        return self.out / name

    def wanted(self, name: str) -> bool:
        """Whether the model ``name`` must be trained or pruned now: its measurement is missing, or a model still
        wanted starts from it and its file is gone (the run directory is not committed: a later session on a
        fresh checkout has the measurements but not the models, and rebuilds only the chain a missing row
        needs)."""
        if not self.makes(name):
            return False
        if not self.done(name):
            return True  # a model file without its measurement is scored (a finished fit resumes at once)
        later = [key for key in FEEDS.get(name, ()) if self.makes(key)]
        return not self.path(f"{name}.pt").is_file() and any(self.wanted(k) for k in later)

    def makes(self, key: str) -> bool:
        """Whether this run may make ``key``: the opt-in stages' models only when ``--stages`` names them, and
        with ``--rows`` only the models named and those they start from."""
        if self.chain is not None and key not in self.chain:
            return False
        stage = next((stage for stage, prefix in OPT_IN.items() if key.startswith(prefix)), None)
        return stage is None or (stage in (self.args.stages or ()) and key in opt_in_keys(self.args))

    def rebuilt(self, key: str, model: nn.Module, minutes: float) -> None:
        """Record a model rebuilt after its measurement was made (see ``wanted``) apart from the measurement:
        its score shows whether the rebuild reproduced the recorded model (same seed and settings; on the same
        machine it should), and its time is redone work, kept out of the command's wall time."""
        metrics = self.measure(model)
        recorded = self.results[key]
        same_shape = (metrics["macs"], metrics["params"]) == (recorded["macs"], recorded["params"])
        self.results.setdefault("rebuilt", {})[key] = {
            "map50": metrics["map50"],
            "recorded_map50": recorded["map50"],
            "same_macs_and_params": same_shape,
            "minutes": minutes,
            "provenance": self.provenance(),
        }
        self._tick = time.perf_counter()
        self.save()
        same = (
            "reproduces"
            if abs(metrics["map50"] - recorded["map50"]) < 1e-9 and same_shape
            else "DIFFERS FROM"
        )
        print(
            f"[{now()}] {key} rebuilt: mAP@0.5 {metrics['map50']:.4f}, same MACs and params: {same_shape};"
            f" {same} the recorded {recorded['map50']:.4f}",
            flush=True,
        )

    def done(self, key: str) -> bool:
        return key in self.results

    def record(self, key: str, value: dict[str, Any]) -> None:
        """Store the measurement ``value`` under ``key`` with its provenance, and tick."""
        self.refuse_mixing()
        self.results[key] = {**value, "provenance": self.provenance()}
        self._measured = True
        self.tick()
        print(f"[{now()}] {key}: {json.dumps(value)[:300]}", flush=True)

    def measure(self, model: nn.Module) -> dict[str, float]:
        """mAP of ``model`` on the test split, with its MACs and params."""
        metrics = evaluate(model, self.test, batch_size=16, progress=False, channels_last=self.channels_last)
        macs, params = count_macs_params(model, self.example)
        return {"map50": metrics["map50"], "map": metrics["map"], "macs": macs, "params": params}

    def score(self, key: str, model: nn.Module, extra: dict | None = None) -> dict[str, Any]:
        """``measure`` ``model`` and record it under ``key`` (once: a recorded key is not measured again)."""
        if not self.done(key):
            self.record(key, {**self.measure(model), **(extra or {})})
        return self.results[key]

    def train_model(
        self,
        model: nn.Module,
        name: str,
        stage: str,
        hooks: list | None = None,
        *,
        epochs: int | None = None,
        max_steps: int | None = None,
    ) -> tuple[nn.Module, float]:
        """``fit`` with ``stage``'s ("sparse" or "recover") epochs and lr into ``out/fits/name`` (resuming its
        last epoch); returns the model and its training minutes: the sum of its epochs' times from the fit's
        history, so epochs trained by an earlier, interrupted run of this script count too (and only once).
        Whether the rows it leads to may be recorded (``refuse_mixing``) is asked before, not after, the training.
        ``epochs`` and ``max_steps`` (per epoch) replace the stage's own (the ``lengths`` stage)."""
        self.refuse_mixing()
        epochs = epochs or (self.args.epochs_sparse if stage == "sparse" else self.args.epochs_recover)
        lr = self.args.lr_sparse if stage == "sparse" else self.args.lr_recover
        out_dir = self.out / "fits" / name
        resume = (out_dir / "last.pt").is_file()
        # Epochs an interrupted run trained: their time was never ticked into the stage's wall time.
        if resume:
            earlier = json.loads((out_dir / "history.json").read_text()).get("seconds", [])
            self._tick -= sum(s for s in earlier if s is not None)
        history = fit(
            model,
            self.train,
            epochs=epochs,
            lr=lr,
            hooks=hooks or [],
            out_dir=out_dir,
            resume=resume,
            seed=self.args.seed,
            progress=False,
            max_steps_per_epoch=max_steps or self.args.max_steps,
            channels_last=self.channels_last,
            **TRAINING,
        )
        timed = [s for s in history["seconds"] if s is not None]
        if len(timed) != len(history["seconds"]):
            raise SystemExit(
                f"{out_dir}: an epoch without its time (trained by a version of this script before fit logged "
                "epoch times); delete that directory so the fit is retrained and timed"
            )
        return model, sum(timed) / 60


# ----------------------------------------------------------------------------------------------- the stages


def teacher_stage(bench: Bench) -> None:
    bench.score("teacher", load_model(SHIPPED_TEACHER))


def keep(bench: Bench, key: str, model: nn.Module, minutes: float, extra: dict | None = None) -> None:
    """Save a model a stage made and score it, or, when it was rebuilt for a later stage, check it against its
    recorded measurement (``Bench.rebuilt``)."""
    save_model(model, bench.path(f"{key}.pt"))
    if bench.done(key):
        bench.rebuilt(key, model, minutes)
    else:
        bench.score(key, model, {"train_minutes": minutes, **(extra or {})})


def _dense_stage(bench: Bench, key: str, source: Callable[[], nn.Module], stage: str) -> None:
    if bench.wanted(key):
        model, minutes = bench.train_model(source(), key, stage)
        keep(bench, key, model, minutes)


def dense_stage(bench: Bench) -> None:
    """The control: the teacher trained on for stage 1's epochs (``dense_e1``, also torch-pruning magnitude's
    start), then stage 3's (``dense_same_epochs``), with the same settings and no pruning."""
    _dense_stage(bench, "dense_e1", lambda: load_model(SHIPPED_TEACHER), "sparse")
    _dense_stage(bench, "dense_same_epochs", lambda: load_model(bench.path("dense_e1.pt")), "recover")


def _sparse_stage(bench: Bench, key: str, switch_at: float) -> None:
    if not bench.wanted(key):
        return
    model = load_model(SHIPPED_TEACHER)
    if bench.args.mechanism == "selective":
        hook = gcp.DynamicSparsity(
            model,
            mechanism="selective",
            target=bench.args.target,
            switch_at=switch_at,
            costs=channel_costs(model, bench.example) if bench.args.target_of == "macs" else None,
        )
    else:
        hook = gcp.DynamicSparsity(
            model,
            s=bench.args.s,
            lr=bench.args.gamma_lr,
            switch_at=switch_at,
            follow_schedule=bench.args.gamma_schedule == "follow",
            push_floor=bench.args.push_floor,
        )
    model, minutes = bench.train_model(model, key, "sparse", [hook])
    hook.save_history(bench.path(f"{key}_history.json"))
    keep(bench, key, model, minutes, {"sparse_fraction": sparse_fraction(model)})


def sparse_stage(bench: Bench) -> None:
    """Stage 1 with the paper's dynamic schedule (switch at half, protect 30 %, decay to 1 %)."""
    _sparse_stage(bench, "sparse", switch_at=0.5)


def table9_stage(bench: Bench) -> None:
    """Table 9: the constant (Network Slimming) schedule at the same steps; pruned at the same MACs by gcp."""
    if bench.args.mechanism != "layer_relative":
        print(
            "table9: the paper's two schedules are compared with --mechanism layer_relative; skipped",
            flush=True,
        )
        return
    _sparse_stage(bench, "sparse_constant", switch_at=1.0)
    for source in ("sparse", "sparse_constant"):
        key = f"table9_{source}_pruned"
        if not bench.wanted(key):
            continue
        path = bench.path(f"{source}.pt")
        if not path.is_file():  # only this run's stage-1 model: another one would not be the row it compares
            print(f"table9: {path.name} is not there yet (run its stage first); {key} skipped", flush=True)
            continue
        model = load_model(path)
        result = quiet(
            lambda m=model: gcp.prune_detector(
                m, bench.example, ratio=bench.args.macs, budget="macs", round_to=UNROUNDED
            )
        )
        bench.score(key, result.model, {"macs_cut": result.report["achieved"]})


def tp_sparse_stage(bench: Bench) -> None:
    """torch-pruning's sparse learning: ``GroupNormPruner.regularize`` after every backward, same epochs."""
    if not bench.wanted("tp_sparse"):
        return
    model = load_model(SHIPPED_TEACHER)
    pruner = tp_pruner(model, bench.example, "tp_groupnorm", bench.args.tp_reg)

    class Regularize:
        def after_backward(self, epoch: int, total: int) -> None:
            pruner.regularize(model)

    model, minutes = bench.train_model(model, "tp_sparse", "sparse", [Regularize()])
    keep(bench, "tp_sparse", model, minutes)


def calibration(*, with_targets: bool = False) -> list[Any]:
    """The first 32 un-augmented training images in batches of 8: ThiNet's reconstruction data and the
    activations whose means the pruning folds; with ``with_targets`` each batch is ``(images, targets)``, the
    same images with their boxes and labels, the labelled calibration LCP needs (as ``gcp prune`` gives it:
    ``gcp.app.pipeline.calibration_batches``)."""
    plain = VOCDataset(ROOT, "train", size=SIZE)
    samples = [plain[i] for i in range(32)]
    images = list(torch.stack([image for image, _target in samples]).split(8))
    if not with_targets:
        return images
    targets = [target for _image, target in samples]
    return [(batch, targets[8 * i : 8 * (i + 1)]) for i, batch in enumerate(images)]


def prune_stage(bench: Bench) -> None:
    """Every method at the same MACs; gcp and slim also scored before any recovery (Table 10)."""
    for method in METHODS:
        prune(bench, f"pruned_{method}", method, bench.args.macs)


def prune(bench: Bench, key: str, method: str, macs: float) -> None:
    """Prune ``method``'s start (``source_of``) at ``macs`` of the MACs into ``key`` and score it, when wanted."""
    if not bench.wanted(key):
        return
    path = bench.path(f"{key}.pt")
    source = f"{source_of(key)}.pt"
    if not bench.path(source).is_file():
        print(f"prune {key}: {source} is not there yet (run its stage first); skipped", flush=True)
        return
    if not path.is_file():
        prune_with(bench, method, bench.path(source), macs).save(path)
    if bench.done(key):
        bench.rebuilt(key, load_model(path), 0.0)
        return
    report = read_pruned(path)[0]["report"]
    bench.score(
        key,
        load_model(path),
        {
            "params_cut": report["params"]["pruned"],
            "macs_cut": report["macs"]["pruned"],
            "groups": {g["name"]: round(g["ratio"], 4) for g in report.get("groups", [])},
            **lcp_cost(report),
        },
    )


def lcp_cost(report: dict[str, Any]) -> dict[str, Any]:
    """LCP's ranking time from its pruning report (issue 27 §3: ≤ 20 min; per layer in the pruned file's report):
    the total and the slowest layer, for the seed's notes; nothing for the other methods."""
    if "lcp" not in report:
        return {}
    seconds = report["lcp"]["seconds"]
    slowest = max(seconds, key=seconds.__getitem__)
    return {
        "lcp_seconds": report["lcp"]["total_seconds"],
        "lcp_layers": len(seconds),
        "lcp_slowest": [slowest, seconds[slowest]],
    }


def source_of(key: str) -> str:
    """The model ``key`` starts from (``FEEDS`` read backwards)."""
    return next(name for name, later in FEEDS.items() if key in later)


def lineage(key: str) -> list[str]:
    """``key`` and every model before it back to the teacher: ``["lcp_ft", "pruned_lcp", "sparse"]``."""
    chain = [key]
    while any(chain[-1] in later for later in FEEDS.values()):
        chain.append(source_of(chain[-1]))
    return chain


def prune_with(bench: Bench, method: str, source: Path, macs: float | None = None) -> Any:
    """``method`` at ``macs`` (default ``--macs``) of the MACs: torch-pruning's own pruners, or ours through
    ``prune_detector``."""
    macs = bench.args.macs if macs is None else macs
    if method.startswith("tp_"):
        return tp_prune(load_model(source), bench.example, method, macs, bench.args.tp_reg)
    model = load_model(source)
    return quiet(
        lambda: gcp.prune_detector(
            model,
            bench.example,
            ratio=macs,
            method=method,
            budget="macs",
            calib_data=calibration(with_targets=method in WITH_TARGETS),
            round_to=UNROUNDED,
        )
    )


def recover_stage(bench: Bench) -> None:
    """Stage 3: gcp with GSA and every method with fine-tuning, for the same epochs. GSA's teacher is the original
    network (the shipped teacher), as in the paper (§5.4) and ``gcp distill``: the sparse-trained model it was cut
    from scores lower than the teacher here, and a student learns less from a weaker teacher."""
    for method, recovery in [("gcp", "gsa")] + [(m, "ft") for m in METHODS]:
        recover(bench, f"{method}_{recovery}", recovery)


def recover(bench: Bench, key: str, recovery: str, **length: int) -> None:
    """Recover ``key``'s pruned model (``source_of``) with ``recovery`` ("gsa" or "ft") for stage 3's epochs, or
    ``length`` (``Bench.train_model``'s ``epochs`` and ``max_steps``), and score it, when wanted."""
    if not bench.wanted(key):
        return
    pruned = bench.path(f"{source_of(key)}.pt")
    if not pruned.is_file():
        print(f"recover {key}: {pruned.name} is not there yet (run its pruning first); skipped", flush=True)
        return
    student = load_model(pruned).train()
    hooks: list[Any] = []
    if recovery == "gsa":
        hooks = [GroupAttentionDistiller(load_model(SHIPPED_TEACHER), student, bench.example)]
    try:
        student, minutes = bench.train_model(student, key, "recover", hooks, **length)
    finally:
        for hook in hooks:
            hook.close()
    if recovery == "gsa":
        atomic_write_json(bench.path(f"{key}_terms.json"), {"history": hooks[0].log.history})
    save_pruned_like(student, pruned, bench.path(f"{key}.pt"))
    bench.score(key, student, {"train_minutes": minutes})


def sweep_stage(bench: Bench) -> None:
    """Issue 25's sweep (``SWEEP_SEED``; only when ``--stages`` names it): gcp + GSA, slim + FT and
    torch-pruning's magnitude + FT at each share of ``SWEEP_MACS``, from the same starts as the main rows; the
    share of ``--macs`` is the main rows'."""
    if bench.args.seed != SWEEP_SEED:
        print(f"sweep: measured on seed {SWEEP_SEED} only; skipped", flush=True)
        return
    for macs in sweep_shares(bench.args):
        for method, recovery in SWEEP_ROWS:
            prune(bench, sweep_key(method, macs), method, macs)
            recover(bench, sweep_key(method, macs, recovery), recovery)
    time_sweep(bench)


def sweep_pruned(args: argparse.Namespace) -> dict[str, tuple[str, float]]:
    """The sweep's pruned models by key, with their method and share of the MACs (the share of ``--macs``: the
    main rows' own pruned models)."""
    return {
        (f"pruned_{method}" if abs(macs - args.macs) < 1e-9 else sweep_key(method, macs)): (method, macs)
        for method, _recovery in SWEEP_ROWS
        for macs in SWEEP_MACS
    }


def time_sweep(bench: Bench) -> None:
    """ONNX Runtime latency (CPU, ``LATENCY_THREADS`` threads, batch 1) of the teacher and of every pruned model
    of the sweep whose file is here, for the sweep's mAP-against-latency plot (Fig. 10 asks for the speed a cut
    buys, which on this small model is much less than its MACs: RESULTS.md, latency). A recovered model has its
    pruned model's architecture, so the pruned file is what is timed. All are timed in one process, interleaved
    run by run (``compare_latency``), so they are measured together or not at all: once every model is timed,
    the stage does not time again; when one more is here, all are timed anew. The record names its machine."""
    keys = [key for key in sweep_pruned(bench.args) if bench.path(f"{key}.pt").is_file()]
    missing = sorted(set(sweep_pruned(bench.args)) - set(keys))
    if missing:
        print(
            f"sweep latency: {', '.join(missing)} not here (their stages first); timing the others",
            flush=True,
        )
    recorded = bench.results.get("sweep_latency", {}).get("rows", {})
    if not keys or set(keys) <= set(recorded):
        return
    models = {
        "teacher": load_model(SHIPPED_TEACHER),
        **{key: load_model(bench.path(f"{key}.pt")) for key in keys},
    }
    with tempfile.TemporaryDirectory() as folder:
        rows = compare_latency(
            {name: model.eval() for name, model in models.items()},
            bench.example.shape,
            folder,
            runs=LATENCY_RUNS,
            warmup=LATENCY_RUNS // 5,
            threads=LATENCY_THREADS,
            atol=1e-3,
        )
    bench.results["sweep_latency"] = {
        "rows": {
            row["name"]: {k: row[k] for k in ("median_ms", "p10_ms", "p90_ms", "gmacs")} for row in rows
        },
        "threads": LATENCY_THREADS,
        "runs": LATENCY_RUNS,
        "provenance": bench.provenance(),
    }
    bench.save()
    print(
        f"[{now()}] sweep latency: " + ", ".join(f"{r['name']} {r['median_ms']:.2f} ms" for r in rows),
        flush=True,
    )


def lengths_stage(bench: Bench) -> None:
    """Issue 25's recovery lengths (only when ``--stages`` names it): gcp's pruned model recovered with GSA and
    with FT for each of ``LENGTHS`` but the recovered rows' own (``gcp_gsa``, ``gcp_ft``)."""
    for steps in other_lengths(bench.args):
        epochs, rest = divmod(steps, STEPS_PER_EPOCH)
        length = {"epochs": epochs} if rest == 0 else {"epochs": 1, "max_steps": steps}
        for recovery in ("gsa", "ft"):
            recover(bench, length_key(steps, recovery), recovery, **length)


def ship_stage(bench: Bench) -> None:
    """Ship seed 0's stage-1 model as ``gcp/assets/digits_sparse.pt``, the model ``gcp demo``'s stage 1 continues
    (20 demo steps cannot make γ sparse; this run's 2 epochs do), with its measured test mAP@0.5. Only when
    ``--stages`` names it: the asset changes what every later demo run measures."""
    if bench.args.seed != SHIP_SEED or not bench.done("sparse") or not bench.path("sparse.pt").is_file():
        print(f"ship: needs seed {SHIP_SEED}'s stage-1 model and its measurement (the sparse stage); skipped")
        return
    ship_asset(load_model(bench.path("sparse.pt")), bench.results["sparse"]["map50"], SHIPPED_SPARSE)
    print(f"[{now()}] shipped {bench.path('sparse.pt')} as {SHIPPED_SPARSE}", flush=True)


def report_stage(bench: Bench) -> None:
    """Write ``benchmarks/results/method_cpu.json`` and the RESULTS.md section from what has been measured
    (with ``--out``: ``method_cpu.json`` and ``RESULTS_section.md`` in that directory instead), and the γ
    histograms of the stage-1 model against the teacher's, group by group (paper Fig. 9), and the sweep's
    trade-off (paper Fig. 10) once the sweep measured something."""
    payload = write_report(bench)
    if bench.path("sparse.pt").is_file():
        plot_stage1_gammas(bench)
    if payload["sweep"]:
        path = bench.path("sweep.png") if bench.args.out else SWEEP_FIGURE
        plot_sweep(payload, path)
        print(f"[{now()}] wrote {path}", flush=True)


def plot_sweep(payload: dict[str, Any], path: Path) -> None:
    """Paper Fig. 10 at CPU scale: mAP@0.5 of each recipe against the share of MACs cut and against its ONNX
    Runtime latency (the teacher's accuracy dashed, its latency a star), seed ``SWEEP_SEED``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_macs, by_latency) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    series: dict[str, list[dict[str, Any]]] = {}
    for entry in payload["sweep"]:
        series.setdefault(f"{entry['method']} + {entry['recovery'].upper()}", []).append(entry)
    for index, (name, entries) in enumerate(series.items()):
        entries = sorted(entries, key=lambda e: e["macs_cut"] or 0.0)
        style = {"color": f"C{index}", "marker": "o", "label": name}
        by_macs.plot([100 * (e["macs_cut"] or 0.0) for e in entries], [e["map50"] for e in entries], **style)
        timed = [e for e in entries if e["latency_ms"] is not None]
        by_latency.plot([e["latency_ms"] for e in timed], [e["map50"] for e in timed], **style)
    teacher = payload["teacher_map50"]
    latency = payload["sweep_latency"]
    for ax in (by_macs, by_latency):
        if teacher is not None:
            ax.axhline(teacher, color="grey", linestyle="--", linewidth=1, label="teacher")
        ax.grid(alpha=0.3)
    if latency:
        by_latency.plot([latency["teacher_ms"]], [teacher], "k*", markersize=10, label="teacher (unpruned)")
        hardware = latency["machine"].split(", torch")[0]  # common.machine's CPU, cores and RAM
        by_latency.set_title(
            f"ONNX Runtime CPU, {latency['threads']} threads, batch 1\n{hardware}", fontsize=9
        )
    by_macs.set_xlabel("MACs cut (%)")
    by_macs.set_ylabel("mAP@0.5 (test)")
    by_latency.set_xlabel("latency, median (ms)")
    by_macs.set_title(f"seed {SWEEP_SEED}: accuracy against the share of MACs removed", fontsize=9)
    by_macs.legend(loc="lower left", fontsize=8)
    by_latency.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_stage1_gammas(bench: Bench) -> None:
    from gcp.app import plots
    from grouping import partition

    teacher, sparse = load_model(SHIPPED_TEACHER), load_model(bench.path("sparse.pt"))
    groups = partition(teacher, bench.example)
    path = bench.path("gammas.png") if bench.args.out else FIGURE
    plots.plot_gamma_histograms(
        plots.gammas_by_group(teacher, groups),
        plots.gammas_by_group(sparse, groups),
        path,
        title=f"|γ| per group: shipped teacher (before) and the benchmark's stage 1 (after), seed {bench.args.seed}",
    )
    print(f"[{now()}] wrote {path}", flush=True)


STAGES: dict[str, Callable[[Bench], None]] = {
    "teacher": teacher_stage,
    "sparse": sparse_stage,
    "dense": dense_stage,
    "tp_sparse": tp_sparse_stage,
    "prune": prune_stage,
    "recover": recover_stage,
    "table9": table9_stage,
    "sweep": sweep_stage,
    "lengths": lengths_stage,
    "ship": ship_stage,
    "report": report_stage,
}
#: What a run without ``--stages`` runs: every stage but the opt-in ones (``OPT_IN``).
DEFAULT_STAGES = [stage for stage in STAGES if stage not in OPT_IN]


# ------------------------------------------------------------------------------------------------- helpers


def written_here(name: str) -> bool:
    """Whether bench_method writes an entry called ``name`` into a run directory, or it is the temporary file
    of an atomic write of one (``gcp.io``: ``.<name>.<random>.tmp``, left behind by a kill)."""
    temporary = re.fullmatch(r"\.(.+)\.\w+\.tmp", name)
    return (temporary.group(1) if temporary else name) in RUN_FILES


def claim_run_dir(out: Path, results_path: Path, *, fresh: bool) -> None:
    """Start over (``fresh``), or refuse to resume a run directory whose measurements file is gone.

    Deleting only the measurements file once left finished fits and pruned models behind, which the next run
    resumed at once and recorded as new measurements; ``--fresh`` deletes both. It deletes only what
    bench_method writes, and only from a directory that holds nothing else, so a mistyped ``--out`` is refused
    rather than emptied.
    """
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if fresh:
        foreign = [entry.name for entry in entries if not written_here(entry.name)]
        if foreign:
            raise SystemExit(
                f"--fresh: refusing to clear {out}: it holds {', '.join(foreign)}, which bench_method does not"
                " write, so it is not a bench_method run directory"
            )
        for entry in entries:
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        results_path.unlink(missing_ok=True)
        print(f"[{now()}] --fresh: cleared {out} and {results_path}", flush=True)
        return
    earlier = [entry.name for entry in entries if written_here(entry.name)]
    if earlier and not results_path.is_file():
        raise SystemExit(
            f"{out} holds {', '.join(earlier)} from an earlier run, but its measurements ({results_path}) are"
            " gone: resuming would record that run's models as new measurements; --fresh starts over"
        )


def measurements(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The rows of a measurements file: every entry but the settings, wall minutes and rebuilds."""
    return {key: value for key, value in results.items() if key not in NOT_ROWS}


def origin(row: dict[str, Any]) -> tuple[str, str] | None:
    """The (commit, machine) a row was measured with; None for a row recorded before rows carried it."""
    provenance = row.get("provenance")
    return None if provenance is None else (provenance["commit"], provenance["machine"])


def where(place: tuple[str, str] | None) -> str:
    return "provenance not recorded per row" if place is None else f"commit {place[0]} on {place[1]}"


def sources(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows (and rebuilds) grouped by the commit and machine they were measured with, labelled 1, 2, ... in
    the order the file holds them; rows from before provenance was recorded per row are one group, "?"."""
    entries = [
        *measurements(results).items(),
        *((f"{key} (rebuilt)", value) for key, value in results.get("rebuilt", {}).items()),
    ]
    groups: dict[tuple[str, str] | None, list[tuple[str, dict[str, Any]]]] = {}
    for key, row in entries:
        groups.setdefault(origin(row), []).append((key, row))
    numbers = itertools.count(1)
    listed = []
    for place, members in groups.items():
        dates = sorted(row["provenance"]["date"] for _, row in members) if place else [None]
        listed.append(
            {
                "label": "?" if place is None else str(next(numbers)),
                "where": where(place),
                "commit": place[0] if place else None,
                "machine": place[1] if place else None,
                "first": dates[0],
                "last": dates[-1],
                "rows": [key for key, _ in members],
            }
        )
    return listed


def quiet(call: Callable[[], Any]) -> Any:
    """Run a prune call, printing its warnings once instead of letting them repeat."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    for message in {str(w.message) for w in caught}:
        print(f"warning: {message}", flush=True)
    return result


def sparse_fraction(model: nn.Module) -> float:
    gammas = torch.cat([m.weight.detach().abs().flatten() for m in prunable_norms(model).values()])
    return float((gammas < SPARSE_BELOW).float().mean())


def write_report(bench: Bench) -> dict[str, Any]:
    """``method_cpu.json`` and the RESULTS.md section from every seed's measurements (``seed_measurements``):
    the aggregate over the seeds first, then each seed's rows with where they were made."""
    per_seed = seed_measurements(bench)
    payload = aggregate(per_seed)
    body = render(payload, per_seed)
    title = "The method at CPU scale: stage 1 → prune at equal MACs → recovery"
    if bench.args.out:  # a probe or smoke run with its own directory leaves the recorded results alone
        atomic_write_json(bench.path("method_cpu.json"), payload)
        bench.path("RESULTS_section.md").write_text(f"## {title}\n\n{body}\n", encoding="utf-8")
    else:
        JSON_OUT.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(JSON_OUT, payload)
        write_section(title, body)
    print(json.dumps(payload, indent=1), flush=True)
    return payload


# ---------------------------------------------------------------------------------------- the seeds together

#: A seed's measurements file (not the variants beside it, such as ``..._seed0_recover3_avx2.json``).
SEED_FILE = re.compile(r"method_cpu_measurements_seed(\d+)\.json")
GSA = ("gcp", "gsa")
DENSE = ("dense", "none")
#: The rows of the aggregate table: gcp + GSA first (every pair compares it), the dense control last.
ROWS = (GSA, *((m, "ft") for m in METHODS), DENSE)


def row_key(method: str, recovery: str) -> str:
    """The measurement a row of the aggregate table reads."""
    return "dense_same_epochs" if (method, recovery) == DENSE else f"{method}_{recovery}"


def seed_measurements(bench: Bench) -> dict[int, dict[str, Any]]:
    """Every seed's measurements, by seed in increasing order: the ``method_cpu_measurements_seed<N>.json`` files
    beside this run's (``benchmarks/results``, or ``--out``) and this run's own, only ``--seeds`` when given. A
    seed without a measured row is left out."""
    found: dict[int, dict[str, Any]] = {}
    for path in bench.results_path.parent.glob("method_cpu_measurements_seed*.json"):
        match = SEED_FILE.fullmatch(path.name)
        if match:
            found[int(match.group(1))] = json.loads(path.read_text())
    if measurements(bench.results):
        found[bench.args.seed] = bench.results
    chosen = bench.args.seeds
    missing = [seed for seed in chosen or [] if not measurements(found.get(seed, {}))]
    if missing:
        print(f"report: no measurements for seeds {missing}: left out", flush=True)
    return {
        seed: found[seed]
        for seed in sorted(found)
        if measurements(found[seed]) and (chosen is None or seed in chosen)
    }


def aggregate(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """``method_cpu.json``: every list "per seed" has one value per seed, in the order of ``seeds``, None where
    that seed lacks the measurement; ``commit`` and ``machine`` list, per seed, those its rows were measured at
    and on (None for rows recorded before rows carried them); ``minutes`` is each seed's wall minutes."""
    results = list(per_seed.values())

    def each(key: str, field: str = "map50") -> list[Any]:
        return [r.get(key, {}).get(field) for r in results]

    teachers = [value for value in each("teacher") if value is not None]
    return {
        "teacher_map50": teachers[0] if teachers else None,  # the shipped model: the same on every seed
        "seeds": list(per_seed),
        "rows": [
            aggregate_row(results, method, recovery)
            for method, recovery in ROWS
            if any(row_key(method, recovery) in r for r in results)
        ],
        "sparse_map50": each("sparse"),
        "sparse_fraction_below_1e-2": each("sparse", "sparse_fraction"),
        "pruned_before_recovery_map50": each("pruned_gcp"),
        "sweep": sweep_entries(per_seed),
        "sweep_latency": sweep_latency(per_seed),
        "recovery_lengths": length_entries(per_seed),
        "commit": [places(r, 0) for r in results],
        "machine": [places(r, 1) for r in results],
        "minutes": [sum((r.get("wall_minutes") or {}).values()) for r in results],
    }


def sweep_entries(per_seed: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """The sweep on ``SWEEP_SEED`` (``sweep`` stage), each row at each share of the MACs measured, the share
    of ``--macs`` from the main rows; empty until the sweep measured something."""
    r = per_seed.get(SWEEP_SEED, {})
    if not any(key.startswith(OPT_IN["sweep"]) for key in r):
        return []
    timed = r.get("sweep_latency", {}).get("rows", {})
    entries = []
    for method, recovery in SWEEP_ROWS:
        for macs in SWEEP_MACS:
            main = abs(macs - r["settings"]["macs"]) < 1e-9
            key = f"{method}_{recovery}" if main else sweep_key(method, macs, recovery)
            pruned = f"pruned_{method}" if main else sweep_key(method, macs)
            if key in r:
                entries.append(
                    {
                        "method": method,
                        "recovery": recovery,
                        "share": macs,
                        "macs_cut": r.get(pruned, {}).get("macs_cut"),
                        "map50": r[key]["map50"],
                        "latency_ms": timed.get(pruned, {}).get("median_ms"),
                    }
                )
    return entries


def sweep_latency(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    """How the sweep's latencies were timed: the teacher's median, threads, runs, machine and date."""
    record = per_seed.get(SWEEP_SEED, {}).get("sweep_latency")
    if not record:
        return None
    provenance = record["provenance"]
    return {
        "teacher_ms": record["rows"]["teacher"]["median_ms"],
        "threads": record["threads"],
        "runs": record["runs"],
        "machine": provenance["machine"],
        "commit": provenance["commit"],
        "date": provenance["date"],
    }


def length_entries(per_seed: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """gcp's pruned model recovered with GSA and with FT at each recovery length (``lengths`` stage; the
    recovered rows at their own length), ``map50`` per seed; empty until the stage measured something."""
    results = list(per_seed.values())
    if not any(key.startswith(OPT_IN["lengths"]) for r in results for key in r):
        return []
    own, entries = recovery_steps(per_seed), []
    for steps in sorted(set(LENGTHS.values())):
        for recovery in ("gsa", "ft"):
            key = f"gcp_{recovery}" if steps == own else length_key(steps, recovery)
            values = [r.get(key, {}).get("map50") for r in results]
            if any(value is not None for value in values):
                entries.append({"recovery": recovery, "steps": steps, "map50": values})
    return entries


def aggregate_row(results: list[dict[str, Any]], method: str, recovery: str) -> dict[str, Any]:
    """One row of the aggregate: its scores per seed and the commit each was measured at; the cuts are the mean
    over the seeds (the dense control cuts nothing)."""
    key, dense = row_key(method, recovery), (method, recovery) == DENSE

    def cut(field: str) -> float | None:
        return 0.0 if dense else mean_sd([r.get(f"pruned_{method}", {}).get(field) for r in results])[0]

    return {
        "method": method,
        "recovery": recovery,
        "params_cut": cut("params_cut"),
        "macs_cut": cut("macs_cut"),
        "map50": [r.get(key, {}).get("map50") for r in results],
        "map": [r.get(key, {}).get("map") for r in results],
        "commit": [(origin(r[key]) or (None, None))[0] if key in r else None for r in results],
    }


def places(results: dict[str, Any], index: int) -> list[str | None]:
    """The commits (``index`` 0) or machines (1) a seed's rows were measured at, in the order of the file."""
    seen: list[str | None] = []
    for row in measurements(results).values():
        value = (origin(row) or (None, None))[index]
        if value not in seen:
            seen.append(value)
    return seen


def mixed_devices(payload: dict[str, Any], *series: Sequence[Any]) -> bool:
    """Whether the seeds that measured every one of ``series`` ran some on a CPU and some on a GPU: their
    scores are not averaged together."""
    kinds = {
        device_kind(machine)
        for i, machines in enumerate(payload["machine"])
        if all(values[i] is not None for values in series)
        for machine in machines
    }
    return len(kinds) > 1


def recovery_steps(per_seed: dict[int, dict[str, Any]]) -> int | None:
    """The training steps of the recovered rows (``gcp_gsa``, ``gcp_ft``): one length for every seed, or None."""
    steps = {own_steps(r["settings"]) for r in per_seed.values()}
    return steps.pop() if len(steps) == 1 else None


def fmt(value: Any, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


def render(payload: dict[str, Any], per_seed: dict[int, dict[str, Any]]) -> str:
    """The RESULTS.md section: the aggregate over the seeds and issue 25's targets, then each seed's rows
    (``render_seed``)."""
    if not per_seed:
        return "Not measured yet: no seed's measurements file holds a row."
    lines = render_aggregate(payload, recovery_steps(per_seed))
    for seed, results in per_seed.items():
        lines += ["", f"### Seed {seed}", "", render_seed(seed_summary(results, seed), results)]
    return "\n".join(lines)


def render_aggregate(payload: dict[str, Any], steps: int | None) -> list[str]:
    """The aggregate table: per row the mean ± standard deviation over the seeds that measured it (n), each
    seed's score, and gcp + GSA minus the row on the same seeds (mean paired difference ± its standard error)."""
    rows = {(row["method"], row["recovery"]): row for row in payload["rows"]}
    lines = [
        f"Seeds {', '.join(map(str, payload['seeds']))}. mAP@0.5 per row: mean ± standard deviation over the"
        " seeds that measured it (n), each seed's (in seed order), and gcp + GSA minus the row on the same seeds:"
        " mean paired difference ± its standard error (n pairs).",
        "",
        *machine_lines(payload),
        "",
        "| row | mAP@0.5 mean ± sd (n) | per seed | gcp + GSA − row: mean ± SE (n) | MACs cut |",
        "|---|---|---|---|---|",
        *(aggregate_line(payload, row, rows.get(GSA)) for row in payload["rows"]),
        *sweep_lines(payload),
        "",
        "Issue 25's targets (means over the seeds; pairs on the same seed):",
        *aggregate_verdicts(payload, steps),
    ]
    return lines


def sweep_lines(payload: dict[str, Any]) -> list[str]:
    """The sweep (``SWEEP_SEED``): mAP@0.5 of each row at each share of the MACs it was measured at."""
    rows: dict[str, list[str]] = {}
    for entry in payload["sweep"]:
        name = f"{entry['method']} + {entry['recovery'].upper()}"
        timed = f" ({entry['latency_ms']:.2f} ms)" if entry["latency_ms"] is not None else ""
        rows.setdefault(name, []).append(f"{fmt(entry['macs_cut'], '.0%')} {fmt(entry['map50'])}{timed}")
    if not rows:
        return []
    latency = payload["sweep_latency"]
    timing = (
        f" Latency: median of {latency['runs']} ONNX Runtime runs, CPU, {latency['threads']} threads, batch 1"
        f" (teacher {latency['teacher_ms']:.2f} ms), {latency['machine']}, {latency['date']}."
        if latency
        else " Latency not timed yet."
    )
    return [
        "",
        f"Sweep, seed {SWEEP_SEED} (MACs cut: mAP@0.5): "
        + "; ".join(f"{k}: {', '.join(v)}" for k, v in rows.items())
        + f". Plot: `benchmarks/figures/{SWEEP_FIGURE.name}`."
        + timing,
    ]


def machine_lines(payload: dict[str, Any]) -> list[str]:
    """Where each seed was measured, and whether the seeds' machines differ (or mix CPUs and GPUs)."""
    lines = ["Measured (per seed):"]
    for seed, commits, machines in zip(payload["seeds"], payload["commit"], payload["machine"]):
        named = [m or "machine not recorded per row" for m in machines]
        lines.append(
            f"- seed {seed}: {' + '.join(named)}; commit {', '.join(c or 'not recorded per row' for c in commits)}"
        )
    distinct = {m for machines in payload["machine"] for m in machines}
    if len(distinct) > 1:
        lines.append(
            f"**The seeds were measured on {len(distinct)} different machines (or some without a record of"
            " it): the means and differences below are over them all, not over one machine's runs.**"
        )
    if len({device_kind(m) for m in distinct}) > 1:
        lines.append(
            "**Some seeds ran on a CPU and some on a GPU: such rows are not averaged together (—).**"
        )
    return lines


def aggregate_line(payload: dict[str, Any], row: dict[str, Any], gsa: dict[str, Any] | None) -> str:
    dense = (row["method"], row["recovery"]) == DENSE
    name = "dense control, same epochs" if dense else f"{row['method']} + {row['recovery'].upper()}"
    mixed = "not averaged: CPU and GPU seeds"
    mean, sd, n = mean_sd(row["map50"])
    spread = mixed if mixed_devices(payload, row["map50"]) else f"{fmt(mean)} ± {fmt(sd)} (n = {n})"
    if gsa is None or row is gsa:
        difference = "—"
    elif mixed_devices(payload, gsa["map50"], row["map50"]):
        difference = mixed
    else:
        d, se, pairs = paired(gsa["map50"], row["map50"])
        difference = f"{fmt(d, '+.3f')} ± {fmt(se)} (n = {pairs})"
    per_seed = " / ".join(fmt(value) for value in row["map50"])
    return f"| {name} | {spread} | {per_seed} | {difference} | {fmt(row['macs_cut'], '.1%')} |"


def verdict(name: str, met: bool | None, detail: str = "") -> str:
    word = "not measured" if met is None else "met" if met else "missed"
    return f"- {name}: {word}" + (f" ({detail})" if detail else "")


def combined(results: Sequence[bool | None]) -> bool | None:
    """Missed if any part is, met if every part is (and there is one), else not measured."""
    if any(result is False for result in results):
        return False
    return True if results and all(results) else None


def pair_verdict(
    payload: dict[str, Any],
    name: str,
    a: Sequence[float | None] | None,
    b: Sequence[float | None] | None,
    test: Callable[[float, float | None], bool | None],
) -> tuple[str, bool | None]:
    """The verdict on ``test(mean paired difference a − b, its standard error)`` over the seeds with both."""
    if a is None or b is None:
        return verdict(name, None), None
    if mixed_devices(payload, a, b):
        return verdict(name, None, "CPU and GPU seeds are not averaged together"), None
    d, se, n = paired(a, b)
    if n == 0:
        return verdict(name, None), None
    met = test(d, se)
    detail = f"mean paired difference {d:+.3f} ± SE {fmt(se)}, n = {n}" + (", no SE" if se is None else "")
    return verdict(name, met, detail), met


def aggregate_verdicts(payload: dict[str, Any], steps: int | None) -> list[str]:
    """One line per target of issue 25: met, missed or not measured (the pairs' lines below their target's)."""
    rows = {(row["method"], row["recovery"]): row["map50"] for row in payload["rows"]}
    gsa = rows.get(GSA)
    dense, _ = pair_verdict(
        payload, "gcp + GSA ≥ dense control − 0.02", gsa, rows.get(DENSE), lambda d, se: d >= -0.02
    )
    others = [
        pair_verdict(
            payload,
            f"vs {method} + {recovery.upper()}",
            gsa,
            values,
            lambda d, se: None if se is None else d >= 0.03 and d > 2 * se,
        )
        for (method, recovery), values in rows.items()
        if (method, recovery) not in (GSA, DENSE)
    ]
    name = "gcp + GSA ≥ every other pruned row + 0.03, mean paired difference > 2 × SE"
    return [
        stage1_verdict(payload),
        dense,
        verdict(name, combined([met for _, met in others])),
        *(f"  {line}" for line, _ in others),
        *lengths_verdicts(payload, rows, steps),
        *sweep_verdicts(payload["sweep"]),
    ]


def sweep_verdicts(sweep: list[dict[str, Any]]) -> list[str]:
    """gcp + GSA at or above every other recipe at each share of the MACs the sweep asked for (one seed: no
    standard error; a share where a recipe is missing is not measured)."""
    lines = []
    for share in SWEEP_MACS:
        at = {(e["method"], e["recovery"]): e["map50"] for e in sweep if abs(e["share"] - share) < 1e-9}
        others = {key: value for key, value in at.items() if key != GSA}
        if GSA not in at or len(others) < len(SWEEP_ROWS) - 1:
            lines.append((verdict(f"at {share:.0%} of the MACs", None), None))
            continue
        (method, recovery), best = max(others.items(), key=lambda item: item[1])
        lead = at[GSA] - best
        detail = f"gcp + GSA {at[GSA]:.3f}, best other {method} + {recovery.upper()} {best:.3f}: {lead:+.3f}"
        lines.append((verdict(f"at {share:.0%} of the MACs", lead >= 0, detail), lead >= 0))
    name = f"on the sweep (seed {SWEEP_SEED}), gcp + GSA ≥ every other recipe at every MACs cut"
    return [verdict(name, combined([met for _, met in lines])), *(f"  {line}" for line, _ in lines)]


def lengths_verdicts(
    payload: dict[str, Any], rows: dict[tuple[str, str], list], steps: int | None
) -> list[str]:
    """GSA ≥ FT (gcp's pruned model) at each of issue 25's recovery lengths: the ``recovery_lengths``
    measurements, and the recovered rows at their own length (``steps``)."""
    at: dict[int, dict[str, list]] = {}
    for entry in payload["recovery_lengths"]:
        at.setdefault(entry["steps"], {})[entry["recovery"]] = entry["map50"]
    if steps is not None and GSA in rows and ("gcp", "ft") in rows:
        at.setdefault(steps, {"gsa": rows[GSA], "ft": rows[("gcp", "ft")]})
    lines = [
        pair_verdict(
            payload,
            f"at {label}" + ("" if label.endswith("steps") else f" ({length} steps)"),
            at.get(length, {}).get("gsa"),
            at.get(length, {}).get("ft"),
            lambda d, se: d >= 0,
        )
        for label, length in LENGTHS.items()
    ]
    name = f"GSA ≥ FT at each recovery length ({', '.join(LENGTHS)})"
    return [verdict(name, combined([met for _, met in lines])), *(f"  {line}" for line, _ in lines)]


def stage1_verdict(payload: dict[str, Any]) -> str:
    """Stage 1 makes ≥ 40 % of γ < 1e-2, loses ≤ 0.03 mAP@0.5 against the teacher, and gcp's pruning then
    costs ≤ 0.03 before recovery: means over the seeds."""
    name = "stage 1: ≥ 40 % of γ < 1e-2, ≤ 0.03 mAP@0.5 lost, pruning cost ≤ 0.03 before recovery"
    sparse, pruned = payload["sparse_map50"], payload["pruned_before_recovery_map50"]
    if mixed_devices(payload, sparse) or mixed_devices(payload, sparse, pruned):
        return verdict(name, None, "CPU and GPU seeds are not averaged together")
    fraction, _, n = mean_sd(payload["sparse_fraction_below_1e-2"])
    lost = paired([payload["teacher_map50"]] * len(sparse), sparse)[0]
    cost = paired(sparse, pruned)[0]
    met = combined(
        [
            None if fraction is None else fraction >= 0.40,
            None if lost is None else lost <= 0.03,
            None if cost is None else cost <= 0.03,
        ]
    )
    detail = f"{fmt(fraction, '.1%')} of γ < 1e-2, {fmt(lost, '.3f')} lost, pruning cost {fmt(cost, '.3f')}"
    return verdict(name, met, f"{detail}; n = {n}" if n else "")


# ---------------------------------------------------------------------------------------------- one seed


def seed_summary(r: dict[str, Any], seed: int) -> dict[str, Any]:
    """One seed's numbers as its section shows them (issue 12's format: each value of that seed alone)."""
    teacher = r.get("teacher", {})
    rows = []
    for method, recovery in [GSA] + [(m, "ft") for m in METHODS]:
        key = f"{method}_{recovery}"
        if key not in r:
            continue
        pruned = r.get(f"pruned_{method}", {})
        rows.append(
            {
                "method": method,
                "recovery": recovery,
                "params_cut": pruned.get("params_cut"),
                "macs_cut": pruned.get("macs_cut"),
                "map50": r[key]["map50"],
                "map": r[key]["map"],
            }
        )
    return {
        "teacher_map50": teacher.get("map50"),
        "dense_same_epochs_map50": r.get("dense_same_epochs", {}).get("map50"),
        "sparse_map50": r.get("sparse", {}).get("map50"),
        "sparse_fraction_below_1e-2": r.get("sparse", {}).get("sparse_fraction"),
        "pruned_before_recovery_map50": r.get("pruned_gcp", {}).get("map50"),
        "rows": rows,
        "table9": {
            k: r.get(k, {}).get("map50")
            for k in ("sparse", "sparse_constant", "table9_sparse_pruned", "table9_sparse_constant_pruned")
        },
        "table10": {m: r.get(f"pruned_{m}", {}).get("map50") for m in ("gcp", "slim")},
        "minutes": sum(v.get("train_minutes", 0.0) for v in measurements(r).values()),
        "wall_minutes": r.get("wall_minutes"),
        "seed": seed,
        "report_date": now(),
        "sources": sources(r),
        "settings": r["settings"],
    }


def render_seed(payload: dict[str, Any], r: dict[str, Any]) -> str:
    """One seed's section: every row with the label of where it was measured (``sources``), never the commit or
    machine of the run that writes the report."""
    lines = [
        f"Command: `python benchmarks/bench_method.py --seed {payload['seed']}`; report written"
        f" {payload['report_date']}; training minutes so far {payload['minutes']:.1f}, wall minutes so far"
        f" {wall_total(payload):.1f} ({wall_parts(payload)}). Settings: {json.dumps(payload['settings'])}.",
        "",
        'Where each row was measured (column "measured"):',
        *(source_line(source, len(payload["sources"])) for source in payload["sources"]),
        "",
        "mAP@0.5 is pycocotools' 101-point interpolation on the 500-image DigitScenes test split. GSA's teacher is"
        " the shipped teacher (the paper's original network, §5.4). Other stage-1 settings tried with this"
        " command are in docs/notes/sparse_training.md.",
        "",
        *seed_table(payload, r),
        "",
        "Targets, from the numbers above:",
        *verdicts(payload, missing_rows(r)),
        *seed_notes(payload, r),
    ]
    return "\n".join(lines)


def row_labels(payload: dict[str, Any]) -> Callable[[str], str]:
    """The label of where the measurement ``key`` was made (``sources``), "—" for one not made."""
    labels = {key: source["label"] for source in payload["sources"] for key in source["rows"]}
    return lambda key: labels.get(key, "—")


def seed_table(payload: dict[str, Any], r: dict[str, Any]) -> list[str]:
    at = row_labels(payload)
    lines = [
        "| model | mAP@0.5 | mAP@0.5:0.95 | params cut | MACs cut | paper (VOC) | measured |",
        "|---|---|---|---|---|---|---|",
        f"| teacher (shipped) | {fmt(payload['teacher_map50'])} | {fmt(r.get('teacher', {}).get('map'))} | — | — | {PAPER_STAGES['teacher']} | {at('teacher')} |",
        f"| dense, same extra epochs | {fmt(payload['dense_same_epochs_map50'])} | {fmt(r.get('dense_same_epochs', {}).get('map'))} | — | — | — | {at('dense_same_epochs')} |",
        f"| after stage 1 (sparse), {fmt(payload['sparse_fraction_below_1e-2'], '.1%')} of γ < 1e-2 | {fmt(payload['sparse_map50'])} | {fmt(r.get('sparse', {}).get('map'))} | — | — | {PAPER_STAGES['sparse']} | {at('sparse')} |",
    ]
    for key, label in (
        ("dense_e1", "dense, stage 1's epochs (tp_magnitude's start)"),
        (
            "tp_sparse",
            "torch-pruning `regularize()` sparse learning, stage 1's epochs (tp_groupnorm's start)",
        ),
    ):
        if key in r:
            lines.append(
                f"| {label} | {fmt(r[key]['map50'])} | {fmt(r[key]['map'])} | — | — | — | {at(key)} |"
            )
    for method in METHODS:
        pruned = r.get(f"pruned_{method}")
        if pruned:
            lines.append(
                f"| {method}, pruned, before recovery | {fmt(pruned['map50'])} | {fmt(pruned['map'])} |"
                f" {fmt(pruned.get('params_cut'), '.1%')} | {fmt(pruned.get('macs_cut'), '.1%')} | — |"
                f" {at(f'pruned_{method}')} |"
            )
    for row in payload["rows"]:
        paper = PAPER_ROWS.get((row["method"], row["recovery"]), "—")
        lines.append(
            f"| **{row['method']} + {row['recovery'].upper()}** | {fmt(row['map50'])} | {fmt(row['map'])} |"
            f" {fmt(row['params_cut'], '.1%')} | {fmt(row['macs_cut'], '.1%')} | {paper} |"
            f" {at(row['method'] + '_' + row['recovery'])} |"
        )
    return lines


def missing_rows(r: dict[str, Any]) -> list[str]:
    """The measurements of the full command that the seed's file does not hold yet."""
    expected = ("dense_same_epochs", "tp_sparse", "sparse_constant", *(f"{m}_ft" for m in METHODS), "gcp_gsa")
    return [key for key in expected if key not in r]


def seed_notes(payload: dict[str, Any], r: dict[str, Any]) -> list[str]:
    """What the seed has not measured yet, its rebuilt models, and Tables 9 and 10."""
    at = row_labels(payload)
    lines = []
    missing = missing_rows(r)
    if missing:
        lines += [
            "",
            f"Not measured yet: {', '.join(missing)}. Every stage resumes: the same command runs only what is missing.",
        ]
    rebuilt = r.get("rebuilt", {})
    if rebuilt:
        lines += [
            "",
            "Rebuilt by a later run (the run directory had gone; same seed and settings), scored against the"
            " recorded measurement; their minutes are redone work, not in the totals above: "
            + "; ".join(
                f"{key} {v['map50']:.4f} vs {v['recorded_map50']:.4f} ({v['minutes']:.1f} min,"
                f" measured {at(f'{key} (rebuilt)')})"
                for key, v in rebuilt.items()
            )
            + ".",
        ]
    lcp = r.get("pruned_lcp", {})
    if "lcp_seconds" in lcp:
        name, seconds = lcp["lcp_slowest"]
        lines += [
            "",
            f"LCP's channel ranking took {lcp['lcp_seconds']:.0f} s for its {lcp['lcp_layers']} layers (issue 27's"
            f" limit: 20 min), the slowest `{name}` at {seconds:.1f} s; each layer's time is in pruned_lcp.pt's"
            ' report (`report["lcp"]["seconds"]`).',
        ]
    t9 = {key: f"{fmt(value)} [{at(key)}]" for key, value in payload["table9"].items()}
    t10 = {m: f"{fmt(value)} [{at(f'pruned_{m}')}]" for m, value in payload["table10"].items()}
    return lines + [
        "",
        "Table 9 (schedule, equal steps; mAP@0.5 after stage 1 / after gcp pruning at the same MACs, before"
        f" recovery; [where measured]): dynamic {t9['sparse']} / {t9['table9_sparse_pruned']}; constant"
        f" {t9['sparse_constant']} / {t9['table9_sparse_constant_pruned']} (paper, Table 9, after sparse"
        f" training: dynamic {PAPER_STAGES['sparse']} vs constant {PAPER_STAGES['sparse_constant']}).",
        f"Table 10 (before recovery, same MACs): group thresholds (gcp) {t10['gcp']}, one global"
        f" threshold (slim) {t10['slim']}.",
        "",
        f"Stage 1's |γ| per group against the teacher's: `benchmarks/figures/{FIGURE.name}` (the report stage).",
    ]


def source_line(source: dict[str, Any], count: int) -> str:
    rows = "every row" if count == 1 else ", ".join(source["rows"])
    if source["commit"] is None:
        return (
            f"- {source['label']}: {source['where']} (measured before bench_method recorded each row's commit,"
            f" machine, date and settings; the file's history in git says when): {rows}"
        )
    return f"- {source['label']}: {source['where']}, {source['first']} to {source['last']}: {rows}"


def wall_total(payload: dict[str, Any]) -> float:
    return sum((payload.get("wall_minutes") or {}).values())


def wall_parts(payload: dict[str, Any]) -> str:
    wall = payload.get("wall_minutes") or {}
    if not wall:
        return "none recorded"
    parts = ", ".join(f"{k} {v:.1f}" for k, v in wall.items())
    return parts if "setup" in wall else f"{parts}; setup (data generation) not recorded"


def verdicts(payload: dict[str, Any], missing: Sequence[str] = ()) -> list[str]:
    """One line per target of issue 12 §6: met, missed (by how much) or not measured yet. ``missing``: the
    measurements of the full command not made yet, without which its wall time is a lower bound."""
    teacher, dense = payload["teacher_map50"], payload["dense_same_epochs_map50"]
    sparse, fraction = payload["sparse_map50"], payload["sparse_fraction_below_1e-2"]
    pruned = payload["pruned_before_recovery_map50"]
    rows = {(row["method"], row["recovery"]): row["map50"] for row in payload["rows"]}
    gsa = rows.get(("gcp", "gsa"))
    others = [v for k, v in rows.items() if k != ("gcp", "gsa")]

    def line(name: str, value: float | None, goal: float | None, text: str) -> str:
        if value is None or goal is None:
            return f"- {name}: not measured yet"
        return f"- {name}: {'met' if value >= goal else 'MISSED'} ({text})"

    return [
        line(
            "γ < 1e-2 after stage 1 ≥ 40 %", fraction, 0.40, f"{fraction:.1%}" if fraction is not None else ""
        ),
        line(
            "stage-1 mAP@0.5 drop ≤ 0.03",
            None if sparse is None or teacher is None else -(teacher - sparse),
            -0.03,
            f"{sparse:.3f} vs teacher {teacher:.3f}" if sparse is not None and teacher is not None else "",
        ),
        line(
            "pruning costs ≤ 0.03 before recovery",
            None if pruned is None or sparse is None else -(sparse - pruned),
            -0.03,
            f"{pruned:.3f} vs sparse {sparse:.3f}" if pruned is not None and sparse is not None else "",
        ),
        line(
            "gcp + GSA ≥ teacher − 0.02",
            gsa,
            None if teacher is None else teacher - 0.02,
            f"{gsa:.3f} vs {teacher - 0.02:.3f}" if gsa is not None and teacher is not None else "",
        ),
        line(
            "gcp + GSA ≥ dense control − 0.03",
            gsa,
            None if dense is None else dense - 0.03,
            f"{gsa:.3f} vs {dense - 0.03:.3f}" if gsa is not None and dense is not None else "",
        ),
        line(
            "gcp + GSA ≥ every other pruned row + 0.03 (rows measured so far)",
            gsa,
            max(others) + 0.03 if others else None,
            f"{gsa:.3f} vs best other {max(others):.3f}" if gsa is not None and others else "",
        ),
        whole_command_line(payload.get("wall_minutes") or {}, missing),
    ]


def whole_command_line(wall: dict[str, float], missing: Sequence[str] = ()) -> str:
    """The ≤ 150 min target of the whole command: setup (data generation) and every stage it runs without
    ``--stages`` (the opt-in ones, ``OPT_IN``, are other commands). Minutes recorded without the setup, or before
    every row is measured (``missing``), are a lower bound only, which can miss the target but not meet it."""
    name = "the whole command ≤ 150 min (wall: setup and every stage)"
    opt_in = sorted(stage for stage in wall if stage in OPT_IN)
    wall = {stage: minutes for stage, minutes in wall.items() if stage not in OPT_IN}
    total = sum(wall.values())
    if not wall:
        return f"- {name}: not measured yet"
    if opt_in:
        name += f", not the opt-in {', '.join(opt_in)}"
    unknown = ([f"not run yet: {', '.join(missing)}"] if missing else []) + (
        [] if "setup" in wall else ["that run did not record its setup"]
    )
    if unknown and total <= 150.0:
        return f"- {name}: not known ({total:.1f} min for the stages; {'; '.join(unknown)})"
    setup = "" if "setup" in wall else ", setup not recorded"
    return f"- {name}: {'met' if total <= 150.0 else 'MISSED'} ({total:.1f} min{setup})"


def run_stages(bench: Bench, names: Sequence[str]) -> None:
    """Run the stages ``names`` in order. A model file or training checkpoint that cannot be read (a
    ``fits/<name>/last.pt`` cut short by a kill, a damaged model) ends the run with its one-line ModelFileError,
    as it ends a ``gcp`` command, instead of a torch traceback."""
    try:
        for name in names:
            start = time.perf_counter()
            print(f"[{now()}] stage {name} ...", flush=True)
            bench.begin_stage(name)
            STAGES[name](bench)
            bench.tick()
            print(f"[{now()}] stage {name} done in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    except ModelFileError as error:
        raise SystemExit(f"bench_method: error: {error}") from None


def main() -> None:
    args = parse_args()
    unknown = [s for s in args.stages or [] if s not in STAGES]
    if unknown:
        raise SystemExit(f"unknown stages {unknown}; choose from {list(STAGES)}")
    bench = Bench(args)
    bench.load_data()
    run_stages(bench, args.stages or DEFAULT_STAGES)


if __name__ == "__main__":
    main()
