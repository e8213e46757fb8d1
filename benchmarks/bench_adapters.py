"""``prune_detector`` on detectors this project did not write (Ultralytics, torchvision, timm).

For every model of ``MODELS``, each in its own subprocess: build it from its config with random weights (no
download), give its BatchNorm layers sparse-like γ, then for each method time ``prune_detector`` (adapter
resolution, the equivalent rewrite, dependency graph build, ranking, pruning, report) on a plain image batch
and check that eval and train forwards keep their output structure, parameters drop, the
save/load round trip gives identical outputs, and the network exports to ONNX (checked in ONNX Runtime).

    python benchmarks/bench_adapters.py                # all models, methods gcp slim l1 thinet; prints the section
    python benchmarks/bench_adapters.py --write        # also writes the RESULTS.md section
    python benchmarks/bench_adapters.py --models yolov8n --methods gcp
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_revision, machine, now, sparse_like_gammas, write_section  # noqa: E402

RATIO = 0.3
SEED = 0
METHODS = ("gcp", "slim", "l1", "thinet")
TITLE = "Adapters: prune_detector on Ultralytics, torchvision and timm models"

# name → (family, builder argument, input side in pixels). Input sides are each family's usual size:
# Ultralytics 640, torchvision's own transform size (800 px short side; SSDlite's fixed 320), timm 256.
MODELS: dict[str, tuple[str, str, int]] = {
    "yolov8n": ("ultralytics", "yolov8n.yaml", 640),
    "yolov8s": ("ultralytics", "yolov8s.yaml", 640),
    "yolo11n": ("ultralytics", "yolo11n.yaml", 640),
    "yolo11s": ("ultralytics", "yolo11s.yaml", 640),
    "retinanet_resnet50_fpn": ("torchvision", "retinanet_resnet50_fpn", 800),
    "fcos_resnet50_fpn": ("torchvision", "fcos_resnet50_fpn", 800),
    "ssdlite320_mobilenet_v3_large": ("torchvision", "ssdlite320_mobilenet_v3_large", 320),
    "fasterrcnn_mobilenet_v3_large_fpn": ("torchvision", "fasterrcnn_mobilenet_v3_large_fpn", 800),
    "cspdarknet53": ("timm", "cspdarknet53", 256),
    "resnet50": ("timm", "resnet50", 256),
    "mobilenetv3_large_100": ("timm", "mobilenetv3_large_100", 256),
}
TARGETS = [{"boxes": torch.tensor([[40.0, 60.0, 200.0, 260.0]]), "labels": torch.tensor([1])}] * 2


def build(name: str) -> torch.nn.Module:
    family, arg, _ = MODELS[name]
    torch.manual_seed(SEED)
    if family == "ultralytics":
        os.environ.setdefault("YOLO_OFFLINE", "1")
        from ultralytics.nn.tasks import DetectionModel

        model = DetectionModel(arg, verbose=False)
    elif family == "torchvision":
        from torchvision.models import detection

        model = getattr(detection, arg)(weights=None, weights_backbone=None)
    else:
        import timm

        model = timm.create_model(arg, pretrained=False, features_only=True)
    return sparse_like_gammas(model, SEED).eval()


def calibrate_norms(model: torch.nn.Module, images: torch.Tensor) -> None:
    """Measure BatchNorm running statistics on ``images`` through the adapter's network.

    A freshly built model's statistics (mean 0, variance 1) do not match its activations, which then fade to a
    constant through the depth of the network; the ONNX comparison would compare constants.
    """
    from gcp.core.registry import network

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        m.train()
    with torch.no_grad():
        network(model)(images)
    for m in norms:
        m.momentum = 0.1
        m.eval()


def structure(outputs: Any, internal: bool = False) -> Any:
    """Output structure: container types, dict keys and tensor shapes without the batch axis.

    Detection counts are data-dependent, so a tensor's leading axis never counts. Ultralytics returns its
    neck's feature maps next to the predictions (key ``feats``); pruning narrows those by design, so for them
    only rank and spatial size count (``internal``).
    """
    if isinstance(outputs, torch.Tensor):
        return ["tensor", list(outputs.shape[2:] if internal else outputs.shape[1:])]
    if isinstance(outputs, dict):
        return {k: structure(v, internal or k == "feats") for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return [type(outputs).__name__, [structure(o, internal) for o in outputs]]
    return type(outputs).__name__


def run_both_modes(name: str, model: torch.nn.Module, images: torch.Tensor) -> tuple[Any, Any]:
    """Structures of the model's own forward in eval mode and in train mode (on a copy: BN stats move)."""
    family = MODELS[name][0]
    with torch.no_grad():
        eval_out = model.eval()(list(images) if family == "torchvision" else images)
    trainee = copy.deepcopy(model).train()
    batch = torch.cat([images, images])
    train_out = trainee(list(batch), TARGETS) if family == "torchvision" else trainee(batch)
    if family == "torchvision":  # losses: the keys are the structure
        train_out = sorted(train_out)
    return structure(eval_out), structure(train_out)


