"""Helpers shared by the benchmark scripts: machine description, γ set-up, RESULTS.md sections and the statistics
over seeds (mean ± sd, paired differences, CPU or GPU)."""

from __future__ import annotations

import datetime as _dt
import os
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from gcp.core.prune import PruneResult

RESULTS = Path(__file__).with_name("RESULTS.md")
#: Model2 of the paper's Tables 3–5 (40 % total pruning proportion, VOC 2007 test, mAP@0.5 in %): each pruning
#: method's model after fine-tuning and after GSA distilling, quoted beside the CPU-scale rows.
PAPER_MODEL2 = {"gcp": (81.1, 86.6), "slim": (79.8, 83.7), "thinet": (80.4, 83.9)}


def machine(device: str = "cpu") -> str:
    """One line naming this machine: CPU model, core count, RAM, torch version, and the GPU when ``device`` (a
    torch device string) is a CUDA one: rows trained on a GPU are then never averaged with CPU rows
    (:func:`device_kind`)."""
    from gcp.runtime.timers import cpu_name

    cpu = cpu_name()
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    # The vector unit torch's CPU kernels use: it sets both the speed and the float rounding of a run (two
    # "AMD EPYC" machines, AVX2 and AVX-512, gave the same benchmark stage 1 different scores).
    vector = torch.backends.cpu.get_cpu_capability()
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    where = f"GPU {gpu}" if gpu else "no GPU"
    return (
        f"{cpu} ({vector}), {os.cpu_count()} cores, {mem_gb:.0f} GiB RAM, torch {torch.__version__}, {where}"
    )


def git_revision() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def sparse_like_gammas(model: nn.Module, seed: int = 0, near_zero: float = 0.5) -> nn.Module:
    """Set BatchNorm γ to a bimodal draw that imitates a dynamically sparse-trained model (paper Fig. 9).

    A fraction ``near_zero`` of every layer's channels gets |γ| ~ U(0, 0.01), the rest U(0.5, 1.5). Structure-only
    benchmarks need *some* γ; a fresh model's γ = 1 everywhere would make every ranking a tie.
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            n = m.num_features
            low = torch.rand(n, generator=g) < near_zero
            values = torch.where(low, torch.rand(n, generator=g) * 0.01, 0.5 + torch.rand(n, generator=g))
            m.weight.data.copy_(values)
    return model


def ship_asset(model: nn.Module, map50: float, asset: Path) -> None:
    """Write ``model`` as a shipped asset (``gcp/assets/``): its builder, its weights in fp16 (half the bytes;
    ``gcp.app.pipeline.load_model`` restores fp32) and the test mAP@0.5 it was measured at, atomically."""
    import json

    from gcp.io import atomic_torch_save

    weights = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    payload = {"builder": json.dumps(model.gcp_builder), "state_dict": weights, "map50": float(map50)}
    atomic_torch_save(payload, asset)


def write_section(title: str, body: str) -> None:
    """Replace (or append) the ``## title`` section of RESULTS.md with ``body``."""
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n"
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = (
        pattern.sub(lambda _m: section + "\n", text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + section
    )
    RESULTS.write_text(text, encoding="utf-8")


def tp_pruner(model: nn.Module, example: torch.Tensor, method: str, reg: float, steps: int = 1) -> Any:
    """torch-pruning's own recipe: GroupNormPruner (global, its group L2 norm) or MagnitudePruner (L2, its
    defaults: the same ratio in every layer); prediction layers are ignored as for our methods."""
    import torch_pruning as tp

    from grouping import prediction_layers

    modules = dict(model.named_modules())
    heads = [modules[name] for name in prediction_layers(model, example)]
    common = {
        "importance": tp.importance.GroupMagnitudeImportance(p=2),
        "ignored_layers": heads,
        "iterative_steps": steps,
        "pruning_ratio": 0.9,
    }
    if method == "tp_groupnorm":
        return tp.pruner.GroupNormPruner(model, example, reg=reg, global_pruning=True, **common)
    return tp.pruner.MagnitudePruner(model, example, **common)


def tp_prune(
    model: nn.Module, example: torch.Tensor, method: str, macs_cut: float, reg: float = 0.0
) -> PruneResult:
    """Step torch-pruning's pruner (its iterative steps, 0.25 % of channels each) until ``macs_cut`` of the
    MACs are gone; the result carries torch-pruning's history, so gcp's weights-only format replays it."""
    from gcp.core.prune import PruneResult
    from gcp.core.report import count_macs_params

    model.eval()
    base_macs, base_params = count_macs_params(model, example)
    pruner = tp_pruner(model, example, method, reg, steps=360)
    macs = base_macs
    for _ in range(360):
        if 1 - macs / base_macs >= macs_cut:
            break
        pruner.step()
        macs, _ = count_macs_params(model, example)
    macs, params = count_macs_params(model, example)
    history = [
        [name, bool(is_out), [int(i) for i in idxs]] for name, is_out, idxs in pruner.DG.pruning_history()
    ]
    report = {
        "method": method,
        "budget": "macs",
        "requested": macs_cut,
        "achieved": 1 - macs / base_macs,
        "params": {"before": base_params, "after": params, "pruned": 1 - params / base_params},
        "macs": {"before": base_macs, "after": macs, "pruned": 1 - macs / base_macs},
        "groups": [],
    }
    return PruneResult(model=model, report=report, history=history, input_shape=list(example.shape))


# ------------------------------------------------------------------------------ statistics over seeds


def mean_sd(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """The mean and sample standard deviation of the values that are there, and how many there are."""
    there = [value for value in values if value is not None]
    n = len(there)
    if n == 0:
        return None, None, 0
    mean = sum(there) / n
    sd = (sum((x - mean) ** 2 for x in there) / (n - 1)) ** 0.5 if n > 1 else None
    return mean, sd, n


def paired(a: Sequence[float | None], b: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """The mean of a − b over the seeds that have both, its standard error and the number of pairs."""
    mean, sd, n = mean_sd([x - y for x, y in zip(a, b) if x is not None and y is not None])
    return mean, None if sd is None else sd / n**0.5, n


def device_kind(machine: str | None) -> str:
    """ "gpu" for a machine that names a GPU, else "cpu": :func:`machine` says "no GPU" on a CPU, and the rows
    recorded before rows carried their machine all came from CPU runs."""
    return "gpu" if machine and "GPU" in machine.replace("no GPU", "") else "cpu"
