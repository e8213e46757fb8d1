"""gcp: group channel pruning, dynamic sparse training and group spatial attention distillation for detectors.

Chu et al., "Group channel pruning and spatial attention distilling for object detection", Applied Intelligence
2022 (arXiv 2306.01526), as a plugin on torch-pruning.
"""

from .evaluate import evaluate
from .export import export_onnx
from .graph import pruning_ratio_dict
from .importance import BNGammaImportance, L1FilterImportance, RandomImportance, ThiNetImportance
from .prune import PruneResult, prune_detector
from .serialize import load_pruned
from .sparsity import DynamicSparsity

__all__ = [
    "BNGammaImportance",
    "DynamicSparsity",
    "L1FilterImportance",
    "PruneResult",
    "RandomImportance",
    "ThiNetImportance",
    "evaluate",
    "export_onnx",
    "load_pruned",
    "prune_detector",
    "pruning_ratio_dict",
]
