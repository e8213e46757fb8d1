"""Experiment configuration: one YAML file describes a whole run (data, model, the three stages of the paper,
export and benchmarks); the command line can override any key with ``--set section.key=value``.

Loading is strict, because a typo in a config silently falling back to a default would cost a 200-epoch run:
an unknown key is an error naming the key and the closest valid one, a value of the wrong type is an error
naming the key and the expected type, a value outside its allowed set or range is an error naming both. Paths
are checked by the stage that needs them (:func:`check_paths`), so ``gcp plot`` does not need VOC on disk.

The packaged configs live in ``gcp/configs/`` (``demo.yaml``, ``paper_yolov4_voc.yaml``); ``--config`` takes
a file path or the name of a packaged config.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gcp.limits import PRUNE_RATIO, Interval
from gcp.vocab import (
    ALLOCATORS,
    AP_METHODS,
    ATTENTION_DISTANCES,
    BN_FREE,
    BUDGETS,
    CLASS_ACTIVATIONS,
    COUPLINGS,
    DEFAULT_PUSH_FLOOR,
    DEFAULT_SCORE_SHARE,
    DEFAULT_TARGET,
    EVAL_SPLITS,
    OPTIMIZERS,
    PRUNE_METHODS,
    RUNTIMES,
    SCHEDULES,
    SOFT_PRIORS,
    SPARSITY_MECHANISMS,
)

PACKAGED_CONFIGS = Path(__file__).parents[1] / "configs"
DEFAULT_CONFIG = "demo"
DATA_FORMATS = ("digits", "voc", "coco", "yolo")
DETECTORS = ("yolov4", "yolov3", "mobilenet_yolov3")
# gcp.detection.models' builders, or a user's Ultralytics detector (gcp.app.ultralytics.family)
MODEL_NAMES = (*DETECTORS, "ultralytics")
# Ultralytics train arguments that gcp sets from its own config (so model.train_args cannot say otherwise)
ULTRALYTICS_SET_BY_GCP = {
    "data": "data.yaml",
    "imgsz": "data.size",
    "workers": "data.num_workers",
    "seed": "seed",
    "device": "device",
    "epochs": "each stage's section (sparsity.epochs, distill.epochs, ...)",
    "batch": "each stage's batch_size",
    "lr0": "each stage's lr",
    "optimizer": "each stage's optimizer",
    "momentum": "each stage's momentum",
    "weight_decay": "each stage's weight_decay",
    "warmup_epochs": "each stage's warmup_epochs",
    "resume": "--resume",
    "project": "--run-dir",
    "name": "--run-dir",
    "exist_ok": "--run-dir",
    "model": "model.weights",
    "task": "model.name",
    "mode": "the command",
    "distill_model": "the distill command's teacher",
}
# FitConfig values Ultralytics' trainer can honour: (required value, why)
ULTRALYTICS_FIT = {
    "ema": (True, "always keeps an EMA of the weights"),
    "eval_every": (1, "validates every epoch; set model.train_args.val=false to validate only the last"),
    "max_steps_per_epoch": (
        None,
        "has no per-epoch step limit (model.train_args.fraction trains on a share)",
    ),
    "bf16": (False, "uses its own AMP (fp16 on CUDA, model.train_args.amp)"),
}
# Where one stage needs another value: stage 1's EMA is reset to the trained weights every epoch.
ULTRALYTICS_FIT_BY_SECTION = {
    ("sparsity", "ema"): (
        False,
        "keeps an EMA, which gcp resets to the trained weights every epoch of sparse training so that sparse.pt "
        "holds γ's exact zeros",
    ),
}
PRUNE_SOURCES = ("sparse", "trained")
DEVICE_PATTERN = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")


class ConfigError(ValueError):
    """A configuration cannot be used as written; the message names the key (and file) at fault.

    ``key`` is the dotted key at fault when there is one, so that :func:`load_config` can tell whether the
    value came from the file or from an override and name the right one."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def option(
    default: Any = dataclasses.MISSING,
    *,
    factory: Any = dataclasses.MISSING,
    choices: Sequence[str] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    within: Interval | None = None,
    path: str | None = None,
) -> Any:
    """A dataclass field with the checks :func:`build_config` applies: ``choices`` (for a list: every entry),
    an inclusive ``minimum`` (exclusive with ``exclusive_minimum``) and ``maximum``, ``within`` (an
    :class:`gcp.limits.Interval` shared with the code that consumes the value, so both accept the same
    values), and ``path`` ("file" or "dir") for :func:`check_paths`."""
    metadata = {
        "choices": tuple(choices) if choices else None,
        "minimum": minimum,
        "maximum": maximum,
        "exclusive_minimum": exclusive_minimum,
        "within": within,
        "path": path,
    }
    return field(default=default, default_factory=factory, metadata=metadata)


