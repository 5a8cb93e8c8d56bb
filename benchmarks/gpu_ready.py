"""A GPU-ready benchmark: vlmtrace against its peers on a 7B-shaped random LLaVA, three experiments.

Written to be run as is by someone with a GPU:

    python -m benchmarks.gpu_ready --device cuda --dtype bfloat16     # LLaVA-1.5-7B's shape
    python -m benchmarks.gpu_ready                                     # no GPU: scaled down

Model (`--scale 7b`, the default on CUDA): LLaVA-1.5-7B's shape with random weights: a Llama
decoder of 32 layers, d=4096, 32 heads (head dim 128), MLP 11008; a CLIP tower of 24 layers,
d=1024, 16 heads, MLP 4096, 336 px images in 14 px patches (576 image tokens); a word-level
vocabulary (66 words: logits are cheap, unlike a 32000-word head). The decoder's matrices are
redrawn at std 4/sqrt(d) (`peers.redraw`) so that P(answer) moves across cells and the agreement
check is not vacuous; the answer is the model's own clean top-1. `--scale cpu` (the default
without CUDA) keeps the proportions that matter here (head dim 128, MLP 2.69 d, image tokens
before an 11-token question) at a size one CPU core runs in minutes: 4 layers, d=256, 2 heads,
64 image tokens; flags override each size. The model is built on `--device` in `--dtype`, and
every method runs that one set of weights (each peer on its own copy, made after the move).

Experiments, each on one grid that every method computes in full:

(a) peers: the clean block output (residual stream) restored at every (layer, text position) of a
    run whose visual-constraint phrase was replaced ("the purple shape" -> "the green shape"),
    P(answer) at the last position: `benchmarks/peers.py`'s grid. Methods: vlmtrace (`vt.patch`),
    vlmtrace with `reuse_prefix=True`, the hand-written batched ceiling (plain torch, vlmtrace's
    rows, indexed edits in forward hooks), TransformerLens 4.3 (`TransformerBridge` +
    `generic_activation_patch`, one forward per cell) if it installs and loads, and an nnsight
    loop (one trace per cell).
(b) heads, NOTICE-style (Golovanevsky et al.): every attention head at every layer restored at
    the last position (`--head-segment`: another segment, e.g. "visual"), the corrupted run
    showing the paired image (`--head-corruption image`, NOTICE's SIP) or the phrase replaced
    (`str`, its STR); `vt.Grid(sites=("attn_head",), segments=("last",))`. A head's output is its
    slice of the attention output projection's input (`self_attn.o_proj`), which is what the
    ceiling and the nnsight loop edit and TransformerLens's `hook_z` holds.
(c) image: block output restored at every (layer, image position), prefix reuse resuming inside
    the image block (`benchmarks/image_prefix.py`), every `--image-every`-th image position (the
    default 8 on the 7B shape, 2 on the CPU scale; 1 is the whole sweep), against the ceiling and
    plain vlmtrace; with the work-count bounds of `image_prefix.py`.

vlmtrace runs as a user gets it: `vt.patch`'s defaults, its self-check included (two unbatched
forwards of the clean and corrupted inputs per sweep, `verify=True`), which the ceiling does not
do; on a small grid (the CPU scale's 8-cell head sweep) that is a visible share of the time.

For each method: runs/s (patched runs per second, best of the timed calls; CUDA timings between
`torch.cuda.synchronize()` calls), the ratio to the ceiling, to TransformerLens and to the nnsight
loop, peak memory of its first call (CUDA: `torch.cuda.max_memory_allocated` after
`reset_peak_memory_stats`, and the part above what was allocated before the call, i.e. above
the resident weights of every copy; CPU: the process's RSS sampled every 5 ms during the call),
and the largest difference of its P(answer) from vlmtrace's with whether it is within the dtype's
tolerance (float32 1e-4, float16 1e-2, bfloat16 5e-2: a bf16 forward depends on the batch it is
computed in). The first call of each method is its check and warm-up; then timed calls are taken
in turns, so load bursts hit all methods alike.

Last lines: `gpu_ready peers vs_ceiling=<vlmtrace/ceiling> prefix_vs_ceiling=<r>
vs_transformerlens=<r> vs_nnsight_loop=<r>`, the same for `heads`, then `gpu_ready image
image_prefix_vs_ceiling=<r> bound=<b>`, each led by the device, dtype and scale they came from.
On a CPU every line says that it ran scaled down: those are not GPU numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import resource
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

import vlmtrace as vt
from benchmarks import image_prefix, peers
from benchmarks.peers import SPAN, Setup, make_setup, on_device, probability
from vlmtrace.data.scenes import VOCABULARY
from vlmtrace.models import build
from vlmtrace.models.build import word_tokenizer

TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Size:
    layers: int
    hidden: int
    heads: int
    mlp: int
    vision_layers: int
    vision_hidden: int
    vision_heads: int
    vision_mlp: int
    image_size: int
    patch_size: int
    image_every: int
    max_batch: int
    repeats: int
    loop_repeats: int


SCALES = {
    # LLaVA-1.5-7B: Vicuna-7B (Llama) and CLIP ViT-L/14-336
    "7b": Size(32, 4096, 32, 11008, 24, 1024, 16, 4096, 336, 14, 8, 128, 2, 1),
    # what a CPU core runs in minutes: head dim 128, MLP 2.69 d, 64 image tokens
    "cpu": Size(4, 256, 2, 688, 2, 256, 2, 1024, 112, 14, 2, 128, 2, 1),
}


# -- the model ------------------------------------------------------------------------------------


def build_llava(size: Size, device: torch.device, dtype: torch.dtype, attn: str) -> tuple[Any, Any]:
    """The LLaVA of `size` (MLP, CLIP width and depth its own; LLaVA-1.5's projector input, the
    CLIP layer before the last), its weights made on `device` in `dtype` directly."""
    return build.build_llava(
        word_tokenizer(VOCABULARY),
        image_size=size.image_size,
        patch_size=size.patch_size,
        vision_layers=size.vision_layers,
        hidden=size.hidden,
        layers=size.layers,
        heads=size.heads,
        attn_implementation=attn,
        mlp=size.mlp,
        vision_hidden=size.vision_hidden,
        vision_heads=size.vision_heads,
        vision_mlp=size.vision_mlp,
        vision_feature_layer=-2 if size.vision_layers > 1 else -1,
        max_positions=4096,
        device=device,
        dtype=dtype,
    )


# -- measuring ------------------------------------------------------------------------------------


class RssSampler:
    """The process's peak RSS during a block, sampled every 5 ms (CPU runs; ru_maxrss only rises)."""

    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process()
        self.peak = 0
        self.stop = threading.Event()

    def __enter__(self) -> RssSampler:
        self.peak = self.process.memory_info().rss

        def sample() -> None:
            while not self.stop.wait(0.005):
                self.peak = max(self.peak, self.process.memory_info().rss)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


