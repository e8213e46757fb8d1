"""``gcp compress`` and ``gcp.compress()``: the paper's three stages on the user's own trained detector and data, in
one call over one run directory, ending in a report a person reads at a glance.

It composes the stages of :mod:`gcp.app.pipeline` and adds nothing to them but a config and a report:

1. every input is checked before any training (one-line errors: the target, the data.yaml, the model file and
   its class count, the run directory), and the inputs are never written to;
2. a config is built from ``--config`` (optional) plus the target, the data and defaults derived from the size
   of the training set (:func:`default_schedule`), and saved as ``config/compress.yaml``;
3. the stages run in order, each skipped when ``--resume`` finds it finished: the model imported as
   ``trained.pt`` → stage 1, sparse training (``sparse.pt``) → stage 2, group channel pruning at the target
   (``pruned_gcp.pt``) → stage 3, GSA recovery taught by the original model (``distilled_gcp.pt``) → evaluation
   of the original, pruned and recovered models → ONNX export checked in ONNX Runtime → latency against the
   original → plots and ``report.md`` (+ the ``compress`` section of ``report.json``).

The model is either one of gcp's own detectors (a dense gcp model file, ``trained.pt`` of ``gcp train``) or an
Ultralytics YOLOv8/YOLO11 checkpoint or model YAML, found by reading the file.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from gcp.app import plots
from gcp.app.config import (
    DETECTORS,
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    build_config,
    config_to_dict,
    dump_config,
    parse_yaml,
    resolve_config_path,
    set_key,
)
from gcp.app.pipeline import (
    RUN_MARKER,
    Context,
    RunDir,
    RunError,
    claim_run_dir,
    distill_stage,
    eval_stage,
    export_stage,
    latency_stage,
    model_family,
    plot_stage,
    prune_stage,
    read_report,
    sparse_train_stage,
)
from gcp.core.serialize import ModelFileError, load_model
from gcp.detection.data import DatasetError, read_data_yaml
from gcp.detection.data.yolo import IMAGE_SUFFIXES
from gcp.io import atomic_write_bytes, atomic_write_json, atomic_write_text, file_sha256
from gcp.limits import PRUNE_RATIO

#: What ``--target`` can cut: ``macs=0.4`` removes 40 % of the MACs (``prune.budget``/``prune.ratio``).
TARGET_BUDGETS = ("macs", "params", "latency")
METHOD = "gcp"
RECORD = "compress.json"
# Who set a config key that compress fills in, for set_key's error.
SOURCE = "gcp compress"
REPORT = "report.md"
#: Optimiser steps the derived defaults aim at: stage 1 and stage 3 of benchmarks/bench_method.py took about
#: 190 and 750 steps on 3,000 DigitScenes images (RESULTS.md, "Recovery length": 4 recovery epochs reached
#: 0.640 mAP@0.5 where 2 reached 0.604), so a longer margin is the default.
SPARSE_STEPS = 1000
RECOVER_STEPS = 1500
WARMUP_STEPS = 100
MIN_EPOCHS, MAX_EPOCHS = 2, 300  # 2: the dynamic schedule switches halfway through stage 1
#: gcp's own detectors train with AdamW at small learning rates: the paper's SGD at 0.01 dropped a DigitScenes
#: teacher from 0.232 to 0.059 mAP@0.5 in 24 steps (gcp/configs/demo.yaml); these are bench_method's rates.
GCP_FIT = {"sparsity": {"optimizer": "adamw", "lr": 1e-4}, "distill": {"optimizer": "adamw", "lr": 5e-4}}
#: data keys a data.yaml replaces (gcp.app.config refuses them next to data.yaml)
DATA_YAML_REPLACES = ("root", "train", "val", "test", "class_names")
STAGES = (
    "import the model",
    "stage 1: sparse training",
    "stage 2: group channel pruning",
    "stage 3: GSA recovery",
    "evaluation",
    "ONNX export",
    "latency",
    "report",
)


@dataclass
class CompressResult:
    """What :func:`compress` made: the run's files, the three models' report rows and the recovered model."""

    run_dir: Path
    report_md: Path
    report_json: Path
    checkpoint: Path  # the recovered model (for Ultralytics: a checkpoint ultralytics.YOLO loads)
    onnx: Path
    original: dict[str, Any]
    pruned: dict[str, Any]
    recovered: dict[str, Any]
    model: nn.Module = field(repr=False)


@dataclass
class Plan:
    """Everything decided before the first stage: the config and what the report says about the inputs."""

    config: ExperimentConfig
    kind: str  # "gcp" or "ultralytics"
    model: Path
    data: Path | None
    target: str
    budget: str
    ratio: float
    train_images: int
    eval_images: int
    defaults: dict[str, Any]
    inputs: dict[str, Any]
    command: str


# ------------------------------------------------------------------------------------------------- the inputs


def parse_target(text: str) -> tuple[str, float]:
    """``"macs=0.4"`` → ``("macs", 0.4)``: the budget and the share of it to remove; a ConfigError otherwise."""
    name, separator, value = str(text).partition("=")
    name = name.strip().lower()
    example = "e.g. macs=0.4 removes 40 % of the MACs"
    if not separator or name not in TARGET_BUDGETS:
        raise ConfigError(f"--target {text}: expected macs=R, params=R or latency=R ({example})")
    try:
        ratio = float(value)
    except ValueError:
        raise ConfigError(f"--target {text}: {value!r} is not a number ({example})") from None
    if not (math.isfinite(ratio) and ratio in PRUNE_RATIO):
        raise ConfigError(
            f"--target {text}: the share of {name} to remove must lie in {PRUNE_RATIO}, got {ratio:g} ({example})"
        )
    if name == "latency" and importlib.util.find_spec("onnxruntime") is None:
        # TensorRT (prune.runtime auto, where CUDA exists) times the budget, but the report times every model
        # in ONNX Runtime, and so does the latency table on a machine without CUDA
        raise ConfigError(
            f"--target {text}: a latency budget is timed in ONNX Runtime here (TensorRT where CUDA exists), and "
            "ONNX Runtime is not installed (pip install onnxruntime), or use macs= or params="
        )
    return name, ratio


def default_schedule(train_images: int, batch_size: int) -> dict[str, float]:
    """Epochs and warm-up from the training set's size: enough epochs for :data:`SPARSE_STEPS` and
    :data:`RECOVER_STEPS` optimiser steps (within [MIN_EPOCHS, MAX_EPOCHS]), warm-up over about
    :data:`WARMUP_STEPS` steps (at most one epoch)."""
    steps = max(1, math.ceil(train_images / batch_size))

    def epochs(target: int) -> int:
        return int(min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(target / steps))))

    return {
        "steps_per_epoch": steps,
        "sparse_epochs": epochs(SPARSE_STEPS),
        "recover_epochs": epochs(RECOVER_STEPS),
        "warmup_epochs": round(min(1.0, WARMUP_STEPS / steps), 3),
    }


def _strip(error: Exception, path: Path) -> str:
    text = str(error)
    return text[len(str(path)) + 2 :] if text.startswith(f"{path}: ") else text


def _has(raw: Mapping[str, Any], dotted: str) -> bool:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def _read_config(config: str | Path | None) -> tuple[dict[str, Any], Path | None]:
    if config is None:
        return {}, None
    path = resolve_config_path(config)
    raw = parse_yaml(path.read_text(encoding="utf-8"), str(path))
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: a config must be a mapping of sections, got {type(raw).__name__}")
    return apply_overrides(raw, []), path


def _count_images(folders: Sequence[Path]) -> int:
    return sum(1 for folder in folders for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _build(raw: Mapping[str, Any], overrides: Sequence[str], source: str) -> ExperimentConfig:
    try:
        return build_config(apply_overrides(raw, overrides))
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}", error.key) from None


def _identify_model(path: Path, has_data_yaml: bool) -> tuple[str, int | None, str | None, str | None]:
    """``(kind, classes, builder, gcp_error)``: ``"gcp"`` with the head's class count and builder name for a gcp
    model file; ``"ultralytics"`` (class count checked later by its family, ``gcp_error`` saying why gcp's own
    reader refused the file) for what Ultralytics may read; a one-line ModelFileError for anything else."""
    if path.suffix in (".yaml", ".yml"):
        return "ultralytics", None, None, None
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file (absolute: {path.resolve()})")
    try:
        model = load_model(path)
    except ModelFileError as gcp_error:
        reason = _strip(gcp_error, path)
        if not has_data_yaml or importlib.util.find_spec("ultralytics") is None:
            raise ModelFileError(
                f"{path}: gcp cannot read this model file: {reason} (an Ultralytics checkpoint needs the "
                "ultralytics package and --data data.yaml)"
            ) from None
        return "ultralytics", None, None, reason
    if not isinstance(getattr(model, "num_classes", None), int):
        raise ModelFileError(f"{path}: the model it holds has no num_classes, so it is not a gcp detector")
    return "gcp", model.num_classes, getattr(model, "gcp_builder", {}).get("name"), None


def plan_compression(
    model: str | Path,
    data: str | Path | None,
    target: str,
    *,
    run_dir: Path,
    config: str | Path | None = None,
    sparse_epochs: int | None = None,
    recover_epochs: int | None = None,
    imgsz: int | None = None,
    device: str | None = None,
    overrides: Sequence[str] = (),
) -> Plan:
    """Check every input and build the run's config; reads the inputs only, writes nothing."""
    budget, ratio = parse_target(target)
    for name, value in (("--sparse-epochs", sparse_epochs), ("--recover-epochs", recover_epochs)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name}: must be a whole number >= 1, got {value!r}")
    model_path = Path(model)
    raw, config_path = _read_config(config)
    user = apply_overrides(raw, overrides)  # what the user set: derived defaults never replace it
    source = str(config_path) if config_path else "gcp compress"
    described = None
    data_path = None
    if data is not None:
        data_path = Path(data)
        if not data_path.is_file():
            raise DatasetError(f"{data_path}: no such data.yaml (absolute: {data_path.resolve()})")
        described = read_data_yaml(data_path)
        described.folders("train")  # each raises a one-line DatasetError when the split is missing
        described.folders("val")
    elif not _has(raw, "data"):
        raise ConfigError("--data: give the data.yaml, or a --config whose data section names the data set")
    kind, classes, builder, gcp_error = _identify_model(model_path, described is not None)
    if kind == "ultralytics":
        if described is None:
            raise ConfigError("--data: an Ultralytics model trains on a data.yaml; pass --data data.yaml")
        if config_path is None:  # Ultralytics' own schedule (SGD, lr 0.01, its EMA): the packaged config
            raw, _ = _read_config("ultralytics")
        set_key(raw, "model.name", "ultralytics", SOURCE)
        classes = len(described.class_names)
    elif builder in DETECTORS:
        set_key(raw, "model.name", builder, SOURCE)
    if described is not None:
        section = {k: v for k, v in raw.get("data", {}).items() if k not in DATA_YAML_REPLACES}
        raw["data"] = {**section, "format": "yolo", "yaml": str(data_path)}
        if len(described.class_names) != classes:
            raise ModelFileError(
                f"{model_path}: the model predicts {classes} classes but {data_path} has "
                f"{len(described.class_names)}"
            )
    set_key(raw, "model.weights", str(model_path), SOURCE)
    set_key(raw, "model.num_classes", classes, SOURCE)
    if imgsz is not None:
        set_key(raw, "data.size", imgsz, SOURCE)
    if device is not None:
        set_key(raw, "device", device, SOURCE)
    set_key(raw, "prune.method", METHOD, SOURCE)
    set_key(raw, "prune.budget", budget, SOURCE)
    set_key(raw, "prune.ratio", ratio, SOURCE)
    if described is not None and not _has(user, "eval.split"):
        set_key(raw, "eval.split", "test" if described.splits.get("test") else "val", SOURCE)

    first = _build(raw, overrides, source)
    split = first.eval.split
    if kind == "ultralytics":
        family = model_family(first)
        try:
            family.build()  # reads the checkpoint (or YAML) and checks its head against data.yaml
        except ModelFileError as error:
            if gcp_error is None or "classes but" in str(error):
                raise
            raise ModelFileError(
                f"{model_path}: gcp cannot read this model file: not a gcp model file ({gcp_error}), nor an "
                f"Ultralytics detector ({_strip(error, model_path)})"
            ) from None
    if described is not None:
        train_images = _count_images(described.folders("train"))
        eval_images = _count_images(described.folders(split))
    else:
        probe = Context(first, RunDir(run_dir))
        try:
            train_images, eval_images = len(probe.dataset("train")), len(probe.dataset(split))
        except ConfigError as error:
            raise ConfigError(f"{model_path}: the model predicts {classes} classes; {error}") from None
    if train_images == 0 or eval_images == 0:
        empty = "train" if train_images == 0 else split
        raise DatasetError(f"{data_path or source}: the {empty} split holds no images")

    derived = default_schedule(train_images, first.sparsity.batch_size)
    defaults: dict[str, Any] = {"train_images": train_images, "eval_images": eval_images, **derived}
    chosen: dict[str, Any] = {
        "sparsity.epochs": derived["sparse_epochs"],
        "distill.epochs": derived["recover_epochs"],
        "sparsity.warmup_epochs": derived["warmup_epochs"],
        "distill.warmup_epochs": derived["warmup_epochs"],
    }
    if kind == "gcp":
        for section_name, values in GCP_FIT.items():
            chosen |= {f"{section_name}.{key}": value for key, value in values.items()}
    for key, value in chosen.items():
        if not _has(user, key):
            set_key(raw, key, value, SOURCE)
    if sparse_epochs is not None:
        set_key(raw, "sparsity.epochs", sparse_epochs, SOURCE)
    if recover_epochs is not None:
        set_key(raw, "distill.epochs", recover_epochs, SOURCE)
    final = _build(raw, overrides, source)
    inputs = {
        "model": str(model_path.resolve()),
        "model_sha256": file_sha256(model_path) if model_path.is_file() else None,
        "data": str(data_path.resolve()) if data_path else None,
        "data_sha256": file_sha256(data_path) if data_path else None,
        "config": str(config_path.resolve()) if config_path else None,
        "target": f"{budget}={ratio:g}",
        "sparse_epochs": sparse_epochs,
        "recover_epochs": recover_epochs,
        "imgsz": imgsz,
        "device": device,
        "overrides": list(overrides),
    }
    command = ["gcp", "compress", "--model", str(model_path)]
    command += ["--data", str(data_path)] if data_path else []
    command += ["--target", inputs["target"], "--run-dir", str(run_dir)]
    command += ["--config", str(config)] if config is not None else []
    for flag, value in (
        ("--sparse-epochs", sparse_epochs),
        ("--recover-epochs", recover_epochs),
        ("--imgsz", imgsz),
        ("--device", device),
    ):
        command += [flag, str(value)] if value is not None else []
    for override in overrides:
        command += ["--set", override]
    return Plan(
        config=final,
        kind=kind,
        model=model_path,
        data=data_path,
        target=inputs["target"],
        budget=budget,
        ratio=ratio,
        train_images=train_images,
        eval_images=eval_images,
        defaults=defaults,
        inputs=inputs,
        command=shlex.join(command),
    )


