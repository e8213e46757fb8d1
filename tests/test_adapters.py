"""prune_detector on detectors this project did not write: Ultralytics YOLO, torchvision, timm backbones."""

import copy
import os
import warnings

import pytest
import torch
import torch_pruning as tp
from _core_toys import ToyDetector, randomise_bn
from torch import nn
from torchvision.models import detection
from torchvision.ops import box_convert

import gcp
from distill.taps import tap_layers
from gcp.core.graph import build_graph
from gcp.core.registry import (
    Adapter,
    adapter_names,
    find_adapter,
    get_adapter,
    network,
    register_adapter,
    split_output_channels,
    unregister_adapter,
)

os.environ.setdefault("YOLO_OFFLINE", "1")  # Ultralytics must never reach for the network in tests

TARGETS = [{"boxes": torch.tensor([[8.0, 10.0, 40.0, 50.0]]), "labels": torch.tensor([1])}] * 2


def quiet_prune(model, images, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gcp.prune_detector(model, images, **kwargs)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def randomise_norms(model, seed=0):
    """Spread γ and β so that γ-based methods have something to rank (fresh models start at γ=1, β=0)."""
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=generator) * 0.9 + 0.1
            m.bias.data = (torch.rand(m.num_features, generator=generator) - 0.5) * 0.4
    return model


def calibrate_norms(model, images):
    """Running statistics measured on ``images`` (through the adapter's network), so that activations keep unit
    scale through the whole random network instead of fading out: comparisons below then test real signals."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batch
        m.train()
    with torch.no_grad():
        network(model)(images)
    for m in norms:
        m.momentum = 0.1
        m.eval()
    return model


def widen_head_init(model):
    """torchvision initialises its heads with std 0.01 and prior biases, which leaves nearly constant raw maps on
    a random model; He-initialised heads give outputs an equality test can tell apart."""
    for m in model.head.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
    return model


def assert_informative(tensors):
    """Guard for the equality tests: outputs that do not vary would make any comparison pass. At least half of
    them (the finer levels; a 1x1 coarsest level barely varies) must have a clear spread."""
    spreads = [float(t.std()) for t in tensors]
    assert sum(spread > 1e-2 for spread in spreads) >= len(spreads) / 2, spreads


def kill_quarter_of_channels(model):
    """γ = β = 0 on the first quarter of every BatchNorm: those channels are exactly 0 after BN and activation."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            dead = m.num_features // 4
            m.weight.data[:dead] = 0.0
            m.bias.data[:dead] = 0.0


