"""benchmarks/bench_method.py splits across sessions: which models a later run must rebuild or score, and
what each measurement says about where it was made.

A session on a fresh checkout has the committed measurements but not the run directory's models; it must
rebuild exactly the chain that a missing row starts from, and nothing whose rows are all measured. Rows made at
different commits or on different machines are not silently presented as one run's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from _benchmarks import BENCHMARKS, load_benchmark

BENCH = BENCHMARKS / "bench_method.py"
# seed 0's measurements from the first teacher (0.616), kept beside the converged teacher's as a variant file
RECORDED = BENCH.parent / "results" / "method_cpu_measurements_seed0_teacher0616.json"


@pytest.fixture(scope="module")
def bench_module():
    return load_benchmark("bench_method")


def _bench(module, tmp_path: Path, measured: list[str], files: list[str], *options: str):
    bench = module.Bench(module.parse_args(["--out", str(tmp_path), *options]))  # no data set (load_data)
    bench.results.update({key: {"map50": 0.5} for key in measured})
    for name in files:
        (tmp_path / f"{name}.pt").write_bytes(b"")
    return bench


def test_everything_is_wanted_on_a_first_run(bench_module, tmp_path):
    bench = _bench(bench_module, tmp_path, [], [])
    for name in ("sparse", "dense_e1", "tp_sparse", "pruned_thinet", "thinet_ft", "gcp_gsa"):
        assert bench.wanted(name)


def _all_but_thinet_ft(module) -> list[str]:
    return [
        "teacher",
        "sparse",
        "sparse_constant",
        "table9_sparse_pruned",
        "table9_sparse_constant_pruned",
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


def test_rows_makes_only_the_rows_named_and_the_models_they_start_from(bench_module, tmp_path):
    m = bench_module
    assert m.lineage("lcp_ft") == ["lcp_ft", "pruned_lcp", "sparse"]
    assert m.lineage("dense_same_epochs") == ["dense_same_epochs", "dense_e1"]
    bench = _bench(m, tmp_path, [], [], "--rows", "lcp_ft", "dense_same_epochs")
    for name in ("lcp_ft", "pruned_lcp", "sparse", "dense_e1", "dense_same_epochs"):
        assert bench.wanted(name), name
    for name in ("pruned_gcp", "gcp_gsa", "slim_ft", "tp_sparse", "pruned_tp_magnitude", "sparse_constant"):
        assert not bench.wanted(name), name
    assert "rows" not in bench.settings  # what to run now, not how a row is measured


def test_rows_refuses_a_name_that_is_no_model(bench_module, capsys):
    with pytest.raises(SystemExit):
        bench_module.parse_args(["--rows", "lcp_fine_tuned"])
    assert "unknown rows ['lcp_fine_tuned']" in capsys.readouterr().err


def test_a_model_file_without_its_measurement_is_scored(bench_module, tmp_path):
    bench = _bench(bench_module, tmp_path, [], ["dense_e1"])
    assert bench.wanted("dense_e1")


# ------------------------------------------------------------------------------------------------- LCP's rows


def test_lcp_is_pruned_from_the_stage1_model_and_fine_tuned_like_the_others(bench_module, tmp_path):
    m = bench_module
    assert m.source_of("pruned_lcp") == m.source_of("pruned_thinet") == "sparse"
    assert m.source_of("lcp_ft") == "pruned_lcp"
    assert {"pruned_lcp.pt", "lcp_ft.pt"} <= m.RUN_FILES  # --fresh clears them
    # Every row measured but LCP's fine-tuning, and no model file left: LCP's chain alone is rebuilt.
    measured = [k for k in _all_but_thinet_ft(m) if k != "lcp_ft"] + ["thinet_ft"]
    bench = _bench(m, tmp_path, measured, [])
    assert bench.wanted("lcp_ft") and bench.wanted("pruned_lcp") and bench.wanted("sparse")
    for name in ("pruned_thinet", "dense_e1", "tp_sparse", "pruned_tp_magnitude", "gcp_gsa"):
        assert not bench.wanted(name), name


class _Stop(Exception):
    pass


def _labelled_train_split(n: int = 40) -> list:
    import torch

    generator = torch.Generator().manual_seed(0)
    return [
        (
            torch.rand(3, 8, 8, generator=generator),
            {"boxes": torch.tensor([[0.0, 0.0, float(i % 7 + 1), 4.0]]), "labels": torch.tensor([i % 3])},
        )
        for i in range(n)
    ]


def test_lcp_prunes_sparse_at_the_same_macs_on_thinets_calibration_images_with_their_boxes(
    bench_module, tmp_path, monkeypatch
):
    m = bench_module
    split = _labelled_train_split()
    monkeypatch.setattr(m, "VOCDataset", lambda root, name, size: split if name == "train" else None)
    loaded, calls = [], {}
    monkeypatch.setattr(m, "load_model", lambda path: loaded.append(Path(path).name) or object())

    def prune_detector(model, example, **options):
        calls[options["method"]] = options
        raise _Stop

    monkeypatch.setattr(m.gcp, "prune_detector", prune_detector)
    measured = [k for k in _all_but_thinet_ft(m) if k != "pruned_lcp"] + ["thinet_ft"]
    bench = _bench(m, tmp_path, measured, ["sparse"], "--allow-mixed")  # rows without provenance
    with pytest.raises(_Stop):
        m.prune_stage(bench)  # gcp, slim and thinet are measured: only lcp is pruned
    assert loaded == ["sparse.pt"] and set(calls) == {"lcp"}
    with pytest.raises(_Stop):
        m.prune_with(bench, "thinet", tmp_path / "sparse.pt")
    lcp, thinet = calls["lcp"], calls["thinet"]
    assert {k: v for k, v in lcp.items() if k not in ("method", "calib_data")} == {
        k: v for k, v in thinet.items() if k not in ("method", "calib_data")
    }
    assert lcp["ratio"] == bench.args.macs and lcp["budget"] == "macs"
    assert len(lcp["calib_data"]) == len(thinet["calib_data"]) == 4
    for (images, targets), thinet_images in zip(lcp["calib_data"], thinet["calib_data"]):
        assert images.equal(thinet_images) and len(targets) == len(images)
    flat = [target for _images, targets in lcp["calib_data"] for target in targets]
    assert all(t is split[i][1] for i, t in enumerate(flat))  # each image's own boxes and labels


def test_lcp_ft_fine_tunes_pruned_lcp_for_the_recovery_epochs(bench_module, tmp_path, monkeypatch):
    from torch import nn

    m = bench_module
    measured = [k for k in _all_but_thinet_ft(m) if k != "lcp_ft"] + ["thinet_ft"]
    bench = _bench(m, tmp_path, measured, [], "--allow-mixed")  # rows without provenance
    (tmp_path / "pruned_lcp.pt").write_bytes(b"")
    loaded, trained = [], []
    monkeypatch.setattr(m, "load_model", lambda path: loaded.append(Path(path).name) or nn.Identity())
    monkeypatch.setattr(m, "save_pruned_like", lambda *args: None)
    monkeypatch.setattr(
        bench,
        "train_model",
        lambda model, key, stage, hooks: trained.append((key, stage, hooks)) or (model, 2.0),
    )
    monkeypatch.setattr(
        bench, "measure", lambda model: {"map50": 0.4, "map": 0.2, "macs": 1.0, "params": 1.0}
    )
    m.recover_stage(bench)
    assert loaded == ["pruned_lcp.pt"] and trained == [("lcp_ft", "recover", [])]  # as thinet_ft: plain FT
    assert bench.results["lcp_ft"]["train_minutes"] == 2.0


def test_lcp_rows_are_in_the_report(bench_module, tmp_path):
    bench = _bench(bench_module, tmp_path, [], [])
    row = {"map50": 0.5, "map": 0.25, "macs": 1.0, "params": 1.0}
    for method, ft in (("thinet", 0.55), ("lcp", 0.56)):
        bench.results[f"pruned_{method}"] = {**row, "params_cut": 0.3, "macs_cut": 0.4}
        bench.results[f"{method}_ft"] = {**row, "map50": ft, "train_minutes": 1.0}
    bench_module.write_report(bench)
    rows = json.loads((tmp_path / "method_cpu.json").read_text())["rows"]
    assert [(r["method"], r["recovery"]) for r in rows] == [("thinet", "ft"), ("lcp", "ft")]
    assert set(rows[1]) == set(rows[0]) and rows[1]["map50"] == [0.56] and rows[1]["macs_cut"] == 0.4
    text = (tmp_path / "RESULTS_section.md").read_text()
    assert "| lcp, pruned, before recovery | 0.500 | 0.250 | 30.0% | 40.0% | — |" in text
    assert "| **lcp + FT** | 0.560 | 0.250 | 30.0% | 40.0% | — |" in text


def test_lcps_ranking_time_is_recorded_and_reported(bench_module, tmp_path):
    m = bench_module
    report = {"lcp": {"seconds": {"a.conv": 1.5, "b.conv": 4.0, "c.conv": 2.5}, "total_seconds": 8.0}}
    cost = m.lcp_cost(report)
    assert cost == {"lcp_seconds": 8.0, "lcp_layers": 3, "lcp_slowest": ["b.conv", 4.0]}
    assert m.lcp_cost({"groups": []}) == {}
    bench = _bench(m, tmp_path, [], [])
    bench.results["pruned_lcp"] = {
        "map50": 0.1,
        "map": 0.05,
        "macs": 1.0,
        "params": 1.0,
        "params_cut": 0.3,
        "macs_cut": 0.4,
        **cost,
    }
    m.write_report(bench)
    text = (tmp_path / "RESULTS_section.md").read_text()
    assert "LCP's channel ranking took 8 s for its 3 layers" in text and "`b.conv` at 4.0 s" in text


# ------------------------------------------------------------------------------------------ Table 9's model


def test_table9_prunes_this_runs_stage1_model_rebuilt_if_gone(bench_module, tmp_path, capsys):
    # Its dynamic row must prune this run's stage-1 model, not the shipped gcp/assets/digits_sparse.pt (an
    # earlier run's, 27.8 % zeros / 0.484 against this run's 28.8 % / 0.504): a missing row rebuilds it.
    measured = [k for k in _all_but_thinet_ft(bench_module) if k != "table9_sparse_pruned"] + ["thinet_ft"]
    bench = _bench(bench_module, tmp_path, measured, [])
    assert bench.wanted("sparse") and not bench.wanted("sparse_constant")
    bench_module.table9_stage(bench)  # sparse.pt is not there: skipped, nothing else pruned instead
    assert "table9_sparse_pruned" not in bench.results
    assert "sparse.pt is not there yet" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- provenance


def _provenance(commit: str, machine: str) -> dict:
    return {"commit": commit, "machine": machine, "date": "2026-12-01 10:00 UTC", "settings": {}}


def test_every_measurement_records_the_commit_machine_date_and_settings_it_was_made_with(
    bench_module, tmp_path
):
    from common import git_revision, machine

    bench = _bench(bench_module, tmp_path, [], [], "--epochs-recover", "4")
    bench.record("teacher", {"map50": 0.6, "map": 0.3, "macs": 1.0, "params": 1.0})
    stored = json.loads((tmp_path / "measurements.json").read_text())["teacher"]["provenance"]
    assert set(stored) == {"commit", "machine", "date", "settings"}
    assert (stored["commit"], stored["machine"]) == (git_revision(), machine())
    assert stored["settings"]["epochs_recover"] == 4 and "out" not in stored["settings"]


@pytest.mark.parametrize(
    "earlier",
    [_provenance("0ld0ld0", "HERE"), _provenance("HEAD", "another CPU (AVX2)"), None],
    ids=["other commit", "other machine", "not recorded"],
)
def test_rows_from_elsewhere_are_added_to_only_with_allow_mixed(bench_module, tmp_path, earlier):
    from common import git_revision, machine

    bench = _bench(bench_module, tmp_path, [], [])
    here = {"HEAD": git_revision(), "HERE": machine()}
    if earlier is not None:
        earlier = {k: here.get(v, v) if k in ("commit", "machine") else v for k, v in earlier.items()}
    bench.results["teacher"] = {"map50": 0.6, **({"provenance": earlier} if earlier else {})}
    with pytest.raises(SystemExit, match="measured elsewhere .*--allow-mixed"):
        bench.record("sparse", {"map50": 0.5})
    with pytest.raises(SystemExit, match="--allow-mixed"):  # before any training, not after it
        bench.train_model(None, "sparse", "sparse")
    assert "sparse" not in bench.results

    bench.args.allow_mixed = True
    bench.record("sparse", {"map50": 0.5})
    assert [source["rows"] for source in bench_module.sources(bench.results)] == [["teacher"], ["sparse"]]


def test_the_report_shows_each_rows_own_commit_and_machine(bench_module, tmp_path):
    from common import git_revision

    bench = _bench(bench_module, tmp_path, [], [])
    bench.results["teacher"] = {"map50": 0.6, "map": 0.3, "provenance": _provenance("aaaaaaa", "CPU one")}
    bench.results["sparse"] = {"map50": 0.5, "map": 0.2, "provenance": _provenance("bbbbbbb", "CPU two")}
    bench_module.write_report(bench)
    text = (tmp_path / "RESULTS_section.md").read_text()
    assert "- 1: commit aaaaaaa on CPU one" in text and "- 2: commit bbbbbbb on CPU two" in text
    # the paper's original network and its sparse-trained one (§5.4), beside ours
    assert "| teacher (shipped) | 0.600 | 0.300 | — | — | 87.1 | 1 |" in text
    assert "of γ < 1e-2 | 0.500 | 0.200 | — | — | 79.8 | 2 |" in text
    assert git_revision() not in text  # the report's own commit is no row's


def test_recorded_rows_without_provenance_are_labelled_so(bench_module, tmp_path):
    from common import git_revision

    bench = _bench(bench_module, tmp_path, [], [])
    bench.results = json.loads(RECORDED.read_text())
    bench_module.write_report(bench)
    text = (tmp_path / "RESULTS_section.md").read_text()
    assert "- ?: provenance not recorded per row" in text and git_revision() not in text
    seed0 = text.split("### Seed 0")[1]  # the seed's own table, after the aggregate one
    table = [line for line in seed0.splitlines() if line.startswith("| ") and "model" not in line]
    assert len(table) == 16 and all(line.endswith("| ? |") for line in table)
    # That run did not record its setup: 133.9 min of stages is not the whole command's time.
    assert "setup (data generation) not recorded" in text
    assert "the whole command ≤ 150 min (wall: setup and every stage): not known (133.9 min" in text


# -------------------------------------------------------------------------------------------- wall minutes


def test_setup_minutes_count_in_the_whole_command(bench_module, tmp_path):
    bench = _bench(bench_module, tmp_path, [], [])
    bench._tick -= 120  # the data generation took two minutes
    bench.begin_stage("teacher")
    bench.record("teacher", {"map50": 0.6})
    assert bench.results["wall_minutes"]["setup"] == pytest.approx(2.0, abs=0.05)
    assert bench_module.whole_command_line({"setup": 10.0, "recover": 141.0}).endswith("MISSED (151.0 min)")


def test_a_partial_command_does_not_meet_the_time_target(bench_module):
    """120 minutes with rows still to run is a lower bound: it can miss the target, never meet it."""
    partial = bench_module.whole_command_line({"setup": 1.0, "recover": 119.0}, ["lcp_ft"])
    assert partial.endswith("not known (120.0 min for the stages; not run yet: lcp_ft)")
    over = bench_module.whole_command_line({"setup": 1.0, "recover": 159.0}, ["lcp_ft"])
    assert over.endswith("MISSED (160.0 min)")


def test_the_opt_in_stages_are_not_part_of_the_whole_command(bench_module):
    """``--stages lengths`` (or sweep) is another command: its minutes do not count against the default one's."""
    line = bench_module.whole_command_line({"setup": 1.0, "recover": 140.0, "lengths": 20.8, "sweep": 200.0})
    assert (
        line
        == "- the whole command ≤ 150 min (wall: setup and every stage), not the opt-in lengths, sweep: met (141.0 min)"
    )


