"""Localization-aware channel pruning (gcp.core.lcp): its boxes, its loss, its greedy selection, and the call."""

import copy

import pytest
import torch
from _core_toys import ToyDetector, randomise_bn
from torch import nn

import gcp
import gcp.core.lcp as lcp


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    """Fewer greedy steps, samples and head-training steps: the same algorithm, sized for a test."""
    monkeypatch.setattr(lcp, "ROUNDS", 8)
    monkeypatch.setattr(lcp, "SAMPLES", 128)
    monkeypatch.setattr(lcp, "AUX_STEPS", 40)


def boxes_targets(n_images: int, size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(n_images):
        xy = torch.rand(2, 2, generator=g) * (size * 0.6)
        wh = size * 0.15 + torch.rand(2, 2, generator=g) * size * 0.3
        boxes = torch.cat([xy, (xy + wh).clamp(max=size)], 1)
        targets.append({"boxes": boxes, "labels": torch.randint(3, (2,), generator=g)})
    return targets


# --- boxes and loss, hand-worked -----------------------------------------------------------------------------


def test_enclosing_box_c_of_b_and_its_ground_truth():
    b = torch.tensor([[0.0, 0.0, 10.0, 10.0], [6.0, 6.0, 8.0, 8.0], [0.0, 0.0, 4.0, 4.0]])
    a = torch.tensor([[5.0, 5.0, 20.0, 15.0], [5.0, 5.0, 9.0, 9.0], [0.0, 0.0, 4.0, 4.0]])
    expected = torch.tensor([[0.0, 0.0, 20.0, 15.0], [5.0, 5.0, 9.0, 9.0], [0.0, 0.0, 4.0, 4.0]])
    assert torch.equal(lcp.enclosing_boxes(b, a), expected)


def test_contextual_rois_on_a_hand_worked_grid():
    # 32-px image, stride 8 (4 x 4 cells), one 16-px prior shape. The ground truth (8, 8, 24, 24) overlaps the
    # four priors around its centre by IoU 144 / 368 = 0.39 < 0.5: only its best prior (the first of the tie,
    # centred at (12, 12)) is positive, B = (4, 4, 20, 20), and C encloses B and A: (4, 4, 24, 24).
    shapes = torch.tensor([[16.0, 16.0]])
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 24.0, 24.0]]), "labels": torch.tensor([2])}]
    rois = lcp.positive_rois(targets, 8.0, (4, 4), shapes, torch.Generator().manual_seed(0))
    assert torch.equal(rois["b"], torch.tensor([[4.0, 4.0, 20.0, 20.0]]))
    assert torch.equal(rois["c"], torch.tensor([[4.0, 4.0, 24.0, 24.0]]))
    assert rois["labels"].tolist() == [2] and rois["image"].tolist() == [0]
    # A ground truth equal to a prior matches it with IoU 1 and nothing else (neighbours: 128 / 384): C = B = A.
    targets = [{"boxes": torch.tensor([[12.0, 12.0, 28.0, 28.0]]), "labels": torch.tensor([0])}]
    rois = lcp.positive_rois(targets, 8.0, (4, 4), shapes, torch.Generator().manual_seed(0))
    assert torch.equal(rois["b"], targets[0]["boxes"]) and torch.equal(rois["c"], targets[0]["boxes"])


def test_grid_priors_are_centred_on_cells():
    priors = lcp.grid_priors(8.0, 2, 2, torch.tensor([[4.0, 2.0]]))
    assert torch.equal(priors[0], torch.tensor([2.0, 3.0, 6.0, 5.0]))
    assert torch.equal(priors[3], torch.tensor([10.0, 11.0, 14.0, 13.0]))


def test_giou_on_hand_worked_boxes():
    p = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 3.0, 1.0]])
    # identical: 1; overlap 1 of union 7 in a 3 x 3 hull: 1/7 - 2/9; disjoint, union 2 in a 3 x 1 hull: -1/3
    expected = torch.tensor([1.0, 1 / 7 - 2 / 9, -1 / 3])
    assert torch.allclose(lcp.giou(p, a), expected)


# --- greedy selection ----------------------------------------------------------------------------------------


def test_greedy_selection_picks_the_channel_a_layer_depends_on():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(256, 6, 9, generator=g)
    w0 = torch.zeros(4, 6, 9)
    w0[:, 3] = torch.randn(4, 9, generator=g)
    w0[:, 5] = 0.05 * torch.randn(4, 9, generator=g)
    order = lcp.greedy_order(6, [lcp.Consumer(p, w0, torch.arange(6))], rounds=6)
    assert order[:2].tolist() == [3, 5]
    assert sorted(order.tolist()) == list(range(6))


def test_greedy_selection_sums_the_copies_of_a_root_channel():
    # An SPP-like consumer reads root channel 1 three times with small weights; root channel 0 once, larger.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 2, 1, generator=g)
    p = x[:, [0, 1, 1, 1]]
    w0 = torch.tensor([[[1.0], [0.8], [0.8], [0.8]]])
    order = lcp.greedy_order(2, [lcp.Consumer(p, w0, torch.tensor([0, 1, 1, 1]))], rounds=2)
    assert order.tolist() == [1, 0]


# --- the toy where only some channels know where the box is --------------------------------------------------


# The texture is faint (amplitude 0.1) but read through large filters and γ: the weights L1 and γ judge are
# large, while the channels locate nothing.
NOISE = 0.1


