"""Can the attribution screen be trusted? Estimates against exact patching, cell by cell.

`vt.attribute` estimates a whole patching grid from one forward and backward pass, and
`vt.patch(..., screen=k)` patches exactly only the k cells it ranks highest. A screen that
ranks the wrong cells first hides the effect it was meant to find, so this measures, on every
shipped trained organism (shapes-llava, shapes-blip, shapes-qwen) and on a 7B-shaped random
LLaVA (576 image tokens, head dim 128), how well each estimator ranks the cells that exact
patching finds:

    corruptions   STR (the visual-constraint phrase replaced) and SIP (a semantic image pair)
    metrics       P(answer) and the logit difference answer - foil
    sites         block, MLP, attention, attention heads (and cross-attention where it exists)
    grid          window 1, every layer x every position but the special tokens (the 7B-shaped
                  model: the text positions, so that exact patching fits a CPU)
    methods       every estimator of `vlmtrace.engine.attribution.METHODS`: atp (gradient at the
                  patched run), igN (the gradient averaged over a path of N = `--steps` points
                  between the two runs), and AtP*'s fixes (Kramár et al. 2024): atp+qk (the next
                  layer's attention softmax recomputed for the patched queries and keys),
                  atp+graddrop (|estimate| averaged over copies that each skip one layer in the
                  backward pass) and atp* (both)

For each combination it prints, per site, `vlmtrace.engine.screening.agreement`'s
figures (top-k overlap with k = `--top-k`, averaged over samples):

    material   the share of exact patching's top-k cells, among those whose effect is at least
               5% of |clean - corrupt|, that the screen's top k finds (ties within that margin
               count as top k); what a screen must not miss
    strict     the share of exact patching's top k, ties and negligible effects included
    rho        Spearman's rank correlation of all cells' signed effects
    2k, 3k     the material recall of a screen of 2k or 3k cells: the share of the material
               top k that `patch(..., screen=2k or 3k)` patches exactly (a generous screen)

    python -m benchmarks.screen --steps 4,16                      # everything, ~15 min on 2 cores
    python -m benchmarks.screen --models shapes-qwen --methods ig --steps 4,16
    python -m benchmarks.screen --skip-big --samples 4            # organisms only, quicker

A new organism is one more name in `ORGANISMS` (or `--models`): any model `vt.load` knows with
visual questions to draw (`vlmtrace.data.synthetic_samples`).

Then, per model, the best estimator: the one whose worst material overlap (over corruptions,
metrics and sites) is highest, and that worst figure. The last line is `screen
screen_topk_overlap=<f> strict_overlap=<f> screen_3k_recall=<f> method=<m> <other>_overlap=<f>
... best=<m> best_overlap=<f>`: the minimum over models, corruptions, metrics and sites of the
material overlap (the strict one, the 3k screen's material recall) of the method `vt.attribute`
uses by default, the material minimum of each other method measured, and the estimator whose
minimum over everything is highest, with that minimum.
"""

from __future__ import annotations

import argparse
import inspect
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

import vlmtrace as vt
from vlmtrace.data import synthetic_samples
from vlmtrace.data.own_answers import FROM_MODEL, own_answers
from vlmtrace.data.scenes import VOCABULARY
from vlmtrace.engine import attribution
from vlmtrace.engine.attribution import AttributionWarning
from vlmtrace.engine.screening import agreement
from vlmtrace.models.build import build_llava, word_tokenizer
from vlmtrace.recipes import Needs, draw

ORGANISMS = ("shapes-llava", "shapes-blip", "shapes-qwen")
BIG = "7b-shaped"
SITES = ("block", "mlp", "attn", "attn_head", "cross_attn")
CORRUPTIONS = {"str": lambda: vt.ReplaceSpan("visual"), "sip": lambda: vt.ImagePair()}
METRICS = {"prob": vt.Probability, "logit_diff": vt.LogitDiff}
NEEDS = Needs(replacements=("visual",), image_pair=True)
VERIFY = (2, 3)
"""Screens of 2k and 3k cells: is the exact top k among the cells a generous screen patches?"""


