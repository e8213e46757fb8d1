"""Issue 25 §4: why group spatial attention distillation (GSA, paper §4.3) trails plain fine-tuning in short
recoveries, measured on the benchmark's own pruned model.

From a stage-1 model (default ``gcp/assets/digits_sparse.pt``, stage 1 of ``bench_method.py`` seed 0) pruned by
gcp to 40 % of the MACs exactly as ``bench_method.py`` prunes it, and a teacher (default the shipped one), on
DigitScenes (3,000 train / 500 val / 500 test at 256 px):

1. ``grads``: each term of eq. 4 (L_hard, L_AT, L_soft's class and box parts) on the pruned student, averaged
   over ``--grad-batches`` training batches, against the gradient of the detection loss on validation images
   (the direction that improves the held-out model). Besides norms and cosines it gives what the recovery's
   optimiser does with them: AdamW divides every coordinate by the root mean square of the gradient it is fed,
   so each term's *predicted held-out loss decrease per unit lr* is g_val · P · g_term, with P built from the
   whole loss of the recipe (the hard loss alone for fine-tuning, the sum of eq. 4 for GSA). A term that is
   large but orthogonal to g_val shrinks the hard loss's share of every step.
2. ``runs``: the recoveries themselves, ``--steps`` steps (bench_method's recovery recipe: AdamW, lr 5e-4,
   batch 32) for each ``--variants`` entry and each ``--seeds`` seed, scored on the 500 test images.
3. ``report``: ``benchmarks/results/gsa_probe.json`` and the RESULTS.md section.

Every result is kept as soon as it is measured (``--out``/probe.json) and skipped when there: run the same
command again to finish an interrupted probe. Every entry records commit, machine and teacher.

    python benchmarks/probe_gsa.py                                   # grads, then ft/gsa variants at 30 steps
    python benchmarks/probe_gsa.py --teacher /path/to/converged.pt --out runs/probe_gsa_converged
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_method import BATCH, ROOT, SIZE, TRAINING, UNROUNDED, calibration, quiet  # noqa: E402
from common import git_revision, machine, now, write_section  # noqa: E402

import gcp  # noqa: E402
from distill import BALANCED_BETAS, PAPER_BETAS, GroupAttentionDistiller  # noqa: E402
from gcp.app.pipeline import SHIPPED_SPARSE, SHIPPED_TEACHER, load_model  # noqa: E402
from gcp.detection.data import VOCDataset, collate, make_digit_scenes  # noqa: E402
from gcp.detection.evaluate import evaluate  # noqa: E402
from gcp.detection.loss import YoloLoss  # noqa: E402
from gcp.detection.train import fit  # noqa: E402
from gcp.io import atomic_write_json  # noqa: E402

JSON_OUT = Path(__file__).parent / "results" / "gsa_probe.json"
DEFAULT_OUT = Path("runs/probe_gsa")  # the probe whose record is JSON_OUT
REPO = Path(__file__).resolve().parents[1]
LR = 5e-4  # bench_method's --lr-recover
# name -> GroupAttentionDistiller options (None: fine-tuning, no distiller)
VARIANTS: dict[str, dict[str, Any] | None] = {
    "ft": None,
    "gsa": {},  # the distiller's defaults: eq. 4 with the soft class term over all priors (eq. 9-11)
    "gsa_candidates_sigmoid": {"soft_priors": "candidates", "class_activation": "sigmoid"},
    "gsa_at_only": {"soft_weight": 0.0},
    "gsa_soft_only": {"betas": (0.0,) * 5},
    # issue 25 §4's candidates not measured before: the temperature of eq. 10-11 (the paper gives none; 1 is the
    # default), the weight of the attention term, and what the attention distance is normalised by
    "gsa_t2": {"temperature": 2.0},
    "gsa_t4": {"temperature": 4.0},
    "gsa_beta_x3": {"betas": tuple(3 * b for b in BALANCED_BETAS)},
    "gsa_beta_div3": {"betas": tuple(b / 3 for b in BALANCED_BETAS)},
    "gsa_paper_beta_mean_squared": {
        "betas": PAPER_BETAS,
        "distance": "mean_squared",
    },  # §5.4's β, per position
}
PRIOR_SETS = ("all", "candidates")
TERMS = ("hard", "at", "soft_cls", "soft_box")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher", type=Path, default=SHIPPED_TEACHER)
    parser.add_argument("--start", type=Path, default=SHIPPED_SPARSE, help="the stage-1 model gcp prunes")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--stages", nargs="*", default=["grads", "runs", "report"])
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--grad-batches", type=int, default=6)
    parser.add_argument("--macs", type=float, default=0.4)
    return parser.parse_args(argv)


class Probe:
    """Run directory, data, the pruned student and the measurements (``probe.json`` in ``--out``)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        args.out.mkdir(parents=True, exist_ok=True)
        self.results_path = args.out / "probe.json"
        self.results: dict[str, Any] = (
            json.loads(self.results_path.read_text()) if self.results_path.is_file() else {}
        )
        setup = {"teacher": str(args.teacher), "start": str(args.start), "macs": args.macs, "lr": args.lr}
        recorded = self.results.setdefault("setup", setup)
        if recorded != setup:
            raise SystemExit(f"{self.results_path} was made with {recorded}, not {setup}: give another --out")
        root = make_digit_scenes(ROOT, n_train=3000, n_val=500, n_test=500, size=SIZE, seed=0)
        self.train = VOCDataset(root, "train", size=SIZE, augment=True, horizontal_flip=False)
        self.val = VOCDataset(root, "val", size=SIZE)
        self.test = VOCDataset(root, "test", size=SIZE)
        self.example = torch.zeros(1, 3, SIZE, SIZE)
        self.pruned = args.out / "pruned_gcp.pt"
        if not self.pruned.is_file():
            result = quiet(
                lambda: gcp.prune_detector(
                    load_model(args.start),
                    self.example,
                    ratio=args.macs,
                    method="gcp",
                    budget="macs",
                    calib_data=calibration(),
                    round_to=UNROUNDED,
                )
            )
            result.save(self.pruned)

    def record(self, key: str, value: dict[str, Any]) -> None:
        value["provenance"] = {"commit": git_revision(), "machine": machine(), "date": now()}
        self.results[key] = value
        atomic_write_json(self.results_path, self.results)

    def student(self) -> nn.Module:
        return load_model(self.pruned).train()

    def teacher_map50(self) -> float:
        if "teacher" not in self.results:
            metrics = evaluate(load_model(self.args.teacher), self.test, batch_size=16, progress=False)
            self.record("teacher", {"map50": metrics["map50"], "map": metrics["map"]})
        return self.results["teacher"]["map50"]


