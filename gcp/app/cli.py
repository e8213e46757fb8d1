"""The ``gcp`` command: each stage of the method as a subcommand over one run directory, and ``gcp demo``.

Every subcommand reads a YAML config (``--config``, default the packaged ``demo``), applies ``--set key=value``
overrides and its own flags (which are shortcuts for config keys), and works inside ``--run-dir``; the stages
hand over through the files described in :mod:`gcp.app.pipeline`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from gcp.app.compress import compress
from gcp.app.config import (
    BUDGETS,
    DEFAULT_CONFIG,
    PRUNE_METHODS,
    ConfigError,
    load_config,
    resolve_config_path,
)
from gcp.app.pipeline import (
    Context,
    RunDir,
    RunError,
    distill_stage,
    eval_stage,
    export_stage,
    finetune_stage,
    format_table,
    latency_stage,
    plot_stage,
    prune_stage,
    run_demo,
    sparse_train_stage,
    train_stage,
)
from gcp.core.serialize import ModelFileError
from gcp.detection.data import DatasetError

EPILOG = """\
stages and the files they hand over (all inside --run-dir):
  gcp train          -> trained.pt
  gcp sparse-train   trained.pt -> sparse.pt, sparsity_history.json
  gcp prune          sparse.pt (or trained.pt) -> pruned_<method>.pt, prune_<method>.json
  gcp finetune       pruned_<method>.pt -> finetuned_<method>.pt
  gcp distill        pruned_<method>.pt + trained.pt (teacher) -> distilled_<method>.pt
  gcp eval | export | bench | plot   model files -> report.json, export/, plots/
  gcp demo           all of the above on DigitScenes, starting from the shipped teacher
  gcp compress       your model + data.yaml -> the three stages, evaluation, ONNX, latency and report.md
  (model.name: ultralytics: every file is an Ultralytics checkpoint, trained.pt is model.weights imported,
  and every training stage runs Ultralytics' trainer on data.yaml; see the packaged config ultralytics)

examples:
  gcp demo
  gcp compress --model runs/detect/train/weights/best.pt --data data.yaml --target macs=0.4 --run-dir runs/c
  gcp train --config paper_yolov4_voc --set data.root=/data/VOCdevkit --run-dir runs/voc
  gcp prune --config paper_yolov4_voc --run-dir runs/voc --method slim --ratio 0.4
  gcp sparse-train --config ultralytics --set data.yaml=data.yaml --set model.weights=best.pt --set model.num_classes=3
"""


def _common_options() -> argparse.ArgumentParser:
    """The parent parser of every subcommand: config, overrides, run directory, resume/overwrite, device."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("run options (every subcommand)")
    group.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help="YAML config file, or the name of a packaged config (demo, paper_yolov4_voc, ultralytics); "
        "default: %(default)s",
    )
    group.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, value parsed as YAML (repeatable), e.g. --set prune.ratio=0.4",
    )
    group.add_argument(
        "--run-dir",
        type=Path,
        help="directory holding every file of the run (default: runs/<config name>)",
    )
    claim = group.add_mutually_exclusive_group()
    claim.add_argument(
        "--resume",
        action="store_true",
        help="continue a run: finished outputs are kept, interrupted training resumes from fits/<stage>/last.pt",
    )
    claim.add_argument(
        "--overwrite",
        action="store_true",
        help="delete what this command wrote before (train and demo: the whole run directory) and start over",
    )
    group.add_argument(
        "--device", help="cpu, cuda, cuda:N or auto (CUDA when available); overrides the config's device"
    )
    group.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return common


# ---------------------------------------------------------------- options shared by several subcommands


def _checkpoints(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--checkpoint",
        dest="checkpoints",
        action="append",
        type=Path,
        metavar="PATH",
        help=f"model file to {what} (repeatable; default: every model file in the run directory)",
    )


