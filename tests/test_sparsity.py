import json
import warnings

import pytest
import torch
from torch import nn

from gcp import DynamicSparsity
from gcp.sparse import Eq3Sparsity, LayerRelativeSparsity, SelectiveSparsity, SparseTraining


def two_bn_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6))
    model[1].weight.data = torch.tensor([0.5, -0.2, 0.1, 0.9])
    model[3].weight.data = torch.tensor([0.3, -0.05, 0.7, 0.01, 0.2, 0.6])
    return model


def grads_after_step(model, sparsity, epoch, total):
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    sparsity.step(epoch, total)
    return model[1].weight.grad.clone(), model[3].weight.grad.clone()


def test_before_switch_every_gamma_gets_s_sign_gamma():
    model = two_bn_model()
    sparsity = DynamicSparsity(model, s=1e-3, switch_at=0.5, mechanism="eq3")
    g1, g3 = grads_after_step(model, sparsity, epoch=4, total=10)
    torch.testing.assert_close(g1, torch.tensor([1e-3, -1e-3, 1e-3, 1e-3]))
    torch.testing.assert_close(g3, torch.tensor([1e-3, -1e-3, 1e-3, 1e-3, 1e-3, 1e-3]))


def test_after_switch_the_largest_30_percent_decay_to_one_percent():
    # 10 channels, protect 0.3 → the 3 largest |γ| model-wide (0.9, 0.7, 0.6) get s * 0.01
    model = two_bn_model()
    sparsity = DynamicSparsity(model, s=1e-3, switch_at=0.5, protect=0.3, decay=0.01, mechanism="eq3")
    g1, g3 = grads_after_step(model, sparsity, epoch=5, total=10)
    torch.testing.assert_close(g1, torch.tensor([1e-3, -1e-3, 1e-3, 1e-5]))
    torch.testing.assert_close(g3, torch.tensor([1e-3, -1e-3, 1e-5, 1e-3, 1e-3, 1e-5]))


def test_step_adds_to_existing_gradient_and_reranks_each_epoch():
    model = two_bn_model()
    sparsity = DynamicSparsity(model, s=1e-3, switch_at=0.0, protect=0.1, decay=0.0, mechanism="eq3")
    model[1].weight.grad = torch.ones(4)
    model[3].weight.grad = None
    sparsity.step(0, 10)
    torch.testing.assert_close(model[1].weight.grad, torch.tensor([1.001, 0.999, 1.001, 1.0]))
    model[3].weight.data[0] = 5.0  # now the largest: protection moves to it next epoch
    model[1].weight.grad = None
    model[3].weight.grad = None
    sparsity.step(1, 10)
    assert model[1].weight.grad[3] == pytest.approx(1e-3) and model[3].weight.grad[0] == 0.0


def test_constant_rate_is_switch_at_one():
    model = two_bn_model()
    sparsity = DynamicSparsity(model, s=2e-3, switch_at=1.0, mechanism="eq3")
    g1, _ = grads_after_step(model, sparsity, epoch=9, total=10)
    torch.testing.assert_close(g1, torch.tensor([2e-3, -2e-3, 2e-3, 2e-3]))


def test_stats_and_history(tmp_path):
    model = two_bn_model()
    model[3].weight.data[3] = 0.005
    sparsity = DynamicSparsity(model)
    stats = sparsity.stats()
    assert stats["all"]["channels"] == 10
    assert stats["all"]["sparse_fraction"] == pytest.approx(0.1)  # one of ten |γ| is below 1e-2
    sparsity.on_epoch_end(0, {"loss": 1.5})
    restored = DynamicSparsity(model)
    restored.load_state_dict(sparsity.state_dict())
    assert restored.history == sparsity.history
    path = sparsity.save_history(tmp_path / "h.json")
    data = json.loads(path.read_text())
    assert data["history"][0]["metrics"] == {"loss": 1.5} and len(data["history"][0]["log10_hist"]) == 64


def test_rejects_models_without_batchnorm_and_bad_rates():
    with pytest.raises(ValueError, match="no affine BatchNorm"):
        DynamicSparsity(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="switch_at"):
        DynamicSparsity(two_bn_model(), switch_at=1.5)
    with pytest.raises(ValueError, match="not affine BatchNorm layers"):
        DynamicSparsity(two_bn_model(), layers=["0"])
    with pytest.raises(ValueError, match="unknown sparsity mechanism"):
        DynamicSparsity(two_bn_model(), mechanism="l2")
    with pytest.raises(ValueError, match="lr"):
        DynamicSparsity(two_bn_model(), lr=0.0)