def flat_grad(value: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
    grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def grads_stage(probe: Probe) -> None:
    """The terms' mean gradients on training batches against the held-out detection-loss gradient, with the
    class term over every prior (eq. 9 as written) and over eq. 12's candidates."""
    for soft_priors in PRIOR_SETS:
        if f"grads/{soft_priors}" not in probe.results:
            term_gradients(probe, soft_priors)


def term_gradients(probe: Probe, soft_priors: str) -> None:
    start = time.perf_counter()
    student = probe.student()
    params = [p for p in student.parameters() if p.requires_grad]
    hard_loss = YoloLoss(student)
    val_grad = held_out_gradient(probe, student, params, hard_loss)
    distiller = GroupAttentionDistiller(
        load_model(probe.args.teacher), student, probe.example, measure_every=0
    )
    loader = torch.utils.data.DataLoader(
        probe.train,
        batch_size=BATCH,
        shuffle=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(0),
    )
    sums = {term: torch.zeros_like(val_grad) for term in TERMS}
    squares = {"ft": torch.zeros_like(val_grad), "gsa": torch.zeros_like(val_grad)}
    try:
        for index, (images, targets) in enumerate(loader):
            if index == probe.args.grad_batches:
                break
            student.zero_grad(set_to_none=True)
            outputs = student(images)
            terms = distiller.loss_terms(images, targets, outputs)
            terms["hard"] = hard_loss(outputs, targets)["total"]
            batch = {term: flat_grad(terms[term], params) for term in TERMS}
            for term in TERMS:
                sums[term] += batch[term]
            squares["ft"] += batch["hard"] ** 2
            squares["gsa"] += sum(batch.values()) ** 2
    finally:
        distiller.close()
    n = probe.args.grad_batches
    means = {term: total / n for term, total in sums.items()}
    rows = {}
    for recipe, recipe_terms in (("ft", ("hard",)), ("gsa", TERMS)):
        precondition = 1.0 / ((squares[recipe] / n).sqrt() + 1e-8)
        for term in recipe_terms:
            g = means[term]
            rows[f"{recipe}/{term}"] = {
                "norm": float(g.norm()),
                "cos_val": float(torch.nn.functional.cosine_similarity(g, val_grad, dim=0)),
                # first-order decrease of the held-out loss per unit lr of an Adam-like step on this term
                "adam_gain": float(val_grad @ (precondition * g)),
            }
    rows["gsa/total"] = {
        key: sum(rows[f"gsa/{t}"][key] for t in TERMS) if key == "adam_gain" else None
        for key in ("norm", "cos_val", "adam_gain")
    }
    probe.record(
        f"grads/{soft_priors}",
        {
            "rows": rows,
            "batches": n,
            "soft_priors": soft_priors,
            "minutes": (time.perf_counter() - start) / 60,
        },
    )


def held_out_gradient(
    probe: Probe, student: nn.Module, params: list[nn.Parameter], hard_loss: YoloLoss
) -> torch.Tensor:
    """Gradient of the detection loss on 256 validation images, the student in eval mode (as it is scored)."""
    student.eval()
    total = None
    loader = torch.utils.data.DataLoader(probe.val, batch_size=BATCH, collate_fn=collate)
    for index, (images, targets) in enumerate(loader):
        if index == 8:
            break
        grad = flat_grad(hard_loss(student(images), targets)["total"], params)
        total = grad if total is None else total + grad
    student.train()
    return total / 8


def runs_stage(probe: Probe) -> None:
    """Each variant's recovery of ``--steps`` steps per seed, scored on the test split."""
    for variant in probe.args.variants:
        for seed in probe.args.seeds:
            key = f"run/{variant}/{probe.args.steps}/seed{seed}"
            if key in probe.results:
                continue
            start = time.perf_counter()
            student = probe.student()
            options = VARIANTS[variant]
            hooks = (
                []
                if options is None
                else [
                    GroupAttentionDistiller(load_model(probe.args.teacher), student, probe.example, **options)
                ]
            )
            try:
                fit(
                    student,
                    probe.train,
                    epochs=1,
                    lr=probe.args.lr,
                    hooks=hooks,
                    seed=seed,
                    progress=False,
                    max_steps_per_epoch=probe.args.steps,
                    channels_last=True,
                    **TRAINING,
                )
            finally:
                for hook in hooks:
                    hook.close()
            metrics = evaluate(student, probe.test, batch_size=16, progress=False, channels_last=True)
            probe.record(
                key,
                {
                    "variant": variant,
                    "steps": probe.args.steps,
                    "seed": seed,
                    "map50": metrics["map50"],
                    "map": metrics["map"],
                    "minutes": (time.perf_counter() - start) / 60,
                },
            )
            print(f"{key}: mAP@0.5 {metrics['map50']:.3f}", flush=True)


def report_stage(probe: Probe) -> None:
    """Keep this probe's record and rewrite the RESULTS.md section from every kept record. A run directory
    that measured nothing yet writes no record: it would replace the kept one with an empty one."""
    default_out = probe.args.out == DEFAULT_OUT  # the kept record and the RESULTS.md section
    if not any(key.startswith(("run/", "grads/")) for key in probe.results):
        print(f"report: {probe.results_path} holds no measurement yet; no record written", flush=True)
    else:
        payload = {
            "setup": probe.results["setup"],
            "teacher_map50": probe.teacher_map50(),
            **summarise(probe),
        }
        atomic_write_json(JSON_OUT if default_out else probe.args.out / "gsa_probe.json", payload)
    if default_out:
        write_section(
            "GSA against fine-tuning in short recoveries (issue 25 §4): the probe", render_records()
        )


def render_records(folder: Path = JSON_OUT.parent) -> str:
    """Every probe record kept in ``folder`` (``gsa_probe*.json``), the strongest teacher first: the teacher
    asset's path stays the same when a retrained one replaces it, so each record is named by its file and told
    apart by its teacher's test mAP@0.5."""
    records = [(path, json.loads(path.read_text())) for path in folder.glob("gsa_probe*.json")]
    records.sort(key=lambda item: -item[1]["teacher_map50"])
    parts = [
        f"### Teacher test mAP@0.5 {payload['teacher_map50']:.3f} (`benchmarks/results/{path.name}`)\n\n"
        + render(payload)
        for path, payload in records
    ]
    return "\n\n".join(parts) + (
        "\n\nThe reading, and the same variants on the demo's own recovery: `docs/notes/distillation.md`."
    )


def summarise(probe: Probe) -> dict[str, Any]:
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for key, value in probe.results.items():
        if key.startswith("run/"):
            runs.setdefault((value["variant"], value["steps"]), []).append(value)
    table = []
    for (variant, steps), entries in sorted(runs.items()):
        entries.sort(key=lambda e: e["seed"])
        values = [e["map50"] for e in entries]
        mean = sum(values) / len(values)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
        table.append(
            {
                "variant": variant,
                "steps": steps,
                "seeds": [e["seed"] for e in entries],
                "map50": values,
                "mean": mean,
                "sd": sd,
                "machines": sorted({e["provenance"]["machine"] for e in entries}),
            }
        )
    return {
        "grads": [probe.results[f"grads/{p}"] for p in PRIOR_SETS if f"grads/{p}" in probe.results],
        "runs": table,
    }


def render(payload: dict[str, Any]) -> str:
    setup = payload["setup"]
    lines = [
        f"Teacher `{shown(setup['teacher'])}` (test mAP@0.5 {payload['teacher_map50']:.3f}); student: "
        f"`{shown(setup['start'])}` pruned by gcp at {setup['macs']:.0%} of the MACs; recoveries: AdamW, lr "
        f"{setup['lr']}, batch {BATCH}, bench_method's recipe; mAP@0.5 on the 500 test images."
    ]
    for grads in payload["grads"]:
        prov = grads["provenance"]
        lines += [
            "",
            f"Gradients, class term over {grads['soft_priors']} priors ({grads['batches']} training batches of "
            f"{BATCH}; {prov['date']}, commit {prov['commit']}, {prov['machine']}):",
            "",
            "| recipe / term | norm | cos with held-out gradient | held-out gain of an AdamW step |",
            "| --- | --- | --- | --- |",
        ]
        for name, row in grads["rows"].items():
            cells = [f"{row[k]:.3g}" if row[k] is not None else "—" for k in ("norm", "cos_val", "adam_gain")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if payload["runs"]:
        lines += ["", "| recovery | steps | mAP@0.5 per seed | mean ± sd |", "| --- | --- | --- | --- |"]
        for row in payload["runs"]:
            sd = f" ± {row['sd']:.3f}" if row["sd"] is not None else ""
            per_seed = ", ".join(f"{v:.3f}" for v in row["map50"])
            lines.append(f"| {row['variant']} | {row['steps']} | {per_seed} | {row['mean']:.3f}{sd} |")
    return "\n".join(lines)


def shown(path: str) -> str:
    """A path as the report shows it: relative to the repository when inside it."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(resolved)


STAGES = {"grads": grads_stage, "runs": runs_stage, "report": report_stage}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    probe = Probe(args)
    for stage in args.stages:
        STAGES[stage](probe)


if __name__ == "__main__":
    main()
