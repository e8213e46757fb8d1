"""benchmarks/bench_ultralytics.py without training: the base's convergence verdict, Ultralytics' results.csv,
when the shipped asset counts as the converged base, and the report over the seeds' measurements files (lists in
seed order, mean ± sd, gcp + GSA's paired differences ± SE, the targets, CPU and GPU seeds kept apart)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _benchmarks import load_benchmark

from gcp.io import file_sha256

CPU = "AMD EPYC (AVX512), 2 cores, 24 GiB RAM, torch 2.5, no GPU"
GPU = "NVIDIA H200 GPU, 16 cores, 128 GiB RAM, torch 2.5"


@pytest.fixture(scope="module")
def bench_module():
    return load_benchmark("bench_ultralytics")


# ------------------------------------------------------------------------------------------------- the base


def test_a_flat_last_fifth_is_converged(bench_module):
    curve = [0.10, 0.30, 0.45, 0.52, 0.56, 0.58, 0.59, 0.595, 0.597, 0.598]  # last fifth: 2 epochs
    verdict = bench_module.base_verdict(curve, epochs=10, threshold=0.005)
    assert verdict["converged"] and verdict["window_epochs"] == 2
    assert verdict["gain"] == pytest.approx(0.598 - 0.595)


def test_a_still_rising_curve_is_not_converged(bench_module):
    curve = [0.10, 0.30, 0.45, 0.50, 0.53, 0.55, 0.57, 0.58, 0.59, 0.60]
    verdict = bench_module.base_verdict(curve, epochs=10, threshold=0.005)
    assert not verdict["converged"] and verdict["gain"] == pytest.approx(0.60 - 0.58)


def test_an_unfinished_or_too_short_schedule_is_not_converged(bench_module):
    flat = [0.5] * 6
    verdict = bench_module.base_verdict(flat, epochs=10, threshold=0.005)  # 6 of 10 epochs run
    assert not verdict["converged"] and verdict["gain"] is None and verdict["why"] == "6 of 10 epochs run"
    assert not bench_module.base_verdict([0.5], epochs=1, threshold=0.005)["converged"]
    nothing = bench_module.base_verdict([0.0] * 10, epochs=10, threshold=0.005)  # flat, but never learnt
    assert not nothing["converged"] and nothing["why"] == "val mAP@0.5 never above 0"


def test_reads_ultralytics_results_csv(bench_module, tmp_path):
    path = tmp_path / "results.csv"
    header = (
        "epoch,time,train/box_loss,train/cls_loss,train/dfl_loss,metrics/precision(B),metrics/recall(B),"
        "metrics/mAP50(B),metrics/mAP50-95(B),val/box_loss,val/cls_loss,val/dfl_loss,lr/pg0,lr/pg1,lr/pg2"
    )
    rows = [
        "1,410.2,1.9,3.1,1.4,0.2,0.3,0.21,0.11,1.8,2.9,1.3,0.0007,0.0007,0.0007",
        "2,820.9,1.6,2.2,1.2,0.5,0.5,0.43,0.25,1.5,2.0,1.1,0.0006,0.0006,0.0006",
        "2,831.0,1.6,2.2,1.2,0.5,0.5,0.44,0.26,1.5,2.0,1.1,0.0006,0.0006,0.0006",  # resumed: epoch 2 again
        "3,1230.5,1.4,1.8,1.1,0.6,0.6,0.52,0.31,1.4,1.7,1.0,0.0005,0.0005,0.0005",
    ]
    path.write_text("\n".join([header, *rows]) + "\n")
    assert bench_module.read_results_csv(path) == {
        "epoch": [1, 2, 3],
        "map50": [0.21, 0.44, 0.52],
        "map": [0.11, 0.26, 0.31],
    }
    # older Ultralytics versions pad the header and values with spaces
    padded = tmp_path / "padded.csv"
    padded.write_text(
        "                  epoch,      metrics/mAP50(B),   metrics/mAP50-95(B)\n"
        "                      1,                 0.2,                  0.1\n"
    )
    assert bench_module.read_results_csv(padded) == {"epoch": [1], "map50": [0.2], "map": [0.1]}


def _places(module, tmp_path: Path):
    places = module.Places(tmp_path)
    places.asset = tmp_path / "yolov8n_digits.pt"
    places.asset.write_bytes(b"weights")
    places.results.mkdir(parents=True)
    return places


def test_the_asset_is_the_base_only_when_its_record_says_converged(bench_module, tmp_path):
    m = bench_module
    places = _places(m, tmp_path)
    assert not m.reusable_asset(places)  # no record: the asset trained by time before this rule
    record = {"converged": False, "asset_sha256": file_sha256(places.asset)}
    places.base_record.write_text(json.dumps(record))
    assert not m.reusable_asset(places)
    assert not m.reusable_asset(places, unconverged=True)  # judged, never shipped
    places.base_record.write_text(json.dumps({**record, "shipped": True}))
    assert not m.reusable_asset(places)  # shipped unconverged: only when the run says so
    assert m.reusable_asset(places, unconverged=True)
    places.base_record.write_text(json.dumps({**record, "converged": True}))
    assert m.reusable_asset(places)
    places.asset.write_bytes(b"other weights")  # not the asset the record judged
    assert not m.reusable_asset(places)


def test_a_gpu_run_names_its_gpu_in_the_machine_line(bench_module, monkeypatch):
    """--device cuda: the rows carry the GPU, so the report never averages them with CPU rows."""
    import common
    import torch

    assert common.machine().endswith("no GPU") and common.device_kind(common.machine()) == "cpu"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    line = common.machine("cuda")
    assert line.endswith("GPU NVIDIA H200") and common.device_kind(line) == "gpu"
    config = bench_module.config_text(
        Path("digits.yaml"), bench_module.parse_args(["--device", "cuda", "--workers", "4"])
    )
    assert "device: cuda\n" in config and "num_workers: 4}" in config
    with pytest.raises(SystemExit):  # auto would leave the machine line unsure whether a GPU trained
        bench_module.parse_args(["--device", "auto"])


# ---------------------------------------------------------------------------------------- the seeds together

# mAP@0.5 per row and seed: gcp + GSA − dense −0.01 / 0.00 (within 0.02: met), − gcp + FT +0.01 / +0.02 (under
# 0.03: missed), − slim + FT +0.10 / +0.09 and − torch-pruning +0.15 / +0.14 (met, SE 0.005)
SCORES = {
    0: {"gcp_gsa": 0.70, "gcp_ft": 0.69, "slim_ft": 0.60, "tp_magnitude_ft": 0.55, "dense": 0.71},
    1: {"gcp_gsa": 0.72, "gcp_ft": 0.70, "slim_ft": 0.63, "tp_magnitude_ft": 0.58, "dense": 0.72},
}


def _measurement(map50: float, cut: float, where: str, commit: str) -> dict:
    return {
        "map50": map50,
        "map": map50 / 2,
        "ultralytics_map50": map50 + 0.001,
        "ultralytics_map": map50 / 2,
        "params_cut": cut + 0.1,
        "macs_cut": cut,
        "ort_ms": 10.0,
        "commit": commit,
        "machine": where,
        "date": "2026-12-02 10:00 UTC",
    }


def _write_seeds(tmp_path: Path, machines=(CPU, CPU), scores=SCORES) -> Path:
    results = tmp_path / "results"
    results.mkdir(exist_ok=True)
    for (seed, rows), where in zip(scores.items(), machines):
        measured = {"base": _measurement(0.71, 0.0, where, f"c{seed}")}
        for key, value in rows.items():
            measured[key] = _measurement(value, 0.0 if key == "dense" else 0.40, where, f"c{seed}")
        payload = {
            "seed": seed,
            "rows": measured,
            "settings": {
                "epochs_sparse": 3,
                "epochs_recover": 3,
                "total_epochs": 6,
                "macs": 0.4,
                "base_sha256": "ab",
            },
            "wall_minutes": {"dense": 40.0, "eval": 10.0},
        }
        (results / f"ultralytics_cpu_measurements_seed{seed}.json").write_text(json.dumps(payload))
    (results / "ultralytics_cpu_measurements_seed0_old.json").write_text("{}")  # not a seed's file
    return results


def test_the_aggregate_has_lists_in_seed_order_and_paired_differences(bench_module, tmp_path):
    m = bench_module
    per_seed = m.seed_measurements(_write_seeds(tmp_path))
    assert list(per_seed) == [0, 1]
    payload = m.aggregate(per_seed)
    assert payload["seeds"] == [0, 1] and payload["teacher_map50"] == 0.71
    assert [(r["method"], r["recovery"]) for r in payload["rows"]] == [
        ("gcp", "gsa"),
        ("gcp", "ft"),
        ("slim", "ft"),
        ("tp_magnitude", "ft"),
        ("dense", "none"),
    ]
    gsa, dense = payload["rows"][0], payload["rows"][-1]
    assert gsa["map50"] == [0.70, 0.72] and gsa["map"] == [0.35, 0.36]
    assert gsa["map50_mean"] == pytest.approx(0.71) and gsa["map50_sd"] == pytest.approx(0.02 / 2**0.5)
    assert gsa["macs_cut"] == pytest.approx(0.40) and gsa["commit"] == ["c0", "c1"]
    assert dense["recovery"] == "none" and dense["macs_cut"] == 0.0 and dense["params_cut"] == 0.0
    slim = payload["rows"][2]["gsa_minus_row"]
    assert (slim["mean"], slim["se"], slim["n"]) == (pytest.approx(0.095), pytest.approx(0.005), 2)
    assert dense["gsa_minus_row"]["mean"] == pytest.approx(-0.005) and gsa["gsa_minus_row"] is None
    assert payload["commit"] == [["c0"], ["c1"]] and payload["machine"] == [[CPU], [CPU]]
    assert payload["minutes"] == [50.0, 50.0]
    assert m.seed_measurements(tmp_path / "results", [1])[1]["seed"] == 1
    assert list(m.seed_measurements(tmp_path / "results", [1])) == [1]


def test_a_target_met_and_a_target_missed(bench_module, tmp_path):
    m = bench_module
    payload = m.aggregate(m.seed_measurements(_write_seeds(tmp_path)))
    dense, peers = payload["targets"]
    assert dense["met"] is True and peers["met"] is False
    assert [(part["target"], part["met"]) for part in peers["parts"]] == [
        ("vs gcp + FT", False),
        ("vs slim + FT", True),
        ("vs torch-pruning L2 + FT", True),
    ]
    text = m.render(payload, m.seed_measurements(tmp_path / "results"))
    assert (
        "- gcp + GSA ≥ dense control − 0.02 mAP@0.5: met (mean paired difference -0.005 ± SE 0.005, n = 2)"
        in text
    )
    assert "  - vs gcp + FT: missed (mean paired difference +0.015 ± SE 0.005, n = 2)" in text
    assert "| gcp + GSA | 0.710 ± 0.014 (n = 2) | 0.700 / 0.720 | — |" in text
    assert "| slim + FT | 0.615 ± 0.021 (n = 2) | 0.600 / 0.630 | +0.095 ± 0.005 (n = 2) |" in text
    assert text.index("| gcp + GSA | 0.710") < text.index("### Seed 0")  # the aggregate leads


def test_one_seed_has_no_standard_error_and_decides_no_peer(bench_module, tmp_path):
    m = bench_module
    payload = m.aggregate(m.seed_measurements(_write_seeds(tmp_path), [0]))
    dense, peers = payload["targets"]
    assert dense["met"] is True  # a mean over one seed
    # no standard error from one pair: not decided, even below the margin (as bench_method)
    assert [part["met"] for part in peers["parts"]] == [None, None, None] and peers["met"] is None
    text = m.render(payload, m.seed_measurements(tmp_path / "results", [0]))
    assert "  - vs gcp + FT: not measured (mean paired difference +0.010 ± SE —, n = 1, no SE)" in text


def test_cpu_and_gpu_seeds_are_not_averaged(bench_module, tmp_path):
    m = bench_module
    per_seed = m.seed_measurements(_write_seeds(tmp_path, machines=(CPU, GPU)))
    payload = m.aggregate(per_seed)
    gsa = payload["rows"][0]
    assert gsa["mixed_devices"] and gsa["map50_mean"] is None and gsa["map50"] == [0.70, 0.72]
    assert all(
        row["gsa_minus_row"] is None or row["gsa_minus_row"]["mixed_devices"] for row in payload["rows"]
    )
    assert [target["met"] for target in payload["targets"]] == [None, None]
    text = m.render(payload, per_seed)
    assert "| gcp + GSA | not averaged: CPU and GPU seeds | 0.700 / 0.720 |" in text
    assert "Some seeds ran on a CPU and some on a GPU" in text
    assert "dense control − 0.02 mAP@0.5: not measured (CPU and GPU seeds are not averaged together)" in text


def test_the_report_writes_the_aggregate_json(bench_module, tmp_path, capsys):
    m = bench_module
    _write_seeds(tmp_path)
    places = m.Places(tmp_path)  # a scratch directory's: the repository's RESULTS.md is left alone
    payload = m.write_report(places, None)
    written = json.loads(places.aggregate.read_text())
    assert written["seeds"] == [0, 1] and written["rows"][0]["map50"] == [0.70, 0.72]
    assert written == json.loads(json.dumps(payload))
    assert f"## {m.TITLE}" in capsys.readouterr().out


def test_measurements_carry_the_commit_the_run_was_launched_at(bench_module, tmp_path, monkeypatch):
    """Hours pass between launch and the eval stage's record: a commit made meanwhile is not the code that ran."""
    m = bench_module
    monkeypatch.setattr(m, "git_revision", lambda: "launch1")
    bench = m.Bench(m.parse_args(["--seed", "0"]), tmp_path / "run", "config: same\n")
    monkeypatch.setattr(m, "git_revision", lambda: "later22")
    (tmp_path / "run" / "trained.pt").write_bytes(b"weights")
    (tmp_path / "run" / "dense.pt").write_bytes(b"weights")
    rows = [
        {"name": name, "map50": 0.5, "map": 0.3, "params": 10.0, "macs": 20.0, "median_ms": 1.0}
        for name in ("trained", "dense")
    ]
    (tmp_path / "run" / "report.json").write_text(json.dumps({"rows": rows}))
    results = m.record_measurements(bench, m.Places(tmp_path / "scratch"))
    assert {row["commit"] for row in results["rows"].values()} == {"launch1"}


