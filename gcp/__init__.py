"""gcp: group channel pruning, dynamic sparse training and group spatial attention distillation for detectors.

Chu et al., "Group channel pruning and spatial attention distilling for object detection", Applied Intelligence
2022 (arXiv 2306.01526), as a plugin on torch-pruning.
"""

# The packages that fill the core's registries (detector families, model builders, runtimes) load with gcp.
import gcp.adapters  # noqa: F401
import gcp.runtime.timers  # noqa: F401
from gcp.app.compress import CompressResult, compress
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