def onnx_view(name: str, model: torch.nn.Module) -> torch.nn.Module:
    """The network to export: the adapter's raw head maps; for Faster R-CNN only the RPN's.

    Its RoI head reads the proposals NMS selects from near-tied random objectness scores, which ONNX Runtime
    and PyTorch may order differently; those outputs are checked by the save/load comparison instead.
    """
    from gcp.core.registry import NetworkView, get_adapter, network

    if not name.startswith("fasterrcnn"):
        return network(model)
    rpn_only = dataclasses.replace(
        get_adapter("torchvision"), heads=lambda _m: ["rpn.head.cls_logits", "rpn.head.bbox_pred"]
    )
    return NetworkView(model, rpn_only)


def run_model(name: str, methods: list[str]) -> dict[str, Any]:
    import gcp
    from gcp.core.registry import network
    from gcp.runtime.export import export_onnx

    warnings.simplefilter("ignore")
    start = time.perf_counter()
    base = build(name)
    build_s = time.perf_counter() - start
    side = MODELS[name][2]
    images = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(SEED))
    calibrate_norms(base, torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(SEED + 1)))
    reference = run_both_modes(name, base, images)
    params = sum(p.numel() for p in base.parameters())
    rows = []
    for method in methods:
        model = copy.deepcopy(base)
        start = time.perf_counter()
        result = gcp.prune_detector(model, images, ratio=RATIO, method=method, calib_data=[images])
        seconds = time.perf_counter() - start
        row = {
            "method": method,
            "seconds": seconds,
            "channels_pruned": result.report["achieved"],
            "params_pruned": 1 - sum(p.numel() for p in model.parameters()) / params,
            "same_structure": run_both_modes(name, model, images) == reference,
        }
        with tempfile.TemporaryDirectory() as folder:
            loaded = gcp.load_pruned(result.save(Path(folder) / "pruned.pt"), base=copy.deepcopy(base))
            view = network(model.eval())
            with torch.no_grad():
                row["round_trip"] = all(
                    torch.equal(a, b) for a, b in zip(view(images), network(loaded)(images))
                )
            if method == methods[0]:
                dynamic = MODELS[name][0] != "torchvision"  # the transform unbinds the batch into a list
                row["onnx_max_diff"] = export_onnx(
                    onnx_view(name, model),
                    images,
                    Path(folder) / "net.onnx",
                    dynamic_batch=dynamic,
                    atol=1e-3,
                )
        rows.append(row)
    return {"name": name, "build_s": build_s, "params_m": params / 1e6, "side": side, "rows": rows}


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| model | input | params (M) | method | graph + prune (s) | γ channels pruned | params pruned "
        "| eval/train structure kept | save/load identical | ONNX max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for row in res["rows"]:
            onnx = f"{row['onnx_max_diff']:.1e}" if "onnx_max_diff" in row else "–"
            lines.append(
                f"| {res['name']} | {res['side']}² | {res['params_m']:.1f} | {row['method']} | "
                f"{row['seconds']:.1f} | {row['channels_pruned']:.1%} | {row['params_pruned']:.1%} | "
                f"{'yes' if row['same_structure'] else 'NO'} | {'yes' if row['round_trip'] else 'NO'} | {onnx} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--one", choices=list(MODELS), help="run a single model in this process (internal)")
    parser.add_argument("--write", action="store_true", help="write the section into RESULTS.md")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_model(args.one, args.methods)))
        return
    wall = time.perf_counter()
    results = []
    for name in args.models:
        command = [sys.executable, __file__, "--one", name, "--methods", *args.methods]
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    wall = time.perf_counter() - wall
    slowest = max(row["seconds"] for res in results for row in res["rows"])
    body = f"""Command: `python benchmarks/bench_adapters.py` — seed {SEED}, {now()}, commit {git_revision()},
{machine()}. Total wall time {wall:.0f} s. Every model built from its config with random weights and
`sparse_like_gammas` γ and BatchNorm statistics measured on two random images, pruned with `gcp.prune_detector(model, images, ratio={RATIO}, method=...)` from one
image batch tensor (the adapter is found automatically); ThiNet calibrates on that same batch. "graph + prune"
is the whole call (adapter rewrite, dependency graph, ranking, pruning, report); the slowest took
{slowest:.1f} s (target ≤ 60 s). Ratio {RATIO} is of the budget `channels`: BN γ entries in prunable layers for
gcp/slim, coupled channel units for l1/thinet. ONNX: the pruned network (backbone, neck, head up to the raw
head maps; for Faster R-CNN the RPN maps, as its RoI outputs follow NMS-selected proposals whose order ONNX Runtime
and PyTorch may break differently on near-tied random scores) exported with `gcp.export_onnx` and compared in
ONNX Runtime, for the first method of each model, with `atol=1e-3` rather than the default 1e-4 that our own
detectors' head maps meet (the table shows which of these exceed 1e-4).

{table(results)}
"""
    print(f"\n## {TITLE}\n\n{body}")
    if args.write:
        write_section(TITLE, body)


if __name__ == "__main__":
    main()