def test_stage_1s_share_below_1e2_is_recorded_and_the_record_has_issue_25s_shape(bench_module, tmp_path):
    m = bench_module
    bench = m.Bench(m.parse_args(["--seed", "0"]), tmp_path / "run", "config: same\n")
    run = tmp_path / "run"
    for name in ("trained", "sparse", "pruned_gcp"):
        (run / f"{name}.pt").write_bytes(b"weights")
    final = {  # 2 of 4 and 3 of 12 channels below 1e-2: 5 / 16 of all, not the mean of the groups' shares
        "a": {"channels": 4, "sparse_fraction": 0.5},
        "b": {"channels": 12, "sparse_fraction": 0.25},
    }
    (run / "sparsity_history.json").write_text(json.dumps({"final": final}))
    rows = [
        {"name": name, "map50": score, "map": 0.3, "params": 10.0, "macs": 20.0, "median_ms": 1.0}
        for name, score in (("trained", 0.8), ("sparse", 0.7), ("pruned_gcp", 0.2))
    ]
    (run / "report.json").write_text(json.dumps({"rows": rows}))
    places = m.Places(tmp_path / "scratch")
    results = m.record_measurements(bench, places)
    assert results["rows"]["sparse"]["sparse_fraction"] == pytest.approx(5 / 16)
    payload = m.aggregate(m.seed_measurements(places.results))
    assert payload["sparse_fraction_below_1e-2"] == [pytest.approx(5 / 16)]
    assert payload["sparse_map50"] == [0.7] and payload["pruned_before_recovery_map50"] == [0.2]
    assert payload["sweep"] == [] and payload["recovery_lengths"] == []
    assert "Stage 1 per seed: 31.2% of γ below 1e-2, mAP@0.5 0.700" in m.render(payload, {0: results})