# --------------------------------------------------------------------------------------------- run directory


def claim(ctx: Context, plan: Plan) -> dict[str, Any]:
    """Take the run directory (see :func:`gcp.app.pipeline.claim_run_dir`); with --resume it must hold a
    compress run of the same inputs and config. Returns the run's record (``compress.json``)."""
    path = ctx.run.path
    record_path = path / RECORD
    config = config_to_dict(plan.config)
    if ctx.resume and path.is_dir() and any(path.iterdir()):
        if not record_path.is_file():
            what = "another gcp run" if (path / RUN_MARKER).is_file() else "files that are not a gcp run"
            raise RunError(
                f"run directory {path} holds {what}, not one of gcp compress; give another --run-dir "
                "(or --overwrite to replace a gcp run)"
            )
        record = json.loads(record_path.read_text(encoding="utf-8"))
        changed = [k for k, v in plan.inputs.items() if record["inputs"].get(k) != v]
        if record.get("config") != config:
            changed.append("the resolved config")
        if changed:
            raise RunError(
                f"run directory {path} holds a gcp compress run of other inputs ({', '.join(changed)} differ); "
                "give another --run-dir, or --overwrite to start this one there"
            )
        claim_run_dir(ctx, "compress")
        return record
    claim_run_dir(ctx, "compress")
    record = {"inputs": plan.inputs, "config": config, "command": plan.command, "done": []}
    atomic_write_json(record_path, record)
    atomic_write_text(path / "config" / "compress.yaml", dump_config(plan.config))
    return record


