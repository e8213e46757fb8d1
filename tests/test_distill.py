"""Tests of group spatial attention distillation (paper §4.3): taps, L_AT, L_soft, and the distiller."""

from __future__ import annotations

import copy
import gc
import math
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn
from torch.utils.data import Dataset

from distill import (
    BALANCED_BETAS,
    PAPER_BETAS,
    PAPER_TAP_STRIDES,
    AttentionTaps,
    GroupAttentionDistiller,
    attention_terms,
    auto_tap_layers,
    candidate_priors,
    resolve_betas,
    soft_box_loss,
    soft_class_loss,
    spatial_attention,
    yolo_output_adapter,
)
from gcp.detection.loss import YoloLoss
from gcp.detection.models import mobilenet_yolov3, yolov3, yolov4

IMAGE_SIZE = 64
NUM_CLASSES = 3
TOY_TAPS = ["stages.0", "stages.1", "stages.2", "stages.3", "reduce"]


def conv_block(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class ToyDetector(nn.Module):
    """Five stride-2 stages (strides 2..32), a stride-32 reduction, a two-step top-down path and three heads,
    following the detector contract of docs/design.md."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.num_classes = NUM_CLASSES
        self.strides = (8, 16, 32)
        self.register_buffer("anchors", torch.tensor([[[8.0, 8.0]], [[16.0, 16.0]], [[32.0, 32.0]]]))
        channels = [3, width, 2 * width, 2 * width, 4 * width, 4 * width]
        self.stages = nn.ModuleList(conv_block(channels[i], channels[i + 1], 2) for i in range(5))
        self.reduce = conv_block(4 * width, 2 * width)
        self.upsample = nn.Upsample(scale_factor=2)
        self.fuse16 = conv_block(6 * width, 2 * width)
        self.fuse8 = conv_block(4 * width, 2 * width)
        self.heads = nn.ModuleList(nn.Conv2d(2 * width, 5 + NUM_CLASSES, 1) for _ in range(3))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        features = []
        x = images
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        p5 = self.reduce(features[4])
        p4 = self.fuse16(torch.cat([self.upsample(p5), features[3]], dim=1))
        p3 = self.fuse8(torch.cat([self.upsample(p4), features[2]], dim=1))
        return [head(p) for head, p in zip(self.heads, (p3, p4, p5))]


def toy_pair(seed: int = 0) -> tuple[ToyDetector, ToyDetector]:
    torch.manual_seed(seed)
    teacher = ToyDetector()
    torch.manual_seed(seed + 1)
    return teacher, ToyDetector()


def images(batch: int = 2, size: int = IMAGE_SIZE, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def targets(batch: int = 2) -> list[dict]:
    boxes = [
        torch.tensor([[8.0, 8.0, 40.0, 48.0]]),
        torch.tensor([[20.0, 4.0, 60.0, 30.0], [2.0, 30.0, 30.0, 62.0]]),
    ]
    labels = [torch.tensor([1]), torch.tensor([0, 2])]
    return [{"boxes": boxes[i % 2], "labels": labels[i % 2], "image_id": i} for i in range(batch)]


def prune_half(model: nn.Module, example: torch.Tensor, heads: list[nn.Module]) -> None:
    """Magnitude-prune half the channels in place, keeping the prediction convolutions whole."""
    pruner = tp.pruner.MagnitudePruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(),
        pruning_ratio=0.5,
        ignored_layers=heads,
    )
    pruner.step()


def calibrate_batchnorm(model: nn.Module, batch: torch.Tensor) -> nn.Module:
    """Set every BatchNorm's running statistics to those of ``batch`` and return the model in eval mode.

    An untrained network in eval mode (running mean 0, variance 1) shrinks its activations layer after layer,
    so a deep one such as YOLOv4 feeds its head almost exact zeros; calibrated statistics keep them alive.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average: after one batch, exactly that batch's statistics
    with torch.no_grad():
        model.train()(batch)
    for norm in norms:
        norm.momentum = 0.1
    return model.eval()


def all_forward_hooks(model: nn.Module) -> int:
    return sum(len(module._forward_hooks) for module in model.modules())


# --- taps --------------------------------------------------------------------------------------------------


def test_auto_taps_pick_last_block_per_stride_before_first_upsample() -> None:
    model = ToyDetector()
    traces = auto_tap_layers(model, images())
    assert [t.name for t in traces] == TOY_TAPS
    assert [t.stride for t in traces] == [2, 4, 8, 16, 32]


def test_auto_taps_on_yolov4_give_the_five_paper_strides_in_order() -> None:
    model = yolov4(num_classes=NUM_CLASSES, width=0.125, depth=0.33)
    traces = auto_tap_layers(model, images(1, 128))
    assert [t.stride for t in traces] == [2, 4, 8, 16, 32]
    assert [t.out_shape[-1] for t in traces] == [64, 32, 16, 8, 4]
    # whole CSP stages, not a conv inside them
    assert [t.name for t in traces[:4]] == [f"backbone.stage{i}" for i in range(1, 5)]


def test_yolov4_stride32_tap_is_the_spp_output_that_ends_group3() -> None:
    """§5.3: Group3 ends at the SPP output (darknet layer 116); the CBL after it (layer 117, ``reduce_p5``)
    runs at stride 32 too, but only feeds the first upsample and opens Group4."""
    model = yolov4(num_classes=NUM_CLASSES, width=0.125, depth=0.33)
    traces = auto_tap_layers(model, images(1, 128))
    assert traces[-1].name == "spp"
    assert "neck.reduce_p5" not in [t.name for t in traces]


def test_auto_taps_take_whole_residual_stages_and_leave_batchnorm_statistics_alone() -> None:
    model = yolov3(num_classes=NUM_CLASSES, width=0.125, depth=0.33).train()
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    names = [t.name for t in auto_tap_layers(model, images(1, 128), strides=PAPER_TAP_STRIDES)]
    # a Darknet stage ends with a residual add, which no leaf module outputs
    assert names[:4] == [f"backbone.stage{i}" for i in range(1, 5)]
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[name], buffer) for name, buffer in model.named_buffers())


