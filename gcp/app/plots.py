"""The paper's diagnostic figures as PNG files: |γ| per group (Fig. 8/9), |γ| over sparse training (Fig. 11) and
the accuracy / pruning-ratio / model-size trade-off (Fig. 10).

Figures are built on matplotlib's object API with the Agg canvas (no pyplot global state, no display needed)
and written atomically through :mod:`gcp.io`, so a report folder never holds a half-written image. Every
function returns the :class:`~matplotlib.figure.Figure` it saved, for callers that want to inspect or re-save it.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from torch import nn

from gcp.io import atomic_write_bytes
from gcp.sparse.dynamic import SPARSE_BELOW
from grouping import Group, prunable_norms

GAMMA_FLOOR = 1e-4  # |γ| below this are drawn in the first bin: the log axis cannot show zero
LOG10_GAMMA_RANGE = (-6.0, 1.0)  # the range of DynamicSparsity.history's "log10_hist" bins
HISTOGRAM_BINS = 50
DPI = 120
MAX_MARKER_AREA = 900.0  # points², the marker of the largest model in plot_tradeoff
PANEL_COLUMNS = 3


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _check_png_path(path: str | os.PathLike) -> None:
    if Path(path).suffix.lower() != ".png":
        raise ValueError(f"plots are written as PNG; give a path ending in .png, got {str(path)!r}")


def _save_png(figure: Figure, path: str | os.PathLike) -> None:
    """Render ``figure`` to PNG in memory, then write it atomically (temp file in the same folder + rename)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    atomic_write_bytes(path, buffer.getvalue())


def gammas_by_group(model: nn.Module, groups: Sequence[Group]) -> dict[str, torch.Tensor]:
    """Flat |γ| of each group's BatchNorm layers (``Group.layers`` are BN module names, see
    :func:`grouping.partition`): the input of :func:`plot_gamma_histograms`."""
    if not groups:
        raise ValueError("gammas_by_group needs at least one group, e.g. grouping.partition(model, x)")
    norms = prunable_norms(model)
    values = {}
    for group in groups:
        missing = [name for name in group.layers if name not in norms]
        if missing:
            raise ValueError(
                f"group {group.name!r} names layers that are not affine BatchNorm layers: {missing[:5]}"
            )
        if not group.layers:
            raise ValueError(f"group {group.name!r} has no layers, so it has no γ to plot")
        values[group.name] = torch.cat(
            [norms[name].weight.detach().abs().flatten().float().cpu() for name in group.layers]
        )
    return values


def _finite_abs(name: str, values: torch.Tensor) -> np.ndarray:
    # float64: a float32 clamp at 1e-4 lands just below the float64 first bin edge and would not be counted
    array = values.detach().abs().flatten().double().cpu().numpy()
    if array.size == 0:
        raise ValueError(f"group {name!r} has no γ values to plot")
    if not np.isfinite(array).all():
        raise ValueError(f"group {name!r} holds non-finite γ values")
    return array


def _sparse_label(stage: str, values: np.ndarray) -> str:
    return f"{stage}: {100 * float((values < SPARSE_BELOW).mean()):.0f}% < {SPARSE_BELOW:g}"


