"""Suite-wide settings: the test models are tiny, so one intra-op thread is much faster than several threads
spin-waiting against each other on a 2-core machine (measured: 20 SGD steps took 76 s with 2 threads under load,
3.6 s with 1)."""

import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("YOLO_OFFLINE", "1")
torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))
