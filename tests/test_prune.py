import copy
import warnings

import pytest
import torch
import torch_pruning as tp
from _core_toys import C2fToy, MobileToy, ToyDetector, cbl, randomise_bn
from torch import nn

import gcp
from gcp.core.graph import build_graph
from gcp.core.importance import BNGammaImportance, L1FilterImportance, ThiNetImportance, conv_columns
from gcp.core.report import count_macs_params
from grouping import prediction_layers

X = torch.randn(1, 3, 64, 64)
CALIB = [torch.randn(2, 3, 64, 64)]


def fresh(seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return randomise_bn(ToyDetector(**kw), seed)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["gcp", "slim", "l1", "random", "thinet"])
def test_every_method_prunes_and_keeps_output_shapes(method):
    model = fresh()
    shapes = [o.shape for o in model(X)]
    params = sum(p.numel() for p in model.parameters())
    result = gcp.prune_detector(model, X, ratio=0.3, method=method, calib_data=CALIB)
    assert result.model is model
    assert [o.shape for o in model(X)] == shapes
    model.train()
    assert [o.shape[1:] for o in model(torch.randn(2, 3, 64, 64))] == [s[1:] for s in shapes]
    assert sum(p.numel() for p in model.parameters()) < params
    assert result.report["params"]["after"] < result.report["params"]["before"]


@pytest.mark.parametrize("budget", ["channels", "params", "macs"])
@pytest.mark.parametrize("method", ["gcp", "slim"])
def test_budget_is_met_within_half_a_point(method, budget):
    model = fresh()
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    before = {n: dict(model.named_modules())[n].num_features for n in norms}
    report = gcp.prune_detector(model, X, ratio=0.35, method=method, budget=budget).report
    if budget == "channels":
        # counted as the paper sorts them: one entry per BN γ, over the layers that can be pruned at all
        after = {r["name"]: r["after"] for r in report["layers"]}
        removed = sum(before[n] - after[n] for n in norms)
        prunable = sum(before[n] for n in norms) - 0  # split-locked BNs count as kept, so measure achieved
        assert abs(report["achieved"] - 0.35) <= 0.005
        assert removed / prunable <= report["achieved"] + 1e-9
    else:
        assert abs(report[budget]["pruned"] - 0.35) <= 0.005, report[budget]


def test_report_macs_after_match_a_measured_count():
    model = fresh()
    report = gcp.prune_detector(model, X, ratio=0.4, budget="macs").report
    macs, params = count_macs_params(model, X)
    assert report["macs"]["after"] == pytest.approx(macs, rel=1e-6)
    assert report["params"]["after"] == params == sum(p.numel() for p in model.parameters())
    assert report["size_mb"]["after"] == pytest.approx(params * 4 / 2**20)


def test_prediction_layers_keep_their_outputs():
    model = fresh()
    assert sorted(prediction_layers(model, X)) == ["head16.1", "head8.1"]
    gcp.prune_detector(model, X, ratio=0.5, method="l1")
    assert model.head8[1].out_channels == 12 and model.head16[1].out_channels == 12


def test_ignored_layers_are_not_pruned():
    model = fresh()
    gcp.prune_detector(model, X, ratio=0.5, method="l1", ignored_layers=["stem.0", model.spp.cv2[0]])
    assert model.stem[0].out_channels == 16 and model.spp.cv2[0].out_channels == 128


def test_min_keep_and_round_to_hold_for_every_layer():
    model = fresh()
    gcp.prune_detector(model, X, ratio=0.7, method="slim", round_to=8, min_keep=8)
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and not name.endswith(("head8.1", "head16.1")):
            assert m.out_channels >= 8 and m.out_channels % 8 == 0, (name, m.out_channels)


