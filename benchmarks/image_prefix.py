"""Prefix reuse when the patched positions are image tokens: an all-image-position sweep.

Patching image patches is the VLM-specific experiment (which patches carry the answer), and
until prefix reuse could resume inside the image block, every such chunk recomputed the whole
sequence. Now the baseline rows' merged input embeddings (image features placed) are kept, and
a chunk starts at its first patched position on the cached keys and values before it.

This runs, on the 7B-shaped random LLaVA of `benchmarks/peers.py` (576 image tokens, head dim
128), block-output restoration at every (layer, image position) cell, three ways, checks that
they agree, and times them (best of `--repeats`, one process, taken in turns). The corrupted run
shows the sample's paired image (`vt.ImagePair()`, the default `--corruption image`), so clean
and corrupted states differ at the image positions and restoring one moves P(answer);
`--corruption str` replaces the visual phrase instead, which comes after the image: every cell
then equals the corrupted run (the same work, but an agreement check that cannot fail).

    vlmtrace          vt.patch, every cell a row of batched forwards
    vlmtrace prefix   the same with reuse_prefix=True
    ceiling           plain torch, vlmtrace's rows by hand, one forward per chunk (peers.ceiling)

    python -m benchmarks.image_prefix                          # from the repository root, ~5 min
    python -m benchmarks.image_prefix --layers 8 --hidden 256  # deeper: more layers to skip
    python -m benchmarks.image_prefix --layers 32 --hidden 128 --heads 1 --positions-every 32 --repeats 0

`--positions-every N` (default 16; 1 sweeps every image position, about 45 min at the default
shape on one CPU thread) keeps every N-th image position: the grid is `EveryNth`, a `vt.Grid`
that selects every N-th position of its segments. What resuming skips depends on where a chunk
starts (its first patched position), so by default `--max-batch` shrinks with N to
2 + ceil(126 / N) rows: each chunk then spans the same ~126 image positions as a chunk of 128
rows of the full sweep does. `--repeats 0` times the checked call itself (for long runs).
RESULTS.md's figure of 2026-11-29 (3.09) swept every position with the phrase replaced:
`--positions-every 1 --corruption str` repeats it.

The last line is `image_prefix image_prefix_vs_ceiling=<r> plain_vs_ceiling=<r>
bound=<b> ideal_bound=<b> llava7b_bound=<b>`. The most a sweep over every image position can
gain from resuming is bounded by the work it skips: on average half of the positions and, with L
layers, (L - 1) / 2L of the layers, so it computes about (L + 1) / 4L of the full work: ~3.9x at
L = 32 for the decoder alone. Above the last line, three counts of that bound, each the ratio the
sweep would reach if time were proportional to multiply-adds (matrix products and attention
scores; per-element work such as softmax and norms, and memory traffic, are not counted, so a
measurement can come out slightly above a bound where those shrink more than the products do):

    bound          this run: the ceiling's work over prefix reuse's, both as chunked here (every
                   chunk's rows, baseline rows included, from its first patched layer and
                   position on), the vision tower and projector counted (the ceiling runs them
                   for every row, prefix reuse once)
    ideal_bound    this grid, the decoder only, with every cell resumed at its own layer and
                   position (no chunks): sum(T * L) / sum((T - p) * (L - l)) over the cells
    llava7b_bound  the same ideal bound for LLaVA-1.5-7B's all-image sweep (32 layers, 587
                   tokens, image at positions 0..575), with and without its CLIP-L/336 tower
                   (which the ceiling runs per row and prefix reuse skips)
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

import vlmtrace as vt
from benchmarks.peers import Setup, Shape, build, ceiling, make_setup

ROWS_OF_FULL_CHUNK = 126  # patched rows of a 128-row chunk (2 baseline rows)


@dataclass(frozen=True)
class EveryNth(vt.Grid):
    """A grid over every `every`-th position of the selected segments (a benchmark's grid: the
    cells, their order and the result's `index` coordinate all come from `selected`)."""

    every: int = 1

    def selected(self, segments):
        return super().selected(segments)[:: self.every]


def image_grid(every: int = 1) -> vt.Grid:
    return EveryNth(sites=("block",), windows=(1,), segments=("image",), every=every)


def corrupt_with(setup: Setup, kind: str) -> vt.Corruption:
    """The corruption of the sweep; the hand-written ceiling's corrupted input is set to match."""
    if kind == "image":
        setup.corrupted_prompt, setup.corrupted_image = setup.sample.prompt, setup.sample.image_pair
        return vt.ImagePair()
    return vt.ReplaceSpan("visual")  # make_setup's corrupted prompt, the sample's image


def sweep(
    setup: Setup, reuse_prefix: bool, every: int, corruption: vt.Corruption, verify: bool = False
) -> np.ndarray:
    """vt.patch over the image grid; `verify=False` (here): no self-check forwards, as measured
    since this benchmark was written (gpu_ready.py passes True, vt.patch's default)."""
    ds = vt.patch(
        setup.vlm,
        [setup.sample],
        corruption=corruption,
        grid=image_grid(every),
        metric=vt.Probability(),
        max_batch=setup.max_batch,
        progress=False,
        reuse_prefix=reuse_prefix,
        verify=verify,
    )
    values = ds["block"].sel(window=1).isel(sample=0).transpose("layer", "position")
    if list(values["index"].values) != setup.text:
        raise SystemExit("vlmtrace's grid does not cover the image positions the ceiling patches")
    return values.values


def default_max_batch(every: int) -> int:
    """Rows per chunk so that a chunk spans the image positions a 128-row chunk of the full sweep does."""
    return 2 + math.ceil(ROWS_OF_FULL_CHUNK / every)


# -- what resuming can skip, counted ---------------------------------------------------------------


@dataclass(frozen=True)
class Work:
    """Multiply-adds (x2) of one row, by part, for a decoder of `layers` layers over `tokens`."""

    layers: int
    tokens: int
    hidden: int
    mlp: int
    vision: float
    """The vision tower and projector for one image."""

    @property
    def per_token_layer(self) -> float:
        # q, k, v, o projections; gated MLP (3 matrices); eager attention scores and values over
        # every key (a suffix's queries still read all T keys)
        return 2 * (4 * self.hidden**2 + 3 * self.hidden * self.mlp) + 4 * self.hidden * self.tokens


def vision_work(layers: int, width: int, mlp: int, tokens: int, projected: int, text_hidden: int) -> float:
    """A CLIP tower (`tokens` = patches + CLS) and LLaVA's 2-layer projector of `projected` tokens."""
    tower = layers * tokens * (2 * (4 * width**2 + 2 * width * mlp) + 4 * width * tokens)
    return tower + projected * 2 * (width * text_hidden + text_hidden**2)


def work_of(config, tokens: int) -> Work:
    text, vision = config.text_config, config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return Work(
        layers=text.num_hidden_layers,
        tokens=tokens,
        hidden=text.hidden_size,
        mlp=text.intermediate_size,
        vision=vision_work(
            vision.num_hidden_layers,
            vision.hidden_size,
            vision.intermediate_size,
            patches + 1,
            patches,
            text.hidden_size,
        ),
    )


def ideal_bound(work: Work, cells: list[tuple[int, int]], vision: bool = False) -> float:
    """Full recomputation over per-cell resumption at (layer, position), decoder only unless
    `vision` (the tower then counts once per row in the ceiling, never in the resumed cells)."""
    row = work.tokens * work.layers * work.per_token_layer + (work.vision if vision else 0.0)
    resumed = sum((work.tokens - p) * (work.layers - layer) * work.per_token_layer for layer, p in cells)
    return len(cells) * row / resumed


def chunked_bound(work: Work, cells: list[tuple[int, int]], max_batch: int) -> float:
    """The ceiling's chunks (cells in order, `max_batch - 2` per chunk, 2 baseline rows each,
    every row a full forward with its image) over prefix reuse's (the baseline rows once in full,
    then per chunk of one first layer, its rows from that layer and its first position on; the
    image encoded once)."""
    per_chunk = max_batch - 2
    full_row = work.tokens * work.layers * work.per_token_layer + work.vision
    ceiling_work = sum(
        (2 + len(cells[i : i + per_chunk])) * full_row for i in range(0, len(cells), per_chunk)
    )
    prefix_work, i = 2 * full_row, 0
    while i < len(cells):
        layer = cells[i][0]
        chunk = [c for c in cells[i : i + per_chunk] if c[0] == layer]
        start = min(p for _, p in chunk)
        prefix_work += (2 + len(chunk)) * (work.tokens - start) * (work.layers - layer) * work.per_token_layer
        i += len(chunk)
    return ceiling_work / prefix_work


def llava7b_bounds() -> tuple[float, float, float]:
    """LLaVA-1.5-7B's all-image sweep: the ideal bound (decoder only; CLIP-L/336 tower included)
    and the bound of 128-row chunks (tower included)."""
    work = Work(
        layers=32,
        tokens=587,
        hidden=4096,
        mlp=11008,
        vision=vision_work(24, 1024, 4096, 577, 576, 4096),
    )
    cells = [(layer, p) for layer in range(32) for p in range(576)]
    return ideal_bound(work, cells), ideal_bound(work, cells, vision=True), chunked_bound(work, cells, 128)


def bounds(setup: Setup, tokens: int) -> dict[str, float]:
    work = work_of(setup.copies["torch"].config, tokens)
    decoder_only, with_tower, chunked = llava7b_bounds()
    return {
        "bound": chunked_bound(work, setup.cells, setup.max_batch),
        "ideal_bound": ideal_bound(work, setup.cells),
        "llava7b_bound": decoder_only,
        "llava7b_bound_with_tower": with_tower,
        "llava7b_chunked": chunked,
        "vision_share": work.vision / (work.vision + tokens * work.layers * work.per_token_layer),
    }


def print_bounds(found: dict[str, float], every: int) -> None:
    print(
        "  bounds: the ratio if time were proportional to multiply-adds (not counted: softmax, norms, "
        "memory traffic)\n"
        f"  bound (this run's chunks, vision tower {found['vision_share']:.0%} of a row's work, "
        f"counted)  {found['bound']:.2f}\n"
        f"  ideal_bound (this grid, decoder only, every cell resumed on its own)  "
        f"{found['ideal_bound']:.2f}\n"
        f"  llava7b_bound (32 layers, 587 tokens, all 576 image positions: decoder only / with the "
        f"CLIP-L tower; 128-row chunks: {found['llava7b_chunked']:.2f})  "
        f"{found['llava7b_bound']:.2f} / {found['llava7b_bound_with_tower']:.2f}"
        + (f"\n  (grid: one image position in {every})" if every > 1 else "")
    )


def measure(
    setup: Setup, every: int, repeats: int, corruption: vt.Corruption, tolerance: float = 1e-4
) -> tuple[dict[str, float], float, float]:
    """The three methods on the image grid, checked equal, timed in turns: runs/s of each, the
    largest difference from vlmtrace, and the spread of P(answer) across cells."""
    methods = {
        "vlmtrace": lambda: sweep(setup, False, every, corruption),
        "vlmtrace prefix": lambda: sweep(setup, True, every, corruption),
        "ceiling": lambda: ceiling(setup),
    }
    values, first = {}, {}
    for label, run in methods.items():
        start = time.perf_counter()
        values[label] = run()
        first[label] = [time.perf_counter() - start]
    worst = 0.0
    for label, grid in values.items():
        difference = float(np.nanmax(np.abs(grid - values["vlmtrace"])))
        worst = max(worst, difference)
        if difference > tolerance:
            raise SystemExit(f"{label} differs from vlmtrace by {difference:.2e}: not timing unequal work")
    seconds = {label: [] for label in methods} if repeats else first  # 0: time the checked calls
    for _ in range(repeats):
        for label, run in methods.items():
            if setup.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if setup.device.type == "cuda":
                torch.cuda.synchronize()
            seconds[label].append(time.perf_counter() - start)
    cells = len(setup.cells)
    spread = float(np.nanmax(values["vlmtrace"]) - np.nanmin(values["vlmtrace"]))
    if spread <= 10 * tolerance:
        print(f"WARNING: P(answer) spans {spread:.1e} across cells: the agreement check is vacuous here.")
    return {label: cells / min(times) for label, times in seconds.items()}, worst, spread


def image_positions(setup: Setup, every: int) -> list[int]:
    """The sample's image positions, every `every`-th (what `EveryNth` selects)."""
    ids = setup.vlm.processor(text=[setup.sample.prompt], images=[setup.sample.image])["input_ids"][0]
    return [p for p, token in enumerate(ids) if token == setup.vlm.shape.image_token_id][::every]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--patch-size", type=int, default=14)
    parser.add_argument(
        "--positions-every", type=int, default=16, help="patch every N-th image position (1: all)"
    )
    parser.add_argument(
        "--max-batch", type=int, default=None, help="rows per forward (default 2 + ceil(126 / N))"
    )
    parser.add_argument("--corruption", choices=("image", "str"), default="image")
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed calls after the checked one; 0 times the checked call"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    every = args.positions_every
    args.max_batch = args.max_batch or default_max_batch(every)
    shape = Shape(
        "7B-shaped", args.layers, args.hidden, args.heads, args.image_size, args.patch_size, 1, 1, 1
    )
    model, processor, name = build(shape, init_scale=4.0)
    args.init_scale = 4.0
    setup = make_setup(shape.label, model, processor, name, args, 1, own=True, libraries=())
    tokens = len(setup.vlm.processor(text=[setup.sample.prompt], images=[setup.sample.image])["input_ids"][0])
    setup.text = image_positions(setup, every)
    corruption = corrupt_with(setup, args.corruption)
    began, load = time.perf_counter(), os.getloadavg()[0]
    rates, worst, spread = measure(setup, every, args.repeats, corruption)
    print(
        f"{name}: {tokens} tokens, {len(setup.text)} image positions (one in {every}), "
        f"{len(setup.cells)} cells, max_batch {setup.max_batch}, threads {args.threads}, "
        f"{type(corruption).__name__}; {time.perf_counter() - began:.0f} s, 1-min load "
        f"{load:.2f} -> {os.getloadavg()[0]:.2f}\n"
        f"  the three agree to {worst:.1e}; P(answer) spans {spread:.3f} across cells"
    )
    for label, rate in rates.items():
        print(f"  {label:16} {rate:8.2f} runs/s   (best of {max(args.repeats, 1)})")
    found = bounds(setup, tokens)
    print_bounds(found, every)
    print(
        f"image_prefix image_prefix_vs_ceiling={rates['vlmtrace prefix'] / rates['ceiling']:.2f} "
        f"plain_vs_ceiling={rates['vlmtrace'] / rates['ceiling']:.2f} bound={found['bound']:.2f} "
        f"ideal_bound={found['ideal_bound']:.2f} llava7b_bound={found['llava7b_bound']:.2f}"
    )


if __name__ == "__main__":
    main()
