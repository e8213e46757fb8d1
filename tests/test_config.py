"""Tests of gcp.app.config: the packaged configs, strict loading (unknown keys, types, ranges, paths) and overrides."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from _core_toys import ToyDetector, randomise_bn

from gcp import prune_detector
from gcp.app.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    build_config,
    check_paths,
    dump_config,
    load_config,
    parse_yaml,
)


def test_paper_config_holds_the_papers_yolov4_settings() -> None:
    config, path = load_config("paper_yolov4_voc")
    assert path.name == "paper_yolov4_voc.yaml"
    assert config.data.format == "voc" and config.data.size == 416
    assert config.data.train == ["VOC2007/trainval", "VOC2012/trainval"]
    assert config.data.test == ["VOC2007/test"]
    assert config.model.name == "yolov4" and config.model.num_classes == 20
    sparsity = config.sparsity
    assert (sparsity.epochs, sparsity.s, sparsity.lr, sparsity.batch_size) == (200, 0.00075, 0.002, 16)
    assert (sparsity.schedule, sparsity.switch_at, sparsity.protect, sparsity.decay) == (
        "dynamic",
        0.5,
        0.3,
        0.01,
    )
    assert config.distill.betas == [1000.0, 1000.0, 1000.0, 10000.0, 10000.0]
    assert config.device == "cuda"


def test_demo_config_is_the_default_and_describes_the_reduced_yolov4() -> None:
    config, path = load_config()
    assert path.name == "demo.yaml"
    assert (config.model.width, config.model.depth, config.data.size) == (0.25, 0.33, 256)
    assert config.demo.methods == ["gcp", "slim", "thinet"]


def test_unknown_keys_name_the_key_and_the_closest_valid_one() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'prune\.ratoi'; did you mean 'prune\.ratio'\?"):
        build_config({"prune": {"ratoi": 0.3}})
    with pytest.raises(ConfigError, match=r"unknown key 'sparsty'; did you mean 'sparsity'\?"):
        build_config({"sparsty": {"s": 0.001}})
    with pytest.raises(
        ConfigError, match=r"unknown key 'data\.digits\.n_trian'; did you mean 'data\.digits\.n_train'"
    ):
        build_config({"data": {"digits": {"n_trian": 3}}})
    with pytest.raises(ConfigError, match=r"unknown key 'zzz'; valid keys: seed, device"):
        build_config({"zzz": 1})


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"prune": {"ratio": "forty"}}, r"prune\.ratio: expected float, got str 'forty'"),
        ({"train": {"epochs": 2.5}}, r"train\.epochs: expected int, got float 2\.5"),
        ({"train": {"epochs": True}}, r"train\.epochs: expected int, got bool True"),
        ({"train": {"ema": "yes"}}, r"train\.ema: expected bool, got str 'yes'"),
        ({"prune": {"round_to": "8"}}, r"prune\.round_to: expected int or null, got str '8'"),
        ({"distill": {"betas": [1, "x"]}}, r"distill\.betas\[1\]: expected float, got str 'x'"),
        ({"data": {"train": "train"}}, r"data\.train: expected list of str, got str 'train'"),
        ({"data": 3}, r"data: expected a mapping of keys, got int 3"),
    ],
)
def test_wrong_types_name_the_key_and_the_expected_type(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(raw)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"prune": {"method": "gpc"}}, r"prune\.method: 'gpc' is not one of .*; did you mean 'gcp'\?"),
        ({"demo": {"methods": ["gcp", "thinnet"]}}, r"demo\.methods: 'thinnet' is not one of"),
        ({"prune": {"ratio": 1.5}}, r"prune\.ratio: must be a number in \(0, 1\), got 1\.5"),
        ({"prune": {"ratio": 0}}, r"prune\.ratio: must be a number in \(0, 1\), got 0"),
        ({"train": {"epochs": 0}}, r"train\.epochs: must be >= 1, got 0"),
        ({"device": "gpu"}, r"device: expected cpu, cuda, cuda:N or auto, got 'gpu'"),
        ({"prune": {"allocator": "explicit"}}, r"prune\.group_ratios .* allocator 'explicit'"),
        (
            {"prune": {"runtime": "tensorrt"}},
            r"prune\.runtime: 'tensorrt' is what budget latency is timed on; the budget is 'channels'",
        ),
        (
            {"prune": {"allocator": "explicit", "group_ratios": {"head": 1.2}}},
            r"prune\.group_ratios\.head: a group's ratio must lie in \[0, 1\), got 1\.2",
        ),
        ({"data": {"format": "yolo"}}, r"data\.class_names: the yolo format"),
        ({"sparsity": {"target_of": "params"}}, r"sparsity\.target_of: 'params' is not one of"),
    ],
)
def test_values_outside_their_choices_or_range_are_rejected(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(raw)


def test_ints_are_accepted_for_floats_and_exponents_without_a_dot_are_numbers() -> None:
    config = build_config(parse_yaml("sparsity: {s: 7.5e-4, lr: 1}\nprune: {ratio: 4E-1}", "inline"))
    assert config.sparsity.s == pytest.approx(7.5e-4) and isinstance(config.sparsity.lr, float)
    assert config.prune.ratio == pytest.approx(0.4)


def test_overrides_set_nested_keys_as_yaml_values_and_are_checked_like_the_file() -> None:
    raw = apply_overrides(
        {"prune": {"ratio": 0.3}}, ["prune.ratio=0.45", "demo.methods=[gcp, l1]", "model.weights=null"]
    )
    config = build_config(raw)
    assert (
        config.prune.ratio == 0.45 and config.demo.methods == ["gcp", "l1"] and config.model.weights is None
    )
    with pytest.raises(ConfigError, match=r"expected key=value"):
        apply_overrides({}, ["prune.ratio"])
    with pytest.raises(ConfigError, match=r"prune\.ratio is not a section"):
        apply_overrides({"prune": {"ratio": 0.3}}, ["prune.ratio.x=1"])
    with pytest.raises(ConfigError, match=r"did you mean 'prune\.budget'"):
        build_config(apply_overrides({}, ["prune.budgte=macs"]))


def test_load_config_names_the_file_in_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found: .*nowhere\.yaml \(packaged configs: demo"):
        load_config(tmp_path / "nowhere.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("prune: [unclosed", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_config(broken)
    typo = tmp_path / "typo.yaml"
    typo.write_text("prune:\n  methd: slim\n", encoding="utf-8")
    with pytest.raises(
        ConfigError, match=r"typo\.yaml: unknown key 'prune\.methd'; did you mean 'prune\.method'"
    ):
        load_config(typo)


def test_check_paths_names_the_key_and_the_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "no_voc_here"
    config = build_config({"data": {"format": "voc", "root": str(missing)}, "model": {"weights": None}})
    with pytest.raises(ConfigError, match=rf"data\.root: no such directory: {missing}"):
        check_paths(config, ["data.root", "model.weights"])
    weights = tmp_path / "w.pt"
    with pytest.raises(ConfigError, match=rf"model\.weights: no such file: {weights}"):
        check_paths(build_config({"model": {"weights": str(weights)}}), ["model.weights"])
    missing.mkdir()
    check_paths(config, ["data.root", "model.weights"])


def test_dumped_config_loads_back_equal(tmp_path: Path) -> None:
    config, _ = load_config(
        "paper_yolov4_voc", ["prune.allocator=explicit", "prune.group_ratios={head: 0.5}"]
    )
    saved = tmp_path / "saved.yaml"
    saved.write_text(dump_config(config), encoding="utf-8")
    reloaded, _ = load_config(saved)
    assert reloaded == config
    assert dataclasses.asdict(build_config({})) == dataclasses.asdict(ExperimentConfig())


def test_a_bad_key_given_with_set_is_blamed_on_set_not_on_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        load_config("demo", ["prune.ratoi=0.3"])
    message = str(error.value)
    assert message.startswith("--set prune.ratoi=0.3: unknown key 'prune.ratoi'; did you mean 'prune.ratio'?")
    assert "demo.yaml" not in message
    # A whole section given with --set, a key below a bad one, and a bad value: still the --set's.
    with pytest.raises(ConfigError, match=r"^--set prune=\{ratio: 2\}: prune\.ratio: must be a number in"):
        load_config("demo", ["prune={ratio: 2}"])
    with pytest.raises(ConfigError, match=r"^--set prune\.ratoi\.x=1: unknown key 'prune\.ratoi'"):
        load_config("demo", ["prune.ratoi.x=1"])
    with pytest.raises(ConfigError, match=r"^--set train\.epochs=0: train\.epochs: must be >= 1"):
        load_config("demo", ["seed=3", "train.epochs=0"])
    # The last --set of a key is the one in force, so it is the one named.
    with pytest.raises(ConfigError, match=r"^--set prune\.ratio=7: "):
        load_config("demo", ["prune.ratio=0.2", "prune.ratio=7"])
    # A typo in the file stays the file's, whatever else --set changes.
    typo = tmp_path / "typo.yaml"
    typo.write_text("prune:\n  methd: slim\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^\S*typo\.yaml: unknown key 'prune\.methd'"):
        load_config(typo, ["prune.ratio=0.4"])
    # The command line's shortcut flags say which flag it was.
    with pytest.raises(ConfigError, match=r"^--ratio 1\.0: prune\.ratio: must be a number in \(0, 1\)"):
        load_config("demo", ["prune.ratio=1.0"], origins=["--ratio 1.0"])
    # A check across keys names the file and every override.
    with pytest.raises(
        ConfigError, match=r"demo\.yaml with --set prune\.allocator=explicit: prune\.group_ratios"
    ):
        load_config("demo", ["prune.allocator=explicit"])
    with pytest.raises(ValueError, match="one origin per override"):
        load_config("demo", ["prune.ratio=0.3"], origins=[])


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.25, 1.5, float("nan"), float("inf")])
def test_config_refuses_exactly_the_prune_ratios_prune_detector_refuses(ratio: float) -> None:
    with pytest.raises(ConfigError, match=r"prune\.ratio: must be a number in \(0, 1\)"):
        build_config({"prune": {"ratio": ratio}})
    model = randomise_bn(ToyDetector(width=4))
    with pytest.raises(ValueError, match=r"ratio must be a number in \(0, 1\)"):
        prune_detector(model, torch.randn(1, 3, 32, 32), ratio=ratio)


def test_config_takes_prune_ratios_just_inside_the_range() -> None:
    for ratio in (1e-6, 0.5, 0.999999):
        assert build_config({"prune": {"ratio": ratio}}).prune.ratio == ratio


def test_an_ultralytics_model_needs_its_file_a_data_yaml_and_what_its_trainer_can_do() -> None:
    base = {
        "data": {"format": "yolo", "yaml": "data.yaml"},
        "model": {"name": "ultralytics", "weights": "yolov8n.yaml", "train_args": {"mosaic": 0.5}},
    }
    assert build_config(base).model.train_args == {"mosaic": 0.5}
    assert load_config("ultralytics")[0].model.name == "ultralytics"  # the packaged starting point
    cases = [
        (["model.weights=null"], r"model\.weights: model\.name ultralytics needs the model"),
        (["model.weights=best.onnx"], r"model\.weights: .* got 'best\.onnx'"),
        (["data.yaml=null", "data.class_names=[a]"], r"data\.yaml: model\.name ultralytics trains with"),
        (["model.train_args.lr0=0.1"], r"model\.train_args\.lr0: is set by gcp from each stage's lr"),
        (["distill.bf16=true"], r"distill\.bf16: must be False for model\.name ultralytics"),
        (["sparsity.ema=true"], r"sparsity\.ema: must be False .* resets to the trained weights"),
        (["finetune.ema=false"], r"finetune\.ema: must be True .* always keeps an EMA"),
        (["data.val=[test]"], r"data\.val: data\.yaml gives the images, splits and class names"),
        (["data.format=voc"], r"data\.yaml: is read for data\.format yolo, not 'voc'"),
        (["model.name=yolov4"], r"model\.train_args: are Ultralytics' train arguments"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            build_config(apply_overrides(base, overrides))