@dataclass
class Row:
    model: str
    corruption: str
    metric: str
    method: str
    report: dict[str, dict[str, float]]
    seconds: float


def big_llava(args: argparse.Namespace) -> vt.VLM:
    """The 7B-shaped random LLaVA of `benchmarks/peers.py` (its weights redrawn so cells differ)."""
    from benchmarks.peers import redraw

    model, processor = build_llava(
        word_tokenizer(VOCABULARY),
        layers=args.big_layers,
        hidden=args.big_hidden,
        heads=args.big_heads,
        image_size=336,
        patch_size=14,
        seed=0,
    )
    redraw(model, 4.0)
    return vt.wrap(model.eval(), processor, name=f"random-llava-{args.big_layers}x{args.big_hidden}")


def samples_for(vlm: vt.VLM, n: int, own: bool) -> list[vt.Sample]:
    """n visual questions with a phrase to swap and an image pair; a random model answers itself."""
    samples = draw(NEEDS, lambda count: synthetic_samples(vlm, "visual", count, seed=0), n)
    if not own:
        return samples
    marked = [s.with_(answer="", meta={**s.meta, "answer_from": FROM_MODEL}) for s in samples]
    answered, _ = own_answers(vlm, marked)
    return answered


def organism_grid(vlm: vt.VLM) -> vt.Grid:
    """Window 1, every layer x every position but the special tokens, at every site the model has."""
    stack = vlm.adapter.stacks[vlm.adapter.default_stack]
    return vt.Grid(sites=tuple(s for s in SITES if s in stack.sites), windows=(1,), skip=("special",))


def measure(vlm: vt.VLM, name: str, samples, grid: vt.Grid, methods, steps, top_k: int) -> list[Row]:
    rows = []
    for corruption_name, corruption in CORRUPTIONS.items():
        for metric_name, metric in METRICS.items():
            common = dict(corruption=corruption(), grid=grid, metric=metric(), progress=False)
            exact = vt.patch(vlm, samples, verify=False, max_batch=128, **common)
            for method in methods:
                for n in steps if method == "ig" else (attribution.STEPS,):
                    start = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", AttributionWarning)  # the report says it
                        estimate = vt.attribute(vlm, samples, method=method, steps=max(n, 1), **common)
                    seconds = time.perf_counter() - start
                    label = f"ig{n}" if method == "ig" else method
                    row = Row(
                        name, corruption_name, metric_name, label, judged(estimate, exact, top_k), seconds
                    )
                    rows.append(row)
                    print(line(row), flush=True)
    return rows


def judged(estimate, exact, top_k: int) -> dict[str, dict[str, float]]:
    """`agreement` at k, with the material recall of a screen of 2k and of 3k cells added."""
    report = agreement(estimate, exact, top_k)
    for times in VERIFY:
        wider = agreement(estimate, exact, top_k, candidates=times * top_k)
        for site in report:
            report[site][f"recall_{times}k"] = wider[site]["material_recall"]
    return report


def line(row: Row) -> str:
    sites = "  ".join(
        f"{site} {r['material_overlap']:.2f}/{r['overlap']:.2f}/{r['spearman']:+.2f}"
        f"/{r['recall_2k']:.2f}/{r['recall_3k']:.2f}"
        for site, r in row.report.items()
    )
    return f"{row.model:14} {row.corruption:4} {row.metric:10} {row.method:12} {sites}  ({row.seconds:.1f} s)"


def minimum(rows: list[Row], method: str, key: str) -> tuple[float, str]:
    """The smallest finite `key` over rows of `method`, and where it is."""
    found = [
        (r.report[site][key], f"{r.model} {r.corruption} {r.metric} {site}")
        for r in rows
        if r.method == method
        for site in r.report
        if np.isfinite(r.report[site][key])
    ]
    return min(found) if found else (float("nan"), "")