@dataclass
class DigitsConfig:
    """How much DigitScenes to generate (``data.format: digits``); image i of a split is the same whatever the
    counts, so a smaller set is a prefix of a larger one with the same seed."""

    n_train: int = option(400, minimum=1)
    n_val: int = option(100, minimum=1)
    n_test: int = option(200, minimum=1)
    seed: int = option(0, minimum=0)


@dataclass
class DataConfig:
    """Where the images are and how they are read.

    ``yaml`` (format ``yolo``): an Ultralytics ``data.yaml``, read by Ultralytics' own checker; its class names
    and its ``train``/``val``/``test`` image folders are the splits (``root``, the split specs and
    ``class_names`` are then not used and must stay unset). Needed for ``model.name: ultralytics``.

    ``train``/``val``/``test`` list split specs, concatenated when there are several (VOC07+12): for ``voc``,
    ``digits`` and ``yolo`` a spec is ``[subfolder/]split`` under ``root`` (``VOC2007/trainval`` reads
    ``root/VOC2007/ImageSets/Main/trainval.txt``); for ``coco`` it names ``root/<spec>/`` images with
    ``root/annotations/instances_<spec>.json``. ``digits`` generates DigitScenes into ``root`` first.
    ``horizontal_flip`` mirrors half the training images; null means on, except for ``digits``, whose mirrored
    digits are not digits of their class.
    """

    format: str = option("digits", choices=DATA_FORMATS)
    root: str = option(".data/digit_scenes_demo", path="dir")
    train: list[str] = option(factory=lambda: ["train"])
    val: list[str] = option(factory=lambda: ["val"])
    test: list[str] = option(factory=lambda: ["test"])
    size: int = option(256, minimum=32)
    class_names: list[str] | None = None
    num_workers: int = option(0, minimum=0)
    strict: bool = True
    horizontal_flip: bool | None = None
    digits: DigitsConfig = option(factory=DigitsConfig)
    yaml: str | None = option(None, path="file")


@dataclass
class ModelConfig:
    """The detector built by ``gcp.detection.models.build``; ``anchors`` (null: YOLOv4's) are designed for
    ``anchor_size`` px and scaled by ``data.size / anchor_size``. ``weights``: a model file to start ``gcp
    train`` from (null: random initialisation).

    ``name: ultralytics`` is a user's Ultralytics YOLOv8/YOLO11 detector: ``weights`` is its checkpoint (``.pt``)
    or model YAML (a file, or the name of one Ultralytics ships, e.g. ``yolov8n.yaml``), the run's
    ``trained.pt``; every training stage runs Ultralytics' trainer on ``data.yaml`` with ``train_args``
    (Ultralytics' own train arguments, e.g. ``{mosaic: 0.5, patience: 20}``) passed through. ``width``,
    ``depth`` and the anchors do not apply to it."""

    name: str = option("yolov4", choices=MODEL_NAMES)
    num_classes: int = option(10, minimum=1)
    width: float = option(0.25, minimum=0.0, exclusive_minimum=True)
    depth: float = option(0.33, minimum=0.0, exclusive_minimum=True)
    anchors: list[list[list[float]]] | None = None
    anchor_size: int = option(416, minimum=1)
    weights: str | None = option(None, path="file")
    train_args: dict[str, Any] = option(factory=dict)