def test_each_groups_cut_under_gcp_and_slim_is_recorded_and_shown(bench_module, tmp_path):
    m = bench_module
    bench = m.Bench(m.parse_args(["--seed", "0"]), tmp_path / "run", "config: same\n")
    assert m.group_cuts(bench) == {}  # nothing pruned yet

    def layer(name, before, after):
        return {"name": name, "before": before, "after": after}

    groups = [{"name": "backbone_s8", "layers": ["a", "b"]}, {"name": "head", "layers": ["c"]}]
    reports = {
        "gcp": {"groups": groups, "layers": [layer("a", 8, 6), layer("b", 8, 8), layer("c", 4, 2)]},
        "slim": {"groups": [], "layers": [layer("a", 8, 8), layer("b", 8, 7), layer("c", 4, 1)]},
    }
    for method, report in reports.items():
        (tmp_path / "run" / f"prune_{method}.json").write_text(json.dumps(report))
    cuts = m.group_cuts(bench)  # by gcp's groups, for both methods
    assert cuts == {
        "backbone_s8": {"gcp": pytest.approx(2 / 16), "slim": pytest.approx(1 / 16)},
        "head": {"gcp": pytest.approx(0.5), "slim": pytest.approx(0.75)},
    }
    text = "\n".join(m.seed_lines(0, {"rows": {}, "group_cuts": cuts}))
    assert "channels removed, gcp / slim: backbone_s8 12.5% / 6.2%, head 50.0% / 75.0%." in text


def test_torch_prunings_rounds_share_the_rows_epochs(bench_module):
    assert bench_module.round_epochs(6, 3) == [2, 2, 2]
    assert bench_module.round_epochs(7, 3) == [2, 2, 3]
    assert bench_module.round_epochs(6, 1) == [6]
    assert [bench_module.tp_round_method(k, 3) for k in (1, 2, 3)] == ["tpl2_round1", "tpl2_round2", "tpl2"]
    for rounds in (0, 7):
        with pytest.raises(ValueError, match="--tp-rounds"):
            bench_module.round_epochs(6, rounds)


def test_torch_prunings_row_without_gcps_pruning_says_which_stage_to_run(bench_module, tmp_path):
    """The row removes the MACs share gcp achieved: without the prune stage's record it names that stage."""
    m = bench_module
    bench = m.Bench(m.parse_args(["--seed", "0"]), tmp_path / "run", "config: same\n")
    with pytest.raises(SystemExit, match="run the prune stage first"):
        m.stage_tp(bench)
    assert not any(path.name.startswith("pruned_") for path in (tmp_path / "run").iterdir())
