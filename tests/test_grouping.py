import warnings

import pytest
import torch
from _core_toys import ToyDetector, randomise_bn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import grouping
from grouping import Group, allocate, find_valley, groups_from_patterns, partition, quantile_threshold


@pytest.fixture(scope="module")
def toy():
    return randomise_bn(ToyDetector()), torch.randn(1, 3, 64, 64)


def test_partition_finds_backbone_neck_head(toy):
    model, x = toy
    groups = partition(model, x)
    kinds = [g.kind for g in groups]
    assert kinds == ["backbone", "backbone", "backbone", "neck", "head"]
    assert [g.stride for g in groups[:3]] == [4, 8, 16]
    by_name = {g.name: g for g in groups}
    assert "head8.0.1" in by_name["head"].layers and "head16.0.1" in by_name["head"].layers
    assert "down.1" in by_name["head"].layers  # the bottom-up path joins the heads (paper Group5)
    # the CBL before the upsample opens the top-down neck (paper Group4 starts at layer 117)
    assert by_name["neck"].layers == ["lateral.1", "fuse.1"]
    assert (
        "spp.cv2.1" in by_name["backbone_s16"].layers
    )  # CBLs around SPP sit with backbone stride 32 (Group3)
    every = [n for g in groups for n in g.layers]
    assert sorted(every) == sorted(grouping.prunable_norms(model))
    assert len(every) == len(set(every))


def test_partition_leaves_model_untouched(toy):
    model, x = toy
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    partition(model, x)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()


def test_partition_single_output_falls_back_to_strides():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16)
    )
    with pytest.warns(UserWarning, match="stride-only"):
        groups = partition(model, torch.randn(1, 3, 32, 32))
    assert [g.kind for g in groups] == ["stride", "stride"]
    assert [g.layers for g in groups] == [["1"], ["4"]]


def test_partition_needs_batchnorm():
    with pytest.raises(ValueError, match="no affine BatchNorm"):
        partition(nn.Conv2d(3, 3, 1), torch.randn(1, 3, 8, 8))


def test_patterns_errors_name_the_problem(toy):
    model, _ = toy
    with pytest.raises(ValueError, match="matches no BatchNorm layer"):
        groups_from_patterns(model, {"a": ["nothing.*"]})
    with pytest.raises(ValueError, match="matched by both"):
        groups_from_patterns(model, {"a": ["stem.*"], "b": ["stem.1"]})
    groups = groups_from_patterns(model, {"early": ["stem.*", "stage1.*"], "late": "head*"})
    assert groups[0].layers[0] == "stem.1" and all(n.startswith("head") for n in groups[1].layers)


def _groups_with(values):
    groups, imps = [], {}
    for i, v in enumerate(values):
        groups.append(Group(f"g{i}", [f"l{i}"], 0, "custom"))
        imps[f"l{i}"] = torch.as_tensor(v, dtype=torch.float32)
    return groups, imps


def test_explicit_allocation_is_per_group_quantile():
    groups, imps = _groups_with([torch.arange(1, 11) / 10, torch.arange(1, 21) / 10])
    alloc = allocate(groups, imps, {"g0": 0.3, "g1": 0.5}, "explicit")
    assert alloc.ratios == {"g0": pytest.approx(0.3), "g1": pytest.approx(0.5)}
    assert alloc.achieved == pytest.approx((3 + 10) / 30)
    with pytest.raises(ValueError, match="missing groups"):
        allocate(groups, imps, {"g0": 0.3}, "explicit")
    with pytest.raises(ValueError, match=r"unknown groups \['zz'\]; valid groups: \['g0', 'g1'\]"):
        allocate(groups, imps, {"g0": 0.3, "g1": 0.1, "zz": 0.1}, "explicit")


def test_paper_allocation_prunes_each_group_by_the_total_ratio():
    groups, imps = _groups_with([torch.rand(100), torch.rand(300) * 5])
    alloc = allocate(groups, imps, 0.4, "paper")
    assert alloc.achieved == pytest.approx(0.4, abs=0.005)
    assert alloc.ratios["g0"] == pytest.approx(0.4, abs=0.01) and alloc.ratios["g1"] == pytest.approx(
        0.4, abs=0.01
    )