def test_yolov3_is_distilled_at_the_four_scales_of_section_6_3() -> None:
    """§6.3: Darknet53-YOLOv3 at 104, 52, 26 and 13 (strides 4-32), not 208; the stride-32 map is the end of
    the backbone group (its five CBLs, which reach the stride-32 head directly), not the CBL feeding the
    upsample."""
    model = yolov3(num_classes=NUM_CLASSES, width=0.125, depth=0.33)
    traces = auto_tap_layers(model, images(1, 128))
    assert [t.stride for t in traces] == [4, 8, 16, 32]
    assert [t.name for t in traces] == [
        "backbone.stage2",
        "backbone.stage3",
        "backbone.stage4",
        "neck.fuse_p5",
    ]
    with AttentionTaps(model, images(1, 128)) as taps:
        assert len(taps) == 4
    assert resolve_betas(PAPER_BETAS, len(traces)) == (1000.0, 1000.0, 10000.0, 10000.0)


def test_mobilenet_yolov3_taps_are_block_outputs_not_the_next_blocks_expansion() -> None:
    """MobileNetV2's stride-2 block starts with a 1x1 expansion at the previous stride; that conv is the last
    module at the old stride, but it is the inside of the next block, not the output of a block."""
    model = mobilenet_yolov3(num_classes=NUM_CLASSES, width=0.25)
    traces = auto_tap_layers(model, images(1, 128))
    assert [t.stride for t in traces] == [2, 4, 8, 16, 32]
    assert [t.name for t in traces] == [
        "backbone.stage8.1",
        "backbone.stage8.3",
        "backbone.stage8",
        "backbone.stage16",
        "neck.fuse_p5",
    ]


