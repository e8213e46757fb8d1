"""Every choice list and default that both the configuration and the code accept, in one torch-free place.

``gcp.app.config`` validates a YAML file against these without importing torch or torch-pruning; the modules
that act on a choice import the same names, so the two can never disagree.
"""

from __future__ import annotations

# Pruning (gcp.core.prune, paper §4.2): what decides which channels go, how a budget is split over the groups,
# what the ratio counts, how residual-coupled channels are decided (§4.2.3) and what happens to units without
# BatchNorm.
PRUNE_METHODS = ("gcp", "slim", "thinet", "l1", "random", "lcp")
ALLOCATORS = ("valley", "paper", "explicit")
BUDGETS = ("channels", "params", "macs", "latency")
COUPLINGS = ("vote", "mean", "max")
BN_FREE = ("l1", "keep")

# Dynamic sparse training (gcp.sparse, paper §4.1).
SCHEDULES = ("dynamic", "constant")
SPARSITY_MECHANISMS = ("layer_relative", "eq3", "selective")
# The rate s when none is given, per mechanism: the paper's 7.5e-4 for eq. 3's subgradient; for layer_relative s
# is relative to each layer's gradient RMS (1.0 with lr 0.02 is what benchmarks/bench_method.py runs);
# selective has no rate.
DEFAULT_S = {"eq3": 7.5e-4, "layer_relative": 1.0, "selective": 0.0}
# layer_relative's share of s that every channel gets (off: at s = 1 a floor of 0.3 zeroed 57 % of the
# benchmark teacher's γ in 188 steps and left 0.02 mAP).
DEFAULT_PUSH_FLOOR = 0.0
# selective: the share of MACs (or channels) to zero, and the share of the steps spent scoring.
DEFAULT_TARGET = 0.45
DEFAULT_SCORE_SHARE = 0.1

# Distillation (distill, paper §4.3): how far apart two attention maps are.
ATTENTION_DISTANCES = ("squared", "mean_squared", "norm")
# Which priors the soft class term (eq. 9) reads: eq. 12's candidates near the objects, or all (eq. 9 as written).
SOFT_PRIORS = ("candidates", "all")
# How the soft class term (eq. 10-11) turns class logits into probabilities: per-class sigmoids (a YOLO's own)
# or the paper's softmax over the classes.
CLASS_ACTIVATIONS = ("sigmoid", "softmax")

# Training and evaluation (gcp.detection).
OPTIMIZERS = ("sgd", "adamw")
# How a loss and the hooks' terms reduce over a batch's images ("sum": YoloLoss's and the distiller's); it
# decides whether DDP's gradient average must be scaled back up (gcp.detection.train.fit).
LOSS_REDUCTIONS = ("sum", "mean")
AP_METHODS = ("coco101", "voc11", "voc_area")
EVAL_SPLITS = ("train", "val", "test")

# Runtimes a latency budget can be timed on (gcp.runtime).
RUNTIMES = ("onnxruntime", "tensorrt")