@dataclass
class FitConfig:
    """One ``gcp.detection.train.fit`` run (paper §5.2: SGD, linear warm-up then cosine annealing)."""

    epochs: int = option(1, minimum=1)
    lr: float = option(0.01, minimum=0.0, exclusive_minimum=True)
    batch_size: int = option(16, minimum=1)
    optimizer: str = option("sgd", choices=OPTIMIZERS)
    momentum: float = option(0.937, minimum=0.0, maximum=1.0, exclusive_minimum=True)
    weight_decay: float = option(5e-4, minimum=0.0)
    warmup_epochs: float = option(1.0, minimum=0.0)
    ema: bool = True
    eval_every: int = option(1, minimum=1)
    max_steps_per_epoch: int | None = option(None, minimum=1)
    bf16: bool = False  # bfloat16 autocast forward: faster on AMX/AVX512-BF16 CPUs and recent GPUs


@dataclass
class SparsityConfig(FitConfig):
    """Sparse training (paper §4.1, eq. 3): L1 rate ``s`` on BatchNorm γ; ``dynamic`` lets the ``protect``
    fraction of channels with the largest |γ| decay to ``decay`` × s after ``switch_at`` of the epochs,
    ``constant`` is Network Slimming's fixed rate. ``mechanism`` is ``layer_relative`` (γ trained by the hook
    with its own ``gamma_lr``; works under AdamW) or ``eq3`` (the paper's literal subgradient, for SGD); ``s``
    null takes the mechanism's default (1.0 relative, 7.5e-4 for eq3), see ``gcp.DynamicSparsity``;
    ``follow_schedule`` scales ``gamma_lr`` by the run's warm-up/cosine lr schedule; ``push_floor`` is the
    share of s every channel gets under ``layer_relative`` (so channels silenced downstream still go; off by
    default: 0.3 destroyed the DigitScenes detector in the benchmark's stage 1, docs/design.md).
    ``selective`` scores each channel's Taylor importance for the first ``score_share`` of the steps, then
    ramps the least important channels to zero by ``switch_at`` until they hold ``target`` of the MACs
    (``target_of: macs``, importance per MAC) or of the channels (``channels``); ``s`` must stay null.
    ``ema`` is false by default in this stage, unlike the others: an average of the weights holds none of the
    exact zeros ``layer_relative`` and ``selective`` set (a ``selective`` run's EMA had 0 % where the trained
    weights had 40.6 %), and stage 2 prunes by those zeros. Set it true only for ``eq3`` (no exact zeros);
    ``sparsity_history.json``'s ``final`` counts the zeros sparse.pt holds and a warning says when an EMA lost
    them. ``model.name: ultralytics`` requires it false: Ultralytics' trainer always keeps an EMA, and in this
    stage gcp resets it to the trained weights at every epoch end, so sparse.pt holds the zeros."""

    schedule: str = option("dynamic", choices=SCHEDULES)
    mechanism: str = option("layer_relative", choices=SPARSITY_MECHANISMS)
    s: float | None = option(None, minimum=0.0)
    gamma_lr: float = option(0.02, minimum=0.0, exclusive_minimum=True)
    follow_schedule: bool = False
    push_floor: float = option(DEFAULT_PUSH_FLOOR, minimum=0.0, maximum=1.0)
    target: float = option(DEFAULT_TARGET, minimum=0.0, maximum=1.0, exclusive_minimum=True)
    score_share: float = option(DEFAULT_SCORE_SHARE, minimum=0.0, maximum=1.0)
    target_of: str = option("macs", choices=("macs", "channels"))
    switch_at: float = option(0.5, minimum=0.0, maximum=1.0)
    protect: float = option(0.3, minimum=0.0, maximum=1.0)
    decay: float = option(0.01, minimum=0.0, maximum=1.0)
    ema: bool = False


