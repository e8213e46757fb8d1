"""Helpers shared by the benchmark scripts: machine description, γ set-up and RESULTS.md sections."""

from __future__ import annotations

import datetime as _dt
import os
import re
import subprocess
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    """One line naming this machine: CPU model, core count, RAM, torch version."""
    from gcp.latency import cpu_name

    cpu = cpu_name()
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem_gb:.0f} GiB RAM, torch {torch.__version__}, no GPU"


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