# ------------------------------------------------------------------------------------------------ the stages


class Progress:
    """One line per finished stage: its time, the total so far and an estimate of the rest, made from stage
    1's measured time per epoch (training cost scales with the MACs trained; GSA adds the teacher's forward
    pass, about a third of a training step; evaluation is a forward pass over the evaluation split)."""

    def __init__(self, plan: Plan, echo: Callable[[str], None]) -> None:
        self.plan, self.echo = plan, echo
        self.start = time.perf_counter()
        self.per_epoch: float | None = None
        self.kept = 1.0 - plan.ratio  # of the MACs, until the prune report says

    def _left(self, index: int) -> str:
        if self.per_epoch is None:
            return "the time left is estimated once stage 1 has run"
        config = self.plan.config
        left = 0.0
        if index < 3:
            left += self.per_epoch * config.distill.epochs * (1 / 3 + self.kept)
        if index < 4:
            images_per_epoch = self.plan.train_images
            if config.sparsity.max_steps_per_epoch is not None:
                images_per_epoch = min(
                    images_per_epoch, config.sparsity.max_steps_per_epoch * config.sparsity.batch_size
                )
            per_image = self.per_epoch / max(images_per_epoch, 1)
            left += per_image / 3 * self.plan.eval_images * (1 + 2 * self.kept)
        if index >= 4:
            return "export, latency and report left"
        return f"about {_duration(left)} of training and evaluation left (estimated from stage 1)"

    def done(self, index: int, seconds: float, note: str = "") -> None:
        total = time.perf_counter() - self.start
        left = self._left(index) if index < len(STAGES) - 1 else "done"
        extra = f" ({note})" if note else ""
        self.echo(
            f"[{index + 1}/{len(STAGES)}] {STAGES[index]}: {_duration(seconds)}{extra} · "
            f"elapsed {_duration(total)} · {left}"
        )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def compress(
    model: str | Path,
    data: str | Path | None = None,
    target: str = "macs=0.4",
    *,
    run_dir: str | Path | None = None,
    config: str | Path | None = None,
    sparse_epochs: int | None = None,
    recover_epochs: int | None = None,
    imgsz: int | None = None,
    device: str | None = None,
    overrides: Sequence[str] = (),
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
) -> CompressResult:
    """The paper's three stages on ``model`` (a gcp model file, an Ultralytics checkpoint or model YAML) and
    ``data`` (a data.yaml; or None with a ``config`` whose data section names a VOC/COCO/YOLO-txt set), to
    remove ``target`` (``macs=0.4``, ``params=0.5``, ``latency=0.3``) → :class:`CompressResult`.

    ``overrides`` are config ``key=value`` settings (as ``--set``), applied last. ``resume`` continues an
    interrupted run in ``run_dir`` (default ``runs/compress_<model name>``), ``overwrite`` replaces one.
    Progress lines go to ``echo`` (default: stderr). See the module docstring for the stages."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite: pass one of them")
    echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    run_path = Path(run_dir) if run_dir is not None else Path("runs") / f"compress_{Path(model).stem}"
    plan = plan_compression(
        model,
        data,
        target,
        run_dir=run_path,
        config=config,
        sparse_epochs=sparse_epochs,
        recover_epochs=recover_epochs,
        imgsz=imgsz,
        device=device,
        overrides=overrides,
    )
    ctx = Context(plan.config, RunDir(run_path), resume=resume, overwrite=overwrite, progress=progress)
    ctx.device  # noqa: B018 (an absent CUDA device is refused here, before any training)
    record = claim(ctx, plan)
    run = ctx.run
    files = [run.trained, run.pruned(METHOD), run.distilled(METHOD)]
    clock = Progress(plan, echo)
    ctx.resume = True  # each stage now continues what this run (or its interrupted self) left

    def once(key: str, work: Callable[[], Any]) -> None:
        """Run a stage that leaves no file of its own to say it finished (evaluation, export, latency, plots),
        unless the run's record says it did; then record it."""
        if key in record["done"]:
            return
        work()
        record["done"].append(key)
        atomic_write_json(run.path / RECORD, record)

    def step(work: Callable[[], Any], key: str | None = None) -> Callable[[], str]:
        def run_step() -> str:
            if key is None:
                work()
            else:
                once(key, work)
            return ""

        return run_step

    steps: list[Callable[[], str]] = [
        lambda: _import(ctx, plan),
        lambda: _stage1(ctx, clock),
        lambda: _prune(ctx, clock),
        step(lambda: distill_stage(ctx, METHOD)),  # skipped by the pipeline when its model file exists
        step(lambda: eval_stage(ctx, files), "eval"),
        step(lambda: export_stage(ctx, "onnx", files[-1:]), "export"),
        step(lambda: latency_stage(ctx, files), "latency"),
        lambda: _report(ctx, plan, record, once),
    ]
    for index, run_stage in enumerate(steps):
        began = time.perf_counter()
        note = run_stage()
        clock.done(index, time.perf_counter() - began, note)
    result = _result(ctx)
    echo(f"\n{markdown_table(_rows(ctx))}\n\nreport: {run.path / REPORT}")
    return result


