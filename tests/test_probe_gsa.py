"""benchmarks/probe_gsa.py's record: recoveries grouped per variant and length with their seeds in order, and the
RESULTS.md text naming every gradient table's class-term priors."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from _benchmarks import load_benchmark


@pytest.fixture(scope="module")
def probe_module():
    return load_benchmark("probe_gsa")


def run(variant: str, seed: int, map50: float) -> dict:
    place = {"commit": "abc", "machine": "cpu here", "date": "today"}
    return {"variant": variant, "steps": 30, "seed": seed, "map50": map50, "map": 0.2, "provenance": place}


def test_summary_groups_seeds_in_order_with_mean_and_sd(probe_module):
    results = {
        "setup": {"teacher": "t.pt", "start": "s.pt", "macs": 0.4, "lr": 5e-4},
        "run/gsa/30/seed1": run("gsa", 1, 0.50),
        "run/ft/30/seed0": run("ft", 0, 0.49),
        "run/gsa/30/seed0": run("gsa", 0, 0.52),
    }
    summary = probe_module.summarise(SimpleNamespace(results=results))
    rows = {row["variant"]: row for row in summary["runs"]}
    assert rows["gsa"]["seeds"] == [0, 1] and rows["gsa"]["map50"] == [0.52, 0.50]
    assert rows["gsa"]["mean"] == pytest.approx(0.51) and rows["gsa"]["sd"] == pytest.approx(0.02**0.5 / 10)
    assert rows["ft"]["sd"] is None  # one seed: no spread to show
    assert summary["grads"] == []


def test_report_names_the_priors_of_each_gradient_table(probe_module):
    grads = {
        "rows": {"ft/hard": {"norm": 3.0, "cos_val": 0.1, "adam_gain": 10.0}},
        "batches": 2,
        "soft_priors": "candidates",
        "provenance": {"commit": "abc", "machine": "cpu here", "date": "today"},
    }
    payload = {
        "setup": {"teacher": "t.pt", "start": "s.pt", "macs": 0.4, "lr": 5e-4},
        "teacher_map50": 0.6,
        "grads": [grads],
        "runs": [],
    }
    text = probe_module.render(payload)
    assert "class term over candidates priors" in text and "| ft/hard | 3 | 0.1 | 10 |" in text


def test_every_variant_is_a_valid_distiller_setting(probe_module):
    import torch

    from gcp.detection.models import yolov4

    teacher = yolov4(num_classes=2, width=0.125, depth=0.33)
    student = yolov4(num_classes=2, width=0.125, depth=0.33)
    example = torch.zeros(1, 3, 64, 64)
    for name, options in probe_module.VARIANTS.items():
        if options is None:  # fine-tuning
            continue
        with probe_module.GroupAttentionDistiller(teacher, student, example, **options) as distiller:
            for key, value in options.items():
                assert getattr(distiller, key) == value, (name, key)


def test_the_section_shows_every_kept_record_strongest_teacher_first(probe_module, tmp_path):
    for name, teacher in (("gsa_probe.json", 0.6), ("gsa_probe_retrained_teacher.json", 0.8)):
        payload = {
            "setup": {"teacher": "t.pt", "start": "s.pt", "macs": 0.4, "lr": 5e-4},
            "teacher_map50": teacher,
            "grads": [],
            "runs": [{"variant": "ft", "steps": 30, "map50": [0.5], "mean": 0.5, "sd": None}],
        }
        (tmp_path / name).write_text(json.dumps(payload))
    text = probe_module.render_records(tmp_path)
    retrained = text.index(
        "### Teacher test mAP@0.5 0.800 (`benchmarks/results/gsa_probe_retrained_teacher.json`)"
    )
    assert retrained < text.index("### Teacher test mAP@0.5 0.600 (`benchmarks/results/gsa_probe.json`)")
    assert text.count("| ft | 30 | 0.500 | 0.500 |") == 2


def test_a_report_with_nothing_measured_keeps_the_record(probe_module, tmp_path, capsys):
    probe = SimpleNamespace(
        results={"setup": {}}, results_path=tmp_path / "probe.json", args=SimpleNamespace(out=tmp_path)
    )
    probe_module.report_stage(probe)
    assert not (tmp_path / "gsa_probe.json").exists() and "no record written" in capsys.readouterr().out
