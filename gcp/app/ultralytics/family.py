"""The ``gcp`` command's stages on a user's own Ultralytics detector (``model.name: ultralytics``).

:class:`UltralyticsFamily` is the :class:`gcp.app.pipeline.ModelFamily` the stages use for such a model; the stages
themselves do not change. What it does differently from gcp's own detectors:

* **Model files are Ultralytics checkpoints**, so ``ultralytics.YOLO(run_dir / "distilled_gcp.pt")`` loads
  one with its pruned architecture for ``val``, ``predict`` and ``export`` (gcp must be importable: pruned C2f
  blocks are :class:`gcp.adapters.ultralytics.SplitC2f`). They pickle the module and are read with
  Ultralytics' own loader, so a run directory, like ``model.weights``, must hold only files you trust. The run's
  ``trained.pt`` is ``model.weights`` (a checkpoint, or a model YAML built for data.yaml's classes), imported by
  the first stage that needs it, or trained further by ``gcp train``.
* **Every training stage runs Ultralytics' trainer** (:func:`gcp.app.ultralytics.trainer.train`: its loss,
  augmentation and data.yaml) on the model as it is, with the stage's hook (:class:`gcp.DynamicSparsity`) or
  teacher (group spatial attention distillation), in ``fits/<stage>/`` (Ultralytics' own run folder:
  ``weights/last.pt``, ``best.pt``, ``results.csv``). The stage's model file is ``last.pt``: the model at the
  end of the stage's schedule, as for gcp's own detectors (``best.pt``, picked by Ultralytics' validation,
  would hand pruning a sparse-training epoch from before the sparsity took hold).
* **Pruning** is :func:`gcp.prune_detector` through the Ultralytics adapter; the pruned module carries its
  pruning record, so each later training run also writes gcp's weights-only ``gcp_<best|last>.pt`` beside
  Ultralytics' checkpoints in ``fits/<stage>/weights/``.
* **eval** scores with gcp's evaluator on data.yaml's images (Ultralytics' NMS,
  :func:`gcp.adapters.ultralytics.postprocess`) and adds ``YOLO.val``'s own mAP with Ultralytics' default
  settings (``ultralytics_map50``, ``ultralytics_map``); **export** and **bench** take the network up to its raw
  head maps (:func:`gcp.core.registry.network`), as for gcp's own detectors.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from ultralytics import YOLO
from ultralytics.cfg import DEFAULT_CFG_DICT
from ultralytics.nn.tasks import DetectionModel, load_checkpoint, torch_safe_load

from gcp.adapters.ultralytics import detect_head, is_ultralytics_detector
from gcp.adapters.ultralytics import postprocess as ultralytics_postprocess
from gcp.app.config import ConfigError, ExperimentConfig, FitConfig, check_paths
from gcp.app.pipeline import Context, ModelFamily, RunDir, RunError, distill_options
from gcp.app.ultralytics.trainer import DISTILL_LOG, PRUNING_RECORD, carry_pruning_record, train
from gcp.core.prune import PruneResult
from gcp.core.registry import network as network_view
from gcp.core.serialize import ModelFileError, one_line
from gcp.detection.data import DataYaml, read_data_yaml
from gcp.io import atomic_write_bytes, atomic_write_json

LOGGER = logging.getLogger(__name__)
OPTIMIZERS = {"sgd": "SGD", "adamw": "AdamW"}  # gcp.app.config.OPTIMIZERS as Ultralytics spells them


class UltralyticsFamily(ModelFamily):
    """A user's Ultralytics detector in the pipeline's stages (see the module docstring)."""

    #: Ultralytics' own trainer picks the memory order; scoring keeps the default one, which its models
    #: were tested with.
    channels_last = False

    def __init__(self, config: ExperimentConfig) -> None:
        super().__init__(config)
        for key in config.model.train_args:
            if key not in DEFAULT_CFG_DICT:
                match = difflib.get_close_matches(key, list(DEFAULT_CFG_DICT), n=1, cutoff=0.6)
                hint = f"; did you mean {match[0]!r}?" if match else ""
                raise ConfigError(
                    f"model.train_args.{key}: is not one of Ultralytics' train arguments{hint}",
                    f"model.train_args.{key}",
                )

    @functools.cached_property
    def data(self) -> DataYaml:
        """data.yaml, read once; its class count is the one every model of the run must have."""
        described = read_data_yaml(self.config.data.yaml)
        count, declared = len(described.class_names), self.config.model.num_classes
        if count != declared:
            raise ConfigError(
                f"model.num_classes is {declared} but {described.path} has {count} classes",
                "model.num_classes",
            )
        return described

    def _checked(self, module: Any, source: str) -> nn.Module:
        """``module`` if it is an Ultralytics detection model for data.yaml's classes, else a one-line error."""
        if not is_ultralytics_detector(module):
            raise ModelFileError(
                f"{source}: holds a {type(module).__name__}, not an Ultralytics detection model (YOLOv8/YOLO11 "
                "Detect head)"
            )
        classes, expected = detect_head(module)[1].nc, len(self.data.class_names)
        if classes != expected:
            raise ModelFileError(
                f"{source}: the model predicts {classes} classes but {self.data.path} has {expected}"
            )
        return module

    def build(self) -> nn.Module:
        """``model.weights``: its checkpoint's module, or its model YAML built for data.yaml's classes (a file,
        or one Ultralytics ships, found by name as Ultralytics finds it). A checkpoint is never downloaded."""
        weights = Path(self.config.model.weights)
        if weights.suffix == ".pt":
            check_paths(self.config, ["model.weights"])
            return self.load(weights)
        classes = len(self.data.class_names)
        try:
            module = DetectionModel(str(weights), nc=classes, verbose=False)
        except FileNotFoundError:
            raise ConfigError(
                f"model.weights: no such file: {weights} (absolute: {weights.resolve()}), nor a model YAML "
                "Ultralytics ships",
                "model.weights",
            ) from None
        except Exception as error:  # noqa: BLE001 (a malformed YAML fails anywhere in Ultralytics' parser)
            raise ConfigError(
                f"model.weights: {weights} is not an Ultralytics model YAML ({one_line(error)})",
                "model.weights",
            ) from None
        return self._checked(module, str(weights))

    def import_trained(self, run: RunDir) -> None:
        """``trained.pt`` from ``model.weights`` (checked against data.yaml); a YAML gives an untrained model."""
        weights = self.config.model.weights
        save_checkpoint(self.build(), run.trained, weights)
        LOGGER.info("trained.pt: model.weights %s imported into %s", weights, run.path)

    def load(self, path: Path) -> nn.Module:
        """An Ultralytics checkpoint, read by Ultralytics' loader (which unpickles it), in eval mode, with its
        parameters trainable again (Ultralytics pickles its EMA, whose parameters are frozen, and pruning traces
        the network through gradients)."""
        path = Path(path)
        if not path.is_file():  # checked first: Ultralytics would try to download a missing official name
            raise FileNotFoundError(f"no model file at {path}")
        try:
            module, _ = load_checkpoint(path)
        except Exception as error:  # noqa: BLE001 (Ultralytics' loader raises TypeError, RuntimeError, ...)
            raise ModelFileError(
                f"{path}: not a loadable Ultralytics checkpoint ({one_line(error)})"
            ) from None
        return self._checked(module, str(path)).requires_grad_(True)

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
        """Ultralytics' trainer on ``model`` as it is; ``output`` is its ``last.pt`` (``like`` is not needed: a
        pruned module carries its pruning record)."""
        return self._train(ctx, model, settings, stage, output, hooks=hooks)

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
        """Ultralytics' trainer with the distiller built on its step (Ultralytics' loss is L_hard); the terms'
        log is the one gcp's own distillation writes."""
        options = distill_options(self.config)
        self._train(
            ctx, student, self.config.distill, stage, output, teacher=teacher, distill_options=options
        )
        history = json.loads((ctx.run.fit_dir(stage) / DISTILL_LOG).read_text(encoding="utf-8"))
        atomic_write_json(terms, {"history": history})
        return output

    def _train(
        self, ctx: Context, model: nn.Module, settings: FitConfig, stage: str, output: Path, **extra: Any
    ) -> Path:
        """:func:`gcp.app.ultralytics.trainer.train` in ``fits/<stage>/`` (continued from its ``last.pt`` with
        --resume), then that ``last.pt`` copied to ``output``."""
        out_dir = ctx.run.fit_dir(stage)
        last = out_dir / "weights" / "last.pt"
        resume = ctx.resume and last.is_file()
        if resume and not resumable(last):
            raise RunError(
                f"{last} has finished its training, which Ultralytics cannot resume; pass --overwrite to run "
                "the stage again"
            )
        data, device = self.config.data, ctx.device
        arguments = {
            **self.config.model.train_args,
            "imgsz": data.size,
            "workers": data.num_workers,
            "seed": self.config.seed,
            "device": device_argument(device),
            "batch": settings.batch_size,
            "lr0": settings.lr,
            "optimizer": OPTIMIZERS[settings.optimizer],
            "momentum": settings.momentum,
            "weight_decay": settings.weight_decay,
            "warmup_epochs": settings.warmup_epochs,
            # absolute: Ultralytics puts a relative project under its own runs folder, not the run directory
            "project": str(out_dir.parent.resolve()),
            "name": out_dir.name,
            "exist_ok": True,
            "resume": str(last) if resume else False,
        }
        train(model, data.yaml, epochs=settings.epochs, **extra, **arguments)
        return atomic_write_bytes(output, last.read_bytes())

    def save_pruned(self, result: PruneResult, path: Path, source: Path) -> Path:
        """The pruned module, carrying its pruning record, as a checkpoint keeping ``source``'s training
        record."""
        return save_checkpoint(carry_pruning_record(result), path, source)

    def pruning_report(self, path: Path, model: nn.Module) -> dict[str, Any] | None:
        """The report of the pruning record the module carries (None when it was not pruned)."""
        record = getattr(model, PRUNING_RECORD, None)
        return record["report"] if record else None

    def postprocess(
        self, model: nn.Module, outputs: Any, conf_thres: float, iou_thres: float, max_det: int
    ) -> list[dict[str, torch.Tensor]]:
        """Ultralytics' NMS on the model's eval outputs (:func:`gcp.adapters.ultralytics.postprocess`)."""
        return ultralytics_postprocess(model, outputs, conf_thres, iou_thres, max_det)

    def network(self, model: nn.Module) -> nn.Module:
        """The network up to its raw head maps (box bins and class logits per level), without decoding."""
        return network_view(model, "ultralytics")

    def extra_scores(self, ctx: Context, path: Path) -> dict[str, Any]:
        """``YOLO(path).val`` on the same split with Ultralytics' own settings (rectangular batches, its
        confidence and IoU thresholds), which is what a user of the checkpoint would measure."""
        metrics = YOLO(str(path)).val(
            data=str(self.config.data.yaml),
            split=self.config.eval.split,
            imgsz=self.config.data.size,
            batch=self.config.eval.batch_size,
            workers=self.config.data.num_workers,
            device=device_argument(ctx.device),
            plots=False,
            verbose=False,
            project=str((ctx.run.path / "fits").resolve()),
            name=f"val_{path.stem}",
            exist_ok=True,
        )
        return {"ultralytics_map50": float(metrics.box.map50), "ultralytics_map": float(metrics.box.map)}


def resumable(last: Path) -> bool:
    """Whether Ultralytics can continue the run whose ``last.pt`` this is: one stopped before its last epoch
    ended (a finished run's checkpoint has its epoch reset to -1 and its optimiser stripped)."""
    checkpoint, _ = torch_safe_load(last)
    epoch, epochs = checkpoint.get("epoch", -1), checkpoint.get("train_args", {}).get("epochs", 0)
    return 0 <= epoch < epochs - 1


def device_argument(device: torch.device) -> str:
    """A torch device as Ultralytics' ``device`` argument (``cpu``, or the CUDA index)."""
    return "cpu" if device.type == "cpu" else str(device.index or 0)


def save_checkpoint(module: nn.Module, path: Path, template: str | Path) -> Path:
    """``module`` as an Ultralytics checkpoint at ``path`` (atomically), written by ``YOLO.save`` from the
    YOLO object of ``template``, the checkpoint or model YAML the module comes from, whose training record
    (``train_args``, metrics) the file keeps; ``YOLO(path)`` loads it."""
    yolo = YOLO(str(template))
    yolo.model = module
    partial = path.with_name(f".{path.name}.partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    yolo.save(partial)
    return partial.replace(path)
