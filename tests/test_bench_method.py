"""benchmarks/bench_method.py splits across sessions: which models a later run must rebuild or score, and
what each measurement says about where it was made.

A session on a fresh checkout has the committed measurements but not the run directory's models; it must
rebuild exactly the chain that a missing row starts from, and nothing whose rows are all measured. Rows made at
different commits or on different machines are not silently presented as one run's.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_method.py"
RECORDED = BENCH.parent / "results" / "method_cpu_measurements_seed0.json"


@pytest.fixture(scope="module")
def bench_module():
    sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("bench_method", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    assert set(rows[1]) == set(rows[0]) and rows[1]["map50"] == 0.56 and rows[1]["macs_cut"] == 0.4
    text = (tmp_path / "RESULTS_section.md").read_text()
    assert "| lcp, pruned, before recovery | 0.500 | 0.250 | 30.0% | 40.0% | — |" in text
    assert "| **lcp + FT** | 0.560 | 0.250 | 30.0% | 40.0% | — |" in text


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
    assert "| teacher (shipped) | 0.600 | 0.300 | — | — | 85.5 | 1 |" in text
    assert "of γ < 1e-2 | 0.500 | 0.200 | — | — | — | 2 |" in text
    assert git_revision() not in text  # the report's own commit is no row's


def test_recorded_rows_without_provenance_are_labelled_so(bench_module, tmp_path):
    from common import git_revision

    bench = _bench(bench_module, tmp_path, [], [])
    bench.results = json.loads(RECORDED.read_text())
    bench_module.write_report(bench)
    text = (tmp_path / "RESULTS_section.md").read_text()
    assert "- ?: provenance not recorded per row" in text and git_revision() not in text
    table = [line for line in text.splitlines() if line.startswith("| ") and "model" not in line]
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