def test_ties_at_the_cutoff_protect_exactly_k_channels():
    model = nn.Sequential(nn.Conv2d(3, 128, 1), nn.BatchNorm2d(128))  # every γ = 1
    sparsity = DynamicSparsity(model, s=1.0, switch_at=0.0, protect=0.3, decay=0.0)
    rates = sparsity.rates(0, 10)["1"]
    assert int((rates == 0.0).sum()) == round(0.3 * 128)


class SignalAndNoise(nn.Module):
    """16 BN channels: 8 computed from the inputs the target depends on, 8 from inputs it ignores."""

    def __init__(self) -> None:
        super().__init__()
        self.signal = nn.Conv2d(4, 8, 3, padding=1)
        self.noise = nn.Conv2d(4, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.out = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        h = torch.cat([self.signal(x[:, :4]), self.noise(x[:, 4:])], 1)
        return self.out(torch.relu(self.bn(h)))


def train_signal_and_noise(
    mechanism, steps=300, s=None, optimizer="adamw", bf16=False, dense_steps=0, **sparsity_options
):
    """``dense_steps`` of plain training first (stage 1 starts from a trained teacher), then ``steps`` with the
    penalty; returns |γ| and the last loss."""
    torch.manual_seed(0)
    target_conv, target_out = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
    model = SignalAndNoise()
    if optimizer == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:  # the paper's recipe (§5.2): SGD with momentum
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    if mechanism == "layer_relative":  # γ's own lr: the other mechanisms refuse it
        sparsity_options["lr"] = 0.01
    sparsity = DynamicSparsity(model, s=s, switch_at=0.5, mechanism=mechanism, **sparsity_options)
    for step in range(dense_steps + steps):
        x = torch.randn(16, 8, 8, 8)
        with torch.no_grad():
            y = target_out(torch.relu(target_conv(x[:, :4])))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        loss = ((out.float() - y) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        if step >= dense_steps:
            sparsity.on_step(step - dense_steps, steps)
            sparsity.after_backward((step - dense_steps) * 10 // steps, 10)
        optimizer.step()
    return model.bn.weight.detach().abs(), loss.item()


@pytest.mark.parametrize(
    "optimizer, bf16, dense_steps, push_floor",
    [
        ("adamw", False, 0, 0.0),
        ("adamw", True, 0, 0.0),
        ("adamw", False, 300, 0.3),
        ("sgd", False, 300, 0.3),
    ],
    ids=["adamw", "adamw-bf16-autocast", "adamw-from-trained", "sgd-from-trained"],
)
def test_layer_relative_sparsity_zeroes_channels_without_signal(optimizer, bf16, dense_steps, push_floor):
    """The project's recipe (AdamW, bf16 autocast) and the paper's (SGD, from a trained model as in stage 1,
    where channels silenced downstream need the push floor): γ is stepped by the hook, so the optimiser and
    the autocast dtype do not change which channels go."""
    gamma, loss = train_signal_and_noise(
        "layer_relative",
        optimizer=optimizer,
        bf16=bf16,
        dense_steps=dense_steps,
        push_floor=push_floor,
    )
    assert (gamma[8:] < 1e-2).all(), gamma  # every channel fed by ignored inputs is driven to (exactly) zero
    assert int((gamma[:8] > 0.1).sum()) >= 6, gamma  # the channels the target needs stay
    assert loss < 0.02


def test_without_the_push_floor_channels_silenced_by_training_survive():
    """Why ``push_floor`` exists: dense training silences the ignored channels through the 1×1 conv after
    them, their γ get no data gradient, and above their layer's contrast point nothing else moves them."""
    gamma, _ = train_signal_and_noise("layer_relative", dense_steps=300, push_floor=0.0)
    assert (gamma[8:] > 0.1).any(), gamma


def test_push_floor_is_checked():
    with pytest.raises(ValueError, match="push_floor"):
        DynamicSparsity(two_bn_model(), push_floor=1.5)


@pytest.mark.parametrize(
    "optimizer, bf16, noise_at_least",
    [("adamw", False, 6), ("adamw", True, 6), ("sgd", False, 0)],
    ids=["adamw", "adamw-bf16", "sgd"],
)
def test_selective_zeroes_the_target_share_and_trains_on(optimizer, bf16, noise_at_least):
    """From a trained model (as stage 1 starts), under either optimiser: exactly the target share is driven to
    zero by switch_at (the optimiser's leftover momentum moves them by < 1e-6 afterwards) and the network
    trains on without them to a low loss. Under AdamW the Taylor scores of 30 steps pick mostly the channels
    fed by ignored inputs (6 of 8); after this toy's SGD training they pick 4–5 of 8, no better than chance
    (the noise channels still reach the output there), so that case checks only the mechanism."""
    gamma, loss = train_signal_and_noise(
        "selective", optimizer=optimizer, bf16=bf16, dense_steps=300, target=0.5, score_share=0.1
    )
    zeroed = gamma < 1e-6
    assert int(zeroed.sum()) == 8, gamma
    assert int(zeroed[8:].sum()) >= noise_at_least, gamma
    assert loss < 0.02


def run_selective(model, sparsity, steps, grads):
    """Drive ``sparsity`` for ``steps`` with fixed per-layer γ gradients (no optimiser)."""
    for step in range(steps):
        for name, grad in grads.items():
            sparsity.norms[name].weight.grad = grad.clone()
        sparsity.on_step(step, steps)
        sparsity.after_backward(0, 1)
    sparsity.on_epoch_end(0)


def two_layers():
    return nn.Sequential(nn.Conv2d(3, 10, 1), nn.BatchNorm2d(10), nn.Conv2d(10, 10, 1), nn.BatchNorm2d(10))


def test_selective_ranks_channels_across_layers_by_taylor_importance():
    """(γ·∂L/∂γ)² is in the loss's units, so a layer whose gradients are 1000× smaller gives up its channels
    first; max_layer_share still leaves every layer most of what it had; the ramp ends at exactly zero."""
    shape = torch.linspace(0.1, 1.0, 10)
    model = two_layers()
    sparsity = DynamicSparsity(model, mechanism="selective", target=0.4, score_share=0.1, switch_at=0.5)
    run_selective(model, sparsity, 20, {"1": shape, "3": shape * 1e-3})
    assert (model[1].weight == 1).all(), model[1].weight
    assert (model[3].weight[:8] == 0).all() and (model[3].weight[8:] == 1).all(), model[3].weight
    model = two_layers()
    capped = DynamicSparsity(
        model, mechanism="selective", target=0.6, max_layer_share=0.5, score_share=0.1, switch_at=0.5
    )
    run_selective(model, capped, 20, {"1": shape, "3": shape * 1e-3})
    assert [int((layer.weight == 0).sum()) for layer in (model[1], model[3])] == [5, 5]


def test_selective_with_costs_chooses_least_importance_per_cost_up_to_a_cost_share():
    """Channels 100× as costly (a high-resolution layer's MACs) at equal importance go first, and the choice
    stops at the first channel that brings the chosen to target of the total cost (10 + 1000; 0.5 → 6 × 100)."""
    shape = torch.linspace(0.1, 1.0, 10)
    model = two_layers()
    costs = {"1": torch.ones(10), "3": torch.full((10,), 100.0)}
    sparsity = DynamicSparsity(
        model, mechanism="selective", target=0.5, score_share=0.1, switch_at=0.5, costs=costs
    )
    run_selective(model, sparsity, 20, {"1": shape, "3": shape})
    assert int((model[1].weight == 0).sum()) == 0 and int((model[3].weight == 0).sum()) == 6
    with pytest.raises(ValueError, match="one per channel"):
        DynamicSparsity(model, mechanism="selective", costs={"1": torch.ones(3), "3": torch.ones(10)})
    with pytest.raises(ValueError, match="no entry"):
        DynamicSparsity(model, mechanism="selective", costs={"1": torch.ones(10)})


def test_channel_costs_are_each_channels_share_of_the_macs():
    """conv(3→8) → BN → conv(8→4) at 8×8: a BN channel takes 1/8 of the first conv's MACs and 1/8 of the
    second's (the second feeds the output and keeps its own outputs, so its BN has no cost)."""
    from gcp.core.prune import channel_costs

    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))
    costs = channel_costs(model, torch.zeros(1, 3, 8, 8))
    first, second = 3 * 8 * 64, 8 * 4 * 64
    torch.testing.assert_close(costs["1"], torch.full((8,), (first / 8 + second / 8) / (first + second)))
    assert model.training and float(costs["3"].sum()) == 0.0


def test_selective_resumes_its_choice_and_ramp():
    model = nn.Sequential(nn.Conv2d(3, 10, 1), nn.BatchNorm2d(10))
    grads = {"1": torch.linspace(0.1, 1.0, 10)}
    sparsity = DynamicSparsity(model, mechanism="selective", target=0.3, score_share=0.2, switch_at=0.6)
    for step in range(5):  # past the choice (step 2), halfway up the ramp
        model[1].weight.grad = grads["1"].clone()
        sparsity.on_step(step, 10)
        sparsity.after_backward(0, 1)
    restored = DynamicSparsity(model, mechanism="selective", target=0.3, score_share=0.2, switch_at=0.6)
    restored.load_state_dict(sparsity.state_dict())
    torch.testing.assert_close(restored._selected["1"], sparsity._selected["1"])
    assert 0 < float(model[1].weight.detach()[0]) < 1
    for step in range(5, 10):
        model[1].weight.grad = grads["1"].clone()
        restored.on_step(step, 10)
        restored.after_backward(0, 1)
    assert (model[1].weight[:3] == 0).all() and (model[1].weight[3:] == 1).all()


def test_selective_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="no rate s"):
        DynamicSparsity(two_bn_model(), mechanism="selective", s=1.0)
    with pytest.raises(ValueError, match="target"):
        DynamicSparsity(two_bn_model(), mechanism="selective", target=1.0)
    with pytest.raises(ValueError, match="before the ramp"):
        DynamicSparsity(two_bn_model(), mechanism="selective", score_share=0.5, switch_at=0.5)
    sparsity = DynamicSparsity(two_bn_model(), mechanism="selective")
    with pytest.raises(RuntimeError, match="on_step"):
        sparsity.after_backward(0, 1)


