"""Tests of gcp.core.serialize: the digest is a corruption check (not tamper protection), and a model file's
description cannot make the loader allocate an absurd network or input."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import pytest
import torch

import gcp
import gcp.detection.models
from gcp.core.serialize import ModelFileError, _digest, load_model, load_pruned, save_model
from gcp.detection.models import yolov4

SIZE = 64


@pytest.fixture(scope="module")
def pruned_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real pruned checkpoint of a tiny gcp.detection.models YOLOv4 (its builder is recorded in the file)."""
    model = yolov4(num_classes=2, width=0.125, depth=0.33)
    result = gcp.prune_detector(model, torch.zeros(1, 3, SIZE, SIZE), ratio=0.2, method="l1")
    return result.save(tmp_path_factory.mktemp("pruned") / "pruned.pt")


def rewrite(source: Path, target: Path, *, recompute_digest: bool = True, **changes: object) -> Path:
    """``source`` with ``changes`` to its JSON description, digest recomputed as anyone editing it can."""
    payload = torch.load(source, weights_only=True)
    meta = json.loads(payload["meta"])
    for dotted, value in changes.items():
        *parents, name = dotted.split("__")
        node = meta
        for part in parents:
            node = node[part]
        node[name] = value
    payload["meta"] = json.dumps(meta)
    if recompute_digest:
        payload["digest"] = _digest(payload["meta"], payload["state_dict"])
    torch.save(payload, target)
    return target


def test_the_digest_is_a_corruption_check_that_an_editor_can_recompute(
    pruned_file: Path, tmp_path: Path
) -> None:
    # Damage without a matching digest is caught, and said to be damage.
    stale = rewrite(pruned_file, tmp_path / "stale.pt", recompute_digest=False, report__note="edited")
    with pytest.raises(
        ModelFileError, match=r"stale\.pt: damaged pruned checkpoint: the corruption check failed"
    ):
        load_pruned(stale)
    # An edit with the digest recomputed loads: the digest proves nothing about who wrote the file, and the
    # module says so rather than promising tamper protection.
    edited = rewrite(pruned_file, tmp_path / "edited.pt", report__note="edited")
    assert isinstance(load_pruned(edited), torch.nn.Module)
    doc = gcp.core.serialize.__doc__
    assert "corruption check" in doc and "not a signature" in doc


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"input_shape": [1, 3, 100_000, 100_000]}, r"input_shape \[1, 3, 100000, 100000\] asks for"),
        ({"input_shape": [1, 3, -64, 64]}, r"input_shape .* is not a list of 1 to 8 positive integers"),
        ({"input_shape": "big"}, r"input_shape 'big' is not a list"),
        ({"builder__kwargs__width": 1e4}, r"yolov4\(width=10000\.0\) is outside \(0, 16\]"),
        ({"builder__kwargs__depth": float("inf")}, r"yolov4\(depth=inf\) is outside"),
        ({"builder__kwargs__num_classes": 10**9}, r"yolov4\(num_classes=1000000000\) is outside"),
        ({"builder__kwargs__anchors": [[[1.0, 2.0]] * 5000] * 3}, r"anchors=.* is outside nested lists of"),
        ({"builder__kwargs__channels": 64}, r"builder 'yolov4' takes no argument\(s\) \['channels'\]"),
        # Inside every per-argument bound, but 4 G parameters: refused from its count on the meta device.
        ({"builder__kwargs__width": 8.0}, r"would have [\d,]+ parameters, more than the 1,073,741,824"),
        ({"builder__name": "resnet"}, r"made for architecture 'resnet', which no registered builder makes"),
        ({"history": [["neck.x", "out", [1]]]}, r"pruning history is not a list of"),
    ],
)
def test_a_crafted_description_is_refused_before_anything_is_built(
    pruned_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, changes: dict, message: str
) -> None:
    crafted = rewrite(pruned_file, tmp_path / "crafted.pt", **changes)
    built = []
    original = gcp.detection.models.BUILDERS["yolov4"]

    @functools.wraps(original)
    def recording(**kwargs: object) -> torch.nn.Module:
        built.append(torch.get_default_device())
        return original(**kwargs)

    monkeypatch.setitem(gcp.detection.models.BUILDERS, "yolov4", recording)
    start = time.perf_counter()
    with pytest.raises(ModelFileError, match=message) as error:
        load_pruned(crafted)
    assert time.perf_counter() - start < 20
    assert str(crafted) in str(error.value) and "\n" not in str(error.value)
    assert all(device.type == "meta" for device in built)  # sized at most, never allocated


