"""budget="latency": the per-layer latency table (model, cache key, reuse), bisection on it, rounding, profiling.

Timings on the shared test machine are noise, so the pruning tests run on fake runtimes whose times are
formulas; ONNX Runtime itself is exercised only for what must really run there (the one-layer graphs, the
profiler, one tiny table).
"""

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from _core_toys import MobileToy, ToyDetector, randomise_bn
from torch import nn

import gcp
from gcp.core.graph import build_graph
from gcp.core.latency import (
    ACTIVATIONS,
    FORMAT,
    ConvSpec,
    LayerTimes,
    activation_after,
    channel_grid,
    table_key,
)
from gcp.core.prune import _final_share
from gcp.core.report import count_macs_params
from gcp.runtime.timers import (
    OnnxRuntimeTimer,
    TensorRTTimer,
    compare_profiles,
    conv_graph,
    profile_onnxruntime,
)
from grouping.trace import run_forward

X = torch.randn(1, 3, 64, 64)
PER_MAC = 1e-6  # ms per multiply-accumulate of the fake runtimes


def fresh(seed: int = 0, cls=ToyDetector, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return randomise_bn(cls(**kw), seed)


def conv_macs(spec: ConvSpec, cin: int, cout: int) -> float:
    groups = spec.group_count(cout)
    cin = cout if spec.groups == "depthwise" else cin
    out_h, out_w = spec.out_hw()
    return float(spec.batch * cout * (cin // groups) * spec.kernel[0] * spec.kernel[1] * out_h * out_w)


class FakeTimer:
    """A runtime where a conv call takes PER_MAC × its MACs + ``per_call`` ms and the whole network its MACs'
    time + ``per_call`` per conv call + ``remainder``; counts what it is asked to time."""

    def __init__(self, per_call=0.0, remainder=0.0, align=1, threads=1, version="1"):
        self.per_call, self.remainder, self.align = per_call, remainder, align
        self.threads, self.version = threads, version
        self.conv_calls = self.model_calls = 0

    def describe(self):
        return {"runtime": "fake", "version": self.version, "threads": self.threads, "device": "test"}

    def time_conv(self, spec, cin, cout):
        self.conv_calls += 1
        return PER_MAC * conv_macs(spec, cin, cout) + self.per_call

    def time_model(self, network, images):
        self.model_calls += 1
        macs, _ = count_macs_params(network, images)
        convs = sum(1 for m in network.modules() if isinstance(m, nn.Conv2d))
        return PER_MAC * macs * images.shape[0] + self.per_call * convs + self.remainder


def prune(model, timer, cache, **kw):
    """budget="latency" on the table alone (no measured checks), unless the test asks for them."""
    kw.setdefault("ratio", 0.3)
    kw.setdefault("latency_checks", 0)
    return gcp.prune_detector(model, X, budget="latency", latency=timer, latency_cache=cache, **kw)


def channels(model):
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


# --------------------------------------------------------------------------------- the model itself


def test_channel_grid_is_multiples_of_the_block_and_one_point_where_nothing_changes():
    assert channel_grid(64, True, 8) == (16, 32, 48, 64)
    assert channel_grid(20, True, 8) == (8, 16, 20)
    assert channel_grid(8, True, 16) == (8,)
    assert channel_grid(3, False, 8) == (3,)


def test_piecewise_bilinear_times_are_exact_for_a_bilinear_cost_even_past_the_grid():
    def cost(ci, co):
        return 0.2 + 0.01 * ci + 0.03 * co + 0.002 * ci * co

    grid_in, grid_out = [8, 16, 32], [16, 32, 64]
    times = LayerTimes(grid_in, grid_out, [[cost(ci, co) for co in grid_out] for ci in grid_in])
    for ci, co in [(8, 16), (12, 40), (32, 64), (4, 8), (20, 60)]:
        assert times(ci, co) == pytest.approx(cost(ci, co))


def test_noisy_measurements_are_made_monotone_so_a_smaller_layer_is_never_slower():
    # a spike at the smallest point (timing noise) must not survive: bisection needs a monotone budget
    times = LayerTimes([8, 16], [8, 16], [[5.0, 2.0], [1.5, 3.0]])
    assert times.ms.tolist() == [[1.5, 2.0], [1.5, 3.0]]
    counts = np.linspace(8, 16, 9)
    values = [[times(ci, co) for co in counts] for ci in counts]
    assert np.all(np.diff(values, axis=0) >= -1e-12) and np.all(np.diff(values, axis=1) >= -1e-12)


class Acts(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.LeakyReLU(0.1))
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Mish())
        self.d = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = self.a(x)
        x = nn.functional.silu(self.b(x))
        y = self.c(x)
        return [self.d(y) + y]


def test_the_activation_after_each_conv_is_read_off_the_graph():
    model = Acts().eval()
    graph = build_graph(model, X, lambda m, x: run_forward(m, x), None)
    found = {n: activation_after(graph, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert found == {"a.0": "LeakyRelu", "b": "Silu", "c.0": "Mish", "d": "none"}


@pytest.mark.parametrize("activation", [*ACTIVATIONS, "none"])
@pytest.mark.parametrize("groups", ["dense", "depthwise"])
def test_one_layer_graphs_run_in_onnxruntime_with_the_spec_shape(activation, groups):
    import onnxruntime as ort

    spec = ConvSpec(1, 15, 16, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), groups, activation, 16, 16, (16,), (16,))
    session = ort.InferenceSession(conv_graph(spec, 16, 8), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"X": np.ones((1, 8 if groups == "depthwise" else 16, 15, 16), np.float32)})
    assert out.shape == (1, 8, *spec.out_hw()) == (1, 8, 8, 8)


# ------------------------------------------------------------------------------------- cache key and reuse


def test_cache_key_depends_on_architecture_input_runtime_and_threads_not_on_weights():
    timer = OnnxRuntimeTimer(threads=1)
    key = table_key(fresh(0), X.shape, timer)
    assert key == table_key(fresh(1), X.shape, OnnxRuntimeTimer(threads=1))  # other weights, same network
    others = [
        table_key(fresh(0), (1, 3, 96, 96), timer),
        table_key(fresh(0), (2, 3, 64, 64), timer),
        table_key(fresh(0), X.shape, OnnxRuntimeTimer(threads=2)),
        table_key(fresh(0, width=8), X.shape, timer),
        table_key(fresh(0), X.shape, FakeTimer()),
        table_key(fresh(0), X.shape, FakeTimer(version="2")),
    ]
    assert len({key, *others}) == 1 + len(others)


class Strided(nn.Module):
    """Two convs and a head whose parameter shapes do not depend on the first conv's stride."""

    def __init__(self, stride: int = 1):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, stride, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return [self.head(self.b(self.a(x)))]


def test_networks_that_differ_only_in_a_stride_get_their_own_tables(tmp_path):
    timer = FakeTimer()
    one = gcp.prune_detector(
        Strided(1), X, ratio=0.3, method="l1", budget="latency", latency=timer, latency_cache=tmp_path,
        latency_checks=0,
    ).report  # fmt: skip
    again = FakeTimer()
    two = gcp.prune_detector(
        Strided(2), X, ratio=0.3, method="l1", budget="latency", latency=again, latency_cache=tmp_path,
        latency_checks=0,
    ).report  # fmt: skip
    assert again.model_calls == 1  # measured, not the stride-1 network's time
    assert len(list(tmp_path.glob("*.json"))) == 2
    assert two["latency"]["measured_ms"] == pytest.approx(one["latency"]["measured_ms"] / 4, rel=0.05)
    assert two["latency"]["remainder_ms"] == pytest.approx(0.0, abs=1e-9)


def test_the_cache_key_covers_the_forward_that_was_traced():
    from gcp.core.latency import TracedNetwork, forward_signature

    model = Strided()
    plain = forward_signature(TracedNetwork(model))
    assert plain != forward_signature(TracedNetwork(model, lambda m, x: m(x)[0]))
    timer = FakeTimer()
    assert table_key(model, X.shape, timer, forward=plain) != table_key(
        model, X.shape, timer, forward="other"
    )


def test_a_second_pruning_of_the_same_network_measures_nothing(tmp_path):
    timer = FakeTimer()
    first = prune(fresh(), timer, tmp_path)
    assert timer.model_calls == 1 and timer.conv_calls > 0
    assert len(list(tmp_path.glob("*.json"))) == 1
    again = FakeTimer()
    second = prune(fresh(1), again, tmp_path)  # other weights: the same table
    assert again.model_calls == again.conv_calls == 0
    assert second.report["latency"]["table"] == first.report["latency"]["table"]
    # other layers held whole change the grids of a few layers: only those are measured
    third = FakeTimer()
    prune(fresh(), third, tmp_path, ignored_layers=["stage3.0.0"])
    assert third.model_calls == 0 and 0 < third.conv_calls < timer.conv_calls


def test_the_cache_folder_comes_from_gcp_cache_dir_and_a_damaged_file_is_measured_again(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("GCP_CACHE_DIR", str(tmp_path))
    gcp.prune_detector(fresh(), X, ratio=0.3, budget="latency", latency=FakeTimer(), latency_checks=0)
    (path,) = (tmp_path / "latency").glob("*.json")
    stored = json.loads(path.read_text())
    assert stored["format"] == FORMAT and stored["model_ms"] > 0 and stored["info"]["runtime"] == "fake"
    path.write_text("{ not json")
    timer = FakeTimer()
    with pytest.warns(UserWarning, match="ignoring latency cache"):
        gcp.prune_detector(fresh(), X, ratio=0.3, budget="latency", latency=timer, latency_checks=0)
    assert timer.model_calls == 1 and json.loads(path.read_text())["key"] == stored["key"]


def test_a_tiny_table_on_onnxruntime_is_measured_and_reused(tmp_path):
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.SiLU(), nn.Conv2d(16, 8, 1)
    ).eval()
    x = torch.randn(1, 3, 32, 32)
    timer = OnnxRuntimeTimer(threads=1, runs=2, warmup=0, model_runs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one prunable layer of 16 channels in blocks of 8: ratio approximate
        result = gcp.prune_detector(
            model,
            x,
            ratio=0.2,
            method="l1",
            budget="latency",
            latency=timer,
            latency_cache=tmp_path,
            latency_checks=0,
        )
    report = result.report["latency"]
    assert report["runtime"] == "onnxruntime" and report["threads"] == 1 and report["measured_ms"] > 0
    stored = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert set(stored["layers_ms"]) == {"0", "3"} and stored["info"]["align"] in (8, 16)


# ------------------------------------------------------------------------------------- bisection on the table


@pytest.mark.parametrize("cls", [ToyDetector, MobileToy])
def test_a_runtime_whose_time_is_the_macs_prunes_exactly_like_the_macs_budget(tmp_path, cls):
    by_latency = fresh(cls=cls)
    latency = prune(by_latency, FakeTimer(), tmp_path, ratio=0.35).report
    by_macs = fresh(cls=cls)
    macs = gcp.prune_detector(by_macs, X, ratio=0.35, budget="macs", round_to=1).report  # FakeTimer.align
    assert latency["latency"]["pruned"] == pytest.approx(macs["macs"]["pruned"], abs=1e-9)
    assert channels(by_latency) == channels(by_macs)


@pytest.mark.parametrize("method", ["gcp", "slim", "l1"])
@pytest.mark.parametrize("ratio", [0.2, 0.4])
def test_latency_budget_lands_within_two_percent_of_the_requested_predicted_cut(tmp_path, method, ratio):
    # per-call overhead and a fixed remainder: the latency cut is no longer the MACs cut
    timer = FakeTimer(per_call=1.0, remainder=10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the toy's γ have no valleys
        report = prune(fresh(width=32), timer, tmp_path, ratio=ratio, method=method).report
    assert report["budget"] == "latency" and report["achieved"] == pytest.approx(report["latency"]["pruned"])
    assert abs(report["latency"]["pruned"] - ratio) <= 0.02 * ratio
    assert report["latency"]["predicted_ms"] == pytest.approx(
        report["latency"]["measured_ms"] * (1 - ratio), rel=0.03
    )
    assert report["macs"]["pruned"] > ratio  # the constants make latency harder to cut than MACs


class ScaledRemainderTimer(FakeTimer):
    """A runtime whose whole network takes 1.3 × its convs' time: the ops between convs shrink with the
    channels too, which a table holding the remainder fixed does not see (it predicts a 1.3× smaller cut)."""

    def time_model(self, network, images):
        return 1.3 * super().time_model(network, images)


@pytest.mark.parametrize("method", ["gcp", "l1"])
def test_measured_checks_bring_the_latency_cut_to_the_request_where_the_table_is_biased(tmp_path, method):
    timer, target = ScaledRemainderTimer(), 0.3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table_only = prune(fresh(), timer, tmp_path, ratio=target, method=method)
        checked = prune(fresh(), timer, tmp_path, ratio=target, method=method, latency_checks=2)
    base = timer.time_model(fresh().eval(), X)

    def measured(result):
        return 1 - timer.time_model(result.model.eval(), X) / base

    assert measured(table_only) > 1.15 * target  # the table alone overshoots
    report = checked.report
    assert report["requested"] == target and 1 <= len(report["latency"]["checks"]) <= 2
    assert abs(measured(checked) - target) <= 0.05 * target
    assert abs(report["latency"]["measured_cut"] - measured(checked)) <= 0.05 * target
    assert report["latency"]["checks"][0]["share"] == target


class ScriptedTimer(FakeTimer):
    """A runtime whose base-vs-pruned comparisons measure the cuts in ``cuts``, one per comparison."""

    def __init__(self, cuts):
        super().__init__()
        self.cuts = list(cuts)
        self.comparisons = 0

    def time_models(self, networks, images):
        cut = self.cuts[self.comparisons]
        self.comparisons += 1
        return [1.0, 1.0 - cut]


def checked_prune(tmp_path, cuts, checks=2):
    timer = ScriptedTimer(cuts)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = prune(fresh(), timer, tmp_path, ratio=0.3, latency_checks=checks).report
    return report, timer, [str(w.message) for w in caught]


def test_a_noisy_small_measurement_moves_the_share_by_at_most_a_factor_of_two(tmp_path):
    report, timer, _ = checked_prune(tmp_path, [0.01, 0.295])
    shares = [t["share"] for t in report["latency"]["checks"]]
    assert shares == [0.3, pytest.approx(0.6)]  # not 0.3 × 30 → 0.999
    assert timer.comparisons == 2 and report["latency"]["measured_cut"] == pytest.approx(0.295)


def test_a_measured_cut_that_saves_nothing_stops_the_checks_with_a_warning(tmp_path):
    report, timer, messages = checked_prune(tmp_path, [-0.05])
    assert len(report["latency"]["checks"]) == 1 and timer.comparisons == 1
    assert any("no saving" in m for m in messages)
    assert any("measured -0.050 of the base's time saved" in m for m in messages)
    assert report["latency"]["measured_cut"] == pytest.approx(-0.05)


def test_a_final_share_between_two_trials_is_timed_before_it_is_reported(tmp_path):
    report, timer, _ = checked_prune(tmp_path, [0.2, 0.4, 0.31])
    assert [t["share"] for t in report["latency"]["checks"]] == [0.3, pytest.approx(0.45)]
    assert timer.comparisons == 3  # two trials and the interpolated final model
    assert report["latency"]["measured_cut"] == pytest.approx(0.31)


def test_the_final_share_interpolates_between_trials_that_bracket_the_request():
    trials = [{"share": 0.3, "measured_cut": 0.23}, {"share": 0.39, "measured_cut": 0.37}]
    share, measured = _final_share(trials, 0.3)
    assert share == pytest.approx(0.345) and measured is None  # a share no trial timed: timed again
    # no bracket: the closest trial, with its measurement
    assert _final_share([{"share": 0.3, "measured_cut": 0.2}, {"share": 0.4, "measured_cut": 0.26}], 0.3) == (
        0.4,
        0.26,
    )


def test_onnxruntime_times_several_networks_in_turn():
    small = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()).eval()
    large = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1)).eval()
    timer = OnnxRuntimeTimer(threads=1, warmup=1, model_runs=5)
    times = timer.time_models([small, large], torch.randn(1, 3, 32, 32))
    assert len(times) == 2 and 0 < times[0] < times[1]


def test_latency_checks_must_be_a_count():
    with pytest.raises(ValueError, match="latency_checks must be an integer >= 0"):
        gcp.prune_detector(fresh(), X, ratio=0.3, budget="latency", latency=FakeTimer(), latency_checks=-1)


# ------------------------------------------------------------------------------------- rounding (issue 14 item 2)


HEADS = ("head8.1", "head16.1")  # prediction convs keep their outputs


def prune_with_cpu_block(monkeypatch, block, **kw):
    """prune_detector's default on a machine whose ONNX Runtime channel block is ``block`` (8: AVX2, 16: AVX-512)."""
    monkeypatch.setattr("gcp.runtime.timers.channel_block", lambda: block)
    model = fresh(width=8)  # an 8-channel stem
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = gcp.prune_detector(model, X, ratio=0.4, method="slim", budget="macs", **kw).report
    return model, report, caught


def test_the_default_rounding_gives_the_same_architecture_on_an_avx2_and_an_avx512_cpu(monkeypatch):
    avx2, avx2_report, _ = prune_with_cpu_block(monkeypatch, 8)
    avx512, avx512_report, caught = prune_with_cpu_block(monkeypatch, 16)
    assert channels(avx2) == channels(avx512)
    assert avx2_report["round_to"] == avx512_report["round_to"]
    assert avx512_report["round_to"]["multiple"] == 8 and "default" in avx512_report["round_to"]["source"]
    assert avx512_report["achieved"] == pytest.approx(0.4, abs=0.01)  # the budget lands within 1 pp
    assert not [w for w in caught if "round_to=" in str(w.message)]  # no small layer to warn about
    base = channels(fresh(width=8))
    for name, count in channels(avx512).items():
        if name not in HEADS:
            assert count % 8 == 0, (name, count)
    assert all(base[name] < 8 for name in avx512_report["round_to"]["left_whole"])


def test_round_to_one_does_not_round(monkeypatch):
    unrounded, report, _ = prune_with_cpu_block(monkeypatch, 16, round_to=1)
    assert report["round_to"]["multiple"] == 1 and report["round_to"]["left_whole"] == []
    assert "no rounding" in report["round_to"]["source"]
    assert any(count % 8 for name, count in channels(unrounded).items() if name not in HEADS)


@pytest.mark.parametrize("align", [8, 16])
def test_a_latency_budget_rounds_to_the_timed_runtimes_own_block(tmp_path, align):
    model = fresh(width=8)
    report = prune(model, FakeTimer(align=align), tmp_path, ratio=0.3).report
    assert report["round_to"]["multiple"] == align and "timed runtime (fake)" in report["round_to"]["source"]
    base = channels(fresh(width=8))
    for name, count in channels(model).items():
        if name not in HEADS and base[name] >= align:
            assert count % align == 0, (name, count)


def test_a_model_smaller_than_the_default_multiple_is_pruned_unrounded(monkeypatch):
    monkeypatch.setattr("gcp.core.prune.DEFAULT_ROUND_TO", 1024)  # larger than every layer of the toy
    report = gcp.prune_detector(fresh(), X, ratio=0.3, budget="macs").report
    assert report["round_to"] is None and report["achieved"] == pytest.approx(0.3, abs=0.02)


def test_layers_too_small_to_round_are_left_whole_and_named():
    model = fresh()
    with pytest.warns(
        UserWarning, match=r"round_to=32: 1 layers have fewer channels and are left whole.*stem\.0"
    ):
        report = gcp.prune_detector(model, X, ratio=0.5, method="slim", round_to=32).report
    assert report["round_to"] == {"multiple": 32, "left_whole": ["stem.0"], "source": "round_to=32 (given)"}
    assert model.stem[0].out_channels == 16
    for name, count in channels(model).items():
        if name not in ("stem.0", "head8.1", "head16.1"):
            assert count % 32 == 0, (name, count)


def test_round_to_above_every_layer_is_refused():
    with pytest.raises(ValueError, match=r"round_to=256 is larger than every prunable layer.*round_to=1"):
        gcp.prune_detector(fresh(), X, ratio=0.3, round_to=256)


# ------------------------------------------------------------------------------------- bad input


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


class VaguelyDescribedTimer(FakeTimer):
    """A custom timer whose describe() names only its runtime: the cache key and the report need more."""

    def describe(self):
        return {"runtime": "mine"}


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(budget="latency", latency="bogus"), ValueError, "latency must be one of"),
        (dict(budget="latency", latency=object()), ValueError, "latency must be one of"),
        (dict(budget="macs", latency="onnxruntime"), ValueError, "apply to budget='latency'"),
        (dict(budget="macs", latency_cache="x"), ValueError, "apply to budget='latency'"),
        (dict(budget="latency", latency=FakeTimer(align=0)), ValueError, "align must be a positive"),
        (
            dict(budget="latency", latency=VaguelyDescribedTimer()),
            ValueError,
            "lacks version, threads, device",
        ),
        (dict(budget="speed"), ValueError, "unknown budget"),
    ],
)
def test_bad_latency_settings_raise_before_the_model_is_touched(kwargs, error, message):
    model = fresh()
    before = state(model)
    with pytest.raises(error, match=message):
        gcp.prune_detector(model, X, ratio=0.3, **kwargs)
    after = state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_cache_path_that_is_a_file_and_inputs_that_are_no_image_batch_are_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is not a folder"):
        prune(fresh(), FakeTimer(), tmp_path / "file")
    with pytest.raises(ValueError, match="one image batch"):
        gcp.prune_detector(fresh(), [X], ratio=0.3, budget="latency", latency=FakeTimer())