@pytest.mark.parametrize(
    "mechanism, argument, value",
    [
        ("selective", "protect", 0.5),
        ("selective", "decay", 0.1),
        ("selective", "lr", 0.01),
        ("selective", "follow_schedule", True),
        ("selective", "push_floor", 0.3),
        ("eq3", "lr", 0.01),
        ("eq3", "follow_schedule", True),
        ("eq3", "push_floor", 0.3),
        ("eq3", "target", 0.3),
        ("eq3", "score_share", 0.2),
        ("layer_relative", "max_layer_share", 0.5),
        ("layer_relative", "costs", {"1": torch.ones(4), "3": torch.ones(6)}),
    ],
)
def test_an_argument_of_another_mechanism_is_refused_unless_left_at_its_default(mechanism, argument, value):
    """Each mechanism takes only its own parameters: a value it would silently ignore is refused by name, its
    default (what gcp.app.pipeline passes for the other mechanisms' keys) is not."""
    with pytest.raises(ValueError, match=rf"mechanism='{mechanism}' has no .*{argument}"):
        DynamicSparsity(two_bn_model(), mechanism=mechanism, **{argument: value})
    defaults = {"protect": 0.3, "decay": 0.01, "lr": 0.02, "follow_schedule": False, "push_floor": 0.0}
    defaults.update(target=0.45, score_share=0.1, max_layer_share=0.9, costs=None)
    hook = DynamicSparsity(two_bn_model(), mechanism=mechanism, **{argument: defaults[argument]})
    assert hook.mechanism == mechanism and not hasattr(hook, argument)