def _method(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--method", choices=PRUNE_METHODS, help=help_text)


def _pruned_input(parser: argparse.ArgumentParser, verb: str) -> None:
    """--method of a stage that recovers a pruned model: which pruned_<method>.pt it reads."""
    _method(parser, f"which pruned_<method>.pt to {verb} (default: prune.method)")


def _teacher(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--teacher", type=Path, help=help_text)


# Adds one subcommand with the run options: add(name, one-line help, description) -> its parser.
AddCommand = Callable[[str, str, str], argparse.ArgumentParser]


# ------------------------------------------------------------------------------ one function per subcommand


def _train_command(add: AddCommand) -> None:
    add(
        "train",
        "train the unpruned detector",
        "Train the detector of the config's model section (from model.weights, or from scratch) with the "
        "train section's schedule; writes trained.pt. Refuses an existing run directory unless --resume or "
        "--overwrite.",
    )


def _sparse_train_command(add: AddCommand) -> None:
    sparse = add(
        "sparse-train",
        "sparse training on BatchNorm γ (paper §4.1)",
        "L1 penalty on BatchNorm γ (paper eq. 3) while training trained.pt with the sparsity section's schedule; "
        "writes sparse.pt and sparsity_history.json.",
    )
    sparse.add_argument(
        "--schedule",
        choices=("dynamic", "constant"),
        help="dynamic: the paper's rate that decays for the most important channels after sparsity.switch_at; "
        "constant: Network Slimming's fixed rate (sets sparsity.schedule)",
    )
    sparse.add_argument(
        "--weights", type=Path, help="model file to sparse-train instead of the run's trained.pt"
    )


def _prune_command(add: AddCommand) -> None:
    prune = add(
        "prune",
        "prune channels (paper §4.2, or a baseline method)",
        "Remove channels from sparse.pt (prune.source=trained: trained.pt) with the chosen method until "
        "--ratio of --budget is gone; writes pruned_<method>.pt and prune_<method>.json.",
    )
    _method(
        prune,
        "gcp: group channel pruning (per-group thresholds); slim: Network Slimming (one global γ threshold); "
        "thinet: next-layer reconstruction; l1: filter norm; random (sets prune.method)",
    )
    prune.add_argument(
        "--ratio", type=float, help="fraction of the budget to remove, in (0, 1) (prune.ratio)"
    )
    prune.add_argument(
        "--budget",
        choices=BUDGETS,
        help="what --ratio counts: BatchNorm channels (the paper's), parameters, MACs or ONNX Runtime latency "
        "measured per layer on this machine (prune.budget)",
    )
    prune.add_argument(
        "--allocator",
        choices=("valley", "paper", "explicit"),
        help="how gcp turns the total ratio into per-group thresholds: valley (between the near-zero and the "
        "important mode of each group's |γ|), paper (§4.2.2 as written), explicit (prune.group_ratios) "
        "(prune.allocator)",
    )
    prune.add_argument(
        "--groups",
        help="'auto' (partition by feature scale and structure, §4.2.1) or a YAML file of group name -> glob "
        "patterns of BatchNorm names (prune.groups)",
    )


def _finetune_command(add: AddCommand) -> None:
    finetune = add(
        "finetune",
        "fine-tune a pruned model with the detection loss",
        "Fine-tune pruned_<method>.pt with the finetune section's schedule; writes finetuned_<method>.pt.",
    )
    _pruned_input(finetune, "fine-tune")


def _distill_command(add: AddCommand) -> None:
    distill = add(
        "distill",
        "recover a pruned model by group spatial attention distillation (paper §4.3)",
        "Train pruned_<method>.pt with attention, soft-target and detection losses (paper eq. 4) taught by the "
        "unpruned trained.pt, with the distill section's schedule and betas; writes distilled_<method>.pt.",
    )
    _pruned_input(distill, "distil")
    _teacher(distill, "unpruned teacher model file (default: the run's trained.pt)")


def _eval_command(add: AddCommand) -> None:
    evaluate = add(
        "eval",
        "mAP, params, MACs and size of model files",
        "Evaluate model files on the eval section's split (pycocotools mAP@0.5 and mAP@0.5:0.95) and count "
        "params and MACs; results go to report.json.",
    )
    _checkpoints(evaluate, "evaluate")
    evaluate.add_argument("--split", choices=("train", "val", "test"), help="split to score")


def _export_command(add: AddCommand) -> None:
    export = add(
        "export",
        "export models to ONNX or TensorRT",
        "Export model files to export/<name>.onnx, each checked against PyTorch in ONNX Runtime; tensorrt "
        "also builds export/<name>.engine (needs a CUDA GPU and the tensorrt package).",
    )
    export.add_argument("format", choices=("onnx", "tensorrt"), help="what to export to")
    _checkpoints(export, "export")


def _plot_command(add: AddCommand) -> None:
    plot = add(
        "plot",
        "draw the paper's figures for this run",
        "gammas: |γ| per group before/after sparse training (Fig. 8/9); sparsity: γ distribution over the "
        "sparse-training epochs (Fig. 11); tradeoff: mAP@0.5 against pruning ratio per method (Fig. 10). "
        "Written to plots/<kind>.png.",
    )
    plot.add_argument("kind", choices=("gammas", "sparsity", "tradeoff"), help="which figure")


def _bench_command(add: AddCommand) -> None:
    bench = add(
        "bench",
        "measure inference latency",
        "Export one model per architecture to ONNX and time them together, interleaved, in ONNX Runtime (and "
        "TensorRT with --tensorrt); latency goes to report.json.",
    )
    bench.add_argument("kind", choices=("latency",), help="what to measure")
    _checkpoints(bench, "time")
    bench.add_argument("--runs", type=int, help="timed runs per model")
    bench.add_argument("--warmup", type=int, help="untimed runs first")
    bench.add_argument(
        "--tensorrt",
        action="store_const",
        const=True,
        help="also time TensorRT engines (CUDA GPU and tensorrt package needed)",
    )


def _demo_command(add: AddCommand) -> None:
    demo = add(
        "demo",
        "the whole method on DigitScenes: 9-12 min on 2 CPU cores",
        "Start from the shipped teacher (gcp/assets/digits_teacher.pt), sparse-train it, prune it with every "
        "demo.methods entry at the same budget, recover each pruned model by fine-tuning and by GSA "
        "distillation, evaluate everything, export to ONNX, time ONNX Runtime, draw the plots and print one "
        "comparison table. Sizes and epochs come from the config (default: the packaged demo config).",
    )
    _teacher(demo, "model file to start from instead of the shipped teacher")


def _compress_command(add: AddCommand) -> None:
    compress_parser = add(
        "compress",
        "your trained model and data -> a smaller model, evaluated, exported and reported",
        "The paper's three stages on your model and data in one run directory: stage 1 sparse training -> "
        "group channel pruning to --target -> GSA recovery taught by the original model -> evaluation of the "
        "original, pruned and recovered models -> ONNX export checked in ONNX Runtime and timed against the "
        "original -> report.md and report.json. Every input is checked before training starts and is only "
        "read; a killed run continues with --resume. --config is optional here (the default demo config of "
        "the other commands is not used): without it the config comes from the model, the data, the target "
        "and defaults derived from the training set's size; --set overrides any key.",
    )
    compress_parser.add_argument(
        "--model",
        required=True,
        type=Path,
        help="the trained model: an Ultralytics checkpoint (.pt) or model YAML, or a gcp model file",
    )
    compress_parser.add_argument(
        "--data", type=Path, help="the Ultralytics data.yaml (or give the data through --config)"
    )
    compress_parser.add_argument(
        "--target",
        default="macs=0.4",
        help="share to remove: macs=R, params=R or latency=R (ONNX Runtime), R in (0, 1); default: %(default)s",
    )
    compress_parser.add_argument(
        "--sparse-epochs", type=int, help="stage 1 epochs (default: from the training set's size)"
    )
    compress_parser.add_argument(
        "--recover-epochs", type=int, help="stage 3 epochs (default: from the training set's size)"
    )
    compress_parser.add_argument(
        "--imgsz", type=int, help="image size (default: the config's data.size; 640 for Ultralytics)"
    )


# In the order `gcp --help` lists them.
SUBCOMMANDS: tuple[Callable[[AddCommand], None], ...] = (
    _train_command,
    _sparse_train_command,
    _prune_command,
    _finetune_command,
    _distill_command,
    _eval_command,
    _export_command,
    _plot_command,
    _bench_command,
    _demo_command,
    _compress_command,
)


def build_parser() -> argparse.ArgumentParser:
    """The ``gcp`` argument parser (one subparser per stage, each added by its function in SUBCOMMANDS)."""
    parser = argparse.ArgumentParser(
        prog="gcp",
        description="Group channel pruning, dynamic sparse training and group spatial attention distillation "
        "for object detectors (Chu et al., arXiv 2306.01526).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = [_common_options()]

    def add(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=common, help=help_text, description=description)

    for add_subcommand in SUBCOMMANDS:
        add_subcommand(add)
    return parser


# Flags that are shortcuts for one config key each (applied after --set, so the flag wins).
SHORTCUTS = {
    "schedule": "sparsity.schedule",
    "split": "eval.split",
    "runs": "bench.runs",
    "warmup": "bench.warmup",
    "tensorrt": "bench.tensorrt",
    "method": "prune.method",
    "ratio": "prune.ratio",
    "budget": "prune.budget",
    "allocator": "prune.allocator",
    "groups": "prune.groups",
    "device": "device",
}


def _overrides(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """``--set`` values, then one ``key=value`` per shortcut flag the user gave; with each, how the user gave
    it (``--set prune.ratio=0.4``, ``--ratio 0.4``), so that a config error names what was typed."""
    given = vars(args)
    overrides = list(args.overrides)
    origins = [f"--set {override}" for override in overrides]
    for name, key in SHORTCUTS.items():
        value = given.get(name)
        if value is not None:
            overrides.append(f"{key}={value}")
            origins.append(f"--{name}" if value is True else f"--{name} {value}")
    return overrides, origins


def _compress(args: argparse.Namespace) -> int:
    """``gcp compress``: :func:`gcp.app.compress.compress` with the command's flags; prints one line per stage,
    then the report's table and path."""
    compress(
        args.model,
        args.data,
        args.target,
        run_dir=args.run_dir,
        config=None if args.config == DEFAULT_CONFIG else args.config,
        sparse_epochs=args.sparse_epochs,
        recover_epochs=args.recover_epochs,
        imgsz=args.imgsz,
        device=args.device,
        overrides=args.overrides,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        echo=print,
    )
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.command == "compress":
        return _compress(args)
    overrides, origins = _overrides(args)
    config, source = load_config(args.config, overrides, origins=origins)
    run_dir = args.run_dir or Path("runs") / resolve_config_path(args.config).stem
    ctx = Context(
        config, RunDir(run_dir), resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress
    )
    command = args.command
    if command == "train":
        print(train_stage(ctx))
    elif command == "sparse-train":
        print(sparse_train_stage(ctx, args.weights))
    elif command == "prune":
        print(prune_stage(ctx))
    elif command == "finetune":
        print(finetune_stage(ctx, args.method or config.prune.method))
    elif command == "distill":
        print(distill_stage(ctx, args.method or config.prune.method, args.teacher))
    elif command == "eval":
        print(format_table(eval_stage(ctx, args.checkpoints)))
    elif command == "export":
        for path in export_stage(ctx, args.format, args.checkpoints):
            print(path)
    elif command == "plot":
        print(plot_stage(ctx, args.kind))
    elif command == "bench":
        rows = latency_stage(ctx, args.checkpoints)
        for row in rows:
            print(
                f"{row['name']}: median {row['median_ms']:.2f} ms ({row['provider']}, measured as {row['latency_of']})"
            )
    else:
        start = time.perf_counter()
        report = run_demo(ctx, args.teacher)
        print(f"\nconfig {source}, run directory {run_dir}\n")
        print(format_table(report["rows"]))
        print("\nplots:")
        for kind, path in report["plots"].items():
            print(f"  {kind}: {path}")
        print(f"report: {ctx.run.report}\nwall time: {(time.perf_counter() - start) / 60:.1f} min")
        print(
            f"every method removed {config.prune.ratio:.0%} of the model's {config.prune.budget}; the demo's stages "
            "are short, full-length numbers (`python benchmarks/bench_method.py`) are in benchmarks/RESULTS.md"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gcp`` command; returns the exit status (2 for a problem with the input)."""
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    package_logger = logging.getLogger("gcp")
    previous_level = package_logger.level
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)
    try:
        return _run(args)
    except (ConfigError, RunError, DatasetError, ModelFileError, FileNotFoundError) as error:
        print(f"gcp {args.command}: error: {error}", file=sys.stderr)
        return 2
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(previous_level)


if __name__ == "__main__":
    sys.exit(main())