def test_a_network_without_convs_is_refused(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(ValueError, match="Conv2d layers, and this one has none"):
        gcp.prune_detector(
            model, X, ratio=0.3, method="l1", budget="latency", latency=FakeTimer(), latency_cache=tmp_path
        )


def test_a_timer_that_measures_no_time_is_refused(tmp_path):
    timer = FakeTimer()
    timer.time_model = lambda network, images: 0.0
    with pytest.raises(ValueError, match="a latency must be positive"):
        prune(fresh(), timer, tmp_path)


def test_timer_settings_are_checked():
    with pytest.raises(ValueError, match="threads must be an integer >= 1"):
        OnnxRuntimeTimer(threads=0)
    with pytest.raises(ValueError, match="runs must be an integer >= 1"):
        OnnxRuntimeTimer(runs=0)


def test_tensorrt_without_cuda_says_what_is_missing():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(
        RuntimeError, match="TensorRT needs the 'tensorrt' package .* found: .*no CUDA device"
    ):
        TensorRTTimer()
    with pytest.raises(RuntimeError, match="TensorRT needs"):
        gcp.prune_detector(fresh(), X, ratio=0.3, budget="latency", latency="tensorrt")


# ------------------------------------------------------------------------------------- profiling


def test_profile_breaks_the_time_down_per_node_and_op_type(tmp_path):
    model = fresh(width=8)
    gcp.export_onnx(model, X, tmp_path / "toy.onnx")
    base = profile_onnxruntime(tmp_path / "toy.onnx", X.shape, runs=3, threads=1)
    assert base["runs"] == 3 and base["total_ms"] > 0
    assert any(op.startswith("Conv") for op in base["ops"])
    assert sum(base["ops"].values()) == pytest.approx(sum(n["ms"] for n in base["nodes"].values()))
    pruned = copy.deepcopy(base)
    pruned["ops"] = {op: ms / 2 for op, ms in base["ops"].items()}
    pruned["total_ms"] = base["total_ms"] / 2
    rows = compare_profiles(base, pruned)
    assert {r["op"] for r in rows} == set(base["ops"])
    assert all(r["cut"] == pytest.approx(0.5) for r in rows)
    assert sum(r["share_of_saving"] for r in rows) == pytest.approx(1.0)