def _import(ctx: Context, plan: Plan) -> str:
    """The user's model as the run's ``trained.pt`` (a copy: the input file is only read)."""
    run = ctx.run
    if run.trained.is_file():
        return "already imported"
    if plan.kind == "gcp":
        atomic_write_bytes(run.trained, plan.model.read_bytes())
    else:
        ctx.family.import_trained(run)
    return f"{plan.kind} model"


def _stage1(ctx: Context, clock: Progress) -> str:
    sparse_train_stage(ctx)
    clock.per_epoch = epoch_seconds(ctx.run.fit_dir("sparse"))
    return _epochs(ctx.config.sparsity.epochs)


def _epochs(count: int) -> str:
    return f"{count} epoch{'' if count == 1 else 's'}"


def epoch_seconds(folder: Path) -> float | None:
    """Mean wall time of a training epoch in ``folder``: gcp's ``history.json`` (``seconds`` per epoch) or
    Ultralytics' ``results.csv`` (cumulative ``time``); measured by the fit itself, so a resumed stage counts
    the epochs of its interrupted run too."""
    if (folder / "history.json").is_file():
        seconds = json.loads((folder / "history.json").read_text(encoding="utf-8")).get("seconds") or []
        seconds = [s for s in seconds if s is not None]
        return sum(seconds) / len(seconds) if seconds else None
    if (folder / "results.csv").is_file():
        lines = (folder / "results.csv").read_text(encoding="utf-8").splitlines()
        names = [name.strip() for name in lines[0].split(",")]
        if "time" in names and len(lines) > 1:
            return float(lines[-1].split(",")[names.index("time")]) / (len(lines) - 1)
    return None