@dataclass
class Method:
    name: str
    run: Callable[[], np.ndarray]
    loop: bool = False
    """One forward per cell: timed `loop_repeats` times."""


@dataclass
class Measured:
    runs: int
    values: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: dict[str, list[float]] = field(default_factory=dict)
    memory: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Peak GiB of the first call, and the part above what was allocated (or resident) before it."""
    failed: dict[str, str] = field(default_factory=dict)

    def rate(self, name: str) -> float:
        times = self.seconds.get(name)
        return self.runs / min(times) if times else float("nan")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_call(method: Method, device: torch.device) -> tuple[np.ndarray, tuple[float, float]]:
    """The checked call, with its peak memory."""
    gib = 2**30
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        values = method.run()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return values, (peak / gib, (peak - before) / gib)
    sampler = RssSampler()
    before = sampler.process.memory_info().rss
    with sampler:
        values = method.run()
    return values, (sampler.peak / gib, (sampler.peak - before) / gib)


def measure(
    methods: list[Method], runs: int, device: torch.device, repeats: int, loop_repeats: int
) -> Measured:
    result = Measured(runs=runs)
    active = []
    for method in methods:
        try:
            result.values[method.name], result.memory[method.name] = first_call(method, device)
            active.append(method)
        except Exception as error:  # a peer that breaks on this model is reported, never faked
            result.failed[method.name] = f"failed: {type(error).__name__}: {str(error)[:200]}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result.seconds = {m.name: [] for m in active}
    for turn in range(max(repeats, loop_repeats)):
        for method in active:
            if turn < (loop_repeats if method.loop else repeats):
                synchronize(device)
                start = time.perf_counter()
                method.run()
                synchronize(device)
                result.seconds[method.name].append(time.perf_counter() - start)
    return result


def table(result: Measured, order: list[str], reference: str, tolerance: float, describe: dict) -> None:
    """One row per method: runs/s, ratios, peak memory, agreement with `reference`."""
    rate = {name: result.rate(name) for name in order}

    def over(name: str, other: str) -> str:
        if other not in result.seconds or name not in result.seconds:
            return "n/a"
        return f"{rate[name] / rate[other]:.3f}"

    print(
        "| method | what | runs | best s | median s | runs/s | / ceiling | / TransformerLens "
        "| / nnsight loop | peak GiB | above start GiB | max abs diff | agree |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for name in order:
        if name not in result.seconds:
            why = result.failed.get(name, "not run")
            print(f"| {name} | {why} | | | | | | | | | | | |")
            continue
        times = result.seconds[name]
        difference = float(np.nanmax(np.abs(result.values[name] - result.values[reference])))
        peak, above = result.memory[name]
        print(
            f"| {name} | {describe[name]} | {result.runs} | {min(times):.4f} | "
            f"{statistics.median(times):.4f} | "
            f"{rate[name]:.2f} | {over(name, 'ceiling')} | {over(name, 'TransformerLens')} | "
            f"{over(name, 'nnsight loop')} | {peak:.2f} | {above:.2f} | {difference:.1e} | "
            f"{'yes' if difference <= tolerance else 'NO'} |"
        )
    spread = float(np.nanmax(result.values[reference]) - np.nanmin(result.values[reference]))
    agreed = [n for n in order if n in result.seconds]
    worst = max(float(np.nanmax(np.abs(result.values[n] - result.values[reference]))) for n in agreed)
    if worst <= tolerance:
        print(
            f"\nAll {len(agreed)} methods that ran agree with {reference} to {worst:.1e} (tolerance "
            f"{tolerance:g} for this dtype); P(answer) spans {spread:.3f} across cells."
        )
    else:
        print(f"\nDISAGREEMENT: a method differs from {reference} by {worst:.1e} > {tolerance:g}.")
    if spread <= 10 * tolerance:
        print("WARNING: P(answer) barely moves across cells: the agreement check cannot tell cells apart.")


def headline(kind: str, result: Measured, context: str) -> str:
    def ratio(a: str, b: str) -> str:
        if a in result.seconds and b in result.seconds:
            return f"{result.rate(a) / result.rate(b):.2f}"
        return "n/a"

    return (
        f"gpu_ready {kind} vs_ceiling={ratio('vlmtrace', 'ceiling')} "
        f"prefix_vs_ceiling={ratio('vlmtrace prefix', 'ceiling')} "
        f"vs_transformerlens={ratio('vlmtrace', 'TransformerLens')} "
        f"prefix_vs_transformerlens={ratio('vlmtrace prefix', 'TransformerLens')} "
        f"vs_nnsight_loop={ratio('vlmtrace', 'nnsight loop')} [{context}]"
    )


# -- (a) the peers' grid --------------------------------------------------------------------------


def peers_experiment(setup: Setup, size: Size, tolerance: float, context: str) -> str:
    methods = [
        Method("vlmtrace", lambda: peers.vlmtrace_sweep(setup)),
        Method("vlmtrace prefix", lambda: peers.vlmtrace_prefix(setup)),
        Method("ceiling", lambda: peers.ceiling(setup)),
        Method("TransformerLens", lambda: peers.transformer_lens(setup), loop=True),
        Method("nnsight loop", lambda: peers.nnsight_loop(setup), loop=True),
    ]
    print(
        f"\n## (a) peers: block output, window 1, {setup.n_layers} layers x {len(setup.text)} text "
        f"positions = {len(setup.cells)} cells, ReplaceSpan({SPAN!r}), max_batch={setup.max_batch}\n",
        flush=True,
    )
    runnable = [m for m in methods if m.name not in setup.unavailable]
    result = measure(runnable, len(setup.cells), setup.device, size.repeats, size.loop_repeats)
    result.failed.update(setup.unavailable)
    table(result, [m.name for m in methods], "vlmtrace", tolerance, peers.DESCRIPTIONS)
    return headline("peers", result, context)


# -- (b) NOTICE-style head patching ---------------------------------------------------------------


@dataclass
class HeadSweep:
    setup: Setup
    grid: vt.Grid
    corruption: Any
    clean: dict[str, torch.Tensor]
    corrupt: dict[str, torch.Tensor]
    positions: list[int]
    heads: int
    head_dim: int

    @property
    def cells(self) -> list[tuple[int, int, int]]:
        """(layer, position, head), in the order of the [layer, position, head] grid."""
        return [
            (layer, p, h)
            for layer in range(self.setup.n_layers)
            for p in self.positions
            for h in range(self.heads)
        ]

    def to_grid(self, values) -> np.ndarray:
        return np.asarray(values, dtype=float).reshape(self.setup.n_layers, len(self.positions), self.heads)


def head_sweep(setup: Setup, corruption_kind: str, segment: str) -> HeadSweep:
    sample = setup.sample
    config = setup.copies["torch"].config.text_config
    if corruption_kind == "image":
        corruption: Any = vt.ImagePair()
        corrupt_prompt, corrupt_image = sample.prompt, sample.image_pair
    else:
        corruption = vt.ReplaceSpan(SPAN)
        corrupt_prompt, corrupt_image = setup.corrupted_prompt, sample.image
    grid = vt.Grid(sites=("attn_head",), windows=(1,), positions="tokens", segments=(segment,))
    sweep = HeadSweep(
        setup,
        grid,
        corruption,
        clean=encode(setup, sample.prompt, sample.image),
        corrupt=encode(setup, corrupt_prompt, corrupt_image),
        positions=[],
        heads=config.num_attention_heads,
        head_dim=config.hidden_size // config.num_attention_heads,
    )
    probe = HeadSweep(**{**sweep.__dict__, "grid": replace(grid, layers=(0,), heads=(0,))})
    sweep.positions = [int(p) for p in vlmtrace_heads(probe, reuse_prefix=False, raw=True)["index"].values]
    if segment == "last" and sweep.positions != [sweep.clean["input_ids"].shape[1] - 1]:
        raise SystemExit(f"segment 'last' is at {sweep.positions}, not the last prompt position")
    return sweep


def encode(setup: Setup, prompt: str, image: Any) -> dict[str, torch.Tensor]:
    return on_device(setup, setup.vlm.processor(text=[prompt], images=[image], return_tensors="pt"))


def vlmtrace_heads(sweep: HeadSweep, reuse_prefix: bool, raw: bool = False) -> Any:
    setup = sweep.setup
    ds = vt.patch(
        setup.vlm,
        [setup.sample],
        corruption=sweep.corruption,
        grid=sweep.grid,
        metric=vt.Probability(),
        max_batch=setup.max_batch,
        progress=False,
        reuse_prefix=reuse_prefix,
    )
    values = ds["attn_head"].sel(window=1).isel(sample=0).transpose("layer", "position", "head")
    if raw:
        return values
    if [int(p) for p in values["index"].values] != sweep.positions:
        raise SystemExit("vlmtrace's head grid moved between calls")
    return values.values


def o_proj(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    return model.model.language_model.layers[layer].self_attn.o_proj


@torch.no_grad()
def ceiling_heads(sweep: HeadSweep) -> np.ndarray:
    """vlmtrace's rows by hand: [clean, corrupt, patched...] per chunk, one forward each; a
    forward pre-hook on each layer's `o_proj` copies the clean row's head slices into the
    chunk's rows there (`x.view(B, T, H, hd)[rows, pos, head] = ...[0, pos, head]`)."""
    setup = sweep.setup
    model = setup.copies["torch"]
    cells, per_chunk = sweep.cells, setup.max_batch - 2
    values: list[float] = []
    for start in range(0, len(cells), per_chunk):
        chunk = torch.tensor(cells[start : start + per_chunk], device=setup.device)
        corrupted = peers.repeat(sweep.corrupt, 1 + len(chunk))
        batch = {name: torch.cat([sweep.clean[name], corrupted[name]]) for name in sweep.clean}
        rows = torch.arange(2, 2 + len(chunk), device=setup.device)
        hooks = []
        for layer in range(setup.n_layers):
            here = chunk[:, 0] == layer
            if not bool(here.any()):
                continue

            def restore(module, args, rows=rows[here], positions=chunk[here, 1], heads=chunk[here, 2]):
                x = args[0]
                split = x.view(*x.shape[:-1], sweep.heads, sweep.head_dim)
                split[rows, positions, heads] = split[0, positions, heads]

            hooks.append(o_proj(model, layer).register_forward_pre_hook(restore))
        try:
            logits = model(**batch, logits_to_keep=1).logits
        finally:
            for hook in hooks:
                hook.remove()
        values += probability(logits[2:], setup.answer_id).tolist()
    return sweep.to_grid(values)


