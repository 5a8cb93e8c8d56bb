"""What does cross-sample batching gain? A segment-level sweep, packed vs one sample per forward.

A window sweep over segments has few cells per sample (sites x windows x layers x a handful
of segments), so one sample's rows fill only a small part of a forward of `max_batch` rows.
`vt.patch` fills the rest with the next samples' rows (`vlmtrace.engine.packing`); with
`pack_samples=False` it runs one sample per forward, as it did before. This script times
both on the same sweep:

    model    the shipped organism `shapes-llava` (`--model random`: a tiny random LLaVA)
    samples  n held-out questions (default 16) of four question families, so prompt lengths
             differ and packed rows are padded to a common width
    sweep    ReplaceSpan("visual"), sites mlp and attn, windows 1 and 3, positions="segments",
             Probability, max_batch 64

The two methods run in turns (packed, unpacked, packed, ...), each `--repeats` times, and the
best time of each counts. A run is a patched row (a cell, k = 1). Before timing, the results of
both methods must agree (max abs difference printed; the check fails above 1e-5), and the
number of forwards of each is printed.

    python -m benchmarks.cross_sample                   # from the repository root
    python -m benchmarks.cross_sample --model random --n 32 --repeats 7

The last line is `cross_sample gain=<packed runs/s / unpacked runs/s>`. On a CPU the gain is
small: a CPU is already busy with a forward of a few dozen rows of a tiny model, so fewer,
larger forwards save only the per-forward overhead (tracing, building inputs, one Python
pass over the hooks). On a GPU a forward of a few dozen rows leaves most of the device idle,
and packing is meant to fill it.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import vlmtrace as vt
import vlmtrace.engine.sweep as sweep
from vlmtrace.data import synthetic_samples

FAMILIES = ("visual", "position", "fact", "named")
SITES = ("mlp", "attn")
TOLERANCE = 1e-5


def load(model: str, device: str) -> vt.VLM:
    if model != "random":
        return vt.load(model, device=device)
    from vlmtrace.models.build import build_llava, word_tokenizer

    shapes = vt.load("shapes-llava")  # its tokenizer knows the synthetic questions' words
    words = sorted(shapes.tokenizer.get_vocab())
    llava, processor = build_llava(word_tokenizer(words), layers=4, hidden=64, seed=0)
    return vt.wrap(llava.to(device), processor, name="tiny-random-llava")


def questions(vlm: vt.VLM, n: int) -> list[vt.Sample]:
    """`n` questions, families in turn, each with a replacement for its visual phrase."""
    per_family = -(-n // len(FAMILIES))
    drawn = [
        [s for s in synthetic_samples(vlm, family, 4 * per_family) if "visual" in s.replacements]
        for family in FAMILIES
    ]
    mixed = [s for row in zip(*drawn, strict=False) for s in row]
    if len(mixed) < n:
        raise SystemExit(f"only {len(mixed)} questions with a visual replacement; ask for fewer (--n)")
    return mixed[:n]


def forwards(run) -> int:
    """How many forwards (chunks) `run()` takes."""
    original, count = sweep.run_chunk, [0]

    def counted(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    sweep.run_chunk = counted
    try:
        run()
    finally:
        sweep.run_chunk = original
    return count[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="shapes-llava", help="a model name or path, or 'random'")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, default=16, help="samples")
    parser.add_argument("--windows", default="1,3")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    vlm = load(args.model, args.device)
    samples = questions(vlm, args.n)
    grid = vt.Grid(sites=SITES, windows=tuple(int(w) for w in args.windows.split(",")), positions="segments")
    kwargs = dict(
        corruption=vt.ReplaceSpan("visual"),
        grid=grid,
        metric=vt.Probability(),
        max_batch=args.max_batch,
        progress=False,
        verify=False,  # the self-check's two forwards are the same for both methods
    )

    def packed():
        return vt.patch(vlm, samples, **kwargs)

    def unpacked():
        return vt.patch(vlm, samples, pack_samples=False, **kwargs)

    a, b = packed(), unpacked()  # also warms both up
    names = (*SITES, "clean", "corrupt")
    diff = max(float(np.nanmax(np.abs(a[v].values - b[v].values))) for v in names)
    same_cells = all(np.array_equal(np.isnan(a[v].values), np.isnan(b[v].values)) for v in SITES)
    if diff > TOLERANCE or not same_cells:
        raise SystemExit(f"packed and unpacked results differ: max abs difference {diff:.3g}")
    runs = sum(int(np.isfinite(a[v].values).sum()) for v in SITES)
    lengths = [len(vlm.tokenizer(s.prompt).input_ids) for s in samples]
    print(
        f"{vlm.name} on {args.device}, {len(samples)} samples (text tokens {min(lengths)}-{max(lengths)}), "
        f"grid {SITES} windows {grid.windows} by segment: {runs} runs, max_batch {args.max_batch}"
    )
    print(f"forwards: packed {forwards(packed)}, one sample per forward {forwards(unpacked)}")
    print(f"equal: max abs difference {diff:.3g} (tolerance {TOLERANCE:g})")

    best = {"packed": float("inf"), "unpacked": float("inf")}
    for _ in range(args.repeats):
        for name, run in (("packed", packed), ("unpacked", unpacked)):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - start)
    for name, seconds in best.items():
        print(f"{name:>9}: best of {args.repeats} {seconds:.3f} s, {runs / seconds:,.0f} runs/s")
    print(f"cross_sample gain={best['unpacked'] / best['packed']:.2f}")


if __name__ == "__main__":
    main()
