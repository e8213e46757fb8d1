"""Stage 1 of the method, dynamic sparse training (paper §4.1): a training hook that drives BatchNorm γ to zero."""

from gcp.sparse.dynamic import DynamicSparsity, TooFewStepsError

__all__ = ["DynamicSparsity", "TooFewStepsError"]
