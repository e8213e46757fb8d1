"""YOLO loss (L_hard): anchor assignment, CIoU/objectness/class terms, batch scaling, and that it trains."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from gcp.detection.loss import YoloLoss, assign_level, targets_to_tensor
from gcp.detection.models import YOLOV4_ANCHORS, scale_anchors, yolov4

INPUT = 128  # grids of 16, 8 and 4 cells
GRIDS = tuple(INPUT // s for s in (8, 16, 32))


def stub_model(num_classes: int) -> SimpleNamespace:
    """The attributes the loss reads, and nothing else."""
    return SimpleNamespace(anchors=torch.tensor(YOLOV4_ANCHORS), strides=(8, 16, 32), num_classes=num_classes)


def target(boxes: list[list[float]], labels: list[int]) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.long),
    }


def to_head_layout(level: torch.Tensor) -> torch.Tensor:
    """(B, A, H, W, 5+C) -> the model's raw (B, A*(5+C), H, W)."""
    return level.permute(0, 1, 4, 2, 3).flatten(1, 2)


# Two images: two well separated boxes, one large box. No centre sits on a half cell at any stride.
TARGETS = [
    target([[10, 12, 50, 70], [80, 84, 122, 118]], [0, 2]),
    target([[21, 29, 101, 89]], [1]),
]


