"""Is a pruned detector faster, not only smaller? Latency cut vs MACs cut on ONNX Runtime (CPU).

For every model × setting (method, budget, ratio, ``round_to``), a copy of the base model is pruned, both are
exported to ONNX and timed alternately in this one process (``gcp.runtime.export.compare_latency``: base, pruned,
base, ... with non-spinning threads, medians of ``--runs`` ≥ 30), then each is profiled with ONNX Runtime's own
profiler (``gcp.runtime.timers.profile_onnxruntime``) to see which op types the time was saved in. ``budget="latency"``
rows build (or reuse) the model's latency table with the same threads, and also record the predicted cut.

Rows go to ``benchmarks/results/latency.json`` as each one finishes (a killed run resumes with the rows it
lacks; rows measured on another machine are not mixed in) and the RESULTS.md section is rewritten from all rows.
Targets: latency cut ≥ 0.9 × MACs cut with the defaults at 40 % MACs; ``budget="latency"`` lands
within 5 % of the requested latency cut. CPU timings are only worth this on an otherwise idle machine: each row
records the 1-minute load average before it.

    python benchmarks/bench_latency.py                                  # every model and setting
    python benchmarks/bench_latency.py --models yolov4_w025 --threads 2
    python benchmarks/bench_latency.py --smoke                          # one tiny model, a temporary folder
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

os.environ.setdefault("YOLO_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_adapters import calibrate_norms  # noqa: E402
from common import git_revision, machine, now, sparse_like_gammas, write_section  # noqa: E402

import gcp  # noqa: E402
from gcp.io import atomic_write_json  # noqa: E402
from gcp.runtime.export import compare_latency  # noqa: E402
from gcp.runtime.timers import (
    OnnxRuntimeTimer,
    compare_profiles,
    profile_onnxruntime,  # noqa: E402
)

RESULTS_JSON = Path(__file__).with_name("results") / "latency.json"
TITLE = "Latency follows MACs? ONNX Runtime CPU, base vs pruned"
# the keys of a row printed as it is measured
PRINTED = (
    "model",
    "method",
    "budget",
    "ratio",
    "round_to",
    "macs_cut",
    "latency_cut",
    "base_ms",
    "pruned_ms",
)
SEED = 0

# name → (family, input side in pixels), the list
MODELS: dict[str, tuple[str, int]] = {
    "yolov4_w025": (
        "gcp",
        256,
    ),  # the demo's stage-1 model (gcp/assets/digits_sparse.pt): γ from sparse training
    "yolov4": ("gcp", 416),  # full width, sparse-like γ
    "yolov8n": ("ultralytics", 320),
    "retinanet_resnet50_fpn": ("torchvision", 512),
}
# (method, budget, ratio, round_to); round_to None is the default (the runtime's channel block), 1 no rounding
SETTINGS: list[tuple[str, str, float, int | None]] = [
    ("gcp", "macs", 0.4, None),
    ("gcp", "macs", 0.4, 1),
    ("gcp", "macs", 0.4, 16),
    ("slim", "macs", 0.4, None),
    ("l1", "macs", 0.4, None),
    ("l1", "macs", 0.4, 1),
    ("gcp", "latency", 0.3, None),
    ("l1", "latency", 0.3, None),
]
# the rows the targets are read from (defaults at 40 % MACs, the same unrounded, budget="latency"):
# the large models' rows take minutes each on 2 cores
CORE_SETTINGS = [SETTINGS[0], SETTINGS[1], SETTINGS[4], SETTINGS[6]]
SMOKE_SETTINGS = [("gcp", "macs", 0.4, None), ("gcp", "latency", 0.3, None)]


def build(name: str, side: int) -> nn.Module:
    """The base model of ``name`` in eval mode, with γ to rank (no download)."""
    torch.manual_seed(SEED)
    family = MODELS[name][0]
    if name == "yolov4_w025":
        from gcp.app.pipeline import SHIPPED_SPARSE, load_model

        return load_model(SHIPPED_SPARSE).eval()
    if name == "yolov4":
        from gcp.detection.models import yolov4

        return sparse_like_gammas(yolov4(num_classes=20), SEED).eval()
    if family == "ultralytics":
        from ultralytics.nn.tasks import DetectionModel

        model = DetectionModel("yolov8n.yaml", verbose=False)
    else:
        from torchvision.models import detection

        model = detection.retinanet_resnet50_fpn(
            weights=None, weights_backbone=None, min_size=side, max_size=side
        )
    model = sparse_like_gammas(model, SEED).eval()
    calibrate_norms(model, torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(SEED + 1)))
    return model


def timed_view(name: str, model: nn.Module) -> nn.Module:
    """What is exported and timed: our YOLOs as they are, other families' trainable network (no NMS)."""
    if MODELS[name][0] == "gcp":
        return model
    from gcp.core.registry import network

    return network(model)