def _bimodal(n_low, n_high, low, high, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.rand(n_low, generator=g) * low, high * (1 + torch.rand(n_high, generator=g))])


def test_valley_sits_between_the_modes():
    values = _bimodal(600, 400, 1e-3, 0.5, 0)
    v = find_valley(values)
    assert 1e-3 <= v <= 0.5


def test_unimodal_gamma_has_no_valley():
    generator = torch.Generator().manual_seed(0)
    assert find_valley(1.0 + 0.015 * torch.randn(500, generator=generator)) is None
    assert find_valley(torch.rand(500, generator=generator)) is None  # spread, but one mode


def test_identical_unimodal_groups_get_the_requested_ratio_each_and_are_named_in_a_warning():
    generator = torch.Generator().manual_seed(0)
    values = [1.0 + 0.015 * torch.randn(n, generator=generator) for n in (200, 300, 400, 500, 600)]
    groups, imps = _groups_with(values)
    with pytest.warns(UserWarning, match=r"no valley"):
        alloc = allocate(groups, imps, 0.25, "valley")
    assert abs(alloc.achieved - 0.25) <= 0.005
    for name, ratio in alloc.ratios.items():
        assert ratio == pytest.approx(0.25, abs=0.03), (name, alloc.ratios)


def test_valley_groups_lose_their_near_zero_mode_first_then_the_same_share_of_every_groups_survivors():
    groups, imps = _groups_with([_bimodal(300, 700, 1e-3, 0.5, 1), 0.5 * (1 + torch.rand(1000))])
    with pytest.warns(UserWarning, match=r"\['g1'\]"):
        below = allocate(groups, imps, 0.1, "valley")
    assert below.ratios["g1"] == 0.0 and below.ratios["g0"] == pytest.approx(0.2, abs=0.01)
    with pytest.warns(UserWarning):
        above = allocate(groups, imps, 0.4, "valley")
    survivors_cut = above.ratios["g1"]  # g1 has no near-zero mode: all of it survives sparse training
    assert above.ratios["g0"] == pytest.approx(0.3 + 0.7 * survivors_cut, abs=0.01)
    assert abs(above.achieved - 0.4) <= 0.005


def test_automatic_allocators_never_empty_a_group():
    # group 0's γ are all far below group 1's: one global threshold would take all of it
    groups, imps = _groups_with([0.001 * (1 + torch.rand(300)), 1 + torch.rand(700)])
    for strategy in ("valley", "paper"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            alloc = allocate(groups, imps, 0.4, strategy)
        assert alloc.ratios["g0"] <= 0.9 + 1e-6, (strategy, alloc.ratios)
        assert abs(alloc.achieved - 0.4) <= 0.005


def test_valley_allocation_meets_budget_and_prunes_redundant_group_more():
    # group 0: 90 % near zero (redundant, like the paper's Group3); group 1: 10 % near zero
    groups, imps = _groups_with([_bimodal(900, 100, 1e-3, 0.5, 1), _bimodal(100, 900, 1e-3, 0.5, 2)])
    alloc = allocate(groups, imps, 0.45, "valley")
    assert abs(alloc.achieved - 0.45) <= 0.005
    assert alloc.ratios["g0"] > 0.8 and alloc.ratios["g1"] < 0.2


def test_max_group_ratio_caps_a_group_and_the_others_make_up_the_total():
    # group 0 is almost all near zero: uncapped, valley takes 95 % of it
    groups, imps = _groups_with([_bimodal(950, 50, 1e-3, 0.5, 3), _bimodal(100, 900, 1e-3, 0.5, 4)])
    uncapped = allocate(groups, imps, 0.52, "valley", max_group_ratio=1.0)
    capped = allocate(groups, imps, 0.5, "valley", max_group_ratio=0.6)
    assert uncapped.ratios["g0"] > 0.9
    assert capped.ratios["g0"] == pytest.approx(0.6, abs=1e-6)
    assert abs(capped.achieved - 0.5) <= 0.005  # the other group makes up the total
    with pytest.raises(ValueError, match="max_group_ratio"):
        allocate(groups, imps, 0.5, "valley", max_group_ratio=0.0)


def test_allocation_rejects_bad_ratio():
    groups, imps = _groups_with([torch.rand(10)])
    for bad in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(ValueError, match="ratio must be in"):
            allocate(groups, imps, bad, "valley")
    with pytest.raises(ValueError, match="unknown allocator"):
        allocate(groups, imps, 0.5, "magic")


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(0.0, 10.0, allow_nan=False), min_size=1, max_size=60, unique=True), st.floats(0.0, 1.0)
)
def test_quantile_threshold_removes_exactly_the_rounded_count(values, ratio):
    t = torch.tensor(values, dtype=torch.float64)
    threshold = quantile_threshold(t, ratio)
    expected = int(round(ratio * len(values)))
    with warnings.catch_warnings():
        assert int((t < threshold).sum()) == expected