@dataclass
class PruneConfig:
    """Channel pruning (paper §4.2) with ``gcp.prune_detector``; ``groups`` is ``auto`` (scale/structure
    partition, §4.2.1) or a YAML file of group name → glob patterns; ``allocator: explicit`` takes one ratio
    per group from ``group_ratios`` (the paper's Table 1 rows) instead of ``ratio``; ``source`` picks the sparse-trained or
    the plain trained model; ``calib_images`` real training images feed ThiNet's reconstruction error and the
    offset compensation of every method; ``max_group_ratio`` caps any one group's share (gcp); ``bn_free``
    says what γ methods do with layers that have no BatchNorm (``l1``: rank them by filter L1 norm and cut the
    share the γ thresholds cut; ``keep``: leave them whole; the report lists them either way). ``runtime`` is
    what ``budget: latency`` is timed on: ``auto`` is TensorRT where CUDA and the tensorrt package are present
    (the GPU a detector is deployed on), else ONNX Runtime on this CPU; it applies to that budget only."""

    method: str = option("gcp", choices=PRUNE_METHODS)
    ratio: float = option(0.38, within=PRUNE_RATIO)  # what prune_detector accepts
    budget: str = option("channels", choices=BUDGETS)
    allocator: str = option("valley", choices=ALLOCATORS)
    groups: str = "auto"
    group_ratios: dict[str, float] | None = None
    coupling: str = option("vote", choices=COUPLINGS)
    max_group_ratio: float = option(0.9, minimum=0.0, maximum=1.0, exclusive_minimum=True)
    round_to: int | None = option(None, minimum=1)
    source: str = option("sparse", choices=PRUNE_SOURCES)
    calib_images: int = option(32, minimum=1)
    bn_free: str = option("l1", choices=BN_FREE)
    runtime: str = option("auto", choices=("auto", *RUNTIMES))


@dataclass
class DistillConfig(FitConfig):
    """Group spatial attention distillation (paper §4.3, eq. 4): the trained (unpruned) model teaches the
    pruned one; ``betas`` weight the attention maps per group, largest map first (§5.4). The defaults (equal
    β = 0.07 with ``distance: squared``, ``soft_weight`` 0.3) come from measured gradient norms, see
    ``distill.BALANCED_BETAS``; the paper's own are ``[1000, 1000, 1000, 10000, 10000]`` with ``mean_squared``."""

    betas: list[float] = option(factory=lambda: [0.07] * 5)  # distill.BALANCED_BETAS
    temperature: float = option(1.0, minimum=0.0, exclusive_minimum=True)
    soft_weight: float = option(0.3, minimum=0.0)  # distill.BALANCED_SOFT_WEIGHT
    distance: str = option("squared", choices=ATTENTION_DISTANCES)
    soft_priors: str = option("all", choices=SOFT_PRIORS)
    class_activation: str = option("softmax", choices=CLASS_ACTIVATIONS)
    measure_every: int = option(50, minimum=0)


@dataclass
class EvalConfig:
    """mAP evaluation (pycocotools); ``split`` is the data split models are scored on; ``ap_method`` how a
    precision-recall curve becomes an AP: ``coco101`` (pycocotools' 101-point interpolation), ``voc11``
    (VOC2007's 11-point) or ``voc_area`` (VOC2010+ all-point), see :mod:`gcp.detection.evaluate`."""

    split: str = option("test", choices=EVAL_SPLITS)
    batch_size: int = option(8, minimum=1)
    conf_thres: float = option(0.001, minimum=0.0, maximum=1.0)
    iou_thres: float = option(0.6, minimum=0.0, maximum=1.0)
    ap_method: str = option("coco101", choices=AP_METHODS)


@dataclass
class ExportConfig:
    """ONNX export (and optional TensorRT engines, which need CUDA and the ``tensorrt`` package)."""

    opset: int = option(17, minimum=7)
    fp16: bool = True