@pytest.mark.parametrize("num_classes", [1, 20])
@pytest.mark.parametrize("empty", [True, False])
def test_loss_is_finite_and_differentiable(num_classes: int, empty: bool) -> None:
    torch.manual_seed(0)
    model = yolov4(num_classes=num_classes, width=0.125, depth=0.33)
    targets = (
        [target([], []), target([], [])]
        if empty
        else [target(t["boxes"].tolist(), [0] * len(t["labels"])) for t in TARGETS]
    )
    losses = YoloLoss(model)(model(torch.rand(2, 3, INPUT, INPUT)), targets)
    assert set(losses) == {"box", "obj", "cls", "total"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    assert torch.allclose(losses["total"], losses["box"] + losses["obj"] + losses["cls"])
    if empty:
        assert losses["box"] == 0 and losses["cls"] == 0 and losses["obj"] > 0
    else:
        assert losses["box"] > 0 and losses["cls"] > 0
    losses["total"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_assignment_uses_anchor_ratio_and_the_two_nearer_neighbour_cells() -> None:
    anchors = torch.tensor([[1.0, 1.0], [3.0, 3.0], [20.0, 20.0]])  # grid cells
    # centre (5.3, 2.7): own cell (x5, y2), nearer x-neighbour left (x4), nearer y-neighbour below (y3).
    # 2x2 box: ratios 2 to anchor 0, 1.5 to anchor 1, 10 to anchor 2 (> 4, no match).
    rows = torch.tensor([[0.0, 1.0, 5.3, 2.7, 2.0, 2.0]])
    assigned = assign_level(rows, anchors, grid_size=(8, 8), anchor_threshold=4.0)
    cells = sorted(zip(assigned.anchor.tolist(), assigned.cell_x.tolist(), assigned.cell_y.tolist()))
    assert cells == [(a, x, y) for a in (0, 1) for (x, y) in sorted([(5, 2), (4, 2), (5, 3)])]
    own = (assigned.cell_x == 5) & (assigned.cell_y == 2)
    assert torch.allclose(assigned.boxes[own], torch.tensor([[0.3, 0.7, 2.0, 2.0]] * 2), atol=1e-6)
    assert assigned.labels.eq(1).all() and assigned.image.eq(0).all()


def test_assignment_drops_neighbours_outside_the_grid() -> None:
    anchors = torch.tensor([[1.0, 1.0]])
    rows = torch.tensor([[0.0, 0.0, 0.2, 7.9, 1.0, 1.0]])  # left edge, bottom edge of an 8x8 grid
    assigned = assign_level(rows, anchors, grid_size=(8, 8), anchor_threshold=4.0)
    assert list(zip(assigned.cell_x.tolist(), assigned.cell_y.tolist())) == [(0, 7)]


def test_zero_size_boxes_are_accepted_and_teach_nothing() -> None:
    model = stub_model(num_classes=3)
    outputs = [torch.randn(1, 3 * 8, size, size) for size in GRIDS]
    losses = YoloLoss(model)(outputs, [target([[10, 10, 10, 40]], [0])])
    assert losses["box"] == 0 and losses["cls"] == 0 and torch.isfinite(losses["obj"])


def perfect_outputs(model: SimpleNamespace, targets: list[dict]) -> list[torch.Tensor]:
    """Raw outputs whose every assigned prediction decodes exactly to its target, with objectness and class
    logits of +-20: the ideal detector for these targets."""
    num_anchors, num_classes = model.anchors.shape[1], model.num_classes
    rows = targets_to_tensor(targets, num_classes, torch.device("cpu"))
    outputs = []
    for stride, anchors, size in zip(model.strides, model.anchors, GRIDS):
        level = torch.full((len(targets), num_anchors, size, size, 5 + num_classes), -20.0)
        grid_rows = rows.clone()
        grid_rows[:, 2:] /= stride
        assigned = assign_level(grid_rows, anchors / stride, (size, size), 4.0)
        where = (assigned.image, assigned.anchor, assigned.cell_y, assigned.cell_x)
        flat = ((where[0] * num_anchors + where[1]) * size + where[2]) * size + where[3]
        assert flat.unique().numel() == flat.numel(), "test targets must not share a prediction"
        # invert xy = 2*sigmoid - 0.5 and wh = (2*sigmoid)^2 * anchor
        level[(*where, slice(0, 2))] = torch.logit((assigned.boxes[:, :2] + 0.5) / 2)
        anchor_wh = anchors[assigned.anchor] / stride
        level[(*where, slice(2, 4))] = torch.logit((assigned.boxes[:, 2:] / anchor_wh).sqrt() / 2)
        level[(*where, 4)] = 20.0
        level[(*where, 5 + assigned.labels)] = 20.0
        outputs.append(to_head_layout(level))
    return outputs


def test_perfect_predictions_have_near_zero_loss() -> None:
    model = stub_model(num_classes=3)
    losses = YoloLoss(model)(perfect_outputs(model, TARGETS), TARGETS)
    for name, value in losses.items():
        assert value.item() < 1e-4, name


def test_loss_terms_scale_with_the_batch_size() -> None:
    """Each term is a per-image mean times the batch size: a batch of the same image twice doubles it."""
    torch.manual_seed(0)
    model = stub_model(num_classes=3)
    single = [torch.randn(1, 3 * 8, size, size) for size in GRIDS]
    double = [torch.cat([o, o]) for o in single]
    loss = YoloLoss(model)
    one, two = loss(single, TARGETS[:1]), loss(double, TARGETS[:1] * 2)
    for name in one:
        assert torch.allclose(two[name], 2 * one[name], rtol=1e-5), name


def test_gains_weight_their_terms() -> None:
    torch.manual_seed(0)
    model = stub_model(num_classes=3)
    outputs = [torch.randn(2, 3 * 8, size, size) for size in GRIDS]
    base = YoloLoss(model)(outputs, TARGETS)
    scaled = YoloLoss(model, box_gain=0.1, obj_gain=3.0, cls_gain=0.25)(outputs, TARGETS)
    assert torch.allclose(scaled["box"], 2 * base["box"])
    assert torch.allclose(scaled["obj"], 3 * base["obj"])
    assert torch.allclose(scaled["cls"], 0.5 * base["cls"])


def test_loss_decreases_over_20_sgd_steps_on_one_tiny_batch() -> None:
    torch.manual_seed(0)
    model = yolov4(num_classes=3, width=0.125, depth=0.33, anchors=scale_anchors(None, 64 / 416))
    images = torch.rand(2, 3, 64, 64)
    targets = [target([[5, 10, 30, 45], [35, 35, 60, 55]], [0, 2]), target([[15, 15, 25, 25]], [1])]
    loss = YoloLoss(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    history = []
    for _ in range(20):
        losses = loss(model(images), targets)
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()
        history.append({k: v.item() for k, v in losses.items()})
    print(f"\ntotal loss {history[0]['total']:.3f} -> {history[-1]['total']:.3f}", end="")
    assert history[-1]["total"] < 0.6 * history[0]["total"]


def test_every_term_is_minimised_by_gradient_descent_on_the_raw_outputs() -> None:
    """The gradients of the CIoU (through the decoding), objectness and class terms all point downhill."""
    torch.manual_seed(0)
    outputs = [torch.randn(2, 3 * 8, size, size, requires_grad=True) for size in GRIDS]
    optimizer = torch.optim.Adam(outputs, lr=0.05)
    loss = YoloLoss(stub_model(num_classes=3))
    first = {k: v.item() for k, v in loss(outputs, TARGETS).items()}
    for _ in range(60):
        losses = loss(outputs, TARGETS)
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()
    for name, value in loss(outputs, TARGETS).items():
        assert value.item() < 0.3 * first[name], name


def test_bad_targets_are_rejected_with_clear_errors() -> None:
    model = stub_model(num_classes=3)
    outputs = [torch.zeros(1, 3 * 8, size, size) for size in GRIDS]
    loss = YoloLoss(model)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        loss(outputs, [target([[0, 0, 10, 10]], [3])])
    with pytest.raises(ValueError, match="1 boxes but 2 labels"):
        loss(outputs, [target([[0, 0, 10, 10]], [0, 1])])
    with pytest.raises(ValueError, match="x2 >= x1"):
        loss(outputs, [target([[10, 0, 5, 10]], [0])])
    with pytest.raises(ValueError, match="2 targets for a batch of 1"):
        loss(outputs, TARGETS)
    with pytest.raises(ValueError, match="'boxes' and 'labels'"):
        loss(outputs, [{"boxes": torch.zeros(0, 4)}])
    with pytest.raises(ValueError, match="anchor_threshold"):
        YoloLoss(model, anchor_threshold=1.0)