@torch.no_grad()
def nnsight_heads(sweep: HeadSweep) -> np.ndarray:
    """One nnsight trace of the corrupted input per cell, one head's slice restored."""
    setup = sweep.setup
    layers = setup.vlm.envoy.model.language_model.layers
    states = []
    with setup.vlm.envoy.trace(**sweep.clean, logits_to_keep=1):
        for layer in range(setup.n_layers):
            states.append(layers[layer].self_attn.o_proj.input.save())
    values = []
    for layer, p, h in sweep.cells:
        columns = slice(h * sweep.head_dim, (h + 1) * sweep.head_dim)
        with setup.vlm.envoy.trace(**sweep.corrupt, logits_to_keep=1):
            layers[layer].self_attn.o_proj.input[0, p, columns] = states[layer][0, p, columns]
            value = probability(setup.vlm.envoy.output.logits, setup.answer_id).save()
        values.append(value.item())
    return sweep.to_grid(values)


@torch.no_grad()
def transformer_lens_heads(sweep: HeadSweep) -> np.ndarray:
    """`generic_activation_patch` on `hook_z` ([batch, pos, head, d_head]) at the grid's cells."""
    import pandas as pd
    from transformer_lens import patching

    setup = sweep.setup
    clean, corrupt = sweep.clean, sweep.corrupt
    cache = setup.bridge.run_with_cache(
        clean["input_ids"],
        pixel_values=clean["pixel_values"],
        names_filter=lambda name: name.endswith("hook_z"),
    )[1]
    index = pd.DataFrame(sweep.cells, columns=["layer", "pos", "head"])
    with contextlib.redirect_stderr(io.StringIO()):
        values = patching.generic_activation_patch(
            peers.WithImage(setup.bridge, corrupt["pixel_values"]),
            corrupt["input_ids"],
            cache,
            lambda logits: probability(logits, setup.answer_id)[0],
            patching.layer_pos_head_vector_patch_setter,
            "z",
            index_df=index,
        )
    return sweep.to_grid(values.float().cpu().numpy())