def test_each_mechanism_is_its_own_hook_class():
    """DynamicSparsity builds one small class per mechanism, all sharing the stats, history and state of
    SparseTraining; the one-class hook's state_dict keys stay, so its checkpoints resume."""
    hooks = {m: DynamicSparsity(two_bn_model(), mechanism=m) for m in ("layer_relative", "eq3", "selective")}
    assert isinstance(hooks["layer_relative"], LayerRelativeSparsity)
    assert isinstance(hooks["eq3"], Eq3Sparsity) and isinstance(hooks["selective"], SelectiveSparsity)
    keys = ["history", "momentum", "mean_square", "updates", "scores", "scored", "selected", "start"]
    for hook in hooks.values():
        assert isinstance(hook, SparseTraining) and list(hook.state_dict()) == keys
    assert hooks["eq3"].s == 7.5e-4 and hooks["layer_relative"].s == 1.0 and hooks["selective"].s == 0.0


def test_eq3_under_adamw_leaves_gamma_dense():
    """The measured failure that motivated layer_relative: Adam normalises the added s·sign(γ) away."""
    gamma, _ = train_signal_and_noise("eq3", s=7.5e-4)
    assert (gamma > 1e-2).float().mean() > 0.9, gamma


def test_layer_relative_takes_gamma_out_of_the_optimiser_and_resumes_exactly():
    model = two_bn_model()
    sparsity = DynamicSparsity(model, s=0.5)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    sparsity.step(0, 10)
    assert model[1].weight.grad is None and model[3].weight.grad is None
    assert model[0].weight.grad is not None  # only γ is taken over
    copy = two_bn_model()
    copy.load_state_dict(model.state_dict())
    restored = DynamicSparsity(copy, s=0.5)
    restored.load_state_dict(sparsity.state_dict())
    for m, hook in ((model, sparsity), (copy, restored)):
        for p in m.parameters():
            p.grad = torch.full_like(p, 0.3)
        hook.step(1, 10)
    torch.testing.assert_close(model[3].weight, copy[3].weight)


