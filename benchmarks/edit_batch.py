"""Many facts at once: efficacy, generalisation and specificity of 1, 8 and 32 simultaneous edits.

MEMIT's point is that one closed-form update writes many facts (Meng et al., 2023); MultEdit's
ridge step has no covariance to protect the layer's other keys, so it should lose specificity as
the batch grows. The organisms know 4 year-facts per entity ("which city did the red shape
represent in year 2006 ?"), so 8 entities give 32 distinct facts. Batch B takes the first B of
them, years round-robin over the entities (B = 8: one year of each of 8 entities), each with a
new city the entity never had, and edits them in one update at the traced layer (window 1,
image-pair trace of the key at the last token, computed once for all 32 requests).

Contexts (MEMIT): 8 other training-split pictures and 4 paraphrases per request, KL on the
entity's visual questions (`vlmtrace.data.scene_edits`). Probes on held-out scenes: reliability,
text generality, image generality (2 per request); locality: fact and year questions about
entities not edited, and visual questions, on pictures that show no edited entity.

    OMP_NUM_THREADS=1 python -m benchmarks.edit_batch                          # shapes-llava
    OMP_NUM_THREADS=1 python -m benchmarks.edit_batch --model shapes-qwen --sizes 1 8

One line per (method, B): `batch <model> <method> B=<B> layers=[..]: efficacy ..., generalisation
..., specificity ... | KL .. | <seconds>s`.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

import vlmtrace as vt
from vlmtrace.data.mascots import YEARS
from vlmtrace.data.scene_edits import about, locality, new_answer, scene_edit_case
from vlmtrace.data.scenes import make_samples
from vlmtrace.engine.editing import Contexts, edit, evaluate, probes_of, summary_line, trace_for_edit


def requests(n_entities: int, seed: int) -> list[vt.Sample]:
    """The year-facts of `n_entities` entities, years round-robin (held-out scenes)."""
    entities, seen = [], set()
    for sample in make_samples("fact", 40 * n_entities, seed=seed):
        if sample.meta["entity"] not in seen:
            seen.add(sample.meta["entity"])
            entities.append(sample.meta["entity"])
    entities = entities[:n_entities]
    return [
        about(entity, "multi", 1, split="test", seed=f"batch/{seed}/{year}", year=year, probe="edited")[0]
        for year in YEARS
        for entity in entities
    ]


def ordinary(seed: int, n: int = 150) -> list[vt.Sample]:
    families = ("fact", "visual", "multi", "named")
    return [s for f in families for s in make_samples(f, n, seed=seed + 7, split="train")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="shapes-llava")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--methods", nargs="+", default=["memit", "multedit"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    vlm = vt.load(args.model)
    rng = random.Random(args.seed)
    pool = requests(8, args.seed)
    cases = [scene_edit_case(s, new_answer(s.meta["entity"], rng), seed=args.seed, probes=2) for s in pool]
    trace = trace_for_edit(vlm, pool, span="last", windows=(1,))
    preserve = ordinary(args.seed)
    for size in args.sizes:
        chosen = cases[:size]
        edited = {c.request.sample.meta["entity"] for c in chosen}
        text, image = locality(edited, 8, seed=args.seed, families=("fact", "multi"))
        for method in args.methods:
            start = time.time()
            settings = {"contexts": Contexts(images=8, paraphrases=4)} if method == "memit" else {}
            change = edit(
                vlm, [c.request for c in chosen], layers="traced", trace=trace, method=method,
                span="last", preserve=preserve, **settings,
            )  # fmt: skip
            scores = evaluate(vlm, change, **probes_of(chosen), text_locality=text, image_locality=image)
            print(
                f"batch {args.model} {method} B={size} layers={list(change.layers)}: {summary_line(scores)} "
                f"| KL {float(scores['locality_kl']):.3f} | {time.time() - start:.0f}s",
                flush=True,
            )


if __name__ == "__main__":
    main()
