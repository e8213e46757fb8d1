"""Stage 1 of the method, dynamic sparse training (paper §4.1): a training hook that drives BatchNorm γ to zero.

:func:`DynamicSparsity` builds the hook of one mechanism: :class:`LayerRelativeSparsity` (default),
:class:`Eq3Sparsity` (the paper's eq. 3) or :class:`SelectiveSparsity`, all :class:`SparseTraining` hooks.
"""

from gcp.sparse.base import SparseTraining, TooFewStepsError
from gcp.sparse.dynamic import DynamicSparsity
from gcp.sparse.eq3 import Eq3Sparsity
from gcp.sparse.layer_relative import LayerRelativeSparsity
from gcp.sparse.selective import SelectiveSparsity

__all__ = [
    "DynamicSparsity",
    "Eq3Sparsity",
    "LayerRelativeSparsity",
    "SelectiveSparsity",
    "SparseTraining",
    "TooFewStepsError",
]
