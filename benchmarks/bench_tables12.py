"""Paper Tables 1–2 (structure only): params, MACs and fp32 size of full YOLOv4 pruned with Table 1's group ratios,
and why they differ from Table 2.

No VOC training happens here (no GPU, no dataset): γ is set by `common.sparse_like_gammas` and each of the five
groups found by `grouping.partition` (§5.3's layer ranges, see its docstring) is pruned with the paper's ratio
for Model1–Model5 through the ``explicit`` allocator. What this re-measures is how much structure those ratios
remove from our YOLOv4, next to the paper's numbers; mAP columns of Table 1 need the real training and are not
reproduced. The analysis then measures what each group's ratio removes on its own, what the candidate causes
of the gap (group boundaries, residual vote, per-layer floor) change, and which Group3 ratio reproduces Table
2's params. Pruning only: 28 pruning calls at 128 px, 2–3 s each on 2 CPU cores nobody else uses.

    python benchmarks/bench_tables12.py
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_revision, machine, now, sparse_like_gammas, write_section  # noqa: E402

import gcp  # noqa: E402
from gcp.detection.models import yolov4  # noqa: E402
from gcp.io import atomic_write_json  # noqa: E402
from grouping import Group, partition  # noqa: E402
from grouping.trace import observe  # noqa: E402

SEED = 0
# paper Table 1: group ratios; Table 2: size (MB), FLOPs (G), params (M) of the pruned models
PAPER = {
    "Model1": ((0.10, 0.20, 0.96, 0.87, 0.45), 98, 20.35, 24.51),
    "Model2": ((0.10, 0.25, 0.96, 0.87, 0.50), 90, 19.46, 22.56),
    "Model3": ((0.10, 0.25, 0.97, 0.85, 0.55), 84, 19.35, 20.96),
    "Model4": ((0.15, 0.25, 0.96, 0.85, 0.70), 77, 17.94, 19.27),
    "Model5": ((0.15, 0.27, 0.96, 0.85, 0.90), 68, 16.57, 17.07),
}
# paper Table 1 "Total": the total pruning proportion of each row
PAPER_TOTAL = {"Model1": 0.38, "Model2": 0.40, "Model3": 0.42, "Model4": 0.45, "Model5": 0.50}
PAPER_BASE_PARAMS_M, PAPER_BASE_GFLOPS = 64.1, 29.9
PAPER_SIZE = 416
# Every pruning call runs at 128 px (10x faster than 416): with an input divisible by 32 every conv's output,
# hence its MACs, scales by the same (416/128)^2, so MAC fractions are those at 416 px and GMACs at 416 px
# are the 128-px count times that factor (checked on the base model at both sizes).
ANALYSIS_SIZE = 128
SEARCH_STEPS = 3
# The Group3 search runs on the first, middle and last row of Table 1 (each search is four pruning calls).
SEARCHED = ("Model1", "Model2", "Model5")
# Group3's ratio at which Model2 with Group4 unpruned meets Table 2's params (found by hand: 50 % gives
# 62.4 %, 60 % gives 67.2 %); one measured point, not a search.
G3_WITHOUT_G4 = 0.55
JSON_OUT = Path(__file__).parent / "results" / "tables12.json"
TITLE = "Tables 1–2: structure of YOLOv4 pruned with the paper's group ratios"
# the keys of ``measure``'s record that go to JSON_OUT, in this order
JSON_KEYS = (
    "command",
    "date",
    "commit",
    "machine",
    "seed",
    "analysis_size",
    "macs_scale_to_416",
    "groups",
    "table2",
    "composition",
    "channel_weighted_ratio",
    "paper_total",
    "group3_params_bound",
    "model2_analysis",
    "group3_ratio_for_table2_params",
    "model2_group4_unpruned_group3_at",
    "wall_s",
)

Fractions = dict[str, float]


def fresh_model() -> nn.Module:
    return sparse_like_gammas(yolov4(num_classes=20), SEED).eval()


_PRUNED: dict[tuple, dict] = {}


def prune(groups: Sequence[Group], ratios: Sequence[float], x: torch.Tensor, **options: Any) -> dict:
    """Prune a fresh model with one explicit ratio per group (Table 1's reading) and return the report.

    Reports are kept by groups, ratios and options, so a search revisiting a point does not prune again.
    """
    key = (tuple(tuple(g.layers) for g in groups), tuple(ratios), tuple(sorted(options.items())))
    if key not in _PRUNED:
        model = fresh_model()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _PRUNED[key] = gcp.prune_detector(
                model,
                x,
                ratio={g.name: r for g, r in zip(groups, ratios)},
                allocator="explicit",
                groups=list(groups),
                **options,
            ).report
    return _PRUNED[key]


def fractions(report: dict) -> Fractions:
    return {
        "channels": report["achieved"],
        "params": report["params"]["pruned"],
        "macs": report["macs"]["pruned"],
    }


def composition(model: nn.Module, groups: Sequence[Group], x: torch.Tensor) -> list[dict[str, Any]]:
    """What each group holds: BN layers, γ channels, and the params/MACs of the convs producing them.

    In our detectors a BatchNorm ``<block>.bn`` is fed by ``<block>.conv`` (``ConvBnAct``). ``max_weights``
    is the largest in/groups × k² of the group's convs: the most weights one kept output channel can keep.
    """
    modules = dict(model.named_modules())
    seen = observe(model, x)
    total_params = sum(p.numel() for p in model.parameters())
    total_macs = sum(seen.macs.values())
    rows = []
    for group in groups:
        convs = [modules[name.removesuffix(".bn") + ".conv"] for name in group.layers]
        params = sum(conv.weight.numel() for conv in convs)
        rows.append(
            {
                "group": group.name,
                "bn_layers": len(group.layers),
                "channels": sum(modules[name].num_features for name in group.layers),
                "params": params,
                "params_share": params / total_params,
                "macs_share": sum(seen.macs[conv] for conv in convs) / total_macs,
                "max_weights": max(
                    conv.in_channels // conv.groups * math.prod(conv.kernel_size) for conv in convs
                ),
            }
        )
    return rows


def macs_scale(model: nn.Module) -> float:
    """MACs at 416 px over MACs at 128 px, measured, and checked to be the exact (416/128)^2."""
    counts = [
        sum(observe(model, torch.randn(1, 3, size, size)).macs.values())
        for size in (PAPER_SIZE, ANALYSIS_SIZE)
    ]
    scale = counts[0] / counts[1]
    if not math.isclose(scale, (PAPER_SIZE / ANALYSIS_SIZE) ** 2, rel_tol=1e-9):
        raise RuntimeError(f"MACs do not scale with the input area ({scale}); analyse at {PAPER_SIZE} px")
    return scale


def moved(groups: Sequence[Group], layer: str, source: int, target: int) -> list[Group]:
    """A copy of ``groups`` with one BN layer moved from group ``source`` to group ``target``."""
    result = [replace(g, layers=list(g.layers)) for g in groups]
    result[source].layers.remove(layer)
    result[target].layers.append(layer)
    return result


def g3_ratio_for_params(
    groups: Sequence[Group], ratios: Sequence[float], target: float, x: torch.Tensor
) -> dict[str, float]:
    """Group3's ratio (the others as ``ratios``) whose params pruned meet ``target``: false position between 0
    and ``ratios``' own Group3 ratio."""

    def measure(g3: float) -> tuple[float, Fractions]:
        trial = list(ratios)
        trial[2] = g3
        return g3, fractions(prune(groups, trial, x))

    lo, hi = measure(0.0), measure(ratios[2])
    best = min((lo, hi), key=lambda point: abs(point[1]["params"] - target))
    for _ in range(SEARCH_STEPS):
        share = (target - lo[1]["params"]) / (hi[1]["params"] - lo[1]["params"])
        point = measure(lo[0] + (hi[0] - lo[0]) * min(max(share, 0.0), 1.0))
        best = min((best, point), key=lambda p: abs(p[1]["params"] - target))
        lo, hi = (lo, point) if point[1]["params"] >= target else (point, hi)
    return {"g3_ratio": best[0], **best[1]}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line: no options; ``--help`` prints the description and exits without pruning."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    return parser.parse_args(argv)


def measure_table2(groups: Sequence[Group], x: torch.Tensor) -> dict[str, dict]:
    """Each Table 1 row's ratios applied to the five groups: the pruning reports, by model name."""
    reports = {name: prune(groups, ratios, x) for name, (ratios, *_rest) in PAPER.items()}
    for name, report in reports.items():
        print(name, fractions(report), flush=True)
    return reports


def measure_model2(groups: Sequence[Group], x: torch.Tensor) -> dict[str, Any]:
    """Model2's ratios one group at a time, and under the candidate causes of the gap to Table 2."""
    ratios2 = PAPER["Model2"][0]
    alone = {}
    for i, group in enumerate(groups):
        trial = [0.0] * len(groups)
        trial[i] = ratios2[i]
        alone[f"only {group.name} at {ratios2[i]:.0%}"] = fractions(prune(groups, trial, x))
    g3_g5 = fractions(prune(groups, [0, 0, ratios2[2], 0, ratios2[4]], x))
    alone["only backbone_s32 and head (96 %, 50 %)"] = g3_g5
    variants = {
        "old boundary: `neck.reduce_p5` (layer 117) in backbone_s32": fractions(
            prune(moved(groups, "neck.reduce_p5.bn", 3, 2), ratios2, x)
        ),
        "layer 55 (`backbone.stage4.downsample`) in backbone_s8, as §5.3's 0–55": fractions(
            prune(moved(groups, "backbone.stage4.downsample.bn", 1, 0), ratios2, x)
        ),
        'residual coupling "max" (keep a channel any coupled layer keeps) instead of the vote': fractions(
            prune(groups, ratios2, x, coupling="max")
        ),
        "per-layer floor of 8 channels (`min_keep=8`, default 1)": fractions(
            prune(groups, ratios2, x, min_keep=8)
        ),
    }
    matched = {
        name: g3_ratio_for_params(groups, PAPER[name][0], 1 - PAPER[name][3] / PAPER_BASE_PARAMS_M, x)
        for name in SEARCHED
    }
    no_g4 = fractions(prune(groups, [*ratios2[:2], G3_WITHOUT_G4, 0.0, ratios2[4]], x))
    for name, point in matched.items():
        print(name, point, flush=True)
    return {"alone": alone, "g3_g5": g3_g5, "variants": variants, "matched": matched, "no_g4": no_g4}


def measure() -> dict[str, Any]:
    """Every pruning of the benchmark; the record holds the JSON's keys (``JSON_KEYS``) and what the text needs."""
    wall = time.perf_counter()
    x = torch.randn(1, 3, ANALYSIS_SIZE, ANALYSIS_SIZE)
    base = fresh_model()
    groups = partition(base, x)
    scale = macs_scale(base)
    reports = measure_table2(groups, x)
    comp = composition(base, groups, x)
    total_channels = sum(row["channels"] for row in comp)
    weighted = {
        name: sum(row["channels"] * r for row, r in zip(comp, ratios)) / total_channels
        for name, (ratios, *_rest) in PAPER.items()
    }
    g3 = comp[2]
    g3_kept = math.ceil((1 - PAPER["Model2"][0][2]) * g3["channels"])
    model2 = measure_model2(groups, x)
    return {
        "command": "python benchmarks/bench_tables12.py",
        "date": now(),
        "commit": git_revision(),
        "machine": machine(),
        "seed": SEED,
        "analysis_size": ANALYSIS_SIZE,
        "macs_scale_to_416": scale,
        "groups": [{"name": g.name, "layers": len(g.layers)} for g in groups],
        "table2": {name: {"ratios": PAPER[name][0], **fractions(r)} for name, r in reports.items()},
        "composition": comp,
        "channel_weighted_ratio": weighted,
        "paper_total": PAPER_TOTAL,
        "group3_params_bound": g3_kept * g3["max_weights"],
        "model2_analysis": {**model2["alone"], **model2["variants"]},
        "group3_ratio_for_table2_params": model2["matched"],
        "model2_group4_unpruned_group3_at": {"g3_ratio": G3_WITHOUT_G4, **model2["no_g4"]},
        "wall_s": time.perf_counter() - wall,
        # for the text only
        "reports": reports,
        "total_params": sum(p.numel() for p in base.parameters()),
        "group3_kept": g3_kept,
        "model2": model2,
    }


def render_table2(record: dict[str, Any]) -> list[str]:
    """Table 2 as measured, next to the paper's."""
    reports, scale = record["reports"], record["macs_scale_to_416"]
    r0 = next(iter(reports.values()))
    table = [
        "| model | group ratios (G1–G5) | channels removed: ours / Table 1 Total | params (M) ours / paper |"
        " params pruned ours / paper | GMACs ours / paper | MACs pruned ours / paper | fp32 size (MB) ours / paper |",
        "|---|---|---|---|---|---|---|---|",
        f"| Base | 0 | 0 / 0 | {r0['params']['before'] / 1e6:.2f} / {PAPER_BASE_PARAMS_M} | 0 / 0 |"
        f" {r0['macs']['before'] * scale / 1e9:.2f} / {PAPER_BASE_GFLOPS} | 0 / 0 |"
        f" {r0['size_mb']['before']:.0f} / 256 |",
    ]
    for name, (ratios, size, gflops, mparams) in PAPER.items():
        r = reports[name]
        table.append(
            f"| {name} | {', '.join(f'{v:.0%}' for v in ratios)} | {r['achieved']:.1%} / "
            f"{PAPER_TOTAL[name]:.0%} | {r['params']['after'] / 1e6:.2f} / {mparams} |"
            f" {r['params']['pruned']:.1%} / {1 - mparams / PAPER_BASE_PARAMS_M:.1%} |"
            f" {r['macs']['after'] * scale / 1e9:.2f} / {gflops} |"
            f" {r['macs']['pruned']:.1%} / {1 - gflops / PAPER_BASE_GFLOPS:.1%} |"
            f" {r['size_mb']['after']:.0f} / {size} |"
        )
    return table


def render_analysis_tables(record: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """The groups' composition, Model2's ratios under each variant, and the matched Group3 ratios."""
    model2, paper2 = record["table2"]["Model2"], paper_model2()
    comp_lines = [
        "| group | BN layers | γ channels | params of its convs | share of params | share of MACs |",
        "|---|---|---|---|---|---|",
        *(
            f"| `{row['group']}` | {row['bn_layers']} | {row['channels']} | {row['params'] / 1e6:.1f} M |"
            f" {row['params_share']:.1%} | {row['macs_share']:.1%} |"
            for row in record["composition"]
        ),
    ]
    analysis_lines = [
        "| Model2 ratios applied to | channels removed | params pruned | MACs pruned |",
        "|---|---|---|---|",
        f"| all five groups (the table above) | {model2['channels']:.1%} | {model2['params']:.1%} |"
        f" {model2['macs']:.1%} |",
        *(
            f"| {label} | {f['channels']:.1%} | {f['params']:.1%} | {f['macs']:.1%} |"
            for label, f in record["model2_analysis"].items()
        ),
        f"| paper Table 2 | {PAPER_TOTAL['Model2']:.0%} (Table 1 Total) | {paper2['params']:.1%} |"
        f" {paper2['macs']:.1%} |",
    ]
    matched_lines = [
        "| model | Group3 ratio | channels removed / Table 1 Total | params pruned / Table 2 |"
        " MACs pruned / Table 2 |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {point['g3_ratio']:.1%} (Table 1: {PAPER[name][0][2]:.0%}) | {point['channels']:.1%} /"
            f" {PAPER_TOTAL[name]:.0%} | {point['params']:.1%} / {1 - PAPER[name][3] / PAPER_BASE_PARAMS_M:.1%} |"
            f" {point['macs']:.1%} / {1 - PAPER[name][2] / PAPER_BASE_GFLOPS:.1%} |"
            for name, point in record["group3_ratio_for_table2_params"].items()
        ),
    ]
    return comp_lines, analysis_lines, matched_lines


def paper_model2() -> Fractions:
    """Table 2's params and MACs pruned for Model2."""
    _ratios, _size, gflops2, mparams2 = PAPER["Model2"]
    return {"params": 1 - mparams2 / PAPER_BASE_PARAMS_M, "macs": 1 - gflops2 / PAPER_BASE_GFLOPS}


def render_header(record: dict[str, Any]) -> str:
    """How the numbers were made."""
    scale = record["macs_scale_to_416"]
    group_lines = ", ".join(f"`{g['name']}` ({g['layers']} BN layers)" for g in record["groups"])
    return f"""Command: `{record["command"]}` — seed {record["seed"]}, {record["date"]}, commit {record["commit"]},
{record["machine"]}. Wall time {record["wall_s"]:.0f} s, on a
machine shared with a training run. Pruning only. Full YOLOv4, 20 classes; γ from `sparse_like_gammas` (half of
every layer's channels near 0; structure only — no VOC training here, so Table 1's mAP column is not
re-measured). Every pruning call runs at {ANALYSIS_SIZE}×{ANALYSIS_SIZE}; GMACs are given at 416×416, the
{ANALYSIS_SIZE}-px count × {scale:.4f}, the measured ratio of the base model's MACs at the two sizes (every conv
scales by (416/{ANALYSIS_SIZE})²), so MAC fractions are those at 416 px. MACs are conv+linear
multiply-accumulates (the paper's "FLOPs" column is the same quantity: 29.9 G for the base model). Groups from
`grouping.partition`, which follows §5.3's ranges: {group_lines} — Group3 ends at the SPP output (darknet layer
116), Group4 starts at `neck.reduce_p5` (layer 117); these are the numbers of conv layers in darknet's 0–54,
55–85, 86–116, 117–136 and 137–161. Numbers also in `benchmarks/results/tables12.json`."""


def render_reading(record: dict[str, Any]) -> str:
    """The bullets that read the tables: why Table 1's ratios do not give Table 2's structure."""
    g3, ratios2, paper2 = record["composition"][2], PAPER["Model2"][0], paper_model2()
    total_params, g3_kept, g3_bound = (
        record["total_params"],
        record["group3_kept"],
        record["group3_params_bound"],
    )
    alone, g3_g5, no_g4 = record["model2"]["alone"], record["model2"]["g3_g5"], record["model2"]["no_g4"]
    model2, matched = record["table2"]["Model2"], record["group3_ratio_for_table2_params"]
    shift = max(
        abs(f[k] - model2[k]) for f in record["model2"]["variants"].values() for k in ("params", "macs")
    )
    g3_range = f"{min(p['g3_ratio'] for p in matched.values()):.0%}–{max(p['g3_ratio'] for p in matched.values()):.0%}"
    total_gap = max(abs(p["channels"] - PAPER_TOTAL[name]) for name, p in matched.items())
    macs_gaps = [p["macs"] - (1 - PAPER[name][2] / PAPER_BASE_GFLOPS) for name, p in matched.items()]
    weighted = record["channel_weighted_ratio"]
    weighted_text = ", ".join(f"{name} {weighted[name]:.1%} vs {PAPER_TOTAL[name]:.0%}" for name in PAPER)
    return f"""Reading:
- **Group3's 96 % alone removes most of what Table 2 reports.** Group3 (layers 86–116) holds
  {g3["params"] / 1e6:.1f} M of the {total_params / 1e6:.1f} M parameters. Removing 96 % of its
  {g3["channels"]} channels keeps at most {g3_kept}, and a conv keeps at most in/groups × k² weights per kept
  output channel (here at most {g3["max_weights"]}), so whatever the γ distribution Group3 keeps at most
  {g3_bound / 1e6:.1f} M and alone removes at least {(g3["params"] - g3_bound) / total_params:.0%} of all parameters (measured:
  {alone[f"only backbone_s32 at {ratios2[2]:.0%}"]["params"]:.1%}). With the head group's 50 % on top it is
  {g3_g5["params"]:.1%}, already more than Table 2's {paper2["params"]:.1%} for Model2 with three groups still
  unpruned.
- **Table 1's Total column disagrees with its own group columns.** Weighting the group ratios by the groups'
  γ channels gives {weighted_text} (ours: "channels removed" above, slightly less than the weighted mean
  because the residual vote keeps some coupled channels).
- **Both Table 1's Total and Table 2's params fit a Group3 ratio of {g3_range}, not 96 %.** With Group3 at
  that ratio and Groups 1, 2, 4, 5 as listed, each searched row's channels removed is within
  {total_gap * 100:.1f} pp of Table 1's Total while its params meet Table 2's. MACs do not fit: they stay
  {min(macs_gaps) * 100:.0f}–{max(macs_gaps) * 100:.0f} pp above Table 2's. Closing that gap takes a group that
  removes MACs but few params: Group4 (at 87 % it removes
  {alone[f"only neck at {ratios2[3]:.0%}"]["macs"]:.1%} of the MACs and
  {alone[f"only neck at {ratios2[3]:.0%}"]["params"]:.1%} of the params). Only with Group4 left unpruned and
  Group3 at {G3_WITHOUT_G4:.0%} does Model2 come near all three columns (channels {no_g4["channels"]:.1%}, params
  {no_g4["params"]:.1%}, MACs {no_g4["macs"]:.1%} against {PAPER_TOTAL["Model2"]:.0%}, {paper2["params"]:.1%},
  {paper2["macs"]:.1%}). Either way Table 2's models were pruned far less in Group3 (and perhaps Group4) than
  Table 1 lists; we cannot tell which from the paper, nor how it counted its pruned models' FLOPs.
- **Not the causes:** the boundary between Group3 and Group4 (layer 117 in either), layer 55's group, the
  residual vote against "max" coupling and a per-layer floor of 8 channels each move Model2's params and MACs
  by at most {shift * 100:.1f} pp (rows above)."""


def render(record: dict[str, Any]) -> str:
    """The RESULTS.md section (markdown) from ``measure``'s record."""
    comp_lines, analysis_lines, matched_lines = render_analysis_tables(record)
    return f"""{render_header(record)}

{chr(10).join(render_table2(record))}

**Why our Model1–5 remove more than Table 2.** What the groups hold (the convs producing
each group's γ; prediction convs and biases are in no group):

{chr(10).join(comp_lines)}

{chr(10).join(analysis_lines)}

Group3's ratio lowered until the params pruned meet Table 2's, the other four groups as Table 1 (first, middle
and last row):

{chr(10).join(matched_lines)}

{render_reading(record)}

So with Table 1 applied as written no reading of the pruning (boundaries, vote, floors) brings our structure
within 5 pp of Table 2: the ratios themselves do not produce it. We apply Table 1 as written and do not tune the
ratios to Table 2."""


def write(record: dict[str, Any], body: str) -> None:
    """The RESULTS.md section and ``benchmarks/results/tables12.json`` (the record's ``JSON_KEYS``)."""
    write_section(TITLE, body)
    atomic_write_json(JSON_OUT, {key: record[key] for key in JSON_KEYS})


def main(argv: Sequence[str] | None = None) -> None:
    parse_args(argv)
    record = measure()
    write(record, render(record))
    print(json.dumps({"weighted": record["channel_weighted_ratio"]}), flush=True)


if __name__ == "__main__":
    main()
