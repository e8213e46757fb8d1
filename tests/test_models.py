"""Detector builders, the rebuild registry, decoding and NMS (issue 3 §1-2)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch_pruning as tp
import torchvision

from gcp.detection.models import (
    BUILDERS,
    YOLOV4_ANCHORS,
    build,
    decode,
    mobilenet_yolov3,
    postprocess,
    scale_anchors,
    yolov3,
    yolov4,
)
from gcp.detection.models.common import scale_channels, scale_depth

TINY = {
    "yolov4": {"width": 0.125, "depth": 0.33},
    "yolov3": {"width": 0.125, "depth": 0.33},
    "mobilenet_yolov3": {"width": 0.25},
}
# Paper Table 2 "Base" (YOLOv4, VOC, 416x416) and the fp32 sizes the paper quotes for the three detectors.
PAPER_YOLOV4_PARAMS, PAPER_YOLOV4_MACS = 64.1e6, 29.9e9
PAPER_SIZE_MB = {"yolov4": 256, "yolov3": 246, "mobilenet_yolov3": 95}


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def full_size() -> dict[str, dict]:
    """Each full-size detector (20 classes) built once, with its parameter and 416x416 MAC counts.

    MACs are counted at 64x64 and multiplied by (416/64)^2: the networks are fully convolutional and 64 and
    416 are both multiples of 32, so every layer's output map is exactly 6.5x smaller per side and its MACs
    (proportional to its output area) exactly 42.25x smaller. This is several times faster than counting at
    416 on a shared CPU and gives the identical number.
    """
    reports = {}
    for name in ("yolov4", "yolov3", "mobilenet_yolov3"):
        model = build(name, num_classes=20).eval()
        macs_64, params = tp.utils.count_ops_and_params(model, torch.randn(1, 3, 64, 64))
        macs = macs_64 * (416 / 64) ** 2
        print(
            f"\n{name}: {params / 1e6:.2f} M params, {macs / 1e9:.2f} G MACs @416, "
            f"fp32 {params * 4 / 2**20:.1f} MB (paper {PAPER_SIZE_MB[name]} MB)",
            end="",
        )
        reports[name] = {"model": model, "params": int(params), "macs": float(macs)}
    return reports


def test_yolov4_matches_paper_table2_base(full_size: dict[str, dict]) -> None:
    params, macs = full_size["yolov4"]["params"], full_size["yolov4"]["macs"]
    assert params == count_params(full_size["yolov4"]["model"])
    assert abs(params - PAPER_YOLOV4_PARAMS) / PAPER_YOLOV4_PARAMS < 0.005
    assert abs(macs - PAPER_YOLOV4_MACS) / PAPER_YOLOV4_MACS < 0.03


@pytest.mark.parametrize(("name", "darknet_coco_params"), [("yolov4", 64_363_101), ("yolov3", 61_949_149)])
def test_darknet_cfg_parameter_counts_are_reproduced_exactly(
    full_size: dict[str, dict], name: str, darknet_coco_params: int
) -> None:
    """darknet's yolov4.cfg / yolov3.cfg with 80 COCO classes; 20 VOC classes remove 3 * 60 output channels
    (each with its weights and bias) from each of the three output convolutions."""
    model = full_size[name]["model"]
    removed = sum((level.predict.in_channels + 1) * 3 * 60 for level in model.head)
    assert full_size[name]["params"] + removed == darknet_coco_params


def test_mobilenet_backbone_is_all_of_torchvision_mobilenet_v2_features(full_size: dict[str, dict]) -> None:
    model = full_size["mobilenet_yolov3"]["model"]
    reference = torchvision.models.mobilenet_v2(weights=None).features
    assert count_params(model.backbone) == count_params(reference)
    assert model.backbone.out_channels == (32, 96, 1280)


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("num_classes", [1, 20])
def test_output_shapes_follow_design_contract(name: str, num_classes: int) -> None:
    model = build(name, num_classes=num_classes, **TINY[name]).eval()
    with torch.no_grad():
        outputs = model(torch.rand(2, 3, 96, 128))
    assert isinstance(outputs, list)
    assert model.strides == (8, 16, 32)
    assert model.anchors.shape == (3, 3, 2)
    expected = [(2, 3 * (5 + num_classes), 96 // s, 128 // s) for s in (8, 16, 32)]
    assert [tuple(o.shape) for o in outputs] == expected


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_channels_last_input_gives_the_same_outputs_in_training_and_eval(name: str) -> None:
    """The pipeline feeds gcp's detectors channels-last batches (ModelFamily.channels_last): their code must
    not assume contiguous feature maps, forward or backward."""
    model = build(name, num_classes=3, **TINY[name])
    images = torch.rand(2, 3, 64, 96)
    for training in (True, False):
        model.train(training)
        plain = model(images)
        fast = model(images.contiguous(memory_format=torch.channels_last))
        for a, b in zip(plain, fast, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-3)  # float rounding: other kernels
    sum(o.sum() for o in fast).backward()


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_build_from_gcp_builder_reproduces_architecture(name: str) -> None:
    anchors = scale_anchors(None, 256 / 416)
    model = build(name, num_classes=7, anchors=anchors, **TINY[name])
    record = json.loads(json.dumps(model.gcp_builder))  # must survive a JSON checkpoint sidecar
    assert record["name"] == name
    rebuilt = build(**record)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    assert torch.equal(rebuilt.anchors, model.anchors)
    assert rebuilt.gcp_builder == model.gcp_builder


def test_width_and_depth_multipliers() -> None:
    assert [scale_channels(c, 0.25) for c in (32, 64, 1024)] == [8, 16, 256]
    assert scale_channels(32, 0.01) == 8
    assert scale_depth(8, 0.33) == 3 and scale_depth(1, 0.01) == 1
    model = yolov4(width=0.25, depth=0.01)
    assert model.backbone.stage3.downsample.conv.out_channels == 64
    assert all(len(getattr(model.backbone, f"stage{i}").res_units) == 1 for i in range(1, 6))


def test_yolov4_execution_order_is_backbone_spp_neck_then_interleaved_heads() -> None:
    model = yolov4(num_classes=3, **TINY["yolov4"]).eval()
    watched = {
        "backbone": model.backbone.stage5,
        "spp": model.spp,
        "top_down": model.neck.fuse_p3,
        "head8": model.head[0],
        "bottom_up16": model.neck.fuse_out4,
        "head16": model.head[1],
        "bottom_up32": model.neck.fuse_out5,
        "head32": model.head[2],
    }
    order: list[str] = []
    handles = [m.register_forward_hook(lambda *_, n=name: order.append(n)) for name, m in watched.items()]
    with torch.no_grad():
        model(torch.rand(1, 3, 64, 64))
    for handle in handles:
        handle.remove()
    assert order == list(watched)


def test_head_bias_starts_at_the_objectness_prior() -> None:
    model = yolov4(num_classes=20, **TINY["yolov4"])
    for level, stride in zip(model.head, model.strides):
        bias = level.predict.bias.detach().view(3, 25)
        assert level.predict.bias is not None and not hasattr(level, "bn")
        prior = 8 / (416 / stride) ** 2
        assert torch.allclose(bias[:, 4].sigmoid(), torch.full((3,), prior), rtol=0.5)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_torch_pruning_halves_the_channels_and_the_head_contract_survives(name: str) -> None:
    """The output convolutions are ignored by the pruner, so decoding a pruned model needs nothing new."""
    model = build(name, num_classes=3, **TINY[name]).eval()
    example = torch.rand(1, 3, 64, 64)
    before = count_params(model)
    pruner = tp.pruner.MagnitudePruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=0.5,
        ignored_layers=[level.predict for level in model.head],
    )
    pruner.step()
    assert count_params(model) < 0.4 * before
    with torch.no_grad():
        outputs = model(example)
    assert [tuple(o.shape) for o in outputs] == [(1, 24, 8, 8), (1, 24, 4, 4), (1, 24, 2, 2)]
    assert decode(model, outputs).shape == (1, 3 * (64 + 16 + 4), 8)
    assert len(postprocess(model, outputs)) == 1


def test_bad_arguments_are_rejected_with_clear_errors() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        yolov4(num_classes=0)
    with pytest.raises(ValueError, match="anchors must have shape"):
        yolov3(anchors=[[10, 13], [16, 30]])
    with pytest.raises(ValueError, match="positive"):
        scale_anchors(YOLOV4_ANCHORS, -1.0)
    with pytest.raises(ValueError, match="width"):
        mobilenet_yolov3(width=0)
    with pytest.raises(ValueError, match="unknown detector 'yolov9'"):
        build("yolov9")


# ---------------------------------------------------------------- decode / postprocess on hand-set outputs

NUM_CLASSES = 4
INPUT = 128  # grids of 16, 8 and 4 cells


def stub_model() -> SimpleNamespace:
    """Only the three attributes decode/postprocess may use: proves they never touch the layers."""
    return SimpleNamespace(anchors=torch.tensor(YOLOV4_ANCHORS), strides=(8, 16, 32), num_classes=NUM_CLASSES)


def silent_outputs(batch: int = 1) -> list[torch.Tensor]:
    """Raw outputs, (B, A, 5+C, H, W) per stride, where every objectness and class logit is -20: nothing is
    detected. Box logits are 0."""
    outputs = []
    for stride in (8, 16, 32):
        raw = torch.zeros(batch, 3, 5 + NUM_CLASSES, INPUT // stride, INPUT // stride)
        raw[:, :, 4:] = -20.0
        outputs.append(raw)
    return outputs


def flat(outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [o.flatten(1, 2) for o in outputs]


def plant(outputs, level, anchor, row, col, label, xywh_logits=(0.0, 0.0, 0.0, 0.0), obj=10.0, cls=10.0):
    raw = outputs[level]
    raw[:, anchor, :4, row, col] = torch.tensor(xywh_logits)
    raw[:, anchor, 4, row, col] = obj
    raw[:, anchor, 5 + label, row, col] = cls


def test_decode_places_a_planted_box_at_the_documented_position() -> None:
    outputs = silent_outputs(batch=2)
    # stride 16, anchor 1 = (76, 55) px, cell row 3 col 5; sigmoid(0) = 0.5 gives centre (5.5, 3.5) cells and
    # exactly the anchor size; wh logit logit(0.75) gives (2 * 0.75)^2 = 2.25 anchors.
    plant(outputs, level=1, anchor=1, row=3, col=5, label=2, xywh_logits=(0.0, 0.0, math.log(3.0), 0.0))
    decoded = decode(stub_model(), flat(outputs))
    assert decoded.shape == (2, 3 * (16 * 16 + 8 * 8 + 4 * 4), 5 + NUM_CLASSES)
    index = 3 * 16 * 16 + (1 * 8 + 3) * 8 + 5
    width, height = 2.25 * 76, 55
    expected = torch.tensor([88 - width / 2, 56 - height / 2, 88 + width / 2, 56 + height / 2])
    assert torch.allclose(decoded[0, index, :4], expected, atol=1e-4)
    assert decoded[0, index, 4] > 0.99 and decoded[0, index, 5 + 2] > 0.99
    assert torch.equal(decoded[0], decoded[1])
    assert (decoded[..., 4] > 0.5).sum() == 2


def test_postprocess_returns_the_planted_box_only() -> None:
    outputs = silent_outputs()
    plant(outputs, level=1, anchor=1, row=3, col=5, label=2)
    (result,) = postprocess(stub_model(), flat(outputs), conf_thres=0.25, iou_thres=0.6)
    assert result["labels"].tolist() == [2] and result["labels"].dtype == torch.int64
    assert torch.allclose(result["boxes"], torch.tensor([[50.0, 28.5, 126.0, 83.5]]), atol=1e-4)
    assert result["scores"].item() == pytest.approx(torch.sigmoid(torch.tensor(10.0)).item() ** 2)


def test_postprocess_suppresses_same_class_overlaps_but_keeps_other_classes() -> None:
    outputs = silent_outputs()
    plant(outputs, level=1, anchor=1, row=3, col=5, label=2, cls=10.0)
    plant(outputs, level=1, anchor=1, row=3, col=6, label=2, cls=5.0)  # shifted one cell: IoU ~0.6-0.7
    plant(outputs, level=1, anchor=1, row=3, col=6, label=0, cls=3.0)  # same box, second class
    (result,) = postprocess(stub_model(), flat(outputs), conf_thres=0.25, iou_thres=0.5)
    assert sorted(result["labels"].tolist()) == [0, 2]
    assert result["scores"][0] == result["scores"].max()


def test_postprocess_clips_to_the_input_and_caps_detections() -> None:
    outputs = silent_outputs()
    plant(outputs, level=2, anchor=2, row=3, col=3, label=1)  # (459, 401) px anchor overflows a 128 image
    for col in range(16):
        plant(outputs, level=0, anchor=0, row=col, col=col, label=3)  # 16 disjoint small boxes
    (result,) = postprocess(stub_model(), flat(outputs), conf_thres=0.25, max_det=5)
    assert len(result["boxes"]) == 5
    (result,) = postprocess(stub_model(), flat(outputs), conf_thres=0.25)
    assert len(result["boxes"]) == 17
    assert result["boxes"].min() >= 0 and result["boxes"].max() <= INPUT


def test_postprocess_on_a_real_model_gives_one_dict_per_image() -> None:
    model = yolov3(num_classes=NUM_CLASSES, **TINY["yolov3"]).eval()
    with torch.no_grad():
        results = postprocess(model, model(torch.rand(3, 3, 64, 64)))
    assert len(results) == 3
    for result in results:
        assert set(result) == {"boxes", "scores", "labels"}
        assert result["boxes"].shape[1] == 4 and len(result["boxes"]) <= 300


def test_decode_rejects_outputs_that_do_not_match_the_model() -> None:
    outputs = flat(silent_outputs())
    with pytest.raises(ValueError, match="expected 3 head outputs"):
        decode(stub_model(), outputs[:2])
    with pytest.raises(ValueError, match="stride-8 head output"):
        decode(SimpleNamespace(**{**vars(stub_model()), "num_classes": 5}), outputs)