@dataclass
class BenchConfig:
    """Latency measurement: median of ``runs`` timed inferences after ``warmup`` untimed ones."""

    runs: int = option(50, minimum=1)
    warmup: int = option(10, minimum=0)
    batch_size: int = option(1, minimum=1)
    tensorrt: bool = False


@dataclass
class DemoConfig:
    """``gcp demo``: the starting (teacher) model file (null: the shipped ``gcp/assets/digits_teacher.pt``), the
    model its sparse-training stage continues (``sparse_start``; null: the shipped ``gcp/assets/digits_sparse.pt``
    that ``benchmarks/bench_method.py`` made from that teacher, ``teacher``: start from the teacher itself) and
    the pruning methods compared at the same budget. Every method is fine-tuned; those in ``distill`` are also
    distilled (GSA is the paper's recovery for gcp, §4.3; add others to separate the method from the recovery).
    ``sweep``: further shares of ``prune.budget`` at which each method is pruned and scored before recovery,
    for the trade-off plot (empty: none)."""

    teacher: str | None = option(None, path="file")
    sparse_start: str | None = None
    methods: list[str] = option(factory=lambda: ["gcp", "slim", "thinet"], choices=PRUNE_METHODS)
    distill: list[str] = option(factory=lambda: ["gcp"], choices=PRUNE_METHODS)
    sweep: list[float] = option(factory=lambda: [0.2, 0.3, 0.5], within=PRUNE_RATIO)


@dataclass
class ExperimentConfig:
    """Everything one run needs; ``device`` is ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when present)."""

    seed: int = option(0, minimum=0)
    device: str = "cpu"
    data: DataConfig = option(factory=DataConfig)
    model: ModelConfig = option(factory=ModelConfig)
    train: FitConfig = option(factory=FitConfig)
    sparsity: SparsityConfig = option(factory=SparsityConfig)
    prune: PruneConfig = option(factory=PruneConfig)
    finetune: FitConfig = option(factory=FitConfig)
    distill: DistillConfig = option(factory=DistillConfig)
    eval: EvalConfig = option(factory=EvalConfig)
    export: ExportConfig = option(factory=ExportConfig)
    bench: BenchConfig = option(factory=BenchConfig)
    demo: DemoConfig = option(factory=DemoConfig)


