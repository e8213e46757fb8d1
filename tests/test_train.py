"""Tests of gcp.detection.train: schedule, parameter groups, hook order, checkpoints, resume and DDP (gloo, CPU)."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from _ddp_worker import GLOBAL_IMAGES, global_batch_options
from _train_toys import (
    FixedDetection,
    GammaSubgradient,
    Interrupted,
    TinyDetector,
    ToyDetection,
    make_model,
    make_plain_model,
    toy_loss,
)
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from gcp.app.config import DistillConfig, FitConfig, SparsityConfig
from gcp.core.serialize import ModelFileError
from gcp.detection.data import batch_to
from gcp.detection.train import (
    CHECKPOINT_FORMAT,
    EMA_DECAY,
    EMA_RAMP_UPDATES,
    RESUME_SETTINGS,
    FitSettings,
    ModelEMA,
    _swap_in_sync_batchnorm,
    fit,
    load_checkpoint,
    parameter_groups,
    warmup_cosine_lr,
    warmup_momentum,
)

TESTS_DIR = Path(__file__).parent


def untimed(history: dict) -> dict:
    """A history without its epoch times, which differ between runs and between processes."""
    return {name: values for name, values in history.items() if name != "seconds"}


def quick_fit(model: nn.Module, **overrides) -> dict:
    """fit on the toy data with 4 steps per epoch, no progress bar, toy loss unless overridden."""
    options = dict(epochs=2, batch_size=2, lr=0.05, loss_fn=toy_loss, progress=False)
    options.update(overrides)
    return fit(model, ToyDetection(8), **options)


@pytest.fixture
def optimizer_steps():
    """Every optimiser step taken during the test, as (lr, momentum or beta1) of the first param group."""
    recorded = []

    def record(optimizer, args, kwargs):
        group = optimizer.param_groups[0]
        recorded.append((group["lr"], group["betas"][0] if "betas" in group else group["momentum"]))

    handle = register_optimizer_step_pre_hook(record)
    yield recorded
    handle.remove()


def test_warmup_cosine_lr_matches_hand_computation():
    # 4 warm-up steps of 0.1/4 each, then half a cosine over steps 4..12 from 0.1 down to 0.1 * 0.01.
    schedule = dict(base_lr=0.1, warmup_steps=4, total_steps=13)
    expected = {0: 0.025, 1: 0.05, 2: 0.075, 3: 0.1, 4: 0.1, 8: 0.001 + 0.099 * 0.5, 12: 0.001}
    for step, lr in expected.items():
        assert warmup_cosine_lr(step, **schedule) == pytest.approx(lr, abs=1e-12), step
    assert warmup_cosine_lr(6, **schedule) == pytest.approx(0.001 + 0.099 * 0.5 * (1 + math.cos(math.pi / 4)))
    with pytest.raises(ValueError, match="step"):
        warmup_cosine_lr(13, **schedule)


def test_warmup_momentum_rises_linearly_then_holds():
    values = [warmup_momentum(step, momentum=0.9, warmup_steps=4) for step in range(6)]
    assert values == pytest.approx([0.825, 0.85, 0.875, 0.9, 0.9, 0.9])


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_fit_applies_the_schedule_at_every_step(optimizer, optimizer_steps):
    # 8 images, batch 1: 8 steps per epoch, 16 in all; 0.375 epochs of warm-up = 3 steps; cosine over 3..15.
    fit(
        make_model(),
        ToyDetection(8),
        epochs=2,
        batch_size=1,
        lr=0.1,
        momentum=0.9,
        warmup_epochs=0.375,
        optimizer=optimizer,
        loss_fn=toy_loss,
        progress=False,
    )
    lrs = [lr for lr, _ in optimizer_steps]
    momenta = [momentum for _, momentum in optimizer_steps]
    assert len(lrs) == 16
    assert lrs[0] == pytest.approx(0.1 / 3)
    assert lrs[1] == pytest.approx(0.2 / 3)
    assert lrs[2] == pytest.approx(0.1)
    assert lrs[3] == pytest.approx(0.1)
    assert lrs[9] == pytest.approx(0.0505)  # half way through the cosine
    assert lrs[15] == pytest.approx(0.001)
    assert momenta[:4] == pytest.approx([0.8 + 0.1 / 3, 0.8 + 0.2 / 3, 0.9, 0.9])
    assert set(momenta[3:]) == {0.9}


def test_parameter_groups_leave_batchnorm_and_biases_undecayed():
    model = TinyDetector()
    decayed, undecayed = parameter_groups(model, weight_decay=5e-4)
    assert decayed["weight_decay"] == 5e-4 and undecayed["weight_decay"] == 0.0
    assert {id(p) for p in decayed["params"]} == {id(model.stem[0].weight), id(model.head.weight)}
    batchnorm = model.stem[1]
    assert {id(p) for p in undecayed["params"]} == {
        id(batchnorm.weight),
        id(batchnorm.bias),
        id(model.head.bias),
    }


class RecordingHook:
    """Logs every hook call and checks what the trainer promises at each one."""

    def __init__(self, model: nn.Module, events: list) -> None:
        self.model = model
        self.events = events
        self.weights_at_forward: list[torch.Tensor] = []

    def loss_terms(self, images, targets, outputs):
        assert isinstance(outputs, list) and len(outputs) == 3 and len(targets) == len(images)
        self.events.append("loss_terms")
        self.weights_at_forward = [p.detach().clone() for p in self.model.parameters()]
        return {"head_l2": 1e-3 * self.model.head.weight.pow(2).sum()}

    def after_backward(self, epoch, total_epochs):
        grads_ready = all(p.grad is not None and p.grad.abs().sum() > 0 for p in self.model.parameters())
        not_stepped = all(
            torch.equal(p, before) for p, before in zip(self.model.parameters(), self.weights_at_forward)
        )
        self.events.append(("after_backward", epoch, total_epochs, grads_ready, not_stepped))

    def on_epoch_end(self, epoch, metrics):
        self.events.append(("on_epoch_end", epoch, sorted(metrics)))


def test_hooks_are_called_in_order_with_gradients_before_the_step(optimizer_steps):
    model = make_model()
    events: list = []
    optimizer_steps_seen = len(optimizer_steps)
    hook = RecordingHook(model, events)
    handle = register_optimizer_step_pre_hook(lambda *_: events.append("step"))
    try:
        history = quick_fit(model, hooks=[hook])
    finally:
        handle.remove()
    assert len(optimizer_steps) - optimizer_steps_seen == 8
    step_events = ["loss_terms", ("after_backward", 0, 2, True, True), "step"]
    metric_names = sorted(
        ["epoch", "lr", "seconds", "train/obj", "train/cls", "train/head_l2", "train/total"]
    )
    assert events == (
        step_events * 4
        + [("on_epoch_end", 0, metric_names)]
        + [e if e != step_events[1] else ("after_backward", 1, 2, True, True) for e in step_events] * 4
        + [("on_epoch_end", 1, metric_names)]
    )
    # The hook's term is part of the optimised total.
    for epoch in range(2):
        parts = sum(history[f"train/{name}"][epoch] for name in ("obj", "cls", "head_l2"))
        assert history["train/total"][epoch] == pytest.approx(parts, rel=1e-6)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_training_reduces_the_loss(optimizer):
    history = quick_fit(make_model(), epochs=6, optimizer=optimizer, lr=0.05)
    assert history["train/total"][-1] < 0.7 * history["train/total"][0]


def test_bf16_runs_the_forward_in_bfloat16_and_the_loss_and_weights_in_float32():
    model = make_model()
    seen = []
    model.register_forward_hook(lambda _m, _i, output: seen.append(output[0].dtype))

    def loss_in_float32(outputs, targets):
        assert all(output.dtype == torch.float32 for output in outputs)
        return toy_loss(outputs, targets)

    history = quick_fit(model, epochs=4, bf16=True, loss_fn=loss_in_float32)
    assert torch.bfloat16 in seen
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert history["train/total"][-1] < 0.7 * history["train/total"][0]


def test_channels_last_feeds_channels_last_batches_and_trains_like_the_default_layout():
    def run(channels_last: bool) -> tuple[list[bool], list[float], nn.Module]:
        model = make_model()
        model.stem[3] = nn.Identity()  # dropout draws its mask in memory order: another mask per layout
        layouts, losses = [], []
        model.register_forward_pre_hook(
            lambda _m, inputs: layouts.append(inputs[0].is_contiguous(memory_format=torch.channels_last))
        )

        def recording_loss(outputs, targets):
            terms = toy_loss(outputs, targets)
            losses.append(float(terms["total"]))
            return terms

        quick_fit(model, epochs=6, channels_last=channels_last, loss_fn=recording_loss)
        return layouts, losses, model

    layouts, fast, model = run(True)
    _, default, _ = run(False)
    assert layouts and all(layouts)
    assert fast[0] == pytest.approx(default[0], rel=1e-5)  # the same first step, up to float rounding
    assert fast[-1] < 0.7 * fast[0]
    assert all(p.is_contiguous() for p in model.parameters())  # the weights keep their layout


def test_channels_last_needs_four_dimensional_batches():
    with pytest.raises(ValueError, match="4-D image batches"):
        batch_to(torch.zeros(2, 3, 8), "cpu", channels_last=True)
    assert batch_to(torch.zeros(2, 3, 8), "cpu", channels_last=False).shape == (2, 3, 8)


def test_default_loss_is_yolo_loss():
    history = quick_fit(make_model(), epochs=1, loss_fn=None)
    assert {"train/box", "train/obj", "train/cls", "train/total"} <= history.keys()
    assert all(math.isfinite(history[f"train/{term}"][0]) for term in ("box", "obj", "cls", "total"))


def scripted_eval(map50_values):
    """An eval_fn returning the given mAP@0.5 values in turn (and a non-scalar entry fit must not keep)."""
    values = iter(map50_values)
    return lambda model: {"map50": next(values), "map": 0.0, "per_class": [0.1, 0.2]}


def test_checkpoints_history_and_best(tmp_path):
    history = quick_fit(
        make_model(),
        epochs=3,
        eval_every=2,
        eval_fn=scripted_eval([0.3, 0.2]),
        out_dir=tmp_path,
        ema=True,
    )
    # eval_every=2: evaluated after epoch 1 and after the last epoch; None keeps the lists aligned.
    assert history["epoch"] == [0, 1, 2]
    assert history["metrics/map50"] == [None, 0.3, 0.2]
    assert "metrics/per_class" not in history
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "history.json", "last.pt"]

    last = load_checkpoint(tmp_path / "last.pt")  # weights_only=True inside
    best = load_checkpoint(tmp_path / "best.pt")
    assert last["format"] == CHECKPOINT_FORMAT
    assert (last["epoch"], last["step"], last["world_size"]) == (2, 12, 1)
    assert (best["epoch"], best["best_map50"]) == (1, 0.3)
    assert last["history"] == history
    assert last["ema"]["updates"] == 12
    assert set(last["rng"][0]) == {"torch", "numpy", "python"}
    assert len(last["optimizer"]["param_groups"]) == 2


def test_ema_update_follows_the_ramped_decay():
    model = TinyDetector()
    ema = ModelEMA(model)
    before = model.head.bias.detach().clone()
    with torch.no_grad():
        model.head.bias.add_(1.0)
        model.stem[1].num_batches_tracked.fill_(7)
    ema.update(model)
    decay = EMA_DECAY * (1 - math.exp(-1 / EMA_RAMP_UPDATES))
    torch.testing.assert_close(ema.module.head.bias, decay * before + (1 - decay) * (before + 1.0))
    assert int(ema.module.stem[1].num_batches_tracked) == 7


def test_ema_copy_does_not_fire_the_training_models_hooks():
    model = TinyDetector()
    calls = []
    model.stem.register_forward_hook(lambda module, inputs, output: calls.append(output.shape))
    ema = ModelEMA(model)
    ema.module(torch.zeros(1, 3, 32, 32))
    assert calls == []
    model(torch.zeros(1, 3, 32, 32))
    assert len(calls) == 1


def test_ema_weights_are_left_in_the_model(tmp_path):
    model = make_model()
    quick_fit(model, ema=True, out_dir=tmp_path)
    checkpoint = load_checkpoint(tmp_path / "last.pt")
    for name, value in model.state_dict().items():
        assert torch.equal(value, checkpoint["ema"]["module"][name]), name
    assert not torch.equal(checkpoint["model"]["head.weight"], checkpoint["ema"]["module"]["head.weight"])


def resumable_run(
    out_dir: Path, *, num_workers: int, resume: bool = False, interrupt_at_call: int | None = None
):
    model = make_model()
    hook = GammaSubgradient(model, interrupt_at_call)
    history = fit(
        model,
        ToyDetection(8),
        ToyDetection(4),
        epochs=4,
        batch_size=2,
        lr=0.05,
        hooks=[hook],
        loss_fn=toy_loss,
        ema=True,
        out_dir=out_dir,
        resume=resume,
        num_workers=num_workers,
        eval_fn=lambda m: {"map50": -float(m.head.bias.abs().sum())},
        progress=False,
    )
    return model, hook, history


@pytest.mark.parametrize("num_workers", [0, 1])
def test_interrupted_and_resumed_run_equals_straight_run_bit_for_bit(tmp_path, num_workers):
    # With a loader worker, augmentation draws from the worker's seeds instead of the restored global streams.
    straight = resumable_run(tmp_path / "straight", num_workers=num_workers)
    straight_model, straight_hook, straight_history = straight
    with pytest.raises(Interrupted):
        resumable_run(tmp_path / "resumed", num_workers=num_workers, interrupt_at_call=6)  # epoch 1, 2nd step
    interrupted = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert interrupted["epoch"] == 0
    resumed_model, resumed_hook, resumed_history = resumable_run(
        tmp_path / "resumed", num_workers=num_workers, resume=True
    )

    assert untimed(resumed_history) == untimed(straight_history)
    # The epochs before the interruption keep the times the first run logged in its checkpoint.
    before = interrupted["history"]["seconds"]
    assert resumed_history["seconds"][: len(before)] == before
    assert len(resumed_history["seconds"]) == len(straight_history["seconds"])
    assert all(s > 0 for s in resumed_history["seconds"])
    assert resumed_hook.calls == straight_hook.calls == 16
    for name, value in straight_model.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[name]), name
    straight_last = load_checkpoint(tmp_path / "straight" / "last.pt")
    resumed_last = load_checkpoint(tmp_path / "resumed" / "last.pt")
    for name, value in straight_last["model"].items():
        assert torch.equal(value, resumed_last["model"][name]), name
    for key in ("step", "epoch", "best_map50", "hooks"):
        assert straight_last[key] == resumed_last[key], key
    for param_id, state in straight_last["optimizer"]["state"].items():
        assert torch.equal(
            state["momentum_buffer"], resumed_last["optimizer"]["state"][param_id]["momentum_buffer"]
        )


def test_a_resume_that_asks_for_other_settings_is_refused_naming_them(tmp_path):
    quick_fit(make_model(), epochs=2, lr=0.1, out_dir=tmp_path)
    before = (tmp_path / "last.pt").read_bytes()
    model = make_model(1)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"other settings \(epochs: checkpoint 2, now 3; lr: checkpoint 0.1, now 0.001\)"
    ):
        quick_fit(model, epochs=3, lr=0.001, out_dir=tmp_path, resume=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert (tmp_path / "last.pt").read_bytes() == before
    # the same settings (where and how often things are written may change) resume
    quick_fit(make_model(1), epochs=2, lr=0.1, out_dir=tmp_path, resume=True, eval_every=2, num_workers=0)


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="last.pt"):
        quick_fit(make_model(), out_dir=tmp_path, resume=True)


def _unreadable_checkpoint(kind: str, folder: Path) -> Path:
    """A ``last.pt`` that ``--resume`` may meet: a real checkpoint cut short (a kill or a full disk during a
    copy), an empty or non-PyTorch file, pickled code, or a PyTorch file of another kind."""
    path = folder / "fit" / "last.pt"
    if kind == "truncated":
        quick_fit(make_model(), epochs=1, max_steps_per_epoch=1, out_dir=path.parent)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path
    path.parent.mkdir(parents=True)
    contents = {
        "empty": b"",
        "text": b"epoch 3 of 5\n",
        "pickled": {"format": CHECKPOINT_FORMAT, "hooks": [Interrupted()]},
        "list": [1, 2],
        "pruned model": {"format": "gcp.pruned/1", "meta": "{}"},
    }[kind]
    if isinstance(contents, bytes):
        path.write_bytes(contents)
    else:
        torch.save(contents, path)
    return path


UNREADABLE = {
    "truncated": "cannot read the training checkpoint: truncated or not a PyTorch file",
    "empty": "cannot read the training checkpoint: empty file",
    "text": "cannot read the training checkpoint: truncated or not a PyTorch file",
    "pickled": "not a gcp training checkpoint: it holds pickled Python objects",
    "list": "not a gcp training checkpoint (it holds a list, not a dict)",
    "pruned model": "not a gcp training checkpoint (expected format",
}


@pytest.mark.parametrize("kind", list(UNREADABLE))
def test_an_unreadable_checkpoint_is_one_line_naming_the_file(tmp_path, kind):
    path = _unreadable_checkpoint(kind, tmp_path)
    with pytest.raises(ModelFileError) as error:
        load_checkpoint(path)
    assert str(error.value).startswith(f"{path}: ") and UNREADABLE[kind] in str(error.value)
    assert "\n" not in str(error.value)
    # fit's resume reads it the same way, before training anything
    with pytest.raises(ModelFileError, match="cannot read the training checkpoint|not a gcp training"):
        quick_fit(make_model(), out_dir=path.parent, resume=True)


def test_gcp_resume_on_a_truncated_checkpoint_exits_with_one_line(tmp_path, capsys):
    """The command line shows ModelFileError as it is (exit 2): a fits/<stage>/last.pt cut short by a kill
    ends ``gcp train --resume`` with one line naming it, not a torch traceback."""
    from test_cli import TINY_CONFIG, gcp

    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_CONFIG.replace("DIGITS_ROOT", str(tmp_path / "digits")), encoding="utf-8")
    last = _unreadable_checkpoint("truncated", tmp_path)
    run_dir = tmp_path / "run"
    (run_dir / "fits").mkdir(parents=True)
    last.parent.rename(run_dir / "fits" / "train")
    capsys.readouterr()
    assert gcp(config, run_dir, "train", "--resume") == 2
    errors = capsys.readouterr().err
    lines = [line for line in errors.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in errors, errors
    assert lines[0].startswith(
        f"gcp train: error: {run_dir / 'fits' / 'train' / 'last.pt'}: {UNREADABLE['truncated']}"
    )


class UnpicklableStateOnSecondSave:
    def __init__(self) -> None:
        self.saves = 0

    def state_dict(self):
        self.saves += 1
        return {"saves": self.saves, "lock": threading.Lock() if self.saves == 2 else None}


@pytest.mark.parametrize("failure", ["serialisation", "rename"])
def test_failed_save_keeps_the_previous_checkpoint_and_leaves_no_partial_file(tmp_path, monkeypatch, failure):
    hooks = []
    if failure == "serialisation":
        hooks = [UnpicklableStateOnSecondSave()]
    else:
        real_replace = os.replace
        last_pt_writes = []

        def replace_failing_on_second_last_pt(source, destination):
            if Path(destination).name == "last.pt":
                last_pt_writes.append(destination)
                if len(last_pt_writes) == 2:
                    raise OSError("disk full")
            real_replace(source, destination)

        monkeypatch.setattr(os, "replace", replace_failing_on_second_last_pt)
    with pytest.raises(TypeError if failure == "serialisation" else OSError):
        quick_fit(make_model(), epochs=3, hooks=hooks, out_dir=tmp_path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.json", "last.pt"]
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 0


def test_bad_arguments_are_reported_together():
    with pytest.raises(ValueError) as error:
        fit(
            make_model(),
            ToyDetection(2),
            epochs=0,
            lr=-1.0,
            optimizer="rmsprop",
            loss_fn=toy_loss,
            loss_reduction="avg",
        )
    message = str(error.value)
    assert "epochs" in message and "lr must be positive" in message and "rmsprop" in message
    assert "loss_reduction" in message


def test_settings_are_checked_when_made_with_the_messages_fit_gives():
    with pytest.raises(ValueError) as error:
        FitSettings(epochs=0, lr=-1.0, momentum=1.0, resume=True)
    assert str(error.value) == (
        "fit: epochs must be a positive int, got 0; lr must be positive, got -1.0; momentum must lie in (0, 1),"
        " got 1.0; resume=True needs out_dir (the folder holding last.pt)"
    )
    with pytest.raises(ValueError, match="fit: train_data is empty"):
        fit(make_model(), ToyDetection(0), epochs=1, loss_fn=toy_loss)
    with pytest.raises(TypeError, match="epochs"):
        fit(make_model(), ToyDetection(2), loss_fn=toy_loss)


def test_fit_takes_settings_whole_and_keywords_override_them(tmp_path):
    by_keywords = quick_fit(make_model(), epochs=2, lr=0.1, out_dir=tmp_path / "keywords")
    settings = FitSettings(epochs=5, batch_size=2, lr=0.1, progress=False, out_dir=tmp_path / "whole")
    whole = fit(make_model(), ToyDetection(8), settings=settings, loss_fn=toy_loss, epochs=2)
    assert untimed(whole) == untimed(by_keywords)
    recorded = load_checkpoint(tmp_path / "whole" / "last.pt")["settings"]
    assert recorded == load_checkpoint(tmp_path / "keywords" / "last.pt")["settings"]
    assert set(recorded) == set(RESUME_SETTINGS) and recorded["epochs"] == 2


def test_settings_from_a_config_section_take_every_fit_field_and_nothing_else():
    settings_fields = {item.name for item in dataclasses.fields(FitSettings)}
    fit_fields = {item.name for item in dataclasses.fields(FitConfig)}
    assert fit_fields <= settings_fields  # a FitConfig field fit does not know would be dropped silently
    for section_type in (FitConfig, SparsityConfig, DistillConfig):
        section = section_type()
        made = FitSettings.from_section(section)
        assert made == FitSettings(**{name: getattr(section, name) for name in fit_fields}), section_type
    section = SparsityConfig(epochs=3, lr=0.2, ema=True, schedule="constant")
    settings = FitSettings.from_section(section, seed=7, out_dir="somewhere")
    expected = {name: getattr(section, name) for name in settings_fields if hasattr(section, name)}
    assert expected and all(getattr(settings, name) == value for name, value in expected.items())
    assert settings.seed == 7 and settings.out_dir == "somewhere" and not hasattr(settings, "schedule")
    with pytest.raises(TypeError, match=r"\['lr'\] given both"):
        FitSettings.from_section(section, lr=0.1)
    with pytest.raises(ValueError, match="lr must be positive"):
        FitSettings.from_section(FitConfig(lr=0.0))


def test_loss_without_total_is_an_error():
    with pytest.raises(KeyError, match="total"):
        quick_fit(make_model(), loss_fn=lambda outputs, targets: {"obj": outputs[0].mean()})


def test_non_finite_loss_is_an_error():
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        quick_fit(make_model(), loss_fn=lambda outputs, targets: {"total": outputs[0].sum() * float("nan")})


def test_hook_term_may_not_shadow_a_loss_term():
    class Shadowing:
        def loss_terms(self, images, targets, outputs):
            return {"obj": outputs[0].sum() * 0}

    with pytest.raises(ValueError, match="'obj'"):
        quick_fit(make_model(), hooks=[Shadowing()])


def test_sync_batchnorm_swap_is_undone_with_the_learnt_tensors():
    model = TinyDetector()
    original = model.stem[1]
    restore = _swap_in_sync_batchnorm(model)
    assert isinstance(model.stem[1], nn.SyncBatchNorm)
    assert model.stem[1].weight is original.weight and model.stem[1].running_mean is original.running_mean
    with torch.no_grad():
        model.stem[1].weight.add_(1.0)
    model.load_state_dict({**model.state_dict(), "stem.1.running_mean": torch.full((8,), 3.0)})
    restore()
    assert model.stem[1] is original and type(original) is nn.BatchNorm2d
    assert torch.equal(original.weight, torch.full((8,), 2.0))
    assert torch.equal(original.running_mean, torch.full((8,), 3.0))


def run_torchrun(out: Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(TESTS_DIR / "_ddp_worker.py"), str(out)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]


@pytest.fixture(scope="module")
def torchrun_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One two-process launch of _ddp_worker.py, shared by the distributed tests below."""
    out = tmp_path_factory.mktemp("ddp")
    run_torchrun(out)
    return out


