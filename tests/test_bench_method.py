"""benchmarks/bench_method.py splits across sessions: which models a later run must rebuild or score.

A session on a fresh checkout has the committed measurements but not the run directory's models; it must
rebuild exactly the chain that a missing row starts from, and nothing whose rows are all measured.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_method.py"


@pytest.fixture(scope="module")
def bench_module():
    sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("bench_method", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench(module, tmp_path: Path, measured: list[str], files: list[str]):
    bench = module.Bench.__new__(module.Bench)  # no data set: only the run directory and the measurements
    bench.out = tmp_path
    bench.results = {key: {"map50": 0.5} for key in measured}
    for name in files:
        (tmp_path / f"{name}.pt").write_bytes(b"")
    return bench


def test_everything_is_wanted_on_a_first_run(bench_module, tmp_path):
    bench = _bench(bench_module, tmp_path, [], [])
    for name in ("sparse", "dense_e1", "tp_sparse", "pruned_thinet", "thinet_ft", "gcp_gsa"):
        assert bench.wanted(name)


def _all_but_thinet_ft(module) -> list[str]:
    return [
        "sparse",
        "dense_e1",
        "dense_same_epochs",
        "tp_sparse",
        *(f"pruned_{m}" for m in module.METHODS),
        "gcp_gsa",
        *(f"{m}_ft" for m in module.METHODS if m != "thinet"),
    ]


def test_only_the_chain_of_a_missing_row_is_rebuilt(bench_module, tmp_path):
    # Every row measured but ThiNet's fine-tuning, and no model file left: ThiNet's pruned model and the
    # stage-1 model it is cut from are needed; torch-pruning's and the dense chain are not.
    bench = _bench(bench_module, tmp_path, _all_but_thinet_ft(bench_module), [])
    assert bench.wanted("thinet_ft") and bench.wanted("pruned_thinet") and bench.wanted("sparse")
    for name in (
        "dense_e1",
        "dense_same_epochs",
        "tp_sparse",
        "pruned_gcp",
        "pruned_tp_magnitude",
        "gcp_gsa",
    ):
        assert not bench.wanted(name), name


def test_a_model_file_that_is_there_is_not_rebuilt(bench_module, tmp_path):
    bench = _bench(bench_module, tmp_path, _all_but_thinet_ft(bench_module), ["pruned_thinet"])
    assert bench.wanted("thinet_ft")
    assert not bench.wanted("pruned_thinet") and not bench.wanted("sparse")
    (tmp_path / "pruned_thinet.pt").unlink()
    assert bench.wanted("pruned_thinet") and bench.wanted("sparse")


def test_a_model_file_without_its_measurement_is_scored(bench_module, tmp_path):
    bench = _bench(bench_module, tmp_path, [], ["dense_e1"])
    assert bench.wanted("dense_e1")
