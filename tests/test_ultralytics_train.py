"""Stages 1 and 3 on an Ultralytics model with Ultralytics' own trainer (gcp.app.ultralytics.trainer.train).

A tiny YOLO-format dataset (64 px images of coloured boxes, two classes; tests/_ultralytics_toys.py) is written
into a temporary folder; every run is one epoch of YOLOv8n at 64 px on CPU, with nothing downloaded.
"""

import copy
import csv
import json
import math

import pytest
import torch

pytest.importorskip("ultralytics")

from _ultralytics_toys import CLASS_NAMES, IMGSZ, offline_ultralytics, write_boxes_dataset  # noqa: E402
from ultralytics import YOLO  # noqa: E402
from ultralytics.nn.tasks import DetectionModel  # noqa: E402

import gcp  # noqa: E402
from gcp.app.ultralytics.trainer import (
    PRUNING_RECORD,  # noqa: E402
    train,  # noqa: E402
)

CLASSES = len(CLASS_NAMES)
TRAIN = {"imgsz": IMGSZ, "batch": 4, "nbs": 4, "plots": False, "workers": 0, "seed": 0}


@pytest.fixture(scope="module", autouse=True)
def no_downloads():
    with offline_ultralytics():
        yield


@pytest.fixture(scope="module")
def data_yaml(tmp_path_factory):
    return write_boxes_dataset(tmp_path_factory.mktemp("boxes"))


def yolov8n():
    """YOLOv8n for two classes with spread-out γ (a fresh model's γ are all 1, nothing to rank or sparsify)."""
    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=CLASSES, verbose=False)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.05, 1.0)
    return model


@pytest.fixture(scope="module")
def pruned():
    """(PruneResult of 30 % of YOLOv8n's channels, its parameter count, the unpruned model)."""
    model = yolov8n()
    teacher = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="no valley"):
        result = gcp.prune_detector(model, torch.rand(1, 3, IMGSZ, IMGSZ), ratio=0.3)
    return result, n_params(model), teacher


