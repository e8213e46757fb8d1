"""The stages of the paper's method over one run directory, shared by the ``gcp`` command line and ``gcp demo``.

train → sparse-train (§4.1) → prune (§4.2; also Network Slimming, ThiNet, L1) → finetune | distill (§4.3) →
eval → export / bench / plot. Stages hand over through files in the run directory, so each can be run, resumed
or repeated on its own:

==========================  ==============================================================================
``trained.pt``              the unpruned model (``gcp train``, or the teacher the demo starts from)
``sparse.pt``               after sparse training, with ``sparsity_history.json`` (γ statistics per epoch)
``pruned_<method>.pt``      ``PruneResult.save`` (weights + pruning history; ``gcp.load_pruned`` rebuilds it)
``finetuned_<method>.pt``   the pruned model fine-tuned with the detection loss only
``distilled_<method>.pt``   the pruned model trained with group spatial attention distillation
``fits/<stage>/``           ``gcp.detection.train.fit``'s ``last.pt``/``best.pt``/``history.json`` (what ``--resume`` continues)
``report.json``             one row per model (mAP, params, MACs, size, latency), plots, stage wall times
``plots/``, ``export/``     figures; ONNX files (and TensorRT engines)
``config/<stage>.yaml``     the resolved config each stage ran with; ``logs/<stage>.log`` its log
==========================  ==============================================================================

Dense model files (``trained.pt``, ``sparse.pt``) use the format of the shipped teacher
``gcp/assets/digits_teacher.pt``: ``{"builder": json of model.gcp_builder, "state_dict", "map50"}``, loadable
with ``torch.load(weights_only=True)``.

Those formats, the trainer and the postprocessing belong to the model family, one :class:`ModelFamily` per run
(``Context.family``). With ``model.name: ultralytics`` every file above is an Ultralytics checkpoint that
``ultralytics.YOLO`` loads, ``trained.pt`` is ``model.weights`` imported, and ``fits/<stage>/`` is the folder of
Ultralytics' trainer (:mod:`gcp.app.ultralytics.family`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from distill import GroupAttentionDistiller
from gcp.app import plots
from gcp.app.config import ConfigError, ExperimentConfig, FitConfig, PruneConfig, check_paths, dump_config
from gcp.core.prune import PruneResult, channel_costs, detector_groups, prune_detector
from gcp.core.report import count_macs_params, size_mb
from gcp.core.serialize import (  # the model-file formats live in gcp.core.serialize
    load_model,
    read_pruned,
    save_model,
)
from gcp.detection.data import COCODataset, VOCDataset, YOLODataset, make_digit_scenes, read_data_yaml
from gcp.detection.evaluate import evaluate
from gcp.detection.models import build, postprocess, scale_anchors
from gcp.detection.train import FitSettings, fit
from gcp.io import atomic_write_json, atomic_write_text
from gcp.runtime.export import (
    build_tensorrt_engine,
    compare_latency,
    export_onnx,
    require_tensorrt,
    tensorrt_available,
)
from gcp.sparse.dynamic import DynamicSparsity, TooFewStepsError
from grouping import Group

LOGGER = logging.getLogger(__name__)

SHIPPED_TEACHER = Path(__file__).parents[1] / "assets" / "digits_teacher.pt"
#: Stage 1 of ``benchmarks/bench_method.py`` run on the shipped teacher (its command is in RESULTS.md).
SHIPPED_SPARSE = Path(__file__).parents[1] / "assets" / "digits_sparse.pt"
MAKE_TEACHER_COMMAND = "python benchmarks/train_reference.py"
RUN_MARKER = "gcp_run.json"
PRUNED_STAGES = ("pruned", "finetuned", "distilled")
CALIBRATION_BATCH = 8


class RunError(RuntimeError):
    """A stage cannot run as asked: an input file is missing or its outputs already exist."""


@dataclass(frozen=True)
class RunDir:
    """The file layout of one run (see the module docstring)."""

    path: Path

    @property
    def trained(self) -> Path:
        return self.path / "trained.pt"

    @property
    def sparse(self) -> Path:
        return self.path / "sparse.pt"

    @property
    def sparsity_history(self) -> Path:
        return self.path / "sparsity_history.json"

    @property
    def report(self) -> Path:
        return self.path / "report.json"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    @property
    def export(self) -> Path:
        return self.path / "export"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def pruned(self, method: str) -> Path:
        return self.path / f"pruned_{method}.pt"

    def finetuned(self, method: str) -> Path:
        return self.path / f"finetuned_{method}.pt"

    def distilled(self, method: str) -> Path:
        return self.path / f"distilled_{method}.pt"

    def prune_report(self, method: str) -> Path:
        return self.path / f"prune_{method}.json"

    def distill_terms(self, method: str) -> Path:
        return self.path / f"distill_terms_{method}.json"

    def fit_dir(self, stage: str) -> Path:
        return self.path / "fits" / stage

    def model_files(self) -> list[Path]:
        """The model files present, in pipeline order (dense first, then each method's pruned family)."""
        files = [p for p in (self.trained, self.sparse) if p.is_file()]
        methods = sorted({p.stem.split("_", 1)[1] for p in self.path.glob("pruned_*.pt")})
        for method in methods:
            files += [
                p
                for p in (self.pruned(method), self.finetuned(method), self.distilled(method))
                if p.is_file()
            ]
        return files


def describe(path: Path) -> tuple[str, str]:
    """``(stage, method)`` of a model file from its name: ``distilled_gcp.pt`` → ``("distilled", "gcp")``;
    dense models have method ``"-"``, files from elsewhere stage ``"external"``."""
    stem = path.stem
    if stem in ("trained", "sparse"):
        return stem, "-"
    stage, _, method = stem.partition("_")
    if stage in PRUNED_STAGES and method:
        return stage, method
    return "external", stem


@dataclass
class Context:
    """What every stage needs: the config, the run directory, how to treat earlier outputs, the model family
    (chosen once, from ``model.name``: see :class:`ModelFamily`) and caches."""

    config: ExperimentConfig
    run: RunDir
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    family: ModelFamily = field(init=False, repr=False)
    _datasets: dict[tuple[str, bool], Dataset] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.family = model_family(self.config)

    @property
    def device(self) -> torch.device:
        """``device`` of the config; ``auto`` is CUDA when present, asking for absent CUDA is an error."""
        if self.config.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.config.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device: {self.config.device!r} asked for, but this torch has no CUDA device")
        return device

    @property
    def example_inputs(self) -> torch.Tensor:
        """One blank image at ``data.size``: the input shape pruning, tracing and counting MACs need."""
        size = self.config.data.size
        return torch.zeros(1, 3, size, size)

    def dataset(self, split: str, *, augment: bool = False) -> Dataset:
        """The ``split`` (``train``/``val``/``test``) data, all its specs concatenated; built once."""
        key = (split, augment)
        if key not in self._datasets:
            self._datasets[key] = _read_split(self.config, split, augment)
        return self._datasets[key]


# ---------------------------------------------------------------------------------------------- run directory


def claim_run_dir(ctx: Context, command: str) -> None:
    """Take the whole run directory for a run that starts here (``train``, ``demo``).

    An existing, non-empty directory is refused unless ``--resume`` (continue it) or ``--overwrite`` (delete it
    first; only done when it holds the gcp run marker, so a mistyped ``--run-dir .`` cannot wipe a project).
    """
    path = ctx.run.path
    if path.exists() and any(path.iterdir()):
        if ctx.resume:
            return
        if not ctx.overwrite:
            raise RunError(
                f"run directory {path} already exists; pass --resume to continue it or --overwrite to replace it"
            )
        if not (path / RUN_MARKER).is_file():
            raise RunError(
                f"refusing to delete {path}: it has no {RUN_MARKER}, so it is not a gcp run directory"
            )
        shutil.rmtree(path)
    _mark(ctx, command)


def claim_outputs(ctx: Context, outputs: Sequence[Path], stage: str) -> None:
    """Refuse to replace what an earlier run of ``stage`` wrote, unless ``--resume`` (keep and continue) or
    ``--overwrite`` (delete those outputs only; other stages' files stay)."""
    existing = [p for p in outputs if p.exists()]
    if existing and not ctx.resume:
        if not ctx.overwrite:
            names = ", ".join(str(p) for p in existing)
            raise RunError(
                f"{stage}: {names} already exist(s) from an earlier run; pass --resume to continue or "
                "--overwrite to replace"
            )
        for p in existing:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
    _mark(ctx, stage)


def _mark(ctx: Context, command: str) -> None:
    marker = ctx.run.path / RUN_MARKER
    if not marker.is_file():
        atomic_write_json(marker, {"created": _now(), "by": f"gcp {command}"})


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _skip(ctx: Context, output: Path, stage: str) -> bool:
    """True (and say so) when resuming and ``stage``'s final output is already there."""
    if ctx.resume and output.is_file():
        LOGGER.info("%s: %s exists, skipped (--resume)", stage, output)
        return True
    return False


@contextlib.contextmanager
def stage_log(ctx: Context, stage: str) -> Iterator[None]:
    """Log ``stage`` to ``logs/<stage>.log`` (as well as wherever the caller logs), save the config it runs
    with to ``config/<stage>.yaml`` and record its wall time in ``report.json``."""
    ctx.run.logs.mkdir(parents=True, exist_ok=True)
    atomic_write_text(ctx.run.path / "config" / f"{stage}.yaml", dump_config(ctx.config))
    handler = logging.FileHandler(ctx.run.logs / f"{stage}.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    package_logger = logging.getLogger("gcp")
    package_logger.addHandler(handler)
    start = time.perf_counter()
    LOGGER.info("%s: started (run directory %s)", stage, ctx.run.path)
    try:
        yield
        wall = time.perf_counter() - start
        LOGGER.info("%s: done in %.1f s", stage, wall)
        update_report(ctx.run, stages={stage: {"wall_s": round(wall, 2), "finished": _now()}})
    finally:
        package_logger.removeHandler(handler)
        handler.close()


# ------------------------------------------------------------------------------------------------ report.json


def read_report(run: RunDir) -> dict[str, Any]:
    """``report.json`` as a dict with ``rows`` (list, one per model name), ``plots`` and ``stages``."""
    if not run.report.is_file():
        return {"rows": [], "plots": {}, "stages": {}}
    return json.loads(run.report.read_text(encoding="utf-8"))


def update_report(
    run: RunDir,
    *,
    rows: Sequence[dict[str, Any]] = (),
    plots: dict[str, str] | None = None,
    stages: dict[str, Any] | None = None,
    sweep: Sequence[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Merge rows (by ``name``: new fields update old ones), plots and stage records into ``report.json``;
    ``sweep`` rows (models scored but not kept, see :func:`sweep_stage`) replace the earlier ones."""
    report = read_report(run)
    by_name = {row["name"]: row for row in report["rows"]}
    for row in rows:
        by_name.setdefault(row["name"], {}).update(row)
    order = {p.stem: i for i, p in enumerate(run.model_files())}
    report["rows"] = sorted(by_name.values(), key=lambda row: order.get(row["name"], len(order)))
    report["plots"].update(plots or {})
    report["stages"].update(stages or {})
    if sweep is not None:
        report["sweep"] = list(sweep)
    atomic_write_json(run.report, report)
    return report


# --------------------------------------------------------------------------------------------- data and models


def prepare_data(config: ExperimentConfig) -> None:
    """Generate DigitScenes (``data.format: digits``) or check that the data root (or data.yaml) exists."""
    data = config.data
    if data.format == "digits":
        digits = data.digits
        LOGGER.info(
            "DigitScenes %d/%d/%d images at %d px in %s",
            digits.n_train,
            digits.n_val,
            digits.n_test,
            data.size,
            data.root,
        )
        make_digit_scenes(
            data.root,
            n_train=digits.n_train,
            n_val=digits.n_val,
            n_test=digits.n_test,
            size=data.size,
            seed=digits.seed,
        )
    else:
        check_paths(config, ["data.root" if data.yaml is None else "data.yaml"])


def _reader_options(config: ExperimentConfig, augment: bool) -> dict[str, Any]:
    """The keyword arguments every dataset reader takes, from the ``data`` section."""
    data = config.data
    flip = data.format != "digits" if data.horizontal_flip is None else data.horizontal_flip
    return {"size": data.size, "augment": augment, "horizontal_flip": flip, "strict": data.strict}


def _read_spec(config: ExperimentConfig, spec: str, augment: bool) -> Dataset:
    """One split spec of ``data.<split>`` as a dataset (see :class:`gcp.app.config.DataConfig`)."""
    data = config.data
    root = Path(data.root)
    folder, _, split = spec.rpartition("/")
    common = _reader_options(config, augment)
    if data.format in ("digits", "voc"):
        return VOCDataset(root / folder, split, class_names=data.class_names, **common)
    if data.format == "yolo":
        return YOLODataset(root / folder, split, class_names=data.class_names, **common)
    return COCODataset(root / spec, root / "annotations" / f"instances_{Path(spec).name}.json", **common)


def _split_parts(config: ExperimentConfig, split: str, augment: bool) -> list[Dataset]:
    """The datasets ``split`` concatenates: data.yaml's image folders of that split, else ``data.<split>``'s
    specs."""
    if config.data.yaml is not None:
        described = read_data_yaml(config.data.yaml)
        options = _reader_options(config, augment)
        return [
            YOLODataset(folder, class_names=described.class_names, **options)
            for folder in described.folders(split)
        ]
    specs = getattr(config.data, split)
    if not specs:
        raise ConfigError(f"data.{split}: lists no split to read")
    return [_read_spec(config, spec, augment) for spec in specs]


def _read_split(config: ExperimentConfig, split: str, augment: bool) -> Dataset:
    parts = _split_parts(config, split, augment)
    names = {tuple(part.class_names) for part in parts}
    if len(names) != 1:
        specs = getattr(config.data, split)  # (a data.yaml's folders share its class names)
        raise ConfigError(f"data.{split}: the parts {specs} have different class lists {sorted(names)}")
    count = len(next(iter(names)))
    if count != config.model.num_classes:
        raise ConfigError(
            f"model.num_classes is {config.model.num_classes} but data.{split} has {count} classes"
        )
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


def build_model(config: ExperimentConfig) -> nn.Module:
    """A fresh detector from ``model`` (anchors scaled to ``data.size``), or the model in ``model.weights``."""
    if config.model.weights is not None:
        check_paths(config, ["model.weights"])
        return load_model(config.model.weights)
    spec = config.model
    anchors = scale_anchors(spec.anchors, config.data.size / spec.anchor_size).tolist()
    kwargs: dict[str, Any] = {"num_classes": spec.num_classes, "width": spec.width, "anchors": anchors}
    if spec.name == "mobilenet_yolov3":
        if spec.depth != 1.0:
            raise ConfigError("model.depth: mobilenet_yolov3 has no depth multiplier; set it to 1.0")
    else:
        kwargs["depth"] = spec.depth
    return build(spec.name, kwargs)


def save_pruned_like(model: nn.Module, template: Path, path: Path) -> Path:
    """Save a trained pruned model with the pruning history of ``template`` (the file it was loaded from), so
    ``gcp.load_pruned`` rebuilds it too."""
    meta, _ = read_pruned(template)
    result = PruneResult(
        model=model, report=meta["report"], history=meta["history"], input_shape=meta["input_shape"]
    )
    return result.save(path)


def _require(path: Path, how: str) -> Path:
    if not path.is_file():
        raise RunError(f"{path} does not exist; {how}")
    return path


# ------------------------------------------------------------------------------------------- model families


class ModelFamily:
    """What the stages need to know about one family of models, chosen once per run (:func:`model_family`):
    how model files are read and written, how a model is trained, scored and exported.

    The stages are the same for every family and call only these methods, so a family is one class rather than
    a test in every stage. This class is gcp's own detectors (:mod:`gcp.detection.models`): weights-only model files
    (:mod:`gcp.core.serialize`), trained by :func:`gcp.detection.train.fit`. A user's Ultralytics detector is
    :class:`gcp.app.ultralytics.family.UltralyticsFamily`.
    """

    #: Train and score on channels-last batches (faster on CPU, :func:`gcp.detection.data.batch_to`): gcp's detectors
    #: reshape rather than view their feature maps, so any memory order works (tests/test_models.py).
    channels_last = True

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config

    def build(self) -> nn.Module:
        """The model ``gcp train`` starts from."""
        return build_model(self.config)

    def import_trained(self, run: RunDir) -> None:
        """Write ``trained.pt`` from the config, for a family whose runs start from the user's trained model;
        gcp's own runs start with ``gcp train`` (or the demo's teacher), so nothing is written here."""

    def load(self, path: Path) -> nn.Module:
        """A model file (the run's, or one given by --weights, --teacher or --checkpoint) in eval mode."""
        return load_model(path)

    def fit(
        self,
        ctx: Context,
        model: nn.Module,
        settings: FitConfig,
        stage: str,
        output: Path,
        *,
        like: Path | None = None,
        hooks: Sequence[Any] = (),
    ) -> Path:
        """Train ``model`` (in place) with ``settings`` and ``hooks`` in ``fits/<stage>/`` (continued there with
        --resume), then write it to ``output``: a dense model file, or, with ``like`` (the pruned file it was
        loaded from), a pruned checkpoint with that file's pruning history."""
        out_dir = ctx.run.fit_dir(stage)
        _fit(ctx, model, settings, out_dir, hooks=hooks)
        if like is None:
            return save_model(model, output, _last_map50(out_dir))
        return save_pruned_like(model, like, output)

    def distill(
        self,
        ctx: Context,
        student: nn.Module,
        teacher: nn.Module,
        stage: str,
        output: Path,
        *,
        like: Path,
        terms: Path,
    ) -> Path:
        """:meth:`fit` with the ``distill`` settings and group spatial attention distillation from ``teacher``
        (paper §4.3, eq. 4); the terms' values and gradient norms per epoch go to ``terms``."""
        distiller = GroupAttentionDistiller(
            teacher, student, ctx.example_inputs, **distill_options(ctx.config)
        )
        try:
            path = self.fit(ctx, student, ctx.config.distill, stage, output, like=like, hooks=[distiller])
        finally:
            distiller.close()
        atomic_write_json(terms, {"history": distiller.log.history})
        return path

    def save_pruned(self, result: Any, path: Path, source: Path) -> Path:
        """Write the ``PruneResult`` of pruning the model in ``source`` to ``path``."""
        return result.save(path)

    def pruning_report(self, path: Path, model: nn.Module) -> dict[str, Any] | None:
        """The pruning report recorded with a model file (``path``, loaded as ``model``); None when unpruned."""
        try:
            return read_pruned(path)[0]["report"]
        except ValueError:  # a dense model file
            return None

    def postprocess(
        self, model: nn.Module, outputs: Any, conf_thres: float, iou_thres: float, max_det: int
    ) -> list[dict[str, torch.Tensor]]:
        """Detections per image from the model's outputs, for :func:`gcp.detection.evaluate`."""
        return postprocess(model, outputs, conf_thres, iou_thres, max_det)

    def network(self, model: nn.Module) -> nn.Module:
        """What is exported and timed: the network up to its raw head outputs (gcp's detectors are exactly that)."""
        return model

    def extra_scores(self, ctx: Context, path: Path) -> dict[str, Any]:
        """Further numbers for a model file's report row, beyond gcp's evaluator (none for gcp's detectors)."""
        return {}


def model_family(config: ExperimentConfig) -> ModelFamily:
    """The family of ``model.name``; an optional package it needs and lacks is a one-line ConfigError."""
    if config.model.name != "ultralytics":
        return ModelFamily(config)
    try:
        from gcp.app.ultralytics.family import UltralyticsFamily
    except ModuleNotFoundError as error:
        if not (error.name or "").startswith("ultralytics"):
            raise
        raise ConfigError(
            "model.name: ultralytics needs the ultralytics package; install it with pip install 'gcp[ultralytics]'",
            "model.name",
        ) from None
    return UltralyticsFamily(config)


def distill_options(config: ExperimentConfig) -> dict[str, Any]:
    """``distill.GroupAttentionDistiller``'s keyword arguments from the ``distill`` section."""
    settings = config.distill
    return {
        "betas": settings.betas,
        "temperature": settings.temperature,
        "soft_weight": settings.soft_weight,
        "distance": settings.distance,
        "soft_priors": settings.soft_priors,
        "class_activation": settings.class_activation,
        "measure_every": settings.measure_every,
    }


def trained_model(ctx: Context, how: str) -> Path:
    """The run's unpruned ``trained.pt`` (a family that starts from the user's trained model imports it on
    first use); a RunError saying ``how`` to make it when there is none."""
    if not ctx.run.trained.is_file():
        ctx.family.import_trained(ctx.run)
    return _require(ctx.run.trained, how)


# ------------------------------------------------------------------------------------------------ the stages


def _fit(
    ctx: Context, model: nn.Module, section: FitConfig, out_dir: Path, hooks: Sequence[Any] = ()
) -> None:
    """``gcp.detection.train.fit`` on the train split with the config section's settings (every field they
    share, :meth:`~gcp.detection.train.FitSettings.from_section`) and the run's, scored on the val split;
    continues ``out_dir/last.pt`` when resuming."""

    val = ctx.dataset("val")
    device = ctx.device

    def score(trained: nn.Module) -> dict[str, Any]:
        return evaluate(
            trained,
            val,
            batch_size=ctx.config.eval.batch_size,
            conf_thres=ctx.config.eval.conf_thres,
            iou_thres=ctx.config.eval.iou_thres,
            ap_method=ctx.config.eval.ap_method,
            device=device,
            progress=ctx.progress,
            channels_last=ctx.family.channels_last,
        )

    train_data = ctx.dataset("train", augment=True)
    settings = FitSettings.from_section(
        section,
        out_dir=out_dir,
        resume=ctx.resume and (out_dir / "last.pt").is_file(),
        seed=ctx.config.seed,
        num_workers=ctx.config.data.num_workers,
        device=device,
        progress=ctx.progress,
        channels_last=ctx.family.channels_last,
    )
    fit(model, train_data, settings=settings, hooks=hooks, eval_fn=score)


def _last_map50(out_dir: Path) -> float | None:
    history = json.loads((out_dir / "history.json").read_text(encoding="utf-8"))
    values = [v for v in history.get("metrics/map50", []) if v is not None]
    return values[-1] if values else None


def train_stage(ctx: Context) -> Path:
    """Train the unpruned detector (from ``model.weights`` or scratch) → ``trained.pt``."""
    claim_run_dir(ctx, "train")
    with stage_log(ctx, "train"):
        prepare_data(ctx.config)
        if _skip(ctx, ctx.run.trained, "train"):
            return ctx.run.trained
        return ctx.family.fit(ctx, ctx.family.build(), ctx.config.train, "train", ctx.run.trained)


def sparse_train_stage(ctx: Context, weights: Path | None = None) -> Path:
    """Sparse training (paper §4.1, eq. 3) of ``trained.pt`` (or ``weights``) → ``sparse.pt`` and
    ``sparsity_history.json``. ``sparsity.schedule: constant`` is Network Slimming's fixed rate."""
    run = ctx.run
    source = weights or trained_model(ctx, f"run `gcp train --run-dir {run.path}` first, or pass --weights")
    claim_outputs(ctx, [run.sparse, run.sparsity_history, run.fit_dir("sparse")], "sparse-train")
    with stage_log(ctx, "sparse-train"):
        if _skip(ctx, run.sparse, "sparse-train"):
            return run.sparse
        prepare_data(ctx.config)
        settings = ctx.config.sparsity
        model = ctx.family.load(source)
        by_macs = settings.mechanism == "selective" and settings.target_of == "macs"
        hook = _sparsity_hook(ctx, model, by_macs)
        try:
            ctx.family.fit(ctx, model, settings, "sparse", run.sparse, hooks=[hook])
        except TooFewStepsError as error:
            raise ConfigError(
                f"sparsity.mechanism: {error}; raise sparsity.epochs (or sparsity.max_steps_per_epoch, or give "
                "more training images)",
                "sparsity.mechanism",
            ) from None
        hook.save_history(run.sparsity_history)
        return run.sparse


def _sparsity_hook(ctx: Context, model: nn.Module, by_macs: bool) -> Any:
    """The stage-1 hook the ``sparsity`` section describes; a key set for another mechanism than the chosen one
    (``gamma_lr`` with ``eq3``, say) is a config error naming the section, not a traceback."""
    settings = ctx.config.sparsity
    groups = pruning_groups(ctx, model)
    costs = channel_costs(model, ctx.example_inputs) if by_macs else None
    try:
        return DynamicSparsity(
            model,
            s=settings.s,
            switch_at=settings.switch_at if settings.schedule == "dynamic" else 1.0,
            protect=settings.protect,
            decay=settings.decay,
            groups=groups,
            mechanism=settings.mechanism,
            lr=settings.gamma_lr,
            follow_schedule=settings.follow_schedule,
            push_floor=settings.push_floor,
            target=settings.target,
            score_share=settings.score_share,
            costs=costs,
        )
    except ValueError as error:
        raise ConfigError(
            f"sparsity.mechanism {settings.mechanism!r}: {error} (config keys: gamma_lr is lr)",
            "sparsity.mechanism",
        ) from None


def pruning_groups(ctx: Context, model: nn.Module) -> list[Group]:
    """The groups ``gcp prune`` will set its thresholds in (``prune.groups``), found the way pruning finds them,
    so that stage 1's per-group statistics and the γ plots describe the groups that get pruned."""
    try:
        return detector_groups(model, ctx.example_inputs, ctx.config.prune.groups)
    except (ValueError, OSError) as error:
        raise ConfigError(f"prune.groups: {error}", "prune.groups") from None


def calibration_batches(ctx: Context, images: int, *, with_targets: bool = False) -> list[Any]:
    """The first ``images`` un-augmented training images in batches: ThiNet's reconstruction data and the
    activations whose means the pruning folds into the next layer; with ``with_targets`` each batch is
    ``(images, targets)``, the labelled calibration LCP needs (its auxiliary loss is about the boxes)."""
    data = ctx.dataset("train")
    count = min(images, len(data))
    samples = [data[i] for i in range(count)]
    batches = []
    for start in range(0, count, CALIBRATION_BATCH):
        chunk = samples[start : start + CALIBRATION_BATCH]
        stacked = torch.stack([image for image, _target in chunk])
        batches.append((stacked, [target for _image, target in chunk]) if with_targets else stacked)
    return batches


def prune_stage(ctx: Context, method: str | None = None) -> Path:
    """Prune with ``method`` (default ``prune.method``) at ``prune.ratio`` of ``prune.budget`` →
    ``pruned_<method>.pt`` (+ its report as ``prune_<method>.json``)."""
    run, settings = ctx.run, ctx.config.prune
    method = method or settings.method
    if settings.source == "sparse":
        source = _require(
            run.sparse,
            f"run `gcp sparse-train` first, or set prune.source=trained (run directory {run.path})",
        )
    else:
        source = trained_model(ctx, f"run `gcp train` first (run directory {run.path})")
    output = run.pruned(method)
    claim_outputs(ctx, [output, run.prune_report(method)], f"prune-{method}")
    with stage_log(ctx, f"prune-{method}"):
        if _skip(ctx, output, f"prune-{method}"):
            return output
        groups: Any = settings.groups
        if groups != "auto" and not Path(groups).is_file():
            raise ConfigError(f"prune.groups: no such file: {groups} (use 'auto' or a YAML of glob patterns)")
        prepare_data(ctx.config)
        ratio = settings.group_ratios if settings.allocator == "explicit" else settings.ratio
        result = _prune(ctx, ctx.family.load(source), method, ratio)
        report = result.report
        LOGGER.info(
            "prune-%s: %.1f%% of %s removed; params %.0f → %.0f",
            method,
            100 * report["achieved"],
            settings.budget,
            report["params"]["before"],
            report["params"]["after"],
        )
        atomic_write_json(run.prune_report(method), report)
        return ctx.family.save_pruned(result, output, source)


def _prune(ctx: Context, model: nn.Module, method: str, ratio: Any) -> Any:
    """``prune_detector`` with the run's ``prune`` settings at ``ratio`` (a share, or per-group shares)."""
    settings = ctx.config.prune
    return prune_detector(
        model,
        ctx.example_inputs,
        ratio=ratio,
        method=method,
        groups=settings.groups,
        allocator=settings.allocator,
        budget=settings.budget,
        coupling=settings.coupling,
        max_group_ratio=settings.max_group_ratio,
        round_to=settings.round_to,
        bn_free=settings.bn_free,
        calib_data=calibration_batches(ctx, settings.calib_images, with_targets=method == "lcp"),
        seed=ctx.config.seed,
        latency=latency_runtime(settings),
    )


def latency_runtime(settings: PruneConfig) -> str | None:
    """The runtime ``budget: latency`` is timed on (None for the other budgets, which time nothing): the
    configured one, or with ``auto`` TensorRT where CUDA and the tensorrt package are present, else ONNX
    Runtime on this CPU."""
    if settings.budget != "latency":
        return None
    if settings.runtime != "auto":
        return settings.runtime
    return "tensorrt" if tensorrt_available() else "onnxruntime"


def sweep_stage(ctx: Context) -> list[dict[str, Any]]:
    """Every ``demo.methods`` entry pruned from the sparse model at each ``demo.sweep`` share of
    ``prune.budget`` and scored before any recovery, into ``report.json``'s ``sweep`` rows: the pruned curves of
    the trade-off plot (paper Fig. 10 and Table 10: how much accuracy each cut costs as it deepens). The
    models are not kept; only ``prune.ratio`` is recovered."""
    settings = ctx.config
    source = _require(ctx.run.sparse, "run `gcp sparse-train` first")
    _mark(ctx, "sweep")
    rows = []
    with stage_log(ctx, "sweep"):
        prepare_data(settings)
        for method in settings.demo.methods:
            for ratio in settings.demo.sweep:
                result = _prune(ctx, ctx.family.load(source), method, ratio)
                row = {
                    **_score(ctx, result.model),
                    "name": f"pruned_{method}@{ratio:g}",
                    "stage": "pruned",
                    "method": method,
                    "ratio": float(result.report["achieved"]),
                    "budget": result.report["budget"],
                }
                LOGGER.info("sweep: %s at %.3f mAP@0.5 %.4f", method, row["ratio"], row["map50"])
                rows.append(row)
        update_report(ctx.run, sweep=rows)
    return rows


def finetune_stage(ctx: Context, method: str) -> Path:
    """Fine-tune ``pruned_<method>.pt`` with the detection loss alone (the paper's baseline) →
    ``finetuned_<method>.pt``."""
    run = ctx.run
    pruned = _require(run.pruned(method), f"run `gcp prune --method {method} --run-dir {run.path}` first")
    stage = f"finetune-{method}"
    claim_outputs(ctx, [run.finetuned(method), run.fit_dir(f"finetune_{method}")], stage)
    with stage_log(ctx, stage):
        if _skip(ctx, run.finetuned(method), stage):
            return run.finetuned(method)
        prepare_data(ctx.config)
        model = ctx.family.load(pruned)
        return ctx.family.fit(
            ctx, model, ctx.config.finetune, f"finetune_{method}", run.finetuned(method), like=pruned
        )


def distill_stage(ctx: Context, method: str, teacher: Path | None = None) -> Path:
    """Train ``pruned_<method>.pt`` with group spatial attention distillation (paper §4.3, eq. 4) from the
    unpruned ``trained.pt`` (the paper's teacher is the original network, §5.4) → ``distilled_<method>.pt``."""
    run = ctx.run
    pruned = _require(run.pruned(method), f"run `gcp prune --method {method} --run-dir {run.path}` first")
    teacher = teacher or trained_model(ctx, "pass --teacher (the unpruned model file)")
    stage = f"distill-{method}"
    claim_outputs(ctx, [run.distilled(method), run.fit_dir(f"distill_{method}")], stage)
    with stage_log(ctx, stage):
        if _skip(ctx, run.distilled(method), stage):
            return run.distilled(method)
        prepare_data(ctx.config)
        family = ctx.family
        return family.distill(
            ctx,
            family.load(pruned),
            family.load(teacher),
            f"distill_{method}",
            run.distilled(method),
            like=pruned,
            terms=run.distill_terms(method),
        )


# ------------------------------------------------------------------------------- evaluation, export, latency


def _pruning_facts(ctx: Context, path: Path, model: nn.Module) -> dict[str, Any]:
    """Achieved pruning ratio (and its budget) recorded with a pruned model file; 0 for dense models."""
    stage, _ = describe(path)
    report = None if stage in ("trained", "sparse") else ctx.family.pruning_report(path, model)
    if report is None:  # also an external file that is not a pruned checkpoint
        return {"ratio": 0.0}
    return {"ratio": float(report["achieved"]), "budget": report["budget"]}


def measure(ctx: Context, path: Path) -> dict[str, Any]:
    """One report row: what :func:`_score` (and the model family) measures of the model in ``path``, named
    after the file."""
    stage, method = describe(path)
    model = ctx.family.load(path)
    return {
        "name": path.stem,
        "stage": stage,
        "method": method,
        "checkpoint": str(path),
        **_score(ctx, model),
        **ctx.family.extra_scores(ctx, path),
        **_pruning_facts(ctx, path, model),
    }


def _score(ctx: Context, model: nn.Module) -> dict[str, Any]:
    """mAP on ``eval.split``, params, MACs and fp32 size of ``model``."""

    model = model.to(ctx.device)
    settings = ctx.config.eval
    metrics = evaluate(
        model,
        ctx.dataset(settings.split),
        batch_size=settings.batch_size,
        conf_thres=settings.conf_thres,
        iou_thres=settings.iou_thres,
        ap_method=settings.ap_method,
        device=ctx.device,
        progress=ctx.progress,
        postprocess_fn=ctx.family.postprocess,
        channels_last=ctx.family.channels_last,
    )
    macs, params = count_macs_params(model, ctx.example_inputs.to(ctx.device))
    return {
        "split": settings.split,
        "map50": metrics["map50"],
        "map": metrics["map"],
        "ap_method": settings.ap_method,
        "params": int(params),
        "macs": macs,
        "size_mb": size_mb(params),
    }


def _models_or_all(ctx: Context, checkpoints: Sequence[Path] | None) -> list[Path]:
    paths = list(checkpoints) if checkpoints else ctx.run.model_files()
    if not paths:
        raise RunError(f"no model files in {ctx.run.path}; run `gcp train` (or `gcp demo`) first")
    for path in paths:
        _require(path, "give an existing model file")
    return paths


def eval_stage(ctx: Context, checkpoints: Sequence[Path] | None = None) -> list[dict[str, Any]]:
    """Evaluate the given model files (default: every model of the run) into ``report.json`` rows."""
    _mark(ctx, "eval")
    with stage_log(ctx, "eval"):
        prepare_data(ctx.config)
        rows = []
        for path in _models_or_all(ctx, checkpoints):
            rows.append(measure(ctx, path))
            LOGGER.info("eval: %s mAP@0.5 %.4f", path.name, rows[-1]["map50"])
        update_report(ctx.run, rows=rows)
        return rows


def _check_tensorrt() -> None:
    """TensorRT's one-line "what is missing" as a RunError, before any work is done."""
    try:
        require_tensorrt()
    except RuntimeError as error:
        raise RunError(str(error)) from None


def export_stage(ctx: Context, fmt: str, checkpoints: Sequence[Path] | None = None) -> list[Path]:
    """Export model files to ``export/<name>.onnx`` (each checked against PyTorch in ONNX Runtime) and, for
    ``fmt="tensorrt"``, build ``export/<name>.engine`` from it (needs CUDA and TensorRT)."""
    if fmt not in ("onnx", "tensorrt"):
        raise ValueError(f"export format must be onnx or tensorrt, got {fmt!r}")
    if fmt == "tensorrt":
        _check_tensorrt()
    _mark(ctx, f"export-{fmt}")
    written = []
    with stage_log(ctx, f"export-{fmt}"):
        rows = []
        for path in _models_or_all(ctx, checkpoints):
            network = ctx.family.network(ctx.family.load(path))
            onnx_path = ctx.run.export / f"{path.stem}.onnx"
            diff = export_onnx(
                network, torch.rand(ctx.example_inputs.shape), onnx_path, opset=ctx.config.export.opset
            )
            LOGGER.info("export: %s (max |ONNX Runtime - PyTorch| = %.2e)", onnx_path, diff)
            row = {"name": path.stem, "onnx": str(onnx_path), "onnx_max_abs_diff": diff}
            written.append(onnx_path)
            if fmt == "tensorrt":
                engine = build_tensorrt_engine(
                    onnx_path, onnx_path.with_suffix(".engine"), fp16=ctx.config.export.fp16
                )
                row["tensorrt_engine"] = str(engine)
                written.append(engine)
            rows.append(row)
        update_report(ctx.run, rows=rows)
    return written


def _architecture(path: Path) -> str:
    """Files that share a network shape: dense models share one; a method's pruned/finetuned/distilled share
    theirs."""
    _, method = describe(path)
    return "dense" if method == "-" else method


def latency_stage(ctx: Context, checkpoints: Sequence[Path] | None = None) -> list[dict[str, Any]]:
    """ONNX Runtime latency (and TensorRT with ``bench.tensorrt``) of every distinct architecture, timed
    together round-robin by :func:`gcp.runtime.export.compare_latency`; each row of ``report.json`` gets the latency of
    its architecture. The last file of an architecture (e.g. the distilled model) is the one exported."""
    if ctx.config.bench.tensorrt:
        _check_tensorrt()
    _mark(ctx, "bench-latency")
    with stage_log(ctx, "bench-latency"):
        paths = _models_or_all(ctx, checkpoints)
        representative = {_architecture(p): p for p in paths}
        family = ctx.family
        models = {p.stem: family.network(family.load(p)).to(ctx.device) for p in representative.values()}
        settings = ctx.config.bench
        size = ctx.config.data.size
        timed = compare_latency(
            models,
            (settings.batch_size, 3, size, size),
            ctx.run.export,
            runs=settings.runs,
            warmup=settings.warmup,
            tensorrt=settings.tensorrt,
        )
        timed_by_name = {row["name"]: row for row in timed}
        latency_keys = [k for k in timed[0] if k.endswith("_ms") or k == "provider"]
        rows = []
        for path in paths:
            source = timed_by_name[representative[_architecture(path)].stem]
            rows.append(
                {"name": path.stem, **{k: source[k] for k in latency_keys}, "latency_of": source["name"]}
            )
        for row in timed:
            LOGGER.info("latency: %s median %.2f ms (%s)", row["name"], row["median_ms"], row["provider"])
        update_report(ctx.run, rows=rows)
        return rows


# --------------------------------------------------------------------------------------------------- plots


def plot_stage(ctx: Context, kind: str) -> Path:
    """``gammas``: |γ| per group before/after sparse training (Fig. 8/9); ``sparsity``: the γ distribution over
    the sparse-training epochs (Fig. 11); ``tradeoff``: mAP vs pruning ratio per method (Fig. 10)."""
    run = ctx.run
    path = run.plots / f"{kind}.png"
    _mark(ctx, f"plot-{kind}")
    with stage_log(ctx, f"plot-{kind}"):
        if kind == "gammas":
            before = ctx.family.load(trained_model(ctx, "run `gcp train` first"))
            after = ctx.family.load(_require(run.sparse, "run `gcp sparse-train` first"))
            groups = pruning_groups(ctx, before)
            plots.plot_gamma_histograms(
                plots.gammas_by_group(before, groups), plots.gammas_by_group(after, groups), path
            )
        elif kind == "sparsity":
            saved = json.loads(
                _require(run.sparsity_history, "run `gcp sparse-train` first").read_text("utf-8")
            )
            label = "dynamic s" if saved["switch_at"] < 1.0 else "constant s"
            plots.plot_sparsity_history({label: saved["history"]}, path)
        elif kind == "tradeoff":
            report = read_report(run)
            rows = tradeoff_rows([*report["rows"], *report.get("sweep", [])])
            if not rows:
                raise RunError(
                    f"report.json in {run.path} has no evaluated pruned models; run `gcp eval` first"
                )
            plots.plot_tradeoff(rows, path, budget=ctx.config.prune.budget)
        else:
            raise ValueError(f"plot kind must be gammas, sparsity or tradeoff, got {kind!r}")
        update_report(run, plots={kind: str(path)})
    return path


def tradeoff_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The evaluated pruned-family rows (and sweep rows) as ``plot_tradeoff`` points: one series per method
    and recovery."""
    recovery = {"pruned": "", "finetuned": "+fine-tune", "distilled": "+GSA"}
    return [
        {
            "method": row["method"] + recovery[row["stage"]],
            "ratio": row["ratio"],
            "map50": row["map50"],
            "size_mb": row["size_mb"],
        }
        for row in rows
        if row.get("stage") in recovery and "map50" in row
    ]


# ---------------------------------------------------------------------------------------------------- demo


def import_teacher(ctx: Context, teacher: Path | None) -> Path:
    """Copy the starting model (default: the shipped DigitScenes teacher) into the run as ``trained.pt``."""
    source = teacher or SHIPPED_TEACHER
    if not source.is_file():
        raise RunError(
            f"the demo starts from a trained teacher, and {source} does not exist. Make it with "
            f"`{MAKE_TEACHER_COMMAND}` (about 45 min on 2 CPU cores; it writes {SHIPPED_TEACHER}), or pass "
            "--teacher PATH (a trained.pt written by `gcp train`)"
        )
    if _skip(ctx, ctx.run.trained, "teacher"):
        return ctx.run.trained
    model = load_model(source)
    if model.num_classes != ctx.config.model.num_classes:
        raise ConfigError(
            f"the teacher {source} predicts {model.num_classes} classes; model.num_classes is "
            f"{ctx.config.model.num_classes}"
        )
    return save_model(model, ctx.run.trained)


def sparse_start(ctx: Context, teacher: Path | None = None) -> Path | None:
    """The model the demo's sparse training continues: ``demo.sparse_start``, else the shipped stage-1 model
    (so 20 demo steps show what hundreds of steps make: bimodal γ); ``teacher`` or no shipped file: the
    teacher itself (None)."""
    chosen = ctx.config.demo.sparse_start
    if chosen == "teacher":
        return None
    if chosen is not None:
        return _require(Path(chosen), "demo.sparse_start names a model file (or 'teacher', or null)")
    own_teacher = teacher is not None or ctx.config.demo.teacher is not None
    return SHIPPED_SPARSE if SHIPPED_SPARSE.is_file() and not own_teacher else None


def run_demo(ctx: Context, teacher: Path | None = None) -> dict[str, Any]:
    """The whole method on one config: teacher → sparse training → every ``demo.methods`` pruning at the same
    budget → fine-tuning vs GSA distillation → evaluation → ONNX export and latency → plots. Returns the
    final report (rows, plots, stage times)."""
    if ctx.config.model.name == "ultralytics":
        raise ConfigError(
            "gcp demo runs gcp's own YOLOv4 from the shipped DigitScenes teacher; for an Ultralytics model run "
            "its stages: gcp sparse-train, prune, distill, eval (README, 'Your Ultralytics model')"
        )
    claim_run_dir(ctx, "demo")
    with stage_log(ctx, "demo"):
        prepare_data(ctx.config)
        import_teacher(ctx, teacher)
        sparse_train_stage(ctx, sparse_start(ctx, teacher))
        for method in ctx.config.demo.methods:
            prune_stage(ctx, method)
        for method in ctx.config.demo.methods:
            finetune_stage(ctx, method)
            if method in ctx.config.demo.distill:
                distill_stage(ctx, method)
        if ctx.config.demo.methods and ctx.config.demo.sweep:
            sweep_stage(ctx)
        eval_stage(ctx)
        latency_stage(ctx)
        # With no pruning method (a sparse-training-only run, e.g. for the paper's Table 9) there is no trade-off.
        for kind in ("gammas", "sparsity", "tradeoff") if ctx.config.demo.methods else ("gammas", "sparsity"):
            plot_stage(ctx, kind)
    return read_report(ctx.run)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison table the demo prints: one line per model."""
    header = ("model", "method", "mAP@0.5", "params (M)", "GMACs", "size (MB)", "ORT latency (ms)")
    lines = []
    for row in rows:
        latency = row.get("median_ms")
        lines.append(
            (
                row["name"],
                row.get("method", "-"),
                f"{row['map50']:.3f}" if "map50" in row else "-",
                f"{row['params'] / 1e6:.3f}" if "params" in row else "-",
                f"{row['macs'] / 1e9:.3f}" if "macs" in row else "-",
                f"{row['size_mb']:.2f}" if "size_mb" in row else "-",
                f"{latency:.2f}" if latency is not None and math.isfinite(latency) else "-",
            )
        )
    widths = [max(len(str(cells[i])) for cells in [header, *lines]) for i in range(len(header))]
    rendered = [" | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) for cells in [header, *lines]]
    rendered.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(rendered)