class _YamlLoader(yaml.SafeLoader):
    """PyYAML reads ``7.5e-4`` (no dot in the mantissa) as a string, although YAML 1.2 and every user read it
    as a number; this loader also resolves that form to a float."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str) -> Any:
    """YAML text to Python values with :class:`_YamlLoader`; a syntax error names ``source``."""
    try:
        return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML ({error})") from error


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    if origin is list:
        return f"list of {_type_name(typing.get_args(hint)[0])}"
    if origin is dict:
        key_hint, value_hint = typing.get_args(hint)
        return f"mapping of {_type_name(key_hint)} to {_type_name(value_hint)}"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    if hint is Any:
        return "any value"
    return "null" if hint is type(None) else hint.__name__


def _closest(name: str, valid: Sequence[str], prefix: str) -> str:
    """'; did you mean prefix.X?' for the closest valid name, or the valid names when none is close."""
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    dotted = f"{prefix}." if prefix else ""
    return f"; did you mean {dotted + match[0]!r}?" if match else f"; valid keys: {', '.join(valid)}"


def _convert(value: Any, hint: Any, key: str) -> Any:
    """``value`` as type ``hint`` or a ConfigError naming ``key`` and the expected type (no silent casts, except
    an integer where a float is expected)."""
    origin = typing.get_origin(hint)
    if hint is Any:  # checked by what consumes it (model.train_args: by Ultralytics)
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping of keys, got {type(value).__name__} {value!r}")
        return _build(hint, value, key)
    if origin in (typing.Union, types.UnionType):
        arguments = typing.get_args(hint)
        if value is None and type(None) in arguments:
            return None
        inner = [arg for arg in arguments if arg is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"unsupported config type {hint}")
        if value is None or isinstance(value, (Mapping, list)):
            return _convert(value, inner[0], key)
        try:
            return _convert(value, inner[0], key)
        except ConfigError as error:
            raise ConfigError(
                f"{key}: expected {_type_name(hint)}, got {type(value).__name__} {value!r}"
            ) from error
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(hint)}, got {type(value).__name__} {value!r}")
        (item_hint,) = typing.get_args(hint)
        return [_convert(item, item_hint, f"{key}[{index}]") for index, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected {_type_name(hint)}, got {type(value).__name__} {value!r}")
        key_hint, value_hint = typing.get_args(hint)
        return {
            _convert(name, key_hint, f"{key} key"): _convert(item, value_hint, f"{key}.{name}")
            for name, item in value.items()
        }
    accepted = {float: (int, float), int: (int,), bool: (bool,), str: (str,)}[hint]
    if isinstance(value, bool) and hint is not bool or not isinstance(value, accepted):
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got {type(value).__name__} {value!r}")
    return hint(value)


def _check_value(value: Any, metadata: Mapping[str, Any], key: str) -> None:
    """Apply an :func:`option`'s choices and range to a converted value."""
    choices = metadata.get("choices")
    if choices and value is not None:
        for item in value if isinstance(value, list) else [value]:
            if item not in choices:
                match = difflib.get_close_matches(str(item), choices, n=1, cutoff=0.5)
                hint = f"; did you mean {match[0]!r}?" if match else ""
                raise ConfigError(f"{key}: {item!r} is not one of {', '.join(choices)}{hint}")
    minimum, maximum, within = metadata.get("minimum"), metadata.get("maximum"), metadata.get("within")
    for item in value if isinstance(value, list) else [value]:
        if item is None or not isinstance(item, (int, float)):
            continue
        if within is not None and item not in within:
            raise ConfigError(f"{key}: must be a number in {within}, got {item!r}")
        if minimum is not None and (item <= minimum if metadata.get("exclusive_minimum") else item < minimum):
            relation = ">" if metadata.get("exclusive_minimum") else ">="
            raise ConfigError(f"{key}: must be {relation} {minimum}, got {item!r}")
        if maximum is not None and item > maximum:
            raise ConfigError(f"{key}: must be <= {maximum}, got {item!r}")


