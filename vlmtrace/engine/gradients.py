"""The traced passes behind attribution: one forward and backward of a sample's baseline rows.

`vlmtrace.engine.attribution` turns gradients into estimates of a patching grid; this module
runs the model to get them. One nnsight trace holds every row the estimator needs, and one
backward of their summed metrics gives each row its own gradient (rows of a batch do not
interact):

    rows     clean, the k corrupted draws        every estimator
             `steps` midpoints + 1 end per draw  integrated gradients (a path between the runs)
             one copy of the gradient rows       GradDrop: per layer skipped in the backward pass

    terms, values = gradient_terms(vlm, stack, prepared, pairs, wanted, passes)

`queries_keys_moved` runs a second, forward-only trace for AtP*'s QK fix
(`vlmtrace.engine.qk_fix`): one row per (site, layer, head) patched at every position at once
gives the next layer's query and key that patching each single position gives.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import nnsight
import numpy as np
import torch

from ..models.adapter import Hook, Stack, module_at
from ..models.load import VLM
from .alignment import align
from .forward import (
    SEQUENCE_FIELDS,
    _activation,
    _noise,
    driver,
    encode_images_once,
    encoder_runs_before,
    envoy_at,
    shared_images,
    stack_rows,
)
from .layouts import interpolate, patch_through_layout, rows_view, skip_in_backward
from .metrics import Metric
from .planning import Direction, Prepared, baseline_edits, image_units
from .qk_fix import PATTERN_TOLERANCE, LayerScores, QKFixError, Reader, declared, read, readers, summarize
from .sites import HEAD_SITES

__all__ = ["Passes", "QK_ROWS", "Terms", "activation_gradients_only", "gradient_terms", "queries_keys_moved"]

QK_ROWS = 64
"""Patched rows per forward of `queries_keys_moved` (one per site, layer and head, per draw)."""

Terms = dict[tuple[int, str], np.ndarray]
"""(layer, site) -> grad . delta per gradient copy, noise draw and aligned position:
[copies, draws, pairs(, head)]. Copy 0 is the plain gradient (the path's mean for IG), copy
1 + i the gradient with `Passes.skipped[i]` skipped in the backward pass."""

Moves = dict[tuple[int, str, int | None], dict[Reader, tuple[torch.Tensor | None, torch.Tensor]]]
"""(layer, site, head) -> reader -> its (queries, keys) moved by patching that site at each
position: patched minus unpatched, [draws, pairs, heads, head_dim] each (queries None for a
cross-attention: the patch does not move them)."""


@dataclass(frozen=True)
class Passes:
    """What one gradient forward and backward computes beyond the plain gradient."""

    steps: int = 0
    """Integrated-gradients path points (0: the gradient at the patched run)."""
    skipped: tuple[tuple[str, int], ...] = ()
    """(stack, layer) pairs, each skipped in the backward pass of its own copy of the rows."""
    scores: bool = False
    """Summarise the next layers' attention scores and pattern gradients for the QK fix."""


def gradient_terms(
    vlm: VLM,
    stack: Stack,
    prepared: Prepared,
    pairs: list[tuple[int, int]],
    wanted: list[tuple[int, str]],
    direction: Direction,
    metric: Metric,
    passes: Passes,
) -> tuple[np.ndarray, Terms, float, dict[Reader, LayerScores]]:
    """One forward of the rows `passes` asks for and one backward of their metrics.

    Returns the metric of each baseline row (clean, then one per noise draw); for every wanted
    (layer, site), `grad . delta` at every aligned position pair, reduced over features (per
    head for head sites) inside the trace, so only small arrays leave it (`Terms`); with a
    path, how far its end row's metric is from the run it should reproduce; and with
    `passes.scores`, what the QK fix needs of each attention that reads a wanted layer first
    (`qk_fix.Reader`, `LayerScores`).

    Gradients come from nnsight's backward trace (`with values.sum().backward():`, reading
    `.grad` of the activations captured in the forward, latest first).
    """
    k, steps = prepared.pair.samples, passes.steps
    alphas = [(j + 0.5) / steps for j in range(steps)] + [1.0] if steps else []
    patched_input = "corrupt" if direction == "denoise" else "clean"
    inputs = ["clean"] + ["corrupt"] * k + [patched_input] * (len(alphas) * k)
    draws = [0, *range(k)] + [d for _ in alphas for d in range(k)]
    # the row whose gradient each (copy, draw) reads: a corrupted draw (denoise), or the clean row
    copies = [[1 + d if direction == "denoise" else 0 for d in range(k)]]
    gradient_rows = k if direction == "denoise" else 1
    skipped: dict[tuple[str, int], list[int]] = {}
    for where in passes.skipped:
        start = len(inputs)
        inputs += [patched_input] * gradient_rows
        draws += list(range(gradient_rows))
        copies.append([start + (d if direction == "denoise" else 0) for d in range(k)])
        skipped.setdefault(where, []).extend(range(start, start + gradient_rows))
    edits = baseline_edits(vlm, prepared, inputs, draws)
    path = _path_edits(vlm, prepared, inputs, alphas, direction) if steps else []
    batch, images = _batch(vlm, stack, prepared, inputs, edits, path)
    pad_clean, pad_corrupt = prepared.pad("clean", stack.sequence), prepared.pad("corrupt", stack.sequence)
    clean_at = torch.tensor([clean + pad_clean for clean, _ in pairs], dtype=torch.long)
    corrupt_at = torch.tensor([corrupt + pad_corrupt for _, corrupt in pairs], dtype=torch.long)
    # where the patched run's rows hold each pair, and which rows give the gradient
    patched_at = corrupt_at if direction == "denoise" else clean_at
    midpoints = torch.arange(1 + k, 1 + k + steps * k)  # [step * k + draw]
    grad_rows = torch.tensor(copies)  # [copies, draws]
    stack_name = next(name for name, s in vlm.adapter.stacks.items() if s is stack)
    n_heads = vlm.shape.heads[stack_name]
    by_layer = {layer: [site for lay, site in wanted if lay == layer] for layer, _ in wanted}
    targets = _targets(vlm, stack_name, by_layer) if passes.scores else {}
    answer_slice = prepared.answer_slice(vlm)
    answer, foil = prepared.answer, prepared.foil
    envoy = vlm.envoy
    rows, width = batch[SEQUENCE_FIELDS[stack.sequence][0]].shape
    prompt_width = batch["input_ids"].shape[1]
    with torch.enable_grad(), activation_gradients_only(vlm.model):
        with envoy.trace(fn=driver(vlm), **batch) as tracer:
            _corrupt_embeddings(vlm, envoy, edits, path, rows, prompt_width, images)
            captured = []  # (key, hook, activation) in the order autograd creates them
            read_scores = {}
            for name, each in vlm.adapter.stacks.items():  # in the order the model runs them
                layers = envoy_at(envoy, each.layers)
                traced = each is stack
                skips = {layer: at for (s, layer), at in skipped.items() if s == name}
                reading = {reader.layer: reader for reader in targets if reader.stack == name}
                touched = sorted(set(skips) | set(reading) | (set(by_layer) if traced else set()))
                if traced and wanted:
                    first = layers[0].input
                    if not first.requires_grad:
                        first.requires_grad_(True)  # weights are frozen: the graph starts at the stack
                for layer in touched:
                    into = layers[layer].input if layer in skips else None
                    reader = reading.get(layer)
                    if reader is not None:
                        read_scores[reader] = _read(vlm, reader, layers[layer], batch, rows, width)
                    sites = by_layer.get(layer, []) if traced else []
                    captured += _captures(layers[layer], layer, each, sites, reader)
                    if into is not None:
                        _skip_layer(layers[layer], into, each, name, layer, skips[layer], rows, batch)
            logits = tracer.result[:, answer_slice]
            # A detached copy of the clean row as row 0: metrics that score against the clean run
            # (KL) then treat it as a constant, so each row's gradient is that of its own score.
            reference = torch.cat([logits[:1].detach(), logits])
            foil_ids = None if foil is None else foil.to(logits.device)
            scored_rows = metric(reference, answer.to(logits.device), foil_ids)[1:]
            values = scored_rows.detach().float().cpu().save()
            terms = nnsight.save({})
            summaries = nnsight.save({})
            if captured:
                with scored_rows.sum().backward():
                    for key, hook, live in reversed(captured):  # autograd reaches them latest first
                        if isinstance(key, Reader):  # an attention pattern
                            queries, keys, mask = read_scores[key]
                            summary = summarize(
                                queries,
                                keys,
                                mask,
                                targets[key],
                                live,
                                live.grad,
                                base_rows=copies[0],
                                grad_rows=copies,
                                at=patched_at,
                                cross=key.cross,
                            )
                            summaries[key] = {part: value.detach().cpu() for part, value in summary.items()}
                            continue
                        name = hook.path or "<layer>"
                        activation = rows_view(live, hook.layout, rows=rows, width=width, hook=name)
                        grad = rows_view(live.grad, hook.layout, rows=rows, width=width, hook=name)
                        clean_side = activation[:1, clean_at].float()
                        corrupt_side = activation[1 : 1 + k, corrupt_at].float()
                        delta = (
                            clean_side - corrupt_side if direction == "denoise" else corrupt_side - clean_side
                        )
                        if steps:  # the path's mean gradient, per draw: [1, k, pairs, features]
                            slope = grad[midpoints][:, patched_at].float().view(steps, k, *delta.shape[1:])
                            slope = slope.mean(0, keepdim=True)
                        else:  # at the patched run's rows, per copy: [copies, k, pairs, features]
                            slope = grad[grad_rows][:, :, patched_at].float()
                        product = slope * delta
                        if key[1] in HEAD_SITES:
                            product = product.view(*product.shape[:-1], n_heads, -1)
                        terms[key] = product.sum(-1).detach().cpu()
    values = values.numpy()
    miss = 0.0
    if steps:
        ends = values[1 + k + steps * k : 1 + k + (steps + 1) * k]
        other_run = np.full(k, values[0]) if direction == "denoise" else values[1 : 1 + k]
        miss = float(np.abs(ends - other_run).max())
    checked = {reader: _checked(reader, summary, targets[reader]) for reader, summary in summaries.items()}
    return values[: 1 + k], {key: term.numpy() for key, term in terms.items()}, miss, checked


def _captures(layer_envoy, layer: int, stack: Stack, sites: list[str], reader) -> list:
    """The wanted sites of one layer, and the attention pattern a reader needs, as (key, hook,
    activation).

    They are read in the order the model's hooks fire (a module's output after everything
    inside it) but listed in the order autograd creates them: the pattern exists before the
    heads it weighs, so it comes first.
    """
    pattern = None
    if reader is not None:
        kind = "cross" if reader.cross else "self"
        pattern = stack.patterns.get(kind)
        if pattern is None:
            raise QKFixError(f"the {reader.stack!r} stack declares no {kind!r} pattern (Stack.patterns).")
    sites = [s for s in stack.sites if s in sites]  # in the order the model runs them
    inside = [s for s in sites if pattern is not None and _within(stack.sites[s].path, pattern.path)]
    outside = [s for s in sites if s not in inside]
    found = [((layer, s), stack.sites[s], _activation(layer_envoy, stack.sites[s])) for s in inside]
    first = [] if pattern is None else [(reader, pattern, _activation(layer_envoy, pattern))]
    found += [((layer, s), stack.sites[s], _activation(layer_envoy, stack.sites[s])) for s in outside]
    return first + found


def _targets(vlm: VLM, stack_name: str, by_layer: dict) -> dict:
    """Reader -> its scale (None: head_dim ** -0.5), for every attention a wanted layer meets first."""
    found = {}
    for layer in by_layer:
        for reader in readers(vlm, stack_name, layer):
            stack = vlm.adapter.stacks[reader.stack]
            scores = stack.cross_scores if reader.cross else declared(stack, reader.stack)
            found[reader] = _scale(vlm, stack, scores, reader.layer)
    return found


def _read(vlm: VLM, reader, layer_envoy, batch, rows: int, width: int):
    """(queries, keys, mask) of the reader's attention: its own stack's positions as queries, the
    traced stack's (`width`) as keys."""
    stack = vlm.adapter.stacks[reader.stack]
    scores = stack.cross_scores if reader.cross else stack.scores
    return read(
        layer_envoy,
        scores,
        n_heads=vlm.shape.heads[reader.stack],
        rows=rows,
        width=batch[SEQUENCE_FIELDS[stack.sequence][0]].shape[1],
        key_width=width,
        causal=stack.causal and not reader.cross,
    )


def _within(path: str, module: str) -> bool:
    return path == module or path.startswith(module + ".")


def _skip_layer(
    layer_envoy, into, stack: Stack, name: str, layer: int, skipped_rows, rows: int, batch
) -> None:
    """GradDrop: this layer is the identity in the backward pass of `skipped_rows`."""
    block = stack.sites.get("block")
    if block is None:
        raise ValueError(
            f"GradDrop needs the {name!r} stack to declare its 'block' site (the layer's output)."
        )
    skip_in_backward(
        _activation(layer_envoy, block),
        into,
        block.layout,
        rows=rows,
        width=batch[SEQUENCE_FIELDS[stack.sequence][0]].shape[1],
        hook=f"{stack.layers}.{layer}",
        skipped_rows=skipped_rows,
    )


def _scale(vlm: VLM, stack: Stack, scores, layer: int) -> float | None:
    """The factor of q . k at `layer`: the declared attribute, or None for head_dim ** -0.5."""
    if scores.scale is None:
        return None
    module = module_at(vlm.model, ".".join(p for p in (stack.layers, str(layer), scores.module) if p))
    return float(getattr(module, scores.scale))


def _checked(reader, summary: dict, scale: float | None) -> LayerScores:
    error = float(summary.pop("error"))
    if not error <= PATTERN_TOLERANCE:
        kind = "cross_scores" if reader.cross else "scores"
        raise QKFixError(
            f"the queries and keys that the {reader.stack!r} stack's Stack.{kind} declares reproduce "
            f"layer {reader.layer}'s attention pattern only to {error:.2g} (tolerance "
            f"{PATTERN_TOLERANCE:g}): the declaration reads the wrong tensors, scale or mask for this "
            "model; fix it."
        )
    head_dim = summary["queries"].shape[-1]
    return LayerScores(scale=head_dim**-0.5 if scale is None else scale, error=error, **summary)


def queries_keys_moved(
    vlm: VLM,
    stack: Stack,
    prepared: Prepared,
    pairs: list[tuple[int, int]],
    groups: list[tuple[int, str, int | None]],
    direction: Direction,
) -> Moves:
    """For each (layer, site, head), the queries and keys its readers see moved by patching it.

    Queries and keys depend on the layer below position by position, so one row in which the
    site is patched at every aligned position at once holds, at each position, the query and
    key that patching only that position gives (`qk_fix.Reader`: the next layer's
    self-attention, or after the last layer the cross-attention of a stack that reads this
    one). Forward only; `QK_ROWS` rows per trace.
    """
    k = prepared.pair.samples
    per_trace = max(1, QK_ROWS // k)
    moves: Moves = {}
    for start in range(0, len(groups), per_trace):
        moves.update(_moved(vlm, stack, prepared, pairs, groups[start : start + per_trace], direction))
    return moves


def _moved(vlm, stack, prepared, pairs, groups, direction) -> Moves:
    k = prepared.pair.samples
    stack_name = next(name for name, s in vlm.adapter.stacks.items() if s is stack)
    n_heads = vlm.shape.heads[stack_name]
    patched_input = "corrupt" if direction == "denoise" else "clean"
    inputs = ["clean"] + ["corrupt"] * k + [patched_input] * (len(groups) * k)
    draws = [0, *range(k)] + [d for _ in groups for d in range(k)]
    edits = baseline_edits(vlm, prepared, inputs, draws)
    batch, images = _batch(vlm, stack, prepared, inputs, edits, [])
    pad_clean, pad_corrupt = prepared.pad("clean", stack.sequence), prepared.pad("corrupt", stack.sequence)
    clean_at = [clean + pad_clean for clean, _ in pairs]
    corrupt_at = [corrupt + pad_corrupt for _, corrupt in pairs]
    patched_at, source_at = (corrupt_at, clean_at) if direction == "denoise" else (clean_at, corrupt_at)
    base = [1 + d if direction == "denoise" else 0 for d in range(k)]  # the unpatched row of draw d
    source = [0 if direction == "denoise" else 1 + d for d in range(k)]  # the run patched in
    patches: dict[tuple[int, str], dict[str, list[int]]] = {}
    for g, (layer, site, head) in enumerate(groups):
        edit = patches.setdefault(
            (layer, site), {"dst_row": [], "dst_pos": [], "src_row": [], "src_pos": [], "head": []}
        )
        for d in range(k):
            row = 1 + k + g * k + d
            edit["dst_row"] += [row] * len(pairs)
            edit["dst_pos"] += patched_at
            edit["src_row"] += [source[d]] * len(pairs)
            edit["src_pos"] += source_at
            edit["head"] += [] if head is None else [head] * len(pairs)
    read_by = {}  # reader -> the groups whose patched rows it reads
    for g, (layer, _, _) in enumerate(groups):
        for reader in readers(vlm, stack_name, layer):
            read_by.setdefault(reader, []).append(g)
    rows, width = batch[SEQUENCE_FIELDS[stack.sequence][0]].shape
    at = torch.tensor(patched_at)
    envoy = vlm.envoy
    with torch.no_grad(), envoy.trace(fn=driver(vlm), **batch):
        _corrupt_embeddings(vlm, envoy, edits, [], rows, batch["input_ids"].shape[1], images)
        moved = nnsight.save({})
        for name, each in vlm.adapter.stacks.items():  # in the order the model runs them
            layers = envoy_at(envoy, each.layers)
            reading = {reader.layer: reader for reader in read_by if reader.stack == name}
            patched = {layer for layer, _ in patches} if each is stack else set()
            for layer in sorted(set(reading) | patched):
                reader = reading.get(layer)
                if reader is not None:
                    queries, keys, _ = _read(vlm, reader, layers[layer], batch, rows, width)
                    for g in read_by[reader]:
                        rows_of = torch.arange(1 + k + g * k, 1 + k + (g + 1) * k)
                        dq = None if reader.cross else _at(queries, rows_of, base, at)
                        moved[(groups[g], reader)] = (dq, _at(keys, rows_of, base, at))
                for site, hook in each.sites.items():
                    if layer in patched and (layer, site) in patches:
                        patch_through_layout(
                            _activation(layers[layer], hook),
                            hook.layout,
                            rows=rows,
                            width=width,
                            hook=hook.path or "<layer>",
                            n_heads=n_heads,
                            **patches[(layer, site)],
                        )
    found: Moves = {}
    for (group, reader), pair in moved.items():
        found.setdefault(group, {})[reader] = pair
    return found


def _at(x, patched_rows, base_rows: list[int], at):
    """Patched minus unpatched [row, head, position, dim] at the patched positions: [draws, P, H, dim]."""
    return (x[patched_rows][:, :, at] - x[base_rows][:, :, at]).transpose(1, 2).float().cpu()


def _batch(
    vlm: VLM, stack: Stack, prepared: Prepared, inputs: list[str], edits, path: list[dict]
) -> tuple[dict, torch.Tensor | None]:
    """The pass's batch, and per row which distinct image's encoding it reads (None: every row
    encodes its own).

    The pass's rows repeat two images (GradDrop's copies and the path's points all show the clean
    or the corrupted one), so a `row_position` encoder runs once per distinct image, as in a
    sweep's forwards (`forward.shared_images`). Rows get their images' encodings before any
    embedding is noised or moved, so only where the encoder runs before every embedding the pass
    edits (`encoder_runs_before`), and where no such embedding lies inside the encoder.
    """
    rows = prepared.rows(inputs)
    moved = [vlm.adapter.embeddings[edit["embedding"]] for edit in path]
    encoder = vlm.adapter.image_encoder
    images = None
    # `shared_images` itself refuses a stack or noise inside the encoder; the path's embeddings too
    inside = encoder is not None and any(hook.path.startswith(f"{encoder.path}.") for hook in moved)
    if not inside and encoder_runs_before(vlm, [noise.hook for noise in edits.noise] + moved):
        images = shared_images(vlm, rows, stack, edits)
    batch = stack_rows(vlm, rows, prepared.widths, images)
    return batch, None if images is None else torch.tensor(images.of_row)


def embeddings_in_run_order(vlm: VLM) -> list[tuple[str, Hook]]:
    """The adapter's embedding hooks in the order the model runs them: the token embedding first,
    unless the model encodes the image first (`Adapter.image_encoder_runs_first`: BLIP, BLIP-2,
    Mllama), whose image embeddings (the encoder's output, a projector) then come before it. A
    trace must touch them in that order: Mllama's and BLIP-2's integrated-gradients path, declared
    tokens first, stopped with nnsight's OutOfOrderError."""
    tokens_last = vlm.adapter.image_encoder_runs_first
    return sorted(vlm.adapter.embeddings.items(), key=lambda item: (item[0] == "tokens") == tokens_last)


def _corrupt_embeddings(
    vlm: VLM, envoy, edits, path: list[dict], rows: int, width: int, images: torch.Tensor | None = None
) -> None:
    """Give every row its image's encoding (`images`, from `_batch`), then noise the corrupted
    rows' embeddings and move the path rows', in the order the model runs them."""
    if images is not None:
        encode_images_once(envoy, vlm.adapter.image_encoder.path, images)
    for name, hook in embeddings_in_run_order(vlm):
        noised = [plan for plan in edits.noise if plan.hook is hook]
        moves = [edit for edit in path if edit["embedding"] == name]
        if not noised and not moves:
            continue
        live = _activation(envoy, hook)
        for plan in noised:
            _noise(plan, live, rows, width)
        for edit in moves:
            interpolate(live, hook.layout, rows=rows, hook=hook.path, width=width, **edit["args"])


def _path_edits(
    vlm: VLM, prepared: Prepared, inputs: list[str], alphas: list[float], direction: Direction
) -> list[dict]:
    """The interpolations that put each path row at its point between the two runs.

    The path runs through the embeddings, where corruptions act (`Adapter.embeddings`: token
    embeddings at aligned prompt positions, each image whole), so its end point is the other
    run itself wherever the two align. Path row `1 + k + j * k + d` is draw d at `alphas[j]`;
    it moves toward the clean row (denoise) or toward corrupted draw d (noise).
    """
    k = prepared.pair.samples
    moved = list(range(1 + k, 1 + k + len(alphas) * k))
    toward = [0 if direction == "denoise" else 1 + d for _ in alphas for d in range(k)]
    point = [a for a in alphas for _ in range(k)]
    edits = []
    for name, hook in vlm.adapter.embeddings.items():
        args: dict = {"moved_rows": moved, "toward_rows": toward, "alphas": point}
        if hook.layout.startswith("image_"):
            args["units"] = image_units(vlm, prepared.rows(inputs))
        if name == "tokens":
            aligned = align(prepared.pair.clean.segments("prompt"), prepared.pair.corrupt.segments("prompt"))
            pairs = sorted(aligned.pairs.items())
            clean = [c + prepared.pad("clean", "prompt") for c, _ in pairs]
            corrupt = [c + prepared.pad("corrupt", "prompt") for _, c in pairs]
            args["moved_pos"], args["toward_pos"] = (
                (corrupt, clean) if direction == "denoise" else (clean, corrupt)
            )
        edits.append({"embedding": name, "args": args})
    return edits


@contextmanager
def activation_gradients_only(model: torch.nn.Module) -> Iterator[None]:
    """Freeze the weights for one backward, restoring their flags after.

    Only gradients of activations are wanted (here, and in an edit's value optimisation,
    `vlmtrace.engine.editing.values`). With trainable weights, backward would also
    compute and keep a gradient per parameter (as large as the model: 14 GB for a 7B LLaVA)
    and leave it in `param.grad`; frozen, it computes none, and the trace instead makes the
    stack's input require grad so the graph starts there.
    """
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
