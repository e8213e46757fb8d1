"""Ranges and bounds checked in more than one place, defined once so that the checks cannot drift apart.

* :data:`PRUNE_RATIO`: the share of its budget that :func:`gcp.prune_detector` can remove. The config's
  ``prune.ratio`` (and so ``gcp prune --ratio``) is checked against the same interval, so a config that loads is
  one that can be pruned; a config check looser than the pruner's only moves the error past data preparation.
* The model-file bounds: how large a network and an example input a model file may ask the loader
  (:mod:`gcp.core.serialize`) to build. A file's description is data read from disk, and a few edited numbers in it
  (``width: 1e4``, ``input_shape: [1, 3, 1e6, 1e6]``) would otherwise ask for terabytes before any check on its
  weights could run. The bounds are far above any detector gcp builds (YOLOv4 at width 1 has 64 M parameters,
  the paper's input is 416 px), so they only stop what no real file holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real


@dataclass(frozen=True)
class Interval:
    """A range of finite real numbers, each end open or closed; ``x in interval`` tests it and ``str`` writes
    it as in the error messages, e.g. ``(0, 1)``."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


#: ``prune_detector(ratio=...)``: removing nothing or everything is no pruning at all.
PRUNE_RATIO = Interval(0.0, 1.0, low_open=True, high_open=True)

#: Most elements of the example input a model file may ask for (its ``input_shape``): 64 images of
#: 3 x 1024 x 1024, 768 MiB as float32.
MAX_INPUT_ELEMENTS = 64 * 3 * 1024 * 1024
#: Most dimensions of that input.
MAX_INPUT_DIMS = 8
#: Most parameters of the unpruned base network a model file may ask to build (4 GiB as float32), counted on
#: the meta device before anything is allocated.
MAX_BASE_PARAMETERS = 2**30
#: Most classes a recorded builder may ask for (COCO has 80, Objects365 365, LVIS 1,203).
MAX_NUM_CLASSES = 100_000
#: Range of a recorded builder's width and depth multipliers (gcp's configs use 0.125 to 1).
MULTIPLIER = Interval(0.0, 16.0, low_open=True)
#: Most numbers in a recorded builder's anchors (YOLO's are 3 scales x 3 anchors x 2).
MAX_ANCHOR_VALUES = 4096
