"""vlmtrace against its peers: patched runs per second of one causal trace, same model, same grid.

A causal trace restores the clean residual stream at every (layer, text position) cell of a
corrupted run and scores each restored run. The libraries of the field do that in different
ways; this benchmark runs each of them on the same model, sample and grid, checks that they
compute the same numbers, and times them:

    vlmtrace          `vt.patch(...)`: every cell a row of one batched forward in one nnsight trace
    TransformerLens   4.3's `TransformerBridge` on the LLaVA itself and
                      `patching.generic_activation_patch` (one forward per cell)
    pyvene            0.1.8's `IntervenableModel`: one forward per layer, a batch row per position
                      restored from collected clean states (its batched form, not one call per cell)
    nnsight loop      one nnsight trace per cell (`vlm.envoy`)
    ceiling           plain torch, vlmtrace's rows by hand: one forward per chunk of `max_batch`
                      rows, a forward hook per layer doing `h[rows, pos] = h[0, pos]`
    ROME-style loop   Meng et al.'s causal trace written from the paper: a batch of the clean row
                      and k rows with Gaussian noise on the phrase's embeddings, one forward per
                      cell, plain forward hooks; timed against `vt.patch` with
                      `GaussianNoise("visual", samples=k)`, the same experiment (same draws)

The corruption of the first five is Basu et al.'s: the visual-constraint phrase ("the red shape")
replaced by another of the same token count (`vt.ReplaceSpan("visual")`); the metric is
P(answer) at the last position; the site is the block output (residual stream), window 1, at
every layer and every text position (image tokens are left out: they precede the phrase, so
clean and corrupted states there are equal). Every method starts from the `Sample` (processor
encoding included) and ends with the grid of P(answer). A run is one patched row: a cell of the
noise experiment is k runs. Before anything is timed, every grid is compared with vlmtrace's.

Two models:

    first       the shipped organism `shapes-llava` (trained: CLIP 2 layers, Llama 6 layers, d=64,
                16 image tokens), or `--model PATH` / `--model random` (a tiny random LLaVA,
                `build_llava`, Llama 4 layers, d=64)
    7B-shaped   `build_llava`, random weights: LLaVA-1.5-7B's proportions cut to what a CPU core
                runs in seconds: 576 image tokens (336 px, 14 px patches), head dim 128 (d=512,
                4 heads), MLP 4 x d, 2 Llama layers, a 2-layer CLIP tower of width 512

Random Llama weights with the default initialisation give P(answer) flat to 1e-4 across cells,
which would make the equality check vacuous; the language model's matrices are therefore redrawn
with std `--init-scale / sqrt(d)` (q and k with half of it, see `redraw`), and the answer is the
model's own clean prediction. The sample is a synthetic multi-constraint question
(`vlmtrace.data.synthetic_samples(vlm, "multi", 1)`).

    python -m benchmarks.peers                  # from the repository root, ~3 min on 1 thread
    python -m benchmarks.peers --skip-big       # the shipped organism only, ~20 s
    python -m benchmarks.peers --model random   # a tiny random LLaVA instead of the organism

A third section runs the same table on an M-RoPE family, Qwen2-VL, whose positions the model
computes (`--mrope`: the shipped organism `shapes-qwen` by default, `random` for a tiny random
Qwen2-VL, `none` to skip; `--only-mrope` runs it alone). Its pixel values are flat (one row per
patch, no batch dimension), so the hand-written methods tile them per row (`repeat`). Methods
that cannot run there say why instead of disappearing: TransformerLens 4.3 has no Qwen2-VL
adapter, and prefix reuse skips layers but recomputes every position (a suffix would be
numbered from 0 by the model). Its section ends with `mrope <name> (qwen2_vl, positions=model):
vs_ceiling=<vlmtrace/ceiling> prefix_vs_ceiling=<r> vs_nnsight_loop=<r> vs_transformerlens=<r>`,
the run's last line with `--only-mrope`.

The last line is `perf prefix_vs_ceiling=<r> screen_topk_overlap=<f> vs_transformerlens=<r>`:
- prefix_vs_ceiling: vlmtrace with prefix reuse (`reuse_prefix=True`: cells grouped by their
  first patched layer, the layers below skipped, and only the positions from the first patched
  one computed on the cached keys/values of the image prefix) over the ceiling, runs/s, for the
  full-depth layer x text-position sweep, 7B-shaped model (the first model with `--skip-big`).
- screen_topk_overlap: the share of exact patching's top-K cells (by |effect|) that
  `vlmtrace.attribute` also ranks in its top K (`vlmtrace.engine.screening.agreement`, strict), on
  the first model's one sample and block grid: on the 7B-shaped random model only a few cells move
  and the rest tie at exactly zero, so its overlap (printed in its section) mostly measures
  tie-breaking. Each section also prints the material overlap (ties within 5% of the clean -
  corrupted gap count, negligible cells do not); `benchmarks/screen.py` measures the screen on
  every organism, site and corruption with 8 samples each.
- vs_transformerlens: vlmtrace runs/s (with prefix reuse) over TransformerLens runs/s, same model
  as prefix_vs_ceiling; the table also has the plain sweep's ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch

import vlmtrace as vt
from vlmtrace.data import synthetic_samples
from vlmtrace.data.scenes import VOCABULARY
from vlmtrace.engine.inputs import scored_answer_ids
from vlmtrace.engine.screening import agreement
from vlmtrace.models.build import build_llava, word_tokenizer
from vlmtrace.models.load import describe

SPAN = "visual"
NOISE_SCALE = 3.0  # ROME's 3 x std of the noised embeddings
TOLERANCE = 1e-4  # max abs difference of P(answer) from vlmtrace's that counts as "the same"


@dataclass(frozen=True)
class Shape:
    """A random LLaVA to build: `build_llava` arguments and how long to measure it."""

    label: str
    layers: int
    hidden: int
    heads: int
    image_size: int
    patch_size: int
    noise_samples: int
    """k of the ROME-style experiment (ROME's default is 10)."""
    repeats: int
    """Timed calls of each batched method after the checked first call."""
    loop_repeats: int
    """Timed calls of each one-forward-per-cell method."""


@dataclass
class Setup:
    """One model in every form the methods need, one sample, one grid."""

    label: str
    vlm: vt.VLM
    copies: dict[str, torch.nn.Module]
    """Unwrapped copies of the weights: "torch" (ceiling, ROME loop), "tl" and "pyvene" (each
    library hooks or rewires the model it is given, so none shares one)."""
    sample: vt.Sample
    corrupted_prompt: str
    answer_id: int
    text: list[int]
    """Positions of the grid: every non-image token of the prompt."""
    span: list[int]
    """Positions of the visual-constraint phrase (the ROME loop noises their embeddings)."""
    n_layers: int
    max_batch: int
    noise_samples: int
    bridge: Any = None
    pyvene: PyveneModels | None = None
    unavailable: dict[str, str] = field(default_factory=dict)
    """Method -> why it could not run here."""
    corrupted_image: Any = None
    """The corrupted run's image where it is not the sample's (an image pair); None: the same."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    """Where the hand-written methods put their inputs (the model's device and dtype)."""

    @property
    def cells(self) -> list[tuple[int, int]]:
        return [(layer, position) for layer in range(self.n_layers) for position in self.text]


# -- building the models ----------------------------------------------------------------------------


def redraw(model: torch.nn.Module, scale: float, seed: int = 0) -> None:
    """Draw the language model's matrices and the unembedding with std `scale / sqrt(d)`, the
    query and key projections with half that.

    With the default initialisation (0.02) P(answer) is flat to 1e-4 across cells, so the equality
    check could not tell a wrong cell from a right one. With q and k at the full std, attention
    logits have std ~16, every query reads one random key, and on the 7B-shaped model (576 image
    tokens) no restoration changed P(answer) at all (measured).
    """
    hidden = model.config.text_config.hidden_size
    device = model.lm_head.weight.device  # a CPU generator for CPU weights: the numbers of RESULTS.md
    generator = torch.Generator(device=device).manual_seed(seed)
    matrices = [*model.model.language_model.named_parameters(), ("lm_head.weight", model.lm_head.weight)]
    with torch.no_grad():
        for name, parameter in matrices:
            if parameter.dim() == 2:
                query_or_key = name.endswith(("q_proj.weight", "k_proj.weight"))
                std = scale / hidden**0.5 / (2 if query_or_key else 1)
                parameter.normal_(0.0, std, generator=generator)


def build(shape: Shape, init_scale: float) -> tuple[torch.nn.Module, Any, str]:
    tokenizer = word_tokenizer(VOCABULARY)
    model, processor = build_llava(
        tokenizer,
        layers=shape.layers,
        hidden=shape.hidden,
        heads=shape.heads,
        image_size=shape.image_size,
        patch_size=shape.patch_size,
        seed=0,
    )
    if init_scale:
        redraw(model, init_scale)
    return model, processor, f"random-llava-{shape.layers}x{shape.hidden}"


def load_dir(name: str) -> tuple[torch.nn.Module, Any, str]:
    """A saved LLaVA (a directory or a shipped organism's name), weights as trained."""
    from transformers.utils import logging

    logging.disable_progress_bar()  # "Loading weights" would land in the middle of the report
    path, _, processor, model_class = describe(name)
    return model_class.from_pretrained(path, attn_implementation="eager").eval(), processor, name


def make_setup(
    label: str,
    model: torch.nn.Module,
    processor: Any,
    name: str,
    args: argparse.Namespace,
    k: int,
    *,
    own: bool,
    libraries: tuple[str, ...] = ("tl", "pyvene"),
) -> Setup:
    """Copies for every method, the sample and the grid; `own`: the answer is the clean top-1.

    `libraries`: the peers to attach ("tl": TransformerLens, "pyvene"), each on its own copy of
    the weights; the model's device and dtype are kept (move it before calling this)."""
    copies = {kind: copy.deepcopy(model).eval() for kind in ("torch", *libraries)}  # before nnsight
    parameter = next(model.parameters())
    vlm = vt.wrap(model, processor, name=name)
    sample = synthetic_samples(vlm, "multi", 1, seed=0)[0]
    setup = Setup(
        label=label,
        vlm=vlm,
        copies=copies,
        sample=sample,
        corrupted_prompt="",
        answer_id=-1,
        text=[],
        span=[],
        n_layers=vlm.shape.layers["lm"],
        max_batch=args.max_batch,
        noise_samples=k,
        device=parameter.device,
        dtype=parameter.dtype,
    )  # the rest is filled in below, once the sample's answer is settled
    clean = encode(setup, sample.prompt)
    if own:
        with torch.no_grad():
            top = int(copies["torch"](**clean, logits_to_keep=1).logits[0, -1].argmax())
        sample = sample.with_(answer=vlm.tokenizer.convert_ids_to_tokens(top))
    setup.sample = sample
    setup.corrupted_prompt = sample.prompt.replace(sample.spans[SPAN], sample.replacements[SPAN], 1)
    setup.answer_id = scored_answer_ids(vlm, sample.prompt, sample.answer, whole=False)[0]
    ids = clean["input_ids"][0].tolist()
    corrupt_ids = encode(setup, setup.corrupted_prompt)["input_ids"][0].tolist()
    if len(corrupt_ids) != len(ids):
        raise SystemExit(
            f"{sample.replacements[SPAN]!r} does not have the token count of {sample.spans[SPAN]!r}: "
            "the peers here patch position p into position p; choose a same-length replacement."
        )
    image_token = vlm.shape.image_token_id
    setup.text = [p for p, token in enumerate(ids) if token != image_token]
    setup.span = find(ids, vlm.tokenizer(sample.spans[SPAN], add_special_tokens=False).input_ids)
    if "tl" in libraries:
        attach_transformer_lens(setup, processor)
    else:
        setup.unavailable["TransformerLens"] = "not run (not asked for)"
    if "pyvene" in libraries:
        attach_pyvene(setup)
    else:
        setup.unavailable["pyvene"] = "not run (not asked for)"
    return setup


def find(ids: list[int], part: list[int]) -> list[int]:
    for start in range(len(ids) - len(part) + 1):
        if ids[start : start + len(part)] == part:
            return list(range(start, start + len(part)))
    raise SystemExit(f"the phrase's tokens {part} are not in the prompt's {ids}.")


def attach_transformer_lens(setup: Setup, processor: Any) -> None:
    """TransformerLens 4.3's bridge over its own copy (it reads the config from a directory)."""
    try:
        from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES
        from transformer_lens.model_bridge import TransformerBridge

        model = setup.copies["tl"]
        architecture = type(model).__name__
        if architecture not in SUPPORTED_ARCHITECTURES:
            setup.unavailable["TransformerLens"] = (
                f"not supported: TransformerLens {version('transformer-lens')} has no adapter for "
                f"{architecture} (not in its SUPPORTED_ARCHITECTURES)"
            )
            return
        model.config.architectures = [architecture]  # how the bridge picks its adapter
        with tempfile.TemporaryDirectory() as directory:
            model.config.save_pretrained(directory)
            processor.save_pretrained(directory)
            bridge = TransformerBridge.boot_transformers(
                directory, hf_model=model, device=str(setup.device), dtype=setup.dtype
            )
        setup.bridge = bridge.eval()
    except Exception as error:  # report, never fake a number
        setup.unavailable["TransformerLens"] = f"{type(error).__name__}: {str(error)[:160]}"


@dataclass
class PyveneModels:
    collect: Any
    """Collects the clean block outputs at the text positions, every layer."""
    patchers: list[Any]
    """One per layer: restores a source representation at one position per batch row."""


def attach_pyvene(setup: Setup) -> None:
    try:
        import pyvene as pv

        model = setup.copies["pyvene"]
        path = "model.language_model.layers[{}].output"  # pyvene's own llava map is transformers 4's
        sites = [
            {"layer": layer, "component": path.format(layer), "unit": "pos"}
            for layer in range(setup.n_layers)
        ]
        collect = pv.IntervenableModel(
            [{**site, "intervention_type": pv.CollectIntervention} for site in sites], model
        )
        patchers = [
            pv.IntervenableModel([{**site, "intervention_type": pv.VanillaIntervention}], model)
            for site in sites
        ]
        setup.pyvene = PyveneModels(collect, patchers)
    except Exception as error:
        setup.unavailable["pyvene"] = f"{type(error).__name__}: {str(error)[:160]}"


# -- shared by the hand-written methods --------------------------------------------------------------


def encode(setup: Setup, prompt: str) -> dict[str, torch.Tensor]:
    """One row of model inputs from the HF processor (batch dimension 1; flat inputs such as
    Qwen2-VL's patches have none), on the model's device, images in its dtype."""
    return on_device(
        setup, setup.vlm.processor(text=[prompt], images=[setup.sample.image], return_tensors="pt")
    )


def on_device(setup: Setup, inputs: Any) -> dict[str, torch.Tensor]:
    return {
        name: value.to(setup.device, setup.dtype if value.is_floating_point() else None)
        for name, value in dict(inputs).items()
    }


def both(setup: Setup) -> tuple[dict, dict]:
    """The clean and the corrupted inputs (the corrupted image: `Setup.corrupted_image`)."""
    clean = encode(setup, setup.sample.prompt)
    if setup.corrupted_image is None:
        return clean, encode(setup, setup.corrupted_prompt)
    corrupt = setup.vlm.processor(
        text=[setup.corrupted_prompt], images=[setup.corrupted_image], return_tensors="pt"
    )
    return clean, on_device(setup, corrupt)


def layer_modules(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.model.language_model.layers


def probability(logits: torch.Tensor, answer_id: int) -> torch.Tensor:
    """P(answer) at the last position, one per row (what `vt.Probability()` scores)."""
    return torch.softmax(logits[:, -1].float(), dim=-1)[:, answer_id]


def repeat(inputs: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """n rows of one row's inputs; a flat input (Qwen2-VL's `pixel_values` [patches, features],
    `image_grid_thw` [images, 3]) is tiled along its first dimension, which is what one image
    per row means there, and what concatenating rows does too."""
    return {name: value.repeat(n, *([1] * (value.dim() - 1))) for name, value in inputs.items()}


def to_grid(setup: Setup, values) -> np.ndarray:
    """Values listed in `setup.cells` order -> [layer, text position]."""
    return np.asarray(values, dtype=float).reshape(setup.n_layers, len(setup.text))


# -- the methods: each returns P(answer) per cell, [layer, text position] ----------------------------

GRID = vt.Grid(sites=("block",), windows=(1,), skip=("image",))


def vlmtrace_dataset(setup: Setup, corruption: Any, reuse_prefix: bool = False) -> Any:
    return vt.patch(
        setup.vlm,
        [setup.sample],
        corruption=corruption,
        grid=GRID,
        metric=vt.Probability(),
        max_batch=setup.max_batch,
        progress=False,
        reuse_prefix=reuse_prefix,
    )


def cells_of(setup: Setup, ds: Any) -> np.ndarray:
    values = ds["block"].sel(window=1).isel(sample=0).transpose("layer", "position")
    if list(values["index"].values) != setup.text:
        raise SystemExit(
            f"vlmtrace's grid covers positions {list(values['index'].values)}, not {setup.text}."
        )
    return values.values


def vlmtrace_sweep(setup: Setup) -> np.ndarray:
    return cells_of(setup, vlmtrace_dataset(setup, vt.ReplaceSpan(SPAN)))


def vlmtrace_prefix(setup: Setup) -> np.ndarray:
    return cells_of(setup, vlmtrace_dataset(setup, vt.ReplaceSpan(SPAN), reuse_prefix=True))


def noise(setup: Setup) -> vt.GaussianNoise:
    return vt.GaussianNoise(SPAN, scale=NOISE_SCALE, samples=setup.noise_samples, seed=0)


def vlmtrace_noise(setup: Setup) -> np.ndarray:
    return cells_of(setup, vlmtrace_dataset(setup, noise(setup)))


class WithImage:
    """What `generic_activation_patch` calls (`run_with_hooks(tokens, fwd_hooks=...)`), with the
    image bound: the patching loop passes token ids only."""

    def __init__(self, bridge: Any, pixel_values: torch.Tensor) -> None:
        self.bridge, self.pixel_values, self.cfg = bridge, pixel_values, bridge.cfg

    def run_with_hooks(self, tokens: torch.Tensor, fwd_hooks: list) -> torch.Tensor:
        return self.bridge.run_with_hooks(tokens, fwd_hooks=fwd_hooks, pixel_values=self.pixel_values)


@torch.no_grad()
def transformer_lens(setup: Setup) -> np.ndarray:
    """`generic_activation_patch` over exactly the grid's (layer, position) rows (`index_df`)."""
    import pandas as pd
    from transformer_lens import patching

    clean, corrupt = both(setup)
    cache = setup.bridge.run_with_cache(
        clean["input_ids"],
        pixel_values=clean["pixel_values"],
        names_filter=lambda name: name.endswith("hook_resid_post"),
    )[1]
    index = pd.DataFrame(setup.cells, columns=["layer", "pos"])
    with contextlib.redirect_stderr(io.StringIO()):  # its tqdm bar, one line per cell
        values = patching.generic_activation_patch(
            WithImage(setup.bridge, corrupt["pixel_values"]),
            corrupt["input_ids"],
            cache,
            lambda logits: probability(logits, setup.answer_id)[0],
            patching.layer_pos_patch_setter,
            "resid_post",
            index_df=index,
        )
    return to_grid(setup, values.float().cpu().numpy())


def rearm_output_capture(model: torch.nn.Module) -> None:
    """Let transformers reinstall its output-capturing hooks at the next forward.

    pyvene removes *every* forward hook of the model before and after each call
    (`remove_forward_hooks` in `_cleanup_states`), including the ones transformers 5 installs
    once to collect `hidden_states`; LLaVA reads the vision tower's hidden states through them,
    so the second pyvene call fails (`IndexError` in `get_image_features`). Clearing the
    "installed" flag makes transformers put them back.
    """
    for module in model.modules():
        if getattr(module, "_output_capturing_hooks_installed", False):
            module._output_capturing_hooks_installed = False


@torch.no_grad()
def pyvene(setup: Setup) -> np.ndarray:
    """Collect clean states once, then one forward per layer with one row per position."""
    model, models = setup.copies["pyvene"], setup.pyvene
    clean, corrupt = both(setup)
    text, width = setup.text, len(setup.text)
    rearm_output_capture(model)
    (_, states), _ = models.collect(
        base={**clean, "logits_to_keep": 1}, unit_locations={"base": [[text]] * setup.n_layers}
    )
    base = {**repeat(corrupt, width), "logits_to_keep": 1}
    where = {"sources->base": (None, [[[p] for p in text]])}  # row i restores position text[i]
    grid = []
    for layer, patcher in enumerate(models.patchers):
        source = {next(iter(patcher.interventions)): states[layer].reshape(width, 1, -1)}
        rearm_output_capture(model)
        _, out = patcher(base=base, unit_locations=where, source_representations=source)
        grid.append(probability(out.logits, setup.answer_id).cpu().numpy())
    return np.stack(grid)


@torch.no_grad()
def nnsight_loop(setup: Setup) -> np.ndarray:
    """One nnsight trace of the corrupted input per cell, restoring one clean state."""
    envoy = setup.vlm.envoy
    layers = envoy.model.language_model.layers
    clean, corrupt = both(setup)
    states = []
    with envoy.trace(**clean, logits_to_keep=1):
        for layer in range(setup.n_layers):
            states.append(layers[layer].output.save())
    values = []
    for layer, position in setup.cells:
        with envoy.trace(**corrupt, logits_to_keep=1):
            layers[layer].output[0, position] = states[layer][0, position]
            value = probability(envoy.output.logits, setup.answer_id).save()
        values.append(value.item())
    return to_grid(setup, values)


@torch.no_grad()
def ceiling(setup: Setup) -> np.ndarray:
    """vlmtrace's rows by hand: [clean, corrupt, patched...] per chunk of `max_batch` rows, one
    forward each, a hook per layer doing `h[rows, pos] = h[0, pos]` for the chunk's cells there."""
    model = setup.copies["torch"]
    clean, corrupt = both(setup)
    cells, per_chunk = setup.cells, setup.max_batch - 2
    values: list[float] = []
    for start in range(0, len(cells), per_chunk):
        chunk = torch.tensor(cells[start : start + per_chunk], device=setup.device)  # [cells, (layer, pos)]
        corrupted = repeat(corrupt, 1 + len(chunk))
        batch = {name: torch.cat([clean[name], corrupted[name]]) for name in clean}
        rows = torch.arange(2, 2 + len(chunk), device=setup.device)
        hooks = []
        for layer, module in enumerate(layer_modules(model)):
            here = chunk[:, 0] == layer
            if here.any():

                def restore(module, args, output, rows=rows[here], positions=chunk[here, 1]):
                    output[rows, positions] = output[0, positions]

                hooks.append(module.register_forward_hook(restore))
        try:
            logits = model(**batch, logits_to_keep=1).logits
        finally:
            for hook in hooks:
                hook.remove()
        values += probability(logits[2:], setup.answer_id).tolist()
    return to_grid(setup, values)


@torch.no_grad()
def rome_loop(setup: Setup) -> np.ndarray:
    """Meng et al.'s causal trace: row 0 clean, rows 1..k the clean prompt with Gaussian noise on
    the phrase's token embeddings; for each (layer, position) one forward in which a hook copies
    row 0's layer output at that position into rows 1..k; the cell is the mean P(answer) of rows
    1..k. The noise std is NOISE_SCALE x the std of the phrase's clean embeddings in this forward
    (ROME measures it over a corpus), drawn as vlmtrace draws it so the two can be compared."""
    model, k = setup.copies["torch"], setup.noise_samples
    clean = encode(setup, setup.sample.prompt)
    batch = repeat(clean, 1 + k)
    span = torch.tensor(setup.span, device=setup.device)
    hidden = model.config.text_config.hidden_size
    draws = torch.randn(k, len(span), hidden, generator=torch.Generator().manual_seed(0)).to(setup.device)

    def add_noise(module, args, output):
        sigma = NOISE_SCALE * output[0, span].float().std()
        output[1:, span] += (sigma * draws).to(output.dtype)

    embedding = model.model.language_model.embed_tokens.register_forward_hook(add_noise)
    values = []
    try:
        for layer, position in setup.cells:

            def restore(module, args, output, position=position):
                output[1:, position] = output[0, position]

            hook = layer_modules(model)[layer].register_forward_hook(restore)
            try:
                logits = model(**batch, logits_to_keep=1).logits
            finally:
                hook.remove()
            values.append(probability(logits[1:], setup.answer_id).mean().item())
    finally:
        embedding.remove()
    return to_grid(setup, values)


@dataclass(frozen=True)
class Method:
    name: str
    run: Callable[[Setup], np.ndarray]
    reference: str
    """The method whose values this one must reproduce (its vlmtrace counterpart)."""
    loop: bool
    """One forward per cell: timed `loop_repeats` times."""
    noisy: bool = False
    """A run of the noise experiment: each cell is k runs."""
    requires: str | None = None
    """Key of `Setup.unavailable` that disables it."""


METHODS = (
    Method("vlmtrace", vlmtrace_sweep, "vlmtrace", loop=False),
    Method("vlmtrace prefix", vlmtrace_prefix, "vlmtrace", loop=False),
    Method("TransformerLens", transformer_lens, "vlmtrace", loop=True, requires="TransformerLens"),
    Method("pyvene", pyvene, "vlmtrace", loop=False, requires="pyvene"),
    Method("nnsight loop", nnsight_loop, "vlmtrace", loop=True),
    Method("ceiling", ceiling, "vlmtrace", loop=False),
    Method("vlmtrace noise", vlmtrace_noise, "vlmtrace noise", loop=False, noisy=True),
    Method("ROME-style loop", rome_loop, "vlmtrace noise", loop=True, noisy=True),
)
DESCRIPTIONS = {
    "vlmtrace": "vt.patch, ReplaceSpan, all cells as rows of batched forwards in nnsight traces",
    "vlmtrace prefix": "vt.patch(reuse_prefix=True): layers and positions before the first patch reused",
    "TransformerLens": "TransformerBridge + generic_activation_patch, 1 forward per cell",
    "pyvene": "IntervenableModel, 1 collect forward + 1 forward per layer (a row per position)",
    "nnsight loop": "one nnsight trace per cell",
    "ceiling": "plain torch, vlmtrace's rows in one forward per chunk, indexed edits in hooks",
    "vlmtrace noise": "vt.patch, GaussianNoise on the phrase, k draws per cell",
    "ROME-style loop": "plain torch, 1 forward of 1 + k rows per cell (Meng et al.)",
}


# -- measuring ----------------------------------------------------------------------------------------


@dataclass
class Measured:
    values: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: dict[str, list[float]] = field(default_factory=dict)
    """Wall-clock seconds of each timed call."""
    cpu: dict[str, list[float]] = field(default_factory=dict)
    """This process's CPU seconds of each timed call: with 1 thread, the time it did not spend
    waiting for a core that another process held."""
    failed: dict[str, str] = field(default_factory=dict)
    overlap: float = float("nan")
    material_overlap: float = float("nan")
    spearman: float = float("nan")
    attribution_seconds: float = float("nan")


def measure(setup: Setup, shape: Shape, top_k: int) -> Measured:
    """Each method once (checked, and its warm-up), then timed calls taken in turns (round robin,
    so a burst of load from another process hits all methods alike)."""
    result = Measured(failed=dict(setup.unavailable))
    active = [m for m in METHODS if m.requires not in setup.unavailable]
    for method in list(active):
        try:
            result.values[method.name] = method.run(setup)
        except Exception as error:  # a peer that breaks on this model is reported, not faked
            result.failed[method.name] = f"{type(error).__name__}: {str(error)[:160]}"
            active.remove(method)
    result.seconds = {m.name: [] for m in active}
    result.cpu = {m.name: [] for m in active}
    for turn in range(max(shape.repeats, shape.loop_repeats)):
        for method in active:
            if turn < (shape.loop_repeats if method.loop else shape.repeats):
                start, start_cpu = time.perf_counter(), time.process_time()
                method.run(setup)
                result.seconds[method.name].append(time.perf_counter() - start)
                result.cpu[method.name].append(time.process_time() - start_cpu)
    exact = vlmtrace_dataset(setup, vt.ReplaceSpan(SPAN))
    start = time.perf_counter()
    estimate = vt.attribute(
        setup.vlm,
        [setup.sample],
        corruption=vt.ReplaceSpan(SPAN),
        grid=GRID,
        metric=vt.Probability(),
        progress=False,
    )
    result.attribution_seconds = time.perf_counter() - start
    report = agreement(estimate, exact, k=top_k)["block"]
    result.overlap, result.spearman = report["overlap"], report["spearman"]
    result.material_overlap = report["material_overlap"]
    return result


def rates(setup: Setup, seconds: dict[str, list[float]]) -> dict[str, float]:
    """Patched runs per second from each method's best timed call."""
    cells = len(setup.cells)
    by_name = {m.name: m for m in METHODS}
    return {
        name: cells * (setup.noise_samples if by_name[name].noisy else 1) / min(times)
        for name, times in seconds.items()
        if times
    }


def describe_method(setup: Setup, name: str) -> str:
    if name == "vlmtrace prefix" and setup.vlm.adapter.positions == "model":
        return (
            "vt.patch(reuse_prefix=True): layers below the first patched one skipped, every position "
            "recomputed (the model makes its positions, M-RoPE: no key/value resume)"
        )
    return DESCRIPTIONS[name]


def model_description(config: Any) -> str:
    """The decoder and vision tower in one line: LLaVA's CLIP or Qwen2-VL's merged-patch tower."""
    text, vision = config.text_config, config.vision_config
    decoder = {"llama": "Llama", "qwen2_vl_text": "Qwen2 (M-RoPE)"}.get(text.model_type, text.model_type)
    line = (
        f"{decoder} {text.num_hidden_layers} layers, d={text.hidden_size}, {text.num_attention_heads} heads "
        f"(head dim {text.hidden_size // text.num_attention_heads}), MLP {text.intermediate_size}, "
        f"vocab {text.vocab_size}; "
    )
    if hasattr(vision, "image_size"):  # CLIP
        return line + (
            f"CLIP {vision.num_hidden_layers} layers, d={vision.hidden_size}, "
            f"{vision.image_size} px / {vision.patch_size} px patches"
        )
    merge = getattr(vision, "spatial_merge_size", 1)
    return line + (
        f"{vision.model_type} {vision.depth} layers, d={vision.embed_dim}, {vision.patch_size} px patches "
        f"merged {merge}x{merge} into one image token"
    )


def report(setup: Setup, shape: Shape, result: Measured, top_k: int) -> tuple[float, float, float]:
    """Print the model's table; return (vlmtrace/ceiling, top-K overlap, vlmtrace/TransformerLens)."""
    rate, cpu_rate = rates(setup, result.seconds), rates(setup, result.cpu)
    width = len(encode(setup, setup.sample.prompt)["input_ids"][0])
    print(
        f"\n## {setup.label}: {setup.vlm.name}\n\n"
        f"{model_description(setup.copies['torch'].config)}; {width} prompt tokens, "
        f"{width - len(setup.text)} of them image tokens.\n"
        f"Sample: {setup.sample.prompt!r} -> {setup.sample.answer!r}; "
        f"{setup.sample.spans[SPAN]!r} replaced by {setup.sample.replacements[SPAN]!r}.\n"
        f"Grid: block output, window 1, {setup.n_layers} layers x {len(setup.text)} text positions = "
        f"{len(setup.cells)} cells; noise experiment k={setup.noise_samples} "
        f"({len(setup.cells) * setup.noise_samples} runs); max_batch={setup.max_batch}.\n"
        f"Timing: best of {shape.repeats} (batched) / {shape.loop_repeats} (loops) calls after a checked "
        f"first call; runs/s = runs / best wall-clock seconds; cpu: the same from this process's CPU time.\n"
    )
    print(
        "| method | what | runs | best s | median s | cpu s | runs/s | runs/s (cpu) | / vlmtrace | / ceiling "
        "| max abs diff |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    by_name = {m.name: m for m in METHODS}
    for method in METHODS:
        name = method.name
        if name in result.failed:
            why = result.failed[name]
            what = why if why.startswith(("not supported", "not run")) else f"not available ({why})"
            print(f"| {name} | {what} | | | | | | | | | |")
            continue
        runs = len(setup.cells) * (setup.noise_samples if method.noisy else 1)
        times = result.seconds[name]
        difference = float(np.abs(result.values[name] - result.values[method.reference]).max())
        flag = "" if difference < TOLERANCE else " DISAGREES"
        print(
            f"| {name} | {describe_method(setup, name)} | {runs} | {min(times):.4f} | "
            f"{statistics.median(times):.4f} | "
            f"{min(result.cpu[name]):.4f} | {rate[name]:.1f} | {cpu_rate[name]:.1f} | "
            f"{rate[name] / rate[by_name[name].reference]:.3f} | "
            f"{rate[name] / rate['ceiling']:.3f} | {difference:.1e}{flag} |"
        )
    spread = {
        name: float(np.ptp(result.values[name]))
        for name in ("vlmtrace", "vlmtrace noise")
        if name in result.values
    }
    print(
        "\n/ vlmtrace: runs/s over vlmtrace's on the same experiment (noise rows: over `vlmtrace noise`). "
        f"max abs diff: of P(answer), cell by cell, from that vlmtrace run; the check is not vacuous: "
        f"P(answer) spans {spread.get('vlmtrace', float('nan')):.3f} (ReplaceSpan) and "
        f"{spread.get('vlmtrace noise', float('nan')):.3f} (noise) across cells."
    )
    print(
        f"Attribution patching (`vt.attribute`, one forward + backward): "
        f"{result.attribution_seconds:.3f} s; top-{top_k} overlap with exact patching "
        f"{result.overlap:.2f} (material {result.material_overlap:.2f}), Spearman {result.spearman:.2f}."
    )
    if "TransformerLens" in rate:
        print(
            f"By CPU time: vlmtrace / ceiling {cpu_rate['vlmtrace'] / cpu_rate['ceiling']:.2f}, "
            f"vlmtrace / TransformerLens {cpu_rate['vlmtrace'] / cpu_rate['TransformerLens']:.2f}."
        )
    vs_ceiling = rate["vlmtrace prefix"] / rate["ceiling"]
    # vlmtrace's fastest exact sweep of this grid (prefix reuse) against TransformerLens's
    vs_tl = rate["vlmtrace prefix"] / rate["TransformerLens"] if "TransformerLens" in rate else float("nan")
    return vs_ceiling, result.overlap, vs_tl


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = []
    for package in ("torch", "nnsight", "transformers", "transformer-lens", "pyvene"):
        try:
            versions.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            versions.append(f"{package} not installed")
    return (
        f"{platform.machine()} {cpu}, nproc={os.cpu_count()}, torch threads={torch.get_num_threads()}; "
        + ", ".join(versions)
    )


def load_mrope(args: argparse.Namespace) -> tuple[torch.nn.Module, Any, str, bool]:
    """The M-RoPE model: a saved Qwen2-VL (organism) or a tiny random one; True if random."""
    if args.mrope == "random":
        from vlmtrace.models.zoo.qwen import build_qwen2_vl

        model, processor = build_qwen2_vl(
            word_tokenizer(VOCABULARY), layers=args.layers, hidden=args.hidden, seed=0
        )
        if args.init_scale:
            redraw(model, args.init_scale)
        return model, processor, f"random-qwen2-vl-{args.layers}x{args.hidden}", True
    model, processor, name = load_dir(args.mrope)
    return model, processor, name, False


def measure_mrope(args: argparse.Namespace) -> str:
    """The peers on a Qwen2-VL-class model (M-RoPE, positions made by the model); returns its line.

    What cannot run there is reported as such: TransformerLens 4.3 has no Qwen2-VL adapter, and
    prefix reuse skips layers only (a suffix numbered by the model would restart at position 0,
    so `resumes_keys_values` is false and every position is recomputed)."""
    model, processor, name, random = load_mrope(args)
    if model.config.text_config.model_type != "qwen2_vl_text":
        print(f"\n(--mrope {args.mrope}: {model.config.model_type} is not a Qwen2-VL; measured anyway)")
    shape = Shape(
        "M-RoPE", args.layers, args.hidden, 4, 32, 4, args.noise_samples, args.repeats, args.loop_repeats
    )
    setup = make_setup("M-RoPE", model, processor, name, args, shape.noise_samples, own=random)
    result = measure(setup, shape, args.top_k)
    report(setup, shape, result, args.top_k)
    rate = rates(setup, result.seconds)
    family = f"{model.config.model_type}, positions={setup.vlm.adapter.positions}"

    def ratio(a: str, b: str) -> str:
        return f"{rate[a] / rate[b]:.2f}" if a in rate and b in rate else "n/a"

    missing = ", ".join(f"{m}: {why}" for m, why in result.failed.items())
    if missing:
        print(f"Not run on {name}: {missing}.")
    return (
        f"mrope {name} ({family}): vs_ceiling={ratio('vlmtrace', 'ceiling')} "
        f"prefix_vs_ceiling={ratio('vlmtrace prefix', 'ceiling')} "
        f"vs_nnsight_loop={ratio('vlmtrace', 'nnsight loop')} "
        f"vs_transformerlens={ratio('vlmtrace', 'TransformerLens')}"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model",
        default="shapes-llava",
        help="the first model: a saved LLaVA directory or organism name (trained, so the attribution "
        "screen's overlap means something), or 'random' for a tiny random LLaVA (--layers, --hidden)",
    )
    parser.add_argument("--layers", type=int, default=4, help="tiny model: Llama layers")
    parser.add_argument("--hidden", type=int, default=64, help="tiny model: width")
    parser.add_argument("--big-layers", type=int, default=2, help="7B-shaped model: Llama layers")
    parser.add_argument("--big-hidden", type=int, default=512, help="7B-shaped model: width")
    parser.add_argument(
        "--big-heads", type=int, default=4, help="7B-shaped model: heads (head dim = width/heads)"
    )
    parser.add_argument("--big-image-size", type=int, default=336, help="(image/patch)^2 image tokens")
    parser.add_argument("--big-patch-size", type=int, default=14)
    parser.add_argument("--skip-big", action="store_true", help="measure the tiny model only")
    parser.add_argument(
        "--mrope",
        default="shapes-qwen",
        help="an M-RoPE (Qwen2-VL) model measured after the LLaVAs: a saved directory or organism name, "
        "'random' for a tiny random Qwen2-VL (--layers, --hidden), 'none' to skip it",
    )
    parser.add_argument(
        "--only-mrope", action="store_true", help="measure the M-RoPE model only (its line is the last)"
    )
    parser.add_argument("--repeats", type=int, default=10, help="tiny model: timed calls, batched methods")
    parser.add_argument("--loop-repeats", type=int, default=3, help="tiny model: timed calls, loops")
    parser.add_argument(
        "--big-repeats", type=int, default=2, help="7B-shaped model: timed calls, every method"
    )
    parser.add_argument("--noise-samples", type=int, default=10, help="tiny model: k (ROME's default 10)")
    parser.add_argument("--big-noise-samples", type=int, default=3, help="7B-shaped model: k")
    parser.add_argument("--init-scale", type=float, default=4.0, help="random models: std x sqrt(d); 0 keeps")
    parser.add_argument("--top-k", type=int, default=5, help="K of the attribution screen's overlap")
    parser.add_argument("--max-batch", type=int, default=128, help="rows per forward (vlmtrace, ceiling)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.only_mrope and args.mrope == "none":
        raise SystemExit(
            "--only-mrope measures the --mrope model: give one (shapes-qwen, random, a directory)"
        )
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # peers' deprecation and config chatter; failures are reported
    began, load_before = time.perf_counter(), os.getloadavg()[0]
    print(f"# vlmtrace vs peers: causal tracing throughput\n\nMachine: {machine()}")
    tiny = Shape(
        "tiny", args.layers, args.hidden, 4, 32, 8, args.noise_samples, args.repeats, args.loop_repeats
    )
    big = Shape(
        "7B-shaped",
        args.big_layers,
        args.big_hidden,
        args.big_heads,
        args.big_image_size,
        args.big_patch_size,
        args.big_noise_samples,
        args.big_repeats,
        args.big_repeats,
    )
    headlines = []
    for shape in [] if args.only_mrope else [tiny] if args.skip_big else [tiny, big]:
        loaded = shape is tiny and args.model != "random"
        model, processor, name = load_dir(args.model) if loaded else build(shape, args.init_scale)
        label = "--model" if loaded else shape.label
        setup = make_setup(label, model, processor, name, args, shape.noise_samples, own=not loaded)
        result = measure(setup, shape, args.top_k)
        headlines.append((label, *report(setup, shape, result, args.top_k)))
        _, vs_ceiling, overlap, vs_tl = headlines[-1]
        print(
            f"{label}: prefix_vs_ceiling={vs_ceiling:.2f} screen_topk_overlap={overlap:.2f} "
            f"vs_transformerlens={vs_tl:.2f}"
        )
    mrope_line = None
    if args.mrope != "none":
        mrope_line = measure_mrope(args)
        if headlines:  # the section's last line; with --only-mrope, the run's last line
            print(mrope_line)
    load_after = os.getloadavg()[0]
    print(
        f"\n1-min load average {load_before:.2f} before / {load_after:.2f} after (other processes on this "
        f"machine make every time longer); {time.perf_counter() - began:.0f} s in all."
    )
    if not headlines:
        print(mrope_line)
        return
    # Speed ratios from the last (largest) model; the screen's overlap from the first (the tiny model or
    # --model), whose effects are spread over many cells: on the 7B-shaped random model a handful of cells
    # move and the rest tie at exactly zero, so its top-K overlap mostly measures tie-breaking.
    # prefix_vs_ceiling: vlmtrace with reuse_prefix=True (layers below a cell's first patched layer
    # skipped) over the plain batched forward with the same edits, full-depth layer x position grid.
    speed_of, vs_ceiling, _, vs_tl = headlines[-1]
    overlap_of, _, overlap, _ = headlines[0]
    print(
        f"last line: prefix_vs_ceiling and vs_transformerlens of {speed_of}, "
        f"screen_topk_overlap (top-{args.top_k}) of {overlap_of}"
    )
    fields = f"prefix_vs_ceiling={vs_ceiling:.2f} screen_topk_overlap={overlap:.2f}"
    print(f"perf {fields} vs_transformerlens={vs_tl:.2f}")


if __name__ == "__main__":
    main()