class VoteNet(nn.Module):
    """Three BN branches summed: their channels are coupled by the add (paper §4.2.3, Fig. 5)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (
            nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4)) for _ in "abc"
        )
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return [self.head(torch.relu(self.a(x) + self.b(x) + self.c(x)))]


def vote_net():
    model = VoteNet().eval()
    gammas = {"a": [0.01, 0.1, 0.9, 0.1], "b": [0.01, 0.9, 0.9, 0.9], "c": [4.0, 0.9, 0.9, 0.9]}
    for branch, values in gammas.items():
        getattr(model, branch)[1].weight.data = torch.tensor(values)
    return model


@pytest.mark.parametrize(("coupling", "kept"), [("vote", 3), ("mean", 4), ("max", 4)])
def test_public_mask_vote(coupling, kept):
    # With one threshold of 0.5 (4 of the 12 γ are below it): channel 0 is voted out by a and b (Z=2 >= 3/2)
    # although c holds it at γ=4; channel 1 and 3 have one remove vote only (Z=1 < 3/2), channel 2 none.
    # "mean" keeps channel 0 (mean of |γ|/t = 2.68 >= 1), "max" keeps everything unless all agree.
    model = vote_net()
    groups = {"all": ["a.1", "b.1", "c.1"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = gcp.prune_detector(
            model, X, ratio={"all": 4 / 12}, allocator="explicit", groups=groups, coupling=coupling
        )
    assert result.report["groups"][0]["threshold"] == pytest.approx(0.5, rel=1e-4)  # |γ| + tie-break δ
    assert model.a[1].num_features == kept
    if coupling == "vote":
        assert model.c[1].weight.tolist() == pytest.approx([0.9, 0.9, 0.9])  # channel 0 (γ=4 in c) went
        assert result.report["achieved"] == pytest.approx(3 / 12)


def test_bn_gamma_importance_vote_on_a_dependency_group():
    model = vote_net()
    graph = build_graph(model, X)
    group = graph.get_pruning_group(model.a[0], tp.prune_conv_out_channels, idxs=list(range(4)))
    thresholds = {model.a[1]: 0.5, model.b[1]: 0.5, model.c[1]: 0.5}
    keep_share = BNGammaImportance(thresholds, reduction="vote")(group)
    assert keep_share.tolist() == pytest.approx([1 / 3, 2 / 3, 1.0, 2 / 3])
    plain = BNGammaImportance()(group)
    assert plain.tolist() == pytest.approx([(0.01 + 0.01 + 4) / 3, 1.9 / 3, 0.9, 1.9 / 3])


class Chain(nn.Module):
    def __init__(self, k2: int):
        super().__init__()
        self.first = cbl(3, 8, 3)
        self.second = cbl(8, 8, k2)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return [self.head(self.second(self.first(x)))]


@pytest.mark.parametrize("k2", [1, 3])
def test_removed_channels_offset_is_compensated(k2):
    torch.manual_seed(0)
    model = randomise_bn(Chain(k2))
    bn = model.first[1]
    bn.weight.data[[1, 4, 6]] = 0.0  # these channels now carry the constant LeakyReLU(β)
    bn.bias.data[[1, 4, 6]] = torch.tensor([0.7, -0.4, 1.3])
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        masked = model(x)[0]
    groups = {"first": ["first.1"], "second": ["second.1"]}
    gcp.prune_detector(
        model, x, ratio={"first": 3 / 8, "second": 0.0}, allocator="explicit", groups=groups, round_to=1
    )
    assert model.first[0].out_channels == 5
    with torch.no_grad():
        pruned = model(x)[0]
    if k2 == 1:
        torch.testing.assert_close(pruned, masked, atol=1e-4, rtol=0)
    else:  # only the 1-pixel border, where zero padding met the constant, may differ
        torch.testing.assert_close(pruned[..., 1:-1, 1:-1], masked[..., 1:-1, 1:-1], atol=1e-4, rtol=0)
        assert not torch.allclose(pruned, masked, atol=1e-4)


def test_split_blocks_are_pruned_safely_and_graph_indices_are_right():
    model = fresh()
    graph = build_graph(model, X)
    res_b = model.stage2[1].res.b[0]
    group = graph.get_pruning_group(res_b, tp.prune_conv_out_channels, idxs=[0, 5])
    by_layer = {(dep.layer, dep.pruning_fn): list(idxs) for dep, idxs in group}
    # the residual half is the SECOND chunk: channels 32.. of cv1's output and of cv2's concatenated input
    assert by_layer[(model.stage2[1].cv1[0], tp.prune_conv_out_channels)] == [32, 37]
    assert by_layer[(model.stage2[1].cv2[0], tp.prune_conv_in_channels)] == [32, 37]
    gcp.prune_detector(model, X, ratio=0.4, method="l1")
    assert model.stage2[1].cv1[0].out_channels == 64  # chunk(2) re-splits at run time: kept whole
    model(X)


def test_bn_gamma_importance_works_inside_torch_pruning_pruner():
    model = fresh(split=False)
    heads = [model.head8[1], model.head16[1]]
    pruner = tp.pruner.MetaPruner(
        model, X, importance=BNGammaImportance(), pruning_ratio=0.3, global_pruning=True, ignored_layers=heads
    )
    before = sum(p.numel() for p in model.parameters())
    pruner.step()
    assert sum(p.numel() for p in model.parameters()) < before
    assert [o.shape[1] for o in model(X)] == [12, 12]


def test_allocation_is_expressible_as_pruning_ratio_dict():
    model = fresh(split=False)
    heads = [model.head8[1], model.head16[1]]
    result = gcp.prune_detector(copy.deepcopy(model), X, ratio=0.3, method="gcp")
    scopes = gcp.pruning_ratio_dict(model, X, result.report["groups"])
    assert scopes and all(isinstance(k, tuple) and 0 <= v < 1 for k, v in scopes.items())
    pruner = tp.pruner.MetaPruner(
        model, X, importance=BNGammaImportance(), pruning_ratio_dict=scopes, ignored_layers=heads
    )
    pruner.step()
    assert [o.shape[1] for o in model(X)] == [12, 12]


def test_save_and_load_round_trip(tmp_path):
    model = fresh()
    result = gcp.prune_detector(model, X, ratio=0.4)
    path = result.save(tmp_path / "pruned.pt")
    payload = torch.load(path, weights_only=True)  # plain tensors and strings only
    assert payload["format"] == "gcp.pruned/1"
    restored = gcp.load_pruned(path, base=ToyDetector())
    with torch.no_grad():
        for a, b in zip(model.eval()(X), restored(X)):
            assert torch.equal(a, b)


def test_a_refused_load_leaves_the_given_base_model_unpruned(tmp_path):
    path = gcp.prune_detector(ToyDetector(width=32), X, ratio=0.6, round_to=1).save(tmp_path / "wide.pt")
    base = ToyDetector(width=20)
    before = {n: m.out_channels for n, m in base.named_modules() if isinstance(m, nn.Conv2d)}
    weights = state(base)
    with pytest.raises(ValueError, match="do not match|does not fit|does not exist"):
        gcp.load_pruned(path, base=base)
    assert {n: m.out_channels for n, m in base.named_modules() if isinstance(m, nn.Conv2d)} == before
    assert same_state(state(base), weights)


def test_load_rejects_other_architecture_truncated_and_tampered(tmp_path):
    result = gcp.prune_detector(fresh(), X, ratio=0.4)
    path = result.save(tmp_path / "pruned.pt")
    with pytest.raises(ValueError, match="do not match|does not fit|does not exist"):
        gcp.load_pruned(path, base=ToyDetector(width=8))
    data = path.read_bytes()
    (tmp_path / "short.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read the model file: truncated or not a PyTorch file"):
        gcp.load_pruned(tmp_path / "short.pt", base=ToyDetector())
    payload = torch.load(path, weights_only=True)
    key = next(k for k in payload["state_dict"] if k.endswith("weight"))
    payload["state_dict"][key] = payload["state_dict"][key] + 1
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(ValueError, match="corruption check failed"):
        gcp.load_pruned(tmp_path / "edited.pt", base=ToyDetector())
    with pytest.raises(ValueError, match="not built by gcp.detection.models"):
        gcp.load_pruned(path)


def _no_bn_model():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))


BAD_INPUTS = [
    (dict(ratio=0.0), "ratio must be a number in"),
    (dict(ratio=1.0), "ratio must be a number in"),
    (dict(ratio=float("nan")), "ratio must be a number in"),
    (dict(ratio=0.3, method="magic"), "unknown method"),
    (dict(ratio=0.3, groups={"a": ["nope*"]}), "matches no BatchNorm"),
    (dict(ratio={"backbone_s4": 0.1}, allocator="explicit"), "missing groups"),
    (dict(ratio={"bogus": 0.1}, allocator="explicit"), r"unknown groups \['bogus'\]; valid groups"),
    (dict(ratio=0.3, method="thinet"), "needs calib_data"),
    (dict(ratio=0.3, round_to=256), "round_to=256 is larger than every prunable layer"),
    (dict(ratio=0.3, max_group_ratio=1.5), r"max_group_ratio must be in \(0, 1\]"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_INPUTS)
def test_bad_input_raises_and_leaves_model_untouched(kwargs, message):
    model = fresh()
    model.train()
    before = state(model)
    with pytest.raises(ValueError, match=message):
        gcp.prune_detector(model, X, **kwargs)
    assert same_state(before, state(model)) and model.training


def test_no_batchnorm_suggests_other_methods():
    model = _no_bn_model()
    before = state(model)
    for method in ("gcp", "slim"):
        with pytest.raises(ValueError, match="method='l1' or method='thinet'"):
            gcp.prune_detector(model, X, ratio=0.3, method=method)
    assert same_state(before, state(model))


def test_non_finite_gamma_and_bad_inputs_shape():
    model = fresh()
    model.stage1[0][1].weight.data[3] = float("nan")
    before = state(model)
    with pytest.raises(ValueError, match=r"non-finite BatchNorm γ in layers \['stage1.0.1'\]"):
        gcp.prune_detector(model, X, ratio=0.3)
    model = fresh()
    before = state(model)
    with pytest.raises(ValueError, match="example_inputs do not run the model: RuntimeError"):
        gcp.prune_detector(model, torch.randn(1, 5, 64, 64), ratio=0.3)
    assert same_state(before, state(model))


def test_groups_from_a_yaml_file(tmp_path):
    spec = tmp_path / "groups.yaml"
    spec.write_text(
        "early:\n  - 'stem.*'\n  - 'stage1.*'\nrest:\n  - 'stage[23].*'\n  - 'spp.*'\n  - 'lateral.*'\n"
        "  - 'fuse.*'\n  - 'head*'\n  - 'down.*'\n"
    )
    model = fresh()
    result = gcp.prune_detector(
        model, X, ratio={"early": 0.1, "rest": 0.5}, allocator="explicit", groups=str(spec)
    )
    assert [g["name"] for g in result.report["groups"]] == ["early", "rest"]
    assert result.report["groups"][1]["ratio"] > result.report["groups"][0]["ratio"]


@pytest.mark.parametrize("method", ["gcp", "slim"])
def test_tied_gamma_of_a_fresh_model_still_meet_the_ratio_deterministically(method):
    """Every γ = 1 in a freshly built model: the filter-norm tie-break decides, the same way every time."""
    from gcp.detection.models import yolov4

    reports = []
    for _ in range(2):
        torch.manual_seed(0)
        model = yolov4(num_classes=3, width=0.125, depth=0.33)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # gcp: "no valley" for every group, by design here
            result = gcp.prune_detector(
                model, torch.randn(1, 3, 128, 128), ratio=0.3, method=method, round_to=1
            )
        reports.append(result)
    assert reports[0].report["achieved"] == pytest.approx(0.3, abs=0.01)
    assert reports[0].history == reports[1].history


def test_groups_that_leave_layers_out_are_refused_by_name():
    from gcp.detection.models import yolov4

    model = yolov4(num_classes=3, width=0.125, depth=0.33)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"in no group, e\.g\. \['head"):
        gcp.prune_detector(model, torch.randn(1, 3, 128, 128), ratio=0.3, groups={"backbone": ["backbone.*"]})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("budget", ["params", "macs"])
def test_depthwise_convs_count_in_the_params_and_macs_budgets(budget):
    """Issue 15 item 4: the depthwise 3×3 of each block shrinks with its channels and the budget must see it."""
    torch.manual_seed(0)
    model = randomise_bn(MobileToy())
    x = torch.randn(1, 3, 32, 32)
    before = dict(zip(("macs", "params"), count_macs_params(model, x)))
    report = gcp.prune_detector(model, x, ratio=0.3, method="slim", budget=budget, round_to=1).report
    after = dict(zip(("macs", "params"), count_macs_params(model, x)))
    for kind in ("macs", "params"):
        assert report[kind]["pruned"] == pytest.approx(1 - after[kind] / before[kind], abs=1e-9), kind
    assert report["achieved"] == pytest.approx(report[budget]["pruned"], abs=1e-9)
    assert abs(report["achieved"] - 0.3) <= 0.01
    assert model.blocks[0].dw[0].groups == model.blocks[0].dw[0].out_channels < 64


class TransposedChain(nn.Module):
    """A BN layer whose channels a ConvTranspose2d (upsampling, as in segmentation protos) reads."""

    def __init__(self, out: int, kernel: int, stride: int, padding: int):
        super().__init__()
        self.first = cbl(3, 8, 3)
        self.up = nn.ConvTranspose2d(8, out, kernel, stride, padding)
        self.head = nn.Conv2d(out, 4, 1)

    def forward(self, x):
        return [self.head(self.up(self.first(x)))]


def transposed_chain(out, kernel, stride, padding, equal_taps=False):
    torch.manual_seed(0)
    model = randomise_bn(TransposedChain(out, kernel, stride, padding))
    bn = model.first[1]
    bn.weight.data[[1, 4, 6]] = 0.0  # these channels now carry the constant LeakyReLU(β)
    bn.bias.data[[1, 4, 6]] = torch.tensor([0.7, -0.4, 1.3])
    if equal_taps:  # every output pixel then receives the same sum of taps from the removed channels
        w = model.up.weight.data
        w[[1, 4, 6]] = w[[1, 4, 6]].mean((2, 3), keepdim=True).expand_as(w[[1, 4, 6]]).clone()
    return model


def prune_first_bn(model, x):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gcp.prune_detector(
            model,
            x,
            ratio={"first": 3 / 8},
            allocator="explicit",
            groups={"first": ["first.1"]},
            ignored_layers=["up"],
            round_to=1,
        )
    assert model.first[0].out_channels == 5 and model.up.in_channels == 5
    return [str(w.message) for w in caught]


@pytest.mark.parametrize("out", [8, 5])
def test_transposed_conv_consumer_with_stride_one_is_compensated_exactly(out):
    """Issue 15 item 5: ConvTranspose2d weights are (in, out, k, k); stride 1 sends every tap to every pixel."""
    model = transposed_chain(out, kernel=3, stride=1, padding=1)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        masked = model(x)[0]
    assert not any("transposed conv" in m for m in prune_first_bn(model, x))
    with torch.no_grad():
        pruned = model(x)[0]
    # only the 1-pixel border, which fewer taps reach, may differ
    torch.testing.assert_close(pruned[..., 1:-1, 1:-1], masked[..., 1:-1, 1:-1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("out", [8, 5])
def test_transposed_conv_with_stride_equal_to_kernel_folds_the_mean_of_its_taps(out):
    """Stride = kernel = 2: output pixel (2i+a, 2j+b) receives tap (a, b) alone, so a constant input comes out as
    the tiled kernel. Equal taps make that a constant (exact); otherwise its spatial mean is kept and a warning
    says the rest is lost."""
    x = torch.randn(2, 3, 16, 16)
    model = transposed_chain(out, kernel=2, stride=2, padding=0, equal_taps=True)
    with torch.no_grad():
        masked = model(x)[0]
    assert not any("transposed conv" in m for m in prune_first_bn(model, x))
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], masked, atol=1e-5, rtol=0)

    model = transposed_chain(out, kernel=2, stride=2, padding=0)
    with torch.no_grad():
        masked = model(x)[0]
    assert any("transposed conv with stride > 1" in m for m in prune_first_bn(model, x))
    with torch.no_grad():
        shift = model(x)[0] - masked
    assert shift.abs().max() > 1e-3  # a periodic pattern remains ...
    torch.testing.assert_close(shift.mean((2, 3)), torch.zeros(2, 4), atol=1e-5, rtol=0)  # ... around zero


@pytest.mark.parametrize(
    "layer",
    [
        nn.ConvTranspose2d(6, 5, 2, 2),
        nn.ConvTranspose2d(6, 5, 4, 2, 1),
        nn.ConvTranspose2d(6, 5, 3, 2, 1, output_padding=1, dilation=2),
        nn.Conv2d(6, 5, 3, 2, 1),
    ],
)
def test_conv_columns_rebuild_the_layer_output(layer):
    x = torch.randn(2, 6, 7, 9)
    with torch.no_grad():
        expected = layer(x) - layer.bias.view(1, -1, 1, 1)
        cols, weight = conv_columns(layer, x)
        rebuilt = torch.einsum("bckl,ock->bol", cols, weight).view_as(expected)
    torch.testing.assert_close(rebuilt, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("out", [8, 5])
def test_thinet_ranks_channels_a_transposed_conv_reads(out):
    model = transposed_chain(out, kernel=2, stride=2, padding=0)
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gcp.prune_detector(
            model, x, ratio=0.3, method="thinet", calib_data=[x], ignored_layers=["up"], round_to=1
        )
    assert model.up.in_channels < 8 and model.up.out_channels == out
    model(x)


class CopiesNet(nn.Module):
    """SPP-like: the consumer reads every channel three times (identity pools), channel 0's copies cancel."""

    def __init__(self):
        super().__init__()
        self.first = cbl(3, 4, 3)
        self.pools = nn.ModuleList(nn.MaxPool2d(1, 1) for _ in range(2))
        self.head = nn.Conv2d(12, 2, 1, bias=False)

    def forward(self, x):
        y = self.first(x)
        return [self.head(torch.cat([y] + [p(y) for p in self.pools], 1))]