HEAD_DESCRIPTIONS = {
    "vlmtrace": "vt.patch, Grid(sites=('attn_head',)), every cell a row of batched forwards",
    "vlmtrace prefix": "the same, reuse_prefix=True: from each cell's layer and position on",
    "ceiling": "plain torch, vlmtrace's rows, o_proj pre-hooks copying head slices",
    "TransformerLens": "TransformerBridge + generic_activation_patch on hook_z, 1 forward per cell",
    "nnsight loop": "one nnsight trace per cell editing o_proj's input",
}


def heads_experiment(
    setup: Setup, size: Size, tolerance: float, corruption: str, segment: str, context: str
) -> str:
    sweep = head_sweep(setup, corruption, segment)
    methods = [
        Method("vlmtrace", lambda: vlmtrace_heads(sweep, False)),
        Method("vlmtrace prefix", lambda: vlmtrace_heads(sweep, True)),
        Method("ceiling", lambda: ceiling_heads(sweep)),
        Method("TransformerLens", lambda: transformer_lens_heads(sweep), loop=True),
        Method("nnsight loop", lambda: nnsight_heads(sweep), loop=True),
    ]
    what = (
        "the paired image (ImagePair, NOTICE's SIP)"
        if corruption == "image"
        else f"ReplaceSpan({SPAN!r}) (STR)"
    )
    print(
        f"\n## (b) heads, NOTICE-style: attention heads, window 1, {setup.n_layers} layers x "
        f"{len(sweep.positions)} position(s) of segment {segment!r} ({sweep.positions}) x "
        f"{sweep.heads} heads "
        f"= {len(sweep.cells)} cells; corrupted run: {what}; max_batch={setup.max_batch}\n",
        flush=True,
    )
    runnable = [m for m in methods if m.name not in setup.unavailable]
    result = measure(runnable, len(sweep.cells), setup.device, size.repeats, size.loop_repeats)
    result.failed.update(setup.unavailable)
    table(result, [m.name for m in methods], "vlmtrace", tolerance, HEAD_DESCRIPTIONS)
    return headline("heads", result, context)


