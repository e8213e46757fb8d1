"""gcp: group channel pruning, dynamic sparse training and group spatial attention distillation for detectors.

Chu et al., "Group channel pruning and spatial attention distilling for object detection", Applied Intelligence
2022 (arXiv 2306.01526), as a plugin on torch-pruning.
"""

from typing import Any

# The packages that fill the core's registries (detector families, model builders, runtimes) load with gcp.
import gcp.adapters  # noqa: F401
import gcp.runtime.timers  # noqa: F401
from gcp.core.graph import pruning_ratio_dict
from gcp.core.importance import BNGammaImportance, L1FilterImportance, RandomImportance, ThiNetImportance
from gcp.core.prune import PruneResult, prune_detector
from gcp.core.serialize import load_pruned
from gcp.detection.evaluate import evaluate
from gcp.runtime.export import export_onnx
from gcp.sparse import DynamicSparsity

__all__ = [
    "BNGammaImportance",
    "CompressResult",
    "DynamicSparsity",
    "L1FilterImportance",
    "PruneResult",
    "RandomImportance",
    "ThiNetImportance",
    "compress",
    "evaluate",
    "export_onnx",
    "load_pruned",
    "prune_detector",
    "pruning_ratio_dict",
]


def __getattr__(name: str) -> Any:
    """``gcp.compress`` and ``gcp.CompressResult``, loaded on first use (PEP 562).

    Why lazily: they belong to the application layer (``gcp.app``), which imports ``distill``, and ``distill``
    imports gcp's base modules (``gcp.vocab``), whose import runs this file first. Importing the application
    here would close that circle: ``import distill`` in a fresh interpreter failed with a partially
    initialised module. It also keeps ``import gcp`` free of the application's start-up cost.
    """
    if name in ("compress", "CompressResult"):
        from gcp.app import compress as application

        return getattr(application, name)
    raise AttributeError(f"module 'gcp' has no attribute {name!r}")
