"""Channels-last vs contiguous image batches on CPU: one training step and one inference batch of the shipped
DigitScenes teacher (reduced YOLOv4, 256 px), the model's weights untouched (``gcp.detection.data.batch_to``).

    python benchmarks/bench_layout.py            # ~2 min on 2 CPU cores; writes its RESULTS.md section

Each timing is the median of ``--repeats`` runs after one warm-up; the step is forward, YOLO loss on fixed
boxes and backward at the benchmark's batch of 32; inference is ``evaluate``'s batch of 16 under no_grad.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_revision, machine, now, write_section  # noqa: E402

from gcp.app.pipeline import SHIPPED_TEACHER, load_model  # noqa: E402
from gcp.detection.data import batch_to  # noqa: E402
from gcp.detection.loss import YoloLoss  # noqa: E402

SIZE = 256


def median_seconds(call: Callable[[], object], repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_model(SHIPPED_TEACHER)
    loss_fn = YoloLoss(model)
    images = torch.rand(32, 3, SIZE, SIZE)
    targets = [
        {"boxes": torch.tensor([[40.0, 40.0, 120.0, 140.0]]), "labels": torch.tensor([i % 10])}
        for i in range(len(images))
    ]

    def step(channels_last: bool) -> None:
        model.train()
        model.zero_grad(set_to_none=True)
        loss_fn(model(batch_to(images, "cpu", channels_last=channels_last)), targets)["total"].backward()

    def infer(channels_last: bool) -> None:
        model.eval()
        with torch.no_grad():
            model(batch_to(images[:16], "cpu", channels_last=channels_last))

    rows = []
    for name, call in (("training step, batch 32", step), ("inference, batch 16", infer)):
        plain = median_seconds(lambda call=call: call(False), args.repeats)
        fast = median_seconds(lambda call=call: call(True), args.repeats)
        rows.append(f"| {name} | {plain:.2f} | {fast:.2f} | {1 - fast / plain:.0%} |")
        print(rows[-1], flush=True)
    body = "\n".join(
        [
            f"Command: `python benchmarks/bench_layout.py --repeats {args.repeats}` ({now()}, commit {git_revision()},"
            f" {machine()}, {torch.get_num_threads()} threads). Shipped teacher, 256 px, median of {args.repeats}"
            " runs after a warm-up; the weights stay contiguous, only the batch's memory order changes.",
            "",
            "| what | contiguous (s) | channels-last (s) | time saved |",
            "|---|---|---|---|",
            *rows,
        ]
    )
    write_section("Channels-last batches on CPU (training and scoring)", body)


if __name__ == "__main__":
    main()