def test_follow_schedule_scales_gammas_own_step_by_the_trainers_lr():
    steps = {}
    for follow in (False, True):
        model = two_bn_model()
        sparsity = DynamicSparsity(model, s=1.0, switch_at=1.0, follow_schedule=follow)
        before = model[1].weight.detach().clone()  # no γ of this layer reaches 0 (the clip is not linear)
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.1)
        sparsity.on_lr(0.25)
        sparsity.step(0, 2)
        steps[follow] = model[1].weight.detach() - before
    assert steps[False].abs().sum() > 0
    torch.testing.assert_close(steps[True], 0.25 * steps[False])


def test_fit_tells_hooks_each_steps_share_of_the_base_lr():
    from _train_toys import ToyDetection, make_model, toy_loss

    from gcp.detection.train import fit

    class Recorder:
        scales: list[float] = []

        def on_lr(self, scale: float) -> None:
            self.scales.append(scale)

    recorder = Recorder()
    fit(
        make_model(),
        ToyDetection(8),
        epochs=2,
        batch_size=2,
        lr=0.1,
        hooks=[recorder],
        loss_fn=toy_loss,
        warmup_epochs=0.5,
        ema=False,
        progress=False,
    )
    scales = recorder.scales
    assert len(scales) == 8 and max(scales) == pytest.approx(1.0, abs=0.2) and scales[-1] < 0.3
    assert scales[0] < scales[2]  # warm-up rises, the cosine falls


@pytest.mark.parametrize("mechanism", ["layer_relative", "eq3", "selective"])
def test_frozen_gammas_are_left_alone(mechanism):
    """A γ that does not train (``requires_grad=False``, e.g. Ultralytics' ``freeze=``) keeps its value and
    gets no gradient: it is not penalised, scored or chosen, and selective's target is a share of the rest."""
    model = two_layers()
    model[1].weight.data = torch.linspace(0.1, 1.0, 10)  # spread out: layer_relative pushes the small ones
    frozen = model[1].weight.detach().clone()
    options = (
        {"target": 0.3, "score_share": 0.1, "switch_at": 0.5}
        if mechanism == "selective"
        else {"s": 1.0, "switch_at": 1.0}
    )
    sparsity = DynamicSparsity(model, mechanism=mechanism, **options)
    model[1].weight.requires_grad_(False)  # frozen after the hook was built, as trainers do
    if mechanism == "selective":
        run_selective(model, sparsity, 20, {"3": torch.linspace(0.1, 1.0, 10)})  # autograd gives "1" no grad
        assert int((model[3].weight == 0).sum()) == 3
    else:
        for step in range(3):
            model[3].weight.grad = torch.full((10,), 0.1)
            sparsity.step(step, 3)
        if mechanism == "eq3":
            torch.testing.assert_close(model[3].weight.grad, torch.full((10,), 1.1))
        else:
            assert (model[3].weight < 1).all()
    assert torch.equal(model[1].weight, frozen) and model[1].weight.grad is None


def sparse_fit(ema):
    """A short gcp.detection.train.fit run whose hook drives every γ of the toy detector to exactly 0."""
    from _train_toys import ToyDetection, make_model, toy_loss

    from gcp.detection.train import fit

    model = make_model()
    sparsity = DynamicSparsity(model, s=10.0, lr=0.5, push_floor=1.0, switch_at=1.0)
    fit(
        model,
        ToyDetection(8),
        epochs=1,
        batch_size=2,
        hooks=[sparsity],
        loss_fn=toy_loss,
        ema=ema,
        progress=False,
    )
    return model, sparsity


def test_the_saved_history_describes_the_weights_training_returned(tmp_path):
    """``final`` is measured on the weights the model ends with; an EMA's average of the trained weights has
    none of the zeros the epochs' entries recorded, which a warning says (and none without an EMA)."""
    model, sparsity = sparse_fit(ema=True)
    assert sparsity.history[-1]["groups"]["all"]["zero_fraction"] == 1.0  # the trained weights
    with pytest.warns(UserWarning, match=r"0\.0% exact zeros where sparse training reached 100\.0%.*EMA"):
        path = sparsity.save_history(tmp_path / "ema.json")
    assert json.loads(path.read_text())["final"]["all"]["zero_fraction"] == 0.0
    assert (model.stem[1].weight != 0).all()  # what fit returned: the EMA

    model, sparsity = sparse_fit(ema=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = sparsity.save_history(tmp_path / "plain.json")
    saved = json.loads(path.read_text())
    assert saved["final"] == saved["history"][-1]["groups"] and (model.stem[1].weight == 0).all()