def row_key(row: dict[str, Any]) -> tuple:
    return (row["model"], row["method"], row["budget"], row["ratio"], row["round_to"], row["threads"])


def measure_row(
    name: str,
    side: int,
    base: nn.Module,
    setting: tuple[str, str, float, int | None],
    args: argparse.Namespace,
    cache: Path | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Prune a copy of ``base`` with ``setting``, time base and pruned alternately, profile both."""
    method, budget, ratio, round_to = setting
    images = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(SEED))
    load = os.getloadavg()[0]
    pruned = copy.deepcopy(base)
    latency = {}
    if budget == "latency":
        latency = {"latency": OnnxRuntimeTimer(threads=args.threads), "latency_cache": cache}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = gcp.prune_detector(
            pruned, images, ratio=ratio, method=method, budget=budget, round_to=round_to, **latency
        )
    prune_s = time.perf_counter() - start
    fixed_batch = MODELS[name][0] == "torchvision"  # its transform takes the batch apart
    with tempfile.TemporaryDirectory() as folder:
        timed = compare_latency(
            {"base": timed_view(name, base), "pruned": timed_view(name, pruned)},
            images.shape,
            folder,
            runs=args.runs,
            warmup=args.warmup,
            threads=args.threads,
            dynamic_batch=not fixed_batch,
            atol=1e-3,
        )
        profiles = {
            which: profile_onnxruntime(
                Path(folder) / f"{which}.onnx", images.shape, runs=args.profile_runs, threads=args.threads
            )
            for which in ("base", "pruned")
        }
    base_row, pruned_row = timed
    report = result.report
    row = {
        "model": name,
        "input": side,
        "method": method,
        "budget": budget,
        "ratio": ratio,
        "round_to": round_to,
        "round_to_used": (report["round_to"] or {}).get("multiple"),
        "macs_cut": 1 - pruned_row["gmacs"] / base_row["gmacs"],
        "latency_cut": 1 - pruned_row["median_ms"] / base_row["median_ms"],
        "predicted_latency_cut": report["latency"]["pruned"] if report["latency"] else None,
        # budget="latency": prune_detector's own measured checks (share asked of the table → measured cut)
        "latency_checks": report["latency"].get("checks") if report["latency"] else None,
        "base_ms": base_row["median_ms"],
        "pruned_ms": pruned_row["median_ms"],
        "base_p10_p90_ms": [base_row["p10_ms"], base_row["p90_ms"]],
        "pruned_p10_p90_ms": [pruned_row["p10_ms"], pruned_row["p90_ms"]],
        "threads": args.threads,
        "runs": args.runs,
        "load_before": load,
        "prune_s": prune_s,
        "commit": git_revision(),
    }
    profile = {
        "key": list(row_key(row)),
        "base_total_ms": profiles["base"]["total_ms"],
        "pruned_total_ms": profiles["pruned"]["total_ms"],
        "ops": compare_profiles(profiles["base"], profiles["pruned"]),
    }
    return row, profile


def load_results(path: Path, here: str) -> dict[str, Any]:
    """The stored results to resume from; those of another machine are set aside (not mixed in)."""
    if path.is_file():
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored.get("machine") == here:
            return stored
        print(
            f"{path} was measured on {stored.get('machine')!r}; starting afresh for this machine", flush=True
        )
    return {"rows": [], "profiles": []}


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def section(results: dict[str, Any], command: str, wall_s: float) -> str:
    """The RESULTS.md section: every row, the two targets' verdicts and where the time was saved."""
    lines = [
        f"Last command: `{command}` — {now()}, commit {results['commit']}, {results['machine']}. Wall time of "
        f"this invocation {wall_s:.0f} s. Rows measured by earlier invocations on this machine are kept (each "
        "row's commit, load and runs are in `benchmarks/results/latency.json`). Base and pruned exported to ONNX and timed alternately in one process "
        "(ONNX Runtime CPU, batch 1, non-spinning threads), medians; `load` is the 1-minute load average before "
        "the row (timings under load are not reliable). MACs and latency cuts are of the timed network (no NMS).",
        "",
        "| model | input | method | budget | ratio | round_to | MACs cut | latency cut | latency/MACs "
        "| predicted cut | base ms | pruned ms | threads | runs | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        rounding = r["round_to_used"] if r["round_to_used"] not in (None, 1) else "none"
        lines.append(
            f"| {r['model']} | {r['input']} | {r['method']} | {r['budget']} | {r['ratio']:.2f} | {rounding} | "
            f"{_pct(r['macs_cut'])} | {_pct(r['latency_cut'])} | {r['latency_cut'] / r['macs_cut']:.2f} | "
            f"{_pct(r['predicted_latency_cut'])} | {r['base_ms']:.1f} | {r['pruned_ms']:.1f} | {r['threads']} | "
            f"{r['runs']} | {r['load_before']:.1f} |"
        )
    lines += ["", "Targets:", ""]
    for r in results["rows"]:
        if r["budget"] == "macs" and r["round_to"] is None and r["ratio"] == 0.4:
            ok = r["latency_cut"] >= 0.9 * r["macs_cut"]
            lines.append(
                f"- {r['model']} {r['method']}, defaults, 40 % MACs: latency cut {_pct(r['latency_cut'])} vs "
                f"0.9 × MACs cut {_pct(0.9 * r['macs_cut'])}: {'met' if ok else 'NOT met'}"
            )
        if r["budget"] == "latency":
            off = abs(r["latency_cut"] - r["ratio"]) / r["ratio"]
            lines.append(
                f"- {r['model']} {r['method']}, budget=latency {r['ratio']:.0%}: measured {_pct(r['latency_cut'])}"
                f" (predicted {_pct(r['predicted_latency_cut'])}), {off:.0%} off the request: "
                f"{'met' if off <= 0.05 else 'NOT met'} (target within 5 %)"
            )
    lines += [
        "",
        "Where the time was saved (ONNX Runtime profiler, per op type, medians over the profile runs; "
        "`/nchwc`: run in the blocked layout):",
        "",
    ]
    for profile in results["profiles"]:
        model, method, budget, ratio, round_to, threads = profile["key"]
        top = sorted(profile["ops"], key=lambda o: -o["base_ms"])[:6]
        ops = "; ".join(f"{o['op']} {o['base_ms']:.1f}→{o['pruned_ms']:.1f} ms" for o in top)
        lines.append(
            f"- {model} {method} {budget} {ratio:g} round_to={round_to}: {profile['base_total_ms']:.1f} → "
            f"{profile['pruned_total_ms']:.1f} ms; {ops}"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; ``--smoke`` sets its few runs here."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="ONNX Runtime intra-op threads"
    )
    parser.add_argument(
        "--runs", type=int, default=30, help="timed runs of each model (>= 30 for RESULTS.md)"
    )
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--profile-runs", type=int, default=10)
    parser.add_argument("--cache", default=None, help="latency table folder (default: gcp's user cache)")
    parser.add_argument(
        "--core",
        action="store_true",
        help="only the rows the targets need (gcp default and unrounded, l1, latency)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="yolov4_w025 at 128 px, 5 runs, into a temporary folder only"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.runs, args.warmup, args.profile_runs = 5, 1, 2
    elif args.runs < 30:
        parser.error("--runs must be >= 30; --smoke for a quick check")
    return args


def plan_of(args: argparse.Namespace) -> tuple[Path, Path | None, list[tuple[str, int, list]]]:
    """Where the rows go, the latency table folder, and (model, input side, settings) to measure."""
    if args.smoke:
        scratch = Path(tempfile.mkdtemp(prefix="bench_latency_"))
        return scratch / "latency.json", scratch / "cache", [("yolov4_w025", 128, SMOKE_SETTINGS)]
    cache = Path(args.cache) if args.cache else None
    return (
        RESULTS_JSON,
        cache,
        [(name, MODELS[name][1], CORE_SETTINGS if args.core else SETTINGS) for name in args.models],
    )


def measure(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Measure every planned row this machine lacks. Each row is saved to the record's ``out`` as soon as it is
    measured (so that a killed run resumes); returns the record: all rows, the command and the wall time."""
    out, cache, plan = plan_of(args)
    here = machine()
    results = load_results(out, here)
    done = {row_key(r) for r in results["rows"]}
    wall = time.perf_counter()
    for name, side, settings in plan:
        todo = [s for s in settings if (name, *s[:4], args.threads) not in done]
        if not todo:
            continue
        base = build(name, side)
        for setting in todo:
            row, profile = measure_row(name, side, base, setting, args, cache)
            results["rows"].append(row)
            # a re-measured row (its old row deleted from the file) replaces its old profile too
            results["profiles"] = [p for p in results["profiles"] if p["key"] != profile["key"]]
            results["profiles"].append(profile)
            results.update(commit=git_revision(), machine=here)
            atomic_write_json(out, results)
            print({k: row[k] for k in PRINTED}, flush=True)
    return {"results": results, "out": out, "command": command, "wall_s": time.perf_counter() - wall}


def render(record: dict[str, Any]) -> str:
    """The RESULTS.md section (markdown) from ``measure``'s record."""
    return section(record["results"], record["command"], record["wall_s"])


def write(record: dict[str, Any], body: str, smoke: bool) -> None:
    """The RESULTS.md section (the JSON rows were written as they were measured); a smoke run only prints."""
    if smoke:
        print(f"smoke results in {record['out']}\n\n{body}")
    else:
        write_section(TITLE, body)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    command = "python benchmarks/bench_latency.py " + " ".join(sys.argv[1:] if argv is None else argv)
    record = measure(args, command)
    if "commit" not in record["results"]:
        print("nothing to measure")
        return
    write(record, render(record), args.smoke)


if __name__ == "__main__":
    main()