def plot_gamma_histograms(
    before: Mapping[str, torch.Tensor],
    after: Mapping[str, torch.Tensor] | None,
    path: str | os.PathLike,
    *,
    title: str = "|γ| per group before and after sparse training",
) -> Figure:
    """One panel per group: histogram of |γ| before (and, if given, after) sparse training (paper Fig. 8/9).

    Sparse training (eq. 3) should move most of a group's |γ| towards zero while the important channels stay
    large; a log |γ| axis shows both modes, which a linear axis squeezes into one bar. Values are clamped at
    1e-4 so exact zeros stay visible, and all panels share one x range so groups can be compared. The legend
    gives the share of channels under the 1e-2 "sparse" line. Groups are dict keys (name → flat |γ|), e.g.
    from :func:`gammas_by_group`.
    """
    _check_png_path(path)
    if not before:
        raise ValueError("plot_gamma_histograms needs at least one group in `before` (group name -> |γ|)")
    if after is not None and set(after) != set(before):
        raise ValueError(
            f"`after` must hold the same groups as `before`; only in before: {sorted(set(before) - set(after))}, "
            f"only in after: {sorted(set(after) - set(before))}"
        )
    stages = {name: {"before": _finite_abs(name, values)} for name, values in before.items()}
    if after is not None:
        for name, values in after.items():
            stages[name]["after"] = _finite_abs(name, values)
    largest = max(float(v.max()) for stage in stages.values() for v in stage.values())
    bins = np.logspace(
        math.log10(GAMMA_FLOOR), math.log10(max(largest, 10 * GAMMA_FLOOR) * 1.05), HISTOGRAM_BINS
    )

    columns = min(PANEL_COLUMNS, len(stages))
    rows = math.ceil(len(stages) / columns)
    figure = _new_figure(4.4 * columns, 3.2 * rows + 0.5)
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    for extra in axes[len(stages) :]:
        extra.remove()
    for ax, (name, stage) in zip(axes, stages.items()):
        for (label, values), colour in zip(stage.items(), ("tab:blue", "tab:orange")):
            ax.hist(
                np.clip(values, GAMMA_FLOOR, None),
                bins=bins,
                histtype="stepfilled",
                facecolor=to_rgba(colour, 0.45),
                edgecolor=colour,
                linewidth=1.2,
                label=_sparse_label(label, values),
            )
        ax.axvline(
            SPARSE_BELOW, color="black", linestyle="--", linewidth=0.8, label=f"|γ| = {SPARSE_BELOW:g}"
        )
        ax.set_xscale("log")
        ax.set_xlim(bins[0] / 1.5, bins[-1] * 1.1)  # room around the clamped-zero bar and the largest γ
        ax.set_title(f"{name} ({stage['before'].size} channels)")
        ax.set_xlabel(f"|γ| (log scale, clamped at {GAMMA_FLOOR:g})")
        ax.set_ylabel("channels")
        ax.legend(fontsize="small", loc="upper center")  # the modes sit at the left and right edges
    figure.suptitle(title)
    _save_png(figure, path)
    return figure


