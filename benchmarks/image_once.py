"""What encoding each distinct image once per forward saves a sweep, per family shape.

A sweep's rows show two images, the clean one and its counterpart, over and over. Until
2026-12-07 every row of every forward ran the vision tower on its own copy of one of them; now a
`row_position` image encoder (`Adapter.image_encoder`) runs once per distinct image of a forward
and every row reads its image's encoding (`vlmtrace.engine.forward.ImageRows`). How much that
saves depends on how much of a row's work the vision tower is:

    blip   BLIP VQA: a ViT over every patch, then a question encoder over a dozen text tokens
           that cross-attends to them. The vision tower is most of a row's work.
    llava  LLaVA-1.5: the projected patches are prompt tokens, so the decoder runs over them
           too. The vision tower is a smaller share.

For each, `vt.patch` runs block restoration at every (layer, position) of the default stack,
image pair (`--corruption str`: the phrase replaced, one image), twice in turns: as the engine
runs it, and with an adapter that declares no encoder inputs (`image_encoder_inputs=()`), which
encodes every row's image as before. The two grids must agree (max abs difference < 1e-5) before
anything is timed. Random weights at a reduced width, with the real models' image-token to
text-token ratio (224 px, 16 px patches: 196 patches; the tiny LLaVA's 256 positions leave no
room for LLaVA-1.5's 14 px patches).

    python -m benchmarks.image_once                       # from the repository root, ~1 min
    python -m benchmarks.image_once --hidden 256 --repeats 3
    python -m benchmarks.image_once --corruption str --max-batch 8   # one image a forward, small chunks
    python -m benchmarks.image_once --method atp+graddrop   # an attribution pass (vt.attribute) instead

An attribution pass (`--method`) is one forward and backward of the clean and corrupted rows, plus
a copy of the corrupted row per layer (GradDrop, `atp+graddrop`, `atp*`) or per path point
(`ig`); it encodes once per image where its rows get their encodings before any embedding edit.

The last line is `image_once blip=<speed-up> llava=<speed-up>`, each the ratio of the best
calls (every row encodes / once per image), CPU time of this process with one torch thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from functools import partial

import numpy as np
import torch
from PIL import Image

import vlmtrace as vt
from vlmtrace.models.build import build_blip, build_llava, word_tokenizer

WORDS = "what colour is the shape in the middle of this picture ? red green blue circle square".split()
QUESTION = "what colour is the shape in the middle of this picture ?"


def models(args: argparse.Namespace) -> dict[str, tuple[vt.VLM, str]]:
    """The two families at the benchmark's shape, each with its prompt."""
    tokenizer = word_tokenizer(WORDS)
    shape = dict(hidden=args.hidden, layers=args.layers, vision_layers=args.layers, image_size=224, seed=0)
    blip = vt.wrap(*build_blip(tokenizer, patch_size=16, **shape), name="blip-224")
    llava = vt.wrap(*build_llava(tokenizer, patch_size=16, **shape), name="llava-224")
    return {"blip": (blip, QUESTION), "llava": (llava, f"<image> {QUESTION}")}


CORRUPTIONS = {"pair": vt.ImagePair(), "str": vt.SymmetricTokenReplacement("shape")}
"""`pair`: the corrupted run shows another image (two images a forward). `str`: the phrase
"the shape" becomes "the circle" (one image a forward: the clean one on both sides)."""


def sweep(
    vlm: vt.VLM, sample: vt.Sample, max_batch: int, corruption: str, method: str = "patch"
) -> np.ndarray:
    """The block grid of `vt.patch`, or of `vt.attribute` with estimator `method`."""
    grid = vt.Grid(sites=("block",), windows=(1,))
    if method == "patch":
        ds = vt.patch(
            vlm, [sample], corruption=CORRUPTIONS[corruption], grid=grid, max_batch=max_batch, progress=False
        )
    else:
        ds = vt.attribute(
            vlm, [sample], corruption=CORRUPTIONS[corruption], grid=grid, method=method, progress=False
        )
    return ds.variables["block"].values


def every_row(vlm: vt.VLM) -> vt.VLM:
    """The same model with an adapter that declares no encoder inputs: every row encodes."""
    return dataclasses.replace(vlm, adapter=dataclasses.replace(vlm.adapter, image_encoder_inputs=()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=128, help="width of both towers")
    parser.add_argument("--layers", type=int, default=4, help="layers of each tower")
    parser.add_argument("--max-batch", type=int, default=32, help="rows per forward")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each way, in turns")
    parser.add_argument("--corruption", choices=sorted(CORRUPTIONS), default="pair")
    parser.add_argument(
        "--method",
        choices=["patch", "atp", "ig", "atp+graddrop", "atp*"],
        default="patch",
        help="`vt.patch`, or `vt.attribute` with this estimator (one pass of 2 to 2 + layers rows)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    clean, other = (Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in "ab")
    print(
        f"shape: {args.layers} layers per tower, d={args.hidden}, 224 px images; block x window 1 at every "
        f"(layer, position); {args.method}; corruption {args.corruption}; max_batch={args.max_batch}; "
        f"torch threads 1, CPU time; 1-min load {os.getloadavg()[0]:.2f}"
    )
    speedups = {}
    for family, (vlm, prompt) in models(args).items():
        sample = vt.Sample(
            prompt=prompt,
            answer="red",
            image=clean,
            image_pair=other,
            spans={"shape": "the shape"},
            replacements={"shape": "the circle"},
            id=family,
        )
        ways = {"once per image": vlm, "every row": every_row(vlm)}
        run = partial(
            sweep, sample=sample, max_batch=args.max_batch, corruption=args.corruption, method=args.method
        )
        values = {name: run(model) for name, model in ways.items()}  # also the warm-up
        difference = float(np.nanmax(np.abs(values["once per image"] - values["every row"])))
        if not difference < 1e-5:
            raise SystemExit(f"{family}: the two ways disagree by {difference:.2e}; not comparable.")
        seconds: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.repeats):
            for name, model in ways.items():
                start = time.process_time()
                run(model)
                seconds[name].append(time.process_time() - start)
        cells = int(np.isfinite(values["every row"]).sum())
        best = {name: min(times) for name, times in seconds.items()}
        speedups[family] = best["every row"] / best["once per image"]
        print(
            f"{family}: {cells} cells, agree to {difference:.1e}; every row {best['every row']:.2f} s, "
            f"once per image {best['once per image']:.2f} s (best of {args.repeats}): x{speedups[family]:.2f}"
        )
    print("image_once " + " ".join(f"{family}={ratio:.2f}" for family, ratio in speedups.items()))


if __name__ == "__main__":
    main()
