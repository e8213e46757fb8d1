"""Localization-aware channel pruning (LCP; Xie et al., arXiv 1911.02237 v3) on top of DCP (Zhuang et al.,
NeurIPS 2018), as the channel ranking of ``prune_detector(method="lcp")``.

Per prunable unit (channels that torch-pruning couples, decided together) this module

1. reads the unit's output feature map on the labelled calibration images (``calib_data``: (images, targets)
   batches in the project's format, boxes xyxy in pixels) and the sampled input columns / outputs of every dense
   layer that consumes it (the "next layer" of DCP's reconstruction loss);
2. builds LCP's auxiliary network on that map: a contextual RoIAlign over the positive default boxes, the
   RoIAlign feature of each positive box B concatenated with that of C, the smallest box enclosing B and its
   ground-truth box A, then a small classifier and box regressor, trained briefly with the network frozen on
   L_a = cross-entropy + (1 − GIoU);
3. orders the unit's channels by DCP's greedy selection on L = L_rec + α·L_a: starting from no channel and all
   channel weights zero, repeatedly add the channels with the largest ‖∂L/∂W_k‖² (W_k: every weight that reads
   channel k, in the consumers and in the auxiliary head's first layer), then update the kept weights.

The order becomes the unit's score (first selected = most important), and ``prune_detector`` removes the same
fraction of every unit, bisected to meet the ``channels``/``params``/``macs`` budget, exactly as for l1/thinet.

Where this detector forced a choice the papers do not make (section numbers as we read the papers; DCP §3.2–3.3
and its Algorithm 2 for the greedy selection, LCP §3 for the auxiliary network, contextual RoIAlign and loss):

* **Calibration data.** The papers train on the full training set; here a handful of labelled batches
  (``calib_data``), each unit's map at most ``MAX_ROIS`` positives (a seeded sample), RoIAlign output 3 × 3.
* **Default boxes.** LCP prunes SSD, whose default boxes per feature map are part of the detector. Our YOLOs have
  anchors per *head* scale only, and a unit inside the backbone has no boxes of its own. We take as default boxes
  of a unit's map with stride s YOLO's grid priors: one box per cell centre ((j + ½)s, (i + ½)s) and prior shape,
  the shapes being the model's ``anchors`` (all scales; gcp's detectors carry them) or, for an anchor-free
  model, squares of side 8, 16, 32, … px up to the image size. Positives follow SSD's matching, which LCP
  inherits: IoU ≥ 0.5 with a ground-truth box, plus the best prior of every ground-truth box.
* **Auxiliary network.** DCP puts its discrimination-aware losses after whole stages and prunes the layers of a
  stage in turn; LCP attaches the auxiliary network at the pruned layer's output. Here it sits on the *unit's*
  output map (for coupled residual channels, the shared map), is one hidden layer of ``HIDDEN`` units over the
  concatenated 3 × 3 RoIAlign features of B and C, then a linear classifier over the classes present (positives
  only, no background class: YOLO has no SSD background logit) and a linear regressor of (dx, dy, dw, dh) from B,
  decoded as in SSD and scored by GIoU against A. Its first layer is treated as one more consumer of the unit's
  channels, so ‖∂L/∂W_k‖² sums the consumers' and the head's weight slices of channel k. Two details are ours:
  the head's input is centred over the positives (a constant channel locates nothing, and otherwise reaches the
  gradient through the bias), and its hidden activation is tanh, not ReLU, whose slope at DCP's start (all
  channel weights zero, hidden = act(bias)) would be zero for every hidden unit with a negative bias.
* **Reconstruction.** L_rec is each consumer's output restricted to this unit's input channels, sampled at
  ``SAMPLES`` positions and normalised by its energy, summed over consumers (a YOLO channel often feeds several
  layers: a residual add, a concat, an SPP; a channel read twice, as by an SPP concat, sums its copies); DCP has
  one next layer per pruned layer. The columns are centred: ``prune_detector`` folds a removed channel's mean
  activation into its consumers, so only the variation around it is lost. A unit whose readers we cannot
  observe (no Conv2d/ConvTranspose2d reads it) is ranked by filter L1 norm, as ThiNet's fallback.
* **Greedy steps and weight updates.** DCP adds one channel per step and re-solves W_A by SGD. To fit the cost
  target (a whole YOLOv4 in minutes on two CPU cores) we add ⌈N / ``ROUNDS``⌉ channels per step, ordered inside
  the step by their gradient norm, and update the kept consumer weights by ``UPDATE_STEPS`` steepest-descent
  steps with exact line search on the quadratic L_rec and the head by ``UPDATE_STEPS`` Adam steps. A channel
  entering A starts from its trained weight (DCP fine-tunes from the pre-trained model), not from zero.
* **Shares and weights.** DCP prunes each layer to one uniform rate, sequentially, writing the re-solved weights
  into the network. ``prune_detector`` ranks every unit on the unpruned network and bisects one fraction for the
  whole model so the budget lands; the re-solved weights only serve the ranking, and the removed channels' mean
  activation is folded into their consumers as for every other method.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import box_iou, roi_align

from gcp.core.importance import L1FilterImportance, conv_columns

ROUNDS = 16  # greedy steps per unit
UPDATE_STEPS = 3  # weight updates after each greedy step
SAMPLES = 512  # sampled output positions per consumer for L_rec
MAX_ROIS = 256  # positive default boxes per unit
ROI_SIZE = 3  # RoIAlign output size
HIDDEN = 64  # hidden units of the auxiliary head
AUX_STEPS = 150  # Adam steps training the auxiliary head on the frozen network
ALPHA = 1.0  # weight of L_a in L = L_rec + α·L_a
POSITIVE_IOU = 0.5  # SSD's matching threshold


def check_calib_targets(calib_data: Any) -> list[tuple[torch.Tensor, list[dict[str, torch.Tensor]]]]:
    """The labelled calibration batches of ``method="lcp"``, checked; raises ValueError naming what is wrong.

    ``calib_data`` must be an iterable of ``(images, targets)`` batches: ``images`` a (B, 3, H, W) tensor and
    ``targets`` B dicts with ``boxes`` (N, 4, xyxy pixels) and ``labels`` (N,), at least one box overall. Nothing
    is modified; the batches are returned as given.
    """
    hint = (
        "method='lcp' needs calib_data as a list of (images, targets) batches, targets being dicts with 'boxes' "
        "(xyxy pixels) and 'labels' (the format of gcp.detection.data)"
    )
    if calib_data is None or isinstance(calib_data, torch.Tensor):
        raise ValueError(f"{hint}; got {'no calib_data' if calib_data is None else 'images without boxes'}")
    batches = list(calib_data)
    if not batches:
        raise ValueError(f"{hint}; calib_data is empty")
    boxes_seen = 0
    for i, batch in enumerate(batches):
        if not (isinstance(batch, (list, tuple)) and len(batch) == 2 and isinstance(batch[0], torch.Tensor)):
            raise ValueError(
                f"{hint}; batch {i} is {type(batch).__name__}, not (images, targets) (images without boxes? a "
                "single batch must be wrapped in a list)"
            )
        images, targets = batch
        if images.dim() != 4:
            raise ValueError(
                f"{hint}; batch {i}: images must be (B, 3, H, W), got shape {tuple(images.shape)}"
            )
        if not isinstance(targets, (list, tuple)) or len(targets) != images.shape[0]:
            raise ValueError(f"{hint}; batch {i}: targets must be a list of {images.shape[0]} dicts")
        for j, target in enumerate(targets):
            if not isinstance(target, dict) or "boxes" not in target or "labels" not in target:
                raise ValueError(f"{hint}; batch {i}, image {j}: the target has no 'boxes' and 'labels'")
            boxes, labels = torch.as_tensor(target["boxes"]), torch.as_tensor(target["labels"])
            if boxes.numel() and (boxes.dim() != 2 or boxes.shape[1] != 4):
                raise ValueError(
                    f"{hint}; batch {i}, image {j}: boxes must be (N, 4), got {tuple(boxes.shape)}"
                )
            if labels.numel() != boxes.reshape(-1, 4).shape[0]:
                raise ValueError(
                    f"{hint}; batch {i}, image {j}: {labels.numel()} labels for {len(boxes)} boxes"
                )
            if boxes.numel() and not torch.isfinite(boxes).all():
                raise ValueError(f"{hint}; batch {i}, image {j}: non-finite boxes")
            boxes_seen += labels.numel()
    if boxes_seen == 0:
        raise ValueError(f"{hint}; the calibration images hold no ground-truth box")
    return batches


# --- boxes -------------------------------------------------------------------------------------------------


def enclosing_boxes(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """C: the smallest box enclosing box B and its ground truth A (row by row, xyxy)."""
    return torch.cat([torch.minimum(b[:, :2], a[:, :2]), torch.maximum(b[:, 2:], a[:, 2:])], 1)


def giou(p: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Generalized IoU (Rezatofighi et al. 2019) of boxes ``p`` and ``a`` row by row (xyxy): IoU − |C∖(P∪A)|/|C|."""
    lt, rb = torch.maximum(p[:, :2], a[:, :2]), torch.minimum(p[:, 2:], a[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area_p = (p[:, 2:] - p[:, :2]).clamp(min=0).prod(1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(1)
    union = area_p + area_a - inter
    c = enclosing_boxes(p, a)
    area_c = (c[:, 2:] - c[:, :2]).clamp(min=0).prod(1)
    return inter / union.clamp(min=1e-9) - (area_c - union) / area_c.clamp(min=1e-9)


def prior_shapes(model: nn.Module, image_size: int) -> torch.Tensor:
    """(w, h) of the grid priors: the model's anchors (any scale), else squares 8, 16, … px up to the image."""
    anchors = getattr(model, "anchors", None)
    if isinstance(anchors, torch.Tensor) and anchors.numel() and anchors.shape[-1] == 2:
        return torch.unique(anchors.detach().float().cpu().reshape(-1, 2), dim=0)
    sides = [8.0 * 2**k for k in range(int(math.log2(max(image_size, 8) / 8)) + 1)]
    return torch.tensor([[s, s] for s in sides])


def grid_priors(stride: float, height: int, width: int, shapes: torch.Tensor) -> torch.Tensor:
    """YOLO's default boxes of a (height, width) map: every prior shape centred on every cell centre, xyxy."""
    ys, xs = torch.meshgrid(
        (torch.arange(height) + 0.5) * stride, (torch.arange(width) + 0.5) * stride, indexing="ij"
    )
    centres = torch.stack([xs, ys], -1).reshape(-1, 1, 2)
    half = shapes.reshape(1, -1, 2) / 2
    return torch.cat([centres - half, centres + half], -1).reshape(-1, 4)


def match_priors(priors: torch.Tensor, gt: torch.Tensor, threshold: float = POSITIVE_IOU) -> torch.Tensor:
    """SSD's matching (which LCP inherits): (prior index, gt index) of every prior with IoU ≥ ``threshold`` to
    its best ground truth, plus the best prior of every ground truth."""
    if gt.numel() == 0:
        return torch.zeros(0, 2, dtype=torch.long)
    iou = box_iou(priors, gt)  # (P, G)
    best_gt_iou, best_gt = iou.max(1)
    best_gt_iou = best_gt_iou.clone()
    forced = iou.argmax(0)  # best prior per gt
    best_gt[forced] = torch.arange(gt.shape[0])
    best_gt_iou[forced] = 2.0
    idx = torch.nonzero(best_gt_iou >= threshold).flatten()
    return torch.stack([idx, best_gt[idx]], 1)


def contextual_rois(priors: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The contextual RoIAlign's two boxes per positive: B itself and C enclosing B and its ground truth A."""
    return priors, enclosing_boxes(priors, gt)


def decode(b: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """SSD/Faster R-CNN box coding: (dx, dy, dw, dh) relative to box B, to an xyxy box."""
    wh = (b[:, 2:] - b[:, :2]).clamp(min=1e-3)
    centre = (b[:, :2] + b[:, 2:]) / 2 + deltas[:, :2] * wh
    size = wh * torch.exp(deltas[:, 2:].clamp(max=4.0))
    return torch.cat([centre - size / 2, centre + size / 2], 1)


# --- the auxiliary network ----------------------------------------------------------------------------------


class AuxHead:
    """LCP's auxiliary network on one unit's map: hidden = tanh(V1 · [RoIAlign(B), RoIAlign(C)] + b1), then a
    classifier and a box regressor. ``v1`` is (hidden, channels, 2·p²) so ``v1[:, k]`` is every weight that reads
    channel k."""

    def __init__(self, channels: int, classes: int, feat: int, generator: torch.Generator) -> None:
        def init(*shape: int, fan_in: int) -> torch.Tensor:
            return (torch.rand(*shape, generator=generator) * 2 - 1) / math.sqrt(fan_in)

        self.v1 = init(HIDDEN, channels, feat, fan_in=channels * feat)
        self.rest = [
            torch.zeros(HIDDEN),
            init(classes, HIDDEN, fan_in=HIDDEN),
            torch.zeros(classes),
            init(4, HIDDEN, fan_in=HIDDEN) * 0.1,
            torch.zeros(4),
        ]

    def loss(
        self,
        v1: torch.Tensor,
        rest: Sequence[torch.Tensor],
        feats: torch.Tensor,
        rois: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """L_a = cross-entropy + (1 − GIoU), each a mean over the positive boxes."""
        b1, wc, bc, wr, br = rest
        # tanh, not ReLU: its slope never vanishes, so at DCP's start (every channel weight zero) the gradient
        # ‖∂L_a/∂W_k‖ of every channel is defined by the channel, not by which hidden units happen to be alive.
        hidden = torch.tanh(torch.einsum("rcf,hcf->rh", feats, v1) + b1)
        logits = hidden @ wc.T + bc
        boxes = decode(rois["b"], hidden @ wr.T + br)
        return F.cross_entropy(logits, rois["labels"]) + (1.0 - giou(boxes, rois["a"])).mean()

    def train(self, feats: torch.Tensor, rois: dict[str, torch.Tensor], steps: int) -> None:
        """Brief training with the network frozen (the features are fixed)."""
        params = [self.v1.requires_grad_(), *(p.requires_grad_() for p in self.rest)]
        opt = torch.optim.Adam(params, lr=1e-2)
        for _ in range(steps):
            opt.zero_grad()
            self.loss(self.v1, self.rest, feats, rois).backward()
            opt.step()
        self.v1 = self.v1.detach()
        self.rest = [p.detach() for p in self.rest]


def roi_features(
    fmap: torch.Tensor, stride: float, rois: dict[str, torch.Tensor], size: int = ROI_SIZE
) -> torch.Tensor:
    """(R, channels, 2·size²): the RoIAlign features of B and of C for every positive, per channel."""
    feats = []
    for key in ("b", "c"):
        boxes = torch.cat([rois["image"].float()[:, None], rois[key]], 1)
        feats.append(roi_align(fmap, boxes, size, spatial_scale=1.0 / stride, sampling_ratio=2, aligned=True))
    return torch.cat([f.flatten(2) for f in feats], 2)


def positive_rois(
    targets: Sequence[dict[str, torch.Tensor]],
    stride: float,
    hw: tuple[int, int],
    shapes: torch.Tensor,
    generator: torch.Generator,
    max_rois: int = MAX_ROIS,
) -> dict[str, torch.Tensor]:
    """Positive default boxes of a map with ``stride``: image index, B, A (ground truth), C and labels."""
    priors = grid_priors(stride, hw[0], hw[1], shapes)
    found: dict[str, list[torch.Tensor]] = {"image": [], "b": [], "a": [], "labels": []}
    for i, target in enumerate(targets):
        gt = torch.as_tensor(target["boxes"]).detach().float().cpu().reshape(-1, 4)
        labels = torch.as_tensor(target["labels"]).detach().long().cpu().reshape(-1)
        pairs = match_priors(priors, gt)
        found["image"].append(torch.full((len(pairs),), i, dtype=torch.long))
        found["b"].append(priors[pairs[:, 0]])
        found["a"].append(gt[pairs[:, 1]])
        found["labels"].append(labels[pairs[:, 1]])
    rois = {k: torch.cat(v) for k, v in found.items()}
    if len(rois["b"]) > max_rois:
        keep = torch.randperm(len(rois["b"]), generator=generator)[:max_rois]
        rois = {k: v[keep] for k, v in rois.items()}
    rois["c"] = contextual_rois(rois["b"], rois["a"])[1]
    return rois


# --- DCP's greedy channel selection --------------------------------------------------------------------------


class Consumer:
    """A dense layer reading the unit: sampled input columns ``p`` (n, C, K) of the unit's channels, their
    contribution ``y`` (n, O) to the layer's output, the trained weight ``w0`` (O, C, K) and each column's root
    channel."""

    def __init__(self, p: torch.Tensor, w0: torch.Tensor, roots: torch.Tensor) -> None:
        # Centred: prune_detector folds a removed channel's mean activation into its consumers' bias, so only
        # the variation around it is lost and must be reconstructed.
        self.p, self.w0, self.roots = p - p.mean(0, keepdim=True), w0, roots
        self.y = torch.einsum("nck,ock->no", p, w0)
        self.scale = 1.0 / max(float(self.y.pow(2).sum()), 1e-12)

    def residual(self, w: torch.Tensor) -> torch.Tensor:
        return self.y - torch.einsum("nck,ock->no", self.p, w)

    def grad(self, w: torch.Tensor) -> torch.Tensor:
        """∂L_rec/∂W (O, C, K) of the normalised ‖Y − P W‖²."""
        return -2.0 * self.scale * torch.einsum("no,nck->ock", self.residual(w), self.p)

    def update(self, w: torch.Tensor, kept_cols: torch.Tensor, steps: int) -> torch.Tensor:
        """Steepest descent with exact line search on the quadratic, over the kept columns only."""
        for _ in range(steps):
            g = self.grad(w) * kept_cols[None, :, None]
            pg = torch.einsum("nck,ock->no", self.p, g)
            denom = 2.0 * self.scale * float(pg.pow(2).sum())
            if denom <= 0:
                break
            w = w - (float(g.pow(2).sum()) / denom) * g
        return w


def greedy_order(
    size: int,
    consumers: Sequence[Consumer],
    head: AuxHead | None = None,
    feats: torch.Tensor | None = None,
    rois: dict[str, torch.Tensor] | None = None,
    alpha: float = ALPHA,
    rounds: int = ROUNDS,
    update_steps: int = UPDATE_STEPS,
) -> torch.Tensor:
    """DCP's greedy channel selection (Algorithm 2) on L = L_rec + α·L_a: the unit's channels in the order they
    are selected. Starts from A = ∅ and W = 0; each step adds the ⌈size / rounds⌉ channels outside A with the
    largest ‖∂L/∂W_k‖², then updates the kept weights."""
    kept = torch.zeros(size, dtype=torch.bool)
    order: list[int] = []
    block = max(1, math.ceil(size / rounds))
    weights = [torch.zeros_like(c.w0) for c in consumers]
    use_aux = head is not None and feats is not None and rois is not None and alpha > 0
    if use_aux:
        v1 = torch.zeros_like(head.v1)
        rest = [p.clone() for p in head.rest]
    while len(order) < size:
        norms = torch.zeros(size, dtype=torch.float64)
        for c, w in zip(consumers, weights):
            norms.index_add_(0, c.roots, c.grad(w).pow(2).sum((0, 2)).double())
        if use_aux:
            v1.requires_grad_(True)
            (grad,) = torch.autograd.grad(head.loss(v1, rest, feats, rois), v1)
            v1 = v1.detach()
            norms += (alpha**2) * grad.pow(2).sum((0, 2)).double()
        norms[kept] = -1.0
        picks = torch.argsort(norms, descending=True, stable=True)[: min(block, size - len(order))]
        order.extend(int(k) for k in picks)
        kept[picks] = True
        for i, c in enumerate(consumers):
            cols = kept[c.roots]
            new = torch.isin(c.roots, picks)
            weights[i][:, new] = c.w0[:, new]
            weights[i] = c.update(weights[i], cols.float(), update_steps)
        if use_aux:
            v1[:, picks] = head.v1[:, picks]
            v1, rest = _update_head(head, v1, rest, kept, feats, rois, update_steps)
    return torch.as_tensor(order)


def _update_head(
    head: AuxHead,
    v1: torch.Tensor,
    rest: list[torch.Tensor],
    kept: torch.Tensor,
    feats: torch.Tensor,
    rois: dict[str, torch.Tensor],
    steps: int,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A few Adam steps on the head's kept weights (removed channels' weights stay zero)."""
    mask = kept.float()[None, :, None]
    params = [v1.clone().requires_grad_(), *(p.clone().requires_grad_() for p in rest)]
    opt = torch.optim.Adam(params, lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        head.loss(params[0] * mask, params[1:], feats, rois).backward()
        opt.step()
    return (params[0] * mask).detach(), [p.detach() for p in params[1:]]


def order_to_score(order: torch.Tensor) -> torch.Tensor:
    """Score per channel from the selection order: the first selected scores highest."""
    score = torch.empty(order.numel())
    score[order] = torch.arange(order.numel(), 0, -1, dtype=torch.float32)
    return score


# --- per-unit data ------------------------------------------------------------------------------------------


class LCPImportance:
    """Scores the channels of ``prune_detector``'s units by LCP's selection order (see the module docstring).

    ``collect`` runs the labelled calibration batches once; ``__call__(group)`` then ranks one unit (its
    torch-pruning group) and records its time in ``timings``.
    """

    def __init__(
        self,
        alpha: float | None = None,
        seed: int = 0,
        samples: int | None = None,
        rounds: int | None = None,
        aux_steps: int | None = None,
    ) -> None:
        # None: the module's constants, read at construction (so a caller may set gcp.core.lcp.ROUNDS etc.)
        self.alpha = ALPHA if alpha is None else alpha
        self.samples = SAMPLES if samples is None else samples
        self.rounds = ROUNDS if rounds is None else rounds
        self.aux_steps = AUX_STEPS if aux_steps is None else aux_steps
        self.seed = seed
        self.inputs: dict[nn.Module, list[torch.Tensor]] = {}
        self.targets: list[dict[str, torch.Tensor]] = []
        self.units: dict[int, Any] = {}
        self.shapes = torch.zeros(0, 2)
        self.image_hw: tuple[int, int] = (0, 0)
        self.classes = 1
        self.timings: dict[str, float] = {}
        self.rois: dict[str, int] = {}
        self.fallback = L1FilterImportance()

    @torch.no_grad()
    def collect(self, model: nn.Module, calib_data: Any, units: Iterable[Any], forward: Any) -> None:
        """Record the input of every conv that reads a unit over the labelled calibration batches."""
        batches = check_calib_targets(calib_data)
        self.units = {id(u.group): u for u in units}
        modules = {
            m.module
            for u in self.units.values()
            for m in u.ins
            if isinstance(m.module, (nn.Conv2d, nn.ConvTranspose2d))
        }
        captured: dict[nn.Module, list[torch.Tensor]] = {}

        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], _out: Any) -> None:
            captured.setdefault(module, []).append(inputs[0].detach().float().cpu())

        handles = [m.register_forward_hook(hook) for m in modules]
        try:
            for images, targets in batches:
                forward(model, images)
                self.targets.extend(targets)
        finally:
            for h in handles:
                h.remove()
        self.inputs = {m: [torch.cat(x, 0)] for m, x in captured.items()}
        self.image_hw = tuple(batches[0][0].shape[-2:])
        self.shapes = prior_shapes(model, max(self.image_hw))
        labels = [int(torch.as_tensor(t["labels"]).max()) for t in self.targets if len(t["labels"])]
        self.classes = max(max(labels) + 1, int(getattr(model, "num_classes", 0) or 0))

    def _feature_map(self, unit: Any) -> tuple[torch.Tensor, float] | None:
        """The unit's output map (B, N, H, W), assembled from its consumers' inputs, and its stride."""
        readers = [m for m in unit.ins if m.module in self.inputs]
        if not readers:
            return None
        readers.sort(key=lambda m: -torch.unique(m.root).numel())
        x0 = self.inputs[readers[0].module][0]
        fmap = x0.new_zeros(x0.shape[0], unit.size, *x0.shape[-2:])
        covered = torch.zeros(unit.size, dtype=torch.bool)
        for m in readers:
            x = self.inputs[m.module][0]
            for local, root in zip(m.local.tolist(), m.root.tolist()):
                if covered[root]:
                    continue
                channel = x[:, local : local + 1]
                if channel.shape[-2:] != fmap.shape[-2:]:
                    channel = F.interpolate(
                        channel, size=fmap.shape[-2:], mode="bilinear", align_corners=False
                    )
                fmap[:, root] = channel[:, 0]
                covered[root] = True
        return fmap, self.image_hw[0] / fmap.shape[-2]

    def _consumers(self, unit: Any, generator: torch.Generator) -> list[Consumer]:
        result = []
        for m in unit.ins:
            if m.module not in self.inputs:
                continue
            unfolded = conv_columns(m.module, self.inputs[m.module][0])
            if unfolded is None:
                continue
            cols, weight = unfolded  # (B, C, K, L), (O, C, K)
            b = torch.randint(cols.shape[0], (self.samples,), generator=generator)
            pos = torch.randint(cols.shape[-1], (self.samples,), generator=generator)
            p = cols[:, m.local][b, :, :, pos]  # (n, C_unit, K)
            result.append(Consumer(p, weight[:, m.local], m.root))
        return result

    def __call__(self, group: Any) -> torch.Tensor | None:
        unit = self.units.get(id(group))
        if unit is None:
            return None
        start = time.perf_counter()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # thousands of small ops: intra-op threads cost more than they gain
        try:
            score = self._score(unit, group)
        finally:
            torch.set_num_threads(threads)
        self.timings[unit.root_name] = time.perf_counter() - start
        return score

    def _score(self, unit: Any, group: Any) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        consumers = self._consumers(unit, generator)
        found = self._feature_map(unit)
        head = feats = rois = None
        if found is not None:
            fmap, stride = found
            rois = positive_rois(self.targets, stride, tuple(fmap.shape[-2:]), self.shapes, generator)
            if len(rois["b"]):
                feats = roi_features(fmap, stride, rois)
                feats = feats - feats.mean(0, keepdim=True)  # a constant channel locates nothing
                feats = feats / feats.pow(2).mean().sqrt().clamp(min=1e-12)
                head = AuxHead(unit.size, self.classes, feats.shape[-1], generator)
                head.train(feats, rois, self.aux_steps)
            self.rois[unit.root_name] = len(rois["b"])
        if not consumers and head is None:  # no observable reader of the unit's channels: filter L1 norm
            return self.fallback(group)
        return order_to_score(greedy_order(unit.size, consumers, head, feats, rois, self.alpha, self.rounds))

    def report(self) -> dict[str, Any]:
        """The report's ``lcp`` entry: seconds and positive boxes per unit (by root layer), and the settings."""
        return {
            "seconds": dict(self.timings),
            "total_seconds": sum(self.timings.values()),
            "positive_boxes": dict(self.rois),
            "alpha": self.alpha,
            "rounds": self.rounds,
            "aux_steps": self.aux_steps,
            "samples": self.samples,
            "prior_shapes": len(self.shapes),
        }