@pytest.mark.timeout(240)
def test_distributed_training_on_two_cpu_processes(torchrun_out: Path) -> None:
    tmp_path = torchrun_out
    runs = {
        (run, rank): torch.load(tmp_path / f"{run}_rank{rank}.pt", weights_only=True)
        for run in ("straight", "resumed")
        for rank in (0, 1)
    }
    reference = runs["straight", 0]
    for key, result in runs.items():
        assert untimed(result["history"]) == untimed(reference["history"]), key
        for name, value in reference["state"].items():
            assert torch.equal(result["state"][name], value), (key, name)
    losses = reference["history"]["train/total"]
    assert losses[-1] < losses[0]
    # Rank 0 alone wrote the checkpoints; they hold both ranks' random states.
    assert len(load_checkpoint(tmp_path / "straight" / "last.pt")["rng"]) == 2


@pytest.mark.timeout(240)
def test_two_processes_on_b_images_each_step_like_one_process_on_2b(torchrun_out: Path) -> None:
    """DDP averages the ranks' gradients; with a loss summed over images (YoloLoss's convention) that average
    is half the gradient of the 2B images, so without scaling by the world size two processes train at lr / 2."""
    model = make_plain_model()
    history = fit(model, FixedDetection(GLOBAL_IMAGES), batch_size=4, **global_batch_options())
    initial = make_plain_model().state_dict()
    for rank in (0, 1):
        distributed = torch.load(torchrun_out / f"global_rank{rank}.pt", weights_only=True)
        for name, value in model.state_dict().items():
            assert not torch.equal(value, initial[name]), name  # the comparison is about a real update
            torch.testing.assert_close(distributed["state"][name], value, rtol=1e-5, atol=1e-6, msg=name)
        # The logged loss is the global batch's too (a sum over all 2B images of the step).
        for name in ("train/total", "train/obj"):
            assert distributed["history"][name] == pytest.approx(history[name], rel=1e-5), name