# -- (c) every image position, prefix reuse ------------------------------------------------------


def image_experiment(setup: Setup, size: Size, tolerance: float, max_batch: int | None, context: str) -> str:
    every = size.image_every
    saved = setup.text, setup.max_batch, setup.corrupted_prompt, setup.corrupted_image
    tokens = len(setup.vlm.processor(text=[setup.sample.prompt], images=[setup.sample.image])["input_ids"][0])
    setup.text = image_prefix.image_positions(setup, every)
    setup.max_batch = max_batch or image_prefix.default_max_batch(every)
    corruption = image_prefix.corrupt_with(setup, "image")
    try:
        methods = [
            Method("vlmtrace", lambda: image_prefix.sweep(setup, False, every, corruption, verify=True)),
            Method(
                "vlmtrace prefix", lambda: image_prefix.sweep(setup, True, every, corruption, verify=True)
            ),
            Method("ceiling", lambda: peers.ceiling(setup)),
        ]
        print(
            f"\n## (c) image: block output, window 1, {setup.n_layers} layers x {len(setup.text)} image "
            f"positions (one in {every} of the image block; {tokens} tokens) = {len(setup.cells)} cells, "
            f"ImagePair (the paired image), max_batch={setup.max_batch}"
            f"{'' if max_batch else SPANS_LIKE_FULL_SWEEP}\n",
            flush=True,
        )
        result = measure(methods, len(setup.cells), setup.device, size.repeats, size.loop_repeats)
        table(result, [m.name for m in methods], "vlmtrace", tolerance, IMAGE_DESCRIPTIONS)
        found = image_prefix.bounds(setup, tokens)
        image_prefix.print_bounds(found, every)
    finally:
        setup.text, setup.max_batch, setup.corrupted_prompt, setup.corrupted_image = saved
    ratio = (
        result.rate("vlmtrace prefix") / result.rate("ceiling") if "ceiling" in result.seconds else math.nan
    )
    return (
        f"gpu_ready image image_prefix_vs_ceiling={ratio:.2f} bound={found['bound']:.2f} "
        f"ideal_bound={found['ideal_bound']:.2f} llava7b_bound={found['llava7b_bound']:.2f} [{context}]"
    )


