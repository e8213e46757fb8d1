"""The paper's figures: |γ| histograms per group (Fig. 8/9), sparse-training history (Fig. 11), trade-off (Fig. 10)."""

import matplotlib.image
import pytest
import torch
from _core_toys import ToyDetector, randomise_bn

from gcp import DynamicSparsity
from gcp.app.plots import gammas_by_group, plot_gamma_histograms, plot_sparsity_history, plot_tradeoff
from grouping import Group, partition

X = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def toy():
    model = randomise_bn(ToyDetector(width=8))
    return model, partition(model, X)


def assert_png(path, figure):
    """A complete PNG whose pixel size is the figure's, and no temporary file left beside it."""
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 5_000
    height, width = matplotlib.image.imread(str(path)).shape[:2]
    expected_width, expected_height = figure.get_size_inches() * figure.dpi
    assert abs(width - expected_width) <= 2 and abs(height - expected_height) <= 2
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def sparse_history(model, groups, switch_at, epochs=4, with_map=True):
    """A real DynamicSparsity history: γ shrunk by the penalty each epoch, as sparse training would."""
    sparsity = DynamicSparsity(model, s=0.1, switch_at=switch_at, groups=groups, mechanism="eq3")
    for epoch in range(epochs):
        for norm in sparsity.norms.values():
            norm.weight.grad = None
        sparsity.step(epoch, epochs)
        with torch.no_grad():
            for norm in sparsity.norms.values():
                norm.weight -= norm.weight.grad
        sparsity.on_epoch_end(epoch, {"map50": 0.3 + 0.05 * epoch} if with_map else None)
    return sparsity.history


def test_gammas_by_group_collects_every_bn_of_each_group(toy):
    model, groups = toy
    gammas = gammas_by_group(model, groups)
    modules = dict(model.named_modules())
    assert list(gammas) == [g.name for g in groups]
    for group in groups:
        expected = torch.cat([modules[name].weight.detach().abs() for name in group.layers])
        assert torch.equal(gammas[group.name], expected)
    with pytest.raises(ValueError, match="at least one group"):
        gammas_by_group(model, [])
    with pytest.raises(ValueError, match="not affine BatchNorm layers: \\['head8.1'\\]"):
        gammas_by_group(model, [Group("bad", ["head8.1"], 8, "head")])


def test_gamma_histograms_one_panel_per_group(toy, tmp_path):
    model, groups = toy
    before = gammas_by_group(model, groups)
    keep = torch.Generator().manual_seed(0)
    after = {
        name: values * (torch.rand(values.shape, generator=keep) < 0.5) for name, values in before.items()
    }
    path = tmp_path / "gamma.png"
    figure = plot_gamma_histograms(before, after, path)
    assert len(figure.axes) == len(groups)
    assert all(ax.get_xscale() == "log" for ax in figure.axes)
    assert all(len(ax.get_legend().get_texts()) == 3 for ax in figure.axes)  # before, after, 1e-2 line
    assert_png(path, figure)

    alone = plot_gamma_histograms({"head": before[groups[-1].name]}, None, tmp_path / "before_only.png")
    assert len(alone.axes) == 1 and len(alone.axes[0].get_legend().get_texts()) == 2  # before, 1e-2 line


def test_gamma_histograms_count_exact_zeros_in_the_clamped_bin(tmp_path):
    """Sparse training drives γ to exactly 0; a log axis cannot show 0, so those go to the 1e-4 bar."""
    gammas = torch.tensor([0.0, 0.0, 0.0, 0.5], dtype=torch.float32)
    figure = plot_gamma_histograms({"head": gammas}, None, tmp_path / "zeros.png")
    outline = figure.axes[0].patches[0].get_xy()
    assert outline[:, 1].max() == 3 and outline[outline[:, 1] == 3, 0].min() == pytest.approx(1e-4)


