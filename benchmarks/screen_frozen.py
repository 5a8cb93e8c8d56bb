"""Why does a screen miss? Exact patching with every attention pattern frozen, as an oracle.

AtP*'s QK fix recomputes the first attention softmax a patch meets; the rest of the model
stays first order. This separates the two sources of error on one organism and corruption:

    frozen vs exact   how much of exact patching's top k moves when no attention pattern may
                      change (every softmax of the patched rows returns the patched run's
                      pattern): what attention changes contribute to the cells that matter
    atp vs frozen     how well first order ranks the cells once no softmax can saturate: what
                      the other non-linearities (LayerNorm, MLPs, the metric) cost

Both as `agreement`'s material top-k overlap, per site. Freezing replaces the output of every
4-D `torch.nn.functional.softmax` call (eager attention's, and BLIP's `nn.Softmax`) in rows
2 and up with row 1's: the corrupted run when denoising, one sample per forward.

    python -m benchmarks.screen_frozen --model shapes-blip --corruption str --metric logit_diff
"""

from __future__ import annotations

import argparse
import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F

import vlmtrace as vt
from benchmarks.screen import CORRUPTIONS, METRICS, SITES, samples_for
from vlmtrace.engine.attribution import AttributionWarning
from vlmtrace.engine.screening import agreement


@contextmanager
def frozen_attention():
    """Every attention softmax of the patched rows (2 and up) returns the corrupted row's pattern."""
    softmax = F.softmax

    def frozen(x, dim=None, *args, **kwargs):
        y = softmax(x, dim, *args, **kwargs)
        if y.dim() == 4 and y.shape[0] > 2:
            y = torch.cat([y[:2], y[1:2].expand(y.shape[0] - 2, *y.shape[1:])])
        return y

    F.softmax = frozen
    try:
        yield
    finally:
        F.softmax = softmax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="shapes-blip")
    parser.add_argument("--corruption", default="str", choices=sorted(CORRUPTIONS))
    parser.add_argument("--metric", default="logit_diff", choices=sorted(METRICS))
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    vlm = vt.load(args.model)
    stack = vlm.adapter.stacks[vlm.adapter.default_stack]
    grid = vt.Grid(sites=tuple(s for s in SITES if s in stack.sites), windows=(1,), skip=("special",))
    samples = samples_for(vlm, args.samples, own=False)
    common = dict(
        corruption=CORRUPTIONS[args.corruption](), grid=grid, metric=METRICS[args.metric](), progress=False
    )
    exact = vt.patch(vlm, samples, verify=False, pack_samples=False, **common)
    with frozen_attention():
        frozen = vt.patch(vlm, samples, verify=False, pack_samples=False, **common)
    for baseline in ("clean", "corrupt"):  # rows 0 and 1 are the baselines, untouched by freezing
        if not (frozen[baseline] == exact[baseline]).all():
            raise RuntimeError(f"freezing changed the {baseline} run: rows are not laid out as assumed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AttributionWarning)
        estimate = vt.attribute(vlm, samples, method="atp", **common)
    print(f"{args.model} {args.corruption} {args.metric}: material top-{args.top_k} overlap per site")
    for label, guess, truth in (
        ("atp vs exact", estimate, exact),
        ("frozen vs exact", frozen, exact),
        ("atp vs frozen", estimate, frozen),
    ):
        report = agreement(guess, truth, args.top_k)
        print(f"{label:16}", "  ".join(f"{s} {r['material_overlap']:.2f}" for s, r in report.items()))


if __name__ == "__main__":
    main()
