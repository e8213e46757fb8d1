"""benchmarks/train_reference.py without training: the convergence verdict and the second cycle's history."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
from _benchmarks import load_benchmark


@pytest.fixture(scope="module")
def reference():
    return load_benchmark("train_reference")


def test_convergence_compares_the_best_of_the_last_fifth_with_the_epoch_before_it(reference):
    curve = [0.1 * i for i in range(5)] + [0.70, 0.71, 0.704, 0.712, 0.709, 0.713]  # 11 epochs: window 2
    verdict = reference.convergence(curve, 0.005)
    assert verdict["window_epochs"] == 2 and verdict["gain"] == pytest.approx(0.713 - 0.712)
    assert verdict["converged"]
    assert not reference.convergence([*curve, 0.72], 0.005)["converged"]  # +0.008 over 0.712


def test_the_second_cycle_continues_the_history_on_unflipped_images_at_its_own_lr(reference, monkeypatch):
    fits = []

    def fit(model, train_set, **settings):
        fits.append(settings)
        n = settings["epochs"]
        return {"epoch": list(range(n)), "seconds": [1.0] * n, "metrics/map50": [0.8] * n}

    monkeypatch.setattr(reference, "fit", fit)
    args = types.SimpleNamespace(out="runs/t", epochs=3, lr=1e-3, seed=0, extend=2, extend_lr=1e-4)
    first = {"epoch": [0, 1, 2], "seconds": [5.0] * 3, "metrics/map50": [0.5, 0.6, 0.7], "lr": [1e-3] * 3}
    joined = reference.extend(args, object(), "plain images", "val images", first)
    assert joined == {
        "epoch": [0, 1, 2, 3, 4],
        "seconds": [5.0, 5.0, 5.0, 1.0, 1.0],
        "metrics/map50": [0.5, 0.6, 0.7, 0.8, 0.8],
    }
    (settings,) = fits
    assert settings["lr"] == 1e-4 and settings["warmup_epochs"] == 0.0 and settings["ema"]
    assert settings["out_dir"] == Path("runs/t/extend") and not settings["resume"]