def test_gamma_histograms_reject_bad_input(toy, tmp_path):
    model, groups = toy
    before = gammas_by_group(model, groups)
    with pytest.raises(ValueError, match="at least one group"):
        plot_gamma_histograms({}, None, tmp_path / "g.png")
    with pytest.raises(ValueError, match="same groups"):
        plot_gamma_histograms(before, {"other": torch.ones(3)}, tmp_path / "g.png")
    with pytest.raises(ValueError, match="no γ values"):
        plot_gamma_histograms({"empty": torch.empty(0)}, None, tmp_path / "g.png")
    with pytest.raises(ValueError, match="non-finite"):
        plot_gamma_histograms({"nan": torch.tensor([1.0, float("nan")])}, None, tmp_path / "g.png")
    with pytest.raises(ValueError, match="ending in .png"):
        plot_gamma_histograms(before, None, tmp_path / "g.pdf")
    assert not any(tmp_path.iterdir())


def test_sparsity_history_rows_per_schedule(toy, tmp_path):
    model, groups = toy
    histories = {
        "constant s": sparse_history(randomise_bn(ToyDetector(width=8)), groups, 1.0, with_map=False),
        "dynamic s": sparse_history(randomise_bn(ToyDetector(width=8)), groups, 0.5),
    }
    path = tmp_path / "history.png"
    figure = plot_sparsity_history(histories, path)
    # per schedule a heatmap and a line plot, one shared colour bar, one mAP axis for the schedule that has it
    assert len(figure.axes) == 2 * 2 + 1 + 1
    assert_png(path, figure)


def test_sparsity_history_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="at least one schedule"):
        plot_sparsity_history({}, tmp_path / "h.png")
    with pytest.raises(ValueError, match="'dynamic' has an empty history"):
        plot_sparsity_history({"dynamic": []}, tmp_path / "h.png")
    with pytest.raises(ValueError, match="entry 0 lacks \\['log10_hist'\\]"):
        plot_sparsity_history({"dynamic": [{"epoch": 0, "groups": {}}]}, tmp_path / "h.png")
    assert not any(tmp_path.iterdir())


def tradeoff_rows():
    rows = [{"method": "base", "ratio": 0.0, "map50": 0.8, "size_mb": 256.0}]
    for method, drop in (("gcp", 0.5), ("slim", 1.0), ("thinet", 1.2)):
        for ratio in (0.3, 0.4, 0.5):
            rows.append(
                {
                    "method": method,
                    "ratio": ratio,
                    "map50": 0.8 - drop * ratio**2,
                    "size_mb": 256 * (1 - ratio),
                }
            )
    return rows


def test_tradeoff_draws_methods_and_a_size_legend(tmp_path):
    path = tmp_path / "tradeoff.png"
    figure = plot_tradeoff(tradeoff_rows(), path)
    assert len(figure.axes) == 1
    ax = figure.axes[0]
    legends = [child for child in ax.get_children() if type(child).__name__ == "Legend"]
    titles = sorted(legend.get_title().get_text() for legend in legends)
    assert titles == ["method", "model size"]
    method_legend = next(legend for legend in legends if legend.get_title().get_text() == "method")
    assert [t.get_text() for t in method_legend.get_texts()] == ["base", "gcp", "slim", "thinet"]
    assert_png(path, figure)


def test_tradeoff_rejects_bad_rows(tmp_path):
    with pytest.raises(ValueError, match="at least one row"):
        plot_tradeoff([], tmp_path / "t.png")
    with pytest.raises(ValueError, match="row 0 lacks \\['size_mb'\\]"):
        plot_tradeoff([{"method": "gcp", "ratio": 0.3, "map50": 0.7}], tmp_path / "t.png")
    with pytest.raises(ValueError, match="map50 must be a fraction"):
        plot_tradeoff([{"method": "gcp", "ratio": 0.3, "map50": 73.6, "size_mb": 98}], tmp_path / "t.png")
    with pytest.raises(ValueError, match="ratio must be a pruning fraction"):
        plot_tradeoff([{"method": "gcp", "ratio": 38, "map50": 0.7, "size_mb": 98}], tmp_path / "t.png")
    assert not any(tmp_path.iterdir())
