"""Suite-wide settings: the test models are tiny, so one intra-op thread is much faster than several threads
spin-waiting against each other on a 2-core machine (measured: 20 SGD steps took 76 s with 2 threads under load,
3.6 s with 1)."""

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("YOLO_OFFLINE", "1")
torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _channel_block_of_an_avx2_cpu(monkeypatch):
    """Pin the runtime's channel block, which ``prune_detector`` rounds kept channels to by default, to 8 (an
    AVX2 CPU's). It is 16 on AVX-512 CPUs, and the suite's expected ratios must not depend on which CPU runs it
    (a 0.3 params cut on a torchvision detector came out 0.324 on an AVX-512 machine). Tests of the block
    itself patch it again."""
    monkeypatch.setattr("gcp.prune.channel_block", lambda: 8)
    monkeypatch.setattr("gcp.latency.channel_block", lambda: 8)