SPANS_LIKE_FULL_SWEEP = " (a chunk spans ~126 image positions, as a 128-row chunk of the whole sweep does)"
IMAGE_DESCRIPTIONS = {
    "vlmtrace": "vt.patch over the image positions, every position recomputed",
    "vlmtrace prefix": "reuse_prefix=True: resumes inside the image block on cached keys/values",
    "ceiling": "plain torch, vlmtrace's rows in one forward per chunk, indexed edits in hooks",
}


# -- main -----------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu", help="cuda, cuda:1, cpu")
    parser.add_argument(
        "--dtype", choices=list(DTYPES), default=None, help="bfloat16 on cuda, float32 on cpu"
    )
    parser.add_argument(
        "--scale", choices=list(SCALES), default=None, help="7b (default on cuda) or cpu (default without)"
    )
    for name in Size.__dataclass_fields__:
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=int, default=None, help=f"override the scale's {name}"
        )
    parser.add_argument("--parts", default="peers,heads,image", help="comma-separated: peers, heads, image")
    parser.add_argument(
        "--image-max-batch",
        type=int,
        default=None,
        help="(c): rows per chunk (default 2 + ceil(126 / every))",
    )
    parser.add_argument("--head-corruption", choices=("image", "str"), default="image")
    parser.add_argument(
        "--head-segment", default="last", help="segment whose positions the head sweep patches"
    )
    parser.add_argument("--no-transformer-lens", action="store_true", help="skip TransformerLens")
    parser.add_argument("--attn", default="eager", help="attn_implementation (every method shares it)")
    parser.add_argument("--init-scale", type=float, default=4.0, help="decoder matrices' std x sqrt(d)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (cpu default: 1)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; run without --device for the CPU scale.")
    scale = args.scale or ("7b" if device.type == "cuda" else "cpu")
    size = Size(
        **{
            name: getattr(args, name) if getattr(args, name) is not None else getattr(SCALES[scale], name)
            for name in Size.__dataclass_fields__
        }
    )
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    tolerance = TOLERANCE[dtype]
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    shape = [
        f
        for f in Size.__dataclass_fields__
        if f not in ("image_every", "max_batch", "repeats", "loop_repeats")
    ]
    scaled = device.type != "cuda" or any(getattr(size, f) != getattr(SCALES["7b"], f) for f in shape)
    context = f"{device.type} {str(dtype).removeprefix('torch.')}, --scale {scale}"
    if size != SCALES[scale]:
        context += " with sizes overridden"
    if scaled:
        context += ", scaled down"
    began, load_before = time.perf_counter(), os.getloadavg()[0]
    print(f"# vlmtrace gpu_ready benchmark\n\nMachine: {peers.machine()}")
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}")
    if scaled:
        print(
            f"NOTE: this run is scaled down ({context}); its numbers are not GPU numbers for the 7B "
            "shape. Run `python -m benchmarks.gpu_ready --device cuda --dtype bfloat16` on a GPU for those."
        )
    model, processor = build_llava(size, device, dtype, args.attn)
    if args.init_scale:
        peers.redraw(model, args.init_scale)
    name = f"random-llava-{size.layers}x{size.hidden}"
    setup_args = argparse.Namespace(max_batch=size.max_batch)
    libraries = () if args.no_transformer_lens else ("tl",)
    setup = make_setup("7B-shaped", model, processor, name, setup_args, 1, own=True, libraries=libraries)
    if args.no_transformer_lens:
        setup.unavailable["TransformerLens"] = "not run (--no-transformer-lens)"
    tokens = len(peers.encode(setup, setup.sample.prompt)["input_ids"][0])
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    print(
        f"\nModel: {name}, {peers.model_description(model.config)}; {tokens} prompt tokens, "
        f"{tokens - len(setup.text)} of them image tokens; {device}, {str(dtype).removeprefix('torch.')}, "
        f"attn {args.attn}; {weights:.2f} GiB of weights per copy "
        f"({1 + len(setup.copies)} copies: vlmtrace's, the ceiling's"
        f"{', TransformerLens' if 'tl' in setup.copies else ''})."
        f"\nSample: {setup.sample.prompt!r} -> {setup.sample.answer!r} (the model's own top-1).\n"
        f"Timing: first call checked (and its peak memory taken), then best of {size.repeats} "
        f"(batched) / {size.loop_repeats} (loops) calls taken in turns; runs/s = patched runs / best seconds."
    )
    parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    lines = []
    if "peers" in parts:
        lines.append(peers_experiment(setup, size, tolerance, context))
    if "heads" in parts:
        lines.append(
            heads_experiment(setup, size, tolerance, args.head_corruption, args.head_segment, context)
        )
    if "image" in parts:
        lines.append(image_experiment(setup, size, tolerance, args.image_max_batch, context))
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(
        f"\nProcess peak RSS {peak_rss:.2f} GiB; 1-min load average {load_before:.2f} before / "
        f"{os.getloadavg()[0]:.2f} after; {time.perf_counter() - began:.0f} s in all."
    )
    if scaled:
        print(f"Scaled down ({context}): not GPU numbers.")
    for line in lines:
        print(line)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