def test_auto_taps_trace_a_frozen_teacher_and_restore_its_flags() -> None:
    model = yolov4(num_classes=NUM_CLASSES, width=0.125, depth=0.33).requires_grad_(False)
    model.backbone.stem.requires_grad_(True)
    names = [t.name for t in auto_tap_layers(model, images(1, 128))]
    assert names[-1] == "spp" and len(names) == 5
    assert all(p.requires_grad for p in model.backbone.stem.parameters())
    assert not any(p.requires_grad for p in model.spp.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_taps_capture_the_last_forward_largest_scale_first_and_close_removes_hooks() -> None:
    model = ToyDetector()
    hooks_before = all_forward_hooks(model)
    with AttentionTaps(model, images()) as taps:
        assert all_forward_hooks(model) == hooks_before + len(TOY_TAPS)
        model(images(batch=2))
        model(images(batch=3))
        maps = taps.maps()
        assert list(maps) == TOY_TAPS
        assert [m.shape[-1] for m in maps.values()] == [32, 16, 8, 4, 2]
        assert all(m.shape[0] == 3 for m in maps.values())
        taps.clear()
        assert taps.maps() == {}
    assert all_forward_hooks(model) == hooks_before
    model(images())
    assert taps.maps() == {}


class PairOutput(nn.Module):
    """Returns two maps, which cannot be an attention tap."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x, x]


def test_a_deep_copy_of_a_tapped_model_does_not_write_into_the_taps() -> None:
    model = ToyDetector()
    with AttentionTaps(model, layers=["stages.2"]) as taps:
        copy.deepcopy(model)(images())  # an EMA copy, say: it carries the hook along
        assert taps.maps() == {}
        model(images())
        assert list(taps.maps()) == ["stages.2"]


def test_explicit_tap_names_override_auto_and_are_validated() -> None:
    model = ToyDetector()
    with AttentionTaps(model, layers=["stages.4", "stages.1"]) as taps:
        model(images())
        assert list(taps.maps()) == ["stages.4", "stages.1"]
    with pytest.raises(ValueError, match="no modules named"):
        AttentionTaps(model, layers=["stages.9"])
    with pytest.raises(ValueError, match="'auto' or a list"):
        AttentionTaps(model, images(), layers="backbone")
    wrapper = nn.Sequential(PairOutput())
    with AttentionTaps(wrapper, layers=["0"]), pytest.raises(TypeError, match="'0' must output"):
        wrapper(images())


class InplaceAfterTap(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu_(self.conv(x))


def test_a_map_overwritten_in_place_after_capture_is_refused() -> None:
    model = InplaceAfterTap()
    with AttentionTaps(model, layers=["conv"]) as taps:
        model(images())
        with pytest.raises(RuntimeError, match="modified in place"):
            taps.maps()


# --- L_AT (eq. 5-7) -----------------------------------------------------------------------------------------


def test_spatial_attention_sums_squares_over_channels_and_normalises_per_sample() -> None:
    feature = torch.randn(2, 5, 3, 4)
    q = spatial_attention(feature)
    expected = (feature**2).sum(dim=1).flatten(1)
    expected = expected / expected.norm(dim=1, keepdim=True)
    torch.testing.assert_close(q, expected)
    assert q.shape == (2, 12)
    # a map with ten times the channels but the same spatial profile gives the same attention
    torch.testing.assert_close(spatial_attention(feature.repeat(1, 10, 1, 1)), q)


def test_attention_distances_match_their_formulas() -> None:
    teacher, student = torch.randn(3, 4, 5, 5), torch.randn(3, 2, 5, 5)
    difference = spatial_attention(teacher) - spatial_attention(student)
    norm = attention_terms([teacher], [student], [7.0], distance="norm")
    mean_squared = attention_terms([teacher], [student], [7.0], distance="mean_squared")
    squared = attention_terms(
        [teacher], [student], [7.0]
    )  # the default, as documented and as the distiller's
    torch.testing.assert_close(norm, 7.0 * difference.norm(dim=1).mean().reshape(1))
    torch.testing.assert_close(mean_squared, 7.0 * difference.pow(2).mean(dim=1).mean().reshape(1))
    torch.testing.assert_close(squared, 7.0 * difference.pow(2).sum(dim=1).mean().reshape(1))
    with pytest.raises(ValueError, match="distance must be one of"):
        attention_terms([teacher], [student], [1.0], distance="l1")


def test_each_beta_scales_only_its_own_tap() -> None:
    torch.manual_seed(0)
    teacher_maps = [torch.randn(2, 4, s, s) for s in (16, 8, 4)]
    student_maps = [torch.randn(2, 2, s, s) for s in (16, 8, 4)]
    unit = attention_terms(teacher_maps, student_maps, [1.0, 1.0, 1.0])
    scaled = attention_terms(teacher_maps, student_maps, [1.0, 3.0, 1.0])
    assert torch.all(unit > 0)
    torch.testing.assert_close(scaled, unit * torch.tensor([1.0, 3.0, 1.0]))


def test_different_spatial_sizes_need_resize() -> None:
    teacher, student = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 4, 4)
    with pytest.raises(ValueError, match="resize='bilinear'"):
        attention_terms([teacher], [student], [1.0])
    term = attention_terms([teacher], [student], [1.0], resize="bilinear")
    assert term.shape == (1,) and torch.isfinite(term).all()


def test_betas_keep_the_last_ones_when_there_are_fewer_taps() -> None:
    assert resolve_betas(PAPER_BETAS, 4) == (1000.0, 1000.0, 10000.0, 10000.0)
    assert resolve_betas(PAPER_BETAS, 5) == PAPER_BETAS
    with pytest.raises(ValueError, match="2 betas for 3"):
        resolve_betas((1.0, 2.0), 3)


# --- L_soft (eq. 8-12) --------------------------------------------------------------------------------------


def test_class_term_is_the_kl_divergence_per_prior() -> None:
    teacher = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]])  # B=1, k=2 priors, C=3
    student = torch.tensor([[[0.0, 1.0, 0.0], [1.0, -1.0, 2.0]]])
    for temperature in (1.0, 2.5):
        expected = F.kl_div(
            F.log_softmax(student / temperature, dim=-1),
            F.softmax(teacher / temperature, dim=-1),
            reduction="sum",
        ) / (1 * 2)
        torch.testing.assert_close(soft_class_loss(teacher, student, temperature), expected)
    # by hand for one prior and two classes: M = (e/(1+e), 1/(1+e)), N = log(1/2, 1/2)
    m = torch.tensor([math.e / (1 + math.e), 1 / (1 + math.e)])
    by_hand = float((m * (m.log() - math.log(0.5))).sum())
    value = soft_class_loss(torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[0.0, 0.0]]]))
    assert value.item() == pytest.approx(by_hand, rel=1e-6)
    assert soft_class_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)


def test_box_term_uses_only_priors_whose_teacher_box_matches_a_ground_truth() -> None:
    gt = [torch.tensor([[10.0, 10.0, 50.0, 50.0]])]
    teacher = torch.tensor([[[10.0, 10.0, 50.0, 50.0], [60.0, 60.0, 90.0, 90.0], [12.0, 10.0, 50.0, 52.0]]])
    student = teacher + torch.tensor(
        [[[4.0, 0.0, 0.0, 0.0], [50.0, 50.0, 50.0, 50.0], [0.0, 0.0, 0.0, 10.0]]]
    )
    # priors 0 and 2 overlap the ground truth (IoU 1.0 and ~0.9); prior 1 does not, however far the student is
    expected = (4.0 / 100) ** 2 + (10.0 / 100) ** 2
    value = soft_box_loss(teacher, student, gt, image_size=(100, 100), iou_threshold=0.5)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    assert soft_box_loss(teacher, student, gt, (100, 100), iou_threshold=0.95).item() == pytest.approx(
        (4.0 / 100) ** 2, rel=1e-6
    )
    assert soft_box_loss(teacher, student, [torch.zeros(0, 4)], (100, 100)).item() == 0.0


def test_sigmoid_class_term_is_the_bernoulli_kl_per_class() -> None:
    # one prior, two classes: teacher p = (1/2, 1/2), student q = (3/4, 1/2)
    teacher, student = torch.tensor([[[0.0, 0.0]]]), torch.tensor([[[math.log(3.0), 0.0]]])
    by_hand = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    value = soft_class_loss(teacher, student, activation="sigmoid")
    assert value.item() == pytest.approx(by_hand, rel=1e-6)


def test_sigmoid_class_term_sees_a_shift_of_all_logits_that_the_softmax_misses() -> None:
    """A YOLO's sigmoid class scores move when every logit of a prior moves together; eq. 10-11's softmax
    does not."""
    teacher = torch.tensor([[[2.0, -1.0, 0.5]]])
    shifted = teacher + 3.0
    assert soft_class_loss(teacher, shifted).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_class_loss(teacher, shifted, activation="sigmoid").item() > 0.5
    assert soft_class_loss(teacher, teacher, activation="sigmoid").item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="activation must be one of"):
        soft_class_loss(teacher, teacher, activation="tanh")


def test_candidate_priors_are_the_teacher_boxes_that_match_a_ground_truth() -> None:
    teacher = torch.tensor(
        [
            [[10.0, 10.0, 50.0, 50.0], [60.0, 60.0, 90.0, 90.0], [12.0, 10.0, 50.0, 52.0]],
            [[0.0, 0.0, 20.0, 20.0], [0.0, 0.0, 10.0, 20.0], [70.0, 70.0, 80.0, 80.0]],
        ]
    )
    gt = [
        torch.tensor([[10.0, 10.0, 50.0, 50.0]]),
        torch.tensor([[0.0, 0.0, 20.0, 20.0], [70, 70, 80, 80.0]]),
    ]
    # image 1, prior 1 covers half of the first box: IoU exactly 0.5, a candidate at 0.5 and not above it
    expected = torch.tensor([[True, False, True], [True, True, True]])
    assert torch.equal(candidate_priors(teacher, gt, 0.5), expected)
    assert torch.equal(candidate_priors(teacher, gt, 0.6)[1], torch.tensor([True, False, True]))
    no_objects = [torch.zeros(0, 4), torch.zeros(0, 4)]
    assert not candidate_priors(teacher, no_objects).any()


def test_class_term_on_chosen_priors_is_their_mean_kl_per_image() -> None:
    teacher = torch.tensor([[[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]], [[0.0, 0.0], [4.0, 0.0], [0.0, 1.0]]])
    student = torch.zeros(2, 3, 2)
    priors = torch.tensor([[True, False, False], [False, True, True]])
    kl = F.kl_div(F.log_softmax(student, -1), F.softmax(teacher, -1), reduction="none").sum(-1)  # (B, k)
    expected = (kl[0, 0] + (kl[1, 1] + kl[1, 2]) / 2) / 2
    torch.testing.assert_close(soft_class_loss(teacher, student, 1.0, priors), expected)
    # what the student says at a prior that is not chosen does not count, however far from the teacher
    moved = student.clone()
    moved[0, 1] = torch.tensor([9.0, -9.0])
    torch.testing.assert_close(soft_class_loss(teacher, moved, 1.0, priors), expected)
    none_chosen = torch.tensor([[True, False, False], [False, False, False]])
    torch.testing.assert_close(soft_class_loss(teacher, student, 1.0, none_chosen), kl[0, 0] / 2)
    with pytest.raises(ValueError, match="priors must be a"):
        soft_class_loss(teacher, student, 1.0, priors[:, :2])


# --- the distiller ------------------------------------------------------------------------------------------


def test_identical_student_has_zero_attention_and_soft_loss() -> None:
    teacher = ToyDetector().eval()
    student = copy.deepcopy(teacher)
    with GroupAttentionDistiller(teacher, student, images()) as distiller:
        terms = distiller(images(), targets())
    assert list(distiller.teacher_taps.names) == TOY_TAPS
    assert terms["at"].item() == 0.0
    assert terms["soft_cls"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["soft_box"].item() == 0.0
    assert terms["hard"].item() > 0
    torch.testing.assert_close(
        terms["total"], terms["at"] + terms["soft_cls"] + terms["soft_box"] + terms["hard"]
    )


def test_gradients_reach_the_student_only() -> None:
    teacher, student = toy_pair()
    teacher.train()  # the distiller must still run it in eval mode
    running_mean = teacher.stages[0][1].running_mean.clone()
    with GroupAttentionDistiller(teacher, student, images()) as distiller:
        terms = distiller(images(), targets())
        terms["total"].backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    assert torch.equal(teacher.stages[0][1].running_mean, running_mean)
    assert student.stages[0][0].weight.grad is not None and student.stages[0][0].weight.grad.abs().sum() > 0


def test_attention_gradient_alone_reaches_the_tapped_stages() -> None:
    teacher, student = toy_pair()
    with GroupAttentionDistiller(teacher, student, images(), soft_weight=0.0) as distiller:
        distiller.loss_terms(images(), None, student(images()))["at"].backward()
    assert student.stages[0][0].weight.grad.abs().sum() > 0
    assert student.heads[0].weight.grad is None  # heads come after every tap


def test_soft_weight_zero_leaves_the_soft_terms_out_instead_of_computing_them(monkeypatch) -> None:
    teacher, student = toy_pair()
    with GroupAttentionDistiller(teacher, student, images(), soft_weight=0.0) as distiller:

        def no_soft(*args, **kwargs):
            raise AssertionError("L_soft computed with soft_weight 0")

        monkeypatch.setattr(distiller, "_soft_losses", no_soft)
        terms = distiller(images(), targets())
    assert terms["soft_cls"].item() == terms["soft_box"].item() == 0.0
    assert torch.allclose(terms["total"], terms["at"] + terms["hard"])


def test_attention_loss_decreases_under_sgd() -> None:
    teacher, student = toy_pair()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05)
    batch = images(4)
    history = []
    with GroupAttentionDistiller(teacher, student, batch, betas=(1.0,) * 5, distance="norm") as distiller:
        for _ in range(8):
            optimizer.zero_grad()
            at = distiller.loss_terms(batch, None, student(batch))["at"]
            at.backward()
            optimizer.step()
            history.append(at.item())
    assert history[0] > 0
    assert history[-1] < 0.7 * history[0]


def test_pruned_student_with_fewer_channels_distils() -> None:
    teacher = ToyDetector()
    student = copy.deepcopy(teacher)
    prune_half(student, images(), heads=list(student.heads))
    assert student.stages[2][0].out_channels < teacher.stages[2][0].out_channels
    with GroupAttentionDistiller(teacher, student, images()) as distiller:
        terms = distiller(images(), targets())
        terms["total"].backward()
    assert all(torch.isfinite(value) for value in terms.values())
    assert terms["at"].item() > 0


def test_without_targets_hard_and_box_terms_are_zero_and_so_is_a_class_term_on_candidates() -> None:
    teacher, student = toy_pair()
    with GroupAttentionDistiller(teacher, student, images()) as distiller:
        terms = distiller(images())
    assert set(terms) == {"at", "soft_cls", "soft_box", "hard", "total"}
    assert terms["hard"].item() == 0.0 and terms["soft_box"].item() == 0.0
    assert terms["at"].item() > 0 and terms["soft_cls"].item() > 0
    # no boxes, no candidates (eq. 12) for the class term either
    with GroupAttentionDistiller(teacher, student, images(), soft_priors="candidates") as distiller:
        terms = distiller(images())
    assert terms["soft_cls"].item() == 0.0


def test_the_class_term_on_candidates_ignores_the_other_priors() -> None:
    """Eq. 9 over eq. 12's candidates: the student's class logits at priors whose teacher box misses every
    object do not count (a YOLO's class logits there are untrained); with soft_priors="all" they do."""
    teacher, student = toy_pair()
    batch, boxes = images(2), targets(2)
    outputs = teacher.eval()(batch)  # as the distiller runs it
    teacher_boxes = torch.cat([b for _c, b in yolo_output_adapter(teacher)(outputs)], dim=1)
    chosen = candidate_priors(teacher_boxes, [t["boxes"] for t in boxes])
    assert chosen.any() and not chosen.all()

    def class_term(soft_priors: str, scale: float) -> float:
        def adapter(raw):  # the student's class logits scaled at the priors that are not candidates
            pairs, start, scaled = yolo_output_adapter(student)(raw), 0, []
            for logits, scale_boxes in pairs:
                keep = chosen[:, start : start + logits.shape[1], None]
                scaled.append((torch.where(keep, logits, logits * scale), scale_boxes))
                start += logits.shape[1]
            return scaled

        with GroupAttentionDistiller(teacher, student, batch, soft_priors=soft_priors) as distiller:
            distiller.student_adapter = adapter
            return distiller.loss_terms(batch, boxes, student(batch))["soft_cls"].item()

    assert class_term("candidates", 1.0) == pytest.approx(class_term("candidates", 25.0), rel=1e-6)
    assert class_term("all", 1.0) != pytest.approx(class_term("all", 25.0), rel=1e-3)
    with pytest.raises(ValueError, match="soft_priors must be one of"):
        GroupAttentionDistiller(teacher, student, batch, soft_priors="near")


def test_batch_reduction_sum_scales_per_image_means_by_batch_size() -> None:
    teacher, student = toy_pair()
    batch = images(3)
    with GroupAttentionDistiller(teacher, student, batch, batch_reduction="mean") as mean_distiller:
        mean_terms = mean_distiller.loss_terms(batch, targets(3), student(batch))
    with GroupAttentionDistiller(teacher, student, batch) as sum_distiller:
        sum_terms = sum_distiller.loss_terms(batch, targets(3), student(batch))
    for name in ("at", "soft_cls", "soft_box"):
        torch.testing.assert_close(sum_terms[name], 3 * mean_terms[name])


def test_loss_terms_need_a_student_forward_first() -> None:
    teacher, student = toy_pair()
    with GroupAttentionDistiller(teacher, student, images()) as distiller:
        outputs = student(images())
        distiller.loss_terms(images(), None, outputs)
        with pytest.raises(RuntimeError, match="captured nothing"):
            distiller.loss_terms(images(), None, outputs)  # the taps were cleared by the first call


def test_teacher_and_student_must_be_separate_models() -> None:
    teacher = ToyDetector()
    with pytest.raises(ValueError, match="same module"):
        GroupAttentionDistiller(teacher, teacher, images())
    sharing = ToyDetector()
    sharing.heads = teacher.heads
    with pytest.raises(ValueError, match="share parameters"):
        GroupAttentionDistiller(teacher, sharing, images())


def test_a_failed_construction_leaves_no_hooks() -> None:
    teacher, student = toy_pair()
    with pytest.raises(ValueError, match="betas"):
        GroupAttentionDistiller(teacher, student, images(), betas=(1.0, 1.0))
    assert all_forward_hooks(teacher) == 0 and all_forward_hooks(student) == 0


class DictOutputDetector(nn.Module):
    """A detector outside gcp.detection.models: no anchors attribute, outputs a dict; distilled through an adapter."""

    def __init__(self) -> None:
        super().__init__()
        self.body = conv_block(3, 8, 2)
        self.cls = nn.Conv2d(8, NUM_CLASSES, 1)
        self.box = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.body(x)
        return {"cls": self.cls(features), "box": self.box(features).sigmoid() * x.shape[-1]}


def dict_adapter(outputs: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    corners = outputs["box"].flatten(2).transpose(1, 2)  # (B, k, 4) as x0, y0, width, height
    boxes = torch.cat([corners[..., :2], corners[..., :2] + corners[..., 2:]], dim=-1)
    return [(outputs["cls"].flatten(2).transpose(1, 2), boxes)]


def test_other_detectors_work_through_an_output_adapter() -> None:
    torch.manual_seed(0)
    teacher, student = DictOutputDetector(), DictOutputDetector()
    with pytest.raises(ValueError, match="output_adapter"):
        GroupAttentionDistiller(teacher, student, images(), taps=["body"], hard_loss=lambda o, t: 0)
    with GroupAttentionDistiller(
        teacher,
        student,
        images(),
        taps=["body"],
        output_adapter=dict_adapter,
        hard_loss=lambda outputs, _targets: outputs["cls"].pow(2).mean(),
        iou_threshold=0.0,
    ) as distiller:
        assert distiller.betas == BALANCED_BETAS[-1:]
        terms = distiller(images(), targets())
    assert all(terms[name].item() > 0 for name in ("at", "soft_cls", "soft_box", "hard"))


def live_tensor_count() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on some torch module objects warns of deprecations
        warnings.simplefilter("ignore")
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def test_no_tensors_accumulate_over_fifty_steps() -> None:
    teacher, student = toy_pair()
    optimizer = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9)
    batch, batch_targets = images(2, 32), targets(2)
    stage_outputs: list[weakref.ref] = []
    spy = student.stages[0].register_forward_hook(lambda _m, _i, out: stage_outputs.append(weakref.ref(out)))
    counts = {}
    with GroupAttentionDistiller(teacher, student, batch) as distiller:
        for step in range(1, 51):
            optimizer.zero_grad()
            distiller(batch, batch_targets)["total"].backward()
            optimizer.step()
            assert distiller.student_taps.maps() == {} and distiller.teacher_taps.maps() == {}
            assert stage_outputs[-1]() is None  # this step's tapped map (and its graph) is already freed
            if step in (5, 50):  # counting walks every Python object, so only twice
                counts[step] = live_tensor_count()
    spy.remove()
    assert counts[50] <= counts[5]


class BoxDataset(Dataset):
    """Four images, each with one bright box as its target."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image = torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE)
        x0 = 4 + 8 * index
        image[:, 10:40, x0 : x0 + 20] = 1.0
        box = torch.tensor([[float(x0), 10.0, float(x0 + 20), 40.0]])
        return image, {"boxes": box, "labels": torch.tensor([index % NUM_CLASSES]), "image_id": index}


def test_plugs_into_fit_as_a_hook() -> None:
    from gcp.detection.train import fit

    teacher = ToyDetector()
    student = copy.deepcopy(teacher)
    prune_half(student, images(), heads=list(student.heads))
    with GroupAttentionDistiller(teacher, student, images()) as distiller:
        history = fit(
            student, BoxDataset(), epochs=1, batch_size=2, hooks=[distiller], progress=False, lr=1e-3
        )
    for name in ("at", "soft_cls", "soft_box", "box", "obj", "cls"):
        assert math.isfinite(history[f"train/{name}"][0])
    assert history["train/at"][0] > 0
    assert all_forward_hooks(student) == 0 and all_forward_hooks(teacher) == 0
    assert all(p.grad is None for p in teacher.parameters())


def test_real_yolov4_student_pruned_by_torch_pruning_distils() -> None:
    example = images(2, 64)
    teacher = calibrate_batchnorm(yolov4(num_classes=NUM_CLASSES, width=0.125, depth=0.33), images(4, 64, 1))
    student = copy.deepcopy(teacher)
    prune_half(student, example, heads=[level.predict for level in student.head])
    loss = YoloLoss(student)
    with GroupAttentionDistiller(teacher, student, example, hard_loss=loss) as distiller:
        assert [distiller.teacher_taps.names[i] for i in (0, 4)] == ["backbone.stage1", "spp"]
        terms = distiller(example, targets(2))
        terms["total"].backward()
    assert all(torch.isfinite(value) for value in terms.values())
    assert terms["at"].item() > 0 and terms["soft_cls"].item() > 0
    assert any(p.grad is not None for p in student.backbone.stage1.parameters())


def test_term_log_keeps_every_tap_and_each_terms_gradient_norm_per_epoch() -> None:
    from gcp.detection.train import fit

    teacher = ToyDetector()
    student = copy.deepcopy(teacher)
    prune_half(student, images(), heads=list(student.heads))
    with GroupAttentionDistiller(teacher, student, images(), measure_every=1) as distiller:
        fit(student, BoxDataset(), epochs=2, batch_size=2, hooks=[distiller], progress=False, lr=1e-3)
        state = distiller.state_dict()
    history = distiller.log.history
    assert [entry["epoch"] for entry in history] == [0, 1]
    assert history[0]["steps"] == 2 and history[0]["measured"] == 2
    taps = [f"at/{name}" for name in TOY_TAPS]
    assert set(taps) | {"soft_cls", "soft_box"} <= set(history[0]["values"])
    norms = history[0]["grad_norms"]
    assert all(norms[name] > 0 for name in [*taps, "hard"]), norms
    restored = GroupAttentionDistiller(teacher, copy.deepcopy(student), images())
    restored.load_state_dict(state)
    assert restored.log.history == history and restored.log.calls == 4
    restored.close()


def test_squared_distance_weighs_a_large_and_a_small_map_alike() -> None:
    """The same relative change of attention costs the same at 64×64 as at 8×8 (mean_squared: 64× less)."""
    generator = torch.Generator().manual_seed(0)
    maps = [torch.rand(2, 4, size, size, generator=generator) + 0.5 for size in (64, 8)]
    perturbed = [m * (1 + 0.3 * torch.rand(m.shape, generator=generator)) for m in maps]
    squared = attention_terms(maps, perturbed, [1.0, 1.0], distance="squared")
    mean_squared = attention_terms(maps, perturbed, [1.0, 1.0], distance="mean_squared")
    assert squared[0] / squared[1] == pytest.approx(1.0, rel=0.5)
    assert mean_squared[0] / mean_squared[1] < 0.05


def test_attention_of_tiny_activations_is_still_a_unit_vector() -> None:
    x = torch.rand(2, 4, 8, 8) + 0.1
    tiny = spatial_attention(x * 1e-7)
    assert tiny.norm(dim=1).tolist() == pytest.approx([1.0, 1.0])
    torch.testing.assert_close(tiny, spatial_attention(x))
