"""torchrun entry point of test_train's distributed test (gloo, CPU).

``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_ddp_worker.py OUT``

Trains the reference run into ``OUT/straight``, where :func:`gcp.detection.train.fit` initialises the process group from
torchrun's environment and must leave it open; then the same run into ``OUT/resumed``, interrupted in the
middle of epoch 1, and resumes it, both in that same group, as the pipeline's successive stages do. Tearing a
group down and initialising another in one launch is what this test must not do: torchrun's rendezvous store
keeps the closed group's addresses, so the next init can connect to a dead port. One launch keeps the test
fast: starting a Python process with torch costs seconds.

Each run saves every rank's final weights and history to ``OUT/<run>_rank<r>.pt``. The last run,
``global``, trains a model without BatchNorm on unaugmented images, B per process, for the test to compare with
one process on the same 2B images per step: DDP averages gradients, so the step is only the same when the
summed loss is scaled by the number of processes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from _train_toys import (
    FixedDetection,
    GammaSubgradient,
    Interrupted,
    ToyDetection,
    make_model,
    make_plain_model,
    toy_loss,
    toy_sum_loss,
)

from gcp.detection.train import fit

EPOCHS = 4
INTERRUPT_AT_CALL = 6  # the 2nd of epoch 1's four steps per rank
GLOBAL_IMAGES = 8  # the global run: two steps of 2 images per rank, 4 per step in all


def global_batch_options() -> dict:
    """fit's options for the global run; one process uses them with batch_size=2 * 2 on the same data."""
    return dict(epochs=1, lr=0.05, warmup_epochs=0.0, loss_fn=toy_sum_loss, progress=False)


def train(out_dir: Path, *, resume: bool = False, interrupt_at_call: int | None = None) -> tuple[dict, dict]:
    model = make_model()
    history = fit(
        model,
        ToyDetection(16),
        ToyDetection(4),
        epochs=EPOCHS,
        lr=0.05,
        batch_size=2,
        warmup_epochs=1.0,
        hooks=[GammaSubgradient(model, interrupt_at_call)],
        loss_fn=toy_loss,
        loss_reduction="mean",  # toy_loss is a per-image mean: DDP's gradient average is already right
        ema=True,
        out_dir=out_dir,
        resume=resume,
        eval_fn=lambda m: {"map50": -float(m.head.bias.abs().sum())},
        progress=False,
    )
    return model.state_dict(), history


def main(out: Path) -> None:
    rank = int(os.environ["RANK"])
    if dist.is_initialized():
        raise AssertionError("no process group may exist before the first fit")
    state, history = train(out / "straight")
    if not dist.is_initialized():
        raise AssertionError("fit closed the process group it created; the next fit would have to re-join")
    torch.save({"state": state, "history": history}, out / f"straight_rank{rank}.pt")
    try:
        train(out / "resumed", interrupt_at_call=INTERRUPT_AT_CALL)
    except Interrupted:
        pass
    else:
        raise AssertionError("the interrupted run was not interrupted")
    state, history = train(out / "resumed", resume=True)
    torch.save({"state": state, "history": history}, out / f"resumed_rank{rank}.pt")
    model = make_plain_model()
    history = fit(model, FixedDetection(GLOBAL_IMAGES), batch_size=2, **global_batch_options())
    torch.save({"state": model.state_dict(), "history": history}, out / f"global_rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