def _build(cls: type, raw: Mapping[str, Any], prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, rejecting unknown keys with a suggestion."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise ConfigError(f"unknown key {key!r}{_closest(str(name), list(fields), prefix)}", key)
        try:
            values[name] = _convert(value, hints[name], key)
            _check_value(values[name], fields[name].metadata, key)
        except ConfigError as error:
            if error.key is None:  # the innermost section that saw the error has set the most precise key
                error.key = key
            raise
    return cls(**values)


def build_config(raw: Mapping[str, Any] | None) -> ExperimentConfig:
    """An :class:`ExperimentConfig` from nested mappings (missing keys keep their defaults)."""
    if raw is None:
        return ExperimentConfig()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    config = _build(ExperimentConfig, raw, "")
    if not DEVICE_PATTERN.match(config.device):
        raise ConfigError(f"device: expected cpu, cuda, cuda:N or auto, got {config.device!r}", "device")
    if (config.prune.allocator == "explicit") != (config.prune.group_ratios is not None):
        raise ConfigError(
            "prune.group_ratios (one ratio per group) is used exactly when prune.allocator is 'explicit'; "
            f"got allocator {config.prune.allocator!r} with group_ratios {config.prune.group_ratios!r}"
        )
    if config.prune.runtime != "auto" and config.prune.budget != "latency":
        raise ConfigError(
            f"prune.runtime: {config.prune.runtime!r} is what budget latency is timed on; the budget is "
            f"{config.prune.budget!r}",
            "prune.runtime",
        )
    for group, ratio in (config.prune.group_ratios or {}).items():
        if not 0.0 <= ratio < 1.0:  # checked here, not after the hours of sparse training before the prune
            raise ConfigError(
                f"prune.group_ratios.{group}: a group's ratio must lie in [0, 1), got {ratio}",
                f"prune.group_ratios.{group}",
            )
    _check_data_source(config.data)
    _check_ultralytics(config)
    return config


def _check_data_source(data: DataConfig) -> None:
    """The yolo format's class names come from ``class_names`` or a ``data.yaml``; a data.yaml, which gives the
    images, splits and names, leaves nothing for ``root``, the split specs and ``class_names`` to say."""
    if data.yaml is None:
        if data.format == "yolo" and not data.class_names:
            raise ConfigError(
                "data.class_names: the yolo format has no class list of its own; list the names, or give the "
                "data.yaml that does",
                "data.class_names",
            )
        return
    if data.format != "yolo":
        raise ConfigError(f"data.yaml: is read for data.format yolo, not {data.format!r}", "data.yaml")
    defaults = DataConfig()
    for name in ("root", "train", "val", "test", "class_names"):
        if getattr(data, name) != getattr(defaults, name):
            raise ConfigError(
                f"data.{name}: data.yaml gives the images, splits and class names; remove data.{name}",
                f"data.{name}",
            )


def _check_ultralytics(config: ExperimentConfig) -> None:
    """``model.name: ultralytics`` needs its model file and a data.yaml, Ultralytics-only arguments need that
    model, and every training section must ask for what Ultralytics' trainer can do."""
    model = config.model
    if model.name != "ultralytics":
        if model.train_args:
            raise ConfigError(
                "model.train_args: are Ultralytics' train arguments, for model.name ultralytics only",
                "model.train_args",
            )
        return
    if model.weights is None or Path(model.weights).suffix not in (".pt", ".yaml", ".yml"):
        raise ConfigError(
            "model.weights: model.name ultralytics needs the model, an Ultralytics checkpoint (.pt) or model "
            f"YAML (.yaml), got {model.weights!r}",
            "model.weights",
        )
    if config.data.yaml is None:
        raise ConfigError(
            "data.yaml: model.name ultralytics trains with Ultralytics' trainer, which reads a data.yaml; set "
            "data.format: yolo and data.yaml",
            "data.yaml",
        )
    for key in model.train_args:
        if key in ULTRALYTICS_SET_BY_GCP:
            raise ConfigError(
                f"model.train_args.{key}: is set by gcp from {ULTRALYTICS_SET_BY_GCP[key]}; set it there",
                f"model.train_args.{key}",
            )
    for section in ("train", "sparsity", "finetune", "distill"):
        settings = getattr(config, section)
        for key, (required, why) in ULTRALYTICS_FIT.items():
            if (section, key) in ULTRALYTICS_FIT_BY_SECTION:
                required, why = ULTRALYTICS_FIT_BY_SECTION[section, key]
            if getattr(settings, key) != required:
                raise ConfigError(
                    f"{section}.{key}: must be {required!r} for model.name ultralytics (Ultralytics' trainer "
                    f"{why})",
                    f"{section}.{key}",
                )


def apply_overrides(raw: Mapping[str, Any] | None, overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``raw`` with every ``dotted.key=value`` of ``overrides`` set; values are parsed as YAML
    (``0.4``, ``null``, ``[gcp, slim]``). Keys are checked when the result is built."""
    result: dict[str, Any] = _deep_copy(raw or {})
    for override in overrides:
        dotted, separator, text = override.partition("=")
        if not separator or not dotted.strip():
            raise ConfigError(f"override {override!r}: expected key=value, e.g. prune.ratio=0.4")
        set_key(result, dotted.strip(), parse_yaml(text, f"override {override!r}"), f"override {override!r}")
    return result


def set_key(raw: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    """Set ``section.key`` (any depth) in a raw config, creating sections; ``source`` names who set it in the
    error when a part of the path is a value, not a section."""
    parts = dotted.split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {'.'.join(parts[: depth + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def _deep_copy(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in raw.items()}


def resolve_config_path(name_or_path: str | Path | None) -> Path:
    """The YAML file meant by ``--config``: an existing path, else a packaged config's name (``demo``)."""
    if name_or_path is None:
        name_or_path = DEFAULT_CONFIG
    path = Path(name_or_path)
    if path.is_file():
        return path
    packaged = PACKAGED_CONFIGS / f"{path.stem}.yaml"
    if path.parent == Path(".") and packaged.is_file():
        return packaged
    known = ", ".join(sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml")))
    raise ConfigError(f"config file not found: {path} (packaged configs: {known})")


def load_config(
    name_or_path: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    origins: Sequence[str] | None = None,
) -> tuple[ExperimentConfig, Path]:
    """Read, override and check a config; returns it with the file it came from.

    An error starts with where the bad value came from, so the user looks in the right place: the file, or
    the override that set the key (``--set prune.ratoi=0.3: unknown key ...``). ``origins`` names how each
    override was given, one per override (the command line passes ``--ratio 0.4`` for its shortcut flags);
    by default ``--set <override>``.
    """
    if origins is None:
        origins = [f"--set {override}" for override in overrides]
    elif len(origins) != len(overrides):
        raise ValueError(f"load_config: one origin per override, got {len(origins)} for {len(overrides)}")
    path = resolve_config_path(name_or_path)
    raw = parse_yaml(path.read_text(encoding="utf-8"), str(path))
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: a config must be a mapping of sections, got {type(raw).__name__}")
    merged = apply_overrides(raw, overrides)  # its errors name the override already
    try:
        return build_config(merged), path
    except ConfigError as error:
        source = _origin(error.key, overrides, origins)
        if source is None:
            source = f"{path} with {', '.join(origins)}" if error.key is None and origins else str(path)
        raise ConfigError(f"{source}: {error}", error.key) from None


def _origin(key: str | None, overrides: Sequence[str], origins: Sequence[str]) -> str | None:
    """The origin of the last override that set ``key``: the key itself, a section holding it (which the
    override replaced whole), or a key below it (which created it); None when the file set it."""
    if key is None:
        return None
    for override, origin in zip(reversed(overrides), reversed(origins)):
        dotted = override.partition("=")[0].strip()
        if key == dotted or key.startswith((f"{dotted}.", f"{dotted}[")) or dotted.startswith(f"{key}."):
            return origin
    return None


def config_to_dict(config: ExperimentConfig) -> dict[str, Any]:
    """Nested plain dicts and lists (what :func:`build_config` takes back)."""
    return dataclasses.asdict(config)


def dump_config(config: ExperimentConfig) -> str:
    """YAML text that :func:`load_config` reads back to an equal config."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


def lookup(config: ExperimentConfig, dotted: str) -> tuple[Any, dataclasses.Field]:
    """The value of ``dotted`` (e.g. ``data.root``) and its dataclass field."""
    *sections, name = dotted.split(".")
    node: Any = config
    for part in sections:
        node = getattr(node, part)
    fields = {f.name: f for f in dataclasses.fields(node)}
    if name not in fields:
        raise KeyError(f"no config key {dotted!r}")
    return getattr(node, name), fields[name]


def check_paths(config: ExperimentConfig, keys: Sequence[str]) -> None:
    """Fail with the key and the path when a path-valued key (see :func:`option`) names nothing on disk."""
    for key in keys:
        value, spec = lookup(config, key)
        kind = spec.metadata.get("path")
        if value is None or kind is None:
            continue
        path = Path(value)
        exists = path.is_dir() if kind == "dir" else path.is_file()
        if not exists:
            noun = "directory" if kind == "dir" else "file"
            raise ConfigError(f"{key}: no such {noun}: {path} (absolute: {path.resolve()})")