def test_a_dense_file_is_checked_by_the_same_bounds(tmp_path: Path) -> None:
    path = save_model(yolov4(num_classes=2, width=0.125, depth=0.33), tmp_path / "dense.pt")
    assert load_model(path).num_classes == 2
    payload = torch.load(path, weights_only=True)
    builder = json.loads(payload["builder"])
    builder["kwargs"]["width"] = 12.0
    payload["builder"] = json.dumps(builder)
    torch.save(payload, tmp_path / "wide.pt")
    with pytest.raises(ModelFileError, match=r"wide\.pt: the recorded yolov4 with .* would have"):
        load_model(tmp_path / "wide.pt")


def test_the_default_bounds_admit_the_papers_full_size_models() -> None:
    """The paper's YOLOv4 at 416 px (and a batch of 16 at 640 px) are far inside the bounds."""
    from gcp.core.serialize import _build_recorded, _check_input_shape

    path = Path("paper.pt")
    assert _check_input_shape([16, 3, 640, 640], path) == [16, 3, 640, 640]
    with torch.device("meta"):
        model = _build_recorded({"name": "yolov4", "kwargs": {"num_classes": 80, "width": 1.0}}, path)
    assert sum(p.numel() for p in model.parameters()) > 60_000_000


def test_a_pruned_model_pruned_again_is_rebuilt_from_both_steps(tmp_path: Path) -> None:
    """Iterative pruning: the second step's history indexes the once-pruned model, so the file must replay both
    steps on the base; the chained report compares with the unpruned base."""
    torch.manual_seed(0)
    model = yolov4(num_classes=2, width=0.125, depth=0.33)
    example = torch.rand(1, 3, SIZE, SIZE)
    first = gcp.prune_detector(model, example, ratio=0.2, method="l1")
    with torch.no_grad():  # as fine-tuning would: the second step must not lean on the first step's weights
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    second = gcp.prune_detector(model, example, ratio=0.2, method="l1")
    assert second.report["params"]["before"] == first.report["params"]["after"]

    alone = tmp_path / "second_alone.pt"
    second.save(alone)
    with pytest.raises(ModelFileError):  # the second history alone does not fit the base
        load_pruned(alone)

    chained = second.following(first.history, first.report)
    assert chained.history == first.history + second.history
    params = chained.report["params"]
    assert params["before"] == first.report["params"]["before"]
    assert params["after"] == second.report["params"]["after"]
    assert params["pruned"] == pytest.approx(1 - params["after"] / params["before"])
    assert chained.report["steps"] == [first.report, second.report]
    assert second.history != chained.history  # the step's own result is left as it was

    rebuilt = load_pruned(chained.save(tmp_path / "chained.pt"))
    with torch.no_grad():
        expected = model.eval()(example)
        for got, want in zip(rebuilt(example), expected, strict=True):
            torch.testing.assert_close(got, want)
    third = gcp.prune_detector(rebuilt, example, ratio=0.1, method="l1").following(
        chained.history, chained.report
    )
    assert len(third.report["steps"]) == 3
    assert load_pruned(third.save(tmp_path / "third.pt")) is not None


def test_a_chained_report_needs_the_earlier_counts() -> None:
    model = yolov4(num_classes=2, width=0.125, depth=0.33)
    result = gcp.prune_detector(model, torch.rand(1, 3, SIZE, SIZE), ratio=0.1, method="l1")
    with pytest.raises(ValueError, match="params/macs"):
        result.following([], {"method": "l1"})