def best_by_model(rows: list[Row], labels: list[str]) -> dict[str, tuple[str, float]]:
    """Per model, the estimator whose worst material overlap is highest, and that worst figure."""
    best = {}
    for model in dict.fromkeys(r.model for r in rows):
        mine = [r for r in rows if r.model == model]
        worst = {label: minimum(mine, label, "material_overlap")[0] for label in labels}
        label = max(labels, key=lambda each: worst[each] if np.isfinite(worst[each]) else -1.0)
        best[model] = (label, worst[label])
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(ORGANISMS), help="organism names, comma-separated")
    parser.add_argument("--skip-big", action="store_true", help="leave out the 7B-shaped random LLaVA")
    parser.add_argument("--samples", type=int, default=8, help="samples per organism")
    parser.add_argument("--big-samples", type=int, default=2, help="samples of the 7B-shaped model")
    parser.add_argument("--big-layers", type=int, default=2)
    parser.add_argument("--big-hidden", type=int, default=512)
    parser.add_argument("--big-heads", type=int, default=4)
    parser.add_argument("--methods", default=",".join(attribution.METHODS), help="comma-separated")
    parser.add_argument("--steps", default=str(attribution.STEPS), help="ig path points, comma-separated")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    steps = [int(s) for s in args.steps.split(",")]
    started = time.perf_counter()
    print(
        f"per site: material overlap / strict overlap / Spearman / material recall of a 2k and a 3k "
        f"screen, k={args.top_k}, window 1"
    )
    rows: list[Row] = []
    for name in args.models.split(","):
        vlm = vt.load(name)
        rows += measure(
            vlm,
            name,
            samples_for(vlm, args.samples, own=False),
            organism_grid(vlm),
            methods,
            steps,
            args.top_k,
        )
    if not args.skip_big:
        vlm = big_llava(args)
        grid = vt.Grid(sites=("block", "mlp", "attn", "attn_head"), windows=(1,), skip=("special", "image"))
        rows += measure(
            vlm, BIG, samples_for(vlm, args.big_samples, own=True), grid, methods, steps, args.top_k
        )
    print()
    labels = sorted({r.method for r in rows})
    for label in labels:
        material, where = minimum(rows, label, "material_overlap")
        strict, strict_where = minimum(rows, label, "overlap")
        rho, rho_where = minimum(rows, label, "spearman")
        mean = np.nanmean(
            [r.report[s]["material_overlap"] for r in rows if r.method == label for s in r.report]
        )
        recalls = "; ".join(
            f"{times}k recall min {minimum(rows, label, f'recall_{times}k')[0]:.2f} "
            f"({minimum(rows, label, f'recall_{times}k')[1]})"
            for times in VERIFY
        )
        print(
            f"{label:12}: material overlap min {material:.2f} ({where}), mean {mean:.2f}; "
            f"strict min {strict:.2f} ({strict_where}); Spearman min {rho:+.2f} ({rho_where}); {recalls}"
        )
    default = inspect.signature(vt.attribute).parameters["method"].default
    label = f"ig{attribution.STEPS}" if default == "ig" else default
    others = " ".join(
        f"{other}_overlap={minimum(rows, other, 'material_overlap')[0]:.2f}"
        for other in labels
        if other != label
    )
    print()
    best = best_by_model(rows, labels)
    for model, (winner, worst) in best.items():
        print(f"best screen on {model}: {winner}, worst material overlap {worst:.2f}")
    overall, overall_worst = max(
        ((each, minimum(rows, each, "material_overlap")[0]) for each in labels), key=lambda x: x[1]
    )
    print(f"{time.perf_counter() - started:.0f} s in all")
    if label in labels:
        print(
            f"screen screen_topk_overlap={minimum(rows, label, 'material_overlap')[0]:.2f} "
            f"strict_overlap={minimum(rows, label, 'overlap')[0]:.2f} "
            f"screen_3k_recall={minimum(rows, label, 'recall_3k')[0]:.2f} method={label} {others} "
            f"best={overall} best_overlap={overall_worst:.2f}"
        )


if __name__ == "__main__":
    main()
