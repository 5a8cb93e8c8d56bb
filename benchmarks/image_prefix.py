"""Prefix reuse when the patched positions are image tokens: an all-image-position sweep.

Patching image patches is the VLM-specific experiment (which patches carry the answer), and
until prefix reuse could resume inside the image block, every such chunk recomputed the whole
sequence. Now the baseline rows' merged input embeddings (image features placed) are kept, and
a chunk starts at its first patched position on the cached keys and values before it.

This runs, on the 7B-shaped random LLaVA of `benchmarks/peers.py` (576 image tokens, head dim
128), block-output restoration at every (layer, image position) cell, three ways, checks that
they agree, and times them (best of `--repeats`, one process, taken in turns):

    vlmtrace          vt.patch, every cell a row of batched forwards
    vlmtrace prefix   the same with reuse_prefix=True
    ceiling           plain torch, vlmtrace's rows by hand, one forward per chunk (peers.ceiling)

    python -m benchmarks.image_prefix                          # from the repository root
    python -m benchmarks.image_prefix --layers 8 --hidden 256  # deeper: more layers to skip

The last line is `image_prefix image_prefix_vs_ceiling=<r> plain_vs_ceiling=<r>`. The most a
sweep over every image position can gain from resuming is bounded by the work it skips: on
average half of the positions and, with L layers, (L - 1) / 2L of the layers.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import vlmtrace as vt
from benchmarks.peers import Shape, build, ceiling, make_setup

IMAGE_GRID = vt.Grid(sites=("block",), windows=(1,), segments=("image",))


def sweep(setup, reuse_prefix: bool) -> np.ndarray:
    ds = vt.patch(
        setup.vlm,
        [setup.sample],
        corruption=vt.ReplaceSpan("visual"),
        grid=IMAGE_GRID,
        metric=vt.Probability(),
        max_batch=setup.max_batch,
        progress=False,
        reuse_prefix=reuse_prefix,
        verify=False,
    )
    values = ds["block"].sel(window=1).isel(sample=0).transpose("layer", "position")
    if list(values["index"].values) != setup.text:
        raise SystemExit("vlmtrace's grid does not cover the image positions the ceiling patches")
    return values.values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--patch-size", type=int, default=14)
    parser.add_argument("--max-batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = Shape(
        "7B-shaped", args.layers, args.hidden, args.heads, args.image_size, args.patch_size, 1, 1, 1
    )
    model, processor, name = build(shape, init_scale=4.0)
    args.init_scale = 4.0
    setup = make_setup(shape.label, model, processor, name, args, 1, own=True)
    ids = setup.vlm.processor(text=[setup.sample.prompt], images=[setup.sample.image])["input_ids"][0]
    setup.text = [p for p, token in enumerate(ids) if token == setup.vlm.shape.image_token_id]
    methods = {
        "vlmtrace": lambda: sweep(setup, False),
        "vlmtrace prefix": lambda: sweep(setup, True),
        "ceiling": lambda: ceiling(setup),
    }
    values = {label: run() for label, run in methods.items()}
    for label, grid in values.items():
        difference = float(np.nanmax(np.abs(grid - values["vlmtrace"])))
        if difference > 1e-4:
            raise SystemExit(f"{label} differs from vlmtrace by {difference:.2e}: not timing unequal work")
    seconds = {label: [] for label in methods}
    for _ in range(args.repeats):
        for label, run in methods.items():
            start = time.perf_counter()
            run()
            seconds[label].append(time.perf_counter() - start)
    cells = len(setup.cells)
    rates = {label: cells / min(times) for label, times in seconds.items()}
    print(
        f"{name}: {len(ids)} tokens, {len(setup.text)} image positions, {cells} cells, threads {args.threads}"
    )
    for label, rate in rates.items():
        print(f"  {label:16} {rate:8.2f} runs/s   (best of {args.repeats}: {min(seconds[label]):.2f} s)")
    print(
        f"image_prefix image_prefix_vs_ceiling={rates['vlmtrace prefix'] / rates['ceiling']:.2f} "
        f"plain_vs_ceiling={rates['vlmtrace'] / rates['ceiling']:.2f}"
    )


if __name__ == "__main__":
    main()