def _prune(ctx: Context, clock: Progress) -> str:
    prune_stage(ctx, METHOD)
    report = json.loads(ctx.run.prune_report(METHOD).read_text(encoding="utf-8"))
    clock.kept = report["macs"]["after"] / max(report["macs"]["before"], 1.0)
    return f"{100 * report['achieved']:.1f} % of {report['budget']} removed"


def _rows(ctx: Context) -> dict[str, dict[str, Any]]:
    """The report rows of the original, pruned and recovered models, with their file sizes."""
    by_name = {row["name"]: row for row in read_report(ctx.run)["rows"]}
    roles = {
        "original": ctx.run.trained,
        "pruned": ctx.run.pruned(METHOD),
        "recovered": ctx.run.distilled(METHOD),
    }
    rows = {}
    for role, path in roles.items():
        row = dict(by_name.get(path.stem, {"name": path.stem}))
        row["file_mb"] = path.stat().st_size / 2**20 if path.is_file() else None
        rows[role] = row
    return rows


def _number(value: Any, fmt: str, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return format(value / scale, fmt)


def markdown_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """The report's one table: original / pruned / recovered, and the change from original to recovered."""
    ultralytics = any("ultralytics_map50" in row for row in rows.values())
    header = ["model", "mAP@0.5", "mAP@0.5:0.95", "params (M)", "GMACs", "file (MB)", "ORT latency (ms)"]
    if ultralytics:
        header += ["YOLO.val mAP@0.5"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for role, row in rows.items():
        cells = [
            f"{role} (`{row['name']}.pt`)",
            _number(row.get("map50"), ".3f"),
            _number(row.get("map"), ".3f"),
            _number(row.get("params"), ".3f", 1e6),
            _number(row.get("macs"), ".3f", 1e9),
            _number(row.get("file_mb"), ".2f"),
            _number(row.get("median_ms"), ".2f"),
        ]
        if ultralytics:
            cells.append(_number(row.get("ultralytics_map50"), ".3f"))
        lines.append("| " + " | ".join(cells) + " |")
    original, recovered = rows["original"], rows["recovered"]

    def change(key: str, relative: bool = True) -> str:
        before, after = original.get(key), recovered.get(key)
        if before is None or after is None or not (math.isfinite(before) and math.isfinite(after)):
            return "—"
        if relative:
            return f"{100 * (after / before - 1):+.1f} %" if before else "—"
        return f"{after - before:+.3f}"

    cells = [
        "**recovered vs original**",
        change("map50", False),
        change("map", False),
        change("params"),
        change("macs"),
        change("file_mb"),
        change("median_ms"),
    ]
    if ultralytics:
        cells.append(change("ultralytics_map50", False))
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _loss_curves(ctx: Context) -> dict[str, dict[str, list[float | None]]]:
    """The training losses per epoch of stage 1 and stage 3, from gcp's ``history.json`` or Ultralytics'
    ``results.csv`` in ``fits/<stage>/``."""
    curves = {}
    for label, stage in (
        ("stage 1: sparse training", "sparse"),
        ("stage 3: GSA recovery", f"distill_{METHOD}"),
    ):
        folder = ctx.run.fit_dir(stage)
        terms: dict[str, list[float | None]] = {}
        if (folder / "history.json").is_file():
            history = json.loads((folder / "history.json").read_text(encoding="utf-8"))
            terms = {k.removeprefix("train/"): v for k, v in history.items() if k.startswith("train/")}
        elif (folder / "results.csv").is_file():
            lines = (folder / "results.csv").read_text(encoding="utf-8").splitlines()
            names = [name.strip() for name in lines[0].split(",")]
            values = [[float(cell) for cell in line.split(",")] for line in lines[1:] if line.strip()]
            terms = {
                name.removeprefix("train/"): [row[i] for row in values]
                for i, name in enumerate(names)
                if name.startswith("train/")
            }
        if terms:
            curves[label] = terms
    return curves


def _report(ctx: Context, plan: Plan, record: dict[str, Any], once: Callable[..., None]) -> str:
    """The plots, ``report.md`` and the ``compress`` section of ``report.json``."""
    run = ctx.run
    once("plot-gammas", lambda: plot_stage(ctx, "gammas"))
    once("plot-sparsity", lambda: plot_stage(ctx, "sparsity"))
    prune_report = json.loads(run.prune_report(METHOD).read_text(encoding="utf-8"))
    figures = {
        "gammas": run.plots / "gammas.png",
        "sparsity": run.plots / "sparsity.png",
        "groups": run.plots / "group_ratios.png",
        "losses": run.plots / "losses.png",
    }
    if prune_report["groups"]:
        plots.plot_group_ratios(prune_report["groups"], figures["groups"])
    else:
        figures.pop("groups")
    curves = _loss_curves(ctx)
    if curves:
        plots.plot_loss_curves(curves, figures["losses"])
    else:
        figures.pop("losses")
    rows = _rows(ctx)
    export_row = rows["recovered"]
    unchanged = {
        "model": plan.model.is_file() is False or file_sha256(plan.model) == plan.inputs["model_sha256"],
        "data": plan.data is None or file_sha256(plan.data) == plan.inputs["data_sha256"],
    }
    report = read_report(run)
    report["compress"] = {
        "inputs": plan.inputs,
        "family": plan.kind,
        "target": {"budget": plan.budget, "ratio": plan.ratio, "achieved": prune_report["achieved"]},
        "defaults": plan.defaults,
        "epochs": {"sparse": ctx.config.sparsity.epochs, "recover": ctx.config.distill.epochs},
        "table": rows,
        "groups": [
            {
                k: g[k]
                for k in ("name", "kind", "stride", "channels_before", "channels_after", "ratio", "threshold")
            }
            for g in prune_report["groups"]
        ],
        "plots": {k: str(v) for k, v in figures.items()},
        "onnx": export_row.get("onnx"),
        "onnx_max_abs_diff": export_row.get("onnx_max_abs_diff"),
        "inputs_unchanged": unchanged,
        "commands": _commands(ctx, plan),
    }
    atomic_write_json(run.report, report)
    atomic_write_text(run.path / REPORT, _markdown(ctx, plan, report["compress"], prune_report))
    return "report.md written"


def _commands(ctx: Context, plan: Plan) -> list[str]:
    config = ctx.run.path / "config" / "compress.yaml"
    stage = f"--config {shlex.quote(str(config))} --run-dir {shlex.quote(str(ctx.run.path))}"
    return [
        plan.command,
        "# or stage by stage with the config it resolved (trained.pt is the imported model; --overwrite redoes a",
        "# stage whose files exist):",
        f"gcp sparse-train {stage}",
        f"gcp prune {stage} --method {METHOD}",
        f"gcp distill {stage} --method {METHOD}",
        f"gcp eval {stage} --checkpoint {ctx.run.trained} --checkpoint {ctx.run.pruned(METHOD)} "
        f"--checkpoint {ctx.run.distilled(METHOD)}",
        f"gcp export onnx {stage} --checkpoint {ctx.run.distilled(METHOD)}",
        f"gcp bench latency {stage} --checkpoint {ctx.run.trained} --checkpoint {ctx.run.distilled(METHOD)}",
    ]


def _markdown(ctx: Context, plan: Plan, section: Mapping[str, Any], prune_report: Mapping[str, Any]) -> str:
    run, config = ctx.run, ctx.config
    rows = section["table"]
    original, recovered = rows["original"], rows["recovered"]
    split = original.get("split", config.eval.split)

    def cut(key: str, noun: str) -> str:
        before, after = original.get(key), recovered.get(key)
        if not before or after is None or not math.isfinite(before) or not math.isfinite(after):
            return f"{noun} not measured"
        change = 100 * (1 - after / before)
        return f"{change:.1f} % lower {noun}" if change >= 0 else f"{-change:.1f} % higher {noun}"

    map_change = (
        f"{recovered['map50'] - original['map50']:+.3f}"
        if "map50" in recovered and "map50" in original
        else "—"
    )
    lines = [
        f"# gcp compress: {plan.model.name}, {plan.target}",
        "",
        f"**{cut('macs', 'MACs')}, {cut('params', 'parameter count')}, {cut('median_ms', 'ONNX Runtime latency')}; "
        f"mAP@0.5 {map_change}** (original → recovered, {split} split, {original.get('ap_method', '')} AP).",
        "",
        markdown_table(rows),
        "",
        f"Model {plan.model} ({plan.kind}), data {plan.data or 'from the config'} ({plan.train_images} training "
        f"images). Stage 1: {_epochs(config.sparsity.epochs)}, {config.sparsity.optimizer} lr "
        f"{config.sparsity.lr:g}; stage 3: {_epochs(config.distill.epochs)}, {config.distill.optimizer} lr "
        f"{config.distill.lr:g}, taught by the original model. Latency: ONNX Runtime on this machine, batch "
        f"{config.bench.batch_size}, median of {config.bench.runs} runs at {config.data.size} px. The recovered "
        f"model's ONNX file `{section['onnx']}` matches PyTorch in ONNX Runtime to "
        f"{_number(section['onnx_max_abs_diff'], '.1e')} (largest absolute difference).",
        "",
        f"Recovered model: `{run.distilled(METHOD)}`"
        + (
            " (an Ultralytics checkpoint: `YOLO(path)` loads it for val, predict and export)"
            if plan.kind == "ultralytics"
            else " (`gcp.load_pruned(path)` rebuilds it)"
        ),
        "",
        "## γ before and after stage 1",
        "",
        "![γ histograms](plots/gammas.png)",
        "",
        "![γ over stage 1](plots/sparsity.png)",
        "",
        "## Group ratios chosen by the allocator",
        "",
        f"Target {plan.target}: {100 * prune_report['achieved']:.1f} % of the {prune_report['budget']} removed.",
        "",
        "| group | kind | stride | channels kept / before | removed |",
        "|---|---|---|---|---|",
    ]
    for group in section["groups"]:
        lines.append(
            f"| {group['name']} | {group['kind']} | {group['stride']} | {group['channels_after']} / "
            f"{group['channels_before']} | {100 * group['ratio']:.1f} % |"
        )
    if "groups" in section["plots"]:
        lines += ["", "![group ratios](plots/group_ratios.png)"]
    lines += ["", "## Loss curves", ""]
    lines += (
        ["![losses](plots/losses.png)"] if "losses" in section["plots"] else ["No training history found."]
    )
    stages = read_report(run)["stages"]
    lines += ["", "## Stage times", "", "| stage | wall time |", "|---|---|"]
    lines += [
        f"| {name} | {_duration(value['wall_s'])} |" for name, value in stages.items() if "wall_s" in value
    ]
    unchanged = section["inputs_unchanged"]
    lines += [
        "",
        "## Reproduce",
        "",
        "```bash",
        *section["commands"],
        "```",
        "",
        f"Inputs unchanged after the run (SHA-256): model {unchanged['model']}, data.yaml {unchanged['data']}.",
        "",
    ]
    return "\n".join(lines)


def _result(ctx: Context) -> CompressResult:
    rows = _rows(ctx)
    run = ctx.run
    return CompressResult(
        run_dir=run.path,
        report_md=run.path / REPORT,
        report_json=run.report,
        checkpoint=run.distilled(METHOD),
        onnx=run.export / f"{run.distilled(METHOD).stem}.onnx",
        original=rows["original"],
        pruned=rows["pruned"],
        recovered=rows["recovered"],
        model=ctx.family.load(run.distilled(METHOD)),
    )


__all__ = ["CompressResult", "compress", "default_schedule", "parse_target", "plan_compression"]