def prune_dead_channels(model, images):
    """One group over all layers, asked for exactly its share of dead (γ = 0) channels: the threshold falls
    between the zeros and the live γ, so exactly the dead go (ties among the zeros do not matter). Layers
    without BatchNorm (FPN, heads) are left whole, as only γ can say a channel is dead."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    dead = sum(int((m.weight == 0).sum()) for m in norms) / sum(m.num_features for m in norms)
    return quiet_prune(
        model, images, ratio={"all": dead}, groups={"all": "*"}, allocator="explicit", bn_free="keep"
    )


def assert_same_tensors(a, b, atol=0.0):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


def assert_round_trip(result, fresh_base, images, tmp_path):
    path = result.save(tmp_path / "pruned.pt")
    loaded = gcp.load_pruned(path, base=fresh_base)
    with torch.no_grad():
        assert_same_tensors(network(result.model.eval())(images), network(loaded)(images))


# --- registry ------------------------------------------------------------------------------------------------


def test_registry_recognises_families_and_not_our_own_models():
    assert adapter_names()[-3:] == ["ultralytics", "torchvision", "timm"]
    assert find_adapter(ToyDetector()) is None
    assert find_adapter(nn.Sequential(nn.Conv2d(3, 4, 1))) is None
    ssd = detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
    assert find_adapter(ssd).name == "torchvision"
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        get_adapter("nope")
    with pytest.raises(ValueError, match="adapter 'torchvision' does not recognise a ToyDetector"):
        gcp.prune_detector(ToyDetector(), torch.randn(1, 3, 64, 64), ratio=0.3, adapter="torchvision")


def test_a_user_adapter_is_tried_first_and_drives_the_trace():
    # A family whose forward returns a dict: the adapter names the prediction layers and runs the network.
    class DictDetector(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = ToyDetector()

        def forward(self, images):
            return {"levels": self.inner(images), "note": "postprocessed elsewhere"}

    family = Adapter(
        name="dict-detector",
        matches=lambda m: isinstance(m, DictDetector),
        run=lambda m, images: m(images),
        heads=lambda m: ["inner.head8.1", "inner.head16.1"],
    )
    register_adapter(family)
    try:
        assert adapter_names()[0] == "dict-detector"
        with pytest.raises(ValueError, match="already registered"):
            register_adapter(family)
        torch.manual_seed(0)
        model = DictDetector()
        randomise_bn(model.inner)
        before = n_params(model)
        result = quiet_prune(model, torch.randn(1, 3, 64, 64), ratio=0.3, method="l1")
        assert result.adapter == "dict-detector" and n_params(model) < before
        assert [o.shape[1] for o in model(torch.randn(1, 3, 64, 64))["levels"]] == [12, 12]
    finally:
        unregister_adapter("dict-detector")
    assert "dict-detector" not in adapter_names()


def test_split_output_channels_gives_the_same_output_as_the_whole_block():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(6, 10, 3, padding=1, bias=False), nn.BatchNorm2d(10), nn.PReLU(10))
    randomise_norms(block)
    block[1].running_mean.normal_()
    block.eval()
    parts = split_output_channels(block, [4, 6])
    x = torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(torch.cat([p(x) for p in parts], 1), block(x), atol=1e-6, rtol=0)
    assert [p[0].out_channels for p in parts] == [4, 6] and [p[1].num_features for p in parts] == [4, 6]
    with pytest.raises(ValueError, match="do not add up to the 10 output channels"):
        split_output_channels(block, [4, 4])
    with pytest.raises(ValueError, match="one dense conv"):
        split_output_channels(nn.Conv2d(4, 4, 3, groups=4), [2, 2])


# --- models no adapter knows -----------------------------------------------------------------------------------


class BrokenNeck(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.neck = nn.Conv2d(16, 8, 1)  # expects 16 channels: tracing breaks here

    def forward(self, images):
        return [self.neck(self.stem(images))]


class DetachedOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1))

    def forward(self, images):
        return [self.body(images).detach()]  # like boxes after a no-grad postprocess


def test_an_untraceable_unknown_model_gets_an_error_naming_the_module_and_the_fix():
    with pytest.raises(
        ValueError, match=r"raised in module 'neck' \(Conv2d\).*forward_fn=.*output_transform="
    ):
        gcp.prune_detector(BrokenNeck(), torch.randn(1, 3, 32, 32), ratio=0.3, method="l1")
    with pytest.raises(ValueError, match="no model output is computed by a conv.*forward_fn="):
        gcp.prune_detector(DetachedOutputs(), torch.randn(1, 3, 32, 32), ratio=0.3, method="l1")


# --- Ultralytics -------------------------------------------------------------------------------------------------

YOLO_INPUT = torch.rand(1, 3, 64, 64)


@pytest.fixture(scope="module")
def yolo_models():
    pytest.importorskip("ultralytics")
    from ultralytics.nn.tasks import DetectionModel

    built = {}
    for cfg in ("yolov8n.yaml", "yolo11n.yaml"):
        torch.manual_seed(0)
        model = randomise_norms(DetectionModel(cfg, verbose=False)).eval()
        built[cfg] = calibrate_norms(model, torch.rand(4, 3, 64, 64))
    return built


@pytest.mark.parametrize(("cfg", "method"), [("yolov8n.yaml", "gcp"), ("yolo11n.yaml", "slim")])
def test_ultralytics_split_rewrite_is_exact_and_makes_split_channels_prunable(
    yolo_models, cfg, method, tmp_path
):
    model = copy.deepcopy(yolo_models[cfg])
    with torch.no_grad():
        before_eval = model(YOLO_INPUT)[0]
    before_train = copy.deepcopy(model).train()(torch.rand(2, 3, 64, 64))  # a copy: train mode moves BN stats

    rewritten = get_adapter("ultralytics").prepare_model(model)
    assert rewritten == (8 if cfg.startswith("yolov8") else 9)
    with torch.no_grad():
        torch.testing.assert_close(model(YOLO_INPUT)[0], before_eval, atol=1e-6, rtol=0)

    halves = {m: m.out_channels for n, m in model.named_modules() if n.endswith(("cv1_a.conv", "cv1_b.conv"))}
    params = n_params(model)
    result = quiet_prune(model, YOLO_INPUT, ratio=0.3, method=method)
    assert result.adapter == "ultralytics"
    assert sum(h.out_channels < width for h, width in halves.items()) >= len(halves) // 2
    assert n_params(model) < 0.8 * params
    assert 0.2 < result.report["params"]["pruned"] < 0.8

    with torch.no_grad():
        after_eval = model(YOLO_INPUT)
    assert isinstance(after_eval, tuple) and after_eval[0].shape == before_eval.shape
    model.train()
    after_train = model(torch.rand(2, 3, 64, 64))
    assert after_train.keys() == before_train.keys()
    assert after_train["boxes"].shape == before_train["boxes"].shape
    assert after_train["scores"].shape == before_train["scores"].shape
    model.eval()
    assert_round_trip(result, copy.deepcopy(yolo_models[cfg]), YOLO_INPUT, tmp_path)


def test_a_refused_ultralytics_model_is_handed_back_without_its_rewrite(yolo_models):
    model = copy.deepcopy(yolo_models["yolov8n.yaml"])
    modules_before = dict(model.named_modules())
    with pytest.raises(ValueError, match="example_inputs do not run the model"):
        quiet_prune(model, torch.rand(1, 4, 64, 64), ratio=0.3, method="gcp")  # 4 channels: not an image
    assert dict(model.named_modules()).keys() == modules_before.keys()
    assert all(module is modules_before[name] for name, module in model.named_modules())
    assert not model.training


def test_ultralytics_pruned_model_equals_the_original_when_the_removed_channels_are_dead(yolo_models):
    model = copy.deepcopy(yolo_models["yolo11n.yaml"])
    get_adapter("ultralytics").prepare_model(model)
    kill_quarter_of_channels(model)
    view = network(model)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = view(images)
    assert_informative(expected)
    params = n_params(model)
    prune_dead_channels(model, images)
    assert n_params(model) < 0.8 * params
    with torch.no_grad():
        assert_same_tensors(view(images), expected, atol=1e-4)


def test_ultralytics_soft_outputs_match_its_own_decoding(yolo_models):
    model = copy.deepcopy(yolo_models["yolov8n.yaml"])
    family = get_adapter("ultralytics")
    with torch.no_grad():
        decoded = model(YOLO_INPUT)[0].transpose(1, 2)  # (B, anchors, 4 xywh + classes)
        pairs = family.soft_outputs(model)(network(model)(YOLO_INPUT))
    assert [c.shape[1] for c, _ in pairs] == [64, 16, 4]  # 8x8, 4x4, 2x2 cells at strides 8, 16, 32
    logits = torch.cat([c for c, _ in pairs], 1)
    boxes = torch.cat([b for _, b in pairs], 1)
    torch.testing.assert_close(box_convert(boxes, "xyxy", "cxcywh"), decoded[..., :4], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits.sigmoid(), decoded[..., 4:], atol=1e-6, rtol=0)
    adapt = family.soft_outputs(model)
    trainee = copy.deepcopy(model).train()  # batch statistics: the model's training dict vs the raw maps
    with torch.no_grad():
        own_eval, own_train = adapt(model(YOLO_INPUT)), adapt(trainee(YOLO_INPUT))
        raw_train = adapt(network(trainee)(YOLO_INPUT))
    for own, raw in ((own_eval, pairs), (own_train, raw_train)):
        assert_same_tensors([t for pair in own for t in pair], [t for pair in raw for t in pair], atol=1e-6)
    assert tap_layers(model, YOLO_INPUT) == ["model.0", "model.2", "model.4", "model.6", "model.9"]


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_ultralytics_pruned_network_exports_to_onnx(yolo_models, tmp_path):
    export = pytest.importorskip("gcp.runtime.export")
    model = copy.deepcopy(yolo_models["yolov8n.yaml"])
    quiet_prune(model, YOLO_INPUT, ratio=0.3, method="l1")
    worst = export.export_onnx(network(model), YOLO_INPUT, tmp_path / "yolo.onnx")
    assert worst < 1e-4 and (tmp_path / "yolo.onnx").stat().st_size > 0


# --- torchvision -------------------------------------------------------------------------------------------------

TV_INPUT = torch.rand(1, 3, 64, 64)
TV_MODELS = [
    ("retinanet_resnet50_fpn", "slim"),
    ("fcos_resnet50_fpn", "gcp"),
    ("ssdlite320_mobilenet_v3_large", "thinet"),
    ("fasterrcnn_mobilenet_v3_large_fpn", "l1"),
]


def torchvision_model(name):
    kwargs = {"weights": None, "weights_backbone": None}
    if not name.startswith("ssdlite"):  # SSDlite resizes to its fixed 320 px
        kwargs.update(min_size=64, max_size=64)
    torch.manual_seed(0)
    model = randomise_norms(getattr(detection, name)(**kwargs)).eval()
    if hasattr(model, "head"):
        widen_head_init(model)
    return calibrate_norms(model, torch.rand(2, 3, 64, 64))


@pytest.mark.parametrize(("name", "method"), TV_MODELS)
def test_torchvision_detector_prunes_from_an_image_batch_and_keeps_its_forward(name, method, tmp_path):
    model = torchvision_model(name)
    base = copy.deepcopy(model)
    model.train()
    losses_before = model(list(torch.rand(2, 3, 64, 64)), TARGETS)
    model.eval()
    params = n_params(model)

    result = quiet_prune(model, TV_INPUT, ratio=0.3, method=method, budget="params", calib_data=[TV_INPUT])
    assert result.adapter == "torchvision"
    assert result.report["params"]["pruned"] == pytest.approx(0.3, abs=0.01)
    assert 1 - n_params(model) / params == pytest.approx(0.3, abs=0.01)

    with torch.no_grad():
        detections = model(list(TV_INPUT))
    assert len(detections) == 1 and set(detections[0]) == {"boxes", "scores", "labels"}
    model.train()
    losses = model(list(torch.rand(2, 3, 64, 64)), TARGETS)
    assert losses.keys() == losses_before.keys() and all(torch.isfinite(v) for v in losses.values())
    model.eval()
    assert_round_trip(result, base, TV_INPUT, tmp_path)


def test_torchvision_keeps_groupnorm_inputs_and_traces_only_the_network():
    model = torchvision_model("fcos_resnet50_fpn")
    family = find_adapter(model)
    assert "head.classification_head.conv.0" in family.ignored(model)
    outputs = family.forward_fn(model, TV_INPUT)
    assert len(outputs) == 3 * 5 and all(o.dim() == 4 for o in outputs)  # cls, box, centerness x 5 levels
    quiet_prune(model, TV_INPUT, ratio=0.3, method="l1")
    for norm in model.head.classification_head.conv:
        if isinstance(norm, nn.GroupNorm):
            assert norm.num_channels == 256


def test_faster_rcnn_fpn_channels_map_onto_the_flattened_box_head():
    model = torchvision_model("fasterrcnn_mobilenet_v3_large_fpn")
    graph = build_graph(model, TV_INPUT, find_adapter(model).forward_fn)
    group = graph.get_pruning_group(model.backbone.fpn.layer_blocks[0][0], tp.prune_conv_out_channels, [1, 3])
    fc6 = [list(idxs) for dep, idxs in group if dep.target.module is model.roi_heads.box_head.fc6]
    pooled = 7 * 7  # RoIAlign output per channel, flattened channel-major into fc6
    assert fc6 == [list(range(1 * pooled, 2 * pooled)) + list(range(3 * pooled, 4 * pooled))]


def test_torchvision_pruned_model_equals_the_original_when_the_removed_channels_are_dead():
    model = torchvision_model("retinanet_resnet50_fpn")
    kill_quarter_of_channels(model)
    view = network(model)
    with torch.no_grad():
        expected = view(TV_INPUT)
    assert_informative(expected)
    prune_dead_channels(model, TV_INPUT)
    with torch.no_grad():
        assert_same_tensors(view(TV_INPUT), expected, atol=1e-4)
    assert tap_layers(model, TV_INPUT) == [
        "backbone.body.layer2",
        "backbone.body.layer3",
        "backbone.body.layer4",
    ]


def test_frozen_batchnorm_of_pretrained_backbones_becomes_prunable():
    from torchvision.models import resnet18
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    body = randomise_norms(
        resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
    )  # as with weights_backbone=...
    for m in body.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.weight.uniform_(0.1, 1.0)
            m.running_mean.normal_()
    backbone = _resnet_fpn_extractor(body, 3, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    model = widen_head_init(detection.RetinaNet(backbone, num_classes=5, min_size=64, max_size=64).eval())
    with torch.no_grad():
        expected = network(model)(TV_INPUT)
    assert_informative(expected)
    assert find_adapter(model).prepare_model(model) == 20
    with torch.no_grad():
        assert_same_tensors(network(model)(TV_INPUT), expected, atol=1e-4)  # x*scale+shift vs batch_norm
    result = quiet_prune(model, TV_INPUT, ratio=0.3, method="gcp")
    assert result.report["achieved"] == pytest.approx(0.3, abs=0.01)
    model.train()
    assert set(model(list(torch.rand(2, 3, 64, 64)), TARGETS)) == {"classification", "bbox_regression"}
    assert not model.backbone.body.layer1[0].bn1.weight.requires_grad  # still frozen


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_torchvision_pruned_network_exports_to_onnx(tmp_path):
    export = pytest.importorskip("gcp.runtime.export")
    model = torchvision_model("ssdlite320_mobilenet_v3_large")
    quiet_prune(model, TV_INPUT, ratio=0.3, method="l1")
    # the transform unbinds the batch into a list of images, so the exported batch size is fixed
    worst = export.export_onnx(network(model), TV_INPUT, tmp_path / "ssd.onnx", dynamic_batch=False)
    assert worst < 1e-4


# --- timm ----------------------------------------------------------------------------------------------------------


def test_timm_cross_stage_rewrite_is_exact_and_pruning_keeps_the_feature_widths(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomise_norms(timm.create_model("cspdarknet53", pretrained=False, features_only=True)).eval()
    calibrate_norms(model, torch.rand(2, 3, 64, 64))
    base = copy.deepcopy(model)
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = model(images)
    assert find_adapter(model).prepare_model(model) == 5
    with torch.no_grad():
        assert_same_tensors(model(images), before, atol=1e-6)

    kill_quarter_of_channels(model)  # after the rewrite, so coupled layers agree on which channels are dead
    with torch.no_grad():
        expected = model(images)
    assert_informative(expected)
    params = n_params(model)
    result = prune_dead_channels(model, images)
    assert result.adapter == "timm" and n_params(model) < 0.8 * params
    assert model.stages_2.conv_exp_s.conv.out_channels < 128  # a half that used to sit behind split()
    with torch.no_grad():
        assert_same_tensors(model(images), expected, atol=1e-4)
    assert_round_trip(result, base, images, tmp_path)