def test_partition_reproduces_the_papers_five_yolov4_groups():
    """Paper §4.2.1 / §5.3: G1 backbone to stride 8, G2 stride 16, G3 stride 32 with the CBLs around SPP,
    G4 the PANet top-down neck, G5 the heads with the bottom-up path."""
    from gcp.detection.models import yolov4

    model = yolov4(num_classes=3, width=0.125, depth=0.33).eval()
    groups = partition(model, torch.randn(1, 3, 128, 128))

    def prefixes(group):
        return {".".join(n.split(".")[:2]) for n in group.layers}

    assert [g.name for g in groups] == ["backbone_s8", "backbone_s16", "backbone_s32", "neck", "head"]
    g1, g2, g3, g4, g5 = groups
    assert prefixes(g1) == {"backbone.stem", "backbone.stage1", "backbone.stage2", "backbone.stage3"}
    assert prefixes(g2) == {"backbone.stage4"}
    assert prefixes(g3) == {"backbone.stage5", "spp.pre", "spp.post"}
    assert g3.layers[-1] == "spp.post.2.bn"  # layer 116 ends Group3
    assert g4.layers[0] == "neck.reduce_p5.bn"  # layer 117 opens Group4
    assert prefixes(g4) == {
        "neck.reduce_p5",
        "neck.lateral_c4",
        "neck.fuse_p4",
        "neck.reduce_p4",
        "neck.lateral_c3",
        "neck.fuse_p3",
    }
    assert {"head.0", "head.1", "head.2", "neck.down_p3"} <= prefixes(g5)
    assert sum(len(g.layers) for g in groups) == len(grouping.prunable_norms(model))


def test_full_depth_yolov4_groups_hold_as_many_bn_layers_as_the_papers_layer_ranges():
    """§5.3's darknet ranges, counting the conv layers with BatchNorm: Group3 86–116 has 19 (13 in the CSP
    stage, 6 around SPP), Group4 117–136 has 14, Group5 137–161 has 15. Group1 0–55 and Group2 56–85 hold
    38 + 21: layer 55, the stride-2 CBM opening the 26×26 stage, is in our stride-16 group, as §5.3's own
    description of Group2 ("the feature layer at 26×26 scales along with the CSP module") places it."""
    from gcp.detection.models import yolov4

    model = yolov4(num_classes=3, width=0.125, depth=1.0).eval()
    groups = partition(model, torch.randn(1, 3, 64, 64))
    assert [len(g.layers) for g in groups] == [38, 21, 19, 14, 15]
    assert groups[1].layers[0] == "backbone.stage4.downsample.bn"


def test_yolov3_cbl_before_the_first_upsample_is_neck_not_backbone():
    from gcp.detection.models import yolov3

    model = yolov3(num_classes=3, width=0.125, depth=0.33).eval()
    groups = {g.name: g for g in partition(model, torch.randn(1, 3, 128, 128))}
    assert "neck.reduce_p5.bn" in groups["neck"].layers
    assert groups["backbone_s32"].layers[-1] == "neck.fuse_p5.4.bn"  # reaches the stride-32 head directly