def _history_entries(schedule: str, history: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Entries sorted by epoch, checked for the fields ``DynamicSparsity.on_epoch_end`` records."""
    if not history:
        raise ValueError(
            f"schedule {schedule!r} has an empty history; record it with DynamicSparsity as a hook"
        )
    for index, entry in enumerate(history):
        missing = [key for key in ("epoch", "log10_hist", "groups") if key not in entry]
        if missing:
            raise ValueError(f"schedule {schedule!r}, history entry {index} lacks {missing}")
    lengths = {len(entry["log10_hist"]) for entry in history}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(
            f"schedule {schedule!r}: log10_hist must have one non-zero length, found {sorted(lengths)}"
        )
    return sorted(history, key=lambda entry: entry["epoch"])


def _edges(centres: np.ndarray) -> np.ndarray:
    """Cell edges around sorted centres (epochs), half-way between neighbours; a lone centre gets width 1."""
    if centres.size == 1:
        return np.array([centres[0] - 0.5, centres[0] + 0.5])
    middles = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[2 * centres[0] - middles[0]], middles, [2 * centres[-1] - middles[-1]]])


def overall_sparse_fraction(groups: Mapping[str, Mapping[str, float]]) -> float:
    """Share of all BatchNorm channels with |γ| below the sparsity line, from per-group statistics
    (``DynamicSparsity`` history entries: ``sparse_fraction`` and ``channels`` per group)."""
    channels = sum(stats["channels"] for stats in groups.values())
    return sum(stats["sparse_fraction"] * stats["channels"] for stats in groups.values()) / max(channels, 1)


def _map50_points(entries: Sequence[Mapping[str, Any]]) -> list[tuple[float, float]]:
    return [(e["epoch"], e["metrics"]["map50"]) for e in entries if "map50" in e.get("metrics", {})]


def _draw_sparse_fraction(
    ax: Axes, schedule: str, entries: Sequence[Mapping[str, Any]], map50_limits: tuple[float, float] | None
) -> None:
    """Fraction of channels with |γ| < 1e-2 per epoch (all channels bold, each group thin) and mAP if recorded.

    ``map50_limits`` is shared by all schedules so their accuracy curves compare at a glance (Fig. 11 a vs c).
    """
    epochs = [entry["epoch"] for entry in entries]
    ax.plot(
        epochs,
        [overall_sparse_fraction(entry["groups"]) for entry in entries],
        color="black",
        linewidth=2.2,
        label="all channels",
    )
    group_names = list(dict.fromkeys(name for entry in entries for name in entry["groups"]))
    if len(group_names) > 1:
        for name in group_names:
            points = [
                (e["epoch"], e["groups"][name]["sparse_fraction"]) for e in entries if name in e["groups"]
            ]
            ax.plot(*zip(*points), linewidth=1.0, alpha=0.8, label=name)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"fraction with |γ| < {SPARSE_BELOW:g}")
    ax.set_title(f"{schedule}: sparse channels")
    handles, labels = ax.get_legend_handles_labels()
    legend_ax = ax
    metric_points = _map50_points(entries)
    if metric_points and map50_limits is not None:
        legend_ax = ax.twinx()
        style = {"color": "tab:red", "linestyle": "--", "marker": "o", "markersize": 3}
        legend_ax.plot(*zip(*metric_points), **style)
        legend_ax.set_ylim(*map50_limits)
        legend_ax.set_ylabel("mAP@0.5", color="tab:red")
        legend_ax.tick_params(axis="y", colors="tab:red")
        handles.append(Line2D([], [], **style))
        labels.append("mAP@0.5 (right axis)")
    legend_ax.legend(
        handles,
        labels,
        fontsize="x-small",
        loc="upper center",
        bbox_to_anchor=(0.5, -0.2),
        ncol=4,
        frameon=False,
    )


def _shared_map50_limits(schedules: Mapping[str, Sequence[Mapping[str, Any]]]) -> tuple[float, float] | None:
    values = [value for entries in schedules.values() for _, value in _map50_points(entries)]
    if not values:
        return None
    low, high = min(values), max(values)
    pad = max(0.02, 0.05 * (high - low))
    return low - pad, high + pad


def plot_sparsity_history(
    histories: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike
) -> Figure:
    """|γ| distribution over the epochs of each sparse-training schedule (paper Fig. 11).

    ``histories`` maps a schedule name (e.g. "constant s", "dynamic s") to ``DynamicSparsity.history``. One row
    per schedule: a heatmap of the share of channels in each log10|γ| bin per epoch (one colour scale for all
    rows, so schedules compare), and the fraction of channels below |γ| = 1e-2 per epoch with mAP@0.5 on a
    second axis when the history recorded ``metrics["map50"]``. The dynamic schedule should show the important
    mode recovering after the switch while the near-zero mode keeps growing.
    """
    _check_png_path(path)
    if not histories:
        raise ValueError(
            "plot_sparsity_history needs at least one schedule (name -> DynamicSparsity.history)"
        )
    schedules = {name: _history_entries(name, history) for name, history in histories.items()}
    figure = _new_figure(12.0, 4.2 * len(schedules) + 0.5)
    axes = figure.subplots(len(schedules), 2, squeeze=False, width_ratios=(1.25, 1.0))
    norm = LogNorm(vmin=1e-3, vmax=1.0)
    map50_limits = _shared_map50_limits(schedules)
    mesh = None
    for (heat_ax, line_ax), (schedule, entries) in zip(axes, schedules.items()):
        counts = np.asarray([entry["log10_hist"] for entry in entries], dtype=float).T
        shares = counts / np.maximum(counts.sum(axis=0, keepdims=True), 1.0)
        epochs = np.asarray([entry["epoch"] for entry in entries], dtype=float)
        log_edges = np.linspace(*LOG10_GAMMA_RANGE, counts.shape[0] + 1)
        mesh = heat_ax.pcolormesh(
            _edges(epochs), log_edges, np.ma.masked_less_equal(shares, 0.0), norm=norm, cmap="viridis"
        )
        heat_ax.axhline(math.log10(SPARSE_BELOW), color="white", linestyle="--", linewidth=1.0)
        heat_ax.set_xlabel("epoch")
        heat_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        heat_ax.set_ylabel("log10 |γ|")
        heat_ax.set_title(f"{schedule}: |γ| distribution (dashed: |γ| = {SPARSE_BELOW:g})")
        _draw_sparse_fraction(line_ax, schedule, entries, map50_limits)
    figure.colorbar(
        mesh,
        ax=axes[:, 0].tolist(),
        label="share of channels per epoch",
        location="left",
        pad=0.02,
        aspect=40,
    )
    _save_png(figure, path)
    return figure


def _tradeoff_points(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[float, float, float]]]:
    """(ratio, map50, size_mb) per method, sorted by ratio, after checking every row."""
    if not rows:
        raise ValueError("plot_tradeoff needs at least one row with method, ratio, map50 and size_mb")
    points: dict[str, list[tuple[float, float, float]]] = {}
    for index, row in enumerate(rows):
        missing = [key for key in ("method", "ratio", "map50", "size_mb") if key not in row]
        if missing:
            raise ValueError(f"row {index} lacks {missing}; each row needs method, ratio, map50 and size_mb")
        ratio, map50, size = (float(row[key]) for key in ("ratio", "map50", "size_mb"))
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"row {index}: ratio must be a pruning fraction in [0, 1], got {ratio}")
        if not 0.0 <= map50 <= 1.0:
            raise ValueError(
                f"row {index}: map50 must be a fraction in [0, 1] (as gcp.detection.evaluate gives), got {map50}"
            )
        if not (math.isfinite(size) and size > 0):
            raise ValueError(f"row {index}: size_mb must be a positive number, got {size}")
        points.setdefault(str(row["method"]), []).append((ratio, map50, size))
    return {method: sorted(values) for method, values in points.items()}


def _size_legend_values(sizes: Sequence[float]) -> list[float]:
    """Up to three round sizes spanning the data, for the marker-size legend."""
    low, high = min(sizes), max(sizes)
    candidates = [low, (low + high) / 2, high] if high > 1.2 * low else [high]
    return sorted({float(f"{value:.2g}") for value in candidates})


def plot_tradeoff(
    rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, budget: str = "channels"
) -> Figure:
    """mAP@0.5 against pruning ratio per method, marker area proportional to model size (paper Fig. 10).

    Each row is one pruned model: ``method`` (gcp, slim, thinet, ...), ``ratio`` (pruned fraction in [0, 1] of
    ``budget``: channels, macs or params), ``map50`` (fraction in [0, 1]) and ``size_mb``. Points of one method
    are joined in ratio order, so the figure answers the paper's question: at the same pruning ratio, which
    method keeps more accuracy, and how large is the model it leaves.
    """
    _check_png_path(path)
    points = _tradeoff_points(rows)
    largest = max(size for values in points.values() for _, _, size in values)
    area_per_mb = MAX_MARKER_AREA / largest
    figure = _new_figure(8.5, 5.0)
    ax = figure.subplots()
    method_handles = []
    for index, (method, values) in enumerate(points.items()):
        colour = f"C{index % 10}"
        ratios, maps, sizes = (np.asarray(column) for column in zip(*values))
        ax.plot(100 * ratios, 100 * maps, color=colour, linewidth=1.2, alpha=0.7, zorder=1)
        ax.scatter(
            100 * ratios,
            100 * maps,
            s=area_per_mb * sizes,
            color=colour,
            alpha=0.55,
            edgecolors=colour,
            zorder=2,
        )
        method_handles.append(Line2D([], [], color=colour, marker="o", linestyle="-", label=method))
    size_handles = [
        Line2D(
            [],
            [],
            linestyle="",
            marker="o",
            markersize=math.sqrt(area_per_mb * size),
            markerfacecolor="lightgrey",
            markeredgecolor="grey",
            label=f"{size:g} MB",
        )
        for size in _size_legend_values([size for values in points.values() for _, _, size in values])
    ]
    size_legend = ax.legend(
        handles=size_handles,
        title="model size",
        loc="lower left",
        bbox_to_anchor=(1.02, 0.0),
        labelspacing=1.6,
        borderpad=1.0,
    )
    ax.add_artist(size_legend)
    # The axes' own legend is the one a tight bounding box always holds: the wider one, with the method names.
    ax.legend(handles=method_handles, title="method", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    ax.set_xlabel(f"share of {'MACs' if budget == 'macs' else budget} removed (%)")
    ax.set_ylabel("mAP@0.5 (%)")
    ax.set_title("Accuracy vs pruning ratio (marker area ∝ model size)")
    ax.grid(alpha=0.3)
    ax.margins(x=0.08, y=0.12)
    _save_png(figure, path)
    return figure


def plot_loss_curves(
    curves: Mapping[str, Mapping[str, Sequence[float | None]]], path: str | os.PathLike
) -> Figure:
    """One panel per training stage (``stage → {loss term → value per epoch}``), one line per loss term: how
    each stage's losses moved (``gcp compress``'s report). Missing values (None) are left out of a line."""
    _check_png_path(path)
    stages = {stage: terms for stage, terms in curves.items() if terms}
    if not stages:
        raise ValueError(
            "plot_loss_curves needs at least one stage with a loss term (stage -> term -> values)"
        )
    figure = _new_figure(4.8 * len(stages), 3.6)
    axes = figure.subplots(1, len(stages), squeeze=False).flatten()
    for ax, (stage, terms) in zip(axes, stages.items()):
        for index, (name, values) in enumerate(terms.items()):
            points = [(epoch + 1, float(v)) for epoch, v in enumerate(values) if v is not None]
            if not points:
                continue
            epochs, losses = zip(*points)
            ax.plot(epochs, losses, marker="o", markersize=3, color=f"C{index % 10}", label=name)
        epochs_run = max((len(values) for values in terms.values()), default=1)
        ax.set_title(stage)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss (epoch mean)")
        ax.set_xlim(0.5, epochs_run + 0.5)
        if epochs_run <= 20:
            ax.set_xticks(range(1, epochs_run + 1))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    figure.suptitle("Training losses per stage")
    _save_png(figure, path)
    return figure


def plot_group_ratios(groups: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Figure:
    """The share of channels the allocator removed from each group (bars, with kept/total channels on each):
    the rows of a pruning report's ``groups`` (``name``, ``ratio``, ``channels_before``, ``channels_after``)."""
    _check_png_path(path)
    if not groups:
        raise ValueError("plot_group_ratios needs at least one group (a pruning report's 'groups')")
    names = [str(group["name"]) for group in groups]
    ratios = np.asarray([100 * float(group["ratio"]) for group in groups])
    figure = _new_figure(max(6.0, 0.9 * len(groups) + 2.0), 3.8)
    ax = figure.subplots()
    bars = ax.bar(range(len(groups)), ratios, color="tab:blue", alpha=0.7)
    for bar, group in zip(bars, groups):
        ax.annotate(
            f"{group['channels_after']}/{group['channels_before']}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize="small",
        )
    ax.set_xticks(range(len(groups)), names, rotation=30, ha="right")
    ax.set_ylabel("channels removed (%)")
    ax.set_ylim(0, max(100.0, float(ratios.max()) * 1.1))
    ax.set_title("Channels removed per group by the allocator\n(kept / before on each bar)")
    ax.grid(axis="y", alpha=0.3)
    _save_png(figure, path)
    return figure