def test_thinet_sums_the_copies_of_a_root_channel():
    """Issue 15 item 6: removing channel 0 removes all three copies, whose contributions add up to zero."""
    torch.manual_seed(0)
    model = randomise_bn(CopiesNet())
    w = model.head.weight.data
    w.mul_(0.1)
    w[:, [0, 4, 8]] = torch.tensor([[1.0, 1.0, -2.0], [-3.0, -3.0, 6.0]]).view(2, 3, 1, 1)
    x = torch.randn(2, 3, 16, 16)
    group = build_graph(model, x).get_pruning_group(
        model.first[0], tp.prune_conv_out_channels, list(range(4))
    )
    head_rows = [list(idxs) for dep, idxs in group if dep.layer is model.head]
    assert sorted(head_rows[0]) == list(range(12))  # three local channels per root channel
    scorer = ThiNetImportance()
    scorer.collect(model, [x], [model.head], lambda m, b: m(b))
    assert int(torch.argmin(scorer(group))) == 0  # removed first: it costs nothing


class BoxHeadNet(nn.Module):
    """A BN backbone and a Faster R-CNN-like box head: two fully connected layers without BatchNorm."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(cbl(3, 32, 3, 2), cbl(32, 64, 3, 2), cbl(64, 64, 3))
        self.fc6 = nn.Linear(64 * 4 * 4, 128)
        self.fc7 = nn.Linear(128, 128)
        self.cls = nn.Linear(128, 5)

    def forward(self, x):
        h = torch.relu(self.fc6(self.body(x).flatten(1)))
        return [self.cls(torch.relu(self.fc7(h)))]


@pytest.mark.parametrize("method", ["gcp", "slim"])
def test_gamma_methods_rank_layers_without_batchnorm_by_filter_norm(method):
    """Issue 15 item 13: γ decides the BN layers, filter L1 norm the box head; the params budget is met."""
    x = torch.randn(1, 3, 16, 16)
    torch.manual_seed(0)
    model = randomise_bn(BoxHeadNet())
    with pytest.warns(
        UserWarning, match=r"2 layers without BatchNorm \(7\d\.\d% of params.*ranked by filter L1"
    ):
        report = gcp.prune_detector(model, x, ratio=0.3, method=method, budget="params", round_to=1).report
    # one BN channel of body.2 is 16 inputs of fc6 (1 % of the params): the budget moves in coarse steps here
    assert report["params"]["pruned"] == pytest.approx(0.3, abs=0.01)
    assert report["bn_free"]["layers"] == ["fc6", "fc7"] and report["bn_free"]["handling"] == "l1"
    assert 0.7 < report["bn_free"]["params_share"] < 0.8
    assert model.fc6.out_features < 128 and model.fc7.out_features < 128
    torch.manual_seed(0)
    reference = randomise_bn(BoxHeadNet())
    group = build_graph(reference, x).get_pruning_group(
        reference.fc7, tp.prune_linear_out_channels, list(range(128))
    )
    strongest = torch.argsort(L1FilterImportance()(group), descending=True)[: model.fc7.out_features]
    assert torch.equal(model.cls.weight, reference.cls.weight[:, strongest.sort().values])


def test_bn_free_keep_leaves_those_layers_whole_and_says_so():
    x = torch.randn(1, 3, 16, 16)
    torch.manual_seed(0)
    model = randomise_bn(BoxHeadNet())
    with pytest.warns(UserWarning, match=r"were left whole: no γ method can prune them"):
        report = gcp.prune_detector(model, x, ratio=0.3, method="slim", bn_free="keep").report
    assert model.fc6.out_features == 128 and model.fc7.out_features == 128
    assert report["bn_free"] == {
        "handling": "keep",
        "layers": ["fc6", "fc7"],
        "params_share": pytest.approx((64 * 16 * 128 + 128 + 128 * 128 + 128) / report["params"]["before"]),
    }


def test_models_with_batchnorm_everywhere_report_no_bn_free_layers():
    report = gcp.prune_detector(fresh(), X, ratio=0.3, method="slim").report
    assert report["bn_free"] == {"handling": "l1", "layers": [], "params_share": 0.0}


@pytest.mark.parametrize("channels", [16, 15])
def test_a_concat_that_reads_both_chunks_gets_each_chunk(channels):
    """Issue 15 item 14: C2f's concat reads chunk a and chunk b; each of its listings maps its own chunk (15
    channels: chunks of 8 and 7), and torch-pruning's per-call remapping (every get_pruning_group) must not
    undo the repair."""
    torch.manual_seed(0)
    model = randomise_bn(C2fToy(channels))
    a, b = channels - channels // 2, channels // 2
    graph = build_graph(model, torch.randn(1, 3, 16, 16))
    for _ in range(2):
        group = graph.get_pruning_group(model.cv1[0], tp.prune_conv_out_channels, idxs=[1, a + 1])
        by_layer = {(dep.layer, dep.handler): sorted(idxs) for dep, idxs in group}
        assert by_layer[(model.cv2[0], tp.prune_conv_in_channels)] == [1, a + 1, channels + 1]
        assert by_layer[(model.m.a[0], tp.prune_conv_in_channels)] == [1]
        assert by_layer[(model.m.b[1], tp.prune_batchnorm_out_channels)] == [1]
    cat = next(n for n in graph.module2node.values() if n.type == tp.ops.OPTYPE.CONCAT)
    assert cat.module.concat_sizes == [a, b, b]


def test_every_consumer_of_a_split_keeps_its_chunk_after_any_group_query():
    model = fresh()
    graph = build_graph(model, X)
    graph.get_pruning_group(model.stem[0], tp.prune_conv_out_channels, idxs=[0])  # re-runs tp's index mapping
    group = graph.get_pruning_group(model.stage2[1].cv1[0], tp.prune_conv_out_channels, idxs=[3, 40])
    by_layer = {(dep.layer, dep.handler): sorted(idxs) for dep, idxs in group}
    assert by_layer[(model.stage2[1].res.a[0], tp.prune_conv_in_channels)] == [8]
    assert by_layer[(model.stage2[1].cv2[0], tp.prune_conv_in_channels)] == [3, 40]


def test_ties_stay_broken_when_two_gammas_elsewhere_are_one_float32_step_apart():
    """A tied layer (every γ = 1) next to γ one float32 step apart: a single global tie-break δ below that gap
    falls under float32's rounding and the tied layer collapses to one value (slim at 0.15 removed nothing)."""
    model = fresh()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.weight.data.fill_(1.0)  # a freshly built model: every γ tied
    step = torch.nextafter(torch.tensor(0.5), torch.tensor(1.0))
    norms[2].weight.data[:2] = torch.stack([torch.tensor(0.5), step])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = gcp.prune_detector(model, X, ratio=0.15, method="slim", round_to=1)
    assert result.report["achieved"] == pytest.approx(0.15, abs=0.01)


def test_detector_groups_are_the_groups_the_pruning_reports():
    from gcp.core.prune import detector_groups

    model, x = fresh(), X
    found = {g.name: g.layers for g in detector_groups(model, x)}
    result = gcp.prune_detector(copy.deepcopy(model), x, ratio=0.3, method="gcp")
    assert [g["name"] for g in result.report["groups"]] == list(found)
    # a caller's own groups are taken as given, by the same rules as prune_detector(groups=...)
    first = next(iter(found.values()))[0]
    assert [g.layers for g in detector_groups(model, x, {"mine": [first]})] == [[first]]
    with pytest.raises(ValueError, match="matches no BatchNorm"):
        detector_groups(model, x, {"mine": ["nothing.*"]})