def test_a_trained_pruned_model_pruned_again_keeps_a_weights_only_file_of_both_steps(
    pruned, data_yaml, tmp_path
):
    """Iterative pruning on Ultralytics' trainer (torch-pruning's YOLOv8 recipe in bench_ultralytics): prune,
    fine-tune, prune the fine-tuned checkpoint again with its carried record chained, fine-tune; gcp's
    weights-only file of the last run replays both prunings on a fresh YOLOv8n."""
    result, params, _ = copy.deepcopy(pruned)
    first = train(result, data_yaml, epochs=1, project=str(tmp_path), name="round1", **TRAIN)
    model = YOLO(first).model.float().requires_grad_(True)
    record = getattr(model, PRUNING_RECORD)
    images = torch.rand(1, 3, IMGSZ, IMGSZ)
    again = gcp.prune_detector(model, images, ratio=0.2)
    again = again.following(record["history"], record["report"])
    assert again.report["params"]["before"] == result.report["params"]["before"]
    assert again.report["params"]["after"] == n_params(model) < params

    last = train(again, data_yaml, epochs=1, project=str(tmp_path), name="round2", **TRAIN)
    assert getattr(YOLO(last).model, PRUNING_RECORD)["history"] == again.history
    rebuilt = gcp.load_pruned(
        last.parent / f"gcp_{last.name}", base=DetectionModel("yolov8n.yaml", nc=CLASSES, verbose=False)
    )
    assert n_params(rebuilt) == n_params(model)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images)[0], model.eval()(images)[0])


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def gammas(model):
    return torch.cat(
        [m.weight.detach().flatten() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    )


def results(run_dir):
    with open(run_dir / "results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


class Killed(Exception):
    """Stands for a training process killed in the middle of an epoch."""


class Probe:
    """A fit hook recording, at each ``after_backward``, (epoch, total epochs, whether gradients exist, whether
    AMP's scaler had unscaled them: None without a ``trainer`` to ask); raises :class:`Killed` at the first
    step of epoch ``stop_at``."""

    def __init__(self, model, stop_at=None):
        self.model = model
        self.stop_at = stop_at
        self.trainer = None
        self.calls = []

    def after_backward(self, epoch, total_epochs):
        if epoch == self.stop_at:
            raise Killed
        grads = any(p.grad is not None for p in self.model.parameters())
        unscaled = None
        if self.trainer is not None:
            try:  # GradScaler refuses a second unscale_ of the same step
                self.trainer.scaler.unscale_(self.trainer.optimizer)
                unscaled = False
            except RuntimeError:
                unscaled = True
        self.calls.append((epoch, total_epochs, grads, unscaled))


def test_a_pruned_model_trains_as_it_is_and_its_checkpoints_load_validate_and_rebuild(
    pruned, data_yaml, tmp_path
):
    result, params, teacher = copy.deepcopy(pruned)
    assert params < 0.8 * n_params(teacher)
    path = train(result, data_yaml, epochs=1, project=str(tmp_path), name="run", **TRAIN)

    assert path.name == "best.pt" and n_params(result.model) == params
    loaded = YOLO(path)
    assert n_params(loaded.model) == params
    assert getattr(loaded.model, PRUNING_RECORD)["history"] == result.history
    images = torch.rand(2, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        expected = result.model(images)[0]
        torch.testing.assert_close(loaded.model(images)[0], expected)
    metrics = loaded.val(data=str(data_yaml), imgsz=IMGSZ, batch=4, plots=False, project=str(tmp_path))
    assert 0.0 <= metrics.box.map50 <= 1.0

    rebuilt = gcp.load_pruned(
        path.parent / "gcp_best.pt", base=DetectionModel("yolov8n.yaml", nc=CLASSES, verbose=False)
    )
    assert n_params(rebuilt) == params
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images)[0], expected)


def zero_fraction(model):
    return float((gammas(model) == 0).float().mean())


def test_sparse_training_steps_gamma_before_the_optimizer_and_a_killed_run_resumes(
    data_yaml, tmp_path, monkeypatch
):
    """Also: the checkpoints hold the trained weights (the EMA holds the γ zeros), which the hook's history
    describes, and the run returns last.pt; AMP's finiteness check works without torch 2.6's get_total_norm."""
    monkeypatch.delattr(torch.nn.utils, "get_total_norm", raising=False)  # as on torch < 2.6
    model = yolov8n()
    before = gammas(model).clone()
    sparsity = gcp.DynamicSparsity(model, s=2.0, lr=0.05)
    probe = Probe(model, stop_at=1)
    with pytest.raises(Killed):
        train(model, data_yaml, epochs=2, hooks=[sparsity, probe], project=str(tmp_path), name="run", **TRAIN)
    assert probe.calls == [(0, 2, True, None)] * 2  # 8 images, batch 4, one step per batch
    last = tmp_path / "run" / "weights" / "last.pt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    optimizer = checkpoint["optimizer"]
    norms = next(g for g in optimizer["param_groups"] if g["param_group"] == "bn")["params"]
    assert optimizer["state"] and not set(norms) & set(optimizer["state"])  # γ was never the optimiser's

    interrupted = YOLO(last)
    after = gammas(interrupted.model)
    assert (after.abs() < before.abs() - 0.05).float().mean() > 0.2  # pushed towards zero, not only drifted
    # the EMA Ultralytics saves holds the trained weights' zeros, which the history counts
    assert (after == 0).any()
    assert sparsity.history[-1]["groups"]["all"]["zero_fraction"] == zero_fraction(interrupted.model)

    resumed = gcp.DynamicSparsity(interrupted.model, s=2.0, lr=0.05)
    probe = Probe(interrupted.model)

    def scale_gradients(trainer):  # AMP's GradScaler, which Ultralytics enables on CUDA only
        trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        probe.trainer = trainer

    interrupted.add_callback("on_pretrain_routine_end", scale_gradients)
    path = train(interrupted, data_yaml, epochs=2, hooks=[resumed, probe], resume=True, **TRAIN)
    assert probe.calls == [(1, 2, True, True)] * 2
    assert [entry["epoch"] for entry in resumed.history] == [0, 1]  # epoch 0's entry came from gcp_hooks.pt
    assert [row["epoch"].strip() for row in results(tmp_path / "run")] == ["1", "2"]
    assert path.name == "last.pt" and n_params(YOLO(path).model) == n_params(model)
    assert zero_fraction(YOLO(path).model) == zero_fraction(interrupted.model) > 0
    assert resumed.history[-1]["groups"]["all"]["zero_fraction"] == zero_fraction(interrupted.model)

    unpruned = gcp.load_pruned(
        path.parent / "gcp_last.pt", base=DetectionModel("yolov8n.yaml", nc=CLASSES, verbose=False)
    )
    images = torch.rand(1, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        torch.testing.assert_close(unpruned.eval()(images)[0], interrupted.model(images)[0])


def test_the_hooks_follow_an_optimiser_the_trainer_rebuilds(data_yaml, tmp_path):
    """Ultralytics versions whose out-of-memory retry (halving the batch in the first epoch) also rebuilds the
    optimiser: sparse training must go on with the new one."""
    yolo = YOLO("yolov8n.yaml")
    yolo.model = model = yolov8n()
    sparsity = gcp.DynamicSparsity(model, s=2.0, lr=0.05)
    probe = Probe(model)
    optimisers = []

    def rebuild(trainer):  # after the first step, as _build_train_pipeline did on an out-of-memory error
        optimisers.append(trainer.optimizer)
        if len(optimisers) == 1:
            args = trainer.args
            trainer.optimizer = trainer.build_optimizer(
                trainer.model, args.optimizer, args.lr0, args.momentum, args.weight_decay
            )
            trainer._setup_scheduler()

    yolo.add_callback("on_train_batch_end", rebuild)
    train(yolo, data_yaml, epochs=2, hooks=[sparsity, probe], project=str(tmp_path), name="run", **TRAIN)
    assert len({id(o) for o in optimisers}) == 2 and len(probe.calls) == 4  # every step, on either optimiser
    assert [entry["groups"]["all"]["zero_fraction"] > 0 for entry in sparsity.history] == [True, True]


class Clock:
    """A fit hook recording the step clock and the lr scale it is given, and how many steps it ran in."""

    def __init__(self):
        self.positions, self.scales, self.steps = [], [], 0

    def on_lr(self, scale):
        self.scales.append(scale)

    def on_step(self, step, total_steps):
        self.positions.append((step, total_steps))

    def after_backward(self, epoch, total_epochs):
        self.steps += 1


def test_hooks_get_real_optimiser_steps_and_the_lr_scale_through_the_warm_up(data_yaml, tmp_path):
    """With nbs > batch Ultralytics accumulates gradients over a count its warm-up ramps from 1 to nbs / batch:
    on_step must count the steps it takes, against the total it will take, and on_lr (follow_schedule) must get
    the lr of each step over the base lr, as gcp.detection.train.fit gives them."""
    clock = Clock()
    run = {**TRAIN, "batch": 2, "nbs": 8, "warmup_epochs": 2, "val": False}
    train(yolov8n(), data_yaml, epochs=3, hooks=[clock], project=str(tmp_path), name="run", **run)
    steps = clock.steps  # 4 batches of 2 per epoch, accumulating 1, 1, 2, 3 then 4 batches: 5 steps in 12
    assert 3 < steps < 12 and clock.positions == [(step, steps) for step in range(steps)]
    assert len(clock.scales) == steps and clock.scales[0] == 0.0 < clock.scales[1]  # the warm-up rises from 0
    assert clock.scales[-1] == pytest.approx((1 - 2 / 3) * (1 - 0.01) + 0.01)  # linear lr schedule, epoch 3


def test_distillation_from_the_unpruned_teacher_adds_and_logs_its_terms(pruned, data_yaml, tmp_path):
    result, params, teacher = copy.deepcopy(pruned)
    teacher_weights = copy.deepcopy(teacher.state_dict())
    options = {"temperature": 2.0, "measure_every": 1}
    run = {"project": str(tmp_path), "name": "run", **TRAIN}
    train(result, data_yaml, epochs=1, teacher=teacher, distill_options=options, **run)

    row = results(tmp_path / "run")[0]
    for term in ("at", "soft_cls", "soft_box"):
        assert math.isfinite(float(row[f"train/{term}"]))
        assert f"val/{term}" not in row  # the validator computes only Ultralytics' loss
    assert float(row["train/at"]) > 0 and float(row["train/soft_cls"]) > 0
    log = json.loads((tmp_path / "run" / "distill_terms.json").read_text())
    norms = log[0]["grad_norms"]
    taps = [name for name in norms if name.startswith("at/")]  # one per backbone stride
    assert len(taps) >= 3 and {"soft_cls", "soft_box", "hard"} <= set(norms)
    assert all(norms[name] > 0 for name in [*taps, "soft_cls", "hard"])
    assert log[0]["measured"] == log[0]["steps"] == 2

    assert n_params(result.model) == params
    assert all(torch.equal(v, teacher_weights[k]) for k, v in teacher.state_dict().items())
    assert result.model.criterion is None
    assert not any(m._forward_hooks for m in result.model.modules())  # the attention taps are gone


def test_a_model_for_another_number_of_classes_is_refused(data_yaml, tmp_path):
    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    with pytest.raises(ValueError, match="predicts 3 classes but .* has 2"):
        train(model, data_yaml, epochs=1, project=str(tmp_path), **TRAIN)
    with pytest.raises(ValueError, match="set by train"):
        train(model, data_yaml, epochs=1, distill_model="yolov8s.pt")