class LocToy(nn.Module):
    """conv → BN → ReLU → 1x1 conv → BN → ReLU → prediction. Input channel 0 holds the object (1 inside its box),
    channel 1 faint texture noise. Channels 0-3 of the first conv are edge detectors on the object (small filters and
    γ); channels 4-7 copy the noise (large filters and γ). The 1x1 conv reads all eight alike."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.next = nn.Conv2d(8, 8, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pred = nn.Conv2d(8, 6, 1)
        with torch.no_grad():
            w = torch.zeros(8, 3, 3, 3)
            edge = torch.tensor([[0.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
            for k, kernel in enumerate((edge, edge.flip(1), edge.T, edge.T.flip(0))):
                w[k, 0] = 0.5 * kernel
            g = torch.Generator().manual_seed(3)
            w[4:, 1] = torch.randn(4, 3, 3, generator=g)
            self.conv.weight.copy_(w)
            self.bn.weight.copy_(torch.tensor([0.5] * 4 + [1.0] * 4))
            self.bn.bias.zero_()
            signs = torch.where(torch.rand(8, 8, 1, 1, generator=g) < 0.5, -1.0, 1.0)
            self.next.weight.copy_(signs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        return self.pred(torch.relu(self.bn2(self.next(h))))


def loc_data(n: int = 8, size: int = 32, noise: float = NOISE) -> list:
    g = torch.Generator().manual_seed(5)
    images = torch.zeros(n, 3, size, size)
    images[:, 1] = noise * torch.rand(n, size, size, generator=g)
    targets = []
    for i in range(n):
        x0, y0 = (torch.randint(0, size - 16, (2,), generator=g)).tolist()
        w, h = (torch.randint(8, 16, (2,), generator=g)).tolist()
        images[i, 0, y0 : y0 + h, x0 : x0 + w] = 1.0
        targets.append(
            {"boxes": torch.tensor([[x0, y0, x0 + w, y0 + h]], dtype=torch.float32), "labels": [0]}
        )
    for t in targets:
        t["labels"] = torch.tensor(t["labels"])
    return [(images, targets)]


def kept_first_layer(method: str, **kw) -> set[int]:
    model = LocToy().eval()
    calib = loc_data()
    before = model.conv.weight.detach().clone()
    gcp.prune_detector(model, calib[0][0][:1], ratio=0.5, method=method, round_to=1, calib_data=calib, **kw)
    kept = set()
    for row in model.conv.weight.detach():
        kept |= {i for i in range(8) if torch.equal(row, before[i])}
    return kept


def test_lcp_keeps_the_channels_that_locate_the_box_where_l1_and_gamma_do_not():
    loc = {0, 1, 2, 3}
    assert kept_first_layer("lcp") == loc
    assert not loc <= kept_first_layer("l1")
    assert not loc <= kept_first_layer("slim")


def test_without_the_localization_term_reconstruction_alone_keeps_the_loud_channels(monkeypatch):
    monkeypatch.setattr(lcp, "ALPHA", 0.0)
    assert kept_first_layer("lcp") != {0, 1, 2, 3}


# --- the call ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", ["channels", "params", "macs"])
def test_budgets_are_met_within_one_point(budget):
    torch.manual_seed(0)
    model = randomise_bn(ToyDetector(), 0)
    images = torch.rand(4, 3, 64, 64)
    calib = [(images, boxes_targets(4, 64, 1))]
    shapes = [o.shape for o in model(images[:1])]
    result = gcp.prune_detector(
        model, images[:1], ratio=0.3, method="lcp", budget=budget, round_to=1, calib_data=calib
    )
    assert abs(result.report["achieved"] - 0.3) <= 0.01
    assert [o.shape for o in model(images[:1])] == shapes
    entry = result.report["lcp"]
    assert entry["seconds"] and all(s >= 0 for s in entry["seconds"].values())
    assert set(entry["seconds"]) == set(entry["positive_boxes"])


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "calib, message",
    [
        (None, "no calib_data"),
        ("images", "images without boxes"),
        ("image_batches", "not \\(images, targets\\)"),
        ("no_boxes_key", "has no 'boxes'"),
        ("empty_boxes", "no ground-truth box"),
    ],
)
def test_refusal_leaves_model_and_data_untouched(calib, message):
    torch.manual_seed(0)
    model = randomise_bn(ToyDetector(), 0)
    before = state(model)
    images = torch.rand(2, 3, 64, 64)
    kept_images = images.clone()
    targets = boxes_targets(2, 64, 0)
    cases = {
        None: None,
        "images": images,
        "image_batches": [images],
        "no_boxes_key": [(images, [{"labels": t["labels"]} for t in targets])],
        "empty_boxes": [(images, [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)} for _ in targets])],
    }
    with pytest.raises(ValueError, match=message):
        gcp.prune_detector(model, images[:1], ratio=0.3, method="lcp", calib_data=cases[calib])
    after = state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(images, kept_images)


def test_a_successful_run_leaves_the_calibration_data_as_given():
    torch.manual_seed(0)
    model = randomise_bn(ToyDetector(), 0)
    images = torch.rand(2, 3, 64, 64)
    targets = boxes_targets(2, 64, 2)
    given = (images.clone(), copy.deepcopy(targets))
    gcp.prune_detector(model, images[:1], ratio=0.3, method="lcp", calib_data=[(images, targets)])
    assert torch.equal(images, given[0])
    for t, g in zip(targets, given[1]):
        assert torch.equal(t["boxes"], g["boxes"]) and torch.equal(t["labels"], g["labels"])