def test_a_session_that_measures_nothing_adds_no_wall_minutes(bench_module, tmp_path):
    bench = _bench(bench_module, tmp_path, [], [])
    bench.record("teacher", {"map50": 0.6})
    recorded = json.loads((tmp_path / "measurements.json").read_text())["wall_minutes"]
    again = _bench(bench_module, tmp_path, [], [])  # the report alone, run again later
    again._tick -= 60
    again.begin_stage("report")
    again.tick()
    assert json.loads((tmp_path / "measurements.json").read_text())["wall_minutes"] == recorded


# ------------------------------------------------------------------------------------------- starting over


def _earlier_run(folder: Path) -> None:
    (folder / "fits" / "sparse").mkdir(parents=True)
    (folder / "fits" / "sparse" / "last.pt").write_bytes(b"finished fit")
    (folder / "sparse.pt").write_bytes(b"model")
    (folder / ".pruned_gcp.pt.k2j_x9ab.tmp").write_bytes(b"half a model")  # an atomic write a kill stopped


def test_fresh_clears_the_run_directory_and_the_measurements(bench_module, tmp_path):
    _earlier_run(tmp_path)
    (tmp_path / "measurements.json").write_text(json.dumps({"teacher": {"map50": 0.6}}))
    bench = _bench(bench_module, tmp_path, [], [], "--fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["measurements.json"]
    assert set(bench.results) == {"settings"}


def test_fresh_refuses_a_directory_bench_method_did_not_make(bench_module, tmp_path):
    _earlier_run(tmp_path)
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(SystemExit, match="notes.txt, which bench_method does not write"):
        _bench(bench_module, tmp_path, [], [], "--fresh")
    assert (tmp_path / "notes.txt").is_file() and (tmp_path / "sparse.pt").is_file()


def test_models_whose_measurements_are_gone_are_not_resumed_as_new_ones(bench_module, tmp_path):
    _earlier_run(tmp_path)  # "delete the measurements file to start over"
    with pytest.raises(SystemExit, match="measurements .* are gone: .*--fresh"):
        _bench(bench_module, tmp_path, [], [])


# ---------------------------------------------------------------------------------------------- bad files


def test_a_truncated_training_checkpoint_ends_the_run_in_one_line(bench_module, tmp_path):
    from _train_toys import ToyDetection

    bench = _bench(bench_module, tmp_path, [], [])
    bench.train = ToyDetection(2)
    fit_dir = tmp_path / "fits" / "dense_e1"
    fit_dir.mkdir(parents=True)
    (fit_dir / "last.pt").write_bytes(b"PK\x03\x04" + bytes(600))  # a copy a kill cut short
    (fit_dir / "history.json").write_text(json.dumps({"seconds": [60.0]}))
    with pytest.raises(SystemExit) as stop:
        bench_module.run_stages(bench, ["dense"])
    message = str(stop.value.code)
    assert message.startswith(
        f"bench_method: error: {fit_dir / 'last.pt'}: cannot read the training checkpoint"
    )
    assert "\n" not in message


# ------------------------------------------------------------------------------------ seeds together (issue 25)

CPU = "CPU A (AVX512), 2 cores, 8 GiB RAM, torch 2.5, no GPU"
#: mAP@0.5 per seed (0, 1, 2) of each measurement; None: that seed lacks it (thinet_ft on seed 2).
SEEDED = {
    "teacher": (0.616, 0.616, 0.616),
    "sparse": (0.60, 0.59, 0.61),
    "pruned_gcp": (0.58, 0.57, 0.57),
    "pruned_slim": (0.50, 0.50, 0.50),
    "pruned_thinet": (0.40, 0.40, 0.40),
    "gcp_gsa": (0.60, 0.62, 0.64),
    "gcp_ft": (0.59, 0.60, 0.63),
    "slim_ft": (0.55, 0.58, 0.58),
    "thinet_ft": (0.50, 0.54, None),
    "dense_same_epochs": (0.62, 0.64, 0.65),
}
FRACTIONS = (0.45, 0.42, 0.39)


def _seed_file(folder: Path, seed: int, machine: str = CPU) -> None:
    results = {
        "settings": {"seed": seed, "epochs_recover": 3, "max_steps": None},
        "wall_minutes": {"sparse": 10.0},
    }
    for key, values in SEEDED.items():
        if values[seed] is not None:
            row = {
                "map50": values[seed],
                "map": values[seed] / 2,
                "provenance": _provenance(f"c0mmit{seed}", machine),
            }
            results[key] = row
    results["sparse"]["sparse_fraction"] = FRACTIONS[seed]
    for method in ("gcp", "slim", "thinet"):
        results[f"pruned_{method}"].update({"params_cut": 0.3 + 0.01 * seed, "macs_cut": 0.4})
    (folder / f"method_cpu_measurements_seed{seed}.json").write_text(json.dumps(results))


def _seeded_report(module, folder: Path, *options: str, machines: tuple = (CPU, CPU, CPU)):
    """Write a measurements file per seed, measured on ``machines`` (none: keep the folder's), and report."""
    for seed, machine in enumerate(machines):
        _seed_file(folder, seed, machine)
    (folder / "method_cpu_measurements_seed0_recover3_avx2.json").write_text("{}")  # a variant: not a seed
    bench = module.Bench(module.parse_args(["--out", str(folder), *options]))
    module.write_report(bench)
    payload = json.loads((folder / "method_cpu.json").read_text())
    return payload, (folder / "RESULTS_section.md").read_text()


def test_the_report_aggregates_every_seeds_measurements_file(bench_module, tmp_path):
    payload, _ = _seeded_report(bench_module, tmp_path)
    assert list(payload) == [
        "teacher_map50",
        "seeds",
        "rows",
        "sparse_map50",
        "sparse_fraction_below_1e-2",
        "pruned_before_recovery_map50",
        "sweep",
        "sweep_latency",
        "recovery_lengths",
        "commit",
        "machine",
        "minutes",
    ]
    assert payload["seeds"] == [0, 1, 2] and payload["teacher_map50"] == 0.616
    rows = {(row["method"], row["recovery"]): row for row in payload["rows"]}
    assert list(rows) == [("gcp", "gsa"), ("gcp", "ft"), ("slim", "ft"), ("thinet", "ft"), ("dense", "none")]
    for row in payload["rows"]:
        assert set(row) == {"method", "recovery", "params_cut", "macs_cut", "map50", "map", "commit"}
        assert len(row["map50"]) == len(row["map"]) == len(row["commit"]) == 3
    assert rows[("gcp", "gsa")]["map50"] == [0.60, 0.62, 0.64]
    assert rows[("gcp", "gsa")]["commit"] == ["c0mmit0", "c0mmit1", "c0mmit2"]
    assert rows[("thinet", "ft")]["map50"] == [0.50, 0.54, None]  # seed 2 lacks it
    assert rows[("thinet", "ft")]["commit"] == ["c0mmit0", "c0mmit1", None]
    assert (
        rows[("gcp", "gsa")]["params_cut"] == pytest.approx(0.31) and rows[("dense", "none")]["macs_cut"] == 0
    )
    assert payload["sparse_map50"] == [0.60, 0.59, 0.61] and payload["sparse_fraction_below_1e-2"] == [
        0.45,
        0.42,
        0.39,
    ]
    assert payload["pruned_before_recovery_map50"] == [0.58, 0.57, 0.57]
    assert payload["sweep"] == [] and payload["sweep_latency"] is None and payload["recovery_lengths"] == []
    assert payload["commit"] == [["c0mmit0"], ["c0mmit1"], ["c0mmit2"]] and payload["machine"] == [[CPU]] * 3
    assert payload["minutes"] == [10.0, 10.0, 10.0]


def test_seeds_chooses_the_seeds(bench_module, tmp_path):
    payload, text = _seeded_report(bench_module, tmp_path, "--seeds", "0", "2")
    assert payload["seeds"] == [0, 2] and payload["rows"][0]["map50"] == [0.60, 0.64]
    assert "### Seed 1" not in text and "### Seed 2" in text


def test_mean_sd_and_paired_differences_by_hand(bench_module, tmp_path):
    m = bench_module
    mean, sd, n = m.mean_sd([0.60, 0.62, None, 0.64])
    assert (mean, sd, n) == (pytest.approx(0.62), pytest.approx(0.02), 3)
    assert m.mean_sd([0.5]) == (0.5, None, 1) and m.mean_sd([None]) == (None, None, 0)
    d, se, n = m.paired([0.60, 0.62, 0.64], [0.55, 0.58, 0.58])  # differences 0.05, 0.04, 0.06
    assert (d, se, n) == (pytest.approx(0.05), pytest.approx(0.01 / 3**0.5), 3)
    d, se, n = m.paired([0.60, 0.62, 0.64], [0.50, 0.54, None])  # 0.10, 0.08: sd 0.01414, SE 0.01
    assert (d, se, n) == (pytest.approx(0.09), pytest.approx(0.01), 2)
    _, text = _seeded_report(m, tmp_path)
    assert "| gcp + GSA | 0.620 ± 0.020 (n = 3) | 0.600 / 0.620 / 0.640 | — | 40.0% |" in text
    assert (
        "| slim + FT | 0.570 ± 0.017 (n = 3) | 0.550 / 0.580 / 0.580 | +0.050 ± 0.006 (n = 3) | 40.0% |"
        in text
    )
    assert (
        "| thinet + FT | 0.520 ± 0.028 (n = 2) | 0.500 / 0.540 / — | +0.090 ± 0.010 (n = 2) | 40.0% |" in text
    )
    assert (
        "| dense control, same epochs | 0.637 ± 0.015 (n = 3) | 0.620 / 0.640 / 0.650 | -0.017 ± 0.003 (n = 3) | 0.0% |"
        in text
    )
    assert text.index("| gcp + GSA | 0.620") < text.index("### Seed 0")  # the aggregate leads


def test_issue25_verdicts(bench_module, tmp_path):
    _, text = _seeded_report(bench_module, tmp_path)
    expected = [
        "- stage 1: ≥ 40 % of γ < 1e-2, ≤ 0.03 mAP@0.5 lost, pruning cost ≤ 0.03 before recovery: met"
        " (42.0% of γ < 1e-2, 0.016 lost, pruning cost 0.027; n = 3)",
        "- gcp + GSA ≥ dense control − 0.02: met (mean paired difference -0.017 ± SE 0.003, n = 3)",
        "- gcp + GSA ≥ every other pruned row + 0.03, mean paired difference > 2 × SE: missed",
        "  - vs gcp + FT: missed (mean paired difference +0.013 ± SE 0.003, n = 3)",
        "  - vs slim + FT: met (mean paired difference +0.050 ± SE 0.006, n = 3)",
        "  - vs thinet + FT: met (mean paired difference +0.090 ± SE 0.010, n = 2)",
        "- GSA ≥ FT at each recovery length (30 steps, 1 epoch, 3 epochs): not measured",
        "  - at 30 steps: not measured",
        "  - at 1 epoch (94 steps): not measured",
        "  - at 3 epochs (282 steps): met (mean paired difference +0.013 ± SE 0.003, n = 3)",
    ]
    lines = text.splitlines()
    start = lines.index("Issue 25's targets (means over the seeds; pairs on the same seed):")
    assert lines[start + 1 : start + 1 + len(expected)] == expected


def test_a_pair_measured_on_one_seed_has_no_standard_error_and_is_not_decided(bench_module, tmp_path):
    payload, text = _seeded_report(bench_module, tmp_path, "--seeds", "0")
    assert "  - vs slim + FT: not measured (mean paired difference +0.050 ± SE —, n = 1, no SE)" in text
    assert "| gcp + GSA | 0.600 ± — (n = 1) |" in text


def test_seeds_from_other_machines_are_named_and_cpu_and_gpu_are_not_averaged(bench_module, tmp_path):
    other = "CPU B (AVX2), 2 cores, 8 GiB RAM, torch 2.5, no GPU"
    _, text = _seeded_report(bench_module, tmp_path, machines=(CPU, CPU, other))
    assert f"- seed 2: {other}; commit c0mmit2" in text
    assert "**The seeds were measured on 2 different machines" in text
    assert "| gcp + GSA | 0.620 ± 0.020 (n = 3) |" in text  # CPUs: averaged, and said so

    gpu = "NVIDIA H200 GPU, 16 cores, 128 GiB RAM, torch 2.5"
    _, text = _seeded_report(bench_module, tmp_path, machines=(CPU, CPU, gpu))
    assert "Some seeds ran on a CPU and some on a GPU" in text
    assert "| gcp + GSA | not averaged: CPU and GPU seeds | 0.600 / 0.620 / 0.640 |" in text
    # thinet + FT lacks seed 2 (the GPU one): its two CPU seeds are averaged, and paired
    assert "| thinet + FT | 0.520 ± 0.028 (n = 2) | 0.500 / 0.540 / — | +0.090 ± 0.010 (n = 2) |" in text
    assert (
        "- gcp + GSA ≥ dense control − 0.02: not measured (CPU and GPU seeds are not averaged together)"
        in text
    )


def test_the_recorded_seed0_measurements_still_render(bench_module, tmp_path):
    import shutil

    shutil.copy(RECORDED, tmp_path / "method_cpu_measurements_seed0.json")
    bench = bench_module.Bench(bench_module.parse_args(["--out", str(tmp_path), "--seed", "7"]))
    bench_module.write_report(bench)  # seed 7 measured nothing: seed 0's file alone
    payload = json.loads((tmp_path / "method_cpu.json").read_text())
    assert payload["seeds"] == [0] and payload["machine"] == [[None]] and payload["commit"] == [[None]]
    assert payload["rows"][0]["map50"] == [pytest.approx(0.6293, abs=1e-4)]
    text = (tmp_path / "RESULTS_section.md").read_text()
    assert "- seed 0: machine not recorded per row; commit not recorded per row" in text
    assert "### Seed 0" in text and "| **gcp + GSA** | 0.629 |" in text
    # Tables 3–5, Model2: each pruning method's paper value sits in its own row
    assert re.search(r"\| \*\*gcp \+ GSA\*\* \|[^\n]*\| 86\.6 \|", text)
    assert re.search(r"\| \*\*slim \+ FT\*\* \|[^\n]*\| 79\.8 \|", text)


# -------------------------------------------------------------------------- issue 25's sweep and lengths


def test_the_opt_in_stages_models_are_wanted_only_when_their_stage_runs(bench_module, tmp_path):
    m = bench_module
    measured = [*_all_but_thinet_ft(m), "thinet_ft"]
    assert "sweep" not in m.DEFAULT_STAGES and "lengths" not in m.DEFAULT_STAGES
    plain = _bench(m, tmp_path, measured, [])
    assert not plain.wanted("sparse") and not plain.wanted("pruned_gcp") and not plain.wanted("dense_e1")
    sweep = _bench(m, tmp_path / "s2", measured, [], "--seed", "2", "--stages", "sparse", "dense", "sweep")
    assert sweep.wanted("sparse") and sweep.wanted("dense_e1") and sweep.wanted("sweep30_pruned_tp_magnitude")
    assert (
        m.source_of("sweep60_pruned_slim") == "sparse"
        and m.source_of("sweep60_slim_ft") == "sweep60_pruned_slim"
    )
    assert not sweep.makes("sweep40_gcp_gsa")  # --macs 0.4: the main rows
    other_seed = _bench(m, tmp_path / "s1", measured, [], "--seed", "1", "--stages", "sweep")
    assert not other_seed.wanted("sparse")  # the sweep is seed 2's
    lengths = _bench(m, tmp_path / "l", measured, [], "--stages", "lengths")
    assert lengths.wanted("pruned_gcp") and not lengths.wanted("dense_e1")
    assert m.opt_in_keys(lengths.args) >= {"length30_gcp_gsa", "length94_gcp_ft"}
    assert not lengths.makes("length282_gcp_gsa")  # 3 epochs: gcp_gsa and gcp_ft themselves
    assert {"sweep50_pruned_gcp.pt", "sweep50_gcp_gsa.pt", "length30_gcp_ft.pt"} <= m.RUN_FILES


def test_the_sweep_prunes_and_recovers_its_rows_at_the_other_shares(bench_module, tmp_path, monkeypatch):
    m = bench_module
    calls = []
    monkeypatch.setattr(
        m, "prune", lambda bench, key, method, macs: calls.append(("prune", key, method, macs))
    )
    monkeypatch.setattr(m, "recover", lambda bench, key, recovery: calls.append(("recover", key, recovery)))
    m.sweep_stage(_bench(m, tmp_path, [], [], "--seed", "2", "--stages", "sweep"))
    assert [c for c in calls if c[0] == "prune"] == [
        ("prune", f"sweep{p}_pruned_{method}", method, macs)
        for p, macs in ((30, 0.3), (50, 0.5), (60, 0.6))
        for method in ("gcp", "slim", "tp_magnitude")
    ]
    assert ("recover", "sweep30_gcp_gsa", "gsa") in calls and (
        "recover",
        "sweep60_tp_magnitude_ft",
        "ft",
    ) in calls


def test_the_sweep_is_one_seeds_alone(bench_module, tmp_path, monkeypatch, capsys):
    m = bench_module
    calls = []
    monkeypatch.setattr(m, "prune", lambda *args: calls.append(args))
    monkeypatch.setattr(m, "recover", lambda *args: calls.append(args))
    bench = _bench(m, tmp_path, [], [], "--seed", "1", "--stages", "sweep")
    m.sweep_stage(bench)
    assert calls == [] and "measured on seed 2 only" in capsys.readouterr().out
    assert not bench.makes("sweep30_pruned_gcp")


def test_the_sweep_times_the_teacher_and_its_pruned_models_together_once(bench_module, tmp_path, monkeypatch):
    m = bench_module
    bench = _bench(m, tmp_path, [], ["pruned_gcp", "sweep30_pruned_gcp", "sweep60_pruned_slim"])
    timed = []

    def compare_latency(models, shape, folder, **options):
        timed.append((sorted(models), options["threads"]))
        return [{"name": n, "median_ms": 1.0, "p10_ms": 0.9, "p90_ms": 1.1, "gmacs": 0.5} for n in models]

    monkeypatch.setattr(m, "compare_latency", compare_latency)
    monkeypatch.setattr(m, "load_model", lambda path: __import__("torch").nn.Identity())
    m.time_sweep(bench)
    assert timed == [(["pruned_gcp", "sweep30_pruned_gcp", "sweep60_pruned_slim", "teacher"], 2)]
    record = json.loads(bench.results_path.read_text())["sweep_latency"]
    assert set(record["rows"]) == {"teacher", "pruned_gcp", "sweep30_pruned_gcp", "sweep60_pruned_slim"}
    assert record["provenance"]["machine"] == bench.machine
    assert "sweep_latency" not in m.measurements(bench.results)  # not a row of the tables
    m.time_sweep(bench)  # every model here is timed: not again
    assert len(timed) == 1
    (tmp_path / "sweep50_pruned_tp_magnitude.pt").write_bytes(b"")
    m.time_sweep(bench)  # one more: all of them anew, together
    assert len(timed) == 2 and "sweep50_pruned_tp_magnitude" in timed[1][0]


def test_the_lengths_stage_recovers_gcp_for_30_steps_and_one_epoch(bench_module, tmp_path, monkeypatch):
    from torch import nn

    m = bench_module
    bench = _bench(m, tmp_path, [], ["pruned_gcp"], "--stages", "lengths")

    class Distiller:
        log = type("Log", (), {"history": []})()

        def __init__(self, *args):
            pass

        def close(self):
            pass

    trained = []
    monkeypatch.setattr(m, "GroupAttentionDistiller", Distiller)
    monkeypatch.setattr(m, "load_model", lambda path: nn.Identity())
    monkeypatch.setattr(m, "save_pruned_like", lambda *args: None)
    monkeypatch.setattr(
        bench,
        "train_model",
        lambda model, key, stage, hooks, **length: trained.append((key, length)) or (model, 1.0),
    )
    monkeypatch.setattr(
        bench, "measure", lambda model: {"map50": 0.4, "map": 0.2, "macs": 1.0, "params": 1.0}
    )
    m.lengths_stage(bench)
    assert trained == [
        ("length30_gcp_gsa", {"epochs": 1, "max_steps": 30}),
        ("length30_gcp_ft", {"epochs": 1, "max_steps": 30}),
        ("length94_gcp_gsa", {"epochs": 1}),
        ("length94_gcp_ft", {"epochs": 1}),
    ]


def test_the_report_gathers_the_sweep_and_the_recovery_lengths(bench_module, tmp_path):
    for seed in range(3):
        _seed_file(tmp_path, seed)
        path = tmp_path / f"method_cpu_measurements_seed{seed}.json"
        results = json.loads(path.read_text())
        for steps, gsa, ft in ((30, 0.30, 0.32 - 0.01 * seed), (94, 0.50, 0.45)):
            results[f"length{steps}_gcp_gsa"] = {"map50": gsa}
            results[f"length{steps}_gcp_ft"] = {"map50": ft}
        if seed == bench_module.SWEEP_SEED:
            results["settings"]["macs"] = 0.4
            results["sweep30_pruned_gcp"] = {"map50": 0.5, "macs_cut": 0.301}
            results["sweep30_gcp_gsa"] = {"map50": 0.63}
            timed = {"teacher": 9.0, "sweep30_pruned_gcp": 7.5, "pruned_gcp": 7.0}
            results["sweep_latency"] = {
                "rows": {
                    k: {"median_ms": v, "p10_ms": v, "p90_ms": v, "gmacs": 1.0} for k, v in timed.items()
                },
                "threads": 2,
                "runs": 100,
                "provenance": {**_provenance("c0mmit0", CPU), "date": "2026-12-03 16:00 UTC"},
            }
        path.write_text(json.dumps(results))
    payload, text = _seeded_report(bench_module, tmp_path, machines=())
    gsa, slim = (SEEDED[key][bench_module.SWEEP_SEED] for key in ("gcp_gsa", "slim_ft"))
    assert payload["sweep"] == [
        {
            "method": "gcp",
            "recovery": "gsa",
            "share": 0.3,
            "macs_cut": 0.301,
            "map50": 0.63,
            "latency_ms": 7.5,
        },
        {
            "method": "gcp",
            "recovery": "gsa",
            "share": 0.4,
            "macs_cut": 0.4,
            "map50": gsa,
            "latency_ms": 7.0,
        },  # main row
        {
            "method": "slim",
            "recovery": "ft",
            "share": 0.4,
            "macs_cut": 0.4,
            "map50": slim,
            "latency_ms": None,
        },
    ]
    assert payload["sweep_latency"]["teacher_ms"] == 9.0 and payload["sweep_latency"]["machine"] == CPU
    assert f"gcp + GSA: 30% 0.630 (7.50 ms), 40% {gsa:.3f} (7.00 ms)" in text
    assert "(teacher 9.00 ms)" in text
    bench_module.plot_sweep(payload, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
    lengths = {(e["steps"], e["recovery"]): e["map50"] for e in payload["recovery_lengths"]}
    assert lengths[(30, "ft")] == [0.32, 0.31, 0.30] and lengths[(282, "gsa")] == [0.60, 0.62, 0.64]
    assert "- GSA ≥ FT at each recovery length (30 steps, 1 epoch, 3 epochs): missed" in text
    assert "  - at 30 steps: missed (mean paired difference -0.010 ± SE 0.006, n = 3)" in text
    assert "  - at 1 epoch (94 steps): met (mean paired difference +0.050 ± SE 0.000, n = 3)" in text


def test_measurements_made_from_another_teacher_are_refused(bench_module, tmp_path, monkeypatch):
    """A retrained teacher asset (issue 25's converged one) must not be mixed with rows cut from the old one:
    the teacher's hash is a setting, and the recorded files' is the old asset's."""
    (tmp_path / "measurements.json").write_text(
        json.dumps({"settings": {**vars(bench_module.parse_args([])), "teacher_sha256": "0" * 64}})
    )
    with pytest.raises(SystemExit, match="teacher_sha256"):
        bench_module.Bench(bench_module.parse_args(["--out", str(tmp_path)]))
    settings = {
        **vars(bench_module.parse_args([])),
        "teacher_sha256": bench_module.file_sha256(bench_module.SHIPPED_TEACHER),
    }
    (tmp_path / "measurements.json").write_text(json.dumps({"settings": settings}))
    bench_module.Bench(bench_module.parse_args(["--out", str(tmp_path)]))  # the same teacher: accepted


# ------------------------------------------------------------------------------------ the demo's stage-1 asset


def test_ship_writes_seed0s_stage1_model_as_the_demos_asset(bench_module, tmp_path, monkeypatch):
    from gcp.app.pipeline import load_model
    from gcp.detection.models import yolov4

    m = bench_module
    asset = tmp_path / "assets" / "digits_sparse.pt"
    monkeypatch.setattr(m, "SHIPPED_SPARSE", asset)
    model = yolov4(num_classes=2, width=0.125, depth=0.33)
    bench = _bench(m, tmp_path / "run", [], [], "--stages", "ship")
    m.ship_stage(bench)  # stage 1 not measured yet: nothing to ship
    assert not asset.exists()
    m.save_model(model, bench.path("sparse.pt"))
    bench.results["sparse"] = {"map50": 0.512}
    m.ship_stage(bench)
    shipped = torch.load(asset, weights_only=True)
    assert shipped["map50"] == 0.512 and next(iter(shipped["state_dict"].values())).dtype == torch.float16
    for name, value in load_model(asset).state_dict().items():
        assert torch.allclose(value.float(), model.state_dict()[name].float(), atol=1e-2, rtol=1e-3), name
    other = _bench(m, tmp_path / "run1", ["sparse"], ["sparse"], "--seed", "1", "--stages", "ship")
    asset.unlink()
    m.ship_stage(other)  # seed 0's alone
    assert not asset.exists() and "ship" not in m.DEFAULT_STAGES


def test_the_sweep_target_compares_gcp_gsa_with_the_best_other_recipe_at_each_share(bench_module):
    m = bench_module
    scores = {0.3: (0.70, 0.68, 0.60), 0.4: (0.65, 0.66, 0.55), 0.5: (0.60, 0.58, 0.50)}  # gsa, slim, tp
    sweep = [
        {"method": method, "recovery": recovery, "share": share, "map50": value}
        for share, values in scores.items()
        for (method, recovery), value in zip(m.SWEEP_ROWS, values)
    ]
    lines = m.sweep_verdicts(sweep)
    assert (
        lines[0]
        == f"- on the sweep (seed {m.SWEEP_SEED}), gcp + GSA ≥ every other recipe at every MACs cut: missed"
    )
    assert "  - at 30% of the MACs: met (gcp + GSA 0.700, best other slim + FT 0.680: +0.020)" in lines
    assert "  - at 40% of the MACs: missed (gcp + GSA 0.650, best other slim + FT 0.660: -0.010)" in lines
    assert "  - at 60% of the MACs: not measured" in lines
    assert m.sweep_verdicts([e for e in sweep if e["share"] != 0.4])[0].endswith(": not measured")
