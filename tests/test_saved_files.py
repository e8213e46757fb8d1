"""Model files written before the packages were split into layers (gcp.models, gcp.prune, gcp.serialize as
flat modules; fixtures made at commit 96e5b11 on an AVX2 CPU) still load with the same outputs: the files
record builder and adapter names, never module paths. Outputs are compared to float rounding, which differs
between CPUs."""

from pathlib import Path

import torch

import gcp
from gcp.core.serialize import load_model

FIXTURES = Path(__file__).parent / "fixtures"


def test_a_pruned_file_from_before_the_layers_loads_with_the_same_outputs():
    recorded = torch.load(FIXTURES / "before_layers_outputs.pt", weights_only=True)
    model = gcp.load_pruned(FIXTURES / "before_layers_pruned.pt")
    with torch.no_grad():
        outputs = model(recorded["input"])
    assert len(outputs) == len(recorded["outputs"])
    for got, expected in zip(outputs, recorded["outputs"]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_a_dense_file_from_before_the_layers_loads():
    model = load_model(FIXTURES / "before_layers_dense.pt")
    assert model.gcp_builder["name"] == "yolov4"
    assert sum(p.numel() for p in model.parameters()) == 209719
